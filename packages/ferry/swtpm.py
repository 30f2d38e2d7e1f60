"""The ``swtpm`` behind a domain's ``<tpm><backend type='emulator'/>`` (libvirt's qemu_tpm.c).

One swtpm per running domain with a TPM, started by the host right before
its qemu (qemu connects to swtpm's control socket while it starts):

* **State** (the TPM's seeds, NV indices, PCRs) lives in
  ``state_dir/swtpm/UUID/tpm2`` (``tpm1.2`` for a TPM 1.2), created 0700,
  as libvirt keeps ``/var/lib/libvirt/swtpm/UUID/tpm2``. On the first start
  of a domain (a state directory Ferry had to create, not for an incoming
  migration) ``swtpm_setup`` manufactures the TPM as libvirt has it do:
  endorsement key with its certificate, platform certificate, NVRAM locked
  (``swtpm_setup`` and its local CA are Debian's ``swtpm-tools``). Without
  ``swtpm_setup`` swtpm manufactures a TPM itself on its first start (fresh
  random seeds, but no EK certificate).
* **Process**: ``swtpm socket --tpm2 --tpmstate dir=… --ctrl type=unixio,
  path=RUN/swtpm/ctrl.sock --log file=… --pid file=… --terminate --daemon``,
  an argv list (:func:`swtpm_argv`). swtpm 0.7 daemonizes race-free: its
  launcher exits only once the control socket listens, so the launcher's
  exit status is the start verdict and the socket exists when it returns
  (the condition is checked, never waited for by time). Nobody may connect
  to the socket but qemu: with ``--terminate`` swtpm exits when the
  control connection closes, so it ends with its qemu however qemu ends
  (quit, crash, SIGKILL: the kernel closes the socket).
* **Never orphaned**: when qemu fails to start, the host stops the swtpm it
  started (:meth:`Swtpm.stop`); a swtpm left by an agent that died in
  between is found again through its pidfile and killed
  (:func:`kill_stale`, checked to be a swtpm on this domain's socket).
  Exit is learnt from a pidfd, never from polling a pid. In a systemd
  deployment swtpm joins its qemu's scope (:func:`attach_to_scope`).
* **Migration**: the destination's Prepare starts swtpm on the state
  directory it has (a new, empty one on another host) *without*
  ``swtpm_setup``; qemu's ``tpm-emulator`` carries the state blobs in the
  migration stream and hands them to that swtpm. A failed incoming
  migration removes the state directory only when the destination created
  it (:func:`state_to_remove`).

:func:`state_to_remove` is the sans-I/O rule for the state directory when a
domain's qemu is gone or its definition is removed, libvirt's: kept while a
persistent definition exists or ``persistent_state='yes'``, removed with a
transient domain and at undefine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferry.domain._argv_tpm import swtpm_run_dir, tpm_socket
from ferry.domain.model import Domain, Tpm
from ferry.errors import QemuLaunchError
from ferry.pidfd import PidfdProcess, wait_pidfd_blocking

__all__ = [
    "Swtpm",
    "SwtpmPaths",
    "attach_to_scope",
    "attach_to_scope_argv",
    "kill_stale",
    "remove_state",
    "start_swtpm",
    "state_to_remove",
    "swtpm_argv",
    "swtpm_paths",
    "swtpm_setup_argv",
]

log = logging.getLogger("ferry.swtpm")

#: How long swtpm_setup (manufacturing: ~1.5 s here) and swtpm's start may take.
SETUP_TIMEOUT = 60.0
START_TIMEOUT = 10.0
#: How long a signalled swtpm gets to exit.
_STOP_WAIT = 5.0


@dataclass(frozen=True)
class SwtpmPaths:
    """Where one domain's swtpm keeps its state, socket, pidfile and log."""

    #: The domain's state root (``state_dir/swtpm/UUID``): removed with the domain.
    domain_dir: Path
    #: The TPM state itself (``domain_dir/tpm2`` or ``tpm1.2``).
    state_dir: Path
    ctrl_socket: Path
    pidfile: Path
    log_file: Path


