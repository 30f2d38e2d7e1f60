"""A sans-I/O connection: the handshake and frame flow of one peer link, h11 style.

The caller owns the socket. It hands received bytes to
:meth:`Connection.receive_data` (and the end of the stream to
:meth:`Connection.receive_eof`), pulls messages with
:meth:`Connection.next_event` until it returns None, and writes whatever
:meth:`Connection.start`, :meth:`Connection.send` and
:meth:`Connection.data_to_send` return::

    conn = Connection(hello, initiator=True)
    sock.sendall(conn.start())
    while conn.state is ConnectionState.HANDSHAKE:
        conn.receive_data(sock.recv(65536))
        while (event := conn.next_event()) is not None:
            ...

States::

    HANDSHAKE ──hello/welcome──▶ OPEN ──peer EOF──▶ CLOSED
        │ └──tunnel {token}──▶ TUNNEL ──peer EOF──▶ CLOSED
        └── any ProtocolError (from any state) ──▶ ERROR

A responder (``initiator=False``) answers a ``hello`` by itself: on success
the ``welcome`` frame is queued for :meth:`Connection.data_to_send`, on a
negotiation failure an error reply is queued instead so the peer learns why,
and the error is raised. Every protocol error found in received data is
answered the same way, then the connection is in ERROR and re-raises it.
"""

from __future__ import annotations

import enum

from ferry.errors import FerryError, ProtocolError

from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from .messages import ErrorReply, Hello, Message, Tunnel, Welcome, parse_message
from .negotiation import Negotiated, negotiate

__all__ = ["Connection", "ConnectionState"]


class ConnectionState(enum.Enum):
    """Where a :class:`Connection` is in its life."""

    HANDSHAKE = "handshake"
    OPEN = "open"
    TUNNEL = "tunnel"
    CLOSED = "closed"
    ERROR = "error"


