"""Snapshot metadata: one domain's snapshot tree, its XML, its storage, its wire form.

libvirt keeps a domain's snapshots as a tree: each snapshot names its
parent (the snapshot that was current when it was taken), and at most one
snapshot is *current* (the one the domain's state descends from; the
parent of the next one).  This module is the model, sans I/O:

- :class:`Snapshot` and :func:`parse_snapshot_xml` / :func:`format_snapshot_xml`
  (``<domainsnapshot>``, as ``virsh snapshot-dumpxml`` prints it and
  ``snapshot-create --redefine`` reads it);
- :class:`SnapshotTree`: create, redefine, delete (children move up to the
  deleted snapshot's parent, as libvirt), the current snapshot, the
  ``snapshot-list --tree`` drawing;
- :func:`to_frames` / :class:`TreeAssembler`: the whole hierarchy cut into
  bounded frames for a migration (parents first), and put back together on
  the destination with every bound checked.

:class:`SnapshotStore` is the small I/O part: ``state_dir/snapshots/NAME/``
holds one ``SNAP.xml`` per snapshot and ``.current`` (names never start
with a dot), each replaced atomically.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from ferry.errors import SnapshotError

if TYPE_CHECKING:
    from ferry.domain import Domain
from ferry.statefile import atomic_write

__all__ = [
    "KINDS",
    "MAX_SNAPSHOTS",
    "MAX_TREE_BYTES",
    "STATES",
    "Snapshot",
    "SnapshotStore",
    "SnapshotTree",
    "TreeAssembler",
    "check_snapshot_name",
    "external_plan",
    "format_snapshot_xml",
    "internal_plan",
    "overlay_disks_xml",
    "parse_snapshot_xml",
    "to_frames",
    "with_overlays",
]

#: Domain states a snapshot records (libvirt's virDomainSnapshotState names).
STATES = frozenset({"running", "paused", "shutoff", "disk-snapshot", "crashed", "pmsuspended"})
#: How the snapshot's state is kept: metadata only, internal (qcow2), external overlays.
KINDS = frozenset({"metadata", "internal", "external"})
#: Bounds of one domain's hierarchy on the wire (a migration refuses beyond them).
MAX_SNAPSHOTS = 10_000
MAX_TREE_BYTES = 64 << 20
#: Bytes of one frame's payload left for the request around it.
FRAME_OVERHEAD = 4096

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                          remove_blank_text=True)  # fmt: skip
_KNOWN = frozenset({"name", "description", "state", "creationTime", "parent", "memory", "disks",
                    "domain", "active", "ferry"})  # fmt: skip


def check_snapshot_name(name: str) -> None:
    """Refuse a name that cannot be a file name under the domain's folder.

    Raises:
        SnapshotError: empty, too long, a slash, NUL, or a leading dot.
    """
    if not name or "/" in name or name.startswith(".") or "\0" in name or len(name) > 200:
        raise SnapshotError(f"invalid snapshot name {name!r}: 1..200 characters, no '/', "
                            "no NUL, not starting with '.'")  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """One snapshot's metadata.

    ``disks`` and ``domain`` keep the ``<disks>`` and ``<domain>`` elements
    as XML text, so that a redefined or migrated snapshot prints back what
    it was given.  ``kind`` and ``vmstate_disk`` are Ferry's own
    (``<ferry kind=… vmstate=…/>``): how the state was taken, and for an
    internal snapshot with memory, which disk holds the VM state.
    """

    name: str
    parent: str | None = None
    description: str = ""
    created: int = 0
    state: str = "shutoff"
    memory: str = "no"
    kind: str = "metadata"
    vmstate_disk: str | None = None
    domain_uuid: str = ""
    disks: str | None = None
    domain: str | None = None

    def summary(self, current: str | None) -> dict[str, Any]:
        """What ``snapshot_list`` answers for this snapshot."""
        return {"name": self.name, "parent": self.parent, "description": self.description,
                "created": self.created, "state": self.state, "kind": self.kind,
                "current": self.name == current}  # fmt: skip


def parse_snapshot_xml(text: str | bytes, *, where: str = "snapshot XML") -> Snapshot:
    """A ``<domainsnapshot>`` document as a :class:`Snapshot`.

    Reports every problem of the document at once.

    Raises:
        SnapshotError: malformed XML, a wrong root, unknown elements, a
            missing or invalid name, an unknown state, a bad creationTime.
    """
    try:
        root = etree.fromstring(text.encode() if isinstance(text, str) else text, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise SnapshotError(f"{where}: not well-formed XML: {exc}") from None
    if root.tag != "domainsnapshot":
        raise SnapshotError(f"{where}: the root element must be <domainsnapshot>, not "
                            f"<{root.tag}>")  # fmt: skip
    problems: list[str] = []
    unknown = sorted({str(c.tag) for c in root if isinstance(c.tag, str)} - _KNOWN)
    if unknown:
        problems.append("unsupported element(s) " + ", ".join(f"<{t}>" for t in unknown))
    name = (root.findtext("name") or "").strip()
    try:
        check_snapshot_name(name)
    except SnapshotError as exc:
        problems.append(f"<name>: {exc}" if name else "<name> is missing")
    parent = (root.findtext("parent/name") or "").strip() or None
    if parent is not None:
        try:
            check_snapshot_name(parent)
        except SnapshotError as exc:
            problems.append(f"<parent><name>: {exc}")
        if parent == name:
            problems.append("<parent><name> names the snapshot itself")
    state = (root.findtext("state") or "shutoff").strip()
    if state not in STATES:
        problems.append(f"<state> {state!r} is not one of {', '.join(sorted(STATES))}")
    created_text = (root.findtext("creationTime") or "0").strip()
    created = 0
    try:
        created = int(created_text)
        if created < 0:
            raise ValueError
    except ValueError:
        problems.append(f"<creationTime> {created_text!r} is not a non-negative integer "
                        "(seconds since the epoch)")  # fmt: skip
    mem = root.find("memory")
    memory = mem.get("snapshot", "no") if mem is not None else "no"
    if memory not in ("no", "internal", "external"):
        problems.append(f"<memory snapshot={memory!r}>: must be no, internal or external")
    own = root.find("ferry")
    kind = own.get("kind", "metadata") if own is not None else "metadata"
    if kind not in KINDS:
        problems.append(f"<ferry kind={kind!r}>: must be one of {', '.join(sorted(KINDS))}")
    vmstate = own.get("vmstate") if own is not None else None
    dom = root.find("domain")
    uuid = ""
    domain_xml = None
    if dom is not None:
        uuid = (dom.get("uuid") or dom.findtext("uuid") or "").strip()
        if len(dom) or set(dom.attrib) - {"uuid"}:
            # A full definition (libvirt's snapshots carry one): kept as given.
            domain_xml = etree.tostring(dom, encoding="unicode")
    disks = root.find("disks")
    if problems:
        raise SnapshotError(f"{where}: " + "; ".join(problems), problems=problems)
    return Snapshot(
        name=name, parent=parent, description=root.findtext("description") or "",
        created=created, state=state, memory=memory, kind=kind, vmstate_disk=vmstate,
        domain_uuid=uuid, disks=etree.tostring(disks, encoding="unicode") if disks is not None
        else None, domain=domain_xml,
    )  # fmt: skip


def format_snapshot_xml(snap: Snapshot, *, current: bool | None = None) -> str:
    """``snap`` as ``<domainsnapshot>`` text (what :func:`parse_snapshot_xml` reads back).

    ``current`` adds libvirt's ``<active>`` marker (as its redefine files carry it).
    """
    root = etree.Element("domainsnapshot")
    etree.SubElement(root, "name").text = snap.name
    if snap.description:
        etree.SubElement(root, "description").text = snap.description
    etree.SubElement(root, "state").text = snap.state
    if snap.parent is not None:
        etree.SubElement(etree.SubElement(root, "parent"), "name").text = snap.parent
    etree.SubElement(root, "creationTime").text = str(snap.created)
    etree.SubElement(root, "memory").set("snapshot", snap.memory)
    if snap.disks is not None:
        root.append(etree.fromstring(snap.disks.encode(), _PARSER))
    if snap.domain is not None:
        root.append(etree.fromstring(snap.domain.encode(), _PARSER))
    elif snap.domain_uuid:
        etree.SubElement(root, "domain").set("uuid", snap.domain_uuid)
    if current is not None:
        etree.SubElement(root, "active").text = "1" if current else "0"
    own = etree.SubElement(root, "ferry")
    own.set("kind", snap.kind)
    if snap.vmstate_disk:
        own.set("vmstate", snap.vmstate_disk)
    return etree.tostring(root, encoding="unicode", pretty_print=True)


@dataclass
class SnapshotTree:
    """One domain's snapshots and its current one.

    Invariants (checked by :meth:`check`, kept by every mutation): each
    parent exists, there is no cycle, and ``current`` is None or a member.
    """

    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    current: str | None = None

    def __len__(self) -> int:
        return len(self.snapshots)

    def get(self, name: str) -> Snapshot:
        """The snapshot called ``name``; SnapshotError naming it if there is none."""
        try:
            return self.snapshots[name]
        except KeyError:
            raise SnapshotError(f"no snapshot named '{name}'", snapshot=name) from None

    def children(self, name: str | None) -> list[Snapshot]:
        """The snapshots whose parent is ``name`` (None: the roots), oldest first."""
        kids = [s for s in self.snapshots.values() if s.parent == name]
        return sorted(kids, key=lambda s: (s.created, s.name))

    def descendants(self, name: str) -> list[Snapshot]:
        """Every snapshot below ``name``, parents before their children."""
        out: list[Snapshot] = []
        todo = self.children(name)
        while todo:
            snap = todo.pop(0)
            out.append(snap)
            todo.extend(self.children(snap.name))
        return out

    def ordered(self) -> list[Snapshot]:
        """Every snapshot, each after its parent (roots oldest first, depth first)."""
        out: list[Snapshot] = []

        def walk(parent: str | None) -> None:
            for snap in self.children(parent):
                out.append(snap)
                walk(snap.name)

        walk(None)
        return out

    def check(self) -> None:
        """Raise SnapshotError if a parent is missing, a cycle exists or current is unknown."""
        problems = [f"snapshot '{s.name}' names a parent '{s.parent}' that does not exist"
                    for s in self.snapshots.values()
                    if s.parent is not None and s.parent not in self.snapshots]  # fmt: skip
        if not problems and len(self.ordered()) != len(self.snapshots):
            problems.append("the parent links form a cycle")
        if self.current is not None and self.current not in self.snapshots:
            problems.append(f"the current snapshot '{self.current}' does not exist")
        if problems:
            raise SnapshotError("inconsistent snapshot tree: " + "; ".join(problems))

    def create(self, snap: Snapshot) -> Snapshot:
        """Add a new snapshot as a child of the current one, and make it current.

        Returns the snapshot as added (its parent filled in).

        Raises:
            SnapshotError: the name is taken.
        """
        check_snapshot_name(snap.name)
        if snap.name in self.snapshots:
            raise SnapshotError(f"snapshot '{snap.name}' already exists", snapshot=snap.name)
        snap = replace(snap, parent=self.current)
        self.snapshots[snap.name] = snap
        self.current = snap.name
        return snap

    def redefine(self, snap: Snapshot, *, current: bool = False) -> None:
        """Add or replace ``snap`` as given (``snapshot-create --redefine``).

        Its parent must exist already (redefine a tree parents first);
        replacing an existing snapshot may not make it its own ancestor.

        Raises:
            SnapshotError: a missing parent, a cycle, or a snapshot of another domain.
        """
        check_snapshot_name(snap.name)
        if snap.parent is not None and snap.parent not in self.snapshots:
            raise SnapshotError(f"cannot redefine snapshot '{snap.name}': its parent "
                                f"'{snap.parent}' does not exist (redefine parents first)",
                                snapshot=snap.name)  # fmt: skip
        ancestor = snap.parent
        while ancestor is not None:
            if ancestor == snap.name:
                raise SnapshotError(f"cannot redefine snapshot '{snap.name}': it would be "
                                    "its own ancestor")  # fmt: skip
            ancestor = self.snapshots[ancestor].parent
        self.snapshots[snap.name] = snap
        if current:
            self.current = snap.name

    def delete(self, name: str, *, children: bool = False,
               children_only: bool = False) -> list[str]:  # fmt: skip
        """Remove ``name`` (and with ``children`` its subtree; ``children_only``:
        only its subtree).  Returns the removed names, children last.

        As libvirt: the children of a removed snapshot move up to its parent;
        removing the current snapshot makes its parent current.
        """
        snap = self.get(name)
        below = [s.name for s in self.descendants(name)]
        if children_only:
            gone = below
        elif children:
            gone = [name, *below]
        else:
            gone = [name]
            for kid in self.children(name):
                self.snapshots[kid.name] = replace(kid, parent=snap.parent)
        for each in gone:
            del self.snapshots[each]
        if self.current in gone:
            self.current = name if children_only else snap.parent
        return gone

    def summaries(self) -> list[dict[str, Any]]:
        """Every snapshot's summary, parents first."""
        return [s.summary(self.current) for s in self.ordered()]

    def tree_lines(self) -> list[str]:
        """The hierarchy drawn as ``virsh snapshot-list --tree`` draws it."""
        lines: list[str] = []

        def walk(snap: Snapshot, indent: str, last: bool, top: bool) -> None:
            if top:
                lines.append(snap.name)
                inner = ""
            else:
                lines.append(f"{indent}+- {snap.name}")
                inner = indent + ("    " if last else "|   ")
            kids = self.children(snap.name)
            for i, kid in enumerate(kids):
                lines.append(f"{inner}|")
                walk(kid, inner, i == len(kids) - 1, False)

        for i, root in enumerate(self.children(None)):
            if i:
                lines.append("")
            walk(root, "", True, True)
        return lines


