"""Per-domain lock files shared by the agents of one host.

``LOCK_DIR/UUID.lock`` is held with ``flock(LOCK_EX)`` by the process that runs
a job on the domain. flock is released by the kernel when the holder dies, so
a killed agent never leaves a domain locked. The holder also writes who it is
(agent, pid, job, phase, since) into the file, so a process that cannot get
the lock can say who has it. Lock files are never deleted: unlinking a lock
file while another process waits on it would let two processes "hold" two
different files of the same name.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["DomainLock", "read_holder"]

# Polling back-off bounds while another process holds the lock. flock has no
# async wait; blocking flock in a thread could not be cancelled cleanly.
_POLL_MIN = 0.005
_POLL_MAX = 0.1


class DomainLock:
    """One domain's lock file; :meth:`acquire` / :meth:`release` the flock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock through this object."""
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if free; never blocks.

        :raises OSError: the lock directory cannot be created or written.
        """
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except FileNotFoundError:
            # Normally made by tmpfiles.d; create it for development setups.
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return False
            raise
        self._fd = fd
        return True

    async def acquire(self, deadline: float) -> bool:
        """Retry :meth:`try_acquire` without blocking the loop until ``deadline``
        (``loop.time()`` clock); return False if it never became free.

        :raises OSError: the lock directory is missing or not writable.
        """
        loop = asyncio.get_running_loop()
        delay = _POLL_MIN
        while not self.try_acquire():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)
        return True

    def write_holder(self, info: dict[str, Any]) -> None:
        """Record who holds the lock (only while held; a no-op otherwise)."""
        if self._fd is None:
            return
        data = json.dumps(info, sort_keys=True).encode()
        # Truncate then write: a reader may catch the file empty or half
        # written and then just says "another process"; it never blocks.
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        """Clear the holder record and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def read_holder(path: Path) -> dict[str, Any] | None:
    """Return the holder record another process wrote into a lock file, or None.

    Never raises: a missing, empty, half-written or garbled file gives None.
    """
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
