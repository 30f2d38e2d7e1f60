"""Types of the compiled TLS stream (see _tls.pyx and reference/tls.py)."""

import os
from types import TracebackType
from typing import Final, Self

__all__ = ["TlsEndpoint", "TlsError", "TlsStream"]

DEFAULT_PUMP_BUFFER: Final[int]

class TlsError(ConnectionError):
    """A TLS failure: the message says what failed."""

class TlsEndpoint:
    """One side's TLS configuration: TLS 1.3 only, mutual authentication, our own CA."""

    def __init__(
        self,
        *,
        server: bool,
        ca_file: str | os.PathLike[str],
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
    ) -> None: ...
    @property
    def server(self) -> bool:
        """True for the accepting side, False for the dialling side."""

class TlsStream:
    """A TLS 1.3 session over the connected stream socket ``fd``, which it does not own."""

    def __init__(self, endpoint: TlsEndpoint, fd: int, *, peer_name: str | None = None) -> None: ...
    def handshake(self, timeout: float) -> None:
        """Do the TLS handshake within ``timeout`` seconds; nothing if done already."""
    def peer_certificate(self) -> bytes:
        """Return the DER encoding of the peer's verified certificate."""
    def send_all(self, data: bytes | bytearray | memoryview, timeout: float) -> None:
        """Encrypt and send all of ``data`` within ``timeout`` seconds."""
    def recv_some(self, max_bytes: int, timeout: float) -> bytes:
        """Receive and decrypt up to ``max_bytes`` (at most one record); b"" at close_notify."""
    def unwrap(self, timeout: float) -> None:
        """Send close_notify and wait for the peer's; afterwards ``fd`` carries plaintext."""
    def pump(self, plain_fd: int, *, buffer_size: int = ...) -> None:
        """Carry ``plain_fd`` over TLS, both ways at once, until both directions are done."""
    def stop(self) -> None:
        """Make a running (or the next) pump() return promptly; thread-safe."""
    def close(self) -> None:
        """Free the SSL state and the stop fd; idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    @property
    def bytes_sent(self) -> int:
        """Plaintext bytes pump() moved from plain_fd into TLS so far; live during pump()."""
    @property
    def bytes_received(self) -> int:
        """Plaintext bytes pump() moved from TLS to plain_fd so far; live during pump()."""
    @property
    def stopped(self) -> bool:
        """True when stop() was called before pump() finished both directions."""
    @property
    def fd(self) -> int: ...
    @property
    def peer_name(self) -> str | None: ...
    @property
    def cipher(self) -> str | None: ...
    @property
    def closed(self) -> bool: ...
