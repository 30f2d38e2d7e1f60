"""A helper process this agent started (swtpm, virtiofsd), followed through a pidfd.

The exit is learnt from the pidfd becoming readable, never by polling a pid
(PID 1 reaps orphans late here). :class:`PidfdProcess` holds what swtpm and
virtiofsd share: alive, wait for the exit, stop (SIGTERM, then SIGKILL), and
close the pidfd; each subclass removes its own files in :meth:`on_stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal

__all__ = ["PidfdProcess", "wait_pidfd_blocking"]

#: How long :meth:`PidfdProcess.stop` waits after each signal.
STOP_WAIT_S = 5.0


def wait_pidfd_blocking(pidfd: int, timeout: float) -> bool:
    """Block up to ``timeout`` s for ``pidfd``'s process to exit (clean-up paths that
    are not async); True if it did."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


class PidfdProcess:
    """A process and its pidfd; the pidfd is closed once (``close``)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self._closed = False

    def alive(self) -> bool:
        """True until the process has exited (or :meth:`close` was called)."""
        if self._closed:
            return False
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return not poller.poll(0)

    async def wait_exit(self, timeout: float) -> bool:
        """Wait until the process has exited; False when ``timeout`` expires first."""
        if not self.alive():
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(self.pidfd, on_exit)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(self.pidfd)
        return True

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL; wait for the exit, let the subclass clean up, close."""
        if self.alive():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, sig)
                if await self.wait_exit(STOP_WAIT_S):
                    break
        self.on_stopped()
        self.close()

    def on_stopped(self) -> None:
        """Remove what the process left (its pidfile, socket); called by :meth:`stop`."""

    def close(self) -> None:
        """Stop following the process (it keeps running if it does); close the pidfd."""
        if not self._closed:
            self._closed = True
            os.close(self.pidfd)
