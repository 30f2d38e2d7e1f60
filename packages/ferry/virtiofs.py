"""The ``virtiofsd`` behind each virtiofs ``<filesystem>`` (libvirt's qemu_virtiofs.c).

One virtiofsd per filesystem, started by the host right before its qemu:

* **Binary**: ``[qemu] virtiofsd`` in the config, else the first of
  ``/usr/libexec/virtiofsd`` (Debian's Rust ``virtiofsd`` package) and
  ``/usr/lib/qemu/virtiofsd`` (qemu 7.2's C daemon) that exists
  (:func:`find_virtiofsd`).
* **Socket**: the host creates, binds and listens on the vhost-user socket
  (``RUN/virtiofs/fsN.sock``) itself and hands it over with ``--fd``, as
  libvirt does: it listens before qemu starts, so there is nothing to wait
  for (qemu's connection queues until virtiofsd accepts it).
* **Process**: an argv list (:func:`ferry.domain._filesystem.virtiofsd_argv`),
  in the foreground in a session of its own, stderr to
  ``LOG_DIR/NAME-fsN-virtiofsd.log``, tracked by a pidfd and reaped when
  that says it exited (a plain child, not an asyncio one: it must survive
  an agent restart). Its namespace sandbox puts it in mount and network
  namespaces of its own.
* **Lifecycle**: virtiofsd serves one vhost-user connection and exits when
  it closes, so it ends with its qemu however qemu ends (the e2e test checks
  it). When qemu fails to start, the host stops the virtiofsd it started
  (:meth:`Virtiofsd.stop`); at cleanup, one still there is killed through a
  pidfd after checking it is a virtiofsd on this filesystem's directory
  (:func:`kill_recorded`). In a systemd deployment it joins its qemu's
  scope (:func:`attach_to_scope`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

from ferry.domain._filesystem import virtiofs_socket, virtiofsd_argv
from ferry.domain.model import Domain
from ferry.errors import QemuLaunchError
from ferry.pidfd import PidfdProcess, wait_pidfd_blocking
from ferry.swtpm import attach_to_scope_argv

__all__ = [
    "SEARCH",
    "Virtiofsd",
    "attach_to_scope",
    "find_virtiofsd",
    "kill_recorded",
    "start_virtiofsd",
]

log = logging.getLogger("ferry.virtiofs")

#: Where virtiofsd is looked for when the config names none (Rust first, then qemu's C one).
SEARCH = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
#: How long a signalled virtiofsd gets to exit.
_STOP_WAIT = 5.0
#: How long a virtiofsd whose qemu is gone gets to exit on its own before it is killed.
_GRACE = 2.0


def find_virtiofsd(configured: str | None, search: Iterable[str] = SEARCH) -> str | None:
    """The virtiofsd to run: ``configured`` if set (it must exist), else the first found."""
    for cand in (configured,) if configured else search:
        if os.access(cand, os.X_OK):
            return cand
    return None


def _fields(domain: Domain, pid: int, index: int) -> dict[str, str]:
    return {
        "FERRY_DOMAIN": domain.name,
        "FERRY_DOMAIN_UUID": domain.uuid,
        "FERRY_VIRTIOFSD_PID": str(pid),
        "FERRY_FILESYSTEM": str(index),
        "FERRY_FS_SOURCE": domain.filesystems[index].source_dir,
        "FERRY_FS_TAG": domain.filesystems[index].target_dir,
    }


class Virtiofsd(PidfdProcess):
    """One virtiofsd this agent started, tracked by a pidfd."""

    def __init__(self, proc: subprocess.Popen[bytes], pidfd: int, sock: Path, source: str) -> None:
        super().__init__(proc.pid, pidfd)
        self.proc = proc
        self.socket = sock
        self.source = source

    def on_stopped(self) -> None:
        """Its listening socket goes."""
        with contextlib.suppress(OSError):
            self.socket.unlink()

    def close(self) -> None:
        """Stop tracking now: reap virtiofsd if it has exited, close the pidfd."""
        if not self._closed:
            self.proc.poll()
        super().close()

    def hand_over(self) -> None:
        """qemu holds virtiofsd's connection now: let it run, reap it when it exits.

        It is this agent's child (not asyncio's: asyncio would kill a child
        still running when its transport is closed, e.g. when the agent
        stops, and the guest's filesystem must outlive an agent restart).
        """
        if self._closed:
            return
        loop = asyncio.get_running_loop()

        def reap() -> None:
            loop.remove_reader(self.pidfd)
            self.close()

        loop.add_reader(self.pidfd, reap)

    def record(self) -> dict[str, object]:
        """What the status file keeps, for :func:`kill_recorded`."""
        return {"pid": self.pid, "source": self.source, "socket": str(self.socket)}


def _listen(path: Path) -> socket.socket:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_virtiofsd(
    domain: Domain, run_dir: Path, log_dir: Path, binary: str | None
) -> list[Virtiofsd]:
    """Start one virtiofsd per filesystem of ``domain``, each on its listening socket.

    On failure nothing is left running.

    :raises QemuLaunchError: no virtiofsd, or one could not be started.
    """
    if not domain.filesystems:
        return []
    if binary is None:
        raise QemuLaunchError(
            f"domain {domain.name} has a virtiofs <filesystem>, but no virtiofsd was found "
            f"(looked for {', '.join(SEARCH)}; set [qemu] virtiofsd)",
            domain=domain.name,
        )
    started: list[Virtiofsd] = []
    ok = False
    try:
        log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        for i, fs in enumerate(domain.filesystems):
            path = virtiofs_socket(run_dir, i)
            listener = _listen(path)
            try:
                argv = virtiofsd_argv(binary, domain, i, listener.fileno())
                log_file = log_dir / f"{domain.name}-fs{i}-virtiofsd.log"
                with log_file.open("ab") as err:
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        pass_fds=[listener.fileno()],
                        start_new_session=True,
                    )
            except OSError as exc:
                raise QemuLaunchError(
                    f"domain {domain.name}: cannot execute {binary}: {exc.strerror or exc}",
                    domain=domain.name,
                ) from None
            finally:
                # virtiofsd holds the listening socket now; ours goes.
                listener.close()
            try:
                pidfd = os.pidfd_open(proc.pid)
            except OSError:
                raise QemuLaunchError(
                    f"domain {domain.name}: virtiofsd for {fs.source_dir} "
                    "exited right after starting",
                    domain=domain.name,
                ) from None
            started.append(Virtiofsd(proc, pidfd, path, fs.source_dir))
            log.info(
                "domain %s: virtiofsd pid %d serves %s as mount tag %r",
                domain.name,
                proc.pid,
                fs.source_dir,
                fs.target_dir,
                extra={"ferry_fields": _fields(domain, proc.pid, i)},
            )
        ok = True
    finally:
        if not ok:
            for v in started:
                await v.stop()
    return started


def _is_virtiofsd_on(pid: int, source: str) -> bool:
    """``pid`` is a virtiofsd serving ``source``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]
    return (
        bool(argv)
        and os.path.basename(argv[0]).startswith("virtiofsd")
        and f"source={source}" in argv
    )


