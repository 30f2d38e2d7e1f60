# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native TLS stream: the tunnel's encrypted data path, OpenSSL with the GIL released.

A :class:`TlsStream` is one TLS 1.3 session over a connected socket fd that
it does not own: :meth:`~TlsStream.handshake` with mutual certificate
authentication against our own CA (:class:`TlsEndpoint`), then either a
small control exchange (``send_all``/``recv_some``) and
:meth:`~TlsStream.unwrap` to go on in plaintext over the same fd, or
:meth:`~TlsStream.pump`, the full-duplex copy between a plain fd (qemu's
migration socket) and the TLS fd in one ``poll()`` loop.  The GIL is released
while waiting and for the whole pump; it is taken back only to raise an
error or to let Python run a signal handler after ``EINTR``.

How OpenSSL reaches the fd: through a BIO of our own (``_bio_read``/
``_bio_write`` below) that calls ``recv``/``send`` with ``MSG_DONTWAIT``,
rather than ``SSL_set_fd`` on a non-blocking fd.  It keeps the promise the
relay makes: the fd's O_NONBLOCK flag, which the caller and other users
share, is never changed, not even for the length of a call, and
``MSG_NOSIGNAL`` turns a closed peer into EPIPE instead of SIGPIPE (OpenSSL's
socket BIO uses ``write()``).  It also keeps the errno of a failed call,
which SSL_ERROR_SYSCALL needs and which other calls would overwrite.  It
costs nothing: the socket BIO is the same two system calls.

Why the sizes are what they are: SSL_write() gets the whole buffer (256 KiB
by default) and cuts it into 16 KiB records in one call; the records go out
one ``send`` each.  SSL_MODE_ENABLE_PARTIAL_WRITE is *not* set: with it
OpenSSL returns after every single record (ssl3_write_bytes), without it it
writes them all or returns WANT_WRITE, and the retry must pass the same
bytes (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER lets that be a moved buffer).
Reads are exact outside pump(): OpenSSL fetches a record's header, then its
body, and never more (so unwrap() leaves the peer's plaintext in the
socket); pump() turns on read-ahead with a 256 KiB read buffer, so that one
``recv`` brings in many records (on loopback it saved a few percent of CPU
per GiB; the throughput difference was within the noise).  The cipher is
OpenSSL's TLS 1.3 default, TLS_AES_256_GCM_SHA384 (AES-NI): ``openssl speed``
puts AES-128-GCM only ~5 % ahead on this CPU, not worth a non-default list.

Errors: :class:`TlsError` (a ConnectionError) for everything TLS says, with
a message naming what failed; ``OSError(errno, strerror)`` (the matching
subclass) for the system calls; ValueError/RuntimeError for misuse.

