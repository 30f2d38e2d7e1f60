"""Post-copy on the destination: hold the copy, never discard it, and reconnect a broken stream.

Once its qemu is in post-copy, the destination holds the VM's CPU state and
the source never resumes: discarding the incoming qemu then would lose the
VM.  So the watchdog and the outcome question *hold* such a migration
(record ``postcopy``, keep qemu) instead of discarding it, and
``postcopy_recover`` lets the source reconnect a paused stream: qemu's
``migrate-recover`` on a fresh port, or on a fresh tunnel socket with a new
token when the migration is tunnelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ferry.acl import check_access
from ferry.errors import FerryError, MigrationFailed, PhaseError
from ferry.flags import MigrationFlags
from ferry.jobs.recovery import POSTCOPY_STATES
from ferry.journal import LogContext, MessageID, log_event
from ferry.outcomes import FINISHING, POSTCOPY, RUNNING, OutcomeRecord
from ferry.protocol.cookie import Cookie
from ferry.qemu import QemuProcess, query_migrate
from ferry.rpc import RequestContext
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Incoming
from ferry_destination.nbd_export import forget_created, stop_nbd
from ferry_destination.tunnel import IncomingTunnel, issue_token, redeemer_for

__all__ = ["finish_held", "hold", "postcopy_recover", "postcopy_state"]

log = logging.getLogger("ferry.destination")

PAUSE_WAIT_S = 10.0


async def postcopy_state(proc: QemuProcess) -> str | None:
    """qemu's migration state if it is in post-copy, else None (also when unreachable)."""
    try:
        stats = await query_migrate(proc.qmp)
    except FerryError:
        return None
    return stats.status if stats.status in POSTCOPY_STATES else None


async def hold(dst: DestinationContext, incoming: Incoming, reason: str) -> None:
    """Keep a post-copy incoming migration: record ``postcopy``, never kill it.

    Its paused qemu is handed to this host's ferry-source as Finish would
    hand it (the incoming job ends), so the operator can see it in
    ``list``/``dominfo`` and, if the VM is lost (the source's qemu died),
    ``destroy`` it.  ``postcopy_recover`` and a later Finish find it by its
    outcome record.
    """
    name = incoming.domain.name
    if dst.incoming.get(name) is not incoming:
        return
    incoming.held = True
    if incoming.watchdog is not None and incoming.watchdog is not asyncio.current_task():
        incoming.watchdog.cancel()
    if incoming.created_images:
        # The source ended its mirrors at the switch: the copied images are
        # this VM's disks from now on (its CPUs may already have written
        # them), never a failed copy's leftovers; and nothing may write to
        # them over NBD any more.
        with contextlib.suppress(FerryError):
            await stop_nbd(incoming.proc)
        forget_created(dst, name)
        incoming.created_images = []
    dst.outcomes.record(incoming.migration_id, POSTCOPY, domain=name,
                        uuid=incoming.domain.uuid, reason=reason,
                        source_host=incoming.source_host)  # fmt: skip
    dst.incoming.pop(name, None)
    dst.notify_status()
    status = dst.host.load_status(name)
    if status is not None:
        status.run_state = "paused"
        status.extra["postcopy"] = {"migration_id": incoming.migration_id, "held": True}
        dst.host.save_status(status)
    await dst.jobs.end_async(incoming.job)
    await dst.host.release(name)
    log_event(log, MessageID.MIGRATION_PHASE,
              f"incoming {name} is in post-copy and {reason}: holding it paused (the CPU "
              "state is here; --postcopy-resume from the source finishes the move; if the "
              "source's qemu is gone the VM is lost and 'ferryctl destroy' ends this half)",
              domain=name, migration_id=incoming.migration_id,
              level=logging.WARNING)  # fmt: skip


