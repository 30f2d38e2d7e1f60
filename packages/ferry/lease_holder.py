"""The lease holder: a tiny detached process that keeps one domain's disk leases.

:class:`ferry.lease.LeaseManager` runs ``python -m ferry.lease_holder LOCKSPACE
DOMAIN`` in its own session (``DOMAIN`` is only there so that ``ps`` shows
whose leases a holder keeps). The locks live in this process, not in an
agent, so an agent can be killed -9 and restarted while its VMs keep their
leases; and the holder watches the domain's qemu through a pidfd, so a VM
that dies releases its disks even when no agent is running.

Handshake (the pipes are used for nothing else)::

    stdin   one JSON object, then EOF:
            {"owner": {"host_uuid", "host_name", "domain", "domain_uuid"},
             "disks": [absolute normalised paths],
             "guard_pid": int | null, "guard_start_time": int | null,
             "wait": seconds to wait for a contended lease}
    stdout  one line, then closed:
            OK
            BUSY <disk as a JSON string> <owner record of the holder as JSON>
            ERROR <message>

On ``BUSY`` and ``ERROR`` the holder exits at once, which releases whatever it
had taken. After ``OK`` it points stdin/stdout/stderr at /dev/null and lives
until it is killed or until the guard process (the domain's qemu) exits.

A lease is ``LOCKSPACE/<sha256 of the disk path>.lease``, held with
``flock(LOCK_EX)``; the holder writes its owner record (one JSON line) into
the file so that others can say who holds it. Lease files are never deleted
(see :mod:`ferry.jobs.lockfile` for why), and a lock is only trusted if the
file it was taken on is still the one at that path.

This module is imported by the holder process itself: keep it to the
standard library's small modules (no asyncio, nothing of ferry's).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import select
import signal
import sys
import time
from typing import Any

__all__ = ["LEASE_SUFFIX", "lease_file_name", "main", "proc_stat", "read_record"]

#: File name suffix of a lease in the lockspace directory.
LEASE_SUFFIX = ".lease"

# Back-off bounds while a lease is contended (flock has no timed wait).
_POLL_MIN = 0.005
_POLL_MAX = 0.05
# Largest owner record read back from a lease file.
_RECORD_MAX = 64 * 1024


def lease_file_name(disk_path: str) -> str:
    """Return the lease file name of an (absolute, normalised) disk path."""
    return hashlib.sha256(os.fsencode(disk_path)).hexdigest() + LEASE_SUFFIX


def proc_stat(pid: int) -> tuple[str, int] | None:
    """Return ``(state, start time)`` of ``pid`` from ``/proc/PID/stat``, or None if gone.

    Unlike :func:`ferry.qemu.read_start_time` this also answers for a zombie
    (state ``Z``): a zombie still has its start time, which is what lets its
    parent check that a pid is really the process it means to reap.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            raw = stat.read()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may contain ')' or spaces.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode(), int(rest[22 - 3])
    except (IndexError, ValueError):
        return None


class _Busy(Exception):
    def __init__(self, disk: str, owner: dict[str, Any] | None) -> None:
        super().__init__(disk)
        self.disk = disk
        self.owner = owner


class _Refused(Exception):
    """The request cannot be served; the message is the ERROR line."""


def read_record(fd: int) -> dict[str, Any] | None:
    """Return the owner record stored in an open lease file, None if absent or torn."""
    raw = os.pread(fd, _RECORD_MAX, 0)
    line, newline, _ = raw.partition(b"\n")
    if not newline:
        return None  # empty, or a record being written
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, sort_keys=True).encode() + b"\n"
    # Overwrite, then cut: never an empty file between a truncate and a
    # write. A reader racing the write may see a torn line for an instant;
    # it fails to parse and the reader tries again (LeaseManager.owner_of).
    view = memoryview(data)
    offset = 0
    while offset < len(data):
        offset += os.pwrite(fd, view[offset:], offset)
    os.ftruncate(fd, len(data))


def _flock_until(fd: int, deadline: float) -> bool:
    delay = _POLL_MIN
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now >= deadline:
            return False
        # A lease is contended for an instant when someone merely looks at
        # it (LeaseManager.owner_of takes a shared lock to test it), or
        # when the previous owner is just releasing it: retry briefly.
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, _POLL_MAX)


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _lock(path: str, disk: str, deadline: float) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            if not _flock_until(fd, deadline):
                raise _Busy(disk, read_record(fd))
            if _same_file(fd, path):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the file was replaced under us: lock the new one


