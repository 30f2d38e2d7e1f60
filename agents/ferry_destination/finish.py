"""Dst Finish: wait for the stream, start the CPUs, and record the outcome first.

The outcome record is the destination's promise to the source: ``finishing``
is written (fsync'd) before anything can start, ``running`` once the CPUs
run (or the VM is held paused as asked) and before the reply, ``failed``
after the incoming qemu is killed.  A reply lost on the way back costs the
source a question, never a second copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ferry.acl import check_access
from ferry.domain import parse_domain
from ferry.errors import FerryError, MigrationFailed, MigrationTimeout, PhaseError, QMPError
from ferry.flags import MigrationFlags, MigrationParams
from ferry.journal import LogContext, MessageID, log_event
from ferry.outcomes import FINISHING, POSTCOPY, RUNNING
from ferry.protocol.cookie import Cookie, Statistics
from ferry.protocol.phases import DestinationPhases
from ferry.qemu import query_migrate
from ferry.rpc import RequestContext
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Incoming, discard, end_tunnel
from ferry_destination.nbd_export import forget_created, stop_nbd
from ferry_destination.postcopy import finish_held, hold, postcopy_state
from ferry_destination.snapshot_move import commit_snapshots, uncommit_snapshots

__all__ = ["finish"]

log = logging.getLogger("ferry.destination")


async def finish(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Finish phase: start the CPUs (or give up), answering only once the outcome is recorded."""
    if MigrationFlags(args["flags"]) & MigrationFlags.OFFLINE:
        from ferry_destination.offline import finish_offline  # it imports prepare

        return await finish_offline(dst, ctx, args)
    name = args["name"]
    incoming = dst.incoming.get(name)
    wanted = args.get("migration_id")
    if incoming is None and wanted:
        record = dst.outcomes.get(wanted)
        if record is not None and record.state == POSTCOPY and record.domain == name:
            return await finish_held(dst, ctx, args, record)
    if incoming is None or (wanted and wanted != incoming.migration_id):
        phases = DestinationPhases()
        phases.advance("finish")  # raises PhaseError naming both phases
        raise PhaseError(f"no prepared incoming migration for domain '{name}'")
    check_access(dst.config.acl, ctx.subject, "finish", name, incoming.domain.uuid)
    incoming.phases.advance("finish", cancelled=args["cancelled"])
    incoming.finishing = True
    if incoming.watchdog is not None:
        incoming.watchdog.cancel()
    flags = MigrationFlags(args["flags"])
    params = MigrationParams.from_wire(args["params"])
    with LogContext(domain=name, uuid=incoming.domain.uuid,
                    migration_id=incoming.migration_id, phase="finish"):  # fmt: skip
        incoming.job.phase = "finish"
        if args["cancelled"]:
            log_event(log, MessageID.MIGRATION_ABORTED,
                      f"finish: source cancelled; discarding incoming {name}")  # fmt: skip
            await discard(dst, incoming, "the source cancelled the migration")
            return {"name": name, "cookie": Cookie().encode()}
        record = dst.outcomes.record(incoming.migration_id, FINISHING, domain=name,
                                     uuid=incoming.domain.uuid,
                                     source_host=incoming.source_host)  # fmt: skip
        dst.faults.hit("dst.finish.begin")
        try:
            postcopy = bool(flags & MigrationFlags.POSTCOPY)
            stats = await _wait_incoming(dst, incoming, postcopy=postcopy)
            if incoming.created_images:
                # The source ended its mirrors in sync at switchover; nobody
                # may write to the images over NBD once the guest runs here.
                await stop_nbd(incoming.proc)
            # The source released its leases at switchover; we take them
            # before any CPU of ours can write.
            await dst.host.acquire_leases(incoming.domain, incoming.proc)
            # Everything that can fail happens before the CPUs start: once
            # they run, the VM is here for good.
            if flags & MigrationFlags.PERSIST_DEST:
                persist = incoming.domain
                if params.persist_xml:
                    persist = parse_domain(params.persist_xml, where="persist_xml")
                    if params.dest_name:
                        persist = persist.renamed(params.dest_name)
                dst.host.save_definition(persist)
            commit_snapshots(dst, incoming)
            await _start_cpus(dst, incoming, flags)
        except BaseException as exc:
            if await postcopy_state(incoming.proc) is not None:
                # The CPU state is here: killing this qemu would lose the
                # VM.  Keep it for --postcopy-resume.
                await hold(dst, incoming, f"Finish failed ({exc})")
                raise MigrationFailed(f"destination could not finish in post-copy: {exc}; "
                                      "the VM is held here, paused") from exc  # fmt: skip
            log_event(log, MessageID.MIGRATION_FAILED,
                      f"finish failed for {name}: {exc}; killing the incoming qemu",
                      level=logging.ERROR)  # fmt: skip
            uncommit_snapshots(dst, incoming)
            await discard(dst, incoming, f"finish failed: {exc}")
            if isinstance(exc, FerryError):
                raise MigrationFailed(f"destination could not finish: {exc}") from exc
            raise
        record = dst.outcomes.record(incoming.migration_id, RUNNING, domain=name,
                                     uuid=incoming.domain.uuid, reason="the CPUs were started",
                                     source_host=record.source_host)  # fmt: skip
        # It runs here now: a fence left from an earlier move away is stale.
        dst.fences.clear(incoming.domain.uuid)
        if incoming.created_images:
            # The copied images are the VM's disks now, not leftovers.
            forget_created(dst, name)
            incoming.created_images = []
        status = dst.host.load_status(name)
        if status is not None:
            status.run_state = "paused" if flags & MigrationFlags.PAUSED else "running"
            dst.host.save_status(status)
        dst.incoming.pop(name, None)
        dst.notify_status()
        await dst.jobs.end_async(incoming.job)
        if incoming.tunnel is not None:
            # The relays end by themselves once both qemus closed the
            # stream; Finish need not wait for that.
            dst.spawn(end_tunnel(dst, incoming, drain=True))
        # ferry-source of this host manages the domain from now on.
        await dst.host.release(name)
        log_event(log, MessageID.MIGRATION_COMPLETED,
                  f"finish: {name} now runs here on {dst.config.host.name}")  # fmt: skip
        if dst.faults.hit("dst.finish") == "drop-reply":
            ctx.session.writer.transport.abort()
        reply = Cookie().with_statistics(Statistics(values=stats))
        return {"name": name, "cookie": reply.encode(), "host": dst.config.host.name}


