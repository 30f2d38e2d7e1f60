"""One tunnel data connection, and the set of them that carries one migration.

Blocking I/O on purpose: each channel lives on its own thread, and the bytes
are moved by ``ferry_native`` with the GIL released (``TlsStream.pump`` when
encrypted, a pair of ``Relay`` when the TLS layer was unwrapped), so the
event loop of the agent never touches the stream.

A channel's life: open (source: connect, preamble, handshake, ``tunnel``
frame, wait for acceptance; destination: handshake, read the frame, redeem
the token, connect to qemu, accept), then :meth:`DataChannel.run` until both
directions reached end of file, or :meth:`DataChannel.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ferry.errors import AuthError, FerryError, ProtocolError, TunnelError
from ferry.protocol.framing import FrameDecoder

from .tokens import TokenBook, TunnelGrant
from .wire import (
    MAX_OPEN_FRAME,
    PREAMBLE,
    AnswerReader,
    encode_accept,
    encode_open,
    encode_refusal,
    parse_open,
)

__all__ = [
    "ChannelSet",
    "DataChannel",
    "TlsFiles",
    "accept_channel",
    "open_channel",
]

log = logging.getLogger("ferry.tunnel")

PR_SET_NAME = 15

HANDSHAKE_TIMEOUT = 15.0
THREAD_NAME = b"ferry-tunnel"


def name_os_thread(name: bytes = THREAD_NAME) -> None:
    """Name the calling OS thread (``/proc/PID/task/TID/comm``).

    Python 3.11 names only its own thread objects; operators and the tests
    look for relay threads with ps/top, which see the kernel's name.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


class TlsFiles(Protocol):
    """The agent's PEM files (``ferry.tls.TLSFiles`` fits)."""

    @property
    def ca(self) -> Any: ...
    @property
    def cert(self) -> Any: ...
    @property
    def key(self) -> Any: ...


def make_endpoint(files: TlsFiles, *, server: bool) -> Any:
    """A ``ferry_native.TlsEndpoint`` for our certificate and CA."""
    from ferry_native import TlsEndpoint

    return TlsEndpoint(server=server, ca_file=str(files.ca), cert_file=str(files.cert),
                       key_file=str(files.key))  # fmt: skip


class DataChannel:
    """An authenticated data connection, ready to relay a local socket's bytes."""

    def __init__(self, index: int, peer: socket.socket, stream: Any, mode: str) -> None:
        self.index = index
        self.mode = mode
        self._peer = peer
        self._stream = stream
        self._relays: list[Any] = []
        self._lock = threading.Lock()
        self._stopped = False
        self._closed = False

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the peer so far (plaintext count; live while running)."""
        if self.mode == "tls":
            return int(self._stream.bytes_sent)
        return int(self._relays[0].bytes_copied) if self._relays else 0

    @property
    def bytes_in(self) -> int:
        """Bytes received from the peer so far."""
        if self.mode == "tls":
            return int(self._stream.bytes_received)
        return int(self._relays[1].bytes_copied) if len(self._relays) > 1 else 0

    def run(self, local: socket.socket) -> None:
        """Relay ``local`` ↔ peer until both directions end; raise on failure."""
        if self.mode == "tls":
            self._stream.pump(local.fileno())
            return
        from ferry_native import Relay

        out = Relay(local.fileno(), self._peer.fileno(), half_close=True)
        back = Relay(self._peer.fileno(), local.fileno(), half_close=True)
        with self._lock:
            self._relays = [out, back]
            if self._stopped:
                out.stop()
                back.stop()
        failure: list[BaseException] = []

        def reverse() -> None:
            name_os_thread()
            try:
                back.run()
            except BaseException as exc:
                failure.append(exc)
                out.stop()

        thread = threading.Thread(target=reverse, name=f"tunnel-{self.index}-back", daemon=True)
        thread.start()
        try:
            out.run()
        except BaseException:
            back.stop()
            raise
        finally:
            thread.join()
            out.close()
            back.close()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        """Make :meth:`run` return promptly (thread-safe)."""
        with self._lock:
            self._stopped = True
            if self._stream is not None:
                self._stream.stop()
            for relay in self._relays:
                relay.stop()

    def close(self) -> None:
        """Free the TLS state and close the peer socket; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._stream is not None:
            self._stream.close()
        self._peer.close()


