"""The snapshot tree model (ferry.snapshots): parents, current, redefine, delete, wire frames."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.errors import SnapshotError
from ferry.snapshots import (
    MAX_SNAPSHOTS,
    Snapshot,
    SnapshotStore,
    SnapshotTree,
    TreeAssembler,
    format_snapshot_xml,
    parse_snapshot_xml,
    to_frames,
)

UUID = "5f0c8f3e-1d7e-4c55-9a43-6a1f4f0d2b11"


def three_levels() -> SnapshotTree:
    """s1 ← s2 ← s3, plus s2b beside s2; current s3."""
    tree = SnapshotTree()
    tree.create(Snapshot("s1", created=1, domain_uuid=UUID))
    tree.create(Snapshot("s2", created=2, domain_uuid=UUID))
    tree.current = "s1"
    tree.create(Snapshot("s2b", created=3, domain_uuid=UUID))
    tree.current = "s2"
    tree.create(Snapshot("s3", created=4, domain_uuid=UUID, description="deep"))
    return tree


def test_create_links_to_the_current_one_and_becomes_current() -> None:
    tree = three_levels()
    assert tree.current == "s3"
    assert [(s.name, s.parent) for s in tree.ordered()] == [
        ("s1", None), ("s2", "s1"), ("s3", "s2"), ("s2b", "s1")]  # fmt: skip
    with pytest.raises(SnapshotError, match="already exists"):
        tree.create(Snapshot("s2"))
    tree.check()


def test_tree_drawing_like_virsh() -> None:
    assert three_levels().tree_lines() == [
        "s1",
        "|",
        "+- s2",
        "|   |",
        "|   +- s3",
        "|",
        "+- s2b",
    ]


def test_delete_moves_children_up_and_current_to_the_parent() -> None:
    tree = three_levels()
    assert tree.delete("s2") == ["s2"]
    assert tree.get("s3").parent == "s1"
    assert tree.current == "s3"
    assert tree.delete("s3") == ["s3"]
    assert tree.current == "s1"
    tree.check()


def test_delete_children_and_children_only() -> None:
    tree = three_levels()
    assert tree.delete("s1", children_only=True) == ["s2", "s2b", "s3"]
    assert tree.current == "s1" and list(tree.snapshots) == ["s1"]
    tree = three_levels()
    assert tree.delete("s1", children=True) == ["s1", "s2", "s2b", "s3"]
    assert tree.current is None and len(tree) == 0
    with pytest.raises(SnapshotError, match="no snapshot named 'nope'"):
        tree.delete("nope")


def test_redefine_needs_the_parent_and_refuses_cycles() -> None:
    tree = SnapshotTree()
    with pytest.raises(SnapshotError, match="parent 'a' does not exist"):
        tree.redefine(Snapshot("b", parent="a"))
    tree.redefine(Snapshot("a"))
    tree.redefine(Snapshot("b", parent="a"), current=True)
    assert tree.current == "b"
    with pytest.raises(SnapshotError, match="own ancestor"):
        tree.redefine(Snapshot("a", parent="b"))
    tree.check()


def test_xml_round_trip_keeps_every_field() -> None:
    snap = Snapshot("s3", parent="s2", description="a <b> & c", created=1700000000,
                    state="running", memory="no", domain_uuid=UUID,
                    disks='<disks><disk name="vda" snapshot="no"/></disks>')  # fmt: skip
    again = parse_snapshot_xml(format_snapshot_xml(snap, current=True))
    assert again == snap


def test_parse_reports_every_problem_at_once() -> None:
    xml = ("<domainsnapshot><name>.bad</name><state>flying</state>"
           "<creationTime>-3</creationTime><bogus/></domainsnapshot>")  # fmt: skip
    with pytest.raises(SnapshotError) as info:
        parse_snapshot_xml(xml, where="f.xml")
    text = str(info.value)
    for part in ("<bogus>", "<name>", "'flying'", "'-3'", "f.xml"):
        assert part in text
    with pytest.raises(SnapshotError, match="root element"):
        parse_snapshot_xml("<domain/>")
    with pytest.raises(SnapshotError, match="well-formed"):
        parse_snapshot_xml("<domainsnapshot>")


def test_frames_are_bounded_and_reassemble_the_same_tree() -> None:
    tree = SnapshotTree()
    for i in range(60):
        tree.create(Snapshot(f"s{i:02d}", created=i, domain_uuid=UUID, description="x" * 300))
    tree.current = "s30"
    frames = to_frames(tree, 8192)
    assert len(frames) > 3
    for frame in frames:
        assert sum(len(x) for x in frame["snapshots"]) < 8192
    assert [f["last"] for f in frames].count(True) == 1 and frames[-1]["current"] == "s30"
    assembler = TreeAssembler(UUID)
    for frame in frames:
        assembler.add(frame)
    assert assembler.done
    assert assembler.tree.current == "s30"
    assert assembler.tree.snapshots == tree.snapshots


def test_assembler_refuses_disorder_strangers_and_orphans() -> None:
    frames = to_frames(three_levels(), 1 << 20)
    with pytest.raises(SnapshotError, match="out of order"):
        TreeAssembler(UUID).add({**frames[0], "seq": 1})
    with pytest.raises(SnapshotError, match="belongs to domain"):
        TreeAssembler("another").add(frames[0])
    reordered = {**frames[0], "snapshots": list(reversed(frames[0]["snapshots"]))}
    with pytest.raises(SnapshotError, match="does not exist"):
        TreeAssembler(UUID).add(reordered)
    done = TreeAssembler(UUID)
    done.add(frames[0])
    with pytest.raises(SnapshotError, match="after the last"):
        done.add({"seq": 1, "snapshots": []})
    with pytest.raises(SnapshotError, match="no snapshot named 'ghost'"):
        TreeAssembler(UUID).add({**frames[0], "current": "ghost"})


def test_frames_refuse_an_oversized_snapshot_and_tree() -> None:
    tree = SnapshotTree()
    tree.create(Snapshot("big", description="y" * 10000))
    with pytest.raises(SnapshotError, match="more than one frame"):
        to_frames(tree, 8192)
    many = SnapshotTree({f"s{i}": Snapshot(f"s{i}") for i in range(MAX_SNAPSHOTS + 1)})
    with pytest.raises(SnapshotError, match="more than the"):
        to_frames(many, 1 << 20)


def test_store_round_trip_and_damaged_files(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    tree = three_levels()
    store.save_all("vm", tree)
    again = store.load("vm")
    assert again.snapshots == tree.snapshots and again.current == "s3"
    # A parent file gone (hand edit): its child becomes a root, nothing breaks.
    (tmp_path / "vm" / "s2.xml").unlink()
    (tmp_path / "vm" / "junk.xml").write_text("<nope")
    damaged = store.load("vm")
    assert damaged.get("s3").parent is None
    assert "junk" not in damaged.snapshots
    damaged.check()
    store.remove_all("vm")
    assert len(store.load("vm")) == 0


def test_store_reads_the_old_metadata_only_files(tmp_path: Path) -> None:
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / "old.xml").write_text(
        "<domainsnapshot><name>old</name><description>d</description>"
        f"<creationTime>12</creationTime><domain uuid='{UUID}'/></domainsnapshot>"
    )
    tree = SnapshotStore(tmp_path).load("vm")
    assert tree.get("old").created == 12 and tree.get("old").domain_uuid == UUID
    assert tree.current is None


def _domain(disks: str) -> object:
    from ferry.domain import parse_domain

    return parse_domain(
        "<domain type='kvm'><name>vm</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices>{disks}</devices></domain>"
    )


def _disk(fmt: str, dev: str, extra: str = "") -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='/tmp/{dev}.img'/><target dev='{dev}' bus='virtio'/>{extra}</disk>")


def test_internal_plan_names_the_qcow2_nodes_and_refuses_the_rest() -> None:
    from ferry.snapshots import internal_plan

    assert internal_plan(_domain("")) is None  # type: ignore[arg-type]
    plan = internal_plan(_domain(_disk("qcow2", "vda") + _disk("qcow2", "vdb")))  # type: ignore[arg-type]
    assert plan is not None and plan[0] == plan[1][0] and len(plan[1]) == 2
    assert plan[1][0] != plan[1][1]
    with pytest.raises(SnapshotError, match=r"disk vdb is raw.*--disk-only"):
        internal_plan(_domain(_disk("qcow2", "vda") + _disk("raw", "vdb")))  # type: ignore[arg-type]
    # A read-only disk holds no state: not part of the snapshot.
    ro = internal_plan(_domain(_disk("qcow2", "vda") + _disk("raw", "vdb", "<readonly/>")))  # type: ignore[arg-type]
    assert ro is not None and len(ro[1]) == 1


def test_external_plan_names_overlays_like_libvirt_and_refuses_block_devices() -> None:
    from ferry.snapshots import external_plan, overlay_disks_xml, with_overlays

    dom = _domain(_disk("qcow2", "vda") + _disk("raw", "vdb", "<readonly/>"))
    plan = external_plan(dom, "s1")  # type: ignore[arg-type]
    assert plan == [("vda", "/tmp/vda.img", "/tmp/vda.s1")]
    moved = with_overlays(dom, {"vda": "/tmp/vda.s1"})  # type: ignore[arg-type]
    assert [(d.source, d.format) for d in moved.disks] == [
        ("/tmp/vda.s1", "qcow2"), ("/tmp/vdb.img", "raw")]  # fmt: skip
    disks = overlay_disks_xml(plan)
    snap = parse_snapshot_xml(format_snapshot_xml(Snapshot("s1", disks=disks, kind="external")))
    assert snap.disks == disks and snap.kind == "external"
    with pytest.raises(SnapshotError, match="no writable disk"):
        external_plan(_domain(""), "s1")  # type: ignore[arg-type]
    block = ("<disk type='block' device='disk'><driver name='qemu' type='raw'/>"
             "<source dev='/dev/sdz'/><target dev='vdc' bus='virtio'/></disk>")  # fmt: skip
    with pytest.raises(SnapshotError, match="disk vdc is a block device"):
        external_plan(_domain(_disk("qcow2", "vda") + block), "s1")  # type: ignore[arg-type]
    with pytest.raises(SnapshotError, match="invalid snapshot name"):
        external_plan(dom, "../x")  # type: ignore[arg-type]


def test_replace_all_swaps_the_whole_tree_and_an_empty_one_leaves_nothing(
    tmp_path: Path,
) -> None:
    store = SnapshotStore(tmp_path)
    store.save_all("vm", three_levels())
    fresh = SnapshotTree()
    fresh.create(Snapshot("only", created=9))
    store.replace_all("vm", fresh)
    again = store.load("vm")
    assert list(again.snapshots) == ["only"] and again.current == "only"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm"]
    store.replace_all("vm", SnapshotTree())
    assert not (tmp_path / "vm").exists()
