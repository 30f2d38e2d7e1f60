"""Src Perform: set caps/params, run ``migrate``, follow it to the end.

Besides qemu's own end states, Perform ends a migration that cannot end by
itself: an abort request, ``--timeout``, an I/O error with
``--abort-on-error``, a broken tunnel, and a *stall* — no progress in
qemu's counters (or the tunnel's) for ``[migration] stall_timeout_s``, which
is what a cut link looks like from here.  While the stream moves, the
destination hears about it (``migration_progress``), so its own watchdog
never kills a migration that is still moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

from ferry.errors import (
    FerryError,
    JobAborted,
    MigrationFailed,
    MigrationStalled,
    MigrationTimeout,
    QMPError,
)
from ferry.flags import MigrationFlags
from ferry.jobs import Job
from ferry.jobs.recovery import MIGRATING
from ferry.journal import MessageID, log_event
from ferry.netkill import destroy_connections, tcp_endpoint
from ferry.protocol.cookie import Cookie
from ferry.qemu import (
    EventSubscription,
    MigrationStats,
    QemuProcess,
    QMPEvent,
    SavedMigrationSettings,
    query_migrate,
    set_caps,
    set_params,
)
from ferry.qemu.settings import MIB, UNLIMITED_BANDWIDTH, source_settings
from ferry.steering import Abort, Move, Suspend, SwitchToPostcopy, Tune
from ferry_source.context import Emit, SourceContext
from ferry_source.mirror import abort_mirrors, end_mirrors, start_mirrors
from ferry_source.outgoing import Outgoing
from ferry_source.postcopy import POSTCOPY_STATES, pause_postcopy, start_postcopy

__all__ = ["MIB", "UNLIMITED_BANDWIDTH", "cancel_migration", "perform"]

log = logging.getLogger("ferry.source.migration")

POLL_INTERVAL = 0.1
HEARTBEAT_INTERVAL = 2.0
NOT_CONVERGING = (
    "the migration is not converging: the guest dirties memory faster than it is copied"
)


async def perform(
    ctx: SourceContext, out: Outgoing, uri: str, dest_cookie: Cookie, emit: Emit
) -> dict[str, Any]:
    """Migrate ``out``'s qemu to ``uri``; the statistics once qemu completed.

    With post-copy, Perform ends as soon as qemu runs in post-copy
    (``stats["postcopy"]`` is true): the destination must start its CPUs
    (Finish) while the rest of memory still streams, and Confirm waits for
    the end.  On failure before any switch the migration is cancelled and
    qemu's settings restored; the caller decides (Confirm) whether the CPUs
    run again.  After a switch nothing is cancelled or restored.

    Raises:
        MigrationFailed, MigrationStalled, MigrationTimeout, JobAborted: it did not complete.
    """
    job, proc = out.job, out.proc
    assert job is not None and proc is not None
    flags = out.flags
    from ferry_source.checks import check_io_error

    await check_io_error(proc, out.name, flags)
    saved = await _setup(ctx, out, job, proc, dest_cookie)
    try:
        if out.storage:
            # Disks first: memory moves only once every mirror is in sync.
            nbd = dest_cookie.nbd
            if nbd is None:
                raise MigrationFailed(f"{out.peer} did not say where to copy the disks (its "
                                      "Prepare reply has no NBD server)")  # fmt: skip
            await start_mirrors(ctx, out, proc, nbd, emit)
        return await _follow(ctx, out, job, proc, uri, saved, emit)
    except BaseException:
        if out.mirror_jobs or out.mirror_nodes or out.disk_tunnel is not None:
            # The guest keeps running on its own disks; the destination
            # deletes the images it made when it hears the migration failed.
            with contextlib.suppress(FerryError):
                async with ctx.jobs.nested(job):
                    await abort_mirrors(proc, out)
        # Only a failed transfer leaves the source running on: give it
        # back its settings.  After success the qemu is stopped anyway,
        # and after a switch to post-copy it never runs here again.
        if not out.postcopy:
            with contextlib.suppress(FerryError):
                async with ctx.jobs.nested(job):
                    await saved.restore(proc.qmp)
        raise
    finally:
        out.set_downtime = None


async def _setup(
    ctx: SourceContext, out: Outgoing, job: Job, proc: QemuProcess, dest_cookie: Cookie
) -> SavedMigrationSettings:
    flags, params = out.flags, out.params
    async with ctx.jobs.nested(job):
        saved = await SavedMigrationSettings.snapshot(proc.qmp)
        job.saved_migration = saved.to_dict()
        # With disk leases, qemu waits for us at switchover: its CPUs are
        # stopped, so we can hand the leases over before the device state
        # (and with it the right to write) moves.
        status = ctx.host.load_status(out.name)
        out.lease_handover = bool(status is not None and status.extra.get("leases"))
        # Copied disks too: their mirrors end there, in sync, guest paused.
        settings = source_settings(flags, params,
                                   pause_before_switchover=out.lease_handover or bool(out.storage))
        caps, tuning = dict(settings.caps), dict(settings.params)
        if out.steering is not None:
            # The controller's opening position: its throttle needs
            # auto-converge on before the stream starts.
            start = out.steering.setup()
            if start is not None:
                caps.update(start.caps)
                tuning.update(start.params)
        await set_caps(proc.qmp, caps)
        await set_params(proc.qmp, tuning)
        graphics = dest_cookie.graphics
        if graphics is not None and graphics.type == "spice" and graphics.port:
            # Connected SPICE clients reconnect to the destination by
            # themselves at switchover; a failure here costs them only that.
            try:
                await proc.qmp.execute("client_migrate_info", {
                    "protocol": "spice", "hostname": graphics.listen or "",
                    "port": graphics.port,
                    **({"tls-port": graphics.tls_port} if graphics.tls_port else {}),
                })  # fmt: skip
                log.info("spice clients told to follow to %s:%d", graphics.listen, graphics.port)
            except FerryError as exc:
                log.warning("spice clients cannot be told where to go: %s", exc)
        if not flags & MigrationFlags.LIVE and out.was_running:
            await proc.qmp.execute("stop")
    return saved


class _Heartbeat:
    """Tells the destination, at most every few seconds, how far the stream got."""

    def __init__(self, out: Outgoing) -> None:
        self.out = out
        self.sent_at = 0.0
        self.task: asyncio.Task[None] | None = None

    def beat(self, transferred: int) -> None:
        session = self.out.session
        now = time.monotonic()
        if session is None or session.closed or now - self.sent_at < HEARTBEAT_INTERVAL:
            return
        if self.task is not None and not self.task.done():
            return
        self.sent_at = now
        args = {"migration_id": self.out.migration_id, "transferred": transferred}
        self.task = asyncio.create_task(self._send(args))

    async def _send(self, args: dict[str, Any]) -> None:
        session = self.out.session
        assert session is not None
        with contextlib.suppress(FerryError, OSError, TimeoutError):
            await session.request("migration_progress", args, timeout=10)

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()


async def _follow(
    ctx: SourceContext,
    out: Outgoing,
    job: Job,
    proc: QemuProcess,
    uri: str,
    saved: SavedMigrationSettings,
    emit: Emit,
) -> dict[str, Any]:
    from ferry_native import Sample, TransferAccount

    flags, params = out.flags, out.params
    account = TransferAccount()
    downtime_limit_s = [(params.max_downtime_ms or saved.params.get("downtime-limit", 300)) / 1000]

    def set_downtime(ms: int) -> None:
        downtime_limit_s[0] = ms / 1000

    out.set_downtime = set_downtime
    steering = out.steer()
    stall_s = ctx.config.migration.stall_timeout_s
    heartbeat = _Heartbeat(out)
    max_throttle = 0
    last_marker: tuple[Any, ...] = ()
    last_move = time.monotonic()
    fault_armed = True
    switchover_released = False
    try:
        with proc.qmp.events({"MIGRATION", "BLOCK_IO_ERROR", "disconnected"}) as events:
            out.migrate_sent = True
            async with ctx.jobs.nested(job):
                await proc.qmp.execute("migrate", {"uri": uri})
            last_time = -1.0
            last_tunnel_t = 0.0
            tunnel_sent, tunnel_t = 0, 0.0
            received: list[QMPEvent] = []
            while True:
                io_error = _check_events(received)
                if io_error is not None and flags & MigrationFlags.ABORT_ON_ERROR \
                        and not out.postcopy:
                    await cancel_migration(proc)
                    raise MigrationFailed(
                        f"migration aborted: the guest hit an I/O error ({io_error}) "
                        "and --abort-on-error was given"
                    )
                try:
                    stats = await query_migrate(proc.qmp, timeout=stall_s)
                except QMPError as exc:
                    if not exc.details.get("timeout"):
                        raise
                    # qemu writes the device state holding its big lock: a
                    # link cut right then blocks that write, and its monitor,
                    # for as long as TCP retries. Destroy the connection.
                    await _unstick(out, uri, stall_s)
                    continue
                if stats.status == "pre-switchover" and not switchover_released:
                    # Once only: qemu leaves pre-switchover a moment after
                    # migrate-continue, so the next query may still show it,
                    # and a second migrate-continue then fails ("device").
                    switchover_released = True
                    if out.mirror_jobs:
                        try:
                            async with ctx.jobs.nested(job):
                                await end_mirrors(proc, out)
                        except BaseException:
                            await cancel_migration(proc)
                            raise
                        # Tests: the disks are complete on B, the device state not yet sent.
                        ctx.faults.hit("src.switchover")
                    if out.lease_handover:
                        await ctx.host.release_leases(out.name)
                        out.leases_released = True
                        job.record(leases_released=True)
                    async with ctx.jobs.nested(job):
                        await proc.qmp.execute("migrate-continue", {"state": "pre-switchover"})
                    received = []
                    continue
                if stats.status == "completed" and not stats.total_time_ms:
                    # qemu 7.2 briefly reports completion before it
                    # fills in the times.
                    for _ in range(50):
                        await asyncio.sleep(0.002)
                        stats = await query_migrate(proc.qmp)
                        if stats.total_time_ms:
                            break
                max_throttle = max(max_throttle, stats.cpu_throttle_percentage)
                if stats.status in POSTCOPY_STATES:
                    # The destination holds the VM now: Finish must start
                    # its CPUs while the rest of memory streams.
                    out.postcopy = "active"
                    job.record(postcopy="active")
                    result = _stats(stats, max_throttle)
                    result["postcopy"] = True
                    result["switch_s"] = round(time.monotonic() - out.started_at, 3)
                    if ctx.faults.hit("src.postcopy") == "drop-reply" and out.session:
                        # Finish (next) goes out on a dead connection.
                        out.session.writer.transport.abort()
                    return result
                if out.tunnel is not None:
                    tunnel_sent, _ = out.tunnel.bytes()
                    tunnel_t = time.monotonic() - out.tunnel.set.started_at
                # -- stall: nothing moved for stall_s ------------------------
                marker = (stats.status, stats.ram_transferred, stats.ram_dirty_sync_count,
                          tunnel_sent)  # fmt: skip
                now = time.monotonic()
                if marker != last_marker:
                    last_marker, last_move = marker, now
                    heartbeat.beat(stats.ram_transferred + tunnel_sent)
                elif stats.status in MIGRATING and now - last_move > stall_s:
                    if out.postcopy:
                        # Switch requested, never completed: hold both
                        # sides paused rather than cancel.
                        await pause_postcopy(proc)
                        last_move = now
                    else:
                        await cancel_migration(proc)
                        raise MigrationStalled(
                            f"no data moved for {stall_s:g} s: the link to {out.peer} looks "
                            "down; the migration was cancelled",
                            peer=out.peer,
                        )
                sample = stats.to_sample()
                elapsed = now - out.started_at
                moves = steering.tick(stats, elapsed)
                # A query held up by the switchover repeats the final
                # time; the accounting wants strictly later samples.
                if stats.ram_total and stats.status == "active" and sample["time_s"] > last_time:
                    last_time = sample["time_s"]
                    account.feed(Sample(**sample))
                    if out.tunnel is not None and tunnel_t > last_tunnel_t:
                        # The relay's own counter, beside qemu's: bytes
                        # that really crossed the tunnel, and its rate.
                        account.feed_relay(tunnel_t, tunnel_sent)
                        last_tunnel_t = tunnel_t
                    snap: dict[str, Any] = dict(account.snapshot())
                    predicted = account.predicted_downtime_s(downtime_limit_s[0])
                    # JSON has no Infinity: "never, at this rate" is null.
                    snap["predicted_downtime_s"] = predicted if math.isfinite(predicted) else None
                    snap["status"] = stats.status
                    snap["expected_downtime_ms"] = stats.expected_downtime_ms
                    snap["elapsed_s"] = round(elapsed, 3)
                    if out.disk_bytes:
                        # The disks are in sync (and kept so) while memory moves.
                        snap["disk_copied"] = snap["disk_total"] = out.disk_bytes
                    snap["eta_s"] = _finite(steering.eta_s())
                    if steering.plan:
                        snap["plan"] = steering.plan
                    if out.tunnel is not None:
                        snap["tunnel_bytes"] = tunnel_sent
                        snap["tunnel_bytes_per_s"] = tunnel_sent / max(tunnel_t, 1e-3)
                    out.progress.clear()
                    out.progress.update(snap)
                    emit("progress", dict(snap))
                    if fault_armed and stats.ram_transferred > 0:
                        fault_armed = False
                        if ctx.faults.hit("src.perform") == "drop-reply" and out.session:
                            # The reply to our next heartbeat is lost with it.
                            out.session.writer.transport.abort()
                for move in moves:
                    await _apply(ctx, out, job, proc, move, account, emit)
                if stats.status == "completed":
                    return _stats(stats, max_throttle)
                if stats.status in ("failed", "cancelled"):
                    if out.tunnel is not None and out.tunnel.set.error is not None:
                        raise out.tunnel.set.error
                    raise MigrationFailed(
                        f"qemu reports the migration {stats.status}: "
                        f"{stats.error_desc or 'no reason given'}"
                    )
                if not out.postcopy:
                    # After the switch was asked for, nothing here may
                    # cancel: qemu's own state decides what comes next.
                    await _check_interruptions(out, proc)
                if account.converging is False and account.samples >= 8 and not out.warned \
                        and not steering.controlled:
                    out.warned = True
                    emit("warning", {"message": NOT_CONVERGING})
                received = await _wait_events(events, out.abort, POLL_INTERVAL)
    finally:
        heartbeat.stop()


async def _unstick(out: Outgoing, uri: str, stall_s: float) -> None:
    """qemu's monitor has not answered for ``stall_s``: cut its stream to the destination."""
    if out.tunnel is not None:
        # The stream goes through our tunnel: stopping it fails qemu's write.
        await out.tunnel.close(drain=False)
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"qemu's monitor has not answered for {stall_s:g} s while it sends the "
                  f"device state: the link to {out.peer} looks down; stopped the tunnel so "
                  "that its write fails and the migration ends",
                  level=logging.WARNING)  # fmt: skip
        return
    endpoint = tcp_endpoint(uri)
    if endpoint is None:
        log.warning("qemu's monitor has not answered for %g s (stream %s)", stall_s, uri)
        return
    killed = await destroy_connections(*endpoint)
    log_event(log, MessageID.MIGRATION_PHASE,
              f"qemu's monitor has not answered for {stall_s:g} s while it sends the device "
              f"state: the link to {out.peer} looks down; destroyed {killed} connection(s) to "
              f"{endpoint[0]}:{endpoint[1]} so that its write fails and the migration ends",
              level=logging.WARNING)  # fmt: skip