def map_error(exc: BaseException, what: str, *, authenticating: bool = False) -> FerryError:
    """Turn a relay or TLS failure into the Ferry error that names ``what`` failed.

    A TLS error while the channel is being opened is an authentication
    failure; once data flows it is a broken tunnel (e.g. the peer died).
    """
    from ferry_native import TlsError

    if isinstance(exc, FerryError):
        return exc
    if isinstance(exc, TlsError):
        if authenticating:
            return AuthError(f"{what}: {exc}")
        return TunnelError(f"{what}: {exc}")
    if isinstance(exc, TimeoutError):
        return TunnelError(f"{what}: timed out")
    if isinstance(exc, OSError):
        return TunnelError(f"{what}: {exc.strerror or exc}")
    return TunnelError(f"{what}: {exc}")


def open_channel(
    endpoint: Any,
    host: str,
    port: int,
    *,
    token: str,
    index: int,
    mode: str,
    timeout: float = HANDSHAKE_TIMEOUT,
    stopped: threading.Event | None = None,
) -> DataChannel:
    """Source side: dial the destination agent and open channel ``index``.

    Raises :class:`~ferry.errors.AuthError` (certificate or token refused)
    or :class:`~ferry.errors.TunnelError` (network), naming the peer.
    """
    from ferry_native import TlsStream

    what = f"tunnel channel {index} to {host}:{port}"
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise map_error(exc, what, authenticating=True) from None
    stream = None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(PREAMBLE)
        sock.settimeout(None)
        stream = TlsStream(endpoint, sock.fileno(), peer_name=host)
        stream.handshake(max(deadline - time.monotonic(), 0.1))
        stream.send_all(encode_open(token, index, mode), max(deadline - time.monotonic(), 0.1))
        reader = AnswerReader()
        while not reader.feed(stream.recv_some(MAX_OPEN_FRAME,
                                               max(deadline - time.monotonic(), 0.1))):  # fmt: skip
            if stopped is not None and stopped.is_set():
                raise TunnelError(f"{what}: stopped")
        if reader.leftover():
            raise ProtocolError(f"{what}: data after the acceptance")
        if mode == "plain":
            stream.unwrap(max(deadline - time.monotonic(), 0.1))
    except BaseException as exc:
        if stream is not None:
            stream.close()
        sock.close()
        if isinstance(exc, Exception):
            raise map_error(exc, what, authenticating=True) from None
        raise
    return DataChannel(index, sock, stream, mode)


def accept_channel(
    endpoint: Any,
    sock: socket.socket,
    book: TokenBook[Any],
    connect_local: Callable[[TunnelGrant[Any], int], socket.socket],
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
) -> tuple[DataChannel, TunnelGrant[Any], socket.socket]:
    """Destination side: authenticate a data connection whose preamble was read.

    ``connect_local(grant, index)`` returns the socket to the incoming qemu.
    On any refusal the peer gets the error (when TLS got that far), ``sock``
    is closed, and the error is raised.
    """
    from ferry_native import TlsStream

    peer = "a data connection"
    with contextlib.suppress(OSError):
        addr = sock.getpeername()
        peer = f"data connection from {addr[0]}"
    deadline = time.monotonic() + timeout
    sock.settimeout(None)
    stream = TlsStream(endpoint, sock.fileno())
    local: socket.socket | None = None
    secure = False
    try:
        stream.handshake(timeout)
        secure = True
        decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)
        opening = None
        while opening is None:
            data = stream.recv_some(MAX_OPEN_FRAME, max(deadline - time.monotonic(), 0.1))
            if not data:
                decoder.eof()
                raise ProtocolError(f"{peer}: closed before its 'tunnel' frame")
            decoder.feed(data)
            opening = parse_open(decoder)
        grant = book.redeem(opening.token, opening.channel, opening.mode)
        local = connect_local(grant, opening.channel)
        stream.send_all(encode_accept(opening.channel), max(deadline - time.monotonic(), 0.1))
        if opening.mode == "plain":
            stream.unwrap(max(deadline - time.monotonic(), 0.1))
    except BaseException as exc:
        error = map_error(exc, peer, authenticating=True) if isinstance(exc, Exception) else None
        if secure and error is not None:
            with contextlib.suppress(Exception):
                stream.send_all(encode_refusal(error), 1.0)
        stream.close()
        sock.close()
        if local is not None:
            local.close()
        if error is not None:
            raise error from None
        raise
    return DataChannel(opening.channel, sock, stream, opening.mode), grant, local


