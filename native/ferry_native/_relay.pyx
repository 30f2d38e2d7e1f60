# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native byte relay: copy one fd to another with the GIL released.

The tunnel of a tunnelled migration is a byte pump between the qemu migration
socket and the peer connection.  :class:`Relay` runs that pump in C: one loop
around ``recv``/``send`` (sockets) or ``read``/``write`` (pipes, files), with
``poll()`` waiting on the data fd and a per-relay eventfd together, so that
:meth:`Relay.stop` can wake it from any thread.  The GIL is released for the
whole copy; it is taken back only to raise an error or to let Python run a
signal handler after ``EINTR``.

Why recv/send rather than read/write or splice: on loopback TCP, a 1 MiB
``recv``/``send`` loop was the fastest of the three (see
``tools/bench/relay.py`` and the report of the issue that added this module);
``splice(2)`` through a pipe spent less CPU but moved fewer bytes per second,
and ``read``/``write`` on sockets was a little slower than ``recv``/``send``.
Sockets are driven with ``MSG_DONTWAIT`` (never blocking, so stop() is prompt
even when the peer stops reading, without changing the fd's own O_NONBLOCK
flag that other users share) and ``MSG_NOSIGNAL`` (a closed peer gives EPIPE,
not SIGPIPE).  Other fds are polled before each read; writes to them may block
(a pipe whose reader stalls), and then stop() takes effect when that write
returns.

Errors are Python's own: ``OSError(errno, strerror)`` becomes the matching
subclass (BrokenPipeError, ConnectionResetError, ...), with ``errno`` set.

