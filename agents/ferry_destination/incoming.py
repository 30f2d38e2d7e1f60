"""One incoming migration in flight, its watchdog, and how it is discarded.

The watchdog kills an incoming qemu whose source went away (its control
connection closed before Finish) or stopped making progress: no Finish and
no movement of the stream for ``[destination] incoming_timeout_s``.  It
never kills a migration that is still moving: the source reports its bytes
(``migration_progress``) and a tunnel counts its own.  Whatever ends an
incoming migration records the outcome with the reason first, so the
source's question gets a true answer.

A client-driven migration (Prepare called by a client such as ferryctl,
not by the source host's agent) is bound to the client's connection the
same way, with a grace: once that connection closes, another client has
``[migration] client_grace_s`` to take the migration over
(``adopt_incoming``, ``ferryctl migrate-recover``) before it is discarded.
:class:`Binding` holds that rule, apart from any socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferry.domain import Domain
from ferry.errors import FerryError, PhaseError
from ferry.flags import MigrationFlags
from ferry.jobs import Job
from ferry.journal import MessageID, log_event
from ferry.outcomes import FAILED
from ferry.protocol.phases import DestinationPhases
from ferry.qemu import QemuProcess
from ferry.snapshots import TreeAssembler
from ferry_destination.context import DestinationContext
from ferry_destination.nbd_export import remove_images
from ferry_destination.tunnel import IncomingTunnel

__all__ = ["Binding", "Incoming", "discard", "end_tunnel", "watchdog"]

log = logging.getLogger("ferry.destination")

WATCH_INTERVAL = 1.0


class Connection(Protocol):
    """What the watchdog needs of a control connection (:class:`ferry.rpc.Session`)."""

    @property
    def closed(self) -> bool:
        """True once the connection has ended."""
        ...

    async def wait_closed(self) -> None:
        """Return once the connection has ended."""
        ...


@dataclass
class Binding:
    """The control connection an incoming migration follows, and what its close means.

    A migration the source drives (p2p) ends with its source's connection.
    A client-driven one outlives its client's connection by ``grace_s``
    (``[migration] client_grace_s``), for another client to :meth:`adopt` it.
    """

    session: Connection
    client_driven: bool = False
    grace_s: float = 0.0
    #: When the followed connection was first seen closed (None: it is open).
    lost_at: float | None = None

    def verdict(self, now: float) -> str | None:
        """Why to discard the migration now (``now``: monotonic), or None to keep it."""
        if not self.session.closed:
            self.lost_at = None
            return None
        if not self.client_driven:
            return "the source's connection closed before Finish"
        if self.lost_at is None:
            self.lost_at = now
        if now - self.lost_at < self.grace_s:
            return None
        return (f"the client's connection closed before Finish and no client took the "
                f"migration over within {self.grace_s:g} s (ferryctl migrate-recover)")  # fmt: skip

    def adopt(self, session: Connection) -> bool:
        """Follow ``session`` from now on; True if the one it replaces was still open.

        Raises:
            PhaseError: the migration is driven by its source host, not a client.
        """
        if not self.client_driven:
            raise PhaseError("this migration is driven by its source host, not a client")
        replaced_open = not self.session.closed
        self.session = session
        self.lost_at = None
        return replaced_open


@dataclass
class Incoming:
    """One prepared incoming migration."""

    domain: Domain
    job: Job
    proc: QemuProcess
    migration_id: str
    flags: MigrationFlags
    source_host: str = ""
    phases: DestinationPhases = field(default_factory=DestinationPhases)
    finishing: bool = False
    watchdog: asyncio.Task[None] | None = None
    tunnel: IncomingTunnel | None = None
    #: Bytes the source last reported, and when that figure last grew.
    reported: int = 0
    moved_at: float = field(default_factory=time.monotonic)
    #: In post-copy with no Finish yet and the source gone: kept, never discarded.
    held: bool = False
    #: The control connection the watchdog follows (set by Prepare).
    binding: Binding | None = None
    #: Prepare's reply without its tunnel token: what ``adopt_incoming`` hands a new client.
    answer: dict[str, Any] | None = None
    #: Images this host created for a storage copy (deleted if the migration fails).
    created_images: list[str] = field(default_factory=list)
    #: The snapshot hierarchy the source sent (feature ``snapshots``), until Finish.
    snapshots: TreeAssembler | None = None

    @property
    def client_driven(self) -> bool:
        """True when a client (ferryctl), not the source host's agent, called Prepare."""
        return self.binding is not None and self.binding.client_driven

    def note_progress(self, transferred: int) -> None:
        """The source says the stream reached ``transferred`` bytes."""
        if transferred > self.reported:
            self.reported = transferred
            self.moved_at = time.monotonic()