class ChannelSet:
    """The channel threads of one migration: counters, first error, stop, join.

    ``on_error`` is called once, from the failing thread, with the first
    error; the agent uses it to wake its event loop.
    """

    def __init__(self, name: str, on_error: Callable[[FerryError], None] | None = None) -> None:
        self.name = name
        self._on_error = on_error
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._channels: list[DataChannel] = []
        self._closed_bytes = [0, 0]
        self._stopping = threading.Event()
        self.error: FerryError | None = None
        self.started_at = time.monotonic()
        # Indices of the channels that got as far as relaying.
        self.opened: list[int] = []

    @property
    def stopping(self) -> threading.Event:
        """Set once :meth:`stop` was called."""
        return self._stopping

    def adopt_current_thread(self) -> None:
        """Count the calling thread as one of ours (destination: the accepting thread)."""
        with self._lock:
            self._threads.append(threading.current_thread())

    def spawn(self, index: int, body: Callable[[], None]) -> None:
        """Run ``body`` on a new thread named after the channel."""
        thread = threading.Thread(target=self._guard, args=(index, body),
                                  name=f"tunnel-{self.name}-{index}", daemon=True)  # fmt: skip
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _guard(self, index: int, body: Callable[[], None]) -> None:
        name_os_thread()
        try:
            body()
        except BaseException as exc:
            self.fail_unless_stopping(exc, index)

    def fail(self, error: FerryError) -> None:
        """Record the first error, stop every channel, tell the owner."""
        with self._lock:
            first = self.error is None
            if first:
                self.error = error
        if first:
            log.warning("%s", error)
            self.stop()
            if self._on_error is not None:
                self._on_error(error)

    def add(self, channel: DataChannel) -> None:
        """Track a running channel (for counters and stop)."""
        with self._lock:
            self._channels.append(channel)
            self.opened.append(channel.index)
            stop = self._stopping.is_set()
        if stop:
            channel.stop()

    def carry(self, channel: DataChannel, local: socket.socket) -> None:
        """Relay ``channel`` ↔ ``local`` on the calling thread until it ends, then free both.

        A failure is recorded (the first one wins) before ``local`` closes, so
        whoever watches that end (qemu, and through it the agent) learns our
        reason, not only a broken pipe.
        """
        self.add(channel)
        try:
            channel.run(local)
        except Exception as exc:
            self.fail_unless_stopping(exc, channel.index)
        finally:
            self.release(channel)
            channel.close()
            local.close()

    def fail_unless_stopping(self, exc: BaseException, index: int) -> None:
        """Record ``exc`` of channel ``index`` as the set's failure, unless we are stopping."""
        if not self._stopping.is_set():
            self.fail(map_error(exc, f"tunnel channel {index} of '{self.name}'"))

    def release(self, channel: DataChannel) -> None:
        """Forget a finished channel, keeping its byte counts."""
        with self._lock:
            if channel in self._channels:
                self._channels.remove(channel)
                self._closed_bytes[0] += channel.bytes_out
                self._closed_bytes[1] += channel.bytes_in

    def bytes(self) -> tuple[int, int]:
        """(sent to the peer, received from it) over every channel so far."""
        with self._lock:
            out = self._closed_bytes[0] + sum(c.bytes_out for c in self._channels)
            back = self._closed_bytes[1] + sum(c.bytes_in for c in self._channels)
        return out, back

    def stop(self) -> None:
        """Stop every channel (thread-safe, idempotent)."""
        self._stopping.set()
        with self._lock:
            channels = list(self._channels)
        for channel in channels:
            channel.stop()

    def join(self, timeout: float) -> bool:
        """Wait for the threads; True when all ended within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in threads)

    def alive(self) -> int:
        """Channel threads still running."""
        with self._lock:
            return sum(t.is_alive() for t in self._threads)

    async def wind_down(
        self, *, drain: bool, stop: Callable[[], None] | None = None, timeout: float = 10.0
    ) -> None:
        """From the event loop: let the channels end by themselves (``drain``),
        then stop them (``stop``, default :meth:`stop`) and wait for the threads.
        """
        loop = asyncio.get_running_loop()
        if drain and not await loop.run_in_executor(None, self.join, timeout):
            log.warning("tunnel of %s did not drain in %.0fs; stopping it", self.name, timeout)
        (stop or self.stop)()
        if not await loop.run_in_executor(None, self.join, timeout):
            log.error("tunnel of %s: %d relay thread(s) did not stop", self.name, self.alive())
