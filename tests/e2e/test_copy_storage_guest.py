"""A guest that writes its disks all through a storage-copy migration (issue 15).

The disk variant of the test guest (``tools/guest``: ``dwrite``) writes
self-describing 64 KiB blocks to its IDE disk(s) by DMA at a steady rate,
remembers in RAM the generation it last wrote to every block, and reads each
block back before overwriting it (and in a sweep): ``dbad`` counts every block
that is not what it wrote. Each test host has local storage only.

Shown, for raw and qcow2, one and two disks, ``--copy-storage-all`` and
``-inc`` over a base image both hosts have: the guest kept writing while its
disks were mirrored; the migration lands the VM paused on B (``--paused``), so
B's images are exactly what the source's were at switchover: the same content
(``qemu-img compare``); A's images are no longer written; then B resumes and
the guest reads back, on B, every block it wrote before the move (its write
pointer goes round the whole region), with ``dbad=0`` and its memory intact.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import LOCAL_STORAGE, Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

DSIZE_MIB = 16
DWRITE_KIB_S = 4096
IMAGE_MIB = 32 + DSIZE_MIB  # the workload's region starts at 32 MiB


@pytest.fixture(scope="module")
def disk_kernel() -> Path:
    return testguest.build(variant="disk")


def _as_seen_by(host: HostEnv, argv: list[str]) -> None:
    """Run ``argv`` with ``host``'s local storage where its agents see it (backing paths)."""
    subprocess.run(host.local_view(argv), check=True, capture_output=True)


def _ide(name: str, fmt: str, dev: str) -> str:
    source = LOCAL_STORAGE / name
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' cache='none'/>"
            f"<source file='{source}'/><target dev='{dev}' bus='ide'/></disk>")  # fmt: skip


def _same_content(a: HostEnv, b: HostEnv, name: str, fmt: str) -> None:
    """A's image and B's hold the same guest-visible bytes (backing files
    included: both hosts' bases are the same bytes, so A's view of B's image is
    exact)."""
    _as_seen_by(a, ["qemu-img", "compare", "-U", "-f", fmt, "-F", fmt,
                    str(LOCAL_STORAGE / name), str(b.local_dir / name)])


@pytest.mark.parametrize(("fmt", "disks", "mode", "how"), [
    # Memory by post-copy after one pre-copy pass: the disks end in sync at
    # the switch to post-copy, before B's CPUs run.
    ("raw", 1, "all", ("--postcopy", "--postcopy-after-precopy", "--bandwidth", "64")),
    # Both disks through the migration's tunnel: two more channels of its token.
    ("qcow2", 2, "all", ("--tunnelled",)),
    ("qcow2", 1, "inc", ()),
], ids=["raw-1-all-postcopy", "qcow2-2-all-tunnelled", "qcow2-1-inc"])  # fmt: skip
def test_guest_writing_its_disks_moves_with_them(
    cluster: Cluster, disk_kernel: Path, virt_type: str, tmp_path: Path, fmt: str, disks: int,
    mode: str, how: tuple[str, ...],
) -> None:
    a, b = cluster.a, cluster.b
    for host in (a, b):
        host.enable_local_storage()
    cluster.start()
    names = [f"d{i}.{fmt}" for i in range(disks)]
    for n in names:
        if mode == "inc":
            # A base both hosts have (the same bytes), and a top layer on A only.
            base = n + ".base"
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(a.local_dir / base),
                            f"{IMAGE_MIB}M"], check=True)  # fmt: skip
            (b.local_dir / base).write_bytes((a.local_dir / base).read_bytes())
            _as_seen_by(a, ["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                            str(LOCAL_STORAGE / base), "-F", "raw", str(LOCAL_STORAGE / n)])
        else:
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(a.local_dir / n),
                            f"{IMAGE_MIB}M"], check=True)  # fmt: skip
    devices = "".join(_ide(n, fmt, dev) for n, dev in zip(names, ("hda", "hdc"), strict=False))
    extra = f"dwrite={DWRITE_KIB_S} dsize={DSIZE_MIB}" + (f" ddisks={disks}" if disks > 1 else "")
    xml = tmp_path / "dg.xml"
    xml.write_text(guest_xml("dg", disk_kernel, virt_type=virt_type, extra_devices=devices,
                             cmdline_extra=extra))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "dg", check=True)
    region_kib = DSIZE_MIB * 1024 * disks
    serial = testguest.SerialReader(a.serial_socket("dg"))
    try:
        # Every block of the region written once before the move.
        before = serial.wait_for(lambda r: r.dwritten_kib >= region_kib and r.counter >= 2,
                                 timeout=120)  # fmt: skip
        assert before.dbad == 0 and before.derrors == 0, before.raw
        # Landed paused on B (not possible with post-copy: B's CPUs run at the
        # switch) so that B's images can be compared with A's as they were.
        paused = "--postcopy" not in how
        moved = a.ferryctl("migrate", "dg", b.uri, "--live", f"--copy-storage-{mode}", "--json",
                           *how, *(["--paused"] if paused else []), timeout=300)  # fmt: skip
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        events = [json.loads(line) for line in moved.stdout.splitlines() if line.strip()]
        result = next(e["data"] for e in events if e["event"] == "result")
        if "--tunnelled" in how:
            # The disks crossed the tunnel: at least the region the guest wrote
            # (the mirrors send the never-written rest as zeroes, not bytes).
            assert result["stats"]["tunnel_disk_bytes"] >= disks * DSIZE_MIB << 20, result
            assert result["stats"]["tunnel_bytes"] > result["stats"]["tunnel_disk_bytes"]
        assert b.domain_state("dg") == ("paused" if paused else "running") and not a.qemu_pids()
        # The guest ran (and wrote) while its disks were mirrored: only the
        # memory switchover paused it.
        at_switch = serial.latest()
        assert at_switch is not None and at_switch.dwritten_kib > before.dwritten_kib
        assert result["stats"]["downtime_ms"] < 5000, result
        if not paused:
            assert result["stats"]["postcopy"] is True, result
        # Paused on B: B's images are the source's at switchover.
        for n in names if paused else ():
            _same_content(a, b, n, fmt)
        if mode == "inc":
            info = json.loads(subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(b.local_dir / names[0])],
                check=True, capture_output=True, text=True).stdout)  # fmt: skip
            assert info["backing-filename"].endswith(".base"), info
        a_images = {n: (a.local_dir / n).stat().st_mtime_ns for n in names}
        if paused:
            b.ferryctl("resume", "dg", check=True)
        serial.reconnect(b.serial_socket("dg"))
        # The write pointer goes round the whole region on B: every block the
        # guest wrote on A is read back (and checked) before it is overwritten.
        last = serial.wait_for(
            lambda r: r.dwritten_kib >= at_switch.dwritten_kib + region_kib + 64, timeout=120)
        assert last.dbad == 0 and last.derrors == 0, last.raw
        assert last.bad_pages == 0 and serial.boot_count == 1
        # The source's images were left as they were at switchover.
        assert {n: (a.local_dir / n).stat().st_mtime_ns for n in names} == a_images
        wait_until(lambda: b.domain_state("dg") == "running", 10, "dg running on B")
        b.ferryctl("destroy", "dg", check=True)
    finally:
        serial.close()
