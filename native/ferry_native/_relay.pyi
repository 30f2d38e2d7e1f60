"""Types of the compiled relay (see _relay.pyx and reference/relay.py)."""

from types import TracebackType
from typing import Final, Self

__all__ = ["MAX_BUFFER_SIZE", "Relay", "relay"]

MAX_BUFFER_SIZE: Final[int]

class Relay:
    """Copy bytes from ``src_fd`` to ``dst_fd`` until end of file, with the GIL released."""

    def __init__(
        self,
        src_fd: int,
        dst_fd: int,
        *,
        buffer_size: int = ...,
        half_close: bool = ...,
    ) -> None: ...
    def run(self) -> int:
        """Copy until end of file on the source; return the bytes copied by this call."""
    def stop(self) -> None:
        """Make a running (or the next) run() return promptly; thread-safe."""
    def close(self) -> None:
        """Free the stop fd and the buffer; idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    @property
    def bytes_copied(self) -> int:
        """Bytes written to the destination so far; live during run()."""
    @property
    def stopped(self) -> bool:
        """True when stop() was called before run() reached end of file."""
    @property
    def src_fd(self) -> int: ...
    @property
    def dst_fd(self) -> int: ...
    @property
    def buffer_size(self) -> int: ...
    @property
    def half_close(self) -> bool: ...
    @property
    def closed(self) -> bool: ...

def relay(src_fd: int, dst_fd: int, *, buffer_size: int = ...) -> int:
    """Copy ``src_fd`` to ``dst_fd`` until end of file and return the byte count."""
