"""``ferryctl migrate-check`` (issue 12): the pre-flight verdict against real qemu.

A quiet guest converges; a guest rewriting 64 MiB flat out against a 32 MiB/s
cap, a 5 s deadline and no post-copy does not (exit 3, the reason names the
dirty rate and the link), and its measured dirty rate is about its working
set per second.  Bad input is refused with the usual error codes.  A check
leaves nothing behind: the VM runs on A as before, nothing on B, no job.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_migration import boot_guest

import testguest
from cluster import Cluster, HostEnv, guest_xml

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def check(a: HostEnv, b: HostEnv, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """ferryctl migrate-check NAME B's URI."""
    return a.ferryctl("migrate-check", name, b.uri, *extra, timeout=60)


def as_json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    """The one JSON object migrate-check --json printed (strict: no Infinity/NaN)."""
    def refuse(token: str) -> None:
        raise AssertionError(f"not JSON: {token}")

    out: dict[str, object] = json.loads(result.stdout, parse_constant=refuse)
    return out


def assert_untouched(cluster: Cluster, serial: testguest.SerialReader, name: str = "g1") -> None:
    """The guest still runs on A and keeps counting; B has nothing; no job anywhere."""
    a, b = cluster.a, cluster.b
    before = serial.latest()
    assert before is not None
    serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
    assert serial.boot_count == 1
    assert len(a.qemu_pids()) == 1 and b.qemu_pids() == []
    assert a.domain_state(name) == "running"
    assert b.domain_state(name) is None
    state_a = a.ctl_json("agent-state")
    assert state_a["jobs"] == [] and state_a["outgoing"] == [] and state_a["fences"] == []
    state_b = b.ctl_json("agent-state", agent="destination")
    assert not state_b.get("jobs") and not state_b.get("incoming"), state_b


def test_quiet_guest_converges(cluster: Cluster, guest_kernel: Path, virt_type: str,
                               tmp_path: Path) -> None:  # fmt: skip
    c = cluster.start()
    serial = boot_guest(c.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type,
                                                 mem_mib=128, wss_mib=4, rate_mib_s=1))  # fmt: skip
    try:
        result = check(c.a, c.b, "g1", "--json")
        assert result.returncode == 0, result.stdout + result.stderr + c.logs()
        out = as_json(result)
        m, v = out["measurements"], out["verdict"]
        assert isinstance(m, dict) and isinstance(v, dict)
        print(f"\n[quiet] {json.dumps(m)}\n[quiet] {json.dumps(v)}")
        assert v["feasible"] is True and v["converges"] is True
        assert m["ram_bytes"] == 128 * MIB
        assert 0 <= m["dirty_rate_bps"] < 16 * MIB
        assert 0 < m["resident_bytes"] <= 128 * MIB
        assert m["bandwidth_bps"] > 32 * MIB and m["probe"]["bytes"] > 0
        # dirty-bitmap only under KVM: qemu 7.2 under TCG crashes on it.
        method = "dirty-bitmap" if virt_type == "kvm" else "page-sampling"
        assert m["run_state"] == "running" and m["dirty_rate_method"] == method
        assert out["goal"] == {"deadline_s": None, "max_downtime_ms": 300,
                               "max_throttle_pct": 0, "postcopy_allowed": False}  # fmt: skip
        text = check(c.a, c.b, "g1")
        assert text.returncode == 0, text.stderr
        print(text.stdout)
        assert "plain pre-copy converges in ~" in text.stdout, text.stdout
        assert "goal        feasible" in text.stdout
        assert_untouched(c, serial)
    finally:
        serial.close()


def test_flat_out_guest_cannot_converge_on_a_thin_link(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    c = cluster.start()
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=256, wss_mib=64, rate_mib_s=0)
    serial = boot_guest(c.a, tmp_path, xml)
    try:
        limits = ("--bandwidth", "32", "--deadline", "5", "--max-downtime", "300")
        result = check(c.a, c.b, "g1", "--json", *limits)
        assert result.returncode == 3, result.stdout + result.stderr + c.logs()
        out = as_json(result)
        m, v = out["measurements"], out["verdict"]
        assert isinstance(m, dict) and isinstance(v, dict)
        print(f"\n[flat-out] {json.dumps(m)}\n[flat-out] {json.dumps(v)}")
        assert v["feasible"] is False and v["converges"] is False
        # The measured rate: a 64 MiB working set rewritten as fast as the guest
        # can is 64 MiB of distinct pages a second (each counted once).
        assert 0.5 * 64 * MIB <= m["dirty_rate_bps"] <= 1.25 * 64 * MIB, m
        assert m["bandwidth_bps"] == 32 * MIB  # the probe is faster; --bandwidth caps it
        assert m["probe"]["bps"] > 32 * MIB
        reasons = " ".join(v["reasons"]).lower()
        assert "dirt" in reasons and ("link" in reasons or "bandwidth" in reasons), v["reasons"]
        text = check(c.a, c.b, "g1", *limits)
        assert text.returncode == 3, text.stdout + text.stderr
        print(text.stdout)
        assert "pre-copy cannot converge: the guest dirties" in text.stdout, text.stdout
        assert "the link moves 32.0 MiB/s" in text.stdout
        assert "NOT feasible" in text.stdout
        assert_untouched(c, serial)
    finally:
        serial.close()


def test_bad_input(cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path) -> None:
    c = cluster.start()
    a, b = c.a, c.b
    serial = boot_guest(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type,
                                               wss_mib=4, rate_mib_s=1))  # fmt: skip
    try:
        r = check(a, b, "nosuch")
        assert r.returncode == 1 and "(no-domain)" in r.stderr, r.stderr
        r = a.ferryctl("migrate-check", "g1", "http://elsewhere", timeout=60)
        assert r.returncode == 1 and "(migration-refused)" in r.stderr, r.stderr
        assert "ferry://HOST" in r.stderr
        r = check(a, b, "g1", "--offline")
        assert r.returncode == 1 and "nothing to pre-flight" in r.stderr, r.stderr
        r = check(a, b, "g1", "--postcopy", "--paused")
        assert r.returncode == 1 and "(flags-invalid)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr

        # Defined but shut off: nothing runs, nothing to measure.
        path = tmp_path / "g2.xml"
        path.write_text(guest_xml("g2", guest_kernel, virt_type=virt_type))
        a.ferryctl("define", str(path), check=True)
        r = check(a, b, "g2")
        assert r.returncode == 1 and "(domain-state)" in r.stderr, r.stderr

        # Paused: it dirties nothing, and the check says so (and leaves it paused).
        a.ferryctl("suspend", "g1", check=True)
        r = check(a, b, "g1", "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        m = as_json(r)["measurements"]
        assert isinstance(m, dict)
        assert m["dirty_rate_bps"] == 0 and m["dirty_rate_method"] == "none"
        assert m["run_state"] == "paused" and "not running (paused)" in m["notes"][0]
        assert a.domain_state("g1") == "paused"
        a.ferryctl("resume", "g1", check=True)
        assert_untouched(c, serial)
    finally:
        serial.close()

