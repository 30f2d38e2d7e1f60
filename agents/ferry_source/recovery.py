"""ferry-source after a restart: settle every outgoing migration it left behind.

The decision is the sans-I/O table of :mod:`ferry.jobs.recovery`; this is
its driver.  Jobs are adopted at start-up, before the admin socket serves
(so nobody can resume a domain whose migration is being settled); the
settling runs in the background because asking a destination may take up
to ``outcome_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ferry.errors import FerryError
from ferry.flags import MigrationFlags
from ferry.jobs import AsyncJob, Job
from ferry.jobs.recovery import OutgoingAction, PeerOutcome, decide_outgoing
from ferry.journal import LogContext, MessageID, log_event
from ferry.statefile import JobRecord
from ferry_source.checks import parse_dest_uri
from ferry_source.confirm import observe_qemu, resume_source, stop_source
from ferry_source.context import SourceContext
from ferry_source.offline import recover_offline
from ferry_source.peer import ask_outcome
from ferry_source.perform import cancel_migration
from ferry_source.postcopy import PostcopyEnd, wait_postcopy_end
from ferry_source.postcopy_finish import postcopy_fence
from ferry_source.settle import Subject, settle

__all__ = ["OutgoingRecovery"]

log = logging.getLogger("ferry.source.recovery")


class OutgoingRecovery:
    """Adopts and settles the outgoing jobs a previous ferry-source left."""

    def __init__(self, ctx: SourceContext) -> None:
        self.ctx = ctx
        self._adopted: list[tuple[Job, JobRecord]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def adopt_all(self) -> None:
        """Take over every recorded MIGRATION_OUT job (they hold their domains)."""
        for found in self.ctx.jobs.recorded():
            if found.job.async_job != AsyncJob.MIGRATION_OUT:
                continue
            try:
                job = await self.ctx.jobs.adopt(found.uuid, found.name, found.job, timeout=5.0)
            except FerryError as exc:
                log.error("cannot adopt the outgoing job of %s: %s", found.name, exc)
                continue
            self._adopted.append((job, found.job))

    def start(self) -> None:
        """Settle the adopted jobs in the background."""
        for job, record in self._adopted:
            task = asyncio.create_task(self._recover(job, record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._adopted.clear()

    def pending(self) -> int:
        """How many recoveries are still running."""
        return len(self._tasks)

    async def stop(self) -> None:
        """Cancel recoveries still running (their jobs stay recorded for the next start)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _recover(self, job: Job, record: JobRecord) -> None:
        name = job.name
        data = record.data
        with LogContext(domain=name, uuid=job.uuid, migration_id=record.migration_id or "",
                        phase=record.phase or ""):  # fmt: skip
            try:
                if data.get("offline"):
                    # Nothing changed here: nothing to settle, the job just ends.
                    recover_offline(job, record)
                else:
                    view = await observe_qemu(self.ctx, name)
                    decision = decide_outgoing(record.phase, view, result=data.get("result"),
                                               postcopy=bool(data.get("postcopy")))  # fmt: skip
                    what = f"{decision.action.value} — {decision.reason}"
                    log_event(log, MessageID.MIGRATION_PHASE,
                              f"recovering the outgoing migration of {name} (phase "
                              f"{record.phase}): {what}")  # fmt: skip
                    await self._act(job, record, decision.action)
            except asyncio.CancelledError:
                # Stopping: leave the record for the next start.
                raise
            except Exception:
                log.exception("recovery of %s failed; its job record is cleared", name)
            await self.ctx.jobs.end_async(job)

    async def _act(self, job: Job, record: JobRecord, action: OutgoingAction) -> None:
        ctx, name, data = self.ctx, job.name, record.data
        was_running = bool(data.get("was_running", True))
        leases_released = bool(data.get("leases_released", False))
        flags = MigrationFlags(int(data.get("flags", record.flags)))
        peer = str(data.get("peer") or "")
        peer_uri = str(data.get("peer_uri") or "")
        migration_id = record.migration_id or ""
        if data.get("postcopy"):
            await self._act_postcopy(job, record, action)
            return
        if action is OutgoingAction.CANCEL:
            with contextlib.suppress(FerryError):
                await cancel_migration(await ctx.host.process(name))
        if action in (OutgoingAction.CANCEL, OutgoingAction.RESUME):
            what = await resume_source(ctx, name, was_running=was_running,
                                       leases_released=leases_released,
                                       saved=record.saved_migration)  # fmt: skip
            log_event(log, MessageID.MIGRATION_FAILED,
                      f"migration {migration_id} of {name} rolled back after a restart: {what}",
                      level=logging.WARNING)  # fmt: skip
        elif action is OutgoingAction.CONFIRM:
            await stop_source(ctx, name, job.uuid, migration_id=migration_id, peer=peer,
                              peer_uri=peer_uri,
                              undefine=bool(flags & MigrationFlags.UNDEFINE_SOURCE))  # fmt: skip
            log_event(log, MessageID.MIGRATION_COMPLETED,
                      f"migration {migration_id} of {name} confirmed after a restart: "
                      f"it runs on {peer}")  # fmt: skip
        elif action is OutgoingAction.ASK:
            await settle(ctx, Subject(
                name=name, uuid=job.uuid, migration_id=migration_id, peer=peer,
                peer_uri=peer_uri, was_running=was_running, leases_released=leases_released,
                undefine=bool(flags & MigrationFlags.UNDEFINE_SOURCE),
                saved=record.saved_migration,
            ), deadline_s=ctx.config.migration.outcome_timeout_s, job=job)  # fmt: skip

    async def _act_postcopy(self, job: Job, record: JobRecord, action: OutgoingAction) -> None:
        """After the switch: follow, confirm or fence; never resume."""
        ctx, name, data = self.ctx, job.name, record.data
        peer = str(data.get("peer") or "")
        peer_uri = str(data.get("peer_uri") or "")
        migration_id = record.migration_id or ""
        detail = "the agent restarted during post-copy"
        if action is OutgoingAction.FOLLOW_POSTCOPY:
            end, detail = await wait_postcopy_end(
                await ctx.host.process(name), stall_s=ctx.config.migration.stall_timeout_s
            )
            action = OutgoingAction.ASK if end == PostcopyEnd.COMPLETED else action
        if action is OutgoingAction.ASK:
            host, port = parse_dest_uri(peer_uri)
            outcome, _ = await ask_outcome(ctx.config, host, port, migration_id,
                                           deadline_s=ctx.config.migration.outcome_timeout_s)
            action = OutgoingAction.CONFIRM if outcome is PeerOutcome.RUNNING else action
            detail = f"post-copy completed; the destination says {outcome.value}"
        if action is OutgoingAction.CONFIRM:
            flags = MigrationFlags(int(data.get("flags", record.flags)))
            await stop_source(ctx, name, job.uuid, migration_id=migration_id, peer=peer,
                              peer_uri=peer_uri,
                              undefine=bool(flags & MigrationFlags.UNDEFINE_SOURCE))  # fmt: skip
            log_event(log, MessageID.MIGRATION_COMPLETED,
                      f"post-copy migration {migration_id} of {name} confirmed after a "
                      f"restart: it runs on {peer}")  # fmt: skip
            return
        postcopy_fence(ctx, name, job.uuid, migration_id=migration_id, peer=peer,
                       peer_uri=peer_uri, dest_name=str(data.get("dest_name") or name),
                       reason=detail, was_running=bool(data.get("was_running", True)),
                       leases_released=bool(data.get("leases_released", False)))  # fmt: skip