def internal_plan(domain: Domain) -> tuple[str, tuple[str, ...]] | None:
    """Where an internal snapshot with memory goes: (vmstate disk, every disk), as
    the qemu device ids :mod:`ferry.domain.argv` gives the disks.

    None when the domain has no writable disk (nothing holds a VM state:
    the snapshot is metadata only).  The caller finds the node each device
    reads now (an external snapshot moves it to an overlay's node).

    Raises:
        SnapshotError: naming every writable disk that is not qcow2 or is shared.
    """
    from ferry.domain.argv import _disk_id

    disks = [d for d in domain.disks
             if d.source is not None and d.device == "disk" and not d.readonly]  # fmt: skip
    if not disks:
        return None
    problems = []
    for d in disks:
        if (d.format or "raw") != "qcow2":
            problems.append(f"disk {d.target_dev} is {d.format or 'raw'}")
        elif d.shareable:
            problems.append(f"disk {d.target_dev} is shareable")
    if problems:
        raise SnapshotError(
            f"cannot take an internal snapshot of '{domain.name}': " + "; ".join(problems)
            + " (internal snapshots need private qcow2 disks; --disk-only takes an "
            "external one)",
            problems=problems,
        )
    ids = tuple(_disk_id(domain, d) for d in disks)
    return ids[0], ids


