"""Byte relay between two fds, in pure Python (reference backend).

Same API and behaviour as the compiled ``ferry_native._relay``, which is what
the agents run; this one exists so that the test suite can run the same
tests against both and so that the behaviour is readable in one page.

Sockets are driven with ``MSG_DONTWAIT`` (never blocking, so :meth:`Relay.stop`
is prompt even when the peer stops reading, without touching the fd's own
O_NONBLOCK flag that other users share) and ``MSG_NOSIGNAL`` (a closed peer
gives EPIPE, not SIGPIPE).  Other fds are polled before each read; writes to
them may block (a pipe whose reader stalls), and then stop() takes effect when
that write returns.  A per-relay eventfd, polled together with the data fd,
is what stop() makes readable.

Unlike the native relay this one holds the GIL between system calls (Python
releases it inside each call), so it slows other Python threads a little.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import operator
import os
import select
import socket
import stat
import threading
from types import TracebackType
from typing import Self

__all__ = ["MAX_BUFFER_SIZE", "Relay", "relay"]

# A bigger buffer gains nothing on loopback and only costs memory per tunnel.
MAX_BUFFER_SIZE = 1 << 30

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class _Stopped(Exception):
    """Internal: stop() was observed while waiting."""


def _is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket.

    Raises:
        OSError: EBADF when ``fd`` is not open.
    """
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _wrap_socket(fd: int) -> socket.socket:
    """A socket object on ``fd`` (not a dup) that never changes the fd's flags.

    ``socket.socket(fileno=)`` sets O_NONBLOCK when ``socket.setdefaulttimeout``
    was used; the flags are restored so the caller's fd is left as it was.
    The caller must ``detach()`` it, never close it.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=fd)
    if sock.gettimeout() is not None:
        # Our calls pass MSG_DONTWAIT; a timeout would make Python wait itself.
        sock.settimeout(None)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return sock


class Relay:
    """Copy bytes from ``src_fd`` to ``dst_fd`` until end of file on ``src_fd``.

    The relay does not own the two fds: it never closes them.  It owns a stop
    eventfd and a buffer of ``buffer_size`` bytes, freed by :meth:`close`
    (also on leaving a ``with`` block).

    Raises:
        OSError: ``EBADF`` when either fd is not open; whatever ``eventfd(2)``
            reports when no stop fd can be made.
        ValueError: ``buffer_size`` outside 1 .. ``MAX_BUFFER_SIZE``.
    """

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        *,
        buffer_size: int = 1 << 20,
        half_close: bool = True,
    ) -> None:
        # Set first: __del__ runs even when __init__ raises.
        self._stop_fd = -1
        size = operator.index(buffer_size)
        if size < 1 or size > MAX_BUFFER_SIZE:
            raise ValueError(
                f"buffer_size must be between 1 and {MAX_BUFFER_SIZE}, not {buffer_size!r}"
            )
        # Check both fds before making the stop fd, so a bad fd leaks nothing.
        self._src_is_socket = _is_socket(src_fd)
        self._dst_is_socket = _is_socket(dst_fd)
        self._src = src_fd
        self._dst = dst_fd
        self._buffer_size = size
        self._half_close = bool(half_close)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._copied = 0
        self._stop_requested = False
        self._eof = False
        self._running = False
        self._closed = False
        # Guards the state that run(), stop() and close() share; the native
        # relay gets the same from the GIL (its methods never release it).
        self._lock = threading.Lock()
        self._buf: bytearray | None = None
        # Bytes read but not yet written: buf[_pend_off:_pend_off + _pend_len].
        self._pend_off = 0
        self._pend_len = 0

    def __del__(self) -> None:
        self._release()

    def _release(self) -> None:
        """Close the stop fd and drop the buffer."""
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._buf = None

    def _wait(self, fd: int, events: int) -> None:
        """Block until ``fd`` is ready for ``events``; POLLHUP/POLLERR count as ready.

        Raises:
            _Stopped: stop() was called.
            OSError: EBADF when ``fd`` is not open.
        """
        poller = select.poll()
        poller.register(fd, events)
        poller.register(self._stop_fd, select.POLLIN)
        for ready_fd, revents in poller.poll():
            if ready_fd == self._stop_fd:
                raise _Stopped
            if revents & select.POLLNVAL:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def _read(self, view: memoryview, src: socket.socket | None) -> int:
        """Read once from the source into ``view``, waiting for readiness; 0 at EOF.

        Raises:
            _Stopped: stop() was called while waiting.
            OSError: from the system call.
        """
        while True:
            if self._stop_requested:
                raise _Stopped
            try:
                if src is not None:
                    return src.recv_into(view, len(view), socket.MSG_DONTWAIT)
                # A blocking read on an idle pipe would not see stop().
                self._wait(self._src, select.POLLIN)
                return os.readv(self._src, [view])
            except BlockingIOError:
                self._wait(self._src, select.POLLIN)

    def _write(self, view: memoryview, dst: socket.socket | None) -> int:
        """Write once to the destination, waiting for room; return the bytes written.

        Raises:
            _Stopped: stop() was called while waiting.
            OSError: from the system call.
        """
        while True:
            if self._stop_requested:
                raise _Stopped
            try:
                if dst is not None:
                    written = dst.send(view, _SEND_FLAGS)
                else:
                    written = os.write(self._dst, view)
            except BlockingIOError:
                written = 0
            if written > 0:
                return written
            self._wait(self._dst, select.POLLOUT)

    def _copy(self, buf: bytearray) -> bool:
        """The copy loop; True at end of file, False when stopped.

        Raises:
            OSError: from a system call.
        """
        src = _wrap_socket(self._src) if self._src_is_socket else None
        dst = _wrap_socket(self._dst) if self._dst_is_socket else None
        view = memoryview(buf)
        try:
            while True:
                if self._pend_len == 0:
                    n = self._read(view, src)
                    if n == 0:
                        if self._half_close and dst is not None:
                            try:
                                dst.shutdown(socket.SHUT_WR)
                            except OSError as exc:
                                # The peer is gone already: nothing to signal.
                                if exc.errno not in (errno.ENOTCONN, errno.ENOTSOCK):
                                    raise
                        return True
                    self._pend_off = 0
                    self._pend_len = n
                while self._pend_len > 0:
                    chunk = view[self._pend_off : self._pend_off + self._pend_len]
                    written = self._write(chunk, dst)
                    self._pend_off += written
                    self._pend_len -= written
                    self._copied += written
        except _Stopped:
            return False
        finally:
            view.release()
            if src is not None:
                src.detach()
            if dst is not None:
                dst.detach()

    def run(self) -> int:
        """Copy until end of file on the source; return the bytes copied by this call.

        Blocks the calling thread (Python releases the GIL inside each system
        call, so an asyncio loop using ``run_in_executor`` keeps running).  At
        end of file, with ``half_close`` and a socket as destination, the
        destination is shut down for writing so the receiver sees end of file.
        After :meth:`stop`, returns promptly and normally (``stopped`` is then
        true); bytes read but not yet written are dropped.

        Raises:
            OSError: the subclass matching errno, e.g. BrokenPipeError or
                ConnectionResetError when the receiver went away, EBADF for
                a closed fd.  ``bytes_copied`` still tells how far it got.
            ValueError: the relay is closed.
            RuntimeError: run() is already running in another thread.
        """
        with self._lock:
            if self._closed:
                raise ValueError("I/O operation on closed relay")
            if self._running:
                raise RuntimeError("relay is already running")
            self._running = True
        start = self._copied
        try:
            if self._buf is None:
                self._buf = bytearray(self._buffer_size)
            if self._copy(self._buf):
                self._eof = True
        finally:
            with self._lock:
                self._running = False
                if self._closed:
                    # close() was called while running: finish it now.
                    self._release()
        return self._copied - start

    def stop(self) -> None:
        """Make a running (or the next) :meth:`run` return promptly; thread-safe.

        A stopped relay stays stopped: later run() calls return 0 at once.
        Does nothing to the two fds.
        """
        with self._lock:
            self._stop_requested = True
            if self._stop_fd >= 0:
                # BlockingIOError (counter full): the fd is readable already.
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._stop_fd, 1)

    def close(self) -> None:
        """Free the stop fd and the buffer; idempotent.  Leaves the two data fds open.

        Called while run() is going in another thread, it stops the relay and
        the resources are freed when run() returns.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            running = self._running
            if not running:
                self._release()
        if running:
            self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def bytes_copied(self) -> int:
        """Bytes written to the destination so far, by all run() calls; live during run()."""
        return self._copied

    @property
    def stopped(self) -> bool:
        """True when stop() was called before run() reached end of file."""
        return self._stop_requested and not self._eof

    @property
    def src_fd(self) -> int:
        """The source fd (not owned)."""
        return self._src

    @property
    def dst_fd(self) -> int:
        """The destination fd (not owned)."""
        return self._dst

    @property
    def buffer_size(self) -> int:
        """Size of the copy buffer in bytes."""
        return self._buffer_size

    @property
    def half_close(self) -> bool:
        """Whether end of file on the source shuts the destination socket down for writing."""
        return self._half_close

    @property
    def closed(self) -> bool:
        """True once close() was called."""
        return self._closed

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._running:
            state = "running"
        elif self.stopped:
            state = "stopped"
        else:
            state = "idle"
        return (
            f"<Relay src_fd={self._src} dst_fd={self._dst} "
            f"bytes_copied={self.bytes_copied} {state}>"
        )


def relay(src_fd: int, dst_fd: int, *, buffer_size: int = 1 << 20) -> int:
    """Copy ``src_fd`` to ``dst_fd`` until end of file and return the byte count.

    A one-shot :class:`Relay` with ``half_close=True``.

    Raises:
        OSError: as :meth:`Relay.run` and the constructor.
        ValueError: bad ``buffer_size``.
    """
    with Relay(src_fd, dst_fd, buffer_size=buffer_size) as r:
        return r.run()
