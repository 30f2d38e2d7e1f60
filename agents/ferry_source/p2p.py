"""The peer-to-peer driver: Begin → Prepare → Perform → Finish → Confirm.

ferry-source runs the whole v3 protocol for ``ferryctl migrate``, calling
the Src phases (:mod:`~ferry_source.begin`, :mod:`~ferry_source.perform`,
:mod:`~ferry_source.confirm`) and the destination's Prepare and Finish.

The safety rule: the phase is recorded as ``finish`` before Finish is sent;
from then on our copy runs again only if the destination answers that its
copy does not run.  A Finish whose reply is lost is settled by asking
(:mod:`~ferry_source.settle`), never by guessing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ferry.errors import (
    DeadlineUnreachable,
    FerryError,
    MigrationFailed,
    OutcomeUnknown,
    ReplyLost,
)
from ferry.flags import MigrationFlags
from ferry.journal import MessageID, log_event
from ferry.protocol.cookie import Cookie
from ferry.rpc import RequestContext, Session
from ferry.tunnel.channel import make_endpoint
from ferry_source.begin import begin
from ferry_source.confirm import resume_source, stop_source
from ferry_source.context import Emit, SourceContext
from ferry_source.outgoing import Outgoing
from ferry_source.peer import ask_outcome, close_session, connect_peer, request
from ferry_source.perform import perform
from ferry_source.postcopy_finish import finish_postcopy
from ferry_source.settle import Subject, settle
from ferry_source.snapshot_move import check_peer, send_snapshots, snapshot_frames
from ferry_source.summary import summary
from ferry_source.tunnel import SourceTunnel

__all__ = ["enter_phase", "migrate_p2p", "open_tunnel", "send_prepare", "subject_of"]

log = logging.getLogger("ferry.source.migration")

# A Finish(cancelled) whose reply is lost needs no long wait: the
# destination never starts CPUs on it; asking only tidies its qemu away.
TIDY_DEADLINE_S = 5.0
CANCELLED_FINISH_TIMEOUT_S = 5.0


def enter_phase(out: Outgoing, emit: Emit, phase: str) -> None:
    """Enter ``phase``: durable in the job record before it does anything."""
    if phase in ("perform", "confirm"):
        out.phases.advance(phase, cancelled=False)
    if out.job is not None:
        out.job.phase = phase  # durable before the phase does anything
    emit("phase", {"phase": phase, "migration_id": out.migration_id})
    log_event(log, MessageID.MIGRATION_PHASE, f"{out.name}: entering {phase}", phase=phase)


async def migrate_p2p(ctx: SourceContext, out: Outgoing, req: RequestContext) -> dict[str, Any]:
    """Run the whole migration; the summary on success.

    Raises:
        FerryError: it was refused or failed (the VM runs here again), or
            OutcomeUnknown (the VM stays paused here; see ``migrate-recover``).
    """
    emit = req.emit
    started = time.monotonic()
    out.carry_snapshots = True
    cookie, xml = await begin(ctx, out, emit)
    job = out.job
    assert job is not None and out.proc is not None
    ctx.progress[out.name] = out.progress
    lost_client = False
    try:
        if ctx.faults.hit("src.begin") == "drop-reply":
            req.session.writer.transport.abort()
        if out.params.deadline_s is not None:
            await _preflight(ctx, out, emit)
        # Cut before Prepare: a hierarchy over the bounds is refused before
        # the destination starts anything.
        frames = snapshot_frames(ctx, out)
        # -- Prepare (peer) ------------------------------------------------
        out.session = session = await connect_peer(ctx.config, out.host, out.port)
        check_peer(session, out, frames)
        enter_phase(out, emit, "prepare")
        prep, dest_cookie = await send_prepare(ctx, out, session, cookie, xml)
        uri = str(prep["uri"])
        if out.flags & MigrationFlags.TUNNELLED:
            out.tunnel = open_tunnel(ctx, out, prep)
            uri = out.tunnel.uri

        # -- snapshot metadata (peer), then Perform ---------------------------
        perform_error: FerryError | None = None
        stats: dict[str, Any] = {}
        try:
            await send_snapshots(ctx, out, session, frames)
        except FerryError as exc:
            # Nothing moved yet: Finish(cancelled) below discards B's side.
            perform_error = exc
        enter_phase(out, emit, "perform")
        try:
            if perform_error is None:
                stats = await perform(ctx, out, uri, dest_cookie, emit)
        except FerryError as exc:
            perform_error = exc
        except Exception as exc:
            # A bug here must still reach Finish(cancelled) and Confirm,
            # or the VM would stay paused on the source.
            log.exception("perform failed unexpectedly")
            perform_error = MigrationFailed(f"perform failed: {exc}")
        if out.postcopy:
            # The destination holds the VM from the switch on: whatever
            # happened, Finish must try to start its CPUs, the tunnel must
            # keep carrying pages, and our copy never resumes.
            return await finish_postcopy(ctx, out, session, stats, perform_error, emit,
                                         started, phase=enter_phase)  # fmt: skip
        if out.tunnel is not None and perform_error is not None:
            # Nothing more may reach the destination's qemu.
            await out.tunnel.close(drain=False)
        cancelled = perform_error is not None and not out.may_finish_after_failure()

        # -- Finish (peer) -------------------------------------------------
        enter_phase(out, emit, "finish")
        result, finish_error, dest_host, settled = await _finish(
            ctx, out, session, cancelled, emit
        )
        stats.update(await out.end_tunnel(drain=finish_error is None))

        # -- Confirm -------------------------------------------------------
        enter_phase(out, emit, "confirm")
        if result != "unknown":
            job.record(result=result)
        lost_client = ctx.faults.hit("src.confirm") == "drop-reply"
        if result == "unknown":
            assert finish_error is not None
            raise finish_error
        if result == "failed":
            what = "resumed on the source"
            if not settled:
                what = await resume_source(ctx, out.name, was_running=out.was_running,
                                           leases_released=out.leases_released,
                                           saved=job.saved_migration)  # fmt: skip
            error = perform_error or finish_error
            assert error is not None
            notes = []
            if out.peer_reason and perform_error is not None:
                notes.append(f"{out.peer} says: {out.peer_reason}")
            if what != "resumed on the source" and out.was_running:
                notes.append(f"the VM was {what}")
            if notes:
                error.message += f" ({'; '.join(notes)})"
                error.args = (error.message,)
            raise error
        if not settled:
            undefine = bool(out.flags & MigrationFlags.UNDEFINE_SOURCE)
            await stop_source(ctx, out.name, out.domain.uuid, migration_id=out.migration_id,
                              peer=dest_host, peer_uri=out.peer_uri, undefine=undefine)
        return summary(out, stats, dest_host, started)
    finally:
        await out.close_tunnels()
        ctx.progress.pop(out.name, None)
        if out.session is not None:
            await close_session(out.session)
        await ctx.jobs.end_async(job)
        if lost_client:
            req.session.writer.transport.abort()


async def _finish(
    ctx: SourceContext, out: Outgoing, session: Any, cancelled: bool, emit: Emit
) -> tuple[str, FerryError | None, str, bool]:
    """Send Finish: (result, error, destination host, settled).

    A cancelled Finish gets a short wait: whatever happens to it, the
    destination never starts CPUs on it.

    ``settled`` means the outcome had to be asked for and the source copy
    has already been stopped or resumed accordingly.
    """
    timeout = ctx.config.migration.reply_timeout_s
    if cancelled:
        timeout = min(timeout, CANCELLED_FINISH_TIMEOUT_S)
    try:
        fin = await request(session, "finish", {
            "name": out.dest_name, "cookie": Cookie().encode(), "flags": int(out.flags),
            "params": out.params.to_wire(), "cancelled": cancelled,
            "migration_id": out.migration_id,
        }, timeout=timeout, peer=out.peer)  # fmt: skip
    except FerryError as exc:
        if cancelled:
            # The destination never starts CPUs on a cancelled Finish.  It
            # may have given up on its own (its watchdog): ask why, so the
            # error says what it did.
            _, reply = await ask_outcome(ctx.config, out.host, out.port, out.migration_id,
                                         deadline_s=TIDY_DEADLINE_S)  # fmt: skip
            out.peer_reason = str(reply.get("reason") or "")
            return "failed", exc, out.peer, False
        settled = await settle(ctx, subject_of(out), job=out.job, emit=emit,
                               deadline_s=ctx.config.migration.outcome_timeout_s)  # fmt: skip
        if settled.result == "completed":
            return "completed", None, out.peer, True
        if settled.result == "failed":
            reason = settled.reply.get("reason")
            if reason and not isinstance(exc, ReplyLost):
                return "failed", exc, out.peer, True
            note = f": {reason}" if reason else ""
            return "failed", MigrationFailed(f"{exc} — the destination says it did not "
                                             f"take the VM{note}"), out.peer, True  # fmt: skip
        return "unknown", OutcomeUnknown(
            f"{exc}; {settled.message}. {out.name} stays paused here; run "
            f"'ferryctl migrate-recover {out.name}' once {out.peer} is reachable",
            migration_id=out.migration_id, peer=out.peer,
        ), out.peer, True  # fmt: skip
    if cancelled:
        return "failed", None, out.peer, False
    return "completed", None, str(fin.get("host") or out.peer), False


async def _preflight(ctx: SourceContext, out: Outgoing, emit: Emit) -> None:
    """The pre-flight of ``migrate-check``, before anything starts; refuse a deadline it
    says cannot be met, else seed the controller with it.

    Only with ``--deadline``: the measurement costs ~1.5 s (1 s of dirty-rate
    sampling that must not overlap the migration, and a link probe).
    """
    from ferry.converge import verdict
    from ferry_source.preflight import goal_from, json_safe, survey

    found = await survey(ctx, out.name, out.host, out.port,
                         bandwidth_cap_mib=out.params.bandwidth_mib)  # fmt: skip
    judged = verdict(found.measurements, goal_from(out.flags, out.params))
    out.preflight = judged
    data = json_safe({"measurements": found.to_json(), "verdict": judged.to_json()})
    emit("preflight", data)
    reasons = "; ".join(judged.reasons)
    log_event(log, MessageID.MIGRATION_DECISION, f"pre-flight: plan {judged.plan} ({reasons})",
              phase="begin", decision="preflight")  # fmt: skip
    if not judged.feasible:
        raise DeadlineUnreachable(
            f"refused before starting: the migration of '{out.name}' cannot finish within "
            f"--deadline {out.params.deadline_s:g}s with the allowed levers: {reasons}"
        )


def subject_of(out: Outgoing) -> Subject:
    """What settling a lost outcome needs to know of ``out``."""
    job = out.job
    return Subject(name=out.name, uuid=out.domain.uuid, migration_id=out.migration_id,
                   peer=out.peer, peer_uri=out.peer_uri, was_running=out.was_running,
                   leases_released=out.leases_released,
                   undefine=bool(out.flags & MigrationFlags.UNDEFINE_SOURCE),
                   saved=job.saved_migration if job is not None else None)  # fmt: skip


async def send_prepare(
    ctx: SourceContext, out: Outgoing, session: Session, cookie: Cookie, xml: str
) -> tuple[dict[str, Any], Cookie]:
    """Prepare at the destination (p2p, live or offline): its answer and its cookie.

    The domain's name there and the destination's host name go into
    ``out`` and the job record (recovery asks that host by name).
    """
    job = out.job
    assert job is not None
    prep = await request(session, "prepare", {
        "xml": xml, "cookie": cookie.encode(), "flags": int(out.flags),
        "params": out.params.to_wire(),
    }, timeout=ctx.config.migration.reply_timeout_s, peer=out.host)  # fmt: skip
    out.dest_name = str(prep.get("name") or out.name)
    job.record(dest_name=out.dest_name)
    dest_cookie = Cookie.decode(prep["cookie"])
    if dest_cookie.identity is not None and dest_cookie.identity.hostname:
        out.peer_name = dest_cookie.identity.hostname
        job.record(peer=out.peer_name)
    return prep, dest_cookie


def open_tunnel(ctx: SourceContext, out: Outgoing, prep: dict[str, Any]) -> SourceTunnel:
    """Listen where qemu will migrate to; its connections go to the destination."""
    config = ctx.config
    grant = prep.get("tunnel")
    if not isinstance(grant, dict) or not isinstance(grant.get("token"), str):
        raise MigrationFailed("the destination did not prepare a tunnel (no token)")
    assert config.tls is not None
    loop = asyncio.get_running_loop()

    def broken(error: FerryError) -> None:
        def record() -> None:
            if out.failure is None:
                out.failure = error
            out.abort.set()

        loop.call_soon_threadsafe(record)

    tunnel = SourceTunnel(
        name=out.name,
        socket_path=config.paths.tunnel_dir / f"{out.migration_id[:16]}.sock",
        endpoint=make_endpoint(config.tls, server=False),
        host=out.host,
        port=out.port,
        token=grant["token"],
        channels=int(grant.get("channels", 1)),
        mode="plain" if out.params.tunnel_plaintext else "tls",
        on_error=broken,
    )
    tunnel.listen()
    return tunnel
