"""What a connection may cost before it has authenticated.

Every listening socket of an agent (the peer port of ferry-destination,
both admin sockets) admits connections through an :class:`AdmissionGate`:

- at most ``max_unauthenticated`` connections may be between accept and
  authentication at once; more are accepted and closed at once (closing
  them, rather than leaving them in the kernel's backlog, lets a legitimate
  peer's retry in as soon as the flood ends);
- each admitted connection gets a :class:`Ticket` whose ``deadline`` is
  ``handshake_timeout_s`` after accept: whoever serves the connection stops
  waiting then and closes it;
- refusals and failed handshakes are counted and logged as one summary line
  per ``refusal_log_interval_s`` (:class:`BurstLog`), so a flood of a
  thousand connections writes a line or two, not a thousand.

"Authenticated" means: the TLS handshake verified the peer's certificate,
the peer allow-list let it in, and the first frame (``hello``, or
``tunnel`` on a data connection) arrived.  On a unix admin socket the peer
credentials take the place of TLS.

The TLS of control connections runs in asyncio's ``SSLProtocol`` with a
small receive buffer (:func:`accept_tls`): the stock one allocates 256 KiB
per connection before the handshake, which is what made a thousand
half-open connections cost 300 MB that the allocator never gave back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import sslproto
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ferry.config import LimitsConfig

__all__ = [
    "TLS_READ_BUFFER",
    "AdmissionGate",
    "BurstLog",
    "Ticket",
    "TicketedHandler",
    "accept_tls",
    "process_limits",
    "set_process_limits",
]

log = logging.getLogger("ferry.preauth")

# One TLS record is at most 16 KiB of plaintext plus 256 bytes of overhead;
# a buffer of two records lets asyncio read whole records without holding
# the stock 256 KiB per connection.
TLS_READ_BUFFER = 32 * 1024

_process_limits = LimitsConfig()


def set_process_limits(limits: LimitsConfig) -> None:
    """Make ``limits`` the default of listeners that are not given any.

    ``agent_main`` calls this with the loaded ``[limits]`` so that every
    listener of the agent follows the config without each call site
    passing it along.
    """
    global _process_limits
    _process_limits = limits


def process_limits() -> LimitsConfig:
    """The limits set by :func:`set_process_limits` (defaults until then)."""
    return _process_limits


class BurstLog:
    """Counts events of a kind and logs one summary line per interval.

    The first event after a quiet interval is logged at once (as a summary
    of one); later ones are summed into the next line.
    """

    def __init__(self, logger: logging.Logger, interval_s: float,
                 describe: Callable[[int, float], str]) -> None:  # fmt: skip
        self._log = logger
        self._interval = interval_s
        self._describe = describe
        self._count = 0
        self._window_start: float | None = None
        self._last_flush = float("-inf")
        self._handle: asyncio.TimerHandle | None = None
        self.total = 0

    def note(self) -> None:
        """Count one event; schedule the summary line."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._count += 1
        self.total += 1
        if self._window_start is None:
            self._window_start = now
        if self._handle is None:
            delay = max(self._last_flush + self._interval - now, 0.0)
            self._handle = loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Log the events counted since the last line (nothing if none)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._count:
            return
        now = asyncio.get_running_loop().time()
        span = now - (self._window_start if self._window_start is not None else now)
        self._log.warning("%s", self._describe(self._count, span))
        self._count = 0
        self._window_start = None
        self._last_flush = now


@dataclass(eq=False)
class Ticket:
    """One admitted, not yet authenticated connection."""

    gate: AdmissionGate
    deadline: float
    _held: bool = field(default=True)

    def remaining(self) -> float:
        """Seconds left until the handshake deadline (never negative)."""
        return max(self.deadline - asyncio.get_running_loop().time(), 0.0)

    def authenticated(self) -> None:
        """The connection authenticated: give its slot back (idempotent)."""
        self.release()

    def release(self) -> None:
        """Give the slot back, however the connection ended (idempotent)."""
        if self._held:
            self._held = False
            self.gate._release()

    @property
    def held(self) -> bool:
        """True until :meth:`authenticated` or :meth:`release`."""
        return self._held


