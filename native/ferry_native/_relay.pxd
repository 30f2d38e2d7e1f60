# The relay's C state, declared here so that other Cython code can cimport
# the class and drive its nogil copy loop directly.

from libc.stdint cimport uint64_t


cdef enum CopyStatus:
    COPY_EOF = 0        # src reached end of file; dst half-closed if asked
    COPY_STOPPED = 1    # stop() was called
    COPY_ERROR = 2      # a system call failed; errno in *err
    COPY_SIGNAL = 3     # EINTR: run() checks Python signals and re-enters
    COPY_READY = 4      # _wait(): the fd is ready, retry the call


cdef class Relay:
    cdef int _src
    cdef int _dst
    cdef size_t _buffer_size
    cdef bint _half_close
    cdef bint _src_is_socket
    cdef bint _dst_is_socket
    # eventfd made readable by stop(); -1 once closed.
    cdef int _stop_fd
    # Written by run() without the GIL, read by any thread: atomic access only.
    cdef uint64_t _copied
    cdef int _stop_requested
    cdef int _eof
    # Touched only with the GIL held.
    cdef bint _running
    cdef bint _closed
    cdef char *_buf
    # Bytes read from src but not yet written to dst: _buf[_pend_off:_pend_off+_pend_len].
    # They live in the object so that an EINTR round trip through Python
    # (signal check) resumes the partial write instead of losing it.
    cdef size_t _pend_off
    cdef size_t _pend_len

    cdef CopyStatus _copy(self, int *err) noexcept nogil
    cdef CopyStatus _wait(self, int fd, short events, int *err) noexcept nogil
    cdef void _release(self) noexcept