def swtpm_paths(
    state_root: Path, run_dir: Path, log_dir: Path, name: str, uuid: str, tpm: Tpm
) -> SwtpmPaths:
    """The paths of ``name``'s swtpm (sans-I/O).

    ``state_root`` is the host's ``state_dir/swtpm``; ``run_dir`` the
    domain's runtime directory (:attr:`ferry.domain.RuntimePaths.run_dir`).
    """
    domain_dir = state_root / uuid
    sub = "tpm2" if tpm.tpm_version == "2.0" else "tpm1.2"
    return SwtpmPaths(
        domain_dir=domain_dir,
        state_dir=domain_dir / sub,
        ctrl_socket=tpm_socket(run_dir),
        pidfile=swtpm_run_dir(run_dir) / "swtpm.pid",
        log_file=log_dir / f"{name}-swtpm.log",
    )


def _opt_path(path: Path) -> str:
    """A path inside swtpm's comma-separated options (it has no escape for commas)."""
    text = str(path)
    if "," in text or "\n" in text or "\0" in text:
        raise QemuLaunchError(f"path {text!r} cannot be passed to swtpm (comma or newline)")
    return text


def swtpm_argv(binary: str, tpm: Tpm, paths: SwtpmPaths) -> list[str]:
    """The argv that starts the domain's swtpm (a list, never a shell; sans-I/O).

    :raises QemuLaunchError: a path swtpm's option syntax cannot carry.
    """
    argv = [binary, "socket"]
    if tpm.tpm_version == "2.0":
        argv.append("--tpm2")
    argv += [
        "--tpmstate",
        f"dir={_opt_path(paths.state_dir)},mode=0600",
        "--ctrl",
        f"type=unixio,path={_opt_path(paths.ctrl_socket)},mode=0600",
        "--log",
        f"file={_opt_path(paths.log_file)},level=1",
        "--pid",
        f"file={_opt_path(paths.pidfile)}",
        # Exit when qemu's control connection closes: swtpm never outlives qemu.
        "--terminate",
        # Race-free daemonizing (swtpm >= 0.7): the launcher exits once the
        # socket listens; the daemon is PID 1's child, like qemu.
        "--daemon",
    ]
    return argv


def swtpm_setup_argv(
    binary: str, tpm: Tpm, paths: SwtpmPaths, *, name: str, uuid: str
) -> list[str]:
    """The argv that manufactures a new TPM (libvirt's qemuTPMEmulatorRunSetup; sans-I/O)."""
    argv = [binary]
    if tpm.tpm_version == "2.0":
        argv.append("--tpm2")
    argv += [
        "--tpm-state",
        str(paths.state_dir),
        "--vmid",
        f"{name}:{uuid}",
        "--logfile",
        str(paths.log_file),
        "--createek",
        "--create-ek-cert",
        "--create-platform-cert",
        "--lock-nvram",
        "--not-overwrite",
    ]
    if tpm.pcr_banks and tpm.tpm_version == "2.0":
        argv += ["--pcr-banks", ",".join(tpm.pcr_banks)]
    return argv


def attach_to_scope_argv(unit: str, pid: int) -> list[str]:
    """``busctl`` asking systemd to move ``pid`` into qemu's scope ``unit`` (sans-I/O).

    ``AttachProcessesToUnit`` (systemd >= 238) is how a process joins an
    existing unit: swtpm starts before qemu's scope exists, so it joins it
    afterwards, as libvirt moves swtpm into the VM's cgroup.
    """
    return [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "AttachProcessesToUnit",
        "ssau",
        unit,
        "",
        "1",
        str(pid),
    ]


def state_to_remove(
    tpm: Tpm, *, persistent: bool, incoming_unfinished: bool, created_here: bool
) -> bool:
    """Whether a TPM state directory goes when the domain's qemu is gone (sans-I/O).

    ``persistent``: this host keeps a definition of the domain.
    ``incoming_unfinished``: the qemu was an incoming migration that never
    finished; ``created_here``: that migration's Prepare created the state
    directory. A failed migration removes only what it created; otherwise
    the state follows the definition (libvirt: kept for a persistent
    domain, removed with a transient one unless ``persistent_state='yes'``).
    """
    if incoming_unfinished:
        return created_here
    return not persistent and not tpm.persistent_state


