"""Disks that are not shared: --copy-storage-all / -inc move them with the VM (issue 15).

Each test host has local storage (its agents and qemus see its own
directory at one path, :data:`cluster.LOCAL_STORAGE`), so the same disk
path names two different files, as on two machines with local disks.
Shown here: the destination creates the image, the source mirrors it over
NBD with TLS, memory follows, and B's image is A's byte for byte; with
``-inc`` only the top layer moves over a base both hosts have; what cannot
be copied is refused before anything is created, and a failed copy leaves
nothing on B.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import LOCAL_STORAGE, Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _random_image(path: Path, mib: int) -> None:
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MIB))


def _local(cluster: Cluster, *plaintext: HostEnv) -> tuple[HostEnv, HostEnv]:
    """Both hosts with local storage; those in ``plaintext`` allow NBD without TLS."""
    a, b = cluster.a, cluster.b
    for host in (a, b):
        host.enable_local_storage()
    for host in plaintext:
        host.write_config(**{"tls.allow_plaintext_nbd": True})
    cluster.start()
    return a, b


def _lease_holders(cluster: Cluster) -> dict[str, str]:
    """Disk path -> the host whose agent holds its lease (the lockspace both hosts share)."""
    from ferry.lease import LeaseManager

    return {str(e["disk"]): str((e["owner"] or {}).get("host_name"))
            for e in LeaseManager(cluster.lockspace).inspect() if e["held"]}  # fmt: skip


def _as_seen_by(host: HostEnv, argv: list[str]) -> None:
    """Run ``argv`` with ``host``'s local storage where its agents see it (backing paths)."""
    subprocess.run(host.local_view(argv), check=True, capture_output=True)


def _guest(cluster: Cluster, kernel: Path, virt_type: str, tmp_path: Path, name: str,
           disks: str) -> Path:  # fmt: skip
    xml = tmp_path / f"{name}.xml"
    xml.write_text(guest_xml(name, kernel, virt_type=virt_type, extra_devices=disks))
    return xml


def _disk(path: str, fmt: str, dev: str) -> str:
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}' cache='none'/>"
            f"<source file='{path}'/><target dev='{dev}' bus='virtio'/></disk>")  # fmt: skip


def test_copy_storage_all_moves_raw_and_qcow2_disks_with_the_vm(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    # A would go without TLS, B would not: the disks go with TLS.
    a, b = _local(cluster, cluster.a)
    _random_image(a.local_dir / "data.raw", 48)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                    str(a.local_dir / "data.raw"), str(a.local_dir / "data.qcow2")],
                   check=True)  # fmt: skip
    before = {n: _sha(a.local_dir / n) for n in ("data.raw", "data.qcow2")}
    disks = (_disk(str(LOCAL_STORAGE / "data.raw"), "raw", "vda")
             + _disk(str(LOCAL_STORAGE / "data.qcow2"), "qcow2", "vdb"))  # fmt: skip
    xml = _guest(cluster, guest_kernel, virt_type, tmp_path, "cs1", disks)
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "cs1", check=True)
    serial = testguest.SerialReader(a.serial_socket("cs1"))
    try:
        first = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        assert _lease_holders(cluster) == {str(LOCAL_STORAGE / n): "a" for n in before}
        moved = a.ferryctl("migrate", "cs1", b.uri, "--live", "--copy-storage-all", "--json",
                           timeout=300)  # fmt: skip
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        events = [json.loads(line) for line in moved.stdout.splitlines() if line.strip()]
        storage = [e for e in events if e.get("event") == "storage"]
        assert storage and storage[-1]["data"]["disk_total"] >= 96 * MIB, events[-3:]
        assert all(d["ready"] for d in storage[-1]["data"]["disks"].values()), storage[-1]
        result = next(e["data"] for e in events if e["event"] == "result")
        assert result["stats"]["disk_transport"] == "nbd-tls", result
        assert result["stats"]["disk_bytes"] == storage[-1]["data"]["disk_total"], result
        # Progress (and jobinfo) show the disks beside the RAM, and an ETA.
        assert any(e["data"].get("eta_s") for e in storage), storage
        memory = [e for e in events if e.get("event") == "progress"]
        assert all(e["data"].get("disk_total") == storage[-1]["data"]["disk_total"]
                   for e in memory), memory[-1:]
        assert b.domain_state("cs1") == "running"
        assert a.domain_state("cs1") == "shut off" and not a.qemu_pids()
        # The disks' leases moved with them: B holds those of its new images.
        assert _lease_holders(cluster) == {str(LOCAL_STORAGE / n): "b" for n in before}
        # B's images are A's, byte for byte (raw) and by content (qcow2); A's untouched.
        assert _sha(b.local_dir / "data.raw") == before["data.raw"]
        same = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                               str(a.local_dir / "data.qcow2"), str(b.local_dir / "data.qcow2")],
                              capture_output=True, text=True)  # fmt: skip
        assert same.returncode == 0, same.stdout + same.stderr
        assert {n: _sha(a.local_dir / n) for n in before} == before
        serial.reconnect(b.serial_socket("cs1"))
        after = serial.wait_for(lambda r: r.counter > first.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        b.ferryctl("destroy", "cs1", check=True)
    finally:
        serial.close()


def test_copy_storage_inc_copies_only_the_top_layer(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    # Both hosts allow plaintext NBD: the top layer goes without TLS.
    a, b = _local(cluster, cluster.a, cluster.b)
    _random_image(a.local_dir / "base.raw", 32)
    (b.local_dir / "base.raw").write_bytes((a.local_dir / "base.raw").read_bytes())
    top = str(LOCAL_STORAGE / "top.qcow2")
    base = str(LOCAL_STORAGE / "base.raw")
    _as_seen_by(a, ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top])
    # A layer of its own on A: 4 MiB written over the base.
    _as_seen_by(a, ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 4M", top])
    xml = _guest(cluster, guest_kernel, virt_type, tmp_path, "cs2", _disk(top, "qcow2", "vda"))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "cs2", check=True)
    moved = a.ferryctl("migrate", "cs2", b.uri, "--live", "--copy-storage-inc", "--json",
                       timeout=300)  # fmt: skip
    assert moved.returncode == 0, moved.stderr + cluster.logs()
    result = [json.loads(line) for line in moved.stdout.splitlines() if line.strip()][-1]
    assert result["data"]["stats"]["disk_transport"] == "nbd-plain", result
    assert b.domain_state("cs2") == "running" and not a.qemu_pids()
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json",
                                      str(b.local_dir / "top.qcow2")], check=True,
                                     capture_output=True, text=True).stdout)  # fmt: skip
    assert info["backing-filename"] == str(LOCAL_STORAGE / "base.raw"), info
    # Only the top layer crossed: B's top holds about the 4 MiB written, not the 32 MiB base.
    assert info["actual-size"] < 16 * MIB, info
    b.ferryctl("destroy", "cs2", check=True)