The same API, in pure Python, is ``ferry_native.reference.relay``.
"""

# EWOULDBLOCK is EAGAIN on Linux (and Cython does not declare it).
from libc.errno cimport EAGAIN, EBADF, EINTR, ENOTCONN, ENOTSOCK, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from posix.stat cimport S_ISSOCK, fstat, struct_stat
from posix.unistd cimport close, read, write

from cpython.exc cimport PyErr_CheckSignals

from ferry_native.includes.atomic cimport (
    ferry_add_u64,
    ferry_load_int,
    ferry_load_u64,
    ferry_store_int,
)
from ferry_native.includes.eventfd cimport EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_write
from ferry_native.includes.poll cimport POLLIN, POLLNVAL, POLLOUT, poll, pollfd
from ferry_native.includes.socket cimport MSG_DONTWAIT, MSG_NOSIGNAL, SHUT_WR, recv, send, shutdown

import os

__all__ = ["MAX_BUFFER_SIZE", "Relay", "relay"]

# A bigger buffer gains nothing on loopback and only costs memory per tunnel.
MAX_BUFFER_SIZE = 1 << 30


cdef _raise_errno(int err):
    # OSError(errno, ...) picks the subclass itself (EPIPE -> BrokenPipeError).
    raise OSError(err, os.strerror(err))


cdef bint _is_socket(int fd) except -1:
    cdef struct_stat st
    if fstat(fd, &st) < 0:
        _raise_errno(errno)
    return S_ISSOCK(st.st_mode)


cdef class Relay:
    """Copy bytes from ``src_fd`` to ``dst_fd`` until end of file on ``src_fd``.

    The relay does not own the two fds: it never closes them.  It owns a stop
    eventfd and a buffer of ``buffer_size`` bytes, freed by :meth:`close`
    (also on leaving a ``with`` block).

    Raises:
        OSError: ``EBADF`` when either fd is not open; whatever ``eventfd(2)``
            reports when no stop fd can be made.
        ValueError: ``buffer_size`` outside 1 .. ``MAX_BUFFER_SIZE``.
    """

    def __cinit__(self):
        self._stop_fd = -1
        self._buf = NULL

    def __init__(self, int src_fd, int dst_fd, *, buffer_size=1 << 20, half_close=True):
        cdef Py_ssize_t size = buffer_size
        if self._running:
            # __init__ can be called again on a live object; never swap fds mid-copy.
            raise RuntimeError("relay is already running")
        if size < 1 or size > MAX_BUFFER_SIZE:
            raise ValueError(
                f"buffer_size must be between 1 and {MAX_BUFFER_SIZE}, not {buffer_size!r}"
            )
        # Check both fds before making the stop fd, so a bad fd leaks nothing.
        self._src_is_socket = _is_socket(src_fd)
        self._dst_is_socket = _is_socket(dst_fd)
        self._src = src_fd
        self._dst = dst_fd
        self._buffer_size = <size_t>size
        self._half_close = bool(half_close)
        if self._stop_fd < 0:
            self._stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            if self._stop_fd < 0:
                _raise_errno(errno)

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self._stop_fd >= 0:
            close(self._stop_fd)
            self._stop_fd = -1
        if self._buf != NULL:
            free(self._buf)
            self._buf = NULL

    cdef CopyStatus _wait(self, int fd, short events, int *err) noexcept nogil:
        # Block until fd is ready for events or stop() is called.  POLLHUP
        # and POLLERR count as ready: the next recv/send reports them.
        cdef pollfd fds[2]
        fds[0].fd = fd
        fds[0].events = events
        fds[0].revents = 0
        fds[1].fd = self._stop_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        if poll(fds, 2, -1) < 0:
            if errno == EINTR:
                return COPY_SIGNAL
            err[0] = errno
            return COPY_ERROR
        if fds[1].revents:
            return COPY_STOPPED
        if fds[0].revents & POLLNVAL:
            err[0] = EBADF
            return COPY_ERROR
        return COPY_READY

    cdef CopyStatus _copy(self, int *err) noexcept nogil:
        # The copy loop.  Runs without the GIL; touches only C fields.
        cdef ssize_t n
        cdef CopyStatus st
        cdef int e
        while True:
            if ferry_load_int(&self._stop_requested):
                return COPY_STOPPED
            if self._pend_len == 0:
                if self._src_is_socket:
                    n = recv(self._src, self._buf, self._buffer_size, MSG_DONTWAIT)
                else:
                    # A blocking read on an idle pipe would not see stop().
                    st = self._wait(self._src, POLLIN, err)
                    if st != COPY_READY:
                        return st
                    n = read(self._src, self._buf, self._buffer_size)
                if n > 0:
                    self._pend_off = 0
                    self._pend_len = <size_t>n
                elif n == 0:
                    if self._half_close and self._dst_is_socket:
                        # The receiver must see EOF too.  ENOTCONN: the peer is
                        # gone already, nothing is left to signal.
                        if shutdown(self._dst, SHUT_WR) < 0 and errno != ENOTCONN \
                                and errno != ENOTSOCK:
                            err[0] = errno
                            return COPY_ERROR
                    return COPY_EOF
                else:
                    e = errno
                    if e == EINTR:
                        return COPY_SIGNAL
                    if e == EAGAIN:
                        st = self._wait(self._src, POLLIN, err)
                        if st != COPY_READY:
                            return st
                        continue
                    err[0] = e
                    return COPY_ERROR
            while self._pend_len > 0:
                if ferry_load_int(&self._stop_requested):
                    return COPY_STOPPED
                if self._dst_is_socket:
                    n = send(self._dst, self._buf + self._pend_off, self._pend_len,
                             MSG_DONTWAIT | MSG_NOSIGNAL)
                else:
                    n = write(self._dst, self._buf + self._pend_off, self._pend_len)
                if n > 0:
                    self._pend_off += <size_t>n
                    self._pend_len -= <size_t>n
                    ferry_add_u64(&self._copied, <uint64_t>n)
                    continue
                e = errno if n < 0 else EAGAIN
                if e == EINTR:
                    return COPY_SIGNAL
                if e == EAGAIN:
                    st = self._wait(self._dst, POLLOUT, err)
                    if st != COPY_READY:
                        return st
                    continue
                err[0] = e
                return COPY_ERROR

    def run(self):
        """Copy until end of file on the source; return the bytes copied by this call.

        Blocks the calling thread with the GIL released, so other threads and
        an asyncio loop (``await loop.run_in_executor(None, relay.run)``) keep
        running.  At end of file, with ``half_close`` and a socket as
        destination, the destination is shut down for writing so the receiver
        sees end of file.  After :meth:`stop`, returns promptly and normally
        (``stopped`` is then true); bytes read but not yet written are dropped.

        Raises:
            OSError: the subclass matching errno, e.g. BrokenPipeError or
                ConnectionResetError when the receiver went away, EBADF for
                a closed fd.  ``bytes_copied`` still tells how far it got.
            ValueError: the relay is closed.
            RuntimeError: run() is already running in another thread.
            KeyboardInterrupt: or whatever a signal handler raises, when run
                in the main thread.
        """
        cdef CopyStatus status
        cdef int err = 0
        cdef uint64_t start
        if self._closed:
            raise ValueError("I/O operation on closed relay")
        if self._running:
            raise RuntimeError("relay is already running")
        if self._buf == NULL:
            self._buf = <char *>malloc(self._buffer_size)
            if self._buf == NULL:
                raise MemoryError()
        start = ferry_load_u64(&self._copied)
        self._running = True
        try:
            while True:
                with nogil:
                    status = self._copy(&err)
                if status != COPY_SIGNAL:
                    break
                # Let Python run its handlers (main thread only); an exception
                # such as KeyboardInterrupt ends the copy.
                PyErr_CheckSignals()
        finally:
            self._running = False
            if self._closed:
                # close() was called while running: finish it now.
                self._release()
        if status == COPY_EOF:
            ferry_store_int(&self._eof, 1)
        elif status == COPY_ERROR:
            _raise_errno(err)
        return ferry_load_u64(&self._copied) - start

    def stop(self):
        """Make a running (or the next) :meth:`run` return promptly; thread-safe.

        A stopped relay stays stopped: later run() calls return 0 at once.
        Does nothing to the two fds.
        """
        ferry_store_int(&self._stop_requested, 1)
        if self._stop_fd >= 0:
            # EAGAIN (counter full) cannot matter: the fd is readable already.
            eventfd_write(self._stop_fd, 1)

    def close(self):
        """Free the stop fd and the buffer; idempotent.  Leaves the two data fds open.

        Called while run() is going in another thread, it stops the relay and
        the resources are freed when run() returns.
        """
        if self._closed:
            return
        self._closed = True
        if self._running:
            self.stop()
        else:
            self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    @property
    def bytes_copied(self):
        """Bytes written to the destination so far, by all run() calls; live during run()."""
        return ferry_load_u64(&self._copied)

    @property
    def stopped(self):
        """True when stop() was called before run() reached end of file."""
        return bool(ferry_load_int(&self._stop_requested)) and not ferry_load_int(&self._eof)

    @property
    def src_fd(self):
        """The source fd (not owned)."""
        return self._src

    @property
    def dst_fd(self):
        """The destination fd (not owned)."""
        return self._dst

    @property
    def buffer_size(self):
        """Size of the copy buffer in bytes."""
        return self._buffer_size

    @property
    def half_close(self):
        """Whether end of file on the source shuts the destination socket down for writing."""
        return self._half_close

    @property
    def closed(self):
        """True once close() was called."""
        return self._closed

    def __repr__(self):
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


def relay(int src_fd, int dst_fd, *, buffer_size=1 << 20):
    """Copy ``src_fd`` to ``dst_fd`` until end of file and return the byte count.

    A one-shot :class:`Relay` with ``half_close=True``.

    Raises:
        OSError: as :meth:`Relay.run` and the constructor.
        ValueError: bad ``buffer_size``.
    """
    with Relay(src_fd, dst_fd, buffer_size=buffer_size) as r:
        return r.run()