async def _wait_incoming(
    dst: DestinationContext, incoming: Incoming, *, postcopy: bool = False
) -> dict[str, int | float]:
    """Wait until qemu has received the whole stream (or, in post-copy, the device state).

    In post-copy the source sends Finish right after the switch: qemu has
    the CPU and device state and fetches the rest of memory on demand, so
    the CPUs start now, not at the end.
    """
    deadline = time.monotonic() + dst.config.destination.incoming_timeout_s
    proc = incoming.proc
    while True:
        try:
            stats = await query_migrate(proc.qmp)
        except QMPError as exc:
            # qemu exits when loading the stream fails (a device refused its
            # state, e.g. a TPM whose swtpm is gone): its log says why.
            # The monitor closes a moment before the process is gone: wait
            # for the exit itself (its pidfd), briefly, before asking why.
            exited = await proc.wait_exit(timeout=5.0)
            why = _qemu_log_tail(dst, incoming.domain.name)
            if not why or not exited:
                raise
            raise MigrationFailed(f"the incoming qemu exited: {why}") from exc
        if stats.status == "completed":
            break
        if postcopy and stats.status == "postcopy-active":
            return {"received_ms": int(time.time() * 1000), "postcopy": 1}
        if postcopy and stats.status in ("postcopy-paused", "postcopy-recover"):
            raise MigrationFailed(
                f"the post-copy stream is {stats.status}: the CPUs start once it is resumed"
            )
        if stats.status in ("failed", "cancelled"):
            raise MigrationFailed(
                f"incoming migration {stats.status}: {stats.error_desc or 'no reason given'}"
            )
        run = await proc.qmp.query_status()
        if run.status not in ("inmigrate", "prelaunch") and stats.status == "none":
            # Some qemu versions forget the incoming state once done.
            break
        if time.monotonic() > deadline:
            raise MigrationTimeout("the incoming migration did not complete in time")
        await asyncio.sleep(0.005)
    return {"received_ms": int(time.time() * 1000)}


def _qemu_log_tail(dst: DestinationContext, name: str) -> str:
    """The last lines of the incoming qemu's own log (timestamps dropped), or ""."""
    log_file = dst.host.runtime_paths(name).log_file
    if log_file is None:
        return ""
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()[-3:]
    except OSError:
        return ""
    return " / ".join(line.split(" ", 1)[-1] if line[:4].isdigit() else line for line in lines)


async def _start_cpus(dst: DestinationContext, incoming: Incoming, flags: MigrationFlags) -> None:
    if flags & MigrationFlags.PAUSED:
        return
    if dst.config.testing.fail_cpu_start:
        raise MigrationFailed("starting the CPUs failed (fault injected: [testing] fail_cpu_start)")
    await incoming.proc.qmp.execute("cont")
