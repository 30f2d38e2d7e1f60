"""The destination's half of snapshots that move with a migration.

Between Prepare and Perform the source sends the domain's whole snapshot
hierarchy in ``migration_snapshots`` frames (feature ``snapshots``).  They
are assembled here in memory (:class:`ferry.snapshots.TreeAssembler`, every
bound checked) and written only by Finish, before the CPUs start; a Finish
that fails takes them away again, so a failed migration leaves none here.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry.acl import check_access
from ferry.errors import MigrationFailed, PhaseError
from ferry.journal import LogContext
from ferry.rpc import RequestContext
from ferry.snapshots import SnapshotStore, TreeAssembler
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Incoming

__all__ = ["commit_snapshots", "migration_snapshots", "uncommit_snapshots"]

log = logging.getLogger("ferry.destination.snapshots")


async def migration_snapshots(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """One frame of the incoming domain's snapshot hierarchy (kept until Finish)."""
    incoming = dst.find_migration(args["migration_id"])
    if incoming is None:
        raise PhaseError(f"no prepared incoming migration {args['migration_id']}")
    dom = incoming.domain
    # Part of the Prepare conversation: whoever may prepare may send these.
    check_access(dst.config.acl, ctx.subject, "prepare", dom.name, dom.uuid)
    if incoming.finishing:
        raise PhaseError(f"snapshot metadata for '{dom.name}' after Finish began")
    assembler = incoming.snapshots
    if assembler is None:
        assembler = incoming.snapshots = TreeAssembler(dom.uuid)
    assembler.add(args)
    with LogContext(domain=dom.name, uuid=dom.uuid, migration_id=incoming.migration_id,
                    phase="prepare"):  # fmt: skip
        log.info("snapshot metadata frame %d: %d snapshot(s)%s", args["seq"],
                 len(args["snapshots"]), " (last)" if assembler.done else "")  # fmt: skip
    return {"received": len(assembler.tree), "done": assembler.done}


def commit_snapshots(dst: DestinationContext, incoming: Incoming) -> None:
    """Finish: write the received hierarchy (before the CPUs start).

    Raises:
        MigrationFailed: the source began a hierarchy and did not end it.
    """
    assembler = incoming.snapshots
    if assembler is None:
        return
    if not assembler.done:
        raise MigrationFailed(f"the snapshot metadata of '{incoming.domain.name}' is "
                              f"incomplete ({len(assembler.tree)} snapshot(s), no last "
                              "frame)")  # fmt: skip
    try:
        SnapshotStore(dst.config.paths.snapshots_dir).replace_all(
            incoming.domain.name, assembler.tree
        )
    except OSError as exc:
        raise MigrationFailed(f"cannot write the snapshot metadata: {exc}") from exc
    assembler.committed = True
    log.info("%d snapshot(s) of %s defined here (current %s)", len(assembler.tree),
             incoming.domain.name, assembler.tree.current or "-")  # fmt: skip


def uncommit_snapshots(dst: DestinationContext, incoming: Incoming) -> None:
    """A Finish that failed after :func:`commit_snapshots`: the metadata goes again."""
    assembler = incoming.snapshots
    if assembler is not None and assembler.committed:
        SnapshotStore(dst.config.paths.snapshots_dir).remove_all(incoming.domain.name)
        assembler.committed = False

