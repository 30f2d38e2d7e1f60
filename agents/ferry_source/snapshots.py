"""ferry-source's snapshot ops (virsh's snapshot-* verbs) over :mod:`ferry.snapshots`.

Every change of a domain's tree runs under the domain's MODIFY job, so two
requests cannot interleave their read-modify-write of the folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ferry.errors import SnapshotError
from ferry.host import LiveDomain
from ferry.jobs import JobType
from ferry.journal import LogContext
from ferry.rpc import RequestContext
from ferry.snapshots import (
    Snapshot,
    SnapshotStore,
    SnapshotTree,
    check_snapshot_name,
    format_snapshot_xml,
    internal_plan,
    parse_snapshot_xml,
)
from ferry_source.snapshot_external import take_external
from ferry_source.snapshot_qemu import (
    apply_offline,
    create_offline,
    delete_offline,
    live_nodes,
    run_job,
)

if TYPE_CHECKING:
    from ferry_source.agent import Handler, SourceAgent

__all__ = ["SnapshotOps"]

log = logging.getLogger("ferry.source.snapshots")

JOB_TIMEOUT = 30.0


class SnapshotOps:
    """The snapshot_* handlers of one source agent."""

    def __init__(self, agent: SourceAgent) -> None:
        self.agent = agent
        self.store = SnapshotStore(agent.config.paths.snapshots_dir)

    def handlers(self) -> dict[str, Handler]:
        """The ops this module serves."""
        return {
            "snapshot_create": self.op_create,
            "snapshot_list": self.op_list,
            "snapshot_delete": self.op_delete,
            "snapshot_current": self.op_current,
            "snapshot_dumpxml": self.op_dumpxml,
            "snapshot_revert": self.op_revert,
        }

    def summaries(self, name: str) -> list[dict[str, Any]]:
        """The domain's snapshots (parents first), for info, Begin and undefine."""
        return self.store.load(name).summaries()

    async def op_create(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Take a snapshot (metadata), or ``redefine`` one from its XML."""
        live = self.agent.resolve(ctx, "snapshot_create", args["name"])
        dom = live.domain
        async with self.agent.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY,
                                            timeout=JOB_TIMEOUT):  # fmt: skip
            tree = self.store.load(dom.name)
            if args["redefine"]:
                if not args["xml"]:
                    raise SnapshotError("--redefine needs the snapshot's XML")
                snap = parse_snapshot_xml(args["xml"], where="--redefine XML")
                if snap.domain_uuid and snap.domain_uuid != dom.uuid:
                    raise SnapshotError(f"snapshot '{snap.name}' belongs to the domain with "
                                        f"uuid {snap.domain_uuid}, not '{dom.name}' "
                                        f"({dom.uuid})")  # fmt: skip
                if snap.kind != "metadata":
                    raise SnapshotError(f"cannot redefine snapshot '{snap.name}': only "
                                        "metadata-only snapshots can be redefined "
                                        f"(it says kind '{snap.kind}')")  # fmt: skip
                if not snap.domain_uuid:
                    snap = replace(snap, domain_uuid=dom.uuid)
                tree.redefine(snap, current=args["current"])
                verb = "redefined"
            else:
                if args["current"]:
                    raise SnapshotError("--current only goes with --redefine")
                if args["xml"]:
                    given = parse_snapshot_xml(args["xml"], where="snapshot XML")
                    args["snapshot"] = given.name
                    args["description"] = args["description"] or given.description
                if not args["snapshot"]:
                    args["snapshot"] = str(int(time.time()))
                check_snapshot_name(args["snapshot"])
                if args["snapshot"] in tree.snapshots:
                    raise SnapshotError(f"snapshot '{args['snapshot']}' already exists for "
                                        f"domain '{dom.name}'")  # fmt: skip
                state, _ = await self.agent.state_of(live)
                snap = Snapshot(name=args["snapshot"], description=args["description"],
                                created=int(time.time()), state=_snapshot_state(state),
                                domain_uuid=dom.uuid)  # fmt: skip
                if args["disk_only"]:
                    snap = await take_external(self.agent, live, snap)
                else:
                    snap = await self._take_internal(live, snap)
                snap = tree.create(snap)
                verb = "created"
            self.store.save(dom.name, tree, changed=[snap.name])
        with LogContext(domain=dom.name, uuid=dom.uuid):
            log.info("snapshot %s of %s %s (parent %s)", snap.name, dom.name, verb,
                     snap.parent or "-")
        return {"name": dom.name, "snapshot": snap.name, "parent": snap.parent,
                "current": tree.current == snap.name, "redefined": verb == "redefined"}

    async def _take_internal(self, live: LiveDomain, snap: Snapshot) -> Snapshot:
        """An internal snapshot of a domain with qcow2 disks: with its memory when it
        runs (qemu's snapshot-save), of its disks only when it is shut off (qemu-img).

        A domain without writable disks gets a metadata-only snapshot (there
        is nowhere to keep its state).
        """
        dom = live.domain
        plan = internal_plan(dom)
        if plan is None:
            return snap
        if live.status is None:
            await create_offline(dom, snap.name)
            return replace(snap, kind="internal", memory="no", state="shutoff")
        vmstate, ids = plan
        proc = await self.agent.host.process(dom.name)
        nodes = await live_nodes(proc, ids)
        await run_job(proc, "snapshot-save",
                      {"tag": snap.name, "vmstate": nodes[0], "devices": nodes})
        return replace(snap, kind="internal", memory="internal", vmstate_disk=vmstate)

    async def op_revert(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Put the running domain's memory and disks back as they were at the snapshot."""
        live = self.agent.resolve(ctx, "snapshot_revert", args["name"])
        dom = live.domain
        if args["running"] and args["paused"]:
            raise SnapshotError("--running and --paused exclude each other")
        async with self.agent.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY,
                                            timeout=JOB_TIMEOUT):  # fmt: skip
            tree = self.store.load(dom.name)
            snap = tree.get(args["snapshot"])
            if snap.kind != "internal":
                raise SnapshotError(f"cannot revert '{dom.name}' to snapshot '{snap.name}': "
                                    f"it is a {snap.kind} snapshot; only internal ones "
                                    "can be reverted to")  # fmt: skip
            live = self.agent.host.find(dom.name)
            if snap.memory == "no":
                return await self._revert_offline(live, tree, snap, args)
            if live.status is None:
                raise SnapshotError(f"cannot revert inactive domain '{dom.name}' to snapshot "
                                    f"'{snap.name}' (it holds memory): start it first")
            plan = internal_plan(live.domain)
            assert plan is not None  # the snapshot's vmstate disk is a qcow2 disk
            proc = await self.agent.host.process(dom.name)
            ids = plan[1]
            vmstate = snap.vmstate_disk if snap.vmstate_disk in ids else plan[0]
            nodes = await live_nodes(proc, ids)
            await run_job(proc, "snapshot-load", {"tag": snap.name,
                                                  "vmstate": nodes[ids.index(vmstate)],
                                                  "devices": nodes})  # fmt: skip
            paused = args["paused"] or (snap.state == "paused" and not args["running"])
            run = await proc.qmp.query_status()
            if paused and run.running:
                await proc.qmp.execute("stop")
            elif not paused and not run.running:
                await proc.qmp.execute("cont")
            status = self.agent.host.load_status(dom.name)
            if status is not None:
                status.run_state = "paused" if paused else "running"
                self.agent.host.save_status(status)
            tree.current = snap.name
            self.store.save(dom.name, tree)
        with LogContext(domain=dom.name, uuid=dom.uuid):
            log.info("%s reverted to snapshot %s", dom.name, snap.name)
        return {"name": dom.name, "snapshot": snap.name,
                "state": "paused" if paused else "running"}

    async def _revert_offline(self, live: LiveDomain, tree: SnapshotTree, snap: Snapshot,
                              args: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """Revert a shut-off domain's images to a disk-only internal snapshot."""
        dom = live.domain
        if live.status is not None:
            raise SnapshotError(f"cannot revert running domain '{dom.name}' to snapshot "
                                f"'{snap.name}': it holds no memory; shut the domain down "
                                "first")  # fmt: skip
        if args["running"] or args["paused"]:
            raise SnapshotError("--running/--paused: snapshot "
                                f"'{snap.name}' holds no memory to run from")
        await apply_offline(dom, snap.name)
        tree.current = snap.name
        self.store.save(dom.name, tree)
        with LogContext(domain=dom.name, uuid=dom.uuid):
            log.info("%s reverted to snapshot %s (disks)", dom.name, snap.name)
        return {"name": dom.name, "snapshot": snap.name, "state": "shut off"}

    async def _delete_state(self, live: LiveDomain, snaps: list[Snapshot]) -> None:
        """Remove the internal snapshots' data from the images (before their metadata)."""
        dom = live.domain
        for snap in snaps:
            if snap.kind != "internal":
                continue
            if live.status is None:
                await delete_offline(dom, snap.name)
                continue
            plan = internal_plan(dom)
            if plan is None:
                continue
            proc = await self.agent.host.process(dom.name)
            await run_job(proc, "snapshot-delete",
                          {"tag": snap.name, "devices": await live_nodes(proc, plan[1])})

    async def op_list(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """The domain's snapshots, parents first, with the current one and the tree drawing."""
        live = self.agent.resolve(ctx, "snapshot_list", args["name"])
        tree = self.store.load(live.domain.name)
        return {"snapshots": tree.summaries(), "current": tree.current,
                "tree": tree.tree_lines()}  # fmt: skip

    async def op_current(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """The current snapshot; with ``snapshot``, make that one current."""
        live = self.agent.resolve(ctx, "snapshot_current", args["name"])
        dom = live.domain
        if args["snapshot"] is None:
            tree = self.store.load(dom.name)
            if tree.current is None:
                raise SnapshotError(f"domain '{dom.name}' has no current snapshot")
            snap = tree.get(tree.current)
            return {"name": dom.name, "snapshot": snap.name,
                    "xml": format_snapshot_xml(snap, current=True)}  # fmt: skip
        async with self.agent.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY,
                                            timeout=JOB_TIMEOUT):  # fmt: skip
            tree = self.store.load(dom.name)
            snap = tree.get(args["snapshot"])
            tree.current = snap.name
            self.store.save(dom.name, tree)
        return {"name": dom.name, "snapshot": snap.name,
                "xml": format_snapshot_xml(snap, current=True)}  # fmt: skip

    async def op_dumpxml(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """One snapshot's XML."""
        live = self.agent.resolve(ctx, "snapshot_dumpxml", args["name"])
        tree = self.store.load(live.domain.name)
        snap = tree.get(args["snapshot"])
        return {"name": live.domain.name, "snapshot": snap.name,
                "xml": format_snapshot_xml(snap, current=tree.current == snap.name)}

    async def op_delete(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Delete a snapshot (its children move up), or with ``children`` its subtree."""
        live = self.agent.resolve(ctx, "snapshot_delete", args["name"])
        dom = live.domain
        async with self.agent.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY,
                                            timeout=JOB_TIMEOUT):  # fmt: skip
            tree = self.store.load(dom.name)
            try:
                tree.get(args["snapshot"])
            except SnapshotError:
                raise SnapshotError(f"domain '{dom.name}' has no snapshot named "
                                    f"'{args['snapshot']}'") from None  # fmt: skip
            parents = {s.name: s.parent for s in tree.snapshots.values()}
            doomed = [args["snapshot"]] if not args["children_only"] else []
            if args["children"] or args["children_only"]:
                doomed += [s.name for s in tree.descendants(args["snapshot"])]
            if not args["metadata"]:
                await self._delete_state(self.agent.host.find(dom.name),
                                         [tree.get(n) for n in reversed(doomed)])
            gone = tree.delete(args["snapshot"], children=args["children"],
                               children_only=args["children_only"])  # fmt: skip
            moved = [n for n, s in tree.snapshots.items() if s.parent != parents[n]]
            self.store.save(dom.name, tree, changed=moved, removed=gone)
        return {"name": dom.name, "snapshot": args["snapshot"], "deleted": gone,
                "current": tree.current}


def _snapshot_state(state: str) -> str:
    """A domain state name (dominfo's) as a snapshot state."""
    return {"running": "running", "paused": "paused", "crashed": "crashed",
            "pmsuspended": "pmsuspended"}.get(state, "shutoff")  # fmt: skip