def test_what_cannot_be_copied_is_refused_and_b_keeps_nothing(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = _local(cluster)
    _random_image(a.local_dir / "d.raw", 8)
    xml = _guest(cluster, guest_kernel, virt_type, tmp_path, "cs3",
                 _disk(str(LOCAL_STORAGE / "d.raw"), "raw", "vda"))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "cs3", check=True)
    # A disk that is not there, by name, before anything happens on B.
    r = a.ferryctl("migrate", "cs3", b.uri, "--live", "--copy-storage-all", "--migrate-disks",
                   "vdz")  # fmt: skip
    assert r.returncode == 1 and "vdz: no such disk" in r.stderr, r.stderr
    # -inc of an image without a backing file.
    r = a.ferryctl("migrate", "cs3", b.uri, "--live", "--copy-storage-inc")
    assert r.returncode == 1 and "needs an image with a backing file" in r.stderr, r.stderr
    # B already has a file at that path: refused in Prepare, B's file untouched.
    (b.local_dir / "d.raw").write_bytes(b"mine")
    r = a.ferryctl("migrate", "cs3", b.uri, "--live", "--copy-storage-all")
    assert r.returncode == 1 and "already exists on host b" in r.stderr, r.stderr
    assert (b.local_dir / "d.raw").read_bytes() == b"mine"
    (b.local_dir / "d.raw").unlink()
    # A disks port with a tunnel (the disks ride in the tunnel): refused up front.
    r = a.ferryctl("migrate", "cs3", b.uri, "--live", "--copy-storage-all", "--tunnelled",
                   "--disks-port", "49400")  # fmt: skip
    assert r.returncode == 1 and "cannot be combined with --tunnelled" in r.stderr, r.stderr
    assert a.domain_state("cs3") == "running" and not b.qemu_pids()
    assert not (b.local_dir / "d.raw").exists()
    # And the next migration works.
    r = a.ferryctl("migrate", "cs3", b.uri, "--live", "--copy-storage-all", timeout=300)
    assert r.returncode == 0, r.stderr + cluster.logs()
    wait_until(lambda: b.domain_state("cs3") == "running", 10, "cs3 running on B")
    b.ferryctl("destroy", "cs3", check=True)


def test_client_driven_copy_storage(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """ferryctl drives the phases (issue 13) of a storage copy: the plan rides in the
    cookies it carries; B's NBD server admits the source host's certificate, not the
    operator's."""
    a, b = cluster.a, cluster.b
    for host in (a, b):
        host.enable_local_storage()
        host.write_config(**cluster.operator_config())
    cluster.start()
    _random_image(a.local_dir / "c.raw", 16)
    before = _sha(a.local_dir / "c.raw")
    xml = _guest(cluster, guest_kernel, virt_type, tmp_path, "cs4",
                 _disk(str(LOCAL_STORAGE / "c.raw"), "raw", "vda"))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "cs4", check=True)
    done = subprocess.run(cluster.client_argv("migrate", "cs4", b.uri, "--client-driven",
                                              "--live", "--copy-storage-all"),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr + cluster.logs()
    assert "storage: copied" in done.stdout, done.stdout
    assert b.domain_state("cs4") == "running" and not a.qemu_pids()
    assert _sha(b.local_dir / "c.raw") == before == _sha(a.local_dir / "c.raw")
    b.ferryctl("destroy", "cs4", check=True)
