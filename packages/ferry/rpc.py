"""asyncio transport over the sans-I/O :mod:`ferry.protocol` connection.

One :class:`Session` per stream connection, either side.  The protocol
core decides what bytes mean; this module only moves them: it feeds what
the socket gave to :class:`~ferry.protocol.connection.Connection`, writes
what the connection wants sent, and routes replies and events to the
request that is waiting for them.

A server-side session runs each incoming request in its own task, so a
long request (``migrate`` streaming progress events) does not block a
``job_abort`` arriving on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.acl import Subject, subject_from_identity, subject_from_ucred
from ferry.errors import AuthError, FerryError, ProtocolError, UnknownOp
from ferry.protocol.connection import Connection
from ferry.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorReply,
    Event,
    Hello,
    Message,
    Reply,
    Request,
    Tunnel,
    Welcome,
)
from ferry.protocol.ops import validate_args
from ferry.tls import as_auth_error, peer_identity

if TYPE_CHECKING:
    # Types only: ferryctl imports this module and never serves, so it need
    # not load the config machinery that ferry.preauth pulls in.
    from ferry.preauth import Ticket

__all__ = [
    "FEATURES",
    "Handler",
    "RequestContext",
    "Server",
    "Session",
    "connect_tcp",
    "connect_unix",
    "make_hello",
    "refused_during_authentication",
]

log = logging.getLogger("ferry.rpc")

# Features this build speaks; peers use the intersection.
FEATURES: frozenset[str] = frozenset(
    {"migration-v3", "cookie-v1", "tunnel", "tunnel-plain", "parallel-tunnel", "journal",
     "snapshots"}
)
READ_CHUNK = 256 * 1024

EventSink = Callable[[str, dict[str, Any]], None]


def make_hello(
    host_uuid: str, hostname: str, role: str, *, mandatory: frozenset[str] = frozenset()
) -> Hello:
    """Build this side's hello with the features this build speaks."""
    return Hello(
        version=PROTOCOL_VERSION,
        host_uuid=host_uuid,
        hostname=hostname,
        role=role,
        features=FEATURES | mandatory,
        mandatory=mandatory,
    )


