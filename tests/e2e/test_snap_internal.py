"""Internal snapshots with memory (qemu's snapshot-save/-load/-delete jobs) and revert.

A running test guest with a qcow2 disk is snapshotted; its memory counter
runs on; snapshot-revert puts its RAM back, which the guest shows: its next
reports count on from the value it had at the snapshot (a counter only a
reboot resets, and the guest did not reboot), with no bad page.  The
snapshot lives in the image (qemu-img sees its tag): over shared storage
it migrates with the domain and B reverts to it too, until snapshot-delete
removes it.  A raw disk is refused with the reason.  Shut off, an
internal snapshot holds the disks only (qemu-img), and reverting to it
takes back a write made to the image since.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e


def _disk(path: Path, fmt: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' cache='none'/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")  # fmt: skip


def _tags(image: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(image)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def _qemu_io(image: Path, command: str) -> None:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "failed" not in done.stdout + done.stderr, (
        command, done.stdout, done.stderr)


def _reverts(host: object, serial: testguest.SerialReader, before: int, after: int) -> None:
    """Revert si to mem1 on ``host``: the guest counts on from the snapshot's value."""
    ahead = serial.wait_for(lambda r: r.counter > after + 15, timeout=30)
    reverted = host.ctl_json("snapshot-revert", "si", "mem1")  # type: ignore[attr-defined]
    assert reverted["state"] == "running"
    # The reports after the revert count on from the snapshot's value (a
    # report still in flight from before is skipped).
    back = serial.wait_for(lambda r: r.counter < ahead.counter, timeout=30, fresh=True)
    assert before <= back.counter <= after + 1 < ahead.counter, (before, after, back, ahead)
    on = serial.wait_for(lambda r: r.counter > back.counter + 2, timeout=30)
    assert serial.boot_count == 1 and on.bad_pages == 0


def test_internal_snapshot_revert_takes_the_memory_back(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    image = tmp_path / "snap.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    raw = tmp_path / "raw.img"
    raw.write_bytes(b"\0" * (1 << 20))
    xml = tmp_path / "si.xml"
    xml.write_text(guest_xml("si", guest_kernel, virt_type=virt_type, mem_mib=64, wss_mib=8,
                             extra_devices=_disk(image, "qcow2")))  # fmt: skip
    rxml = tmp_path / "sr.xml"
    rxml.write_text(guest_xml("sr", guest_kernel, virt_type=virt_type, mem_mib=64, wss_mib=8,
                              extra_devices=_disk(raw, "raw")))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("define", str(rxml), check=True)
    a.ferryctl("start", "si", check=True)
    serial = testguest.SerialReader(a.serial_socket("si"))
    try:
        serial.wait_for_boot(timeout=60)
        before = serial.wait_for(lambda r: r.counter >= 3, timeout=30)
        made = a.ctl_json("snapshot-create-as", "si", "mem1")
        assert made["current"] is True
        after_snap = serial.wait_for(lambda r: r.counter > before.counter, timeout=30,
                                     fresh=True)  # fmt: skip
        # The guest ran on after the save (qemu paused it only while writing).
        assert a.domain_state("si") == "running"
        assert "mem1" in _tags(image)
        dumped = a.ferryctl("snapshot-dumpxml", "si", "mem1", check=True).stdout
        assert "<memory snapshot=\"internal\"/>" in dumped and "<state>running</state>" in dumped
        _reverts(a, serial, before.counter, after_snap.counter)
        assert a.ferryctl("snapshot-current", "si", "--name", check=True).stdout.strip() == "mem1"

        # Over shared storage the snapshot moves with the domain (its state is in
        # the image): B reverts to it just the same.
        moved = a.ferryctl("migrate", "si", b.uri, "--live", "--persistent",
                           "--undefine-source", "--json", timeout=120)  # fmt: skip
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        serial.reconnect(b.serial_socket("si"))
        _reverts(b, serial, before.counter, after_snap.counter)

        # Deleting it removes the state from the image, then the metadata.
        b.ferryctl("snapshot-delete", "si", "mem1", check=True)
        assert "mem1" not in _tags(image)
        assert b.ctl_json("snapshot-list", "si") == {"snapshots": [], "current": None}
        b.ferryctl("destroy", "si", check=True)
        # Shut off: a disk-only internal snapshot (qemu-img), reverted after a write.
        off = b.ctl_json("snapshot-create-as", "si", "off1")
        assert off["current"] is True and "off1" in _tags(image)
        listed = b.ctl_json("snapshot-list", "si")["snapshots"]
        assert [(s["name"], s["kind"], s["state"]) for s in listed] == [
            ("off1", "internal", "shutoff")]  # fmt: skip
        _qemu_io(image, "write -P 0xab 0 64k")
        _qemu_io(image, "read -P 0xab 0 64k")
        assert b.ctl_json("snapshot-revert", "si", "off1")["state"] == "shut off"
        _qemu_io(image, "read -P 0 0 64k")  # the write is gone
        b.ferryctl("start", "si", check=True)
        running = b.ferryctl("snapshot-revert", "si", "off1")
        assert running.returncode == 1 and "shut the domain down" in running.stderr
        b.ferryctl("destroy", "si", check=True)
        # --metadata forgets the snapshot and leaves its state in the image.
        b.ferryctl("snapshot-delete", "si", "off1", "--metadata", check=True)
        assert "off1" in _tags(image) and b.ctl_json("snapshot-list", "si")["snapshots"] == []

        # A raw disk cannot hold an internal snapshot: refused, nothing recorded.
        a.ferryctl("start", "sr", check=True)
        refused = a.ferryctl("snapshot-create-as", "sr", "x")
        assert refused.returncode == 1 and "disk vda is raw" in refused.stderr, refused.stderr
        assert a.ctl_json("snapshot-list", "sr")["snapshots"] == []
        a.ferryctl("destroy", "sr", check=True)
    finally:
        serial.close()