def external_plan(domain: Domain, snap: str) -> list[tuple[str, str, str]]:
    """Where a disk-only external snapshot puts each writable disk's overlay.

    Returns ``(target dev, current image, overlay path)`` per writable disk;
    the overlay is libvirt's default name: the image's path with its suffix
    replaced by ``.SNAP`` (``/i/vda.qcow2`` → ``/i/vda.s1``).

    Raises:
        SnapshotError: no writable disk, or one that cannot take an overlay
            (a block device, a shareable disk), all named at once.
    """
    check_snapshot_name(snap)
    disks = [d for d in domain.disks
             if d.source is not None and d.device == "disk" and not d.readonly]  # fmt: skip
    if not disks:
        raise SnapshotError(f"cannot take a disk-only snapshot of '{domain.name}': it has no "
                            "writable disk")  # fmt: skip
    problems = [f"disk {d.target_dev} is a "
                + ("block device" if d.type == "block" else "shareable disk")
                for d in disks if d.type == "block" or d.shareable]  # fmt: skip
    if problems:
        raise SnapshotError(f"cannot take a disk-only snapshot of '{domain.name}': "
                            + "; ".join(problems), problems=problems)  # fmt: skip
    out = []
    for d in disks:
        assert d.source is not None
        path = Path(d.source)
        base = path.with_suffix("") if path.suffix else path
        out.append((d.target_dev, d.source, f"{base}.{snap}"))
    return out