def kill_recorded(records: object, *, name: str) -> int:
    """SIGKILL the virtiofsd a status file recorded, if still there; returns how many.

    For one whose qemu never connected (an agent died between the two
    starts); one that exits within a short grace (its qemu just went) is
    left to end on its own. Each is checked to be a virtiofsd on its directory after its
    pidfd is opened, so the signal goes to the process checked.
    """
    killed = 0
    for rec in records if isinstance(records, list) else ():
        if not isinstance(rec, dict):
            continue
        pid, source, sock = rec.get("pid"), rec.get("source"), rec.get("socket")
        if isinstance(sock, str):
            with contextlib.suppress(OSError):
                Path(sock).unlink()
        if not isinstance(pid, int) or not isinstance(source, str):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if not _is_virtiofsd_on(pid, source):
                continue
            # It is ending on its own when qemu just went (its connection closed).
            if wait_pidfd_blocking(pidfd, _GRACE):
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            wait_pidfd_blocking(pidfd, _STOP_WAIT)
            killed += 1
            log.warning(
                "domain %s: killed virtiofsd pid %d (%s) left after its qemu",
                name,
                pid,
                source,
                extra={"ferry_fields": {"FERRY_DOMAIN": name, "FERRY_VIRTIOFSD_PID": str(pid)}},
            )
        finally:
            os.close(pidfd)
    return killed


async def attach_to_scope(unit: str, pid: int, *, name: str) -> None:
    """Move virtiofsd into its qemu's scope; a failure is logged, not fatal."""
    argv = attach_to_scope_argv(unit, pid)
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
            "domain %s: cannot move virtiofsd pid %d into scope %s: %s", name, pid, unit, exc
        )
        return
    if proc.returncode != 0:
        log.warning(
            "domain %s: cannot move virtiofsd pid %d into scope %s: %s",
            name,
            pid,
            unit,
            err.decode(errors="replace").strip(),
        )
