"""The source's half of snapshots that move with a migration (feature ``snapshots``).

libvirt's v3 protocol could not carry a snapshot hierarchy (one cookie per
phase); Ferry's peers negotiate features and may exchange any number of
requests, so a p2p migration carries it: the frames are cut before Prepare
(a hierarchy over the bounds is refused before the destination starts
anything), sent after Prepare and before Perform, and redefined by the
destination at Finish.  A peer without the feature gets the old refusal.
With ``--undefine-source`` the source's metadata goes at Confirm.
"""

from __future__ import annotations

import logging
from typing import Any

from ferry.errors import MigrationRefused, SnapshotError
from ferry.flags import MigrationFlags
from ferry.journal import MessageID, log_event
from ferry.rpc import Session
from ferry.snapshots import SnapshotStore, to_frames
from ferry_source.context import SourceContext
from ferry_source.outgoing import Outgoing
from ferry_source.peer import request

__all__ = ["FEATURE", "check_peer", "drop_source_snapshots", "send_snapshots",
           "snapshot_frames", "speaks"]  # fmt: skip

log = logging.getLogger("ferry.source.migration")

FEATURE = "snapshots"
#: The largest snapshot frame sent (a fraction of the default 1 MiB frame).
FRAME_CAP = 256 << 10


def snapshot_frames(ctx: SourceContext, out: Outgoing) -> list[dict[str, Any]]:
    """The domain's hierarchy as bounded frames (one empty frame when it has none:
    the destination then drops metadata it kept from an earlier visit).

    Raises:
        MigrationRefused: the hierarchy exceeds a frame or the migration's bounds.
    """
    tree = SnapshotStore(ctx.config.paths.snapshots_dir).load(out.name)
    stateful = sorted(s.name for s in tree.snapshots.values() if s.kind != "metadata")
    if stateful and out.flags & (MigrationFlags.NON_SHARED_DISK | MigrationFlags.NON_SHARED_INC):
        # Their state is inside the images; qemu's mirror copies only the
        # current layer's data, never the snapshots an image holds.
        raise MigrationRefused(
            f"cannot migrate domain '{out.name}' with a storage copy: its snapshot(s) "
            f"{', '.join(stateful)} keep their state in the disk images, which the copy "
            "does not carry (migrate over shared storage, or delete them first)"
        )
    try:
        # Each host sets its own [limits] max_frame and the hello does not
        # say it: frames no bigger than FRAME_CAP fit any usual destination.
        return to_frames(tree, min(ctx.config.max_frame, FRAME_CAP))
    except SnapshotError as exc:
        raise MigrationRefused(f"cannot migrate domain '{out.name}' with its snapshots: "
                               f"{exc}") from None  # fmt: skip


def check_peer(session: Session, out: Outgoing, frames: list[dict[str, Any]]) -> None:
    """Refuse as before when the destination cannot take the hierarchy.

    Raises:
        MigrationRefused: the domain has snapshots and the peer lacks the feature.
    """
    count = sum(len(f["snapshots"]) for f in frames)
    if not count or speaks(session):
        return
    raise MigrationRefused(
        f"cannot migrate domain '{out.name}' with {count} snapshot(s): the destination "
        f"{out.peer} does not speak the '{FEATURE}' feature",
        snapshots=count,
    )


async def send_snapshots(
    ctx: SourceContext, out: Outgoing, session: Session, frames: list[dict[str, Any]]
) -> None:
    """Send every frame, in order, each answered before the next (after Prepare).

    Nothing goes to a peer without the feature (:func:`check_peer` let it
    through only for a domain without snapshots).
    """
    if not speaks(session):
        return
    timeout = ctx.config.migration.reply_timeout_s
    for frame in frames:
        await request(session, "migration_snapshots",
                      {"migration_id": out.migration_id, **frame},
                      timeout=timeout, peer=out.peer)  # fmt: skip
    count = sum(len(f["snapshots"]) for f in frames)
    if count:
        log_event(log, MessageID.MIGRATION_PHASE,
                  f"{out.name}: {count} snapshot(s) sent to {out.peer} in {len(frames)} "
                  f"frame(s) (current {frames[-1]['current'] or '-'})",
                  phase="prepare")  # fmt: skip


def speaks(session: Session) -> bool:
    """True if the peer of ``session`` negotiated the ``snapshots`` feature."""
    negotiated = session.conn.negotiated
    return negotiated is not None and FEATURE in negotiated.features


def drop_source_snapshots(ctx: SourceContext, name: str, *, undefine: bool) -> None:
    """Confirm after success: the metadata goes with the definition it belonged to.

    Kept when the source keeps its persistent definition (as libvirt keeps
    it); gone with ``--undefine-source``, or when nothing of the domain is
    left here (a transient domain).
    """
    if undefine or ctx.host.load_definition(name) is None:
        SnapshotStore(ctx.config.paths.snapshots_dir).remove_all(name)
