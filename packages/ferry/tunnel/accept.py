"""The destination's side of a data connection's opening, without a thread.

Until a data connection has authenticated it must cost the agent no
thread: the TLS handshake and the ``tunnel`` frame are driven from the
event loop (:func:`authenticate`), which waits for the socket to become
readable and then lets ``ferry_native`` go as far as the bytes that
arrived allow.  Only an authenticated connection whose token was redeemed
(a :class:`PendingChannel`) goes to a thread, which connects it to the
incoming qemu and relays (:meth:`PendingChannel.complete`).

``ferry_native.TlsStream`` has no non-blocking mode of its own, but with a
timeout of 0 every operation does what it can with the bytes at hand and
raises ``TlsError("... timed out after 0.0 s")`` instead of waiting, with
the OpenSSL state kept for the next call: that is our "would block".
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ferry.acl import Subject, subject_from_identity
from ferry.errors import FerryError, ProtocolError
from ferry.protocol.framing import FrameDecoder
from ferry.protocol.messages import Tunnel
from ferry.tls import PeerIdentity, identity_from_der

from .channel import DataChannel, map_error
from .tokens import TokenBook, TunnelGrant
from .wire import MAX_OPEN_FRAME, encode_accept, encode_refusal, parse_open

__all__ = ["PendingChannel", "authenticate"]

T = TypeVar("T")

# After authentication: connecting to qemu waits for lower channels, then the
# acceptance and (plaintext mode) the unwrap must go through.
COMPLETE_TIMEOUT = 15.0


def _would_block(exc: BaseException) -> bool:
    """A zero-timeout ``ferry_native`` operation that needs more I/O (see the module doc)."""
    from ferry_native import TlsError

    return isinstance(exc, TlsError) and "timed out after" in str(exc)


async def _ready(sock: socket.socket, deadline: float) -> None:
    """Wait in the loop until ``sock`` can make progress, or raise TimeoutError.

    OpenSSL asks for more input almost always; it asks to write only when
    the socket buffer is full, so a socket that cannot take bytes now is
    waited on for writing, any other for reading.
    """
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    writable = bool(poller.poll(0))
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if writable:
        loop.add_reader(fd, wake)
    else:
        loop.add_writer(fd, wake)
    try:
        async with asyncio.timeout_at(deadline):
            await ready
    finally:
        if writable:
            loop.remove_reader(fd)
        else:
            loop.remove_writer(fd)


async def _step(sock: socket.socket, deadline: float, op: Callable[[], T]) -> T:
    """Call ``op`` (a zero-timeout stream operation) until it gets through."""
    while True:
        try:
            return op()
        except Exception as exc:
            if not _would_block(exc):
                raise
        await _ready(sock, deadline)


@dataclass(eq=False)
class PendingChannel:
    """A data connection that authenticated and redeemed its token.

    What is left (blocking, on the channel's own thread): connect to the
    incoming qemu, accept, unwrap for plaintext mode (:meth:`complete`).
    """

    sock: socket.socket
    stream: Any
    opening: Tunnel
    grant: TunnelGrant[Any]
    subject: Subject
    peer: str

    def complete(
        self,
        connect_local: Callable[[TunnelGrant[Any], int], socket.socket],
        *,
        timeout: float = COMPLETE_TIMEOUT,
    ) -> tuple[DataChannel, TunnelGrant[Any], socket.socket]:
        """Thread: connect to qemu and accept; returns what ``accept_channel`` returns.

        On failure the peer gets the error, everything is closed, the error raised.

        Raises:
            FerryError: the local end could not be reached, or the peer went away.
        """
        deadline = time.monotonic() + timeout
        local: socket.socket | None = None
        try:
            local = connect_local(self.grant, self.opening.channel)
            self.stream.send_all(encode_accept(self.opening.channel),
                                 max(deadline - time.monotonic(), 0.1))  # fmt: skip
            if self.opening.mode == "plain":
                self.stream.unwrap(max(deadline - time.monotonic(), 0.1))
        except BaseException as exc:
            error = map_error(exc, self.peer) if isinstance(exc, Exception) else None
            if error is not None:
                with contextlib.suppress(Exception):
                    self.stream.send_all(encode_refusal(error), 1.0)
            self.close()
            if local is not None:
                local.close()
            if error is not None:
                raise error from None
            raise
        channel = DataChannel(self.opening.channel, self.sock, self.stream, self.opening.mode)
        return channel, self.grant, local

    def close(self) -> None:
        """Free the TLS state and close the connection."""
        self.stream.close()
        self.sock.close()


async def authenticate(
    endpoint: Any,
    sock: socket.socket,
    book: TokenBook[Any],
    *,
    deadline: float,
    check_peer: Callable[[PeerIdentity], None],
    check_grant: Callable[[Subject, TunnelGrant[Any]], None],
) -> PendingChannel:
    """From the event loop: TLS handshake, allow-list, ``tunnel`` frame, token.

    ``sock`` has had its preamble read; ``deadline`` is in the loop's clock.
    ``check_peer`` (the ``[peers] allowed`` check) runs right after the
    handshake, ``check_grant`` (the ACL's ``tunnel`` op on the grant's
    domain) once the token is redeemed; either raises to refuse.  On any
    failure the peer gets the error (once TLS is up), ``sock`` is closed
    and the error raised.

    Raises:
        AuthError: handshake, allow-list, ACL or token refused.
        ProtocolError: not a well-formed ``tunnel`` frame.
        TimeoutError: the deadline passed first.
    """
    from ferry_native import TlsStream

    peer = "a data connection"
    with contextlib.suppress(OSError):
        peer = f"data connection from {sock.getpeername()[0]}"
    sock.setblocking(False)
    stream = TlsStream(endpoint, sock.fileno())
    secure = False
    try:
        await _step(sock, deadline, lambda: stream.handshake(0))
        secure = True
        identity = identity_from_der(stream.peer_certificate())
        check_peer(identity)
        subject = subject_from_identity(identity)
        decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)
        opening = None
        while opening is None:
            data = await _step(sock, deadline, lambda: stream.recv_some(MAX_OPEN_FRAME, 0))
            if not data:
                decoder.eof()
                raise ProtocolError(f"{peer}: closed before its 'tunnel' frame")
            decoder.feed(data)
            opening = parse_open(decoder)
        grant = book.redeem(opening.token, opening.channel, opening.mode)
        # A refusal by the ACL leaves the token spent, as any refusal does.
        check_grant(subject, grant)
    except BaseException as exc:
        error: BaseException = exc
        if isinstance(exc, Exception) and not isinstance(exc, TimeoutError):
            error = map_error(exc, peer, authenticating=True)
            if secure and isinstance(error, FerryError):
                with contextlib.suppress(Exception):
                    stream.send_all(encode_refusal(error), 0)
        stream.close()
        sock.close()
        if error is exc:
            raise
        raise error from None
    # The rest of the channel's life is blocking I/O on its own thread.
    sock.setblocking(True)
    return PendingChannel(sock, stream, opening, grant, subject, peer)