@dataclass
class RequestContext:
    """What a request handler knows about its request and caller."""

    session: Session
    request_id: int
    op: str
    subject: Subject

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Send an event tied to this request (progress, phase changes)."""
        self.session.send_nowait(Event(event=event, data=data, id=self.request_id))


Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    on_event: EventSink | None = None


@dataclass(eq=False)
class Session:
    """One established connection (client or server side)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: Connection
    subject: Subject = field(default_factory=lambda: Subject(kind="local"))
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _reader_task: asyncio.Task[None] | None = None
    _closed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    close_error: BaseException | None = None
    #: Seconds a started frame has to arrive completely (None: no deadline).
    frame_timeout: float | None = None
    _frame_started: float | None = None

    # -- sending ---------------------------------------------------------

    def send_nowait(self, msg: Message) -> None:
        """Queue a message on the stream (asyncio buffers; no await needed)."""
        if self.writer.is_closing():
            return
        self.writer.write(self.conn.send(msg))

    def _flush_protocol(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    # -- client side -----------------------------------------------------

    async def request(
        self,
        op: str,
        args: Mapping[str, Any] | None = None,
        *,
        on_event: EventSink | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its reply, delivering its events.

        Raises:
            FerryError: the error the peer answered with (same class as raised there),
                or ProtocolError if the connection dropped first.
        """
        if self._closed.is_set():
            raise ProtocolError(f"connection closed before {op!r} could be sent")
        request_id = self.conn.next_request_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(future, on_event)
        self.send_nowait(Request(id=request_id, op=op, args=dict(args or {})))
        try:
            await self.writer.drain()
            if timeout is None:
                return await future
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    # -- reading ---------------------------------------------------------

    def start(
        self, dispatch: Callable[[Session, Request], Coroutine[Any, Any, None]] | None
    ) -> None:
        """Start the reader task; ``dispatch`` handles incoming requests."""
        self._reader_task = asyncio.create_task(self._read_loop(dispatch))

    async def _read_loop(
        self, dispatch: Callable[[Session, Request], Coroutine[Any, Any, None]] | None
    ) -> None:
        error: BaseException | None = None
        try:
            # Messages that came in the same read as the handshake.
            while (msg := self.conn.next_event()) is not None:
                self._route(msg, dispatch)
            while True:
                data = await self._read_some()
                if not data:
                    self.conn.receive_eof()
                    # Frames that arrived just before the end still count.
                    while (msg := self.conn.next_event()) is not None:
                        self._route(msg, dispatch)
                    break
                self.conn.receive_data(data)
                while (msg := self.conn.next_event()) is not None:
                    self._route(msg, dispatch)
                self._flush_protocol()
        except (FerryError, OSError, ssl.SSLError) as exc:
            error = exc
            self._flush_protocol()
        except asyncio.CancelledError:
            error = ProtocolError("connection closed")
        finally:
            self._finish(error)

    async def _read_some(self) -> bytes:
        """Read what arrived; a frame that started must end within ``frame_timeout``.

        The deadline runs from the read that brought the frame's first
        bytes, not from the last read: a peer dribbling a byte now and then
        cannot hold the connection and its buffer forever.

        Raises:
            ProtocolError: the frame did not complete in time (the peer is
                told why before the connection closes).
        """
        loop = asyncio.get_running_loop()
        partial = self.conn.partial_frame
        if not partial or self.frame_timeout is None:
            self._frame_started = None
            return await self.reader.read(READ_CHUNK)
        if self._frame_started is None:
            self._frame_started = loop.time()
        try:
            async with asyncio.timeout_at(self._frame_started + self.frame_timeout):
                return await self.reader.read(READ_CHUNK)
        except TimeoutError:
            waited = loop.time() - self._frame_started
            error = ProtocolError(
                f"frame incomplete after {waited:.1f} s: {partial} byte(s) of it arrived, "
                f"then nothing ([limits] frame_read_timeout_s = {self.frame_timeout:g})",
                received=partial,
            )
            log.warning("dropping %s (%s): %s", self.subject.describe(),
                        self.writer.get_extra_info("peername") or "local", error)  # fmt: skip
            self.send_nowait(ErrorReply(id=None, error=error))
            raise error from None

    def _route(
        self, msg: Message, dispatch: Callable[[Session, Request], Coroutine[Any, Any, None]] | None
    ) -> None:
        if isinstance(msg, Reply):
            pending = self._pending.get(msg.id)
            if pending and not pending.future.done():
                pending.future.set_result(dict(msg.result))
        elif isinstance(msg, ErrorReply):
            if msg.id is None:
                # A connection-level refusal: every waiter learns why.
                self._fail_all(msg.error)
                return
            pending = self._pending.get(msg.id)
            if pending and not pending.future.done():
                pending.future.set_exception(msg.error)
        elif isinstance(msg, Event):
            pending = self._pending.get(msg.id) if msg.id is not None else None
            if pending and pending.on_event:
                try:
                    pending.on_event(msg.event, dict(msg.data))
                except Exception:  # a display bug must not kill the session
                    log.exception("event handler failed")
        elif isinstance(msg, Request):
            if dispatch is None:
                self.send_nowait(
                    ErrorReply(
                        id=msg.id, error=UnknownOp(f"this side serves no requests: {msg.op!r}")
                    )
                )
                return
            task = asyncio.create_task(dispatch(self, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _fail_all(self, error: BaseException) -> None:
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(error)

    def _finish(self, error: BaseException | None) -> None:
        self.close_error = error
        self._fail_all(
            error
            if isinstance(error, FerryError)
            else ProtocolError(f"connection lost: {error}")
            if error
            else ProtocolError("connection closed by peer")
        )
        self._closed.set()
        with contextlib.suppress(Exception):
            self.writer.close()

    async def wait_closed(self) -> None:
        """Wait until the read loop has ended."""
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        """True once the connection has ended."""
        return self._closed.is_set()

    async def close(self) -> None:
        """Close the connection and cancel in-flight handlers."""
        for task in list(self._tasks):
            task.cancel()
        if self._reader_task and not self._reader_task.done():
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        with contextlib.suppress(Exception):
            self.writer.close()
            await self.writer.wait_closed()

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# What ends a TLS connection whose peer refused our certificate: TLS 1.3
# lets the client finish its handshake before the server has checked the
# client certificate, so the refusal reaches us only while we wait for the
# welcome -- as an alert, a reset, or a plain end of stream, depending on
# how the packets race.
_REFUSAL_ERRORS = (ssl.SSLError, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _ClosedBeforeWelcome(Exception):
    """Internal: the peer ended the connection before its welcome (``cause``: how)."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(str(cause) if cause else "end of stream")
        self.cause = cause


async def _handshake_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    hello: Hello,
    max_frame: int,
    *,
    tls: bool = False,
) -> Session:
    """Send our hello and wait for the welcome.

    With ``tls``, a connection that ends (or fails at the TLS layer) before
    the welcome raises :class:`_ClosedBeforeWelcome`, for the caller to
    report as an authentication failure; without, an end of stream is a
    ProtocolError and other errors propagate as they are.
    """
    conn = Connection(hello, initiator=True, max_frame=max_frame)
    try:
        writer.write(conn.start())
        await writer.drain()
        while conn.negotiated is None:
            data = await reader.read(READ_CHUNK)
            if not data:
                conn.receive_eof()
                if tls:
                    raise _ClosedBeforeWelcome(None)
                raise ProtocolError("peer closed the connection during the handshake")
            conn.receive_data(data)
            _expect_welcome(conn)
    except _REFUSAL_ERRORS as exc:
        if tls:
            raise _ClosedBeforeWelcome(exc) from None
        raise
    session = Session(reader, writer, conn)
    session.start(None)
    return session


def _expect_welcome(conn: Connection) -> None:
    """Consume what arrived: a welcome ends the handshake, an error reply is raised."""
    while conn.negotiated is None and (msg := conn.next_event()) is not None:
        if isinstance(msg, ErrorReply):
            raise msg.error
        if not isinstance(msg, Welcome):
            raise ProtocolError(f"expected welcome, got {type(msg).__name__}")


def refused_during_authentication(
    host: str, port: int, cause: BaseException | None = None
) -> AuthError:
    """The error for a TLS peer that ended the connection before its welcome.

    The message is the same however the refusal arrived (alert, reset or
    end of stream, see ``_REFUSAL_ERRORS``); ``details["reason"]`` says
    which.  An ``ssl`` error that is not an alert from the peer is reported
    the way :func:`ferry.tls.as_auth_error` does.
    """
    if isinstance(cause, ssl.SSLError) and "ALERT" not in str(cause.reason or ""):
        return as_auth_error(cause, peer=host)
    if cause is None:
        reason = "connection closed before the welcome"
    elif isinstance(cause, ssl.SSLError):
        reason = str(cause.reason)
    else:
        reason = f"{type(cause).__name__}: {cause}"
    return AuthError(
        f"{host}:{port} closed the connection during authentication, before greeting us: "
        "the peer refused this host's TLS certificate (not signed by the CA it trusts, "
        "expired, or not for this host?)",
        peer=host,
        reason=reason,
    )


async def connect_unix(path: Path, hello: Hello, *, max_frame: int = 1 << 20) -> Session:
    """Open a session to an agent's admin socket.

    Raises:
        ProtocolError: on handshake failure; OSError when the socket is absent.
    """
    reader, writer = await asyncio.open_unix_connection(str(path), limit=max_frame * 2)
    try:
        return await _handshake_client(reader, writer, hello, max_frame)
    except BaseException:
        writer.close()
        raise


async def connect_tcp(
    host: str,
    port: int,
    hello: Hello,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    max_frame: int = 1 << 20,
    timeout: float = 30.0,
) -> Session:
    """Open a (TLS) session to a peer agent.

    Raises:
        AuthError: over TLS, the peer ended the connection after the TLS
            handshake but before its welcome: it refused our certificate
            (see :func:`refused_during_authentication`), or it answered
            with its own auth-failed error (e.g. not in its ``[peers] allowed``).
        ProtocolError, ssl.SSLError, OSError: on other failures to connect
            or negotiate (an ``ssl`` error here is the TLS handshake itself
            failing, e.g. our side refusing the peer's certificate).
    """
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host,
            port,
            ssl=ssl_context,
            server_hostname=server_hostname if ssl_context else None,
            limit=max_frame * 2,
        ),
        timeout,
    )
    tls = ssl_context is not None
    try:
        return await asyncio.wait_for(
            _handshake_client(reader, writer, hello, max_frame, tls=tls), timeout
        )
    except _ClosedBeforeWelcome as exc:
        writer.close()
        raise refused_during_authentication(host, port, exc.cause) from None
    except ProtocolError as exc:
        writer.close()
        # The peer refused us by name ([peers] allowed): report its
        # auth-failed error as it is, not wrapped as a protocol error.
        if isinstance(exc.__cause__, AuthError):
            raise exc.__cause__ from None
        raise
    except BaseException:
        writer.close()
        raise


