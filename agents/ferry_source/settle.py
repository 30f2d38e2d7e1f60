"""Settling a migration whose Finish reply was lost: ask, then act on the answer.

Used by the p2p driver (Finish's reply did not come), by recovery (an agent
restarted in phase finish) and by ``ferryctl migrate-recover`` (the outcome
was unknown and the destination may be back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ferry.jobs import Job
from ferry.jobs.recovery import OutgoingAction, PeerOutcome, decide_outgoing
from ferry.journal import MessageID, log_event
from ferry_source.checks import parse_dest_uri
from ferry_source.confirm import fence_unknown, observe_qemu, resume_source, stop_source
from ferry_source.context import Emit, SourceContext, no_events
from ferry_source.peer import ask_outcome

__all__ = ["Settled", "Subject", "settle"]

log = logging.getLogger("ferry.source.migration")


@dataclass(frozen=True)
class Subject:
    """The recorded facts of the migration to settle."""

    name: str
    uuid: str
    migration_id: str
    peer: str
    peer_uri: str
    was_running: bool
    leases_released: bool = False
    undefine: bool = False
    saved: dict[str, Any] | None = None


@dataclass(frozen=True)
class Settled:
    """How it ended: ``completed`` (runs there), ``failed`` (runs here) or ``unknown``."""

    result: str
    message: str
    reply: dict[str, Any]


async def settle(
    ctx: SourceContext,
    subject: Subject,
    *,
    deadline_s: float,
    job: Job | None = None,
    emit: Emit = no_events,
) -> Settled:
    """Ask the destination for the outcome until it knows or ``deadline_s`` passes, then act.

    ``completed``: our copy is stopped and fenced.  ``failed``: our copy is
    resumed.  ``unknown``: it stays paused with an UNKNOWN fence that says why.
    """
    host, port = parse_dest_uri(subject.peer_uri)

    def attempt(note: str) -> None:
        emit("warning", {"message": f"asking {subject.peer} for the outcome: {note}"})

    log_event(log, MessageID.MIGRATION_PHASE,
              f"{subject.name}: the outcome of migration {subject.migration_id} is not known "
              f"here; asking {subject.peer}", phase="finish")  # fmt: skip
    emit("warning", {"message": f"asking {subject.peer} for the outcome of migration "
                                f"{subject.migration_id}"})  # fmt: skip
    answer, reply = await ask_outcome(ctx.config, host, port, subject.migration_id,
                                      deadline_s=deadline_s, on_attempt=attempt)  # fmt: skip
    decision = decide_outgoing("finish", await observe_qemu(ctx, subject.name), peer=answer,
                               deadline_passed=True)  # fmt: skip
    said = reply.get("reason") or reply.get("error") or answer.value
    if decision.action is OutgoingAction.CONFIRM:
        if job is not None:
            job.phase = "confirm"
            job.record(result="completed")
        await stop_source(ctx, subject.name, subject.uuid, migration_id=subject.migration_id,
                          peer=subject.peer, peer_uri=subject.peer_uri,
                          undefine=subject.undefine)  # fmt: skip
        message = f"{subject.peer} runs {subject.name}: the source copy was stopped"
        # The migration's one COMPLETED/FAILED entry is its driver's; this
        # is how the outcome was learnt.
        log_event(log, MessageID.MIGRATION_PHASE, message, phase="confirm")
        return Settled("completed", message, reply)
    if decision.action is OutgoingAction.RESUME:
        if job is not None:
            job.phase = "confirm"
            job.record(result="failed")
        ctx.fences.clear(subject.uuid)
        what = await resume_source(ctx, subject.name, was_running=subject.was_running,
                                   leases_released=subject.leases_released,
                                   saved=subject.saved)  # fmt: skip
        message = f"{subject.peer} does not run {subject.name} ({said}); {what}"
        log_event(log, MessageID.MIGRATION_PHASE, message, phase="confirm",
                  level=logging.WARNING)  # fmt: skip
        return Settled("failed", message, reply)
    reason = f"{subject.peer} unreachable" if answer is PeerOutcome.UNREACHABLE else (
        f"{subject.peer} has not decided ({said})"
    )  # fmt: skip
    fence = fence_unknown(ctx, subject.name, subject.uuid, migration_id=subject.migration_id,
                          peer=subject.peer, peer_uri=subject.peer_uri, reason=reason,
                          was_running=subject.was_running,
                          leases_released=subject.leases_released)  # fmt: skip
    return Settled("unknown", fence.describe(), reply)
