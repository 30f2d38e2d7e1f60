"""ferry-destination's end of tunnelled migrations, and the peer port they share.

The peer port carries two kinds of connection: control connections (mutual
TLS from the first byte, served by :class:`ferry.rpc.Server`) and tunnel
data connections, which announce themselves with
:data:`ferry.tunnel.wire.PREAMBLE` before their own TLS handshake, done by
``ferry_native`` so that the bulk data never passes through Python's event
loop.  :class:`PeerListener` tells them apart by peeking at the first bytes,
and holds both to the pre-authentication limits of :mod:`ferry.preauth`.

:class:`IncomingTunnel` is one incoming migration's side: the incoming qemu
listens on a unix socket (mode 0600, in the run directory), and each
accepted data connection is connected to it in channel order, which is the
order qemu expects (main stream first, then the multifd channels).  The
token that admits them names the one host that may present it
(:func:`redeemer_for`); the listener refuses any other certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.acl import Subject, check_access
from ferry.config import AgentConfig
from ferry.errors import FerryError, TunnelError
from ferry.preauth import AdmissionGate, Ticket, TicketedHandler, accept_tls
from ferry.tls import PeerIdentity, check_peer_allowed
from ferry.tunnel.accept import PendingChannel, authenticate
from ferry.tunnel.channel import ChannelSet
from ferry.tunnel.tokens import TokenBook, TunnelGrant
from ferry.tunnel.wire import PREAMBLE, TLS_HANDSHAKE_RECORD

if TYPE_CHECKING:
    from ferry_destination.context import DestinationContext

__all__ = ["IncomingTunnel", "PeerListener", "issue_token", "redeemer_for"]

log = logging.getLogger("ferry.destination.tunnel")

CONNECT_ORDER_TIMEOUT = 30.0
DRAIN_TIMEOUT = 10.0


class IncomingTunnel:
    """Where one incoming migration's data connections are delivered."""

    def __init__(self, name: str, path: Path, channels: int) -> None:
        self.name = name
        self.path = path
        #: The migration stream's channels (main, then multifd): 0 .. channels-1.
        self.channels = channels
        #: ``--copy-storage-*``: where the incoming qemu's NBD server listens,
        #: and how many disks; disk ``i`` comes as channel ``channels + i``.
        self.disk_path: Path | None = None
        self.disk_channels = 0
        self.set = ChannelSet(name)
        self._cond = threading.Condition()
        self._next = 0
        self._disks_connected = 0

    @property
    def total_channels(self) -> int:
        """Every channel the token admits: the migration stream's, then the disks'."""
        return self.channels + self.disk_channels

    def carry_disks(self, path: Path, disks: int) -> None:
        """Also carry ``disks`` NBD connections to the server listening on ``path``."""
        self.disk_path = path
        self.disk_channels = disks

    @property
    def uri(self) -> str:
        """What the incoming qemu's ``migrate-incoming`` is given."""
        return f"unix:{self.path}"

    @property
    def connected(self) -> int:
        """How many data channels have been connected to the incoming qemu."""
        with self._cond:
            return self._next + self._disks_connected

    def make_room(self) -> None:
        """Make the socket's private directory and remove a stale socket, before qemu listens."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def connect_qemu(self, index: int, timeout: float = CONNECT_ORDER_TIMEOUT) -> socket.socket:
        """Connect channel ``index`` to the incoming qemu once every lower one is connected.

        qemu 7.2 takes its first connection for the main stream, so a
        multifd channel that overtook the main one on the network waits.
        A disk channel goes to the NBD server at once: the disks are
        mirrored before the migration stream opens, in any order.
        """
        if index >= self.channels:
            return self._connect_disk(index)
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self._next == index or self.set.stopping.is_set(), timeout
            )
            if self.set.stopping.is_set():
                raise TunnelError(f"tunnel of '{self.name}' is closing")
            if not ready:
                raise TunnelError(
                    f"tunnel channel {index} of '{self.name}' waited {timeout:.0f}s "
                    f"for channel {self._next}"
                )
            sock = self._connect(self.path)
            self._next += 1
            self._cond.notify_all()
            return sock

    def _connect_disk(self, index: int) -> socket.socket:
        if self.disk_path is None or index >= self.total_channels:
            raise TunnelError(f"tunnel channel {index} of '{self.name}' has no disk to carry")
        if self.set.stopping.is_set():
            raise TunnelError(f"tunnel of '{self.name}' is closing")
        sock = self._connect(self.disk_path)
        with self._cond:
            self._disks_connected += 1
        return sock

    def _connect(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise TunnelError(
                f"cannot reach the incoming qemu of '{self.name}' at {path}: "
                f"{exc.strerror or exc}"
            ) from None
        return sock

    def stop(self) -> None:
        """Stop every channel and wake channels waiting for their turn."""
        self.set.stop()
        with self._cond:
            self._cond.notify_all()

    async def close(self, *, drain: bool) -> None:
        """Let the channels end by themselves (``drain``) or stop them; wait for the threads."""
        await self.set.wind_down(drain=drain, stop=self.stop, timeout=DRAIN_TIMEOUT)
        for path in (self.path, self.disk_path):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def redeemer_for(subject: Subject, source_host: str) -> str | None:
    """The host whose certificate may redeem a token handed to ``subject``.

    A peer (p2p: the source host's own agent asked) gets a token only its
    own certificate can present: its common name (or, lacking one, its
    first DNS name).  Anyone else (an operator driving a client-driven
    migration, a local caller) passes the token on to the source host, so
    the token names that host: ``source_host``, the host name in the
    source's cookie, which its certificate carries as CN or DNS name.
    """
    if subject.kind == "peer":
        return subject.peer or next(iter(subject.peer_names), None)
    return source_host or None


def issue_token(dst: DestinationContext, tunnel: IncomingTunnel, redeemer: str | None) -> str:
    """A fresh token for ``tunnel``'s channels (revoking its earlier one), for ``redeemer``.

    It lives as long as an incoming migration may idle
    (``incoming_timeout_s``); plaintext only where ``[tls]`` allows it.
    """
    tls = dst.config.tls
    return dst.tokens.issue(
        tunnel.name, tunnel.total_channels, dst.config.destination.incoming_timeout_s, tunnel,
        allow_plaintext=tls is not None and tls.allow_plaintext_tunnel, redeemer=redeemer,
    )  # fmt: skip


class PeerListener:
    """Accepts on the peer port and routes each connection by its first bytes.

    Nothing a connection does before it authenticated costs a thread or a
    large buffer (:mod:`ferry.preauth`): the first bytes are peeked at from
    the event loop, control connections do their TLS handshake in asyncio
    (small receive buffer) and data connections in ``ferry_native`` driven
    from the loop (:func:`ferry.tunnel.accept.authenticate`).  At most
    ``[limits] max_unauthenticated`` connections are in that state at once,
    each until ``handshake_timeout_s``; only an authenticated data
    connection gets its thread (``on_data``).
    """

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        config: AgentConfig,
        *,
        on_control: TicketedHandler,
        on_data: Callable[[PendingChannel], None],
        endpoint: Callable[[], Any],
        tokens: TokenBook[Any],
    ) -> None:
        self._sock = sock
        self._ssl = ssl_context
        self._config = config
        self._on_control = on_control
        self._on_data = on_data
        self._endpoint = endpoint
        self._tokens = tokens
        self._limit = config.max_frame * 2
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.gate: AdmissionGate | None = None

    def start(self) -> None:
        """Start accepting (and say who may connect)."""
        allowed = self._config.peers.allowed
        if allowed:
            log.info("peer port: only hosts whose certificate names match [peers] allowed "
                     "may connect: %s", ", ".join(allowed))  # fmt: skip
        else:
            log.warning("peer port: [peers] allowed is empty: every host with a certificate "
                        "signed by our CA may connect")  # fmt: skip
        operators = self._config.peers.operators
        if operators:
            log.info("peer port: operator certificates in [peers] operators may connect "
                     "(each op per [[acl]]): %s", ", ".join(operators))  # fmt: skip
        self.gate = AdmissionGate("peer port", self._config.limits, log)
        self._sock.setblocking(False)
        self._task = asyncio.create_task(self._accept(), name="peer-accept")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.gate is not None
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                log.error("accept on the peer port failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            ticket = self.gate.admit()
            if ticket is None:
                conn.close()
                continue
            task = asyncio.create_task(self._dispatch(conn, ticket))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _sniff(self, conn: socket.socket) -> bytes:
        """Peek until the kind of connection is known (the caller bounds the wait)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = conn.recv(len(PREAMBLE), socket.MSG_PEEK)
            except BlockingIOError:
                head = None
            if head is not None and (
                not head or len(head) >= len(PREAMBLE) or not PREAMBLE.startswith(head)
            ):
                return head
            readable: asyncio.Future[None] = loop.create_future()

            def ready(fut: asyncio.Future[None] = readable) -> None:
                # Level-triggered: it may fire again before remove_reader.
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(conn.fileno(), ready)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())

    async def _dispatch(self, conn: socket.socket, ticket: Ticket) -> None:
        gate = ticket.gate
        handed_over = False
        try:
            try:
                async with asyncio.timeout_at(ticket.deadline):
                    head = await self._sniff(conn)
            except TimeoutError:
                gate.timed_out()
                conn.close()
                return
            except OSError:
                conn.close()
                return
            if head[:1] == bytes([TLS_HANDSHAKE_RECORD]):
                handed_over = await self._control(conn, ticket)
            elif head == PREAMBLE:
                await self._data(conn, ticket)
            else:
                if head:
                    gate.failed("a connection that is neither TLS nor a tunnel preamble")
                conn.close()
        finally:
            if not handed_over:
                ticket.release()

    async def _control(self, conn: socket.socket, ticket: Ticket) -> bool:
        """TLS in the loop; True once the hello is up to ``on_control`` (it owns the ticket)."""

        def connected(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
            return self._on_control(r, w, ticket=ticket)

        protocol = asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=self._limit), connected)
        try:
            await accept_tls(conn, self._ssl, protocol, timeout=ticket.remaining())
        except TimeoutError:
            ticket.gate.timed_out()
            conn.close()
            return False
        except (OSError, ssl.SSLError) as exc:
            ticket.gate.failed(f"TLS handshake failed: {exc}")
            conn.close()
            return False
        return True

    async def _data(self, conn: socket.socket, ticket: Ticket) -> None:
        """Authenticate a data connection in the loop, then give it its thread."""
        config = self._config

        def check_peer(identity: PeerIdentity) -> None:
            check_peer_allowed(identity, config.peers.allowed, host=config.host.name,
                               operators=config.peers.operators)  # fmt: skip

        def check_grant(subject: Subject, grant: TunnelGrant[Any]) -> None:
            # The token's host first: a leaked token is refused for what it is.
            grant.check_redeemer(subject)
            check_access(config.acl, subject, "tunnel", grant.name)

        try:
            conn.recv(len(PREAMBLE))
            endpoint = self._endpoint()
        except Exception as exc:
            log.error("tunnel data connection dropped: %s", exc)
            conn.close()
            return
        try:
            pending = await authenticate(
                endpoint, conn, self._tokens, deadline=ticket.deadline,
                check_peer=check_peer, check_grant=check_grant,
            )  # fmt: skip
        except TimeoutError:
            ticket.gate.timed_out()
            return
        except FerryError as exc:
            ticket.gate.failed(f"tunnel data connection refused: {exc}")
            return
        ticket.authenticated()
        thread = threading.Thread(target=self._on_data, args=(pending,),
                                  name="tunnel-accept", daemon=True)  # fmt: skip
        thread.start()

    async def close(self) -> None:
        """Stop accepting and drop connections not yet authenticated."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._pending):
            task.cancel()
        if self.gate is not None:
            self.gate.close()
        self._sock.close()