async def finish_held(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any], record: OutcomeRecord
) -> dict[str, Any]:
    """Finish of a held post-copy migration (after ``--postcopy-resume``): start the CPUs."""
    name, uuid = record.domain, record.uuid
    check_access(dst.config.acl, ctx.subject, "finish", name, uuid)
    if args["cancelled"]:
        raise MigrationFailed(f"the post-copy migration of '{name}' cannot be cancelled")
    flags = MigrationFlags(args["flags"])
    with LogContext(domain=name, uuid=uuid, migration_id=record.migration_id, phase="finish"):
        live = dst.host.find(name)
        proc = await dst.host.process(name)
        state = (await query_migrate(proc.qmp)).status
        if state not in ("postcopy-active", "completed"):
            raise MigrationFailed(
                f"the post-copy stream of '{name}' is {state}: the CPUs start once it is resumed"
            )
        dst.outcomes.record(record.migration_id, FINISHING, domain=name, uuid=uuid,
                            source_host=record.source_host)  # fmt: skip
        await dst.host.acquire_leases(live.domain, proc)
        if flags & MigrationFlags.PERSIST_DEST:
            dst.host.save_definition(live.domain)
        # A storage copy's NBD server, if hold() could not stop it.
        with contextlib.suppress(FerryError):
            await stop_nbd(proc)
        if not flags & MigrationFlags.PAUSED:
            await proc.qmp.execute("cont")
        dst.outcomes.record(record.migration_id, RUNNING, domain=name, uuid=uuid,
                            reason="the CPUs were started after a resumed post-copy",
                            source_host=record.source_host)  # fmt: skip
        dst.fences.clear(uuid)
        status = dst.host.load_status(name)
        if status is not None:
            status.run_state = "paused" if flags & MigrationFlags.PAUSED else "running"
            status.extra.pop("postcopy", None)
            dst.host.save_status(status)
        log_event(log, MessageID.MIGRATION_COMPLETED,
                  f"finish: {name} now runs here on {dst.config.host.name} "
                  "(post-copy)")  # fmt: skip
        return {"name": name, "cookie": Cookie().encode(), "host": dst.config.host.name}


async def _wait_paused(proc: QemuProcess) -> str:
    """Pause a post-copy stream that still looks alive; the state once it settles."""
    state = await postcopy_state(proc)
    if state == "postcopy-active":
        # The source saw the link die; this side may still wait on a
        # socket that will never speak again.
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("migrate-pause")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PAUSE_WAIT_S
    while loop.time() < deadline:
        state = await postcopy_state(proc)
        if state != "postcopy-active":
            break
        await asyncio.sleep(0.05)
    return state or "none"


async def postcopy_recover(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Make a paused post-copy incoming qemu listen again (qemu ``migrate-recover``).

    Works whether Finish got through (the domain runs here, its CPUs wait
    for pages) or not (the migration is held).
    """
    migration_id = args["migration_id"]
    incoming = dst.find_migration(migration_id)
    record = dst.outcomes.get(migration_id)
    if incoming is not None:
        name, uuid = incoming.domain.name, incoming.domain.uuid
        source_host = incoming.source_host
    elif record is not None and record.state in (RUNNING, POSTCOPY):
        name, uuid = record.domain, record.uuid
        source_host = record.source_host
    else:
        if record is None:
            check_access(dst.config.acl, ctx.subject, "postcopy_recover", None)
        what = f"its record says {record.state}" if record else "it has no record of it"
        raise PhaseError(
            f"no paused post-copy migration {migration_id} on {dst.config.host.name}: {what}"
        )
    check_access(dst.config.acl, ctx.subject, "postcopy_recover", name, uuid)
    with LogContext(domain=name, uuid=uuid, migration_id=migration_id, phase="perform"):
        proc = incoming.proc if incoming is not None else await dst.host.process(name)
        state = await _wait_paused(proc)
        if state != "postcopy-paused":
            raise MigrationFailed(
                f"the incoming qemu of '{name}' is not paused in post-copy (it is {state}); "
                "nothing to resume"
            )
        if incoming is not None:
            old = incoming.tunnel
            await hold(dst, incoming, "the stream broke")
            if old is not None:
                dst.tokens.revoke(name)
                await old.close(drain=False)
        answer: dict[str, Any] = {"name": name}
        if args["tunnelled"]:
            path = dst.config.paths.tunnel_dir / f"{migration_id[:12]}-r{int(time.time())}.sock"
            tunnel = IncomingTunnel(name, path, 1)
            tunnel.make_room()
            await proc.qmp.execute("migrate-recover", {"uri": tunnel.uri})
            dst.spawn(_close_when_done(dst, proc, tunnel))
            token = issue_token(dst, tunnel, redeemer_for(ctx.subject, source_host))
            answer.update(uri="tunnel", tunnel={"token": token, "channels": 1})
        else:
            from ferry_destination.prepare import listen_uri

            listen, advertised = listen_uri(dst, ctx)
            await proc.qmp.execute("migrate-recover", {"uri": listen})
            answer["uri"] = advertised
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"post-copy of {name}: waiting for the source to resume the stream")  # fmt: skip
        return answer


async def _close_when_done(
    dst: DestinationContext, proc: QemuProcess, tunnel: IncomingTunnel
) -> None:
    """Close a resumed stream's tunnel once qemu no longer migrates (the domain runs here)."""
    while await postcopy_state(proc) is not None:
        await asyncio.sleep(1.0)
    dst.tokens.revoke(tunnel.name)
    await tunnel.close(drain=True)
