"""ferry-destination after a restart: decide every incoming migration it left behind.

Runs before the agent serves, so a source asking for the outcome gets the
decided answer.  The decision is :func:`ferry.jobs.recovery.decide_incoming`
on the durable outcome record and what qemu says; an outcome record still
``prepared`` or ``finishing`` without a job (the job ended but the record
was not updated) is decided the same way.
"""

from __future__ import annotations

import contextlib
import logging

from ferry.errors import FerryError
from ferry.jobs import AsyncJob
from ferry.jobs.recovery import IncomingAction, QemuView, decide_incoming
from ferry.journal import LogContext, MessageID, log_event
from ferry.outcomes import FAILED, FINISHING, POSTCOPY, PREPARED, RUNNING
from ferry.qemu import query_migrate
from ferry_destination.context import DestinationContext
from ferry_destination.nbd_export import CREATED_KEY, remove_images

__all__ = ["recover_incoming"]

log = logging.getLogger("ferry.destination.recovery")


async def recover_incoming(dst: DestinationContext) -> None:
    """Kill or keep each interrupted incoming migration, record why, clear its job."""
    decided: set[str] = set()
    for found in dst.jobs.recorded():
        record = found.job
        if record.async_job != AsyncJob.MIGRATION_IN:
            continue
        try:
            job = await dst.jobs.adopt(found.uuid, found.name, record, timeout=5.0)
        except FerryError as exc:
            log.error("cannot adopt the incoming job of %s: %s", found.name, exc)
            continue
        migration_id = record.migration_id or ""
        try:
            await _decide(dst, found.name, found.uuid, migration_id)
            decided.add(migration_id)
        except Exception:
            log.exception("recovery of incoming %s failed", found.name)
        finally:
            await dst.jobs.end_async(job)
    # Records left undecided without a job (a crash between the job's end
    # and the record's update cannot happen today, but a damaged run dir can).
    for entry in dst.outcomes.all():
        if entry.state in (PREPARED, FINISHING) and entry.migration_id not in decided:
            await _decide(dst, entry.domain, entry.uuid, entry.migration_id)


async def _decide(
    dst: DestinationContext, name: str, uuid: str, migration_id: str
) -> IncomingAction:
    entry = dst.outcomes.get(migration_id) if migration_id else None
    with LogContext(domain=name, uuid=uuid, migration_id=migration_id, phase="finish"):
        view = await _observe(dst, name, uuid)
        decision = decide_incoming(entry.state if entry else None, view)
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"recovering incoming {name} after a restart: {decision.action.value} — "
                  f"{decision.reason}")  # fmt: skip
        if decision.action is IncomingAction.HOLD:
            # Post-copy with the CPUs not started: the CPU state is here and
            # the source never resumes.  Keep qemu; the source's
            # --postcopy-resume (or its restarted agent) finishes the move.
            if migration_id:
                dst.outcomes.record(migration_id, POSTCOPY, domain=name, uuid=uuid,
                                    reason=decision.reason,
                                    source_host=entry.source_host if entry else "")  # fmt: skip
            status = dst.host.load_status(name)
            if status is not None:
                status.run_state = "paused"
                status.extra["postcopy"] = {"migration_id": migration_id, "held": True}
                dst.host.save_status(status)
            # As after Finish: this host's ferry-source shows it (paused) and
            # can destroy it if the VM turns out lost.
            await dst.host.release(name)
            return decision.action
        if decision.action is IncomingAction.KEEP:
            if entry is not None and entry.state != RUNNING:
                dst.outcomes.record(migration_id, RUNNING, domain=name, uuid=uuid,
                                    reason=decision.reason, source_host=entry.source_host)
            dst.fences.clear(uuid)
            status = dst.host.load_status(name)
            if status is not None and view.alive:
                status.run_state = "running" if view.running else "paused"
                dst.host.save_status(status)
            await dst.host.release(name)
            return decision.action
        status = dst.host.load_status(name)
        if status is not None and status.uuid == uuid:
            created = status.extra.get(CREATED_KEY)
            await dst.host.kill(name)  # by pid if its monitor is wedged
            if isinstance(created, list):
                # A storage copy's half-made images: only those this host created.
                remove_images(p for p in created if isinstance(p, str))
        if migration_id and (entry is None or entry.state != FAILED):
            dst.outcomes.record(migration_id, FAILED, domain=name, uuid=uuid,
                                reason=f"ferry-destination restarted: {decision.reason}",
                                source_host=entry.source_host if entry else "")  # fmt: skip
        return decision.action


async def _observe(dst: DestinationContext, name: str, uuid: str) -> QemuView:
    status = dst.host.load_status(name)
    if status is None or status.uuid != uuid:
        return QemuView(alive=False)
    with contextlib.suppress(FerryError):
        proc = await dst.host.process(name, timeout=5.0)
        run = await proc.qmp.query_status()
        stats = await query_migrate(proc.qmp)
        return QemuView(alive=True, running=run.running, migration=stats.status)
    return QemuView(alive=False)
