"""Disk leases: two copies of a VM must never write the same disk.

libvirt's lockd idea, simplified. Every writable disk of a running domain has
an exclusive lease in a *lockspace* directory that all hosts share: the file
``LOCKSPACE/<sha256 of the disk's absolute normalised path>.lease``, held with
``flock(LOCK_EX)``. A second VM using the same disk, on any host, is refused
with :class:`~ferry.errors.LeaseBusy` naming the disk and the current owner.
During a migration the source releases its leases only once qemu has paused
for switchover, and the destination acquires them before starting the CPUs.

The locks are held by a small detached *holder process* per domain
(:mod:`ferry.lease_holder`), not by the agent: agents can be killed -9 and
restarted while VMs run. The holder is given the domain's qemu as its *guard*
and exits when that process does (it watches a pidfd), so destroying a VM
frees its disks even with no agent running. An agent keeps the
:class:`LeaseRecord` (holder pid and start time, disks) in the domain's status
file and finds the holder again with it after a restart.

The holder is identified by pid *and* start time, like qemu
(:mod:`ferry.qemu.process`), and its exit is learnt from a pidfd, never by
polling the pid: PID 1 here reaps orphans slowly, and a zombie still "exists".

Which disks need a lease (not read-only, not shareable) is the caller's
business: :class:`LeaseManager` locks the absolute paths it is given, after
``os.path.normpath`` (symbolic links are not resolved).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ferry.errors import DomainError, LeaseBusy, StateFileError
from ferry.lease_holder import LEASE_SUFFIX, lease_file_name, proc_stat, read_record

__all__ = [
    "LeaseManager",
    "LeaseOwner",
    "LeaseRecord",
    "lease_path",
    "normalise_disk",
]

_HOLDER_MODULE = "ferry.lease_holder"
# How long a holder waits for a contended lease before answering BUSY: long
# enough to ride over someone inspecting the lease or its owner releasing it
# right now, short enough that a real conflict is reported promptly.
_CONTENTION_WAIT = 0.5
# Largest handshake answer accepted from a holder.
_ANSWER_MAX = 1 << 20
# How long a holder that answered BUSY/ERROR (and is exiting) or was sent
# SIGKILL may take to disappear.
_EXIT_WAIT = 5.0
# Re-reads of an owner record caught while its holder was writing it.
_RECORD_RETRIES = 20
_RECORD_RETRY_DELAY = 0.005

# Holders started by this process and not reaped yet, by pid. Kept here (not
# dropped) so that subprocess never reaps them behind our back and never
# warns that they are still running; reaped by release() or, once they exit
# on their own, by _reap_exited().
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def normalise_disk(disk_path: str) -> str:
    """Return ``os.path.normpath(disk_path)``.

    :raises ValueError: the path is not absolute or contains a NUL byte.
    """
    if not isinstance(disk_path, str):
        raise TypeError(f"disk path must be a str, not {type(disk_path).__name__}")
    if not os.path.isabs(disk_path):
        raise ValueError(f"disk path must be absolute: {disk_path!r}")
    if "\0" in disk_path:
        raise ValueError(f"disk path contains a NUL byte: {disk_path!r}")
    return os.path.normpath(disk_path)


def lease_path(lockspace: Path, disk_path: str) -> Path:
    """Return the lease file of ``disk_path`` in ``lockspace``.

    :raises ValueError: ``disk_path`` is not absolute.
    """
    return Path(lockspace) / lease_file_name(normalise_disk(disk_path))


@dataclass(frozen=True)
class LeaseOwner:
    """Who takes a lease: written into every lease file the holder locks."""

    host_uuid: str
    host_name: str
    domain: str
    domain_uuid: str

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready mapping."""
        return {
            "host_uuid": self.host_uuid,
            "host_name": self.host_name,
            "domain": self.domain,
            "domain_uuid": self.domain_uuid,
        }


