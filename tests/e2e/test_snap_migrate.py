"""Snapshot metadata moves with a migration (issue 16, feature ``snapshots``).

A running guest with a three-level tree (s1 ← s2 ← s3, and s2b beside s2;
current s2, s3 put back with ``snapshot-create --redefine``) is refused by
a destination without the feature, then migrates to a destination whose
Finish fails: B keeps no metadata, A keeps its tree.
Then it migrates with ``--persistent --undefine-source``: B lists the same
tree and current snapshot, every snapshot's XML is the same, the guest's
memory went on, and A has no metadata left.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e


def _tree(host: object, name: str) -> tuple[list[str], str | None, list[dict[str, object]]]:
    listed = host.ctl_json("snapshot-list", name)  # type: ignore[attr-defined]
    tree = host.ferryctl("snapshot-list", name, "--tree", check=True)  # type: ignore[attr-defined]
    return tree.stdout.splitlines(), listed["current"], listed["snapshots"]


def test_snapshot_tree_moves_with_the_domain(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "g1.xml"
    xml.write_text(guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=64, wss_mib=8))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        for snap in ("s1", "s2", "s3"):
            a.ferryctl("snapshot-create-as", "g1", snap, "--description", f"level {snap}",
                       check=True)  # fmt: skip
        a.ferryctl("snapshot-current", "g1", "s1", check=True)
        a.ferryctl("snapshot-create-as", "g1", "s2b", check=True)
        a.ferryctl("snapshot-current", "g1", "s2", check=True)
        # s3 out and back in from its own XML (virsh snapshot-create --redefine).
        s3_xml = tmp_path / "s3.xml"
        s3_xml.write_text(a.ferryctl("snapshot-dumpxml", "g1", "s3", check=True).stdout)
        a.ferryctl("snapshot-delete", "g1", "s3", check=True)
        orphan = a.ferryctl("snapshot-create", "g1", str(s3_xml), "--redefine")
        assert orphan.returncode == 0, orphan.stderr
        lines, current, snaps = _tree(a, "g1")
        assert lines == ["s1", "|", "+- s2", "|   |", "|   +- s3", "|", "+- s2b"], lines
        assert current == "s2"
        xmls = {s["name"]: a.ferryctl("snapshot-dumpxml", "g1", str(s["name"]),
                                      check=True).stdout for s in snaps}  # fmt: skip

        # A destination without the 'snapshots' feature: refused, as before it existed.
        b.stop_agent("destination")
        b.write_config(**{"testing.without_features": ["snapshots"]})
        b.start_agent("destination")
        old = a.ferryctl("migrate", "g1", b.uri, "--live", "--persistent", timeout=120)
        assert old.returncode == 1 and "migration-refused" in old.stderr, old.stderr
        assert "with 4 snapshot(s)" in old.stderr and "'snapshots' feature" in old.stderr
        assert b.domain_state("g1") is None and a.domain_state("g1") == "running"

        # A Finish that fails after the metadata arrived: none of it stays on B.
        b.stop_agent("destination")
        b.write_config(**{"testing.fail_cpu_start": True})
        b.start_agent("destination")
        failed = a.ferryctl("migrate", "g1", b.uri, "--live", "--persistent",
                            "--undefine-source", "--json", timeout=120)  # fmt: skip
        assert failed.returncode != 0 and "fail_cpu_start" in failed.stderr, failed.stderr
        assert not (b.state_dir / "snapshots" / "g1").exists()
        assert a.domain_state("g1") == "running"
        assert _tree(a, "g1")[:2] == (lines, "s2")

        b.stop_agent("destination")
        b.write_config()
        b.start_agent("destination")
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=30)
        moved = a.ferryctl("migrate", "g1", b.uri, "--live", "--persistent",
                           "--undefine-source", "--json", timeout=120)  # fmt: skip
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("g1") == "running"
        b_lines, b_current, _ = _tree(b, "g1")
        assert (b_lines, b_current) == (lines, "s2")
        for name, text in xmls.items():
            assert b.ferryctl("snapshot-dumpxml", "g1", name, check=True).stdout == text
        assert b.ferryctl("snapshot-current", "g1", "--name", check=True).stdout.strip() == "s2"
        info = b.ctl_json("snapshot-info", "g1", "--current")
        assert (info["name"], info["parent"], info["children"], info["current"]) == (
            "s2", "s1", 1, True)  # fmt: skip
        assert b.ctl_json("snapshot-info", "g1", "s1")["descendants"] == 3
        assert b.ferryctl("snapshot-parent", "g1", "s3", check=True).stdout.strip() == "s2"
        # The source's metadata went with its definition.
        assert a.domain_state("g1") is None
        assert not (a.state_dir / "snapshots" / "g1").exists()
        serial.reconnect(b.serial_socket("g1"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        # B's copy is fully manageable: its tree changes like any other.
        gone = json.loads(b.ferryctl("snapshot-delete", "g1", "s2", "--json", check=True).stdout)
        assert gone["deleted"] == ["s2"] and gone["current"] == "s1"
        b.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()