The same API, in pure Python on the ``ssl`` module, is
``ferry_native.reference.tls``.
"""

from libc.errno cimport (
    EAGAIN,
    EBADF,
    ECONNABORTED,
    ECONNRESET,
    EINTR,
    EINVAL,
    ENOTCONN,
    ENOTSOCK,
    EPIPE,
    errno,
)
from libc.limits cimport INT_MAX
from libc.math cimport ceil
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from posix.stat cimport S_ISSOCK, fstat, struct_stat
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_CheckSignals

from ferry_native.includes.atomic cimport (
    ferry_add_u64,
    ferry_load_int,
    ferry_load_u64,
    ferry_store_int,
)
from ferry_native.includes.eventfd cimport EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_write
from ferry_native.includes.openssl cimport *
from ferry_native.includes.poll cimport POLLIN, POLLNVAL, POLLOUT, poll, pollfd
from ferry_native.includes.socket cimport MSG_DONTWAIT, MSG_NOSIGNAL, SHUT_WR, recv, send, shutdown

import ipaddress
import math
import operator
import os

__all__ = ["TlsEndpoint", "TlsError", "TlsStream"]

DEFAULT_PUMP_BUFFER = 256 * 1024
# A bigger buffer gains nothing (records are 16 KiB) and only costs memory.
_MAX_PUMP_BUFFER = 1 << 30

cdef enum:
    # The largest plaintext of one TLS record: recv_some never gets more at once.
    _MAX_RECORD_PLAINTEXT = 16 * 1024
    # pump()'s read-ahead buffer: many records per recv() (see the docstring).
    _READ_AHEAD = 256 * 1024
# How a peer that went away shows up in the middle of a handshake.
_PEER_GONE = (ECONNRESET, EPIPE, ECONNABORTED)
_NAME_MISMATCH = (X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH)


class TlsError(ConnectionError):
    """A TLS failure: the message says what failed.

    For example ``certificate verify failed: unable to get local issuer
    certificate``, ``peer did not present a certificate``, ``certificate does
    not match 10.0.0.2``, ``peer sent a TLS alert: tlsv1 alert unknown ca``,
    ``peer closed the connection during the TLS handshake``, ``peer closed the
    connection without close_notify (truncated)``, ``handshake timed out after
    5.0 s``.  A ConnectionError (so an OSError) with no errno.
    """


# -- messages ------------------------------------------------------------------


def _tls_message(str reason, *, bint handshake, peer_name, long verify_code=0,
                 str verify_message=""):
    # The same rules as reference/tls.py's _tls_message: the two backends must
    # say the same thing for the same failure.
    if reason == "certificate verify failed":
        if verify_code in _NAME_MISMATCH:
            return f"certificate does not match {peer_name}"
        return f"certificate verify failed: {verify_message}"
    if reason == "peer did not return a certificate":
        return "peer did not present a certificate"
    if reason == "unexpected eof while reading":
        if handshake:
            return "peer closed the connection during the TLS handshake"
        return "peer closed the connection without close_notify (truncated)"
    if "alert" in reason:
        return f"peer sent a TLS alert: {reason}"
    return f"TLS error: {reason}"


cdef str _reason_text(unsigned long err):
    # OpenSSL's reason string, what ssl.SSLError.reason is the macro name of.
    cdef const char *text = ERR_reason_error_string(err)
    if text == NULL:
        return f"error {err:#x}"
    return text.decode("utf-8", "replace")


cdef str _take_openssl_reason():
    # The reason of the last error on this thread's queue; empties the queue
    # so that nothing stale reaches the next caller (Python's ssl included).
    cdef unsigned long err = ERR_peek_last_error()
    ERR_clear_error()
    return _reason_text(err)


cdef _raise_errno(int err):
    # OSError(errno, ...) picks the subclass itself (EPIPE -> BrokenPipeError).
    raise OSError(err, os.strerror(err))


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def _check_file(str path, str what):
    # ssl/OpenSSL report a missing file without saying which of the three it
    # was, and a directory as a PEM error; checking first names the setting.
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"cannot read the TLS {what} file ({exc.strerror})", path
        ) from None


cdef _check_socket(int fd, str what):
    # EBADF when fd is not open, ENOTSOCK when it is no socket.
    cdef struct_stat st
    if fstat(fd, &st) < 0:
        _raise_errno(errno)
    if not S_ISSOCK(st.st_mode):
        raise OSError(ENOTSOCK, f"{what} is not a socket ({os.strerror(ENOTSOCK)})")


cdef double _check_timeout(timeout) except -1:
    cdef double value = float(timeout)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    return value


# -- the BIO -------------------------------------------------------------------
# OpenSSL calls these without the GIL (from inside SSL_read/SSL_write, which
# run in nogil sections).  They touch only the FdBio of their stream.


cdef int _bio_write(BIO *bio, const char *data, size_t length, size_t *written) noexcept nogil:
    cdef FdBio *st = <FdBio *>BIO_get_data(bio)
    cdef ssize_t n
    BIO_clear_retry_flags(bio)
    n = send(st.fd, data, length, MSG_DONTWAIT | MSG_NOSIGNAL)
    if n >= 0:
        written[0] = <size_t>n
        return 1
    written[0] = 0
    if errno == EAGAIN or errno == EINTR:
        # WANT_WRITE: the caller polls and calls SSL_* again.
        BIO_set_retry_write(bio)
    else:
        st.err = errno
    return 0


cdef int _bio_read(BIO *bio, char *data, size_t length, size_t *readbytes) noexcept nogil:
    cdef FdBio *st = <FdBio *>BIO_get_data(bio)
    cdef ssize_t n
    BIO_clear_retry_flags(bio)
    n = recv(st.fd, data, length, MSG_DONTWAIT)
    if n > 0:
        readbytes[0] = <size_t>n
        return 1
    readbytes[0] = 0
    if n == 0:
        # Reported through BIO_CTRL_EOF, so that OpenSSL says "unexpected eof
        # while reading" (a truncated stream) rather than SSL_ERROR_SYSCALL.
        st.eof = 1
    elif errno == EAGAIN or errno == EINTR:
        BIO_set_retry_read(bio)
    else:
        st.err = errno
    return 0


cdef long _bio_ctrl(BIO *bio, int cmd, long num, void *ptr) noexcept nogil:
    cdef FdBio *st = <FdBio *>BIO_get_data(bio)
    if cmd == BIO_CTRL_FLUSH:
        return 1  # nothing is buffered here
    if cmd == BIO_CTRL_EOF:
        return st.eof if st != NULL else 0
    return 0  # everything else (kTLS queries, pending counts): not supported


cdef int _bio_create(BIO *bio) noexcept nogil:
    BIO_set_init(bio, 1)
    return 1


cdef BIO_METHOD *_make_bio_method() except NULL:
    cdef BIO_METHOD *method = BIO_meth_new(
        BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, b"ferry fd (MSG_DONTWAIT)"
    )
    if method == NULL:
        raise MemoryError()
    BIO_meth_set_write_ex(method, _bio_write)
    BIO_meth_set_read_ex(method, _bio_read)
    BIO_meth_set_ctrl(method, _bio_ctrl)
    BIO_meth_set_create(method, _bio_create)
    return method


# One method table for the process, never freed (like OpenSSL's own).
cdef BIO_METHOD *_FD_BIO = _make_bio_method()


# -- endpoint ------------------------------------------------------------------


cdef class TlsEndpoint:
    """One side's TLS configuration: TLS 1.3 only, mutual authentication, our own CA.

    Only ``ca_file`` is trusted, never the system store (a publicly trusted
    certificate must not be able to move VMs).  ``cert_file`` is our PEM
    certificate chain, ``key_file`` its private key.  A server endpoint
    requires a client certificate chaining to the CA; a client endpoint
    verifies the server's chain and that it matches the ``peer_name`` of the
    stream.  Servers issue no session tickets: the agents make few, long
    connections, and tickets would only be stray records after the handshake.

    Raises:
        OSError: the subclass for a file that cannot be read
            (FileNotFoundError, PermissionError, IsADirectoryError), with the
            role of the file in the message and the path as ``filename``.
        ValueError: a file holds no usable certificate or key, or the key
            does not belong to the certificate; the message names the file.
    """

    def __cinit__(self):
        self._ctx = NULL

    def __init__(self, *, server, ca_file, cert_file, key_file):
        cdef SSL_CTX *ctx
        cdef unsigned long err
        cdef int mode
        if self._ctx != NULL:
            raise RuntimeError("TlsEndpoint is already initialised")
        ca, cert, key = os.fspath(ca_file), os.fspath(cert_file), os.fspath(key_file)
        _check_file(ca, "CA certificate")
        _check_file(cert, "certificate")
        _check_file(key, "private key")
        ca_b, cert_b, key_b = os.fsencode(ca), os.fsencode(cert), os.fsencode(key)
        self._server = bool(server)
        ERR_clear_error()
        ctx = SSL_CTX_new(TLS_server_method() if self._server else TLS_client_method())
        if ctx == NULL:
            raise MemoryError(f"SSL_CTX_new: {_take_openssl_reason()}")
        try:
            SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION)
            SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)
            # A stream cut without close_notify must be an error, never an EOF.
            SSL_CTX_clear_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF)
            SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER)
            # Non-blocking use: every WANT_* comes back to our poll loop.
            SSL_CTX_clear_mode(ctx, SSL_MODE_AUTO_RETRY)
            mode = SSL_VERIFY_PEER
            if self._server:
                mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT
                SSL_CTX_set_num_tickets(ctx, 0)
            SSL_CTX_set_verify(ctx, mode, NULL)
            if SSL_CTX_load_verify_locations(ctx, ca_b, NULL) != 1:
                raise ValueError(
                    f"TLS CA certificate file {ca} holds no usable certificate "
                    f"({_take_openssl_reason()})"
                )
            if SSL_CTX_use_certificate_chain_file(ctx, cert_b) != 1:
                raise ValueError(
                    f"TLS certificate file {cert} holds no usable certificate "
                    f"({_take_openssl_reason()})"
                )
            if SSL_CTX_use_PrivateKey_file(ctx, key_b, SSL_FILETYPE_PEM) != 1:
                err = ERR_peek_last_error()
                if ERR_GET_LIB(err) == ERR_LIB_X509 and ERR_GET_REASON(err) in (
                    X509_R_KEY_VALUES_MISMATCH, X509_R_KEY_TYPE_MISMATCH
                ):
                    ERR_clear_error()
                    raise ValueError(
                        f"TLS private key file {key} does not belong to certificate file {cert}"
                    )
                raise ValueError(
                    f"TLS private key file {key} holds no usable private key "
                    f"({_take_openssl_reason()})"
                )
            if SSL_CTX_check_private_key(ctx) != 1:
                ERR_clear_error()
                raise ValueError(
                    f"TLS private key file {key} does not belong to certificate file {cert}"
                )
        except BaseException:
            SSL_CTX_free(ctx)
            raise
        self._ctx = ctx

    def __dealloc__(self):
        if self._ctx != NULL:
            SSL_CTX_free(self._ctx)
            self._ctx = NULL

    @property
    def server(self):
        """True for the accepting side, False for the dialling side."""
        return self._server

    def __repr__(self):
        return f"<TlsEndpoint {'server' if self._server else 'client'}>"


# -- stream --------------------------------------------------------------------


cdef class TlsStream:
    """A TLS 1.3 session over the connected stream socket ``fd``, which it does not own.

    The stream never closes ``fd`` and never changes its flags; it owns an
    SSL object and a stop eventfd, freed by :meth:`close` (also on leaving a
    ``with`` block).  On the client side ``peer_name`` is required: an IP
    address is checked against the certificate's IP SANs, anything else is a
    DNS name checked against its DNS SANs (and sent as SNI).

    Use: :meth:`handshake`, then either a control exchange
    (:meth:`send_all`/:meth:`recv_some`) and :meth:`unwrap` to go on in
    plaintext over the same fd, or :meth:`pump` to carry a plain fd's bytes
    encrypted until both sides are done.  One operation at a time; only
    :meth:`stop`, :meth:`close` and the properties may be called from other
    threads meanwhile.

    Raises:
        OSError: ``EBADF`` when ``fd`` is not open, ``ENOTSOCK`` when it is not
            a socket; whatever ``eventfd(2)`` reports.
        ValueError: ``peer_name`` missing on the client side or given on the
            server side.
        TypeError: ``endpoint`` is not a TlsEndpoint.
    """

    def __cinit__(self):
        self._ssl = NULL
        self._stop_fd = -1
        self._p.up_buf = NULL
        self._p.down_buf = NULL

    def __init__(self, TlsEndpoint endpoint not None, int fd, *, peer_name=None):
        cdef SSL *ssl
        cdef BIO *bio
        cdef X509_VERIFY_PARAM *param
        cdef bytes name
        if self._ssl != NULL:
            # __init__ can be called again on a live object; never swap sessions.
            raise RuntimeError("TlsStream is already initialised")
        if endpoint._ctx == NULL:
            raise ValueError("the TlsEndpoint was not initialised")
        _check_socket(fd, "the TLS fd")
        if endpoint._server:
            if peer_name is not None:
                raise ValueError("peer_name is for the client side; a server stream takes none")
        elif not peer_name:
            raise ValueError("a client stream needs peer_name: the server's IP address or DNS name")
        self._endpoint = endpoint
        self._fd = fd
        self._peer_name = peer_name
        self._bio.fd = fd
        self._bio.err = 0
        self._bio.eof = 0
        ERR_clear_error()
        ssl = SSL_new(endpoint._ctx)
        if ssl == NULL:
            raise MemoryError(f"SSL_new: {_take_openssl_reason()}")
        bio = BIO_new(_FD_BIO)
        if bio == NULL:
            SSL_free(ssl)
            raise MemoryError(f"BIO_new: {_take_openssl_reason()}")
        # The BIO points into this object, which outlives the SSL (_release).
        BIO_set_data(bio, &self._bio)
        SSL_set_bio(ssl, bio, bio)  # one reference, owned by the SSL from now on
        self._ssl = ssl
        if endpoint._server:
            SSL_set_accept_state(ssl)
        else:
            SSL_set_connect_state(ssl)
            param = SSL_get0_param(ssl)
            # As ssl.SSLContext: no partial wildcards, never the subject CN.
            X509_VERIFY_PARAM_set_hostflags(
                param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | X509_CHECK_FLAG_NEVER_CHECK_SUBJECT
            )
            name = str(peer_name).encode("ascii")
            try:
                ipaddress.ip_address(peer_name)
            except ValueError:
                ok = X509_VERIFY_PARAM_set1_host(param, name, 0) == 1 and \
                    SSL_set_tlsext_host_name(ssl, name) == 1
            else:
                ok = X509_VERIFY_PARAM_set1_ip_asc(param, name) == 1
            if not ok:
                raise ValueError(f"peer_name {peer_name!r}: {_take_openssl_reason()}")
        self._stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self._stop_fd < 0:
            _raise_errno(errno)

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        if self._ssl != NULL:
            SSL_free(self._ssl)  # frees the BIO too; sends nothing
            self._ssl = NULL
        if self._stop_fd >= 0:
            close(self._stop_fd)
            self._stop_fd = -1
        if self._p.up_buf != NULL:
            free(self._p.up_buf)
            self._p.up_buf = NULL
        if self._p.down_buf != NULL:
            free(self._p.down_buf)
            self._p.down_buf = NULL

    # -- nogil machinery -------------------------------------------------------

    cdef TlsStatus _ssl_failed(self, int ret, int ssl_error, TlsFailure *fail) noexcept nogil:
        # Gather what made an SSL_* call fail, for _raise_failure().
        if ssl_error == SSL_ERROR_SYSCALL:
            fail.sys_errno = self._bio.err  # 0: end of file
            ERR_clear_error()
            return TLS_SYS_ERROR
        fail.ssl_err = ERR_peek_last_error()
        fail.verify_result = SSL_get_verify_result(self._ssl)
        return TLS_SSL_ERROR

    cdef TlsStatus _wait_tls(self, short events, double deadline, TlsFailure *fail) noexcept nogil:
        # Block until the TLS fd is ready for events, stop() or the deadline.
        # POLLHUP and POLLERR count as ready: the next call reports them.
        cdef pollfd fds[2]
        cdef double left = deadline - _now()
        cdef int ms
        if left <= 0:
            return TLS_TIMEOUT
        ms = <int>ceil(left * 1000) if left < INT_MAX / 1000 else INT_MAX
        fds[0].fd = self._fd
        fds[0].events = events
        fds[0].revents = 0
        fds[1].fd = self._stop_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        if poll(fds, 2, ms) < 0:
            if errno == EINTR:
                return TLS_SIGNAL
            fail.sys_errno = errno
            return TLS_SYS_ERROR
        if fds[1].revents:
            return TLS_STOPPED
        if fds[0].revents & POLLNVAL:
            fail.sys_errno = EBADF
            return TLS_SYS_ERROR
        return TLS_READY  # also on a timeout: the next round finds left <= 0

    cdef TlsStatus _drive(self, TlsOp op, char *buf, size_t length, size_t *done,
                          double deadline, TlsFailure *fail) noexcept nogil:
        # Call one SSL operation until it completes, waiting in poll() for
        # whatever it asks (WANT_READ / WANT_WRITE).
        cdef int ret, err
        cdef TlsStatus st
        while True:
            if ferry_load_int(&self._stop_requested):
                return TLS_STOPPED
            ERR_clear_error()
            self._bio.err = 0
            if op == OP_HANDSHAKE:
                ret = SSL_do_handshake(self._ssl)
            elif op == OP_READ:
                ret = SSL_read_ex(self._ssl, buf, length, done)
            elif op == OP_WRITE:
                ret = SSL_write_ex(self._ssl, buf, length, done)
            else:
                ret = SSL_shutdown(self._ssl)
                if ret == 0:
                    continue  # our close_notify is out; the next call waits for the peer's
            if ret == 1:
                return TLS_OK
            err = SSL_get_error(self._ssl, ret)
            if err == SSL_ERROR_WANT_READ:
                st = self._wait_tls(POLLIN, deadline, fail)
            elif err == SSL_ERROR_WANT_WRITE:
                st = self._wait_tls(POLLOUT, deadline, fail)
            elif err == SSL_ERROR_ZERO_RETURN:
                return TLS_EOF
            else:
                return self._ssl_failed(ret, err, fail)
            if st != TLS_READY:
                return st

    cdef TlsStatus _pump_wait(self, TlsFailure *fail) noexcept nogil:
        # poll() for what the blocked steps wait on, and stop(); clear the
        # waits of an fd that reported anything (POLLHUP/POLLERR too).
        cdef PumpState *p = &self._p
        cdef pollfd fds[3]
        fds[0].events = p.tls_rd_wait | p.tls_wr_wait
        fds[1].events = (POLLIN if p.plain_rd_wait else 0) | (POLLOUT if p.plain_wr_wait else 0)
        if fds[0].events == 0 and fds[1].events == 0:
            fail.sys_errno = EINVAL  # a bug, not a state: nothing to wait for
            return TLS_SYS_ERROR
        # An fd polled with no events would still report POLLHUP at once.
        fds[0].fd = self._fd if fds[0].events else -1
        fds[1].fd = p.plain_fd if fds[1].events else -1
        fds[2].fd = self._stop_fd
        fds[2].events = POLLIN
        fds[0].revents = fds[1].revents = fds[2].revents = 0
        if poll(fds, 3, -1) < 0:
            if errno == EINTR:
                return TLS_SIGNAL
            fail.sys_errno = errno
            return TLS_SYS_ERROR
        if fds[2].revents:
            return TLS_STOPPED
        if (fds[0].revents | fds[1].revents) & POLLNVAL:
            fail.sys_errno = EBADF
            return TLS_SYS_ERROR
        if fds[0].revents:
            p.tls_rd_wait = p.tls_wr_wait = 0
        if fds[1].revents:
            p.plain_rd_wait = p.plain_wr_wait = 0
        return TLS_READY

    cdef TlsStatus _pump_loop(self, TlsFailure *fail) noexcept nogil:
        # The copy loop: try every step that may progress; poll() when none
        # did.  Runs without the GIL; touches only C fields.
        cdef PumpState *p = &self._p
        cdef SSL *ssl = self._ssl
        cdef size_t n, got
        cdef ssize_t k
        cdef int ret, err
        cdef bint progress
        cdef TlsStatus st
        while True:
            if ferry_load_int(&self._stop_requested):
                return TLS_STOPPED
            progress = False
            # TLS -> plain: decrypt records up to a full buffer (one per SSL_read).
            if p.down_error != TLS_OK and p.down_len == 0:
                fail[0] = p.down_failure
                return p.down_error
            if not p.down_eof and p.down_len == 0 and p.tls_rd_wait == 0:
                got = 0
                while got < p.size:
                    ERR_clear_error()
                    self._bio.err = 0
                    ret = SSL_read_ex(ssl, p.down_buf + got, p.size - got, &n)
                    if ret == 1:
                        got += n
                        continue
                    err = SSL_get_error(ssl, ret)
                    if err == SSL_ERROR_WANT_READ:
                        p.tls_rd_wait = POLLIN
                    elif err == SSL_ERROR_WANT_WRITE:
                        p.tls_rd_wait = POLLOUT  # e.g. the reply to a KeyUpdate
                    elif err == SSL_ERROR_ZERO_RETURN:
                        p.down_eof = 1
                    else:
                        st = self._ssl_failed(ret, err, fail)
                        if got == 0:
                            return st
                        p.down_error = st
                        p.down_failure = fail[0]
                    break
                p.down_off = 0
                p.down_len = got
                progress = got > 0 or p.down_eof
            if p.down_len and not p.plain_wr_wait:
                k = send(p.plain_fd, p.down_buf + p.down_off, p.down_len,
                         MSG_DONTWAIT | MSG_NOSIGNAL)
                if k > 0:
                    p.down_off += <size_t>k
                    p.down_len -= <size_t>k
                    ferry_add_u64(&self._received, <uint64_t>k)
                    progress = True
                elif errno == EAGAIN or k == 0:
                    p.plain_wr_wait = 1
                elif errno == EINTR:
                    return TLS_SIGNAL
                else:
                    fail.sys_errno = errno
                    return TLS_SYS_ERROR
            if p.down_eof and p.down_len == 0 and not p.plain_shut:
                # ENOTCONN: the reader is gone already, nothing is left to signal.
                if shutdown(p.plain_fd, SHUT_WR) < 0 and errno != ENOTCONN:
                    fail.sys_errno = errno
                    return TLS_SYS_ERROR
                p.plain_shut = 1
                progress = True
            # plain -> TLS: read only when the previous bytes were SSL_written.
            if not p.up_eof and p.up_len == 0 and not p.plain_rd_wait:
                k = recv(p.plain_fd, p.up_buf, p.size, MSG_DONTWAIT)
                if k > 0:
                    p.up_len = <size_t>k
                    progress = True
                elif k == 0:
                    p.up_eof = 1
                    progress = True
                elif errno == EAGAIN:
                    p.plain_rd_wait = 1
                elif errno == EINTR:
                    return TLS_SIGNAL
                else:
                    fail.sys_errno = errno
                    return TLS_SYS_ERROR
            if p.up_len and p.tls_wr_wait == 0:
                ERR_clear_error()
                self._bio.err = 0
                ret = SSL_write_ex(ssl, p.up_buf, p.up_len, &n)
                if ret == 1:
                    # All of it: without SSL_MODE_ENABLE_PARTIAL_WRITE, n == up_len.
                    ferry_add_u64(&self._sent, <uint64_t>n)
                    p.up_len = 0
                    progress = True
                else:
                    err = SSL_get_error(ssl, ret)
                    if err == SSL_ERROR_WANT_WRITE:
                        p.tls_wr_wait = POLLOUT
                    elif err == SSL_ERROR_WANT_READ:
                        p.tls_wr_wait = POLLIN
                    else:
                        return self._ssl_failed(ret, err, fail)
            if p.up_eof and p.up_len == 0 and not p.close_notify_sent and p.tls_wr_wait == 0:
                # One SSL_shutdown(): 0 = our close_notify is out, 1 = the
                # peer's had arrived already.  The peer's is read by SSL_read.
                ERR_clear_error()
                self._bio.err = 0
                ret = SSL_shutdown(ssl)
                if ret >= 0:
                    p.close_notify_sent = 1
                    progress = True
                else:
                    err = SSL_get_error(ssl, ret)
                    if err == SSL_ERROR_WANT_WRITE:
                        p.tls_wr_wait = POLLOUT
                    elif err == SSL_ERROR_WANT_READ:
                        p.tls_wr_wait = POLLIN
                    else:
                        return self._ssl_failed(ret, err, fail)
            if (p.up_eof and p.up_len == 0 and p.close_notify_sent
                    and p.down_eof and p.down_len == 0 and p.plain_shut):
                return TLS_OK
            if not progress:
                st = self._pump_wait(fail)
                if st != TLS_READY:
                    return st

    # -- with the GIL ----------------------------------------------------------

    cdef _raise_failure(self, TlsStatus st, TlsFailure *fail, str what, double timeout,
                        bint handshake):
        # Turn a failed status into the exception the API promises.
        cdef int e
        cdef long code
        if st == TLS_TIMEOUT:
            raise TlsError(f"{what} timed out after {timeout!r} s")
        if st == TLS_STOPPED:
            raise TlsError(f"{what} interrupted by stop()")
        if st == TLS_EOF:  # close_notify in the middle of a handshake
            raise TlsError("peer closed the connection during the TLS handshake")
        if st == TLS_SYS_ERROR:
            e = fail.sys_errno
            if e == 0:
                raise TlsError(_tls_message("unexpected eof while reading",
                                            handshake=handshake, peer_name=self._peer_name))
            if handshake and e in _PEER_GONE:
                raise TlsError(
                    f"peer closed the connection during the TLS handshake ({os.strerror(e)})"
                )
            _raise_errno(e)
        # TLS_SSL_ERROR
        code = fail.verify_result
        reason = _reason_text(fail.ssl_err)
        ERR_clear_error()
        verify_text = X509_verify_cert_error_string(code).decode("utf-8", "replace")
        raise TlsError(_tls_message(reason, handshake=handshake, peer_name=self._peer_name,
                                    verify_code=code, verify_message=verify_text))

    cdef int _run(self, TlsOp op, char *buf, size_t length, size_t *done, double timeout,
                  str what, bint handshake) except -1:
        # Drive one SSL operation with the GIL released; 1 at close_notify.
        cdef TlsFailure fail
        cdef TlsStatus st
        cdef double deadline = _now() + timeout
        fail.sys_errno = 0
        fail.ssl_err = 0
        fail.verify_result = 0
        while True:
            with nogil:
                st = self._drive(op, buf, length, done, deadline, &fail)
            if st != TLS_SIGNAL:
                break
            # Let Python run its handlers (main thread only); an exception
            # such as KeyboardInterrupt ends the operation.
            PyErr_CheckSignals()
        if st == TLS_OK:
            return 0
        if st == TLS_EOF and not handshake:
            return 1
        self._raise_failure(st, &fail, what, timeout, handshake)

    cdef _begin(self, bint need_handshake, bint control):
        # One operation at a time, on a usable stream.
        if self._closed:
            raise ValueError("I/O operation on closed TLS stream")
        if self._running:
            raise RuntimeError("TLS stream is busy with another operation")
        if need_handshake and not self._handshake_done:
            raise ValueError("the TLS handshake has not been done")
        if self._unwrapped:
            raise ValueError("the TLS stream was unwrapped")
        if control and self._pump_started:
            raise ValueError("the TLS stream is being pumped")
        self._running = True

    cdef _end(self):
        self._running = False
        if self._closed:
            # close() was called while running: finish it now.
            self._release()

    # -- the control exchange --------------------------------------------------

    def handshake(self, timeout):
        """Do the TLS handshake within ``timeout`` seconds; nothing if done already.

        The client verifies the server's chain and name; the server requires
        and verifies the client's certificate.  In TLS 1.3 the client's
        handshake completes before the server has checked the client
        certificate: a refusal by the server reaches the client as a TlsError
        from its first recv_some() or pump().  Waits in poll() on the fd with
        the GIL released; :meth:`stop` interrupts it.

        Raises:
            TlsError: verification failed, the peer refused or closed the
                connection, ``handshake timed out after T s``, or stop().
            OSError: a socket error other than the peer going away.
            ValueError: closed or unwrapped stream, bad timeout.
            RuntimeError: another operation is running.
        """
        cdef double seconds = _check_timeout(timeout)
        cdef size_t done = 0
        if self._handshake_done:
            return
        self._begin(False, True)
        try:
            self._run(OP_HANDSHAKE, NULL, 0, &done, seconds, "handshake", True)
            self._handshake_done = True
        finally:
            self._end()

    def peer_certificate(self):
        """Return the DER encoding of the peer's verified certificate.

        Raises:
            ValueError: the handshake has not been done, or the stream is closed.
        """
        cdef X509 *cert
        cdef int n
        cdef unsigned char *out
        if not self._handshake_done:
            raise ValueError("the TLS handshake has not been done")
        if self._ssl == NULL:
            raise ValueError("I/O operation on closed TLS stream")
        cert = SSL_get0_peer_certificate(self._ssl)
        if cert == NULL:  # both sides require a certificate
            raise TlsError("peer did not present a certificate")
        n = i2d_X509(cert, NULL)
        if n < 0:
            raise TlsError(f"TLS error: {_take_openssl_reason()}")
        der = PyBytes_FromStringAndSize(NULL, n)
        out = <unsigned char *>PyBytes_AS_STRING(der)
        i2d_X509(cert, &out)
        return der

    def send_all(self, data, timeout):
        """Encrypt and send all of ``data`` within ``timeout`` seconds.

        For a small control exchange before the bulk data (which goes through
        :meth:`pump`).  Not counted in ``bytes_sent``.

        Raises:
            TlsError: TLS failure, ``send timed out after T s``, or stop().
            OSError: a socket error (BrokenPipeError, ConnectionResetError).
            ValueError: closed, unwrapped or pumped stream, no handshake yet.
            RuntimeError: another operation is running.
        """
        cdef double seconds = _check_timeout(timeout)
        cdef const unsigned char[::1] view = memoryview(data).cast("B")
        cdef size_t done = 0
        self._begin(True, True)
        try:
            if view.shape[0]:
                self._run(OP_WRITE, <char *>&view[0], view.shape[0], &done, seconds,
                          "send", False)
        finally:
            self._end()

    def recv_some(self, max_bytes, timeout):
        """Receive and decrypt up to ``max_bytes`` (at most one record, 16 KiB) within ``timeout``.

        Returns ``b""`` once the peer sent close_notify.  Not counted in
        ``bytes_received``.

        Raises:
            TlsError: TLS failure (among them a stream cut without
                close_notify), ``receive timed out after T s``, or stop().
            OSError: a socket error.
            ValueError: ``max_bytes`` < 1, closed, unwrapped or pumped
                stream, no handshake yet.
            RuntimeError: another operation is running.
        """
        cdef Py_ssize_t size = operator.index(max_bytes)
        cdef double seconds
        cdef size_t done = 0
        cdef char *buf
        if size < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes!r}")
        seconds = _check_timeout(timeout)
        size = min(size, _MAX_RECORD_PLAINTEXT)
        self._begin(True, True)
        try:
            buf = <char *>malloc(size)
            if buf == NULL:
                raise MemoryError()
            try:
                if self._run(OP_READ, buf, size, &done, seconds, "receive", False):
                    return b""
                return PyBytes_FromStringAndSize(buf, done)
            finally:
                free(buf)
        finally:
            self._end()

    def unwrap(self, timeout):
        """Send close_notify and wait for the peer's; afterwards ``fd`` carries plaintext.

        Like ``ssl.SSLSocket.unwrap``: both sides call it, then talk in the
        clear over the same fd (an authenticated but unencrypted data
        connection).  The stream reads the peer's records exactly and stops
        at its close_notify, so bytes the peer sends *after* its own unwrap()
        returned stay in the socket for the caller.  What it cannot keep is
        application data that arrives before the peer's close_notify: OpenSSL
        discards it.  The rule for the protocol: after the last TLS message,
        neither side sends anything but close_notify until its own unwrap()
        has returned.

        Raises:
            TlsError: TLS failure, the peer closed without close_notify,
                ``unwrap timed out after T s``, or stop().
            OSError: a socket error.
            ValueError: closed or pumped stream, no handshake yet, already
                unwrapped.
            RuntimeError: another operation is running.
        """
        cdef double seconds = _check_timeout(timeout)
        cdef size_t done = 0
        self._begin(True, True)
        try:
            self._run(OP_SHUTDOWN, NULL, 0, &done, seconds, "unwrap", False)
            self._unwrapped = True
        finally:
            self._end()

    # -- the bulk data ---------------------------------------------------------

    def pump(self, int plain_fd, *, buffer_size=DEFAULT_PUMP_BUFFER):
        """Carry ``plain_fd`` over TLS, both ways at once, until both directions are done.

        Bytes read from ``plain_fd`` are encrypted and sent on the TLS fd;
        bytes decrypted from the TLS fd are written to ``plain_fd``, in one
        poll() loop with the GIL released.  A side whose output is blocked is
        not read (backpressure).  End of file on ``plain_fd`` sends
        close_notify and the loop goes on receiving; the peer's close_notify
        shuts ``plain_fd`` down for writing (SHUT_WR) and the loop goes on
        sending.  Returns when both happened.  After :meth:`stop` it returns
        promptly and normally (``stopped`` is then true); data in flight is
        dropped.  ``plain_fd`` must be a socket (driven with MSG_DONTWAIT, its
        flags untouched) and is not owned.  After pump() the control
        exchange and unwrap() are refused; pump() may be called again after
        an exception from a signal handler and resumes.

        Raises:
            TlsError: TLS failure, e.g. ``peer closed the connection without
                close_notify (truncated)``.
            OSError: the subclass for a socket error on either fd
                (BrokenPipeError, ConnectionResetError, EBADF, ENOTSOCK).
            ValueError: bad ``buffer_size``, ``plain_fd`` is the TLS fd,
                closed or unwrapped stream, no handshake yet.
            RuntimeError: another operation is running.
        """
        cdef Py_ssize_t size = operator.index(buffer_size)
        cdef TlsFailure fail
        cdef TlsStatus st
        if size < 1 or size > _MAX_PUMP_BUFFER:
            raise ValueError(
                f"buffer_size must be between 1 and {_MAX_PUMP_BUFFER}, not {buffer_size!r}"
            )
        if plain_fd == self._fd:
            raise ValueError("plain_fd must not be the TLS fd")
        _check_socket(plain_fd, "plain_fd")
        self._begin(True, False)
        try:
            if self._pump_done or ferry_load_int(&self._stop_requested):
                return
            if not self._pump_started:
                self._p.up_buf = <char *>malloc(size)
                self._p.down_buf = <char *>malloc(size)
                if self._p.up_buf == NULL or self._p.down_buf == NULL:
                    raise MemoryError()
                self._p.size = <size_t>size
                self._p.up_len = self._p.down_off = self._p.down_len = 0
                self._p.up_eof = self._p.close_notify_sent = 0
                self._p.down_eof = self._p.plain_shut = 0
                self._p.down_error = TLS_OK
                self._p.tls_rd_wait = self._p.tls_wr_wait = 0
                self._p.plain_rd_wait = self._p.plain_wr_wait = 0
                # Many records per recv(): safe here, as nothing follows the
                # TLS session on this fd once pump() has started.
                SSL_set_default_read_buffer_len(self._ssl, _READ_AHEAD)
                SSL_set_read_ahead(self._ssl, 1)
                self._pump_started = True
            # A resumed pump may be given another fd number for the same socket.
            self._p.plain_fd = plain_fd
            fail.sys_errno = 0
            fail.ssl_err = 0
            fail.verify_result = 0
            while True:
                with nogil:
                    st = self._pump_loop(&fail)
                if st != TLS_SIGNAL:
                    break
                PyErr_CheckSignals()
            if st == TLS_OK:
                self._pump_done = True
            elif st != TLS_STOPPED:
                self._raise_failure(st, &fail, "pump", 0.0, False)
        finally:
            self._end()

    # -- control ---------------------------------------------------------------

    def stop(self):
        """Make a running (or the next) :meth:`pump` return promptly; thread-safe.

        A running handshake(), send_all(), recv_some() or unwrap() raises
        TlsError instead.  A stopped stream stays stopped: later pump()
        calls return at once.  Does nothing to the fds.
        """
        ferry_store_int(&self._stop_requested, 1)
        if self._stop_fd >= 0:
            # EAGAIN (counter full) cannot matter: the fd is readable already.
            eventfd_write(self._stop_fd, 1)

    def close(self):
        """Free the SSL state and the stop fd; idempotent.  Leaves the fds open.

        Sends nothing (no close_notify: that is unwrap()'s or pump()'s job).
        Called while an operation runs in another thread, it stops it and the
        resources are freed when it returns.
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
    def bytes_sent(self):
        """Plaintext bytes pump() moved from plain_fd into TLS so far; live during pump()."""
        return ferry_load_u64(&self._sent)

    @property
    def bytes_received(self):
        """Plaintext bytes pump() moved from TLS to plain_fd so far; live during pump()."""
        return ferry_load_u64(&self._received)

    @property
    def stopped(self):
        """True when stop() was called before pump() finished both directions."""
        return bool(ferry_load_int(&self._stop_requested)) and not self._pump_done

    @property
    def fd(self):
        """The TLS socket fd (not owned)."""
        return self._fd

    @property
    def peer_name(self):
        """The name or address the server must match (client side), else None."""
        return self._peer_name

    @property
    def cipher(self):
        """The negotiated cipher suite (``TLS_AES_256_GCM_SHA384``); None before the handshake."""
        cdef const SSL_CIPHER *suite
        if not self._handshake_done or self._ssl == NULL:
            return None
        suite = SSL_get_current_cipher(self._ssl)
        if suite == NULL:
            return None
        return SSL_CIPHER_get_name(suite).decode("ascii")

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
        elif self._unwrapped:
            state = "unwrapped"
        elif self._handshake_done:
            state = "established"
        else:
            state = "new"
        side = "server" if self._endpoint._server else f"client peer_name={self._peer_name!r}"
        return (
            f"<TlsStream fd={self._fd} {side} bytes_sent={self.bytes_sent} "
            f"bytes_received={self.bytes_received} {state}>"
        )