async def watchdog(ctx: DestinationContext, incoming: Incoming) -> None:
    """Discard ``incoming`` if its source (or client) vanished or the stream stopped moving.

    It follows ``incoming.binding``'s connection, whichever that is now: a
    client that adopted the migration replaces the one that went away.
    """
    assert incoming.binding is not None
    binding = incoming.binding
    timeout = ctx.config.destination.incoming_timeout_s
    watched: Connection | None = None
    closed: asyncio.Task[None] | None = None
    tunnel_bytes = -1
    try:
        while True:
            if binding.session is not watched:
                if closed is not None:
                    closed.cancel()
                watched = binding.session
                closed = asyncio.create_task(watched.wait_closed())
            assert closed is not None
            if closed.done():
                # In its grace: look again for an adopter or the deadline.
                await asyncio.sleep(WATCH_INTERVAL)
            else:
                await asyncio.wait({closed}, timeout=WATCH_INTERVAL)
            if incoming.finishing:
                return
            in_grace = binding.lost_at is not None
            lost = binding.verdict(time.monotonic())
            if lost is not None:
                reason = lost
                break
            if binding.lost_at is not None and not in_grace:
                log_event(log, MessageID.MIGRATION_PHASE,
                          f"incoming {incoming.domain.name}: the client's connection closed "
                          f"before Finish; keeping the migration {binding.grace_s:g} s for "
                          "a client to take it over (ferryctl migrate-recover)",
                          domain=incoming.domain.name, migration_id=incoming.migration_id,
                          level=logging.WARNING)  # fmt: skip
            if incoming.tunnel is not None:
                received = sum(incoming.tunnel.set.bytes())
                if received != tunnel_bytes:
                    tunnel_bytes = received
                    incoming.moved_at = time.monotonic()
            idle = time.monotonic() - incoming.moved_at
            if idle > timeout:
                reason = f"no Finish and no progress of the stream for {timeout:.0f}s"
                break
        from ferry_destination.postcopy import hold, postcopy_state

        if await postcopy_state(incoming.proc) is not None:
            # The CPU state is here and the source never resumes: killing
            # this qemu would lose the VM.
            await hold(ctx, incoming, reason)
            return
        log_event(log, MessageID.MIGRATION_ABORTED,
                  f"incoming {incoming.domain.name}: {reason}; killing the incoming qemu",
                  domain=incoming.domain.name, migration_id=incoming.migration_id,
                  level=logging.WARNING)  # fmt: skip
        await discard(ctx, incoming, reason)
    finally:
        if closed is not None:
            closed.cancel()


async def discard(ctx: DestinationContext, incoming: Incoming, reason: str) -> None:
    """Kill the incoming qemu, revoke its tokens, record FAILED with ``reason``, end the job."""
    name = incoming.domain.name
    if ctx.incoming.get(name) is not incoming:
        return
    ctx.incoming.pop(name, None)
    ctx.notify_status()
    if incoming.watchdog is not None and incoming.watchdog is not asyncio.current_task():
        incoming.watchdog.cancel()
    with contextlib.suppress(FerryError, PhaseError):
        incoming.phases.abort()
    try:
        await ctx.host.kill(name)
        # Only once qemu is gone: it held them open (and the mirror wrote).
        remove_images(incoming.created_images)
        ctx.outcomes.record(incoming.migration_id, FAILED, domain=name,
                            uuid=incoming.domain.uuid, reason=reason,
                            source_host=incoming.source_host)  # fmt: skip
    finally:
        await end_tunnel(ctx, incoming, drain=False)
        await ctx.jobs.end_async(incoming.job)


async def end_tunnel(ctx: DestinationContext, incoming: Incoming, *, drain: bool) -> None:
    """Revoke the tunnel's tokens and close its channels."""
    tunnel = incoming.tunnel
    if tunnel is None:
        return
    ctx.tokens.revoke(incoming.domain.name)
    await tunnel.close(drain=drain)
