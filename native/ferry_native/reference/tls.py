"""TLS 1.3 stream over a connected socket, in pure Python (reference backend).

Same API and behaviour as the compiled ``ferry_native._tls``, which is what
the agents run; this one exists so that the test suite can run the same
tests against both (and against each other: a native client with a
reference server and the other way round) and so that the behaviour is
readable in one page.

Built on :class:`ssl.SSLObject` with two :class:`ssl.MemoryBIO` s: OpenSSL
never touches the fd, this module moves the ciphertext itself with
``recv``/``send`` and ``MSG_DONTWAIT`` (so the fd's own O_NONBLOCK flag,
which other users share, is never changed, and :meth:`TlsStream.stop` is
prompt even when the peer stops reading) and ``MSG_NOSIGNAL`` (a closed peer
gives EPIPE, not SIGPIPE).  Outside :meth:`TlsStream.pump` the ciphertext is
read one TLS record at a time and never past the end of the record OpenSSL
is working on, so :meth:`TlsStream.unwrap` leaves whatever the peer sent
after its close_notify in the socket (see unwrap for the rule this relies on).

Unlike the native stream this one holds the GIL between system calls and
encrypts with the GIL held inside ``ssl``, so it slows other Python threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import operator
import os
import select
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["TlsEndpoint", "TlsError", "TlsStream"]

_T = TypeVar("_T")
StrPath = str | os.PathLike[str]

DEFAULT_PUMP_BUFFER = 256 * 1024
# A bigger buffer gains nothing (records are 16 KiB) and only costs memory.
_MAX_PUMP_BUFFER = 1 << 30
# The largest plaintext of one TLS record: recv_some never gets more at once.
_MAX_RECORD_PLAINTEXT = 16 * 1024
_RECORD_HEADER = 5
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
# How a peer that went away shows up in the middle of a handshake.
_PEER_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = (62, 64)


class TlsError(ConnectionError):
    """A TLS failure: the message says what failed.

    For example ``certificate verify failed: unable to get local issuer
    certificate``, ``peer did not present a certificate``, ``certificate does
    not match 10.0.0.2``, ``peer sent a TLS alert: tlsv1 alert unknown ca``,
    ``peer closed the connection during the TLS handshake``, ``peer closed the
    connection without close_notify (truncated)``, ``handshake timed out after
    5.0 s``.  A ConnectionError (so an OSError) with no errno.
    """


class _Stopped(Exception):
    """Internal: stop() was observed."""


class _ZeroReturn(Exception):
    """Internal: the peer's close_notify arrived."""


def _tls_message(
    reason: str,
    *,
    handshake: bool,
    peer_name: str | None,
    verify_code: int = 0,
    verify_message: str = "",
) -> str:
    """Turn OpenSSL's failure reason into the message of a :class:`TlsError`.

    ``reason`` is OpenSSL's reason string (``"certificate verify failed"``);
    ``verify_code``/``verify_message`` the X.509 verification result when the
    reason is a failed verification.  The native module applies the same
    rules to what OpenSSL's error queue says.
    """
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


