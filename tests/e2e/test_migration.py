"""Live migration between two namespace hosts: real qemu, real TLS, real frames."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_hosts(cluster: Cluster) -> Cluster:
    """Both agents on both hosts."""
    return cluster.start()


def define_and_start(host: HostEnv, tmp: Path, xml: str, name: str = "g1") -> None:
    """Define ``xml`` on ``host`` and start it."""
    path = tmp / f"{name}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)
    host.ferryctl("start", name, check=True)


@pytest.fixture
def running_guest(two_hosts: Cluster, guest_kernel: Path, virt_type: str,
                  tmp_path: Path) -> Iterator[testguest.SerialReader]:
    """g1 running on host A with its serial reader attached and reporting."""
    define_and_start(two_hosts.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))
    serial = testguest.SerialReader(two_hosts.a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 2, timeout=60)
        yield serial
    finally:
        serial.close()


def migrate(host: HostEnv, name: str, dest: HostEnv, *extra: str) -> subprocess.CompletedProcess[str]:
    """ferryctl migrate with --json; returns the finished process."""
    return host.ferryctl("migrate", name, dest.uri, "--live", "--json", *extra, timeout=300)


def events(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    """The JSON event lines ferryctl printed."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def assert_moved(cluster: Cluster, serial: testguest.SerialReader, name: str = "g1",
                 dest_name: str | None = None) -> None:
    """The guest runs on B (not on A), kept counting, and its memory is intact."""
    a, b = cluster.a, cluster.b
    dest_name = dest_name or name
    before = serial.latest()
    assert before is not None
    assert a.qemu_pids() == [], "qemu still running on the source"
    assert len(b.qemu_pids()) == 1
    serial.reconnect(b.serial_socket(dest_name))
    after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
    assert serial.boot_count == 1, "the guest rebooted"
    assert after.bad_pages == 0
    assert after.checksum == before.checksum
    info_b = b.ctl_json("dominfo", dest_name)
    assert info_b["state"] == "running"
    assert a.domain_state(name) in (None, "shut off")


def test_live_migration_moves_running_guest(running_guest: testguest.SerialReader,
                                            two_hosts: Cluster) -> None:
    a, b = two_hosts.a, two_hosts.b
    result = migrate(a, "g1", b)
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    evs = events(result)
    phases = [e["data"]["phase"] for e in evs if e["event"] == "phase"]  # type: ignore[index]
    assert phases == ["begin", "prepare", "perform", "finish", "confirm"]
    final = evs[-1]
    assert final["event"] == "result"
    assert_moved(two_hosts, running_guest)
    # Not persistent on B unless asked; still defined on A (no --undefine-source).
    assert b.domain_state("g1") == "running"
    assert b.ctl_json("dominfo", "g1")["persistent"] is False
    assert a.domain_state("g1") == "shut off"

    # And back again, persistent this time, undefining the source.
    back = migrate(b, "g1", a, "--persistent", "--undefine-source")
    assert back.returncode == 0, back.stderr + two_hosts.logs()
    wait_until(lambda: len(a.qemu_pids()) == 1, 10, "qemu on A")
    assert b.qemu_pids() == []
    assert a.ctl_json("dominfo", "g1")["persistent"] is True
    assert b.domain_state("g1") is None
    running_guest.reconnect(a.serial_socket("g1"))
    rep = running_guest.wait_for(lambda r: r.counter > 5, timeout=30)
    assert rep.bad_pages == 0 and running_guest.boot_count == 1


def test_rename_on_migration(running_guest: testguest.SerialReader, two_hosts: Cluster) -> None:
    a, b = two_hosts.a, two_hosts.b
    result = migrate(a, "g1", b, "--dname", "g1-renamed", "--persistent")
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    assert_moved(two_hosts, running_guest, "g1", "g1-renamed")
    assert b.domain_state("g1") is None
    info = b.ctl_json("dominfo", "g1-renamed")
    assert info["persistent"] is True
    assert info["uuid"] == a.ctl_json("dominfo", "g1")["uuid"]