def _pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _open_guard(pid: int, start_time: int | None) -> int:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise _Refused(f"guard process {pid} has exited") from None
    # Checked after opening the pidfd, so the check and the pidfd see the
    # same process even if the pid is being reused.
    stat = proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X") or _pidfd_exited(pidfd):
        os.close(pidfd)
        raise _Refused(f"guard process {pid} has exited")
    if start_time is not None and stat[1] != start_time:
        os.close(pidfd)
        raise _Refused(
            f"guard process {pid} has exited (pid reused: start time {stat[1]}, "
            f"expected {start_time})"
        )
    return pidfd


def _field(request: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = request.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Refused(f"bad request: field {key!r}")
    return value


def _take(lockspace: str, request: dict[str, Any]) -> tuple[list[int], int | None]:
    """Take every lease of the request; return the lease fds and the guard pidfd.

    :raises _Busy: a lease is held by someone else (nothing stays taken:
        the caller exits).
    :raises _Refused: bad request, guard gone, lockspace missing.
    """
    owner = _field(request, "owner", dict)
    disks = _field(request, "disks", list)
    if not all(isinstance(d, str) and os.path.isabs(d) for d in disks):
        raise _Refused("bad request: disks must be absolute paths")
    wait = float(_field(request, "wait", (int, float)))
    guard_pid = request.get("guard_pid")
    guard_start = request.get("guard_start_time")
    guard = None
    if guard_pid is not None:
        guard = _open_guard(int(guard_pid), None if guard_start is None else int(guard_start))
    if not os.path.isdir(lockspace):
        # Never create it: a missing shared mount would silently become a
        # private directory, and private leases protect nothing.
        what = "is not a directory" if os.path.exists(lockspace) else "does not exist"
        raise _Refused(f"lockspace directory {lockspace} {what}")
    deadline = time.monotonic() + wait
    fds: list[int] = []
    # One order for everybody: two holders wanting overlapping sets contend
    # on the same first lease instead of each taking half.
    for name, disk in sorted({(lease_file_name(d), d) for d in disks}):
        fd = _lock(os.path.join(lockspace, name), disk, deadline)
        fds.append(fd)
        _write_record(
            fd,
            {
                "host_uuid": owner.get("host_uuid"),
                "host_name": owner.get("host_name"),
                "domain": owner.get("domain"),
                "domain_uuid": owner.get("domain_uuid"),
                "holder_pid": os.getpid(),
                "disk": disk,
                "acquired": round(time.time(), 3),
            },
        )
    if guard is not None and _pidfd_exited(guard):
        raise _Refused(f"guard process {guard_pid} exited while its leases were being taken")
    return fds, guard


def _answer(line: str) -> None:
    data = (line.replace("\n", " ") + "\n").encode(errors="replace")
    while data:
        data = data[os.write(1, data) :]


def _detach_stdio() -> None:
    # Closes the handshake pipe (the manager sees EOF) and the manager's
    # stderr file; nothing is written after the handshake.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the holder: ``LOCKSPACE [DOMAIN]``; the request comes on stdin."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m ferry.lease_holder LOCKSPACE [DOMAIN] < request", file=sys.stderr)
        return 2
    try:
        request = json.loads(sys.stdin.buffer.read())
        if not isinstance(request, dict):
            raise _Refused("bad request: not a JSON object")
        fds, guard = _take(args[0], request)
    except _Busy as busy:
        owner = json.dumps(busy.owner, sort_keys=True, separators=(",", ":"))
        _answer(f"BUSY {json.dumps(busy.disk)} {owner}")
        return 3
    except Exception as exc:
        # An OSError's str() names the file; its repr() would not.
        _answer(
            f"ERROR {exc}" if isinstance(exc, _Refused) else f"ERROR {type(exc).__name__}: {exc}"
        )
        return 1
    _answer("OK")
    _detach_stdio()
    if guard is None:
        while True:
            signal.pause()
    poller = select.poll()
    poller.register(guard, select.POLLIN)
    while not poller.poll():
        pass
    # The guard (qemu) has exited: exiting releases every lease in ``fds``.
    del fds
    return 0


if __name__ == "__main__":
    sys.exit(main())
