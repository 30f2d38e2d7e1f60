# The TLS stream's C state, declared here so that other Cython code can
# cimport the classes and drive the nogil loops directly.

from libc.stdint cimport uint64_t

from ferry_native.includes.openssl cimport SSL, SSL_CTX


cdef enum TlsStatus:
    TLS_OK = 0          # the operation completed (pump: both directions done)
    TLS_EOF = 1         # the peer's close_notify arrived (SSL_ERROR_ZERO_RETURN)
    TLS_STOPPED = 2     # stop() was called
    TLS_TIMEOUT = 3     # the deadline passed
    TLS_SIGNAL = 4      # EINTR: the caller checks Python signals and re-enters
    TLS_SYS_ERROR = 5   # a system call failed; errno in TlsFailure.sys_errno (0: EOF)
    TLS_SSL_ERROR = 6   # OpenSSL failed; TlsFailure.ssl_err / verify_result
    TLS_READY = 7       # a wait: an fd is ready, retry


cdef enum TlsOp:
    OP_HANDSHAKE = 0
    OP_READ = 1
    OP_WRITE = 2
    OP_SHUTDOWN = 3


# The data of our BIO (see _tls.pyx): the fd, and how the last recv/send
# failed, which OpenSSL itself does not keep.
cdef struct FdBio:
    int fd
    int err     # errno of the last failed recv/send that was not EAGAIN
    int eof     # recv returned 0


# What went wrong, gathered without the GIL, turned into an exception with it.
cdef struct TlsFailure:
    int sys_errno
    unsigned long ssl_err
    long verify_result


# The state of pump(), in the object so that an EINTR round trip through
# Python (signal check) resumes where it was.
cdef struct PumpState:
    int plain_fd
    size_t size
    # plain -> TLS: up_buf[0:up_len] read from plain_fd, not yet SSL_written
    # (a WANT_WRITE retry must pass the same bytes again).
    char *up_buf
    size_t up_len
    int up_eof
    int close_notify_sent
    # TLS -> plain: down_buf[down_off:down_off+down_len] decrypted, not yet written.
    char *down_buf
    size_t down_off
    size_t down_len
    int down_eof
    int plain_shut
    # A failure of SSL_read after some records were decrypted: raised once
    # those bytes are written (a truncated stream still delivers its data).
    TlsStatus down_error
    TlsFailure down_failure
    # poll() events a blocked step waits for; 0 = the step may be tried.
    short tls_rd_wait   # SSL_read
    short tls_wr_wait   # SSL_write / SSL_shutdown
    int plain_rd_wait
    int plain_wr_wait


cdef class TlsEndpoint:
    cdef SSL_CTX *_ctx
    cdef bint _server


cdef class TlsStream:
    cdef TlsEndpoint _endpoint
    cdef SSL *_ssl
    cdef FdBio _bio
    cdef int _fd
    cdef object _peer_name
    # eventfd made readable by stop(); -1 once closed.
    cdef int _stop_fd
    # Written without the GIL, read by any thread: atomic access only.
    cdef uint64_t _sent
    cdef uint64_t _received
    cdef int _stop_requested
    # Touched only with the GIL held.
    cdef bint _running
    cdef bint _closed
    cdef bint _handshake_done
    cdef bint _unwrapped
    cdef bint _pump_started
    cdef bint _pump_done
    cdef PumpState _p

    cdef TlsStatus _drive(self, TlsOp op, char *buf, size_t length, size_t *done,
                          double deadline, TlsFailure *fail) noexcept nogil
    cdef TlsStatus _wait_tls(self, short events, double deadline, TlsFailure *fail) noexcept nogil
    cdef TlsStatus _pump_loop(self, TlsFailure *fail) noexcept nogil
    cdef TlsStatus _pump_wait(self, TlsFailure *fail) noexcept nogil
    cdef TlsStatus _ssl_failed(self, int ret, int ssl_error, TlsFailure *fail) noexcept nogil
    cdef void _release(self) noexcept
    cdef _raise_failure(self, TlsStatus st, TlsFailure *fail, str what, double timeout,
                        bint handshake)
    cdef int _run(self, TlsOp op, char *buf, size_t length, size_t *done, double timeout,
                  str what, bint handshake) except -1
    cdef _begin(self, bint need_handshake, bint control)
    cdef _end(self)
