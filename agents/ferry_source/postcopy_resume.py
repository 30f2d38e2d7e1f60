"""``ferryctl migrate NAME ferry://B --postcopy --postcopy-resume``: finish a broken post-copy.

A post-copy migration whose stream broke leaves both qemus paused
(``postcopy-paused``) and the domain fenced here as *post-copy*.  Resuming
re-establishes the stream under the same migration ID: the destination's
qemu listens again (``migrate-recover``, on a fresh port or through a fresh
tunnel), ours reconnects (``migrate`` with ``resume``), the destination's
CPUs are started if Finish never got there, and Confirm waits for the last
page as after any post-copy switch.  Nothing here can resume our copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ferry.errors import DomainState, FerryError, MigrationFailed
from ferry.fences import POSTCOPY
from ferry.flags import MigrationFlags
from ferry.jobs import AsyncJob
from ferry.jobs.recovery import PeerOutcome
from ferry.journal import MessageID, log_event
from ferry.qemu import query_migrate
from ferry.rpc import RequestContext
from ferry_source.begin import JOB_TIMEOUT
from ferry_source.context import SourceContext
from ferry_source.outgoing import Outgoing
from ferry_source.p2p import open_tunnel
from ferry_source.peer import ask_outcome, close_session, connect_peer, request
from ferry_source.postcopy_finish import complete_postcopy, fence_postcopy, send_finish

__all__ = ["resume_postcopy"]

log = logging.getLogger("ferry.source.migration")

RESUME_WAIT_S = 30.0
ASK_DEADLINE_S = 10.0


async def resume_postcopy(ctx: SourceContext, out: Outgoing, req: RequestContext) -> dict[str, Any]:
    """Reconnect the paused post-copy migration of ``out.domain`` and see it to the end.

    Raises:
        DomainState: the domain has no paused post-copy migration.
        PostcopyPaused: it broke again; the fence stays and the error says so.
    """
    emit = req.emit
    started = time.monotonic()
    dom = out.domain
    fence = ctx.fences.get(dom.uuid)
    if fence is None or fence.outcome != POSTCOPY:
        what = fence.describe() if fence is not None else "no migration of it is paused"
        raise DomainState(f"nothing to resume for domain '{dom.name}': {what}")
    out.migration_id = fence.migration_id
    status = ctx.host.load_status(dom.name)
    recorded = status.extra.get("postcopy", {}) if status is not None else {}
    out.dest_name = str(recorded.get("dest_name") or dom.name)
    out.was_running = fence.was_running
    out.leases_released = fence.leases_released
    proc = await ctx.host.process(dom.name)
    state = (await query_migrate(proc.qmp)).status
    if state not in ("postcopy-paused", "completed"):
        raise DomainState(
            f"the migration of '{dom.name}' cannot be resumed: qemu reports it {state}, "
            "not paused in post-copy"
        )
    job = await ctx.jobs.begin_async(
        dom.uuid, dom.name, AsyncJob.MIGRATION_OUT, flags=int(out.flags), phase="perform",
        migration_id=out.migration_id, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    out.job, out.proc, out.postcopy = job, proc, "active"
    job.record(postcopy="active", peer=out.peer, dest_name=out.dest_name)
    emit("phase", {"phase": "perform", "migration_id": out.migration_id})
    try:
        out.session = session = await connect_peer(ctx.config, out.host, out.port)
        if state == "postcopy-paused":
            await _reconnect(ctx, out, session)
        emit("phase", {"phase": "finish", "migration_id": out.migration_id})
        dest_host = out.peer
        finish_error: FerryError | None = None
        outcome, _ = await ask_outcome(ctx.config, out.host, out.port, out.migration_id,
                                       deadline_s=ASK_DEADLINE_S)  # fmt: skip
        if outcome is not PeerOutcome.RUNNING:
            try:
                dest_host = await send_finish(ctx, out, session)
            except FerryError as exc:
                finish_error = exc
        emit("phase", {"phase": "confirm", "migration_id": out.migration_id})
        return await complete_postcopy(ctx, out, {"resumed": True}, emit, started,
                                       dest_host=dest_host, finish_error=finish_error)  # fmt: skip
    except FerryError as exc:
        if ctx.fences.get(dom.uuid) is None or not isinstance(exc, DomainState):
            fence_postcopy(ctx, out, f"resuming failed: {exc}")
        raise
    finally:
        if out.tunnel is not None:
            await out.tunnel.close(drain=False)
        if out.session is not None:
            await close_session(out.session)
        await ctx.jobs.end_async(job)


async def _reconnect(ctx: SourceContext, out: Outgoing, session: Any) -> None:
    """Destination listens again, our qemu reconnects; wait until pages flow."""
    proc = out.proc
    assert proc is not None
    tunnelled = bool(out.flags & MigrationFlags.TUNNELLED)
    rec = await request(session, "postcopy_recover",
                        {"migration_id": out.migration_id, "tunnelled": tunnelled},
                        timeout=ctx.config.migration.reply_timeout_s, peer=out.peer)  # fmt: skip
    uri = str(rec["uri"])
    if tunnelled:
        out.tunnel = open_tunnel(ctx, out, rec)
        uri = out.tunnel.uri
    log_event(log, MessageID.MIGRATION_PHASE,
              f"resuming post-copy of {out.name} to {out.peer}", phase="perform")  # fmt: skip
    await proc.qmp.execute("migrate", {"uri": uri, "resume": True})
    deadline = time.monotonic() + RESUME_WAIT_S
    while True:
        stats = await query_migrate(proc.qmp)
        if stats.status in ("postcopy-active", "completed"):
            return
        if stats.status in ("failed", "cancelled") or time.monotonic() > deadline:
            raise MigrationFailed(
                f"resuming post-copy failed: qemu reports {stats.status}"
                f"{': ' + stats.error_desc if stats.error_desc else ''}"
            )
        await asyncio.sleep(0.05)
