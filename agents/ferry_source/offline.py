"""Offline migration, source side: Begin and Confirm of ``--offline``, and its p2p driver.

The phases are the ones of a live migration minus Perform (libvirt's
``VIR_MIGRATE_OFFLINE``): Begin here checks the definition and takes the
MIGRATION_OUT job, the destination's Prepare runs its migrate hook and
checks the result, its Finish defines the domain (inactive), and Confirm
here undefines the source when ``--undefine-source`` was given and the
destination said it has the definition.  Nothing else changes on this
host: a running VM keeps running (no pause, no fence), a stopped one stays
defined and stopped.

:func:`begin_offline` is what :func:`ferry_source.begin.begin` runs for an
offline migration and :func:`confirm_offline` what both drivers call at
Confirm, so the p2p driver here and the client-driven mode share them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ferry.domain import format_domain
from ferry.errors import FerryError, MigrationFailed, ReplyLost
from ferry.flags import MigrationFlags, flag_names
from ferry.jobs import AsyncJob, Job, JobRecord
from ferry.journal import MessageID, log_event
from ferry.offline import ConfirmAction, confirm_action, source_refusal
from ferry.protocol.cookie import Cookie, Identity, Persistent
from ferry.rpc import RequestContext
from ferry_source.begin import JOB_TIMEOUT, begin, destination_xml
from ferry_source.context import Emit, SourceContext
from ferry_source.outgoing import Outgoing
from ferry_source.p2p import enter_phase, send_prepare
from ferry_source.peer import close_session, connect_peer, request

__all__ = ["begin_offline", "confirm_offline", "migrate_offline", "recover_offline"]

log = logging.getLogger("ferry.source.migration")


async def begin_offline(ctx: SourceContext, out: Outgoing, emit: Emit) -> tuple[Cookie, str]:
    """Begin of an offline migration: (cookie, XML) for Prepare; ``out.job`` is held.

    The XML is the persistent definition (the inactive one: a running
    domain's live XML is not what moves), or ``--xml`` checked against it.

    Raises:
        MigrationRefused: a transient domain, snapshots, an unsettled fence.
        ABIError: ``--xml`` changes what the guest sees.
        JobBusy: the domain has a job.
    """
    domain, flags, params = out.domain, out.flags, out.params
    out.phases.advance("begin")
    emit("phase", {"phase": "begin", "migration_id": out.migration_id})
    fence = ctx.fences.get(domain.uuid)
    definition = ctx.host.load_definition(domain.name)
    snapshots = [s["name"] for s in ctx.snapshots(domain.name)]
    source_refusal(domain.name, definition, snapshots=snapshots,
                   fenced=fence.describe() if fence is not None else None)  # fmt: skip
    assert definition is not None
    xml_domain = destination_xml(definition, params)
    running = ctx.host.load_status(domain.name) is not None
    log_event(log, MessageID.MIGRATION_STARTED,
              f"migrating the definition of {domain.name} to {out.host}:{out.port} offline "
              f"(flags {', '.join(flag_names(flags))}); it stays "
              f"{'running' if running else 'shut off'} here",
              phase="begin", flags=int(flags), peer_uri=out.peer_uri)  # fmt: skip
    job = await ctx.jobs.begin_async(
        definition.uuid, domain.name, AsyncJob.MIGRATION_OUT, flags=int(flags),
        phase="begin", migration_id=out.migration_id, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    out.job = job
    out.was_running = running
    # Recovery reads ``offline`` to know that nothing here needs settling.
    job.record(peer_uri=out.peer_uri, peer=out.host, was_running=running, flags=int(flags),
               offline=True)  # fmt: skip
    cookie = Cookie().with_identity(
        Identity(name=domain.name, uuid=definition.uuid, hostname=ctx.config.host.name,
                 host_uuid=ctx.config.host.uuid, migration_id=out.migration_id)
    ).with_persistent(Persistent(xml=format_domain(definition)))  # fmt: skip
    return cookie, format_domain(xml_domain)


def confirm_offline(
    ctx: SourceContext, out: Outgoing, *, finish: str, dest_host: str, started: float,
    error: FerryError | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Confirm of an offline migration, from Finish's result; the op's result.

    ``finish`` is ``completed`` (the destination defined it), ``failed``
    (it answered with an error, or the migration was cancelled) or
    ``unknown`` (its answer was lost).  Only ``completed`` with
    ``--undefine-source`` changes anything here.

    Raises:
        FerryError: ``error`` (failed), or a ReplyLost saying the source
            definition was kept (unknown).
    """
    action = confirm_action(undefine_source=bool(out.flags & MigrationFlags.UNDEFINE_SOURCE),
                            finish=finish)  # fmt: skip
    if out.job is not None and finish != "unknown":
        out.job.record(result=finish)
    if finish == "failed":
        raise error or MigrationFailed(f"the offline migration of '{out.name}' was cancelled")
    if finish == "unknown":
        note = ("; --undefine-source was not applied: the source definition stays"
                if action is ConfirmAction.KEEP_UNKNOWN else "")  # fmt: skip
        raise ReplyLost(
            f"{error or 'Finish got no answer'}: {out.peer} may or may not have defined "
            f"'{out.dest_name or out.name}' (see 'ferryctl list --all' there){note}",
            peer=out.peer, migration_id=out.migration_id,
        )  # fmt: skip
    source = "kept"
    if action is ConfirmAction.UNDEFINE:
        # We hold the domain's job: no start or define can slip in between.
        # Only the definition file goes: unlike an undefine, the domain's TPM
        # state and NVRAM stay, since an offline migration did not move them
        # (they are all that is left of them).
        ctx.host.definition_path(out.name).unlink(missing_ok=True)
        source = "undefined"
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"{out.name}: the source definition was removed (--undefine-source); "
                  f"{dest_host} has it (any TPM state or NVRAM file stays here)",
                  phase="confirm")  # fmt: skip
    state = "running" if ctx.host.load_status(out.name) is not None else "shut off"
    total_s = time.monotonic() - started
    log_event(log, MessageID.MIGRATION_COMPLETED,
              f"the definition of {out.name} migrated offline to {dest_host} as "
              f"{out.dest_name or out.name} in {total_s:.2f}s; here it is {state}, its "
              f"definition {source}", phase="confirm")  # fmt: skip
    figures: dict[str, Any] = {"wall_time_ms": int(total_s * 1000), "result": "completed",
                               "offline": 1}  # fmt: skip
    log_event(log, MessageID.MIGRATION_SUMMARY,
              "summary: " + ", ".join(f"{k}={v}" for k, v in sorted(figures.items())),
              phase="confirm", **{f"summary_{k}": v for k, v in figures.items()})  # fmt: skip
    return {"name": out.name, "dest_name": out.dest_name or out.name, "dest_host": dest_host,
            "migration_id": out.migration_id, "stats": figures, "offline": True,
            "source_definition": source, "source_state": state}  # fmt: skip


