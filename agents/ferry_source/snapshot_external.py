"""External disk-only snapshots: each writable disk continues on a new qcow2 overlay.

The agent creates every overlay itself (inside ``[storage] allowed``, never
over an existing file: reserved with ``O_EXCL`` first, then written by
``qemu-img create -u`` so the image in use is not opened), and a running
qemu switches all disks at once (one ``transaction`` of ``blockdev-snapshot``
onto overlays added with ``blockdev-add``).  Then the live and persistent
definitions point at the overlays; the old images become their backing
files, read-only from now on.  Anything that fails takes the new overlays
and nodes away again: the domain stays on its old images.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ferry.domain import Domain
from ferry.domain.argv import _disk_id
from ferry.errors import QMPError, SnapshotError
from ferry.host import LiveDomain
from ferry.qemu import QemuProcess
from ferry.snapshots import Snapshot, external_plan, overlay_disks_xml, with_overlays
from ferry.storage_policy import DomainPath, StoragePolicy
from ferry_source.snapshot_qemu import active_nodes, qemu_img

if TYPE_CHECKING:
    from ferry_source.agent import SourceAgent

__all__ = ["take_external"]


async def take_external(agent: SourceAgent, live: LiveDomain, snap: Snapshot) -> Snapshot:
    """Put every writable disk of ``live`` on a new overlay; the snapshot as recorded.

    Raises:
        SnapshotError, PathNotAllowed: nothing was changed.
    """
    dom = live.domain
    plan = external_plan(dom, snap.name)
    policy = StoragePolicy.for_domain(agent.config, dom.name)
    for target, _, overlay in plan:
        item = DomainPath(f"domain/devices/disk[{target}]/source", overlay, "disk",
                          target=target, writable=True)  # fmt: skip
        policy.check_path(item, "snapshot")
        if os.path.lexists(overlay):
            raise SnapshotError(f"cannot take snapshot '{snap.name}': the overlay {overlay} of "
                                f"disk {target} exists already")  # fmt: skip
    binary = "qemu-img"
    created: list[str] = []
    try:
        for target, image, overlay in plan:
            disk = next(d for d in dom.disks if d.target_dev == target)
            info = json.loads(await qemu_img(binary, "info", "-U", "--output=json",
                                             "-f", disk.format or "raw", image))  # fmt: skip
            fd = os.open(overlay, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)  # fmt: skip
            os.close(fd)
            created.append(overlay)
            await qemu_img(binary, "create", "-q", "-f", "qcow2", "-u", "-b", image,
                           "-F", disk.format or "raw", overlay, str(int(info["virtual-size"])))
        if live.status is not None:
            proc = await agent.host.process(dom.name)
            await _switch(proc, dom, plan)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    overlays = {target: overlay for target, _, overlay in plan}
    if live.status is not None:
        agent.host.save_live_definition(with_overlays(dom, overlays))
    persistent = agent.host.load_definition(dom.name)
    if persistent is not None:
        # Only where the definition names the same image (a disk changed
        # for the next boot keeps that change).
        same = {t: o for t, image, o in plan
                if any(d.target_dev == t and d.source == image for d in persistent.disks)}
        agent.host.save_definition(with_overlays(persistent, same))
    return replace(snap, kind="external", memory="no", state="disk-snapshot",
                   disks=overlay_disks_xml(plan))  # fmt: skip


async def _switch(proc: QemuProcess, dom: Domain, plan: list[tuple[str, str, str]]) -> None:
    """blockdev-add every overlay, then one transaction moves every disk onto its overlay."""
    active = await active_nodes(proc)
    added: list[str] = []
    actions: list[dict[str, Any]] = []
    try:
        for target, _, overlay in plan:
            disk = next(d for d in dom.disks if d.target_dev == target)
            did = _disk_id(dom, disk)
            node = active.get(did)
            if node is None:
                raise SnapshotError(f"qemu shows no image on disk {target} ({did})")
            tag = uuid.uuid4().hex[:12]
            storage, fmt = f"ov{tag}-s", f"ov{tag}-f"
            await _qmp(proc, "blockdev-add", {"driver": "file", "node-name": storage,
                                              "filename": overlay})  # fmt: skip
            added.append(storage)
            await _qmp(proc, "blockdev-add", {"driver": "qcow2", "node-name": fmt,
                                              "file": storage, "backing": None})  # fmt: skip
            added.append(fmt)
            actions.append({"type": "blockdev-snapshot", "data": {"node": node, "overlay": fmt}})
        await _qmp(proc, "transaction", {"actions": actions})
    except BaseException:
        for node in reversed(added):
            with contextlib.suppress(QMPError):
                await proc.qmp.execute("blockdev-del", {"node-name": node})
        raise


async def _qmp(proc: QemuProcess, cmd: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await proc.qmp.execute(cmd, args)
    except QMPError as exc:
        raise SnapshotError(f"disk-only snapshot: {exc}") from None
