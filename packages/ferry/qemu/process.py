"""Start, find again, stop and kill detached qemu processes.

qemu runs detached from the agents (``-daemonize``: qemu double-forks and
calls ``setsid``), so an agent can be restarted or killed -9 without touching
its VMs. The consequences shape this module:

* qemu is not our child: we cannot ``waitpid`` it, and on this kind of host
  PID 1 reaps orphans slowly (a dead qemu stays a zombie for about a second,
  and ``kill(pid, 0)`` succeeds on a zombie). Exit is therefore learnt from a
  pidfd (``os.pidfd_open``), which becomes readable the moment the process
  exits, zombie or not; signals go through ``signal.pidfd_send_signal`` so a
  reused pid can never be hit.
* A pid alone does not identify a process after a restart: :func:`reconnect`
  also checks the process start time (``/proc/PID/stat`` field 22) and the
  command line (qemu, with the domain's UUID).

Where systemd is the init system, :func:`launch` given a
:class:`~ferry.qemu.scope.ScopeRequest` starts qemu through ``systemd-run
--scope`` so that it also leaves the agent's cgroup for its own scope in
``machine.slice``; systemd-run execs qemu in place, so everything above holds
unchanged (see :mod:`ferry.qemu.scope`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ferry.errors import QemuError, QemuLaunchError, QMPError
from ferry.qemu.qmp import QMP
from ferry.qemu.scope import (
    ScopeRequest,
    find_systemd_run,
    split_scope_marker,
    systemd_run_argv,
    systemd_run_env,
    systemd_run_version,
)
from ferry.statefile import DomainStatus

__all__ = [
    "QemuProcess",
    "launch",
    "read_cmdline",
    "read_start_time",
    "reconnect",
]

log = logging.getLogger("ferry.qemu")

# How long qemu gets to act on ``quit`` before SIGKILL during shutdown().
_QUIT_GRACE = 10.0
# How long a SIGKILLed process may take to disappear before we give up
# (a process stuck in uninterruptible I/O can outlive SIGKILL for a while).
_KILL_WAIT = 30.0


def read_start_time(pid: int) -> int | None:
    """Return the start time of ``pid`` (``/proc/PID/stat`` field 22, clock ticks after boot).

    Returns None if the process does not exist or is a zombie (a zombie has
    exited: it is not a qemu we could talk to).
    """
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain
    # spaces or ')': split after the *last* ')'. Fields from 3 on follow.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        state = rest[0]
        start = int(rest[22 - 3])
    except (IndexError, ValueError):
        return None
    if state in (b"Z", b"X"):
        return None
    return start


def read_cmdline(pid: int) -> list[str] | None:
    """Return the argv of ``pid`` from ``/proc/PID/cmdline``, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or kernel thread
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def _looks_like_qemu(argv: Sequence[str], uuid: str) -> bool:
    if not argv or "qemu" not in os.path.basename(argv[0]):
        return False
    wanted = uuid.lower()
    # ``-uuid U`` is what ferry.domain emits; also accept it embedded in an
    # option value (``-smbios type=1,uuid=U``) written by other tools.
    return any(wanted in arg.lower() for arg in argv[1:])


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class QemuProcess:
    """A running (detached) qemu: its pid, pidfd and QMP connection.

    Dropping or :meth:`close`-ing this object never stops qemu; only
    :meth:`shutdown` and :meth:`kill` do.
    """

    def __init__(
        self,
        *,
        pid: int,
        pidfd: int,
        start_time: int,
        qmp: QMP,
        qmp_socket: Path,
        pidfile: Path | None = None,
        launch_stderr: str = "",
        scope_unit: str | None = None,
    ) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.start_time = start_time
        self.qmp = qmp
        self.qmp_socket = qmp_socket
        self.pidfile = pidfile
        #: What qemu wrote on stderr while starting (warnings), if we launched it.
        self.launch_stderr = launch_stderr
        #: The transient scope unit qemu was started in (None: plain detached,
        #: or found again by :func:`reconnect`).
        self.scope_unit = scope_unit
        self._exit: asyncio.Future[None] | None = None
        self._exit_waiters = 0
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._fd_closed = False
        # Remember which socket file is ours so cleanup never removes the
        # socket of a newer qemu that reused the path.
        self._socket_ino = _inode(qmp_socket)

    def __repr__(self) -> str:
        return f"<QemuProcess pid={self.pid} qmp={self.qmp_socket}>"

    def alive(self) -> bool:
        """True until the process has exited (a zombie counts as exited).

        After :meth:`close` the process is no longer tracked and this is False.
        """
        if self._fd_closed:
            return False
        return not _pidfd_exited(self.pidfd)

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until qemu has exited; return False if ``timeout`` expires first.

        Exit is learnt from the pidfd becoming readable (via the event loop),
        so it is prompt and does not depend on anyone reaping the zombie.
        Several callers may wait at once.

        :raises QemuError: :meth:`close` was called while waiting.
        """
        if not self.alive():
            return True
        fut = self._exit_future()
        self._exit_waiters += 1
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            return False
        finally:
            self._exit_waiters -= 1
        return True

    def _exit_future(self) -> asyncio.Future[None]:
        # One reader per fd is all the loop allows: share one future between
        # every waiter.
        if self._exit is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def on_readable() -> None:
                loop.remove_reader(self.pidfd)
                self._reader_loop = None
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(self.pidfd, on_readable)
            self._reader_loop = loop
            self._exit = fut
        return self._exit

    def _signal(self, sig: int) -> None:
        if self._fd_closed:
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, sig)

    async def shutdown(self, timeout: float = 30.0, *, quit_timeout: float = _QUIT_GRACE) -> None:
        """Stop qemu, gracefully first: ACPI powerdown, then ``quit``, then SIGKILL.

        Waits ``timeout`` seconds for the guest to power off after
        ``system_powerdown`` (a guest without ACPI support ignores it), then
        ``quit_timeout`` after QMP ``quit``, then sends SIGKILL. Without a QMP
        connection there is no powerdown: SIGTERM (which qemu handles like
        ``quit``) replaces ``quit``. On return qemu has exited and this object
        is closed.

        :raises QemuError: qemu survived SIGKILL for 30 s (stuck in the kernel).
        """
        if self.alive():
            if self.qmp.connected:
                with contextlib.suppress(QMPError):
                    await self.qmp.execute("system_powerdown", timeout=5)
                if await self.wait_exit(timeout):
                    await self._finish()
                    return
            if self.qmp.connected:
                with contextlib.suppress(QMPError):
                    await self.qmp.execute("quit", timeout=5)
            else:
                self._signal(signal.SIGTERM)
            if await self.wait_exit(quit_timeout):
                await self._finish()
                return
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL qemu through its pidfd and wait until it has exited; then close.

        :raises QemuError: the process did not exit within 30 s of SIGKILL.
        """
        self._signal(signal.SIGKILL)
        if not await self.wait_exit(_KILL_WAIT):
            raise QemuError(
                f"qemu pid {self.pid} did not exit within {_KILL_WAIT:g}s of SIGKILL", pid=self.pid
            )
        await self._finish()

    async def _finish(self) -> None:
        await self.close()
        self._remove_files()

    def _remove_files(self) -> None:
        # qemu removes both on a clean exit; after SIGKILL they are stale.
        if self.pidfile is not None:
            with contextlib.suppress(OSError, ValueError):
                if int(self.pidfile.read_text().strip() or "0") == self.pid:
                    self.pidfile.unlink()
        if self._socket_ino is not None and _inode(self.qmp_socket) == self._socket_ino:
            with contextlib.suppress(OSError):
                self.qmp_socket.unlink()

    async def close(self) -> None:
        """Disconnect QMP and release the pidfd; qemu keeps running (idempotent)."""
        await self.qmp.close()
        if self._fd_closed:
            return
        if self._reader_loop is not None:
            with contextlib.suppress(Exception):
                self._reader_loop.remove_reader(self.pidfd)
            self._reader_loop = None
        if self._exit is not None and not self._exit.done():
            # Waiters must not hang until their timeout, nor see a
            # CancelledError they did not ask for.
            if self._exit_waiters:
                self._exit.set_exception(
                    QemuError(f"stopped tracking qemu pid {self.pid} (closed)", pid=self.pid)
                )
            else:
                self._exit.cancel()
        self._fd_closed = True
        os.close(self.pidfd)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _check_argv(argv: Sequence[str], pidfile: Path) -> None:
    if not argv or not all(isinstance(a, str) for a in argv):
        raise QemuLaunchError("qemu argv must be a non-empty list of strings")
    # Without -daemonize the launcher never exits and we would wait for the
    # timeout; without our -pidfile we could not find qemu's pid.
    if "-daemonize" not in argv:
        raise QemuLaunchError("qemu argv lacks -daemonize", argv=list(argv))
    try:
        given = argv[argv.index("-pidfile") + 1]
    except (ValueError, IndexError):
        raise QemuLaunchError("qemu argv lacks -pidfile PATH", argv=list(argv)) from None
    if Path(given) != Path(pidfile):
        raise QemuLaunchError(
            f"qemu argv has -pidfile {given}, but launch() was told {pidfile}", argv=list(argv)
        )


