"""External disk-only snapshots: the disk goes on a new qcow2 overlay (blockdev-snapshot).

The disk variant of the test guest writes a sector to its IDE disk after
every report.  After ``snapshot-create-as --disk-only`` its writes land in
the overlay the agent created (backed by the old image, which stops
changing), the live and persistent definitions name the overlay, and the
domain starts again from it.  An overlay path that exists already is
refused and changes nothing.  Shut off, the overlay is made without qemu.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disk_only_snapshot_moves_the_writes_to_an_overlay(
    cluster: Cluster, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    cluster.start()
    kernel = testguest.build(variant="disk")
    base = tmp_path / "ext.img"
    base.write_bytes(b"\0" * (32 << 20))
    disk = ("<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
            f"<source file='{base}'/><target dev='hda' bus='ide'/></disk>")  # fmt: skip
    xml = tmp_path / "ext.xml"
    xml.write_text(guest_xml("ext", kernel, virt_type=virt_type, mem_mib=64, wss_mib=8,
                             extra_devices=disk, cmdline_extra="disk=1"))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "ext", check=True)
    serial = testguest.SerialReader(a.serial_socket("ext"))
    overlay = tmp_path / "ext.d1"
    try:
        first = serial.wait_for(lambda r: r.disk_writes >= 3, timeout=60)
        made = json.loads(a.ferryctl("snapshot-create-as", "ext", "d1", "--disk-only", "--json",
                                     check=True).stdout)  # fmt: skip
        assert made["snapshot"] == "d1" and overlay.exists()
        frozen = _sha(base)
        later = serial.wait_for(lambda r: r.disk_writes >= first.disk_writes + 10, timeout=30)
        assert later.disk_errors == 0 and later.bad_pages == 0
        assert _sha(base) == frozen  # every write since went to the overlay
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(overlay)],
            check=True, capture_output=True, text=True).stdout)  # fmt: skip
        assert info["format"] == "qcow2" and info["backing-filename"] == str(base), info
        assert info["actual-size"] > 0
        for args in (("dumpxml", "ext"), ("dumpxml", "ext", "--inactive")):
            text = a.ferryctl(*args, check=True).stdout
            assert f'file="{overlay}"' in text and 'type="qcow2"' in text, text
        snap = a.ferryctl("snapshot-dumpxml", "ext", "d1", check=True).stdout
        assert 'snapshot="external"' in snap and "<state>disk-snapshot</state>" in snap
        no = a.ferryctl("snapshot-revert", "ext", "d1")
        assert no.returncode == 1 and "only internal ones" in no.stderr, no.stderr
        # An overlay that exists already: refused, nothing changes.
        (tmp_path / "ext.d2").write_bytes(b"keep")
        taken = a.ferryctl("snapshot-create-as", "ext", "d2", "--disk-only")
        assert taken.returncode == 1 and "exists already" in taken.stderr, taken.stderr
        assert (tmp_path / "ext.d2").read_bytes() == b"keep"
        assert [s["name"] for s in a.ctl_json("snapshot-list", "ext")["snapshots"]] == ["d1"]
        # The definition names the overlay: the domain starts again from it.
        a.ferryctl("destroy", "ext", check=True)
        a.ferryctl("start", "ext", check=True)
        serial.reconnect(a.serial_socket("ext"))
        again = serial.wait_for(lambda r: serial.boot_count == 2 and r.disk_writes >= 3,
                                timeout=60)  # fmt: skip
        assert again.disk_errors == 0 and _sha(base) == frozen
        a.ferryctl("destroy", "ext", check=True)
        # Shut off: the overlay is made and the definition moves, no qemu involved.
        a.ferryctl("snapshot-create-as", "ext", "d3", "--disk-only", check=True)
        top = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(tmp_path / "ext.d3")],
            check=True, capture_output=True, text=True).stdout)  # fmt: skip
        assert top["backing-filename"] == str(overlay), top
        inactive = a.ferryctl("dumpxml", "ext", "--inactive", check=True).stdout
        assert f'file="{tmp_path / "ext.d3"}"' in inactive, inactive
        tree = a.ferryctl("snapshot-list", "ext", "--tree", check=True).stdout.split()
        assert tree == ["d1", "|", "+-", "d3"], tree
    finally:
        serial.close()