def with_overlays(domain: Domain, overlays: dict[str, str]) -> Domain:
    """``domain`` with each disk named in ``overlays`` (target dev → path) on its
    qcow2 overlay (whose header names the old image as its backing file)."""
    disks = tuple(replace(d, source=overlays[d.target_dev], format="qcow2")
                  if d.target_dev in overlays else d for d in domain.disks)  # fmt: skip
    return replace(domain, disks=disks)


def overlay_disks_xml(plan: list[tuple[str, str, str]]) -> str:
    """The snapshot's ``<disks>`` element for an external snapshot."""
    root = etree.Element("disks")
    for target, _, overlay in plan:
        disk = etree.SubElement(root, "disk", name=target, snapshot="external", type="file")
        etree.SubElement(disk, "driver", type="qcow2")
        etree.SubElement(disk, "source", file=overlay)
    return etree.tostring(root, encoding="unicode")


# -- the wire form of a migration -----------------------------------------------


def to_frames(tree: SnapshotTree, frame_bytes: int) -> list[dict[str, Any]]:
    """The hierarchy cut into frames of at most ``frame_bytes`` of XML each.

    Each frame is ``{"seq", "snapshots": [xml, …], "last", "current"}``;
    parents always come in an earlier frame or earlier in the same one.

    Raises:
        SnapshotError: one snapshot's XML alone exceeds a frame, or the whole
            hierarchy exceeds :data:`MAX_SNAPSHOTS` / :data:`MAX_TREE_BYTES`.
    """
    budget = frame_bytes - FRAME_OVERHEAD
    if budget <= 0:
        raise SnapshotError(f"a frame of {frame_bytes} bytes cannot carry snapshot metadata")
    if len(tree) > MAX_SNAPSHOTS:
        raise SnapshotError(f"{len(tree)} snapshots: more than the {MAX_SNAPSHOTS} a "
                            "migration carries")  # fmt: skip
    frames: list[list[str]] = [[]]
    used = total = 0
    for snap in tree.ordered():
        xml = format_snapshot_xml(snap)
        size = _wire_size(xml)
        if size > budget:
            raise SnapshotError(f"the metadata of snapshot '{snap.name}' is {size} bytes: "
                                f"more than one frame carries ({budget})",
                                snapshot=snap.name)  # fmt: skip
        total += size
        if total > MAX_TREE_BYTES:
            raise SnapshotError(f"the snapshot metadata exceeds {MAX_TREE_BYTES} bytes")
        if used + size > budget:
            frames.append([])
            used = 0
        frames[-1].append(xml)
        used += size
    return [{"seq": i, "snapshots": chunk, "last": i == len(frames) - 1,
             "current": tree.current if i == len(frames) - 1 else None}
            for i, chunk in enumerate(frames)]  # fmt: skip