def _finite(value: float | None) -> float | None:
    """JSON has no Infinity or NaN: those become null ("unknown")."""
    if value is None or not math.isfinite(value):
        return None
    return round(value, 2)


def _stats(stats: MigrationStats, max_throttle: int) -> dict[str, Any]:
    raw = stats.raw
    ram: dict[str, Any] = raw["ram"] if isinstance(raw.get("ram"), dict) else {}
    xbzrle: dict[str, Any] = (
        raw["xbzrle-cache"] if isinstance(raw.get("xbzrle-cache"), dict) else {}
    )
    return {
        # What compression did: pages sent as xbzrle deltas, and the bytes
        # the multifd channels carried (compressed) against the page bytes.
        "xbzrle_pages": xbzrle.get("pages", 0),
        "xbzrle_bytes": xbzrle.get("bytes", 0),
        "multifd_bytes": ram.get("multifd-bytes", 0),
        "normal_bytes": stats.ram_normal_bytes,
        "total_time_ms": stats.total_time_ms,
        "downtime_ms": stats.downtime_ms,
        "setup_time_ms": stats.setup_time_ms,
        "transferred": stats.ram_transferred,
        "total": stats.ram_total,
        "passes": stats.ram_dirty_sync_count,
        "throttle_pct": max_throttle,
        "mbps": stats.ram_mbps,
    }