def _reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason string of ``exc``, e.g. ``certificate verify failed``.

    ``ssl`` gives the reason as its C macro name; OpenSSL's own strings are
    that name in lower case with spaces, which is what the native backend
    reads with ERR_reason_error_string().
    """
    if exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return str(exc.strerror or exc)


def _tls_error(exc: ssl.SSLError, *, handshake: bool, peer_name: str | None) -> TlsError:
    """The :class:`TlsError` for an ``ssl`` failure."""
    if handshake and isinstance(exc, ssl.SSLZeroReturnError):
        return TlsError("peer closed the connection during the TLS handshake")
    code = 0
    message = ""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        message = exc.verify_message
    return TlsError(
        _tls_message(
            _reason(exc),
            handshake=handshake,
            peer_name=peer_name,
            verify_code=code,
            verify_message=message,
        )
    )


def _check_file(path: str, what: str) -> None:
    """Raise the OSError subclass for ``path`` unless it is a readable file, naming its role.

    ``ssl`` reports a missing file without saying which of the three it was,
    and OpenSSL reports a directory as a PEM error; checking first tells the
    operator *which* setting is wrong.
    """
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise type(exc)(
            exc.errno, f"cannot read the TLS {what} file ({exc.strerror})", path
        ) from None


def _is_socket(fd: int) -> bool:
    """Whether ``fd`` is a socket.

    Raises:
        OSError: EBADF when ``fd`` is not open.
    """
    return stat.S_ISSOCK(os.fstat(fd).st_mode)


def _check_socket(fd: int, what: str) -> None:
    """Raise OSError(ENOTSOCK) unless ``fd`` is a socket (EBADF when not open)."""
    if not _is_socket(fd):
        raise OSError(errno.ENOTSOCK, f"{what} is not a socket ({os.strerror(errno.ENOTSOCK)})")


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


def _check_timeout(timeout: float) -> float:
    """``timeout`` as a float; ValueError unless finite and not negative."""
    value = float(timeout)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    return value


class TlsEndpoint:
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

    def __init__(
        self, *, server: bool, ca_file: StrPath, cert_file: StrPath, key_file: StrPath
    ) -> None:
        ca, cert, key = os.fspath(ca_file), os.fspath(cert_file), os.fspath(key_file)
        _check_file(ca, "CA certificate")
        _check_file(cert, "certificate")
        _check_file(key, "private key")
        self._server = bool(server)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self._server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # Server: VERIFY_PEER | FAIL_IF_NO_PEER_CERT.  Client: VERIFY_PEER.
        ctx.verify_mode = ssl.CERT_REQUIRED
        # A stream cut without close_notify must be an error, never an EOF.
        ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
        if self._server:
            ctx.num_tickets = 0
        else:
            ctx.check_hostname = True
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValueError(
                f"TLS CA certificate file {ca} holds no usable certificate ({_reason(exc)})"
            ) from None
        # load_cert_chain does not say which of its two files it failed on:
        # parse the certificates alone first.
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            probe.load_verify_locations(cafile=cert)
        except ssl.SSLError as exc:
            raise ValueError(
                f"TLS certificate file {cert} holds no usable certificate ({_reason(exc)})"
            ) from None
        try:
            ctx.load_cert_chain(certfile=cert, keyfile=key)
        except ssl.SSLError as exc:
            if exc.reason in ("KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH"):
                raise ValueError(
                    f"TLS private key file {key} does not belong to certificate file {cert}"
                ) from None
            raise ValueError(
                f"TLS private key file {key} holds no usable private key ({_reason(exc)})"
            ) from None
        self._context = ctx

    @property
    def server(self) -> bool:
        """True for the accepting side, False for the dialling side."""
        return self._server

    def __repr__(self) -> str:
        return f"<TlsEndpoint {'server' if self._server else 'client'}>"


class _Pump:
    """The state of :meth:`TlsStream.pump`, kept across a signal round trip."""

    def __init__(self, size: int) -> None:
        self.size = size
        # plain -> TLS: plaintext read from the plain fd goes straight into
        # the SSL object; ``out`` is the ciphertext not yet sent.
        self.up = bytearray(size)
        self.up_eof = False
        self.close_notify_sent = False
        self.out = b""
        self.out_off = 0
        # TLS -> plain: ciphertext read from the TLS fd, the plaintext
        # decrypted from it not yet written (down[down_off:down_off+down_len]).
        self.cin = bytearray(size)
        self.down = bytearray(size)
        self.down_off = 0
        self.down_len = 0
        self.down_eof = False
        self.plain_shut = False
        # A failure of SSL_read after some records were decrypted: raised
        # once those bytes are written (a truncated stream delivers its data).
        self.down_error: TlsError | None = None
        # OpenSSL asked for more ciphertext (SSLWantReadError, BIO drained).
        self.needs_data = False
        # Waiting for poll(): plain readable / writable, TLS readable / writable.
        self.plain_rd_wait = False
        self.plain_wr_wait = False
        self.tls_rd_wait = False
        self.tls_wr_wait = False

    @property
    def done(self) -> bool:
        """Both directions finished: close_notify sent and received, plain fd shut."""
        return (
            self.up_eof
            and self.close_notify_sent
            and self.out_off == len(self.out)
            and self.down_eof
            and self.down_len == 0
            and self.plain_shut
        )


class TlsStream:
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

    def __init__(self, endpoint: TlsEndpoint, fd: int, *, peer_name: str | None = None) -> None:
        # Set first: __del__ runs even when __init__ raises.
        self._stop_fd = -1
        if not isinstance(endpoint, TlsEndpoint):
            raise TypeError(f"endpoint must be a TlsEndpoint, not {type(endpoint).__name__}")
        fd = operator.index(fd)
        _check_socket(fd, "the TLS fd")
        if endpoint.server:
            if peer_name is not None:
                raise ValueError("peer_name is for the client side; a server stream takes none")
        elif not peer_name:
            raise ValueError("a client stream needs peer_name: the server's IP address or DNS name")
        self._endpoint = endpoint
        self._fd = fd
        self._peer_name = peer_name
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = endpoint._context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=endpoint.server,
            server_hostname=peer_name,
        )
        # Where the record being read stands: header bytes so far, body left.
        self._header = bytearray()
        self._body_left = 0
        self._handshake_done = False
        self._unwrapped = False
        self._pump: _Pump | None = None
        self._pump_done = False
        self._sent = 0
        self._received = 0
        self._stop_requested = False
        self._running = False
        self._closed = False
        # Guards the state that the operations, stop() and close() share; the
        # native stream gets the same from the GIL.
        self._lock = threading.Lock()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def __del__(self) -> None:
        self._release()

    def _release(self) -> None:
        """Close the stop fd and drop the SSL object and the buffers."""
        if self._stop_fd >= 0:
            os.close(self._stop_fd)
            self._stop_fd = -1
        self._pump = None

    # -- one operation at a time ---------------------------------------------

    @contextlib.contextmanager
    def _operation(self, *, handshake_done: bool = True) -> Iterator[socket.socket]:
        """Run one operation: refuse a closed, busy, pumped or unwrapped stream.

        Yields a socket object on the TLS fd, detached afterwards.

        Raises:
            ValueError: closed, handshake (not) done as required, unwrapped,
                or pumped.
            RuntimeError: another operation is running.
        """
        with self._lock:
            if self._closed:
                raise ValueError("I/O operation on closed TLS stream")
            if self._running:
                raise RuntimeError("TLS stream is busy with another operation")
            if handshake_done and not self._handshake_done:
                raise ValueError("the TLS handshake has not been done")
            if self._unwrapped:
                raise ValueError("the TLS stream was unwrapped")
            self._running = True
        sock = _wrap_socket(self._fd)
        try:
            yield sock
        finally:
            sock.detach()
            with self._lock:
                self._running = False
                if self._closed:
                    # close() was called while running: finish it now.
                    self._release()

    def _wait(
        self, events: list[tuple[int, int]], deadline: float, what: str, timeout: float
    ) -> None:
        """Block until one of ``events`` (fd, mask) is ready, stop() or the deadline.

        POLLHUP and POLLERR count as ready: the next call reports them.

        Raises:
            _Stopped: stop() was called.
            TlsError: the deadline passed.
            OSError: EBADF when an fd is not open.
        """
        poller = select.poll()
        for fd, mask in events:
            poller.register(fd, mask)
        poller.register(self._stop_fd, select.POLLIN)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TlsError(f"{what} timed out after {timeout!r} s")
        ready = poller.poll(math.ceil(left * 1000))
        if not ready:
            raise TlsError(f"{what} timed out after {timeout!r} s")
        for fd, revents in ready:
            if fd == self._stop_fd:
                raise _Stopped
            if revents & select.POLLNVAL:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    def _track(self, data: bytes) -> None:
        """Follow the record boundaries through ``data`` (header, then body)."""
        view = memoryview(data)
        while view:
            if self._body_left:
                k = min(self._body_left, len(view))
                self._body_left -= k
            else:
                k = min(_RECORD_HEADER - len(self._header), len(view))
                self._header += view[:k]
                if len(self._header) == _RECORD_HEADER:
                    self._body_left = int.from_bytes(self._header[3:5], "big")
                    self._header.clear()
            view = view[k:]

    def _fill(self, sock: socket.socket, deadline: float, what: str, timeout: float) -> None:
        """Feed OpenSSL the next bytes of the peer's current record, waiting for them.

        Never reads past the end of that record (see unwrap()).  End of file
        is passed on as such: OpenSSL then reports a truncated stream.
        """
        while True:
            if self._stop_requested:
                raise _Stopped
            want = self._body_left or (_RECORD_HEADER - len(self._header))
            try:
                data = sock.recv(want, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._wait([(self._fd, select.POLLIN)], deadline, what, timeout)
                continue
            if not data:
                self._incoming.write_eof()
            else:
                self._track(data)
                self._incoming.write(data)
            return

    def _flush(self, sock: socket.socket, deadline: float, what: str, timeout: float) -> None:
        """Send all the ciphertext OpenSSL produced, waiting for room."""
        data = memoryview(self._outgoing.read())
        while data:
            if self._stop_requested:
                raise _Stopped
            try:
                data = data[sock.send(data, _SEND_FLAGS) :]
            except BlockingIOError:
                self._wait([(self._fd, select.POLLOUT)], deadline, what, timeout)

    def _flush_quietly(self, sock: socket.socket) -> None:
        """Send what OpenSSL produced (an alert after a failure) if it fits; never wait."""
        with contextlib.suppress(OSError):
            sock.send(self._outgoing.read(), _SEND_FLAGS)

    def _drive(
        self,
        sock: socket.socket,
        op: Callable[[], _T],
        what: str,
        timeout: float,
        *,
        handshake: bool = False,
    ) -> _T:
        """Call the SSL operation ``op`` until it completes, moving ciphertext as it asks.

        Raises:
            _ZeroReturn: the peer's close_notify arrived (not in a handshake).
            TlsError: TLS failure, timeout, stop(); in a handshake also a peer
                that closed or reset the connection.
            OSError: a socket error.
        """
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._stop_requested:
                    raise _Stopped
                try:
                    result = op()
                except ssl.SSLWantReadError:
                    self._flush(sock, deadline, what, timeout)
                    self._fill(sock, deadline, what, timeout)
                    continue
                except ssl.SSLZeroReturnError as exc:
                    if handshake:
                        raise _tls_error(exc, handshake=True, peer_name=self._peer_name) from None
                    raise _ZeroReturn from None
                except ssl.SSLError as exc:
                    self._flush_quietly(sock)
                    raise _tls_error(
                        exc, handshake=handshake, peer_name=self._peer_name
                    ) from None
                self._flush(sock, deadline, what, timeout)
                return result
        except _Stopped:
            raise TlsError(f"{what} interrupted by stop()") from None
        except OSError as exc:
            if handshake and exc.errno in _PEER_GONE:
                raise TlsError(
                    f"peer closed the connection during the TLS handshake ({exc.strerror})"
                ) from None
            raise

    # -- the control exchange ------------------------------------------------

    def handshake(self, timeout: float) -> None:
        """Do the TLS handshake within ``timeout`` seconds; nothing if done already.

        The client verifies the server's chain and name; the server requires
        and verifies the client's certificate.  In TLS 1.3 the client's
        handshake completes before the server has checked the client
        certificate: a refusal by the server reaches the client as a TlsError
        from its first recv_some() or pump().  Waits in poll() on the fd;
        :meth:`stop` interrupts it.

        Raises:
            TlsError: verification failed, the peer refused or closed the
                connection, ``handshake timed out after T s``, or stop().
            OSError: a socket error other than the peer going away.
            ValueError: closed or unwrapped stream, bad timeout.
            RuntimeError: another operation is running.
        """
        seconds = _check_timeout(timeout)
        if self._handshake_done:
            return
        with self._operation(handshake_done=False) as sock:
            self._drive(sock, self._ssl.do_handshake, "handshake", seconds, handshake=True)
            self._handshake_done = True

    def peer_certificate(self) -> bytes:
        """Return the DER encoding of the peer's verified certificate.

        Raises:
            ValueError: the handshake has not been done, or the stream is closed.
        """
        if not self._handshake_done:
            raise ValueError("the TLS handshake has not been done")
        if self._closed:
            raise ValueError("I/O operation on closed TLS stream")
        der = self._ssl.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - both sides require a certificate
            raise TlsError("peer did not present a certificate")
        return der

    def _not_pumped(self) -> None:
        """Refuse the control exchange once pump() has started."""
        if self._pump is not None:
            raise ValueError("the TLS stream is being pumped")

    def send_all(self, data: bytes, timeout: float) -> None:
        """Encrypt and send all of ``data`` within ``timeout`` seconds.

        For a small control exchange before the bulk data (which goes through
        :meth:`pump`).  Not counted in ``bytes_sent``.

        Raises:
            TlsError: TLS failure, ``send timed out after T s``, or stop().
            OSError: a socket error (BrokenPipeError, ConnectionResetError).
            ValueError: closed, unwrapped or pumped stream, no handshake yet.
            RuntimeError: another operation is running.
        """
        seconds = _check_timeout(timeout)
        view = memoryview(data).cast("B")
        with self._operation() as sock:
            self._not_pumped()
            if view:
                self._drive(sock, lambda: self._ssl.write(view), "send", seconds)

    def recv_some(self, max_bytes: int, timeout: float) -> bytes:
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
        size = operator.index(max_bytes)
        if size < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes!r}")
        seconds = _check_timeout(timeout)
        with self._operation() as sock:
            self._not_pumped()
            try:
                want = min(size, _MAX_RECORD_PLAINTEXT)
                return self._drive(sock, lambda: self._ssl.read(want), "receive", seconds)
            except _ZeroReturn:
                return b""

    def unwrap(self, timeout: float) -> None:
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
        seconds = _check_timeout(timeout)
        with self._operation() as sock:
            self._not_pumped()
            with contextlib.suppress(_ZeroReturn):
                self._drive(sock, self._ssl.unwrap, "unwrap", seconds)
            self._unwrapped = True

    # -- the bulk data -------------------------------------------------------

    def pump(self, plain_fd: int, *, buffer_size: int = DEFAULT_PUMP_BUFFER) -> None:
        """Carry ``plain_fd`` over TLS, both ways at once, until both directions are done.

        Bytes read from ``plain_fd`` are encrypted and sent on the TLS fd;
        bytes decrypted from the TLS fd are written to ``plain_fd``, in one
        poll() loop.  A side whose output is blocked is not read
        (backpressure).  End of file on ``plain_fd`` sends close_notify and
        the loop goes on receiving; the peer's close_notify shuts
        ``plain_fd`` down for writing (SHUT_WR) and the loop goes on
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
        size = operator.index(buffer_size)
        if size < 1 or size > _MAX_PUMP_BUFFER:
            raise ValueError(
                f"buffer_size must be between 1 and {_MAX_PUMP_BUFFER}, not {buffer_size!r}"
            )
        plain_fd = operator.index(plain_fd)
        if plain_fd == self._fd:
            raise ValueError("plain_fd must not be the TLS fd")
        _check_socket(plain_fd, "plain_fd")
        with self._operation() as tls:
            if self._pump_done or self._stop_requested:
                return
            if self._pump is None:
                self._pump = _Pump(size)
            plain = _wrap_socket(plain_fd)
            try:
                self._pump_loop(tls, plain, self._pump)
            except _Stopped:
                return
            finally:
                plain.detach()
            self._pump_done = True

    def _read_into(self, view: memoryview) -> int:
        """Decrypt into ``view``; return the byte count (0 at close_notify, see the caller).

        typeshed types ``SSLObject.read`` as returning bytes; with a buffer it
        returns the count.
        """
        count: Any = self._ssl.read(len(view), view)
        return int(count)

    def _queue_out(self, p: _Pump) -> None:
        """Move what OpenSSL produced onto the ciphertext waiting for the TLS fd."""
        data = self._outgoing.read()
        if data:
            p.out = bytes(memoryview(p.out)[p.out_off :]) + data if p.out_off < len(p.out) else data
            p.out_off = 0

    def _pump_failed(self, tls: socket.socket, exc: ssl.SSLError) -> TlsError:
        """Send the alert OpenSSL made (if it fits) and return the error to raise."""
        self._flush_quietly(tls)
        return _tls_error(exc, handshake=False, peer_name=self._peer_name)

    def _pump_loop(self, tls: socket.socket, plain: socket.socket, p: _Pump) -> None:
        """The copy loop: try every step that may progress, poll() when none did.

        Raises:
            _Stopped: stop() was called.
            TlsError, OSError: as pump().
        """
        size = p.size
        down = memoryview(p.down)
        cin = memoryview(p.cin)
        up = memoryview(p.up)
        while True:
            if self._stop_requested:
                raise _Stopped
            progress = False
            # TLS -> plain: decrypt what OpenSSL has, up to a full buffer.
            if p.down_error is not None and p.down_len == 0:
                raise p.down_error
            if not p.down_eof and p.down_len == 0 and not p.needs_data:
                got = 0
                # A record is decrypted whole into the buffer, unless the
                # buffer is smaller than a record (see close_notify below).
                while got == 0 or size - got >= _MAX_RECORD_PLAINTEXT:
                    try:
                        n = self._read_into(down[got:])
                    except ssl.SSLWantReadError:
                        p.needs_data = True
                        break
                    except ssl.SSLZeroReturnError:
                        p.down_eof = True
                        break
                    except ssl.SSLError as exc:
                        error = self._pump_failed(tls, exc)
                        if got == 0:
                            raise error from None
                        p.down_error = error
                        break
                    if n == 0:
                        # ssl returns 0 for close_notify unless ours was
                        # sent already (then SSLZeroReturnError).
                        p.down_eof = True
                        break
                    got += n
                p.down_off, p.down_len = 0, got
                # Reading may have produced records to send (KeyUpdate).
                self._queue_out(p)
                progress = progress or got > 0 or p.down_eof
            if p.needs_data and not p.tls_rd_wait:
                try:
                    n = tls.recv_into(cin, size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    p.tls_rd_wait = True
                else:
                    if n == 0:
                        self._incoming.write_eof()
                    else:
                        self._incoming.write(cin[:n])
                    p.needs_data = False
                    progress = True
            if p.down_len and not p.plain_wr_wait:
                try:
                    n = plain.send(down[p.down_off : p.down_off + p.down_len], _SEND_FLAGS)
                except BlockingIOError:
                    p.plain_wr_wait = True
                else:
                    p.down_off += n
                    p.down_len -= n
                    self._received += n
                    progress = True
            if p.down_eof and not p.down_len and not p.plain_shut:
                try:
                    plain.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    # The reader is gone already: nothing is left to signal.
                    if exc.errno != errno.ENOTCONN:
                        raise
                p.plain_shut = True
                progress = True
            # plain -> TLS: read only when the previous ciphertext is out.
            if not p.up_eof and p.out_off == len(p.out) and not p.plain_rd_wait:
                try:
                    n = plain.recv_into(up, size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    p.plain_rd_wait = True
                else:
                    if n == 0:
                        p.up_eof = True
                    else:
                        try:
                            self._ssl.write(up[:n])
                        except ssl.SSLError as exc:
                            raise self._pump_failed(tls, exc) from None
                        self._sent += n
                        self._queue_out(p)
                    progress = True
            # close_notify: SSLObject only offers unwrap(), whose second
            # SSL_shutdown() reads on and drops application data.  So it gets
            # an empty incoming BIO (the unread ciphertext is taken out and
            # put back) and is not called while OpenSSL holds decrypted bytes
            # (only possible with a buffer_size under one record).
            if p.up_eof and not p.close_notify_sent and (p.down_eof or not self._ssl.pending()):
                unread = self._incoming.read()
                try:
                    self._ssl.unwrap()
                except ssl.SSLWantReadError:
                    pass  # sent; the peer's close_notify is read by the loop
                except ssl.SSLError as exc:
                    raise self._pump_failed(tls, exc) from None
                finally:
                    if unread:
                        self._incoming.write(unread)
                p.close_notify_sent = True
                self._queue_out(p)
                progress = True
            if p.out_off < len(p.out) and not p.tls_wr_wait:
                try:
                    p.out_off += tls.send(memoryview(p.out)[p.out_off :], _SEND_FLAGS)
                except BlockingIOError:
                    p.tls_wr_wait = True
                else:
                    progress = True
            if p.done:
                return
            if not progress:
                self._pump_wait(p, plain.fileno())

    def _pump_wait(self, p: _Pump, plain_fd: int) -> None:
        """poll() for what the blocked steps wait on, and stop(); clear what became ready."""
        poller = select.poll()
        plain_events = (select.POLLIN if p.plain_rd_wait else 0) | (
            select.POLLOUT if p.plain_wr_wait else 0
        )
        tls_events = (select.POLLIN if p.tls_rd_wait else 0) | (
            select.POLLOUT if p.tls_wr_wait else 0
        )
        if not plain_events and not tls_events:  # pragma: no cover - a bug, not a state
            raise RuntimeError("TLS pump has nothing to wait for")
        # An fd registered with no events would still report POLLHUP at once.
        if plain_events:
            poller.register(plain_fd, plain_events)
        if tls_events:
            poller.register(self._fd, tls_events)
        poller.register(self._stop_fd, select.POLLIN)
        for fd, revents in poller.poll():
            if fd == self._stop_fd:
                raise _Stopped
            if revents & select.POLLNVAL:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            # Whatever is reported (POLLHUP/POLLERR too), retry that fd's steps.
            if fd == plain_fd:
                p.plain_rd_wait = p.plain_wr_wait = False
            else:
                p.tls_rd_wait = p.tls_wr_wait = False

    # -- control -------------------------------------------------------------

    def stop(self) -> None:
        """Make a running (or the next) :meth:`pump` return promptly; thread-safe.

        A running handshake(), send_all(), recv_some() or unwrap() raises
        TlsError instead.  A stopped stream stays stopped: later pump()
        calls return at once.  Does nothing to the fds.
        """
        with self._lock:
            self._stop_requested = True
            if self._stop_fd >= 0:
                # BlockingIOError (counter full): the fd is readable already.
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(self._stop_fd, 1)

    def close(self) -> None:
        """Free the SSL state and the stop fd; idempotent.  Leaves the fds open.

        Sends nothing (no close_notify: that is unwrap()'s or pump()'s job).
        Called while an operation runs in another thread, it stops it and the
        resources are freed when it returns.
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
    def bytes_sent(self) -> int:
        """Plaintext bytes pump() moved from plain_fd into TLS so far; live during pump()."""
        return self._sent

    @property
    def bytes_received(self) -> int:
        """Plaintext bytes pump() moved from TLS to plain_fd so far; live during pump()."""
        return self._received

    @property
    def stopped(self) -> bool:
        """True when stop() was called before pump() finished both directions."""
        return self._stop_requested and not self._pump_done

    @property
    def fd(self) -> int:
        """The TLS socket fd (not owned)."""
        return self._fd

    @property
    def peer_name(self) -> str | None:
        """The name or address the server must match (client side), else None."""
        return self._peer_name

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite (``TLS_AES_256_GCM_SHA384``); None before the handshake."""
        if not self._handshake_done:
            return None
        suite = self._ssl.cipher()
        return None if suite is None else suite[0]

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
        elif self._unwrapped:
            state = "unwrapped"
        elif self._handshake_done:
            state = "established"
        else:
            state = "new"
        side = "server" if self._endpoint.server else f"client peer_name={self._peer_name!r}"
        return (
            f"<TlsStream fd={self._fd} {side} bytes_sent={self._sent} "
            f"bytes_received={self._received} {state}>"
        )

