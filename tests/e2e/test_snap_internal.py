"""Internal snapshots with memory (qemu's snapshot-save/-load/-delete jobs) and revert.

A running test guest with a qcow2 disk is snapshotted; its memory counter
runs on; snapshot-revert puts its RAM back, which the guest shows: its next
reports count on from the value it had at the snapshot (a counter only a
reboot resets, and the guest did not reboot), with no bad page.  The
snapshot lives in the image (qemu-img sees its tag) until snapshot-delete
removes it.  A raw disk is refused with the reason.  Shut off, an
internal snapshot holds the disks only (qemu-img), and reverting to it
takes back a write made to the image since.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e


def _disk(path: Path, fmt: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")  # fmt: skip


def _tags(image: Path) -> str:
    return subprocess.run(["qemu-img", "snapshot", "-l", "-U", str(image)], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def _qemu_io(image: Path, command: str) -> None:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0 and "failed" not in done.stdout + done.stderr, (
        command, done.stdout, done.stderr)


def test_internal_snapshot_revert_takes_the_memory_back(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
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
        made = json.loads(a.ferryctl("snapshot-create-as", "si", "mem1", "--json",
                                     check=True).stdout)  # fmt: skip
        assert made["current"] is True
        after_snap = serial.wait_for(lambda r: r.counter > before.counter, timeout=30,
                                     fresh=True)  # fmt: skip
        # The guest ran on after the save (qemu paused it only while writing).
        assert a.domain_state("si") == "running"
        assert "mem1" in _tags(image)
        dumped = a.ferryctl("snapshot-dumpxml", "si", "mem1", check=True).stdout
        assert "<memory snapshot=\"internal\"/>" in dumped and "<state>running</state>" in dumped
        ahead = serial.wait_for(lambda r: r.counter > after_snap.counter + 15, timeout=30)
        reverted = json.loads(a.ferryctl("snapshot-revert", "si", "mem1", "--json",
                                         check=True).stdout)  # fmt: skip
        assert reverted["state"] == "running"
        # The counter went back: the reports after the revert count on from the
        # snapshot's value (a report still in flight from before is skipped).
        back = serial.wait_for(lambda r: r.counter < ahead.counter, timeout=30, fresh=True)
        assert before.counter <= back.counter <= after_snap.counter + 1 < ahead.counter, (
            before, after_snap, back, ahead)
        on = serial.wait_for(lambda r: r.counter > back.counter + 2, timeout=30)
        assert serial.boot_count == 1 and on.bad_pages == 0
        assert a.ferryctl("snapshot-current", "si", "--name", check=True).stdout.strip() == "mem1"
        # Deleting it removes the state from the image, then the metadata.
        a.ferryctl("snapshot-delete", "si", "mem1", check=True)
        assert "mem1" not in _tags(image)
        assert json.loads(a.ferryctl("snapshot-list", "si", "--json", check=True).stdout) == {
            "snapshots": [], "current": None}
        # A raw disk cannot hold an internal snapshot: refused, nothing recorded.
        a.ferryctl("start", "sr", check=True)
        refused = a.ferryctl("snapshot-create-as", "sr", "x")
        assert refused.returncode == 1 and "disk vda is raw" in refused.stderr, refused.stderr
        assert json.loads(a.ferryctl("snapshot-list", "sr", "--json",
                                     check=True).stdout)["snapshots"] == []  # fmt: skip
        a.ferryctl("destroy", "sr", check=True)
        a.ferryctl("destroy", "si", check=True)
        # Shut off: a disk-only internal snapshot (qemu-img), reverted after a write.
        off = a.ctl_json("snapshot-create-as", "si", "off1")
        assert off["current"] is True and "off1" in _tags(image)
        listed = a.ctl_json("snapshot-list", "si")["snapshots"]
        assert [(s["name"], s["kind"], s["state"]) for s in listed] == [
            ("off1", "internal", "shutoff")]  # fmt: skip
        _qemu_io(image, "write -P 0xab 0 64k")
        _qemu_io(image, "read -P 0xab 0 64k")
        assert a.ctl_json("snapshot-revert", "si", "off1")["state"] == "shut off"
        _qemu_io(image, "read -P 0 0 64k")  # the write is gone
        a.ferryctl("start", "si", check=True)
        running = a.ferryctl("snapshot-revert", "si", "off1")
        assert running.returncode == 1 and "shut the domain down" in running.stderr
        a.ferryctl("destroy", "si", check=True)
    finally:
        serial.close()
