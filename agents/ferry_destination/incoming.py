"""One incoming migration in flight, its watchdog, and how it is discarded.

The watchdog kills an incoming qemu whose source went away (its control
connection closed before Finish) or stopped making progress: no Finish and
no movement of the stream for ``[destination] incoming_timeout_s``.  It
never kills a migration that is still moving: the source reports its bytes
(``migration_progress``) and a tunnel counts its own.  Whatever ends an
incoming migration records the outcome with the reason first, so the
source's question gets a true answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from ferry.domain import Domain
from ferry.errors import FerryError, PhaseError
from ferry.flags import MigrationFlags
from ferry.jobs import Job
from ferry.journal import MessageID, log_event
from ferry.outcomes import FAILED
from ferry.protocol.phases import DestinationPhases
from ferry.qemu import QemuProcess
from ferry.rpc import Session
from ferry_destination.context import DestinationContext
from ferry_destination.tunnel import IncomingTunnel

__all__ = ["Incoming", "discard", "end_tunnel", "watchdog"]

log = logging.getLogger("ferry.destination")

WATCH_INTERVAL = 1.0


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

    def note_progress(self, transferred: int) -> None:
        """The source says the stream reached ``transferred`` bytes."""
        if transferred > self.reported:
            self.reported = transferred
            self.moved_at = time.monotonic()


async def watchdog(ctx: DestinationContext, incoming: Incoming, session: Session) -> None:
    """Discard ``incoming`` if its source vanished or the stream stopped moving."""
    timeout = ctx.config.destination.incoming_timeout_s
    closed = asyncio.create_task(session.wait_closed())
    tunnel_bytes = -1
    try:
        while True:
            done, _ = await asyncio.wait({closed}, timeout=WATCH_INTERVAL)
            if incoming.finishing:
                return
            if done:
                reason = "the source's connection closed before Finish"
                break
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
