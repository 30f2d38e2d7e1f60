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
)
from ferry.flags import MigrationFlags
from ferry.jobs import Job
from ferry.jobs.recovery import MIGRATING
from ferry.protocol.cookie import Cookie
from ferry.qemu import (
    EventSubscription,
    QemuProcess,
    QMPEvent,
    SavedMigrationSettings,
    query_migrate,
    set_caps,
    set_params,
)
from ferry_source.context import Emit, SourceContext
from ferry_source.outgoing import Outgoing

__all__ = ["MIB", "UNLIMITED_BANDWIDTH", "cancel_migration", "perform"]

log = logging.getLogger("ferry.source.migration")

POLL_INTERVAL = 0.1
HEARTBEAT_INTERVAL = 2.0
NOT_CONVERGING = (
    "the migration is not converging: the guest dirties memory faster than it is copied"
)
MIB = 1024 * 1024
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX: "unlimited", in bytes/s.  qemu's
# own 128 MiB/s default alone kept a dirtying guest from ever finishing.
UNLIMITED_BANDWIDTH = (2**63 - 1) // (1024 * 1024) * (1024 * 1024)


async def perform(
    ctx: SourceContext, out: Outgoing, uri: str, dest_cookie: Cookie, emit: Emit
) -> dict[str, Any]:
    """Migrate ``out``'s qemu to ``uri``; the statistics once qemu completed.

    On failure the migration is cancelled and qemu's settings restored; the
    caller decides (Confirm) whether the CPUs run again.

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
        return await _follow(ctx, out, job, proc, uri, saved, emit)
    except BaseException:
        # Only a failed transfer leaves the source running on: give it
        # back its settings.  After success the qemu is stopped anyway.
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
        caps = {"events": True, "auto-converge": bool(flags & MigrationFlags.AUTO_CONVERGE)}
        # With disk leases, qemu waits for us at switchover: its CPUs are
        # stopped, so we can hand the leases over before the device state
        # (and with it the right to write) moves.
        status = ctx.host.load_status(out.name)
        out.lease_handover = bool(status is not None and status.extra.get("leases"))
        caps["pause-before-switchover"] = out.lease_handover
        # Always set: a qemu that arrived here by a parallel migration
        # still has multifd on, and both ends must agree.
        caps["multifd"] = bool(flags & MigrationFlags.PARALLEL)
        await set_caps(proc.qmp, caps)
        tuning: dict[str, Any] = {
            "max-bandwidth": params.bandwidth_mib * MIB if params.bandwidth_mib
            else UNLIMITED_BANDWIDTH,
        }  # fmt: skip
        if params.max_downtime_ms is not None:
            tuning["downtime-limit"] = params.max_downtime_ms
        if params.auto_converge_initial is not None:
            tuning["cpu-throttle-initial"] = params.auto_converge_initial
        if params.auto_converge_increment is not None:
            tuning["cpu-throttle-increment"] = params.auto_converge_increment
        if flags & MigrationFlags.PARALLEL:
            tuning["multifd-channels"] = params.parallel_connections or 2
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
    deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
    stall_s = ctx.config.migration.stall_timeout_s
    heartbeat = _Heartbeat(out)
    max_throttle = 0
    last_marker: tuple[Any, ...] = ()
    last_move = time.monotonic()
    fault_armed = True
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
                if io_error is not None and flags & MigrationFlags.ABORT_ON_ERROR:
                    await cancel_migration(proc)
                    raise MigrationFailed(
                        f"migration aborted: the guest hit an I/O error ({io_error}) "
                        "and --abort-on-error was given"
                    )
                stats = await query_migrate(proc.qmp)
                if stats.status == "pre-switchover":
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
                    await cancel_migration(proc)
                    raise MigrationStalled(
                        f"no data moved for {stall_s:g} s: the link to {out.peer} looks down; "
                        "the migration was cancelled",
                        peer=out.peer,
                    )
                sample = stats.to_sample()
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
                    snap["elapsed_s"] = (stats.total_time_ms or 0) / 1000
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
                if stats.status == "completed":
                    return {
                        "total_time_ms": stats.total_time_ms,
                        "downtime_ms": stats.downtime_ms,
                        "setup_time_ms": stats.setup_time_ms,
                        "transferred": stats.ram_transferred,
                        "total": stats.ram_total,
                        "passes": stats.ram_dirty_sync_count,
                        "throttle_pct": max_throttle,
                        "mbps": stats.ram_mbps,
                    }  # fmt: skip
                if stats.status in ("failed", "cancelled"):
                    if out.tunnel is not None and out.tunnel.set.error is not None:
                        raise out.tunnel.set.error
                    raise MigrationFailed(
                        f"qemu reports the migration {stats.status}: "
                        f"{stats.error_desc or 'no reason given'}"
                    )
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
                if deadline is not None and time.monotonic() > deadline:
                    await cancel_migration(proc)
                    converging = account.converging
                    note = " (it was not converging)" if converging is False else ""
                    raise MigrationTimeout(
                        f"migration of '{out.name}' did not finish within "
                        f"{params.timeout_s:g}s{note}; cancelled"
                    )
                if account.converging is False and account.samples >= 8 and not out.warned:
                    out.warned = True
                    emit("warning", {"message": NOT_CONVERGING})
                received = await _wait_events(events, out.abort, POLL_INTERVAL)
    finally:
        heartbeat.stop()


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