class Connection:
    """One end of a Ferry connection, without I/O.

    ``local`` is this side's greeting; a responder answers with a
    :class:`~ferry.protocol.messages.Welcome` carrying the same fields.
    """

    def __init__(
        self, local: Hello, *, initiator: bool, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        if not isinstance(local, Hello):
            raise TypeError("local must be a Hello")
        self.local = local
        self.initiator = initiator
        self.max_frame = max_frame
        self._decoder = FrameDecoder(max_frame)
        self._outgoing = bytearray()
        self._raw = bytearray()
        self._negotiated: Negotiated | None = None
        self._started = False
        self._tunnel = False
        self._eof = False
        self._error: ProtocolError | None = None
        self._last_id = 0

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        if self._error is not None:
            return ConnectionState.ERROR
        if self._eof and (self._tunnel or self._decoder.buffered == 0):
            return ConnectionState.CLOSED
        if self._tunnel:
            return ConnectionState.TUNNEL
        if self._negotiated is not None:
            return ConnectionState.OPEN
        return ConnectionState.HANDSHAKE

    @property
    def partial_frame(self) -> int:
        """Bytes of a frame that has started but is not complete yet (0: none).

        Once :meth:`next_event` returned None, anything still buffered is
        the start of a frame: the transport uses this for its frame read
        deadline.
        """
        return self._decoder.buffered

    @property
    def negotiated(self) -> Negotiated | None:
        """The handshake's result once it completed, else None."""
        return self._negotiated

    @property
    def error(self) -> ProtocolError | None:
        """The error that put the connection in ERROR, or None."""
        return self._error

    def next_request_id(self) -> int:
        """Return a fresh request id for this connection (1, 2, 3, ...)."""
        self._last_id += 1
        return self._last_id

    # -- outgoing ------------------------------------------------------------

    def start(self) -> bytes:
        """Return the ``hello`` frame that opens the connection (initiator only, once).

        Raises :class:`~ferry.errors.ProtocolError` on a responder, or if the
        connection was already started.
        """
        self._check_can_start()
        self._started = True
        return encode_frame(self.local.to_wire(), max_frame=self.max_frame)

    def start_tunnel(self, token: str) -> bytes:
        """Return a ``tunnel {token}`` frame instead of a hello; the connection enters TUNNEL.

        After it, the stream carries raw bytes both ways: received bytes are
        available from :meth:`take_buffered`. Raises
        :class:`~ferry.errors.ProtocolError` on a responder or if already
        started, :class:`~ferry.errors.MessageInvalid` for a bad token.
        """
        frame = Tunnel(token)
        self._check_can_start()
        self._started = True
        self._tunnel = True
        return encode_frame(frame.to_wire(), max_frame=self.max_frame)

    def _check_can_start(self) -> None:
        if not self.initiator:
            raise ProtocolError("only the initiator of a connection sends the first frame")
        if self._started:
            raise ProtocolError("the connection was already started")

    def send(self, msg: Message) -> bytes:
        """Return the bytes to write for ``msg``, preceded by anything queued.

        Queued bytes (a responder's ``welcome``) come first so that the
        caller can never write a reply ahead of the handshake. Sending a
        :class:`~ferry.protocol.messages.Tunnel` is :meth:`start_tunnel`.
        Raises :class:`~ferry.errors.ProtocolError` for a hello/welcome (the
        connection sends those), for anything but an error reply before the
        handshake completed, on a tunnel or failed connection; and
        :class:`~ferry.errors.FrameTooLarge` if the frame exceeds
        ``max_frame`` (the connection stays usable).
        """
        if isinstance(msg, Tunnel):
            return self.start_tunnel(msg.token)
        if self._error is not None:
            raise ProtocolError(f"cannot send on a failed connection ({self._error.code})")
        if self._tunnel:
            raise ProtocolError("cannot send frames on a tunnel connection")
        if isinstance(msg, Hello | Welcome):
            raise ProtocolError(
                f"the connection sends {msg.TYPE!r} itself (start() / data_to_send())"
            )
        if self._negotiated is None and not isinstance(msg, ErrorReply):
            raise ProtocolError(f"cannot send {msg.TYPE!r} before the handshake completes")
        frame = encode_frame(msg.to_wire(), max_frame=self.max_frame)
        return self.data_to_send() + frame

    def data_to_send(self) -> bytes:
        """Return and clear the bytes the connection queued by itself (welcome, error reply)."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    # -- incoming ------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Hand over bytes read from the peer; pull messages with :meth:`next_event`.

        On a tunnel connection the bytes are kept for :meth:`take_buffered`.
        Raises :class:`~ferry.errors.FrameTooLarge` as soon as a frame header
        announces more than ``max_frame`` (the body is never buffered), the
        stored error of a failed connection, and
        :class:`~ferry.errors.ProtocolError` for data after the end of stream.
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise self._fail(ProtocolError("data received after end of stream"), notify=False)
        if self._tunnel:
            self._raw += data
            return
        try:
            self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def receive_eof(self) -> None:
        """Record that the peer closed its side of the stream.

        Raises :class:`~ferry.errors.FrameTruncated` if the stream ended
        inside a frame (once any complete frames before it were pulled), and
        the stored error of a failed connection.
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            return
        self._eof = True
        if self._tunnel:
            return
        try:
            self._decoder.eof()
        except ProtocolError as exc:
            # The peer is gone: there is nobody to tell.
            self._fail(exc, notify=False)
            raise

    def next_event(self) -> Message | None:
        """Return the next received message, or None until more data arrives.

        Handles the handshake itself (the peer's hello/welcome is still
        returned, after negotiation). Raises a
        :class:`~ferry.errors.ProtocolError` subclass, after which the
        connection is in ERROR: framing errors, an invalid message or unknown
        message type (:class:`~ferry.errors.MessageInvalid`), a message out of
        place for the handshake, :class:`~ferry.errors.VersionMismatch` or
        :class:`~ferry.errors.FeatureMissing` from negotiation, or the peer's
        own refusal of the handshake (its error reply, re-raised).
        """
        if self._error is not None:
            raise self._error
        if self._tunnel:
            return None
        try:
            frame = self._decoder.next_frame()
            if frame is None:
                return None
            return self._handle(parse_message(frame))
        except ProtocolError as exc:
            if self._error is None:
                self._fail(exc, notify=not self._eof)
            raise

    def take_buffered(self) -> bytes:
        """Return and clear the raw bytes received on a tunnel connection so far.

        For a responder these start with whatever followed the ``tunnel``
        frame in the same read. Raises :class:`~ferry.errors.ProtocolError` if
        the connection is not a tunnel.
        """
        if not self._tunnel:
            raise ProtocolError("take_buffered() is only for tunnel connections")
        data = bytes(self._raw)
        self._raw.clear()
        return data

    # -- internals -------------------------------------------------------------

    def _handle(self, msg: Message) -> Message:
        if self._negotiated is not None:
            if isinstance(msg, Hello | Welcome | Tunnel):
                raise ProtocolError(f"unexpected {msg.TYPE!r} after the handshake")
            return msg
        if self.initiator:
            if not self._started:
                raise ProtocolError(f"received {msg.TYPE!r} before sending hello")
            if isinstance(msg, Welcome):
                self._negotiated = negotiate(self.local, msg)
                return msg
            if isinstance(msg, ErrorReply):
                raise self._peer_refused(msg.error)
            raise ProtocolError(f"expected 'welcome' during the handshake, got {msg.TYPE!r}")
        if isinstance(msg, Hello):
            self._negotiated = negotiate(self.local, msg)
            welcome = Welcome(
                version=self.local.version,
                host_uuid=self.local.host_uuid,
                hostname=self.local.hostname,
                role=self.local.role,
                features=self.local.features,
                mandatory=self.local.mandatory,
            )
            self._outgoing += encode_frame(welcome.to_wire(), max_frame=self.max_frame)
            return msg
        if isinstance(msg, Tunnel):
            self._tunnel = True
            self._raw += self._decoder.take_buffered()
            return msg
        raise ProtocolError(f"expected 'hello' or 'tunnel' during the handshake, got {msg.TYPE!r}")

    def _peer_refused(self, error: FerryError) -> ProtocolError:
        """Turn the peer's refusal of the handshake into the error to raise, unanswered."""
        if isinstance(error, ProtocolError):
            refusal = error
        else:
            # Only protocol errors may escape a connection; keep the peer's
            # code and the original exception for whoever reports it.
            refusal = ProtocolError(f"peer refused the handshake: {error.message}")
            refusal.details.update(error.details)
            refusal.details["remote_code"] = error.code
            refusal.__cause__ = error
        self._error = refusal
        return refusal

    def _fail(self, exc: ProtocolError, *, notify: bool = True) -> ProtocolError:
        """Enter ERROR with ``exc``; queue an error reply so the peer learns why."""
        self._error = exc
        if notify:
            try:
                reply = ErrorReply(id=None, error=exc).to_wire()
                self._outgoing += encode_frame(reply, max_frame=self.max_frame)
            except (FerryError, TypeError, ValueError, OverflowError):
                # Telling the peer is a courtesy; failing to must not hide exc.
                pass
        return exc
