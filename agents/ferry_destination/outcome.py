"""The peer ops a source uses to learn and shape an incoming migration's fate.

``migration_outcome`` answers "what became of migration X?" from the
durable record (:mod:`ferry.outcomes`).  Asking is also a fence: a
migration still only prepared (no Finish yet) is discarded before the
answer, so a Finish that arrives later can no longer start a copy the
source has meanwhile resumed -- unless its qemu is in post-copy: then
the CPU state is here, the source never resumes, and the migration is
held.  ``migration_progress`` keeps the watchdog
from killing a stream that still moves.
"""

from __future__ import annotations

from typing import Any

from ferry.acl import check_access
from ferry.rpc import RequestContext
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import discard
from ferry_destination.postcopy import hold, postcopy_state

__all__ = ["migration_outcome", "migration_progress"]


async def migration_outcome(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """The outcome of one migration: ``running``, ``not-running`` or ``pending``."""
    migration_id = args["migration_id"]
    incoming = dst.find_migration(migration_id)
    if incoming is not None:
        check_access(dst.config.acl, ctx.subject, "migration_outcome", incoming.domain.name,
                     incoming.domain.uuid)  # fmt: skip
        if incoming.finishing:
            return {"migration_id": migration_id, "outcome": "pending", "state": "finishing",
                    "reason": "Finish is in progress", "domain": incoming.domain.name}  # fmt: skip
        if await postcopy_state(incoming.proc) is not None:
            await hold(dst, incoming, "the source asked for the outcome before sending Finish")
        else:
            await discard(dst, incoming, "the source asked for the outcome before sending Finish")
    record = dst.outcomes.get(migration_id)
    if record is None:
        check_access(dst.config.acl, ctx.subject, "migration_outcome", None)
        # Written at Prepare before any qemu exists: no record, no copy here.
        return {"migration_id": migration_id, "outcome": "not-running", "state": "unknown",
                "reason": f"{dst.config.host.name} has no record of this migration",
                "domain": ""}  # fmt: skip
    check_access(dst.config.acl, ctx.subject, "migration_outcome", record.domain, record.uuid)
    return record.answer()


async def migration_progress(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """The source reports how far its stream got (keeps the watchdog patient)."""
    incoming = dst.find_migration(args["migration_id"])
    if incoming is None:
        return {"known": False}
    check_access(dst.config.acl, ctx.subject, "migration_progress", incoming.domain.name,
                 incoming.domain.uuid)  # fmt: skip
    incoming.note_progress(args["transferred"])
    return {"known": True}