def remove_state(paths: SwtpmPaths, *, name: str, whole: bool = True) -> None:
    """Remove the domain's TPM state.

    ``whole``: the domain's whole ``state_dir/swtpm/UUID`` (undefine, a
    transient domain ended), as libvirt deletes it. Otherwise only this
    TPM's state directory (what a failed start or incoming migration
    created), and the domain's directory only if nothing else is in it.
    """
    target = paths.domain_dir if whole else paths.state_dir
    if not target.exists():
        return
    shutil.rmtree(target, ignore_errors=True)
    if not whole:
        with contextlib.suppress(OSError):
            paths.domain_dir.rmdir()  # only when empty
    log.info(
        "domain %s: TPM state %s removed",
        name,
        target,
        extra={"ferry_fields": {"FERRY_DOMAIN": name, "FERRY_TPM_STATE": str(target)}},
    )


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_our_swtpm(pid: int, paths: SwtpmPaths) -> bool:
    """``pid`` is a swtpm serving this domain's control socket."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
    return (
        bool(argv)
        and os.path.basename(argv[0]) == "swtpm"
        and any(f"path={paths.ctrl_socket}," in a for a in argv)
    )


def kill_stale(paths: SwtpmPaths, *, name: str) -> bool:
    """SIGKILL the swtpm the pidfile names, if it is this domain's, and wait for it.

    For a swtpm whose qemu never connected (an agent died between the two
    starts) or that outlived its qemu. Returns True when one was killed.
    """
    pid = _read_pid(paths.pidfile)
    if pid is None:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # Checked after opening the pidfd: the signal goes to the process checked.
        if not _is_our_swtpm(pid, paths):
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        wait_pidfd_blocking(pidfd, _STOP_WAIT)
        log.warning(
            "domain %s: killed stale swtpm pid %d",
            name,
            pid,
            extra={"ferry_fields": {"FERRY_DOMAIN": name, "FERRY_SWTPM_PID": str(pid)}},
        )
        return True
    finally:
        os.close(pidfd)
        with contextlib.suppress(OSError):
            paths.pidfile.unlink()


class Swtpm(PidfdProcess):
    """A swtpm this agent started, tracked by a pidfd until qemu owns it."""

    def __init__(
        self, pid: int, pidfd: int, paths: SwtpmPaths, *, created: bool, name: str
    ) -> None:
        super().__init__(pid, pidfd)
        self.paths = paths
        #: The state directory did not exist before this start.
        self.created = created
        self.name = name

    def on_stopped(self) -> None:
        """swtpm saved its state on SIGTERM; its pidfile and control socket go."""
        with contextlib.suppress(OSError):
            if _read_pid(self.paths.pidfile) == self.pid:
                self.paths.pidfile.unlink()
        with contextlib.suppress(OSError):
            self.paths.ctrl_socket.unlink()


async def _run(argv: list[str], timeout: float, what: str, domain: Domain) -> str:
    """Run a short command to completion; returns its stderr.

    :raises QemuLaunchError: it could not run, failed or took too long.
    """
    with tempfile.TemporaryFile() as errfile:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=errfile,
                start_new_session=True,
            )
        except OSError as exc:
            raise QemuLaunchError(
                f"domain {domain.name}: cannot execute {argv[0]}: {exc.strerror or exc}",
                domain=domain.name,
            ) from None
        try:
            async with asyncio.timeout(timeout):
                rc = await proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            raise
        errfile.seek(0)
        err = errfile.read().decode(errors="replace").strip()
    if rc != 0:
        raise QemuLaunchError(
            f"domain {domain.name}: {what} failed (exit status {rc}): {err or '(no message)'}",
            domain=domain.name,
            returncode=rc,
        )
    return err


def _log_tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-3:])
    return ""


async def start_swtpm(
    domain: Domain,
    paths: SwtpmPaths,
    *,
    incoming: bool,
    swtpm: str = "swtpm",
    swtpm_setup: str | None = "swtpm_setup",
) -> Swtpm:
    """Start ``domain``'s swtpm (see the module docstring) and return it listening.

    ``swtpm_setup=None`` (or one not on PATH) leaves manufacturing to swtpm.
    On failure nothing is left running, and a state directory this call
    created is removed again.

    :raises QemuLaunchError: swtpm or swtpm_setup is missing or failed (the
        message has their words), or a path cannot be passed to swtpm.
    """
    tpm = domain.tpms[0]
    binary = shutil.which(swtpm)
    if binary is None:
        raise QemuLaunchError(
            f"domain {domain.name} has a <tpm>, but {swtpm} is not installed "
            "(Debian: apt-get install swtpm swtpm-tools)",
            domain=domain.name,
        )
    argv = swtpm_argv(binary, tpm, paths)
    kill_stale(paths, name=domain.name)
    created = not paths.state_dir.is_dir()
    for d in (paths.domain_dir.parent, paths.domain_dir, paths.state_dir, paths.ctrl_socket.parent):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.log_file.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    ok = False
    try:
        with contextlib.suppress(FileNotFoundError):
            paths.ctrl_socket.unlink()
        setup = shutil.which(swtpm_setup) if swtpm_setup else None
        if created and not incoming and setup is not None:
            # A new TPM: manufacture it as libvirt does. An incoming one is
            # not: its state comes in the migration stream.
            await _run(
                swtpm_setup_argv(setup, tpm, paths, name=domain.name, uuid=domain.uuid),
                SETUP_TIMEOUT,
                "swtpm_setup (manufacturing the TPM)",
                domain,
            )
        try:
            await _run(argv, START_TIMEOUT, "swtpm", domain)
        except QemuLaunchError as exc:
            tail = _log_tail(paths.log_file)
            raise QemuLaunchError(
                exc.message + (f" (swtpm log: {tail})" if tail else ""), **exc.details
            ) from None
        pid = _read_pid(paths.pidfile)
        if pid is None:
            raise QemuLaunchError(
                f"domain {domain.name}: swtpm started but wrote no pid to {paths.pidfile}",
                domain=domain.name,
            )
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            raise QemuLaunchError(
                f"domain {domain.name}: swtpm (pid {pid}) exited right after "
                f"starting: {_log_tail(paths.log_file) or '(no message)'}",
                domain=domain.name,
            ) from None
        handle = Swtpm(pid, pidfd, paths, created=created, name=domain.name)
        if not paths.ctrl_socket.exists() or not handle.alive():
            await handle.stop()
            raise QemuLaunchError(
                f"domain {domain.name}: swtpm (pid {pid}) is not listening on {paths.ctrl_socket}",
                domain=domain.name,
            )
        ok = True
    finally:
        if not ok:
            kill_stale(paths, name=domain.name)
            if created:
                remove_state(paths, name=domain.name, whole=False)
    log.info(
        "domain %s: swtpm pid %d started (TPM %s, state %s%s)",
        domain.name,
        pid,
        tpm.tpm_version,
        paths.state_dir,
        ", new" if created else "",
        extra={
            "ferry_fields": {
                "FERRY_DOMAIN": domain.name,
                "FERRY_DOMAIN_UUID": domain.uuid,
                "FERRY_SWTPM_PID": str(pid),
                "FERRY_TPM_STATE": str(paths.state_dir),
            }
        },
    )
    return handle


async def attach_to_scope(unit: str, swtpm_pid: int, *, name: str) -> None:
    """Move swtpm into its qemu's scope; a failure is logged, not fatal.

    swtpm ends with qemu anyway (``--terminate``); the scope makes it
    visible and accounted with its VM, and stopping the scope stops it.
    """
    argv = attach_to_scope_argv(unit, swtpm_pid)
    if shutil.which(argv[0]) is None:
        log.warning(
            "domain %s: busctl missing; swtpm pid %d stays outside scope %s", name, swtpm_pid, unit
        )
        return
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(10):
            _, err = await proc.communicate()
    except (OSError, TimeoutError) as exc:
        log.warning(
            "domain %s: cannot move swtpm pid %d into scope %s: %s", name, swtpm_pid, unit, exc
        )
        return
    if proc.returncode != 0:
        log.warning(
            "domain %s: cannot move swtpm pid %d into scope %s: %s",
            name,
            swtpm_pid,
            unit,
            err.decode(errors="replace").strip(),
        )