class AdmissionGate:
    """The cap and deadline of unauthenticated connections of one listener."""

    def __init__(self, where: str, limits: LimitsConfig | None = None,
                 logger: logging.Logger | None = None) -> None:  # fmt: skip
        self.where = where
        self.limits = limits or process_limits()
        self.pending = 0
        self.peak = 0
        logger = logger or log
        cap = self.limits.max_unauthenticated
        self.refusals = BurstLog(
            logger, self.limits.refusal_log_interval_s,
            lambda n, s: f"{where}: refused {n} connection(s) in the last {s:.0f} s: "
            f"cap of {cap} unauthenticated connections reached ([limits] max_unauthenticated)",
        )  # fmt: skip
        self.timeouts = BurstLog(
            logger, self.limits.refusal_log_interval_s,
            lambda n, s: f"{where}: closed {n} connection(s) in the last {s:.0f} s that did "
            f"not authenticate within {self.limits.handshake_timeout_s:g} s "
            "([limits] handshake_timeout_s)",
        )  # fmt: skip
        self._failure_reason = ""
        self.failures = BurstLog(
            logger, self.limits.refusal_log_interval_s,
            lambda n, s: f"{where}: {n} connection(s) failed to authenticate in the last "
            f"{s:.0f} s (last: {self._failure_reason})",
        )  # fmt: skip

    def admit(self) -> Ticket | None:
        """A ticket for a new connection, or None (counted) when the cap is reached."""
        if self.pending >= self.limits.max_unauthenticated:
            self.refusals.note()
            return None
        self.pending += 1
        self.peak = max(self.peak, self.pending)
        deadline = asyncio.get_running_loop().time() + self.limits.handshake_timeout_s
        return Ticket(self, deadline)

    def failed(self, reason: object) -> None:
        """Count a connection that failed to authenticate (logged in bursts)."""
        self._failure_reason = str(reason)
        self.failures.note()

    def timed_out(self) -> None:
        """Count a connection closed at its handshake deadline (logged in bursts)."""
        self.timeouts.note()

    def _release(self) -> None:
        self.pending -= 1

    def close(self) -> None:
        """Write the pending summary lines (at shutdown)."""
        for burst in (self.refusals, self.timeouts, self.failures):
            burst.flush()


class TicketedHandler(Protocol):
    """A stream handler that takes its connection's ticket (``ferry.rpc.Server.handle_stream``)."""

    def __call__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        ticket: Ticket | None = None,
    ) -> Awaitable[None]: ...


class _SmallBufferSSLProtocol(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a receive buffer of two records, not 256 KiB."""

    max_size = TLS_READ_BUFFER


async def accept_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    protocol: asyncio.BaseProtocol,
    *,
    timeout: float,
) -> None:
    """Run the server side of a TLS handshake on the accepted ``sock`` in the event loop.

    ``protocol`` gets ``connection_made`` with the TLS transport once the
    handshake succeeded.  No thread and one :data:`TLS_READ_BUFFER` per
    connection.  On failure the connection is closed.

    Raises:
        TimeoutError: the handshake did not finish within ``timeout``.
        ssl.SSLError, OSError: the handshake failed (certificate refused,
            connection reset or closed).
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    # The deadline is ours (below); SSLProtocol's own handshake timeout
    # (60 s) never fires first.
    tls = _SmallBufferSSLProtocol(loop, protocol, context, waiter, server_side=True)
    transport, _ = await loop.connect_accepted_socket(lambda: tls, sock=sock)
    try:
        async with asyncio.timeout(timeout):
            await waiter
    except BaseException:
        transport.abort()
        raise
