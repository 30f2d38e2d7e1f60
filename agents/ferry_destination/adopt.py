"""``adopt_incoming``: a client takes over a client-driven incoming migration.

A client-driven migration is bound to its client's connection
(:class:`~ferry_destination.incoming.Binding`); when that connection
closes, the migration waits ``[migration] client_grace_s`` before it is
discarded.  A client that calls ``adopt_incoming`` in that time
(``ferryctl migrate-recover``) becomes the connection the watchdog
follows, and gets Prepare's answer again to carry on with.  A tunnel
token still unused is replaced by a fresh one (the old client held the
old one); once a data channel is connected, the source host has what it
needs and no token is handed out again.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry.acl import check_access
from ferry.errors import AccessDenied, PhaseError
from ferry.journal import LogContext, MessageID, log_event
from ferry.rpc import RequestContext
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Incoming
from ferry_destination.tunnel import issue_token, redeemer_for

__all__ = ["adopt_incoming", "adopted_answer"]

log = logging.getLogger("ferry.destination")


async def adopt_incoming(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Bind a client-driven incoming migration to the caller's connection; Prepare's answer.

    The reply: ``name``, ``migration_id``, ``phase``, ``uri``, ``cookie``
    and, for a tunnelled migration none of whose data channels has
    connected yet, ``tunnel`` (``token``, ``channels``) with a fresh token.

    Raises:
        AccessDenied: the ACL refuses ``prepare`` on the domain, or the caller
            is a peer host (only clients drive a client-driven migration).
        PhaseError: no such incoming migration here (the outcome record says
            why, if there is one), it is driven by its source host, or its
            Finish has already begun.
    """
    migration_id = args["migration_id"]
    host = dst.config.host.name
    incoming = dst.find_migration(migration_id)
    if incoming is None:
        record = dst.outcomes.get(migration_id)
        if record is None:
            check_access(dst.config.acl, ctx.subject, "prepare", None)
            what = f"{host} has no record of it"
        else:
            check_access(dst.config.acl, ctx.subject, "prepare", record.domain, record.uuid)
            what = f"outcome: {record.state}" + (f": {record.reason}" if record.reason else "")
        raise PhaseError(f"migration {migration_id}: no incoming migration to take over "
                         f"on {host} ({what})")  # fmt: skip
    name = incoming.domain.name
    check_access(dst.config.acl, ctx.subject, "prepare", name, incoming.domain.uuid)
    if ctx.subject.kind == "peer":
        raise AccessDenied(
            f"access denied: {ctx.subject.describe()} may not take over migration "
            f"{migration_id}: only a client (ferryctl) takes over a client-driven migration",
            op="adopt_incoming", domain=name,
        )  # fmt: skip
    if not incoming.client_driven or incoming.binding is None:
        raise PhaseError(f"migration {migration_id} of '{name}' is driven by its source "
                         f"host {incoming.source_host or '?'}, not a client: nothing to "
                         "take over")  # fmt: skip
    if incoming.finishing:
        raise PhaseError(f"migration {migration_id} of '{name}': Finish has begun on {host}; "
                         "ask for its outcome (migration_outcome) instead")  # fmt: skip
    with LogContext(domain=name, uuid=incoming.domain.uuid, migration_id=migration_id,
                    phase=incoming.phases.current):  # fmt: skip
        replaced_open = incoming.binding.adopt(ctx.session)
        answer = adopted_answer(dst, incoming, redeemer_for(ctx.subject, incoming.source_host))
        previous = ("its previous client was still connected"
                    if replaced_open else "its previous client had gone")  # fmt: skip
        token = ("a fresh tunnel token" if "tunnel" in answer
                 else "no token" if incoming.tunnel is not None else "")  # fmt: skip
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"adopt_incoming: {ctx.subject.describe()} took over incoming {name} "
                  f"({previous}{'; ' + token if token else ''})",
                  level=logging.WARNING if replaced_open else logging.INFO)  # fmt: skip
        return answer


def adopted_answer(
    dst: DestinationContext, incoming: Incoming, redeemer: str | None
) -> dict[str, Any]:
    """Prepare's answer for a client taking over, with a fresh token if the old one is unused.

    A token any of whose channels was redeemed stays: a fresh one would
    revoke it under the source host's feet.
    """
    stored = incoming.answer or {}
    answer: dict[str, Any] = {
        "name": incoming.domain.name,
        "migration_id": incoming.migration_id,
        "phase": incoming.phases.current,
        "uri": stored.get("uri", ""),
        "cookie": stored.get("cookie", b""),
    }
    tunnel = incoming.tunnel
    if tunnel is not None and dst.tokens.spent(tunnel.name) == 0 and tunnel.connected == 0:
        token = issue_token(dst, tunnel, redeemer)
        answer["tunnel"] = {"token": token, "channels": tunnel.channels}
    return answer