def _wire_size(xml: str) -> int:
    # JSON-escaped size bounds what the frame's encoding costs (CBOR or JSON).
    return len(json.dumps(xml).encode())


class TreeAssembler:
    """The destination's side of :func:`to_frames`: frames in order, every bound checked."""

    def __init__(self, domain_uuid: str) -> None:
        self.domain_uuid = domain_uuid
        self.tree = SnapshotTree()
        self.next_seq = 0
        self.bytes = 0
        self.done = False
        #: Set by whoever wrote the assembled tree to disk.
        self.committed = False

    def add(self, frame: dict[str, Any]) -> None:
        """Take the next frame.

        Raises:
            SnapshotError: out of order, after the last one, over a bound, a
                snapshot of another domain, a parent not sent before its child,
                a duplicate, or a current snapshot that was not sent.
        """
        seq = frame.get("seq")
        if self.done:
            raise SnapshotError("snapshot metadata frame after the last one")
        if seq != self.next_seq:
            raise SnapshotError(f"snapshot metadata frame {seq} out of order "
                                f"(expected {self.next_seq})")  # fmt: skip
        self.next_seq += 1
        for xml in frame.get("snapshots") or []:
            if not isinstance(xml, str):
                raise SnapshotError("snapshot metadata frame: an entry is not XML text")
            self.bytes += _wire_size(xml)
            if self.bytes > MAX_TREE_BYTES or len(self.tree) >= MAX_SNAPSHOTS:
                raise SnapshotError("the snapshot metadata exceeds the migration's bounds "
                                    f"({MAX_SNAPSHOTS} snapshots, {MAX_TREE_BYTES} bytes)")
            snap = parse_snapshot_xml(xml, where="migrated snapshot")
            if snap.domain_uuid and snap.domain_uuid != self.domain_uuid:
                raise SnapshotError(f"snapshot '{snap.name}' belongs to domain "
                                    f"{snap.domain_uuid}, not {self.domain_uuid}")
            if snap.name in self.tree.snapshots:
                raise SnapshotError(f"snapshot '{snap.name}' was sent twice")
            self.tree.redefine(snap)
        if frame.get("last"):
            current = frame.get("current")
            if current is not None:
                self.tree.get(str(current))
                self.tree.current = str(current)
            self.tree.check()
            self.done = True


