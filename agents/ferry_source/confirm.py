"""Src Confirm: stop our copy after success, or give the VM back after failure.

Both are called by the p2p driver, by recovery after a restart, and by
``migrate-recover``; each takes plain recorded facts (not a live
:class:`~ferry_source.outgoing.Outgoing`) so that a restarted agent can
call it with what the job record holds.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ferry.errors import FerryError, NoDomain
from ferry.fences import MIGRATED, UNKNOWN, Fence
from ferry.jobs.recovery import QemuView
from ferry.journal import MessageID, log_event
from ferry.qemu import SavedMigrationSettings, query_migrate
from ferry_source.context import SourceContext
from ferry_source.mirror import clear_stale_mirrors
from ferry_source.snapshot_move import drop_source_snapshots

__all__ = ["fence_unknown", "observe_qemu", "resume_source", "stop_source"]

log = logging.getLogger("ferry.source.migration")


async def observe_qemu(ctx: SourceContext, name: str) -> QemuView:
    """What the recovery table needs from our qemu: alive, running, migration state."""
    try:
        proc = await ctx.host.process(name, timeout=5.0)
        run = await proc.qmp.query_status()
        stats = await query_migrate(proc.qmp)
    except FerryError:
        return QemuView(alive=False)
    return QemuView(alive=True, running=run.running, migration=stats.status)


async def resume_source(
    ctx: SourceContext,
    name: str,
    *,
    was_running: bool,
    leases_released: bool,
    saved: dict[str, Any] | None = None,
) -> str:
    """Confirm after failure: leases back, settings back, then the CPUs if it had them.

    Returns what happened, for the log and the caller's message.  Only call
    this when the destination's copy is known not to run.
    """
    try:
        proc = await ctx.host.process(name)
    except (NoDomain, FerryError) as exc:
        return f"the source copy is gone ({exc})"
    if saved:
        with contextlib.suppress(FerryError, ValueError, KeyError):
            await SavedMigrationSettings.from_dict(saved).restore(proc.qmp)
    # A storage copy's mirrors outlive an agent killed mid-copy: gone now.
    await clear_stale_mirrors(proc)
    if leases_released:
        live = ctx.host.find(name)
        try:
            await ctx.host.acquire_leases(live.domain, proc)
        except FerryError as exc:
            # Someone else holds a disk now: running would risk two
            # writers.  The VM stays paused; the operator decides.
            log.error("cannot take the disk leases back (%s); %s stays paused", exc, name)
            return f"kept paused: the disk leases could not be taken back ({exc})"
    if not was_running:
        return "left paused, as it was before the migration"
    try:
        run = await proc.qmp.query_status()
        # A guest paused on an I/O error stays paused (as libvirt):
        # resuming would only repeat the failing request.
        if run.status == "io-error" or run.reason == "io-error":
            return "left paused on its I/O error"
        if not run.running:
            await proc.qmp.execute("cont")
        _set_run_state(ctx, name, "running")
    except FerryError as exc:
        return f"could not be resumed: {exc}"
    log.info("source CPUs resumed after the failed migration")
    return "resumed on the source"


async def stop_source(
    ctx: SourceContext,
    name: str,
    uuid: str,
    *,
    migration_id: str,
    peer: str,
    peer_uri: str,
    undefine: bool,
) -> None:
    """Confirm after success: fence, stop our qemu, undefine when asked.

    The fence is written first: if we die between the two, a restarted
    agent (or an operator's ``start``) still knows the VM lives elsewhere.
    """
    ctx.fences.put(Fence(uuid=uuid, name=name, migration_id=migration_id, peer=peer,
                         peer_uri=peer_uri, outcome=MIGRATED))  # fmt: skip
    await ctx.host.kill(name)
    if undefine:
        ctx.host.delete_definition(name)
    drop_source_snapshots(ctx, name, undefine=undefine)


def fence_unknown(
    ctx: SourceContext, name: str, uuid: str, *, migration_id: str, peer: str, peer_uri: str,
    reason: str, was_running: bool, leases_released: bool,
) -> Fence:  # fmt: skip
    """Leave the VM paused here with the outcome unknown, and say so everywhere."""
    fence = Fence(uuid=uuid, name=name, migration_id=migration_id, peer=peer,
                  peer_uri=peer_uri, outcome=UNKNOWN, reason=reason, was_running=was_running,
                  leases_released=leases_released)  # fmt: skip
    ctx.fences.put(fence)
    log_event(log, MessageID.MIGRATION_PHASE,
              f"{name} stays paused here: {fence.describe()}; "
              f"run 'ferryctl migrate-recover {name}' once {peer} is back",
              level=logging.ERROR)  # fmt: skip
    return fence


def _set_run_state(ctx: SourceContext, name: str, state: str) -> None:
    status = ctx.host.load_status(name)
    if status is not None and status.run_state != state:
        status.run_state = state
        ctx.host.save_status(status)