async def _check_interruptions(out: Outgoing, proc: QemuProcess) -> None:
    """Cancel on a broken tunnel, a closed control connection or an abort request."""
    if out.failure is not None:
        await cancel_migration(proc)
        raise out.failure
    if out.session is not None and out.session.closed:
        # The destination discards its side when our control
        # connection ends; the stream cannot land anywhere.
        await cancel_migration(proc)
        raise MigrationFailed(
            f"the control connection to {out.peer} broke during Perform "
            f"({out.session.close_error or 'closed'}); the migration was cancelled"
        )
    if out.abort.is_set():
        await cancel_migration(proc)
        raise JobAborted(f"migration of '{out.name}' {out.abort_reason}")


async def _apply(
    ctx: SourceContext, out: Outgoing, job: Job, proc: QemuProcess, move: Move,
    account: Any, emit: Emit,
) -> None:  # fmt: skip
    """Carry out one move of the steering, and say why in the journal and the display."""
    if isinstance(move, Abort):
        await cancel_migration(proc)
        note = " (it was not converging)" if account.converging is False else ""
        raise MigrationTimeout(f"migration of '{out.name}': {move.reason}{note}")
    if isinstance(move, SwitchToPostcopy):
        out.postcopy = "requested"
        async with ctx.jobs.nested(job):
            await start_postcopy(job, proc, move.reason, emit)
        return
    log_event(log, MessageID.MIGRATION_DECISION, f"{out.name}: {move.reason}",
              phase="perform", decision=type(move).__name__.lower())  # fmt: skip
    emit("decision", {"move": type(move).__name__.lower(), "reason": move.reason})
    if isinstance(move, Tune):
        async with ctx.jobs.nested(job):
            await set_params(proc.qmp, move.params)
        if "downtime-limit" in move.params and out.set_downtime is not None:
            out.set_downtime(int(move.params["downtime-limit"]))
    elif isinstance(move, Suspend):
        async with ctx.jobs.nested(job):
            await proc.qmp.execute("stop")