@dataclass(frozen=True)
class LeaseRecord:
    """A running holder and the disks it locks (``DomainStatus.extra["leases"]``)."""

    holder_pid: int
    holder_start_time: int
    disks: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping."""
        return {
            "holder_pid": self.holder_pid,
            "holder_start_time": self.holder_start_time,
            "disks": list(self.disks),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "lease record") -> LeaseRecord:
        """Build a record from its mapping.

        :raises StateFileError: not a mapping, or a field missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise StateFileError(f"{where}: must be an object, not {type(data).__name__}")
        for key in ("holder_pid", "holder_start_time"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise StateFileError(f"{where}: field {key!r} must be a positive int", field=key)
        disks = data.get("disks")
        if not isinstance(disks, list) or not all(isinstance(d, str) for d in disks):
            raise StateFileError(f"{where}: field 'disks' must be a list of str", field="disks")
        return cls(
            holder_pid=data["holder_pid"],
            holder_start_time=data["holder_start_time"],
            disks=tuple(disks),
        )


def busy_error(disk: str, owner: dict[str, Any] | None) -> LeaseBusy:
    """The LeaseBusy error naming ``disk`` and its current owner."""
    return _busy_error(disk, owner)


def _busy_error(disk: str, owner: dict[str, Any] | None) -> LeaseBusy:
    if owner and owner.get("domain") is not None:
        who = f"domain {owner.get('domain')!r} on host {owner.get('host_name')!r}"
    else:
        who = "another holder (owner record unreadable)"
    return LeaseBusy(f"disk {disk} is in use by {who}", disk=disk, owner=owner)


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def _wait_fd(fd: int, deadline: float, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable); :raises TimeoutError: at ``deadline``."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        async with asyncio.timeout_at(deadline):
            await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _wait_exit(pidfd: int, timeout: float) -> bool:
    """Wait until the pidfd's process has exited; False if ``timeout`` expires first."""
    if _pidfd_exited(pidfd):
        return True
    try:
        await _wait_fd(pidfd, asyncio.get_running_loop().time() + timeout)
    except TimeoutError:
        return False
    return True


def _reap(pid: int, pidfd: int) -> None:
    """Collect an exited holder if it is our child (no-op otherwise)."""
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        proc.wait()  # it has exited (pidfd readable): returns at once
        return
    # Started by another incarnation of this process? Not ours to reap;
    # P_PIDFD can only ever reap exactly this process.
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


def _reap_exited() -> None:
    """Collect holders that exited on their own (their guard died)."""
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _is_holder(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return _HOLDER_MODULE.encode() in raw.split(b"\0")


def _probe(path: Path) -> tuple[bool, dict[str, Any] | None] | None:
    """Whether the lease file at ``path`` is held, and its owner record; None if no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            # A shared lock only to test: it fails if a holder has the
            # exclusive one. A holder that happens to try its lock right
            # now waits (_CONTENTION_WAIT) rather than failing.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            held = True
        else:
            held = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        record = read_record(fd)
        if held:
            # A holder that has just taken the lock may be writing its
            # record: a torn or empty read is retried for a moment.
            for _ in range(_RECORD_RETRIES):
                if record is not None:
                    break
                time.sleep(_RECORD_RETRY_DELAY)
                record = read_record(fd)
        return held, record
    finally:
        os.close(fd)


class LeaseManager:
    """Acquire, find and release the disk leases of domains in one lockspace.

    :param lockspace: the directory shared by all hosts (it must exist: a
        missing one is never created, it may be an unmounted share).
    :param python: the interpreter that runs :mod:`ferry.lease_holder`.
    """

    def __init__(self, lockspace: Path, *, python: str = sys.executable) -> None:
        self.lockspace = Path(os.path.abspath(lockspace))
        self.python = python

    def __repr__(self) -> str:
        return f"<LeaseManager {self.lockspace}>"

    async def acquire(
        self,
        owner: LeaseOwner,
        disks: Sequence[str],
        *,
        guard_pid: int | None = None,
        guard_start_time: int | None = None,
        timeout: float = 10.0,
    ) -> LeaseRecord | None:
        """Lock every disk in ``disks`` for ``owner``: all of them, or none.

        Starts a holder process that takes the leases and keeps them until
        :meth:`release`, or until the guard process exits (``guard_pid``,
        normally the domain's qemu; ``guard_start_time`` makes sure it is
        that process and not a reused pid). Without a guard the holder lives
        until it is released.

        On any failure, and on cancellation, the holder has exited when this
        returns: no disk stays locked.

        :returns: the record to store (and give to :meth:`release`), or None
            when ``disks`` is empty (nothing to lock, no process started).
        :raises ValueError: a disk path is not absolute.
        :raises LeaseBusy: a disk is locked by someone else (message names the
            disk and its owner's domain and host; details ``disk``, ``owner``).
        :raises DomainError: the holder could not be started or did not answer
            within ``timeout``, the guard process has exited, or the lockspace
            directory is missing.
        """
        paths = list(dict.fromkeys(normalise_disk(d) for d in disks))
        if not paths:
            return None
        _reap_exited()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = json.dumps(
            {
                "owner": owner.to_dict(),
                "disks": paths,
                "guard_pid": guard_pid,
                "guard_start_time": guard_start_time,
                "wait": min(_CONTENTION_WAIT, timeout / 2),
            }
        ).encode()
        argv = [self.python, "-m", _HOLDER_MODULE, str(self.lockspace), owner.domain]
        # stderr goes to an unlinked file, not a pipe: it is only read when
        # the handshake fails, and the holder drops it once it answered OK.
        with tempfile.TemporaryFile() as errfile:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errfile,
                    close_fds=True,
                    start_new_session=True,
                    cwd="/",
                )
            except OSError as exc:
                raise DomainError(
                    f"cannot start the lease holder ({self.python}): {exc.strerror or exc}"
                ) from None
            assert proc.stdin is not None and proc.stdout is not None
            # Our unreaped child: its pid cannot be reused, the open cannot fail.
            pidfd = os.pidfd_open(proc.pid)
            ok = False
            try:
                try:
                    answer = await _handshake(proc.stdin, proc.stdout, request, deadline)
                except TimeoutError:
                    raise DomainError(
                        f"lease holder (pid {proc.pid}) did not answer within {timeout:g}s",
                        pid=proc.pid,
                    ) from None
                if answer == "OK":
                    stat = proc_stat(proc.pid)
                    if stat is None:  # cannot happen to an unreaped child
                        raise DomainError(f"lease holder (pid {proc.pid}) vanished")
                    _CHILDREN[proc.pid] = proc
                    ok = True
                    return LeaseRecord(proc.pid, stat[1], tuple(paths))
                # BUSY or ERROR: the holder is exiting, which frees what it
                # took; wait for that before reporting.
                await _finish(proc, pidfd, kill=False)
                errfile.seek(0)
                raise _answer_error(answer, proc, errfile.read().decode(errors="replace"))
            finally:
                proc.stdin.close()
                proc.stdout.close()
                if not ok:
                    # Timeout, garbled answer, cancellation: stop the holder
                    # before anyone can believe the disks are free.
                    await _finish(proc, pidfd, kill=True)
                os.close(pidfd)

    async def release(self, record: LeaseRecord, *, timeout: float = 10.0) -> None:
        """Kill the record's holder and wait until it has exited; its leases are then free.

        Only a process with the record's pid *and* start time that runs
        :mod:`ferry.lease_holder` is signalled, so a stale record never
        hits an unrelated process that reused the pid. Idempotent: a holder
        that is already gone is not an error.

        :raises DomainError: the holder did not exit within ``timeout`` of SIGKILL.
        """
        _reap_exited()
        try:
            pidfd = os.pidfd_open(record.holder_pid)
        except ProcessLookupError:
            return
        try:
            # Checked after opening the pidfd: checks and signal see one process.
            stat = proc_stat(record.holder_pid)
            if stat is None or stat[1] != record.holder_start_time:
                return
            zombie = stat[0] in ("Z", "X")
            if not zombie and not _is_holder(record.holder_pid):
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            if not await _wait_exit(pidfd, timeout):
                raise DomainError(
                    f"lease holder pid {record.holder_pid} did not exit within "
                    f"{timeout:g}s of SIGKILL",
                    pid=record.holder_pid,
                )
            _reap(record.holder_pid, pidfd)
        finally:
            os.close(pidfd)

    def holder_alive(self, record: LeaseRecord) -> bool:
        """True while the record's holder runs (a zombie has exited: False)."""
        _reap_exited()
        try:
            pidfd = os.pidfd_open(record.holder_pid)
        except OSError:
            return False
        try:
            stat = proc_stat(record.holder_pid)
            if stat is None or stat[0] in ("Z", "X") or stat[1] != record.holder_start_time:
                return False
            return _is_holder(record.holder_pid) and not _pidfd_exited(pidfd)
        finally:
            os.close(pidfd)

    def owner_of(self, disk_path: str) -> dict[str, Any] | None:
        """Return the owner record of ``disk_path``'s lease, or None if it is free.

        The record has ``host_uuid``, ``host_name``, ``domain``,
        ``domain_uuid``, ``holder_pid``, ``disk`` and ``acquired`` (epoch
        seconds). A held lease whose record cannot be read gives ``{}``.

        :raises ValueError: ``disk_path`` is not absolute.
        """
        probe = _probe(lease_path(self.lockspace, disk_path))
        if probe is None or not probe[0]:
            return None
        return probe[1] if probe[1] is not None else {}

    def inspect(self) -> list[dict[str, Any]]:
        """Describe every lease file in the lockspace, sorted by disk path.

        Each entry: ``lease`` (file path), ``disk`` (from the last record
        written, None if unreadable), ``held`` (bool) and ``owner`` (the
        owner record while held, else None).
        """
        entries: list[dict[str, Any]] = []
        try:
            names = sorted(os.listdir(self.lockspace))
        except FileNotFoundError:
            return entries
        for name in names:
            if not name.endswith(LEASE_SUFFIX):
                continue
            path = self.lockspace / name
            probe = _probe(path)
            if probe is None:
                continue
            held, record = probe
            entries.append(
                {
                    "lease": str(path),
                    "disk": record.get("disk") if record is not None else None,
                    "held": held,
                    "owner": (record if record is not None else {}) if held else None,
                }
            )
        entries.sort(key=lambda e: (e["disk"] is None, e["disk"] or "", e["lease"]))
        return entries


async def _handshake(stdin: IO[bytes], stdout: IO[bytes], request: bytes, deadline: float) -> str:
    """Send the request, close stdin, read the one-line answer ("" on EOF).

    :raises TimeoutError: ``deadline`` passed.
    """
    out_fd, in_fd = stdin.fileno(), stdout.fileno()
    os.set_blocking(out_fd, False)
    os.set_blocking(in_fd, False)
    view = memoryview(request)
    try:
        while view:
            try:
                view = view[os.write(out_fd, view) :]
            except BlockingIOError:
                await _wait_fd(out_fd, deadline, write=True)
    except BrokenPipeError:
        pass  # the holder died early: its (missing) answer tells
    stdin.close()
    buf = bytearray()
    while b"\n" not in buf:
        try:
            chunk = os.read(in_fd, 65536)
        except BlockingIOError:
            await _wait_fd(in_fd, deadline)
            continue
        if not chunk:
            return ""
        buf += chunk
        if len(buf) > _ANSWER_MAX:
            raise DomainError("lease holder answer too long")
    return buf[: buf.index(b"\n")].decode(errors="replace")


def _answer_error(answer: str, proc: subprocess.Popen[bytes], stderr: str) -> DomainError:
    if answer.startswith("BUSY "):
        try:
            decoder = json.JSONDecoder()
            disk, end = decoder.raw_decode(answer, 5)
            owner = json.loads(answer[end:])
        except ValueError:
            return DomainError(f"lease holder gave a garbled answer: {answer!r}")
        if not isinstance(disk, str):
            return DomainError(f"lease holder gave a garbled answer: {answer!r}")
        return _busy_error(disk, owner if isinstance(owner, dict) else None)
    if answer.startswith("ERROR "):
        return DomainError(f"cannot take disk leases: {answer[6:]}")
    stderr = stderr.strip()
    if not answer:
        return DomainError(
            f"lease holder exited without answering (status {proc.returncode}): "
            + (stderr or "(no message)"),
            stderr=stderr,
        )
    return DomainError(f"lease holder gave a garbled answer: {answer!r}")


async def _finish(proc: subprocess.Popen[bytes], pidfd: int, *, kill: bool) -> None:
    """Make sure a holder that failed its handshake has exited, and reap it."""
    if proc.returncode is not None:
        return
    if not kill and not await _wait_exit(pidfd, _EXIT_WAIT):
        kill = True
    if kill:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        if not await _wait_exit(pidfd, _EXIT_WAIT):
            # Stuck in the kernel: leave it for _reap_exited().
            _CHILDREN[proc.pid] = proc
            return
    proc.wait()
