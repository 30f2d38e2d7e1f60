"""One host, real qemu: the domain lifecycle through ferryctl and ferry-source."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml, wait_until

pytestmark = pytest.mark.e2e


def _define(host, tmp: Path, xml: str, name: str = "g1") -> None:  # type: ignore[no-untyped-def]
    path = tmp / f"{name}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)


def test_lifecycle_survives_agent_kill(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))

    listed = a.ctl_json("list", "--all")
    assert [(d["name"], d["state"]) for d in listed] == [("g1", "shut off")]

    a.ferryctl("start", "g1", check=True)
    listed = a.ctl_json("list")
    assert [(d["name"], d["state"]) for d in listed] == [("g1", "running")]
    assert len(a.qemu_pids()) == 1

    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        first = serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        assert first.bad_pages == 0

        # Suspend: the counter stops; resume: it climbs again.
        a.ferryctl("suspend", "g1", check=True)
        assert a.domain_state("g1") == "paused"
        paused_at = serial.latest()
        assert paused_at is not None
        a.ferryctl("resume", "g1", check=True)
        assert a.domain_state("g1") == "running"
        serial.wait_for(lambda r: r.counter > paused_at.counter + 2, timeout=30)

        # kill -9 the agent: the VM must not notice.
        qemu_before = a.qemu_pids()
        before = serial.latest()
        assert before is not None
        a.stop_agent("source", signal.SIGKILL)
        serial.wait_for(lambda r: r.counter > before.counter + 3, timeout=30)
        assert a.qemu_pids() == qemu_before
        a.start_agent("source")
        info = a.ctl_json("dominfo", "g1")
        assert info["state"] == "running"
        assert info["pid"] == qemu_before[0]
        after = serial.wait_for(lambda r: r.counter > before.counter + 5, timeout=30)
        assert after.bad_pages == 0
        assert serial.boot_count == 1, "the guest rebooted"

        a.ferryctl("destroy", "g1", check=True)
        wait_until(lambda: not a.qemu_pids(), 10, "qemu to exit after destroy")
        assert a.domain_state("g1") == "shut off"
    finally:
        serial.close()


def _fails(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr


def test_bad_input_is_refused_and_changes_nothing(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    a.write_config(
        acl=[{"users": ["nobody"], "ops": ["list", "info"], "domains": ["*"]}],
        **{"admin.group": "nogroup"},
    )
    a.start_agent("source")

    _fails(a.ferryctl("dominfo", "nosuch"), "no domain with matching name 'nosuch'", "(no-domain)")
    _fails(a.ferryctl("start", "nosuch"), "'nosuch'", "(no-domain)")

    bad = tmp_path / "bad.xml"
    bad.write_text("<domain type='kvm'><name>x</name>\n<memory>1</memory\n</domain>")
    _fails(a.ferryctl("define", str(bad)), "line", "(xml-invalid)")
    assert a.ctl_json("list", "--all") == []

    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))
    other_uuid = guest_xml(
        "g1", guest_kernel, virt_type=virt_type, uuid="11111111-2222-3333-4444-555555555555"
    )
    dup = tmp_path / "dup.xml"
    dup.write_text(other_uuid)
    _fails(a.ferryctl("define", str(dup)), "domain 'g1' already exists", "(domain-exists)")

    a.ferryctl("start", "g1", check=True)
    pids = a.qemu_pids()
    _fails(a.ferryctl("start", "g1"), "already running", "(domain-state)")
    assert a.qemu_pids() == pids

    # A non-root user in the admin group: the ACL allows list/info, not destroy.
    denied = a.ferryctl("destroy", "g1", user="nobody")
    _fails(denied, "access denied", "'destroy'", "'g1'", "(access-denied)")
    assert a.qemu_pids() == pids
    allowed = a.ferryctl("list", "--json", user="nobody")
    assert allowed.returncode == 0, allowed.stderr
    assert [d["name"] for d in json.loads(allowed.stdout)] == ["g1"]

    a.ferryctl("destroy", "g1", check=True)