def _confirm_phase(out: Outgoing, emit: Emit) -> None:
    """Enter Confirm: an offline migration skips Perform, so the Src phase
    machine (whose begin → confirm step is the cancel path) stays at begin."""
    if out.job is not None:
        out.job.phase = "confirm"
    emit("phase", {"phase": "confirm", "migration_id": out.migration_id})
    log_event(log, MessageID.MIGRATION_PHASE, f"{out.name}: entering confirm", phase="confirm")


async def migrate_offline(
    ctx: SourceContext, out: Outgoing, req: RequestContext
) -> dict[str, Any]:
    """Peer to peer: Begin → Prepare → Finish → Confirm; the summary on success.

    Raises:
        FerryError: refused or failed (nothing changed here), or ReplyLost
            (Finish's answer was lost: the source definition stays).
    """
    emit = req.emit
    started = time.monotonic()
    cookie, xml = await begin(ctx, out, emit)
    job = out.job
    assert job is not None
    timeout = ctx.config.migration.reply_timeout_s
    try:
        out.session = session = await connect_peer(ctx.config, out.host, out.port)
        enter_phase(out, emit, "prepare")
        await send_prepare(ctx, out, session, cookie, xml)
        enter_phase(out, emit, "finish")
        finish, dest_host = "completed", out.peer
        error: FerryError | None = None
        try:
            fin = await request(session, "finish", {
                "name": out.dest_name, "cookie": Cookie().encode(), "flags": int(out.flags),
                "params": out.params.to_wire(), "cancelled": False,
                "migration_id": out.migration_id,
            }, timeout=timeout, peer=out.peer)  # fmt: skip
            dest_host = str(fin.get("host") or out.peer)
        except ReplyLost as exc:
            finish, error = "unknown", exc
        except FerryError as exc:
            finish, error = "failed", exc
        _confirm_phase(out, emit)
        return confirm_offline(ctx, out, finish=finish, dest_host=dest_host, started=started,
                               error=error)  # fmt: skip
    finally:
        if out.session is not None:
            await close_session(out.session)
        await ctx.jobs.end_async(job)


def client_confirm(
    ctx: SourceContext, out: Outgoing, emit: Emit, *, cancelled: bool, unknown: bool,
    dest_host: str, started: float,
) -> dict[str, Any]:  # fmt: skip
    """Client-driven Confirm of an offline migration (the client ran Prepare and Finish).

    A cancelled Confirm (the client's Prepare or Finish was refused) leaves
    everything as it was and answers ``cancelled``.
    """
    _confirm_phase(out, emit)
    if cancelled:
        if out.job is not None:
            out.job.record(result="failed")
        log_event(log, MessageID.MIGRATION_ABORTED,
                  f"offline migration of {out.name} to {out.peer} cancelled by its client; "
                  "nothing changed here", phase="confirm")  # fmt: skip
        return {"name": out.name, "migration_id": out.migration_id, "result": "cancelled",
                "source": "unchanged (offline migration)"}  # fmt: skip
    return confirm_offline(ctx, out, finish="unknown" if unknown else "completed",
                           dest_host=dest_host, started=started)  # fmt: skip


def recover_offline(job: Job, record: JobRecord) -> None:
    """After a restart: an interrupted offline migration changed nothing here.

    The source definition stays even with ``--undefine-source`` (the
    destination's answer is not known): two definitions are harmless.
    """
    log_event(log, MessageID.MIGRATION_ABORTED,
              f"offline migration {record.migration_id} of {job.name} was interrupted by a "
              "restart: nothing changed here; the source definition stays",
              level=logging.WARNING)  # fmt: skip
