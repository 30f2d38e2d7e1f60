"""ferry-destination's end of tunnelled migrations, and the peer port they share.

The peer port carries two kinds of connection: control connections (mutual
TLS from the first byte, served by :class:`ferry.rpc.Server`) and tunnel
data connections, which announce themselves with
:data:`ferry.tunnel.wire.PREAMBLE` before their own TLS handshake, done by
``ferry_native`` so that the bulk data never passes through Python's event
loop.  :class:`PeerListener` tells them apart by peeking at the first bytes.

:class:`IncomingTunnel` is one incoming migration's side: the incoming qemu
listens on a unix socket (mode 0600, in the run directory), and each
accepted data connection is connected to it in channel order, which is the
order qemu expects (main stream first, then the multifd channels).
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

from ferry.errors import TunnelError
from ferry.tunnel.channel import ChannelSet
from ferry.tunnel.wire import PREAMBLE, TLS_HANDSHAKE_RECORD

__all__ = ["IncomingTunnel", "PeerListener"]

log = logging.getLogger("ferry.destination.tunnel")

SNIFF_TIMEOUT = 15.0
CONNECT_ORDER_TIMEOUT = 30.0
DRAIN_TIMEOUT = 10.0


class IncomingTunnel:
    """Where one incoming migration's data connections are delivered."""

    def __init__(self, name: str, path: Path, channels: int) -> None:
        self.name = name
        self.path = path
        self.channels = channels
        self.set = ChannelSet(name)
        self._cond = threading.Condition()
        self._next = 0

    @property
    def uri(self) -> str:
        """What the incoming qemu's ``migrate-incoming`` is given."""
        return f"unix:{self.path}"

    def connect_qemu(self, index: int, timeout: float = CONNECT_ORDER_TIMEOUT) -> socket.socket:
        """Connect channel ``index`` to the incoming qemu once every lower one is connected.

        qemu 7.2 takes its first connection for the main stream, so a
        multifd channel that overtook the main one on the network waits.
        """
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
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                sock.close()
                raise TunnelError(
                    f"cannot reach the incoming qemu of '{self.name}' at {self.path}: "
                    f"{exc.strerror or exc}"
                ) from None
            self._next += 1
            self._cond.notify_all()
            return sock

    def stop(self) -> None:
        """Stop every channel and wake channels waiting for their turn."""
        self.set.stop()
        with self._cond:
            self._cond.notify_all()

    async def close(self, *, drain: bool) -> None:
        """Let the channels end by themselves (``drain``) or stop them; wait for the threads."""
        await self.set.wind_down(drain=drain, stop=self.stop, timeout=DRAIN_TIMEOUT)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class PeerListener:
    """Accepts on the peer port and routes each connection by its first bytes."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        on_control: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        on_data: Callable[[socket.socket], None],
        *,
        limit: int,
    ) -> None:
        self._sock = sock
        self._ssl = ssl_context
        self._on_control = on_control
        self._on_data = on_data
        self._limit = limit
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Start accepting."""
        self._sock.setblocking(False)
        self._task = asyncio.create_task(self._accept(), name="peer-accept")

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(self._sock)
            except OSError as exc:
                # EMFILE and friends: keep serving the connections we have.
                log.error("accept on the peer port failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._dispatch(conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _sniff(self, conn: socket.socket) -> bytes:
        """Peek until the kind of connection is known (or the peer gives up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SNIFF_TIMEOUT
        while True:
            try:
                head = conn.recv(len(PREAMBLE), socket.MSG_PEEK)
            except BlockingIOError:
                head = None
            if head is not None:
                if not head or head[0] == TLS_HANDSHAKE_RECORD or len(head) >= len(PREAMBLE):
                    return head
                if not PREAMBLE.startswith(head):
                    return head
            readable: asyncio.Future[None] = loop.create_future()

            def ready(fut: asyncio.Future[None] = readable) -> None:
                # Level-triggered: it may fire again before remove_reader.
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(conn.fileno(), ready)
            try:
                await asyncio.wait_for(readable, max(deadline - loop.time(), 0))
            finally:
                loop.remove_reader(conn.fileno())
            if head is not None and loop.time() > deadline:
                return head

    async def _dispatch(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            head = await self._sniff(conn)
        except (TimeoutError, OSError):
            conn.close()
            return
        if head[:1] == bytes([TLS_HANDSHAKE_RECORD]):

            def factory() -> asyncio.StreamReaderProtocol:
                reader = asyncio.StreamReader(limit=self._limit)
                return asyncio.StreamReaderProtocol(reader, self._on_control)

            try:
                await loop.connect_accepted_socket(
                    factory, sock=conn, ssl=self._ssl, ssl_handshake_timeout=SNIFF_TIMEOUT
                )
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log.warning("peer TLS handshake failed: %s", exc)
                conn.close()
                return
            return
        if head == PREAMBLE:
            conn.recv(len(PREAMBLE))
            conn.setblocking(True)
            thread = threading.Thread(target=self._on_data, args=(conn,),
                                      name="tunnel-accept", daemon=True)  # fmt: skip
            thread.start()
            return
        if head:
            log.warning("peer port: connection that is neither TLS nor a tunnel; closed")
        conn.close()

    async def close(self) -> None:
        """Stop accepting and drop connections still being sniffed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._pending):
            task.cancel()
        self._sock.close()