async def _wait_events(
    events: EventSubscription, abort: asyncio.Event, timeout: float
) -> list[QMPEvent]:
    """Sleep until a qemu event, an abort request or ``timeout``.

    Waking on qemu's MIGRATION event (rather than only polling) notices
    completion within milliseconds, which is most of the orchestration
    overhead.
    """
    getter = asyncio.ensure_future(events.get())
    aborter = asyncio.ensure_future(abort.wait())
    try:
        await asyncio.wait({getter, aborter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        aborter.cancel()
        if not getter.done():
            getter.cancel()
    received = [getter.result()] if getter.done() and not getter.cancelled() else []
    return received + events.pending()


def _check_events(received: list[QMPEvent]) -> str | None:
    io_error = None
    for event in received:
        if event.name == "BLOCK_IO_ERROR":
            data = event.data or {}
            io_error = f"{data.get('device') or data.get('node-name')}: {data.get('reason', '')}"
        elif event.name == "disconnected":
            raise MigrationFailed("the source qemu went away during the migration")
    return io_error


async def cancel_migration(proc: QemuProcess) -> None:
    """migrate_cancel and wait until qemu has really stopped migrating."""
    with contextlib.suppress(FerryError):
        await proc.qmp.execute("migrate_cancel")
    for _ in range(200):
        try:
            stats = await query_migrate(proc.qmp)
        except FerryError:
            return
        if stats.status not in MIGRATING:
            return
        await asyncio.sleep(0.05)