def _clear_stale_pidfile(pidfile: Path) -> None:
    """Remove a pidfile left by a dead qemu; refuse if a live qemu holds it.

    qemu keeps a POSIX lock (lockf) on its pidfile for its whole life. A
    locked pidfile means the domain's qemu is still running: starting a
    second one would fail anyway, and removing the file would break the
    first one's protection.
    """
    try:
        fd = os.open(pidfile, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise QemuLaunchError(f"cannot check pidfile {pidfile}: {exc.strerror}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise QemuLaunchError(
                    f"pidfile {pidfile} is locked by a running qemu (pid {pid or '?'})",
                    pidfile=str(pidfile),
                ) from None
            raise QemuLaunchError(f"cannot check pidfile {pidfile}: {exc.strerror}") from None
        try:
            pidfile.unlink()
        except OSError as exc:
            raise QemuLaunchError(
                f"cannot remove stale pidfile {pidfile}: {exc.strerror}"
            ) from None
    finally:
        os.close(fd)  # also drops our lock


def _read_pidfile(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


async def _wait_pidfd(pidfd: int, timeout: float) -> bool:
    """Wait (without blocking the loop) until the pidfd's process exits."""
    if _pidfd_exited(pidfd):
        return True
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        async with asyncio.timeout(timeout):
            await fut
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
    return True


async def _kill_unverified(pid: int | None, argv0: str, not_before: int | None) -> None:
    """SIGKILL the qemu a failed launch left behind, if that pid is really it."""
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        # Verified after opening the pidfd (so the checks and the signal see
        # the same process): same binary, started after this agent (not an
        # older process that reused the pid).
        cmd = read_cmdline(pid)
        start = read_start_time(pid)
        if (
            cmd
            and cmd[0] == argv0
            and start is not None
            and (not_before is None or start >= not_before)
        ):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            await _wait_pidfd(pidfd, 5.0)
    finally:
        os.close(pidfd)


def _boot_ticks_now() -> int | None:
    # Our own start time is a lower bound for any process we launch.
    return read_start_time(os.getpid())


def _resolve_binary(argv: list[str]) -> list[str]:
    """argv with argv[0] made absolute (as systemd-run would do it anyway)."""
    found = shutil.which(argv[0])
    if found is None:
        raise QemuLaunchError(f"cannot execute {argv[0]}: not found or not executable", argv=argv)
    return [os.path.abspath(found), *argv[1:]]


async def launch(
    argv: list[str],
    *,
    pidfile: Path,
    qmp_socket: Path,
    timeout: float = 30.0,
    qmp_name: str | None = None,
    scope: ScopeRequest | None = None,
    pass_fds: Sequence[int] = (),
) -> QemuProcess:
    """Start a detached qemu and connect to its QMP socket.

    ``argv`` is executed directly (never through a shell) and must contain
    ``-daemonize -pidfile PIDFILE`` and a QMP chardev server on ``qmp_socket``
    (``ferry.domain.to_qemu_argv`` builds it). The launcher runs in its own
    session with stdin on /dev/null; with ``-daemonize`` it exits once qemu
    is fully initialised (and the QMP socket listens), so its exit status is
    qemu's start verdict.

    ``pass_fds`` stay open, with their numbers, in qemu (files the agent
    opened for it: ``-add-fd``, ``/proc/self/fd/N``); the caller still owns
    and closes its own copies.

    With ``scope`` (systemd is init, see :mod:`ferry.qemu.scope`), the
    launcher is ``systemd-run --scope ... -- ARGV`` instead: systemd-run
    creates the scope for its own pid and then execs qemu in that same
    process, so the exit status is still qemu's verdict and the pidfile
    still names qemu; qemu's binary is made an absolute path first (as
    systemd-run would), so the command line checks below see what runs.

    On any failure nothing is left behind: no qemu process, pidfile or socket
    (and no scope: an empty scope is stopped by systemd and, with
    ``--collect``, unloaded even when failed).

    :raises QemuLaunchError: bad argv, a live qemu holds the pidfile, the
        binary is missing, qemu exited non-zero (message contains qemu's
        stderr), startup or QMP connect took longer than ``timeout``, or
        qemu died right after starting; with ``scope``, also: systemd-run
        is missing or could not create the scope (message names the unit
        and has systemd-run's stderr).
    """
    argv = list(argv)
    pidfile = Path(pidfile)
    qmp_socket = Path(qmp_socket)
    _check_argv(argv, pidfile)
    exec_argv = argv
    env: dict[str, str] | None = None
    if scope is not None:
        systemd_run = find_systemd_run(scope)
        argv = _resolve_binary(argv)
        exec_argv = systemd_run_argv(
            systemd_run, scope, argv, version=await systemd_run_version(systemd_run)
        )
        env = systemd_run_env()
    _clear_stale_pidfile(pidfile)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    not_before = _boot_ticks_now()
    pid: int | None = None
    pidfd: int | None = None
    qmp: QMP | None = None
    stderr_text = ""
    in_scope = f" in scope {scope.where}" if scope is not None else ""
    details: dict[str, object] = {"argv": exec_argv}
    if scope is not None:
        details["unit"] = scope.unit
    ok = False
    try:
        # stderr goes to an unlinked temp file, not a pipe: the daemonized
        # qemu inherits the fd, and reading a pipe to EOF could block for as
        # long as qemu keeps it open.
        with tempfile.TemporaryFile() as errfile:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *exec_argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=errfile,
                    start_new_session=True,
                    env=env,
                    pass_fds=tuple(pass_fds),
                )
            except OSError as exc:
                raise QemuLaunchError(
                    f"cannot execute {exec_argv[0]}: {exc.strerror or exc}", **details
                ) from None
            try:
                async with asyncio.timeout_at(deadline):
                    rc = await proc.wait()
            except BaseException:
                # Timeout or cancellation: stop the launcher (and whatever
                # qemu it already forked, below) before reporting.
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(Exception):
                    await asyncio.shield(proc.wait())
                errfile.seek(0)
                stderr_text = errfile.read().decode(errors="replace").strip()
                if loop.time() >= deadline:
                    raise QemuLaunchError(
                        f"qemu did not finish starting{in_scope} within {timeout:g}s"
                        + (f": {stderr_text}" if stderr_text else ""),
                        stderr=stderr_text,
                        **details,
                    ) from None
                raise
            errfile.seek(0)
            stderr_text = errfile.read().decode(errors="replace").strip()
        if scope is not None:
            execed, qemu_stderr = split_scope_marker(stderr_text, scope)
            if not execed:
                # systemd-run failed before exec: no scope, no qemu.
                raise QemuLaunchError(
                    f"systemd-run could not start scope {scope.where} for qemu "
                    f"(exit status {rc}): {stderr_text or '(no message)'}",
                    stderr=stderr_text,
                    returncode=rc,
                    **details,
                )
            stderr_text = qemu_stderr
        if rc != 0:
            raise QemuLaunchError(
                f"qemu exited with status {rc}{in_scope}: {stderr_text or '(no message)'}",
                stderr=stderr_text,
                returncode=rc,
                **details,
            )
        pid = _read_pidfile(pidfile)
        if pid is None:
            raise QemuLaunchError(f"qemu started but wrote no pid to {pidfile}", **details)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise QemuLaunchError(
                f"qemu (pid {pid}) exited right after starting: {stderr_text or '(no message)'}",
                stderr=stderr_text,
                **details,
            ) from None
        start_time = read_start_time(pid)
        if start_time is None:
            raise QemuLaunchError(f"qemu (pid {pid}) exited right after starting", **details)
        qmp = QMP(qmp_name or f"qemu-{pid}")
        try:
            await qmp.connect(qmp_socket, timeout=max(0.1, deadline - loop.time()))
        except QMPError as exc:
            raise QemuLaunchError(f"qemu started but its QMP socket failed: {exc}") from None
        ok = True
        if scope is not None:
            log.info("qemu pid %d started in scope %s", pid, scope.where)
        return QemuProcess(
            pid=pid,
            pidfd=pidfd,
            start_time=start_time,
            qmp=qmp,
            qmp_socket=qmp_socket,
            pidfile=pidfile,
            launch_stderr=stderr_text,
            scope_unit=scope.unit if scope is not None else None,
        )
    finally:
        if not ok:
            await _cleanup_failed(argv, pidfile, qmp_socket, pid, pidfd, qmp, not_before)


async def _cleanup_failed(
    argv: list[str],
    pidfile: Path,
    qmp_socket: Path,
    pid: int | None,
    pidfd: int | None,
    qmp: QMP | None,
    not_before: int | None,
) -> None:
    if qmp is not None:
        with contextlib.suppress(Exception):
            await qmp.close()
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        try:
            await _wait_pidfd(pidfd, 5.0)
        finally:
            os.close(pidfd)
    else:
        # The launcher was killed mid-start: qemu may have written its
        # pidfile already; kill that process if it is the one we started.
        await _kill_unverified(
            pid if pid is not None else _read_pidfile(pidfile), argv[0], not_before
        )
    with contextlib.suppress(OSError):
        pidfile.unlink()
    with contextlib.suppress(OSError):
        qmp_socket.unlink()


async def reconnect(
    status: DomainStatus,
    *,
    timeout: float = 10.0,
    pidfile: Path | None = None,
    qmp_name: str | None = None,
) -> QemuProcess | None:
    """Find the qemu a status file describes and reconnect to it (agent start).

    Returns None when that qemu is gone: the pid is dead or a zombie, its
    start time differs from ``status.start_time`` (the pid was reused), or
    its command line is not qemu with ``status.uuid``. The caller then
    cleans up the stale status. ``pidfile``, if given, is removed when the
    returned process is later killed.

    :raises QMPError: the process *is* that qemu but its QMP socket did not
        answer (e.g. another client is still connected). This is not
        "gone": the VM is running and must not be cleaned up.
    """
    if status.pid is None or status.start_time is None or status.qmp_path is None:
        return None
    try:
        pidfd = os.pidfd_open(status.pid)
    except OSError:
        return None
    keep = False
    try:
        # Checked after opening the pidfd: if the pid was reused before the
        # open, these checks see the new process and refuse it.
        if read_start_time(status.pid) != status.start_time:
            return None
        cmd = read_cmdline(status.pid)
        if cmd is None or not _looks_like_qemu(cmd, status.uuid):
            return None
        if _pidfd_exited(pidfd):
            return None
        qmp = QMP(qmp_name or f"qemu-{status.pid}")
        await qmp.connect(status.qmp_path, timeout=timeout)
        keep = True
        return QemuProcess(
            pid=status.pid,
            pidfd=pidfd,
            start_time=status.start_time,
            qmp=qmp,
            qmp_socket=status.qmp_path,
            pidfile=pidfile,
        )
    finally:
        if not keep:
            os.close(pidfd)