# Keepalive on control connections: a cut link is noticed in ~10 s even
# while we only wait for a reply (nothing of ours is unacknowledged then).
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 4, 2, 3
USER_TIMEOUT_MS = 15_000


def keepalive(session: Session) -> None:
    """Make a dialled TCP session notice a dead peer in seconds, not hours."""
    sock = session.writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def peer_subject(writer: asyncio.StreamWriter) -> Subject:
    """Who is on the other end: SO_PEERCRED for unix sockets, the certificate for TLS."""
    sslobj = writer.get_extra_info("ssl_object")
    if sslobj is not None:
        try:
            identity = peer_identity(sslobj)
        except AuthError:
            if sslobj.getpeercert():
                raise  # a certificate with an unusable operator name: refused
            return Subject(kind="peer", peer=None)
        return subject_from_identity(identity)
    sock: socket.socket | None = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        return subject_from_ucred(uid, gid)
    return Subject(kind="peer", peer=None)


class Server:
    """Serves requests on any number of listeners with one handler table."""

    def __init__(
        self,
        hello: Hello,
        handlers: Mapping[str, Handler],
        *,
        max_frame: int = 1 << 20,
        admit: Callable[[Subject], None] | None = None,
        authorize: Callable[[Subject, str], None] | None = None,
        handshake_timeout: float | None = None,
        frame_timeout: float | None = None,
    ) -> None:
        """``admit`` may raise AccessDenied (or AuthError) to refuse a caller
        before any op; ``authorize(subject, op)`` may refuse one op before its
        handler runs.  ``handshake_timeout`` (connections that come without a
        :class:`~ferry.preauth.Ticket`) and ``frame_timeout`` default to the
        process's ``[limits]`` (:func:`ferry.preauth.process_limits`).
        """
        from ferry.preauth import process_limits

        limits = process_limits()
        self.hello = hello
        self.handlers = dict(handlers)
        self.max_frame = max_frame
        self.admit = admit
        self.authorize = authorize
        self.handshake_timeout = handshake_timeout or limits.handshake_timeout_s
        self.frame_timeout = frame_timeout or limits.frame_read_timeout_s
        self.sessions: set[Session] = set()

    async def handle_stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        ticket: Ticket | None = None,
    ) -> None:
        """asyncio.start_server callback: handshake, then serve requests.

        ``ticket`` is the connection's admission (:mod:`ferry.preauth`): the
        hello must arrive by its deadline, and the ticket is given back once
        it did.  Without one, ``handshake_timeout`` applies.
        """
        conn = Connection(self.hello, initiator=False, max_frame=self.max_frame)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = (
            asyncio.timeout_at(ticket.deadline)
            if ticket is not None
            else asyncio.timeout(self.handshake_timeout)
        )
        try:
            subject = peer_subject(writer)
            try:
                async with deadline:
                    if not await self._handshake(reader, writer, conn, subject, ticket):
                        return
            except TimeoutError:
                if ticket is not None:
                    ticket.gate.timed_out()
                else:
                    log.info("connection closed: no hello within %gs", self.handshake_timeout)
                return
            if ticket is not None:
                ticket.authenticated()
            session = Session(reader, writer, conn, subject=subject,
                              frame_timeout=self.frame_timeout)  # fmt: skip
            self.sessions.add(session)
            session.start(self._dispatch)
            await session.wait_closed()
            self.sessions.discard(session)
        except (FerryError, OSError, ssl.SSLError) as exc:
            log.info("connection refused or dropped: %s", exc)
        finally:
            if ticket is not None:
                ticket.release()
            with contextlib.suppress(Exception):
                writer.close()

    async def _handshake(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: Connection,
        subject: Subject,
        ticket: Ticket | None,
    ) -> bool:
        """Admission and hello; True once negotiated, False when the connection ended."""
        if self.admit is not None:
            try:
                self.admit(subject)
            except FerryError as exc:
                if ticket is not None:
                    ticket.gate.failed(exc)
                else:
                    log.info("connection refused: %s", exc)
                writer.write(conn.send(ErrorReply(id=None, error=exc)))
                await writer.drain()
                return False
        while conn.negotiated is None:
            data = await reader.read(READ_CHUNK)
            if not data:
                return False
            msg: Message | None = None
            try:
                conn.receive_data(data)
                msg = conn.next_event()
            finally:
                out = conn.data_to_send()
                if out:
                    writer.write(out)
                    await writer.drain()
            if isinstance(msg, Tunnel):
                # Data connections have their own preamble and never reach
                # this server (ferry_destination.tunnel.PeerListener).
                return False
        return True

    async def _dispatch(self, session: Session, request: Request) -> None:
        handler = self.handlers.get(request.op)
        try:
            if handler is None:
                raise UnknownOp(f"unknown op {request.op!r}", op=request.op)
            if self.authorize is not None:
                self.authorize(session.subject, request.op)
            args = validate_args(request.op, request.args)
            ctx = RequestContext(session, request.id, request.op, session.subject)
            result = await handler(ctx, args)
            session.send_nowait(Reply(id=request.id, result=result))
        except FerryError as exc:
            session.send_nowait(ErrorReply(id=request.id, error=exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must still get an answer, not a hang
            log.exception("handler for %s failed", request.op)
            session.send_nowait(
                ErrorReply(
                    id=request.id, error=FerryError(f"internal error in {request.op}: {exc}")
                )
            )
        with contextlib.suppress(Exception):
            await session.writer.drain()
