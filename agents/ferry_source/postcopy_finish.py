"""Finish and Confirm of a migration that switched to post-copy.

From the switch on the destination holds the VM: Finish starts its CPUs
while the rest of memory still streams, Confirm waits until qemu sent the
last page and only then stops our qemu.  Nothing here resumes our copy.
When the stream breaks (both qemus ``postcopy-paused``) or the destination
cannot be told to start, the domain is fenced as *post-copy* (``start`` and
``resume`` refuse it) and the error says how to finish the move:
``ferryctl migrate NAME ferry://B --postcopy --postcopy-resume``
(:mod:`ferry_source.postcopy_resume`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ferry.errors import FerryError, PostcopyPaused
from ferry.fences import POSTCOPY, Fence
from ferry.flags import MigrationFlags
from ferry.jobs.recovery import PeerOutcome
from ferry.journal import MessageID, log_event
from ferry.protocol.cookie import Cookie
from ferry.qemu import MigrationStats, query_migrate
from ferry.rpc import Session
from ferry_source.confirm import stop_source
from ferry_source.context import Emit, SourceContext
from ferry_source.outgoing import Outgoing
from ferry_source.peer import ask_outcome, request
from ferry_source.postcopy import PostcopyEnd, wait_postcopy_end
from ferry_source.summary import summary

__all__ = [
    "complete_postcopy",
    "fence_postcopy",
    "finish_postcopy",
    "postcopy_fence",
    "send_finish",
]

log = logging.getLogger("ferry.source.migration")

#: How long to ask the destination whether it runs, when Finish's reply was lost.
ASK_DEADLINE_S = 15.0


async def send_finish(ctx: SourceContext, out: Outgoing, session: Session) -> str:
    """Finish at the destination: it starts the CPUs; its host name."""
    fin = await request(session, "finish", {
        "name": out.dest_name, "cookie": Cookie().encode(), "flags": int(out.flags),
        "params": out.params.to_wire(), "cancelled": False, "migration_id": out.migration_id,
    }, timeout=ctx.config.migration.reply_timeout_s, peer=out.peer)  # fmt: skip
    if out.job is not None:
        out.job.record(dest_running=True)
    return str(fin.get("host") or out.peer)


async def finish_postcopy(
    ctx: SourceContext,
    out: Outgoing,
    session: Session,
    stats: dict[str, Any],
    perform_error: FerryError | None,
    emit: Emit,
    started: float,
    *,
    phase: Callable[[Outgoing, Emit, str], None],
) -> dict[str, Any]:
    """Finish (start the CPUs there), then Confirm once the last page went.

    Raises:
        PostcopyPaused: the move stopped half-way; the domain is fenced here
            and the message says how to resume it.
    """
    phase(out, emit, "finish")
    dest_host = out.peer
    finish_error: FerryError | None = perform_error
    if perform_error is None:
        try:
            dest_host = await send_finish(ctx, out, session)
        except FerryError as exc:
            finish_error = exc
            log.warning("finish in post-copy failed: %s; following the stream anyway", exc)
    phase(out, emit, "confirm")
    return await complete_postcopy(ctx, out, stats, emit, started, dest_host=dest_host,
                                   finish_error=finish_error)  # fmt: skip


async def complete_postcopy(
    ctx: SourceContext,
    out: Outgoing,
    stats: dict[str, Any],
    emit: Emit,
    started: float,
    *,
    dest_host: str,
    finish_error: FerryError | None,
) -> dict[str, Any]:
    """Confirm of post-copy: wait for the last page, then stop our qemu (or fence it paused)."""
    proc = out.proc
    assert proc is not None
    steering = out.steer()

    def progress(now: MigrationStats) -> None:
        elapsed = time.monotonic() - out.started_at
        steering.tick(now, elapsed)
        eta = steering.eta_s()
        snap = {"status": now.status, "transferred": now.ram_transferred,
                "remaining": now.ram_remaining, "total": now.ram_total,
                "elapsed_s": round(elapsed, 3),
                "eta_s": round(eta, 2) if eta is not None else None,
                "postcopy_requests": _ram(now).get("postcopy-requests", 0)}  # fmt: skip
        out.progress.clear()
        out.progress.update(snap)
        emit("progress", snap)

    end, detail = await wait_postcopy_end(
        proc, stall_s=ctx.config.migration.stall_timeout_s, on_progress=progress
    )
    if end == PostcopyEnd.COMPLETED and finish_error is not None:
        # Every page went, but did the destination start its CPUs?
        outcome, _ = await ask_outcome(ctx.config, out.host, out.port, out.migration_id,
                                       deadline_s=ASK_DEADLINE_S)  # fmt: skip
        if outcome is not PeerOutcome.RUNNING:
            end, detail = PostcopyEnd.PAUSED, (
                f"all memory reached {out.peer} but it did not confirm starting the CPUs "
                f"({finish_error})"
            )
    if end != PostcopyEnd.COMPLETED and not proc.alive():
        # Our qemu held the pages B has not fetched yet: nothing can
        # complete this VM any more.  Say so instead of advising a resume.
        fence_postcopy(ctx, out, f"the source qemu died in post-copy ({detail})")
        raise PostcopyPaused(
            f"post-copy migration {out.migration_id} of '{out.name}' to {out.peer} failed: "
            f"the source qemu died after the switch ({detail}), and with it the pages "
            f"{out.peer} had not fetched yet; the VM cannot be completed anywhere. Its CPU "
            f"state is held paused on {out.peer} ('ferryctl destroy {out.dest_name}' there "
            "ends it)",
            migration_id=out.migration_id, peer=out.peer,
        )  # fmt: skip
    if end != PostcopyEnd.COMPLETED:
        fence_postcopy(ctx, out, detail)
        raise PostcopyPaused(
            f"post-copy migration {out.migration_id} of '{out.name}' to {out.peer} stopped "
            f"half-way: {detail}. The VM cannot run here any more (its newest state is on "
            f"{out.peer}); finish the move with 'ferryctl migrate {out.name} {out.peer_uri} "
            "--postcopy --postcopy-resume' once the link is back",
            migration_id=out.migration_id, peer=out.peer,
        )  # fmt: skip
    stats.update(await out.end_tunnel(drain=True))
    final = await _final_stats(out)
    stats.update(final)
    if out.job is not None:
        out.job.record(result="completed")
    undefine = bool(out.flags & MigrationFlags.UNDEFINE_SOURCE)
    await stop_source(ctx, out.name, out.domain.uuid, migration_id=out.migration_id,
                      peer=dest_host, peer_uri=out.peer_uri, undefine=undefine)  # fmt: skip
    return summary(out, stats, dest_host, started)


async def _final_stats(out: Outgoing) -> dict[str, Any]:
    assert out.proc is not None
    try:
        done = await query_migrate(out.proc.qmp)
    except FerryError:
        return {}
    ram = _ram(done)
    downtime = done.downtime_ms
    if downtime is not None and done.total_time_ms is not None and downtime > done.total_time_ms:
        # qemu 7.2 sometimes reports a post-copy downtime counted from an
        # unset start (hours, measured once): a figure longer than the whole
        # migration is not a downtime.
        downtime = None
    return {
        "total_time_ms": done.total_time_ms,
        "downtime_ms": downtime,
        "transferred": done.ram_transferred,
        "postcopy_bytes": ram.get("postcopy-bytes"),
        "postcopy_requests": ram.get("postcopy-requests"),
        "passes": done.ram_dirty_sync_count,
        "postcopy": True,
    }


def _ram(stats: MigrationStats) -> dict[str, Any]:
    ram = stats.raw.get("ram")
    return ram if isinstance(ram, dict) else {}


def fence_postcopy(ctx: SourceContext, out: Outgoing, reason: str) -> Fence:
    """Fence the domain here as paused in post-copy, and say so in the journal."""
    if out.job is not None:
        out.job.record(postcopy="paused", dest_name=out.dest_name)
    return postcopy_fence(ctx, out.name, out.domain.uuid, migration_id=out.migration_id,
                          peer=out.peer, peer_uri=out.peer_uri, dest_name=out.dest_name,
                          reason=reason, was_running=out.was_running,
                          leases_released=out.leases_released)  # fmt: skip


def postcopy_fence(
    ctx: SourceContext, name: str, uuid: str, *, migration_id: str, peer: str, peer_uri: str,
    dest_name: str, reason: str, was_running: bool = True, leases_released: bool = False,
) -> Fence:  # fmt: skip
    """The post-copy fence from recorded facts (also used by recovery after a restart)."""
    fence = Fence(uuid=uuid, name=name, migration_id=migration_id, peer=peer,
                  peer_uri=peer_uri, outcome=POSTCOPY, reason=reason, was_running=was_running,
                  leases_released=leases_released)  # fmt: skip
    ctx.fences.put(fence)
    status = ctx.host.load_status(name)
    if status is not None:
        status.run_state = "paused"
        status.extra["postcopy"] = {"migration_id": migration_id, "peer_uri": peer_uri,
                                    "dest_name": dest_name}  # fmt: skip
        ctx.host.save_status(status)
    log_event(log, MessageID.MIGRATION_FAILED,
              f"{name}: {fence.describe()}; run 'ferryctl migrate {name} {peer_uri} "
              "--postcopy --postcopy-resume' to finish it",
              phase="confirm", level=logging.ERROR)  # fmt: skip
    return fence