# -- storage ------------------------------------------------------------------


class SnapshotStore:
    """Snapshot metadata on disk: ``root/DOMAIN/SNAP.xml`` and ``root/DOMAIN/.current``."""

    CURRENT = ".current"

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, domain: str) -> Path:
        """The domain's folder (it may not exist)."""
        return self.root / domain

    def load(self, domain: str) -> SnapshotTree:
        """The domain's tree; an empty one when it has none.

        A file that does not parse is skipped (a hand-edited leftover must
        not make the domain unmanageable); a dangling parent becomes a root.
        """
        folder = self.folder(domain)
        tree = SnapshotTree()
        if not folder.is_dir():
            return tree
        for path in sorted(folder.glob("*.xml")):
            try:
                snap = parse_snapshot_xml(path.read_bytes(), where=str(path))
            except (SnapshotError, OSError):
                continue
            tree.snapshots[snap.name] = snap
        for name, snap in list(tree.snapshots.items()):
            if snap.parent is not None and snap.parent not in tree.snapshots:
                tree.snapshots[name] = replace(snap, parent=None)
        try:
            current = (folder / self.CURRENT).read_text().strip()
        except OSError:
            current = ""
        tree.current = current if current in tree.snapshots else None
        if len(tree.ordered()) != len(tree):
            # A cycle from hand edits: break it by making its members roots.
            seen = {s.name for s in tree.ordered()}
            for name in list(tree.snapshots):
                if name not in seen:
                    tree.snapshots[name] = replace(tree.snapshots[name], parent=None)
        return tree

    def save(self, domain: str, tree: SnapshotTree, *, changed: Iterable[str] = (),
             removed: Iterable[str] = ()) -> None:  # fmt: skip
        """Write the snapshots named in ``changed``, remove those in ``removed``,
        then the current marker (each file replaced atomically)."""
        folder = self.folder(domain)
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
        for name in changed:
            atomic_write(folder / f"{name}.xml", format_snapshot_xml(tree.get(name)).encode())
        for name in removed:
            (folder / f"{name}.xml").unlink(missing_ok=True)
        atomic_write(folder / self.CURRENT, (tree.current or "").encode())

    def save_all(self, domain: str, tree: SnapshotTree) -> None:
        """Write a whole tree into a folder that must hold none yet."""
        self.save(domain, tree, changed=[s.name for s in tree.ordered()])

    def replace_all(self, domain: str, tree: SnapshotTree) -> None:
        """Make ``tree`` the domain's whole metadata: written aside, then renamed in.

        What was there before (an older copy left by a migration away that
        kept its source definition) is replaced, never merged; an empty
        tree leaves no folder.
        """
        tree.check()
        if not len(tree):
            self.remove_all(domain)
            return
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)
        aside = self.root / f".{domain}.incoming"
        shutil.rmtree(aside, ignore_errors=True)
        SnapshotStore(aside.parent).save_all(aside.name, tree)
        self.remove_all(domain)
        aside.rename(self.folder(domain))

    def remove_all(self, domain: str) -> None:
        """Forget every snapshot of ``domain``."""
        shutil.rmtree(self.folder(domain), ignore_errors=True)

    def names(self, domain: str) -> Iterator[str]:
        """The names of the domain's snapshot files (cheap: no parsing)."""
        folder = self.folder(domain)
        if folder.is_dir():
            yield from (p.stem for p in folder.glob("*.xml"))
