"""Post-copy and compression between two namespace hosts: real qemu (KVM), real links.

Every test ends with the guest's own proof: it kept counting on B, it never
rebooted, no page came back wrong, and A holds no copy.  Multi-pass
migrations lose guest writes under TCG in qemu 7.2 (README), hence the
``multipass`` marker.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faults import Link
from test_migration import assert_moved, boot_guest, events, migrate, refused

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.multipass]

#: Short settle times, so that a cut link is noticed within seconds.
TIMEOUTS = {
    "migration.stall_timeout_s": 4,
    "migration.reply_timeout_s": 15,
    "migration.outcome_timeout_s": 10,
}


@pytest.fixture
def hosts(cluster: Cluster) -> Cluster:
    """Both agents on both hosts, with short stall/reply timeouts."""
    for host in (cluster.a, cluster.b):
        host.extra_config = dict(TIMEOUTS)
    return cluster.start()


def _guest(
    hosts: Cluster, kernel: Path, virt_type: str, tmp: Path, **kw: Any
) -> Iterator[testguest.SerialReader]:
    serial = boot_guest(hosts.a, tmp, guest_xml("g1", kernel, virt_type=virt_type, **kw))
    try:
        yield serial
    finally:
        serial.close()


@pytest.fixture
def busy_guest(
    hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    """256 MiB, rewriting 64 MiB flat out: pre-copy at 32 MiB/s never ends."""
    yield from _guest(hosts, guest_kernel, virt_type, tmp_path, mem_mib=256, wss_mib=64)


@pytest.fixture
def zip_guest(
    hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    """256 MiB whose pages compress (zip=1), rewriting 32 MiB at 64 MiB/s."""
    yield from _guest(hosts, guest_kernel, virt_type, tmp_path, mem_mib=256, wss_mib=32,
                      rate_mib_s=64, zip=True)  # fmt: skip


def background(host: HostEnv, *args: str) -> subprocess.Popen[str]:
    """``ferryctl ARGS --json`` on ``host``, running while the test acts."""
    return subprocess.Popen(host.ferryctl_argv(*args, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finished(proc: subprocess.Popen[str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Wait for a background ferryctl; kill it if it hangs."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"ferryctl hung:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def job_progress(host: HostEnv, name: str = "g1") -> dict[str, Any]:
    """``ferryctl jobinfo --json`` (empty while no migration runs)."""
    result: dict[str, Any] = host.ctl_json("jobinfo", name)
    return result


def result_stats(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The final stats of a finished migrate --json."""
    last = events(result)[-1]
    data = last["data"]
    assert isinstance(data, dict), last
    stats = data["stats"]
    assert isinstance(stats, dict)
    return stats


def test_postcopy_switch_by_hand(busy_guest: testguest.SerialReader, hosts: Cluster) -> None:
    a, b = hosts.a, hosts.b
    proc = background(a, "migrate", "g1", b.uri, "--live", "--postcopy", "--bandwidth", "32")
    try:
        # Pre-copy cannot finish at 32 MiB/s: wait until it is well under way.
        wait_until(lambda: int(job_progress(a).get("transferred") or 0) > 64 << 20, 60,
                   "the migration moved 64 MiB")  # fmt: skip
        out = a.ferryctl("migrate-postcopy", "g1", check=True)
        assert "post-copy" in out.stdout
    finally:
        result = finished(proc)
    assert result.returncode == 0, result.stderr + hosts.logs()
    stats = result_stats(result)
    assert stats["postcopy"] is True, stats
    assert any(e["event"] == "postcopy" and "operator" in str(e["data"]) for e in events(result))
    assert_moved(hosts, busy_guest)


def test_postcopy_after_precopy(busy_guest: testguest.SerialReader, hosts: Cluster) -> None:
    a, b = hosts.a, hosts.b
    result = migrate(a, "g1", b, "--postcopy", "--postcopy-after-precopy", "--bandwidth", "64")
    assert result.returncode == 0, result.stderr + hosts.logs()
    stats = result_stats(result)
    assert stats["postcopy"] is True and stats["passes"] >= 2, stats
    switch = [e for e in events(result) if e["event"] == "postcopy"]
    assert switch and "first full pass" in str(switch[0]["data"]), events(result)
    # The ETA is there and is JSON (null or a number, never Infinity).
    etas = [e["data"].get("eta_s") for e in events(result) if e["event"] == "progress"]  # type: ignore[union-attr]
    assert etas and all(x is None or isinstance(x, float | int) for x in etas)
    assert_moved(hosts, busy_guest)


def test_postcopy_refusals(busy_guest: testguest.SerialReader, hosts: Cluster) -> None:
    a, b = hosts.a, hosts.b
    refused(migrate(a, "g1", b, "--postcopy", "--parallel"), "flags-invalid", "--parallel")
    refused(migrate(a, "g1", b, "--postcopy-after-precopy"), "flags-invalid", "requires --postcopy")
    refused(migrate(a, "g1", b, "--timeout", "5", "--timeout-postcopy"), "flags-invalid",
            "--timeout-postcopy requires --postcopy")  # fmt: skip
    result = a.ferryctl("migrate-postcopy", "g1")
    assert result.returncode == 1 and "no migration is running" in result.stderr, result.stderr
    result = migrate(a, "g1", b, "--postcopy", "--postcopy-resume")
    refused(result, "domain-state", "nothing to resume")
    assert a.domain_state("g1") == "running"
    # A migration without --postcopy cannot be switched.
    proc = background(a, "migrate", "g1", b.uri, "--live", "--bandwidth", "16",
                      "--timeout", "20", "--timeout-abort")  # fmt: skip
    try:
        wait_until(lambda: int(job_progress(a).get("transferred") or 0) > 0, 60, "migrating")
        out = a.ferryctl("migrate-postcopy", "g1")
        assert out.returncode == 1 and "without --postcopy" in out.stderr, out.stderr
        a.ferryctl("jobabort", "g1")
    finally:
        finished(proc)
    wait_until(lambda: a.domain_state("g1") == "running", 30, "g1 runs on A again")


@pytest.mark.parametrize("tunnelled", [False, True], ids=["direct", "tunnelled"])
def test_postcopy_link_cut_then_resume(
    busy_guest: testguest.SerialReader, hosts: Cluster, tunnelled: bool
) -> None:
    a, b = hosts.a, hosts.b
    extra = ["--tunnelled"] if tunnelled else []
    # Post-copy at 4 MiB/s leaves most of memory on A for many seconds.
    proc = background(a, "migrate", "g1", b.uri, "--live", "--postcopy", "--bandwidth", "64",
                      "--postcopy-after-precopy", "--postcopy-bandwidth", "4",
                      *extra)  # fmt: skip
    link = Link(hosts, "b")
    try:
        wait_until(lambda: job_progress(a).get("status") == "postcopy-active", 90,
                   "the migration is in post-copy")  # fmt: skip
        link.cut()
        result = finished(proc)
    except BaseException:
        proc.kill()
        raise
    finally:
        link.close()
    # The switch happened before the cut: both sides keep their qemu, paused.
    assert result.returncode == 1, result.stdout + result.stderr
    assert "(postcopy-paused)" in result.stderr and "--postcopy-resume" in result.stderr
    assert len(a.qemu_pids()) == 1 and len(b.qemu_pids()) == 1
    info = a.ctl_json("dominfo", "g1")
    assert info["state"] == "paused" and "post-copy" in json.dumps(info), info
    out = a.ferryctl("resume", "g1")
    assert out.returncode == 1 and "post-copy" in out.stderr, out.stderr
    out = a.ferryctl("migrate", "g1", b.uri, "--live")
    assert out.returncode == 1 and "--postcopy-resume" in out.stderr, out.stderr
    result = migrate(a, "g1", b, "--postcopy", "--postcopy-resume", *extra)
    assert result.returncode == 0, result.stderr + hosts.logs()
    assert_moved(hosts, busy_guest)
    # The next migration works (back to A).
    assert b.ctl_json("dominfo", "g1")["state"] == "running"


@pytest.mark.parametrize(
    "methods",
    [["--comp-methods", "xbzrle"], ["--tunnelled", "--parallel", "--comp-methods", "zstd"],
     ["--tunnelled", "--parallel", "--comp-methods", "zlib"]],
    ids=["xbzrle", "zstd", "zlib"],
)  # fmt: skip
def test_compression_methods(
    zip_guest: testguest.SerialReader, hosts: Cluster, methods: list[str]
) -> None:
    a, b = hosts.a, hosts.b
    result = migrate(a, "g1", b, "--compressed", *methods, "--bandwidth", "64")
    assert result.returncode == 0, result.stderr + hosts.logs()
    stats = result_stats(result)
    method = methods[-1]
    if method == "xbzrle":
        # Re-sent pages went as deltas.
        assert stats.get("xbzrle_pages", 0) > 0, stats
    else:
        # qemu 7.2 counts multifd bytes before compression; the tunnel
        # counts what really crossed: far fewer bytes than the pages held.
        assert 0 < stats["tunnel_bytes"] < stats["normal_bytes"] / 4, stats
    assert_moved(hosts, zip_guest)


def test_compression_refusals(zip_guest: testguest.SerialReader, hosts: Cluster) -> None:
    a, b = hosts.a, hosts.b
    refused(migrate(a, "g1", b, "--compressed", "--comp-methods", "zstd"), "flags-invalid",
            "requires --parallel")  # fmt: skip
    refused(migrate(a, "g1", b, "--compressed", "--parallel", "--comp-methods", "xbzrle"),
            "flags-invalid", "main stream")  # fmt: skip
    refused(migrate(a, "g1", b, "--comp-methods", "xbzrle"), "flags-invalid",
            "requires --compressed")  # fmt: skip
    refused(migrate(a, "g1", b, "--compressed", "--comp-methods", "lz4"), "flags-invalid",
            "compression_methods[0]' must be one of 'xbzrle', 'zlib', 'zstd'")  # fmt: skip
    refused(migrate(a, "g1", b, "--compressed", "--comp-xbzrle-cache", "3000000"), "flags-invalid",
            "power of two")  # fmt: skip
    assert a.domain_state("g1") == "running" and not b.qemu_pids()


# -- the convergence controller (--deadline) ----------------------------------------


def test_controller_meets_a_reachable_deadline(
    busy_guest: testguest.SerialReader, hosts: Cluster
) -> None:
    a, b = hosts.a, hosts.b
    result = migrate(a, "g1", b, "--bandwidth", "64", "--postcopy-bandwidth", "64",
                     "--deadline", "12", "--max-downtime", "500", "--max-throttle", "50",
                     "--postcopy")  # fmt: skip
    assert result.returncode == 0, result.stderr + hosts.logs()
    seen = events(result)
    preflight = [e for e in seen if e["event"] == "preflight"]
    assert preflight, seen
    verdict = preflight[0]["data"]["verdict"]  # type: ignore[index]
    assert verdict["feasible"] and verdict["reasons"], verdict
    # Every lever it moved says why, with figures.
    moves = [e for e in seen if e["event"] in ("postcopy", "decision")]
    assert moves and all("MiB/s" in str(m["data"]) or "ms" in str(m["data"]) for m in moves), seen
    stats = result_stats(result)
    assert stats["downtime_ms"] <= 500 and stats["throttle_pct"] <= 50, stats
    # The decision is in the journal of A, with its reason.
    assert_moved(hosts, busy_guest)


def test_controller_refuses_unreachable_deadline_before_starting(
    busy_guest: testguest.SerialReader, hosts: Cluster
) -> None:
    a, b = hosts.a, hosts.b
    result = migrate(a, "g1", b, "--bandwidth", "32", "--deadline", "2", "--max-downtime", "300")
    refused(result, "deadline-unreachable", "refused before starting", "--deadline 2s")
    assert any(e["event"] == "preflight" for e in events(result))
    assert a.domain_state("g1") == "running" and not b.qemu_pids()
    state = a.ctl_json("agent-state")
    assert not state["jobs"] and not state["outgoing"] and not state["fences"], state


def test_controller_keeps_quiet_guest_in_precopy(
    hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = hosts.a, hosts.b
    for serial in _guest(hosts, guest_kernel, virt_type, tmp_path, mem_mib=128, wss_mib=8,
                         rate_mib_s=4):  # fmt: skip
        result = migrate(a, "g1", b, "--bandwidth", "64", "--deadline", "30", "--postcopy")
        assert result.returncode == 0, result.stderr + hosts.logs()
        assert not any(e["event"] == "postcopy" for e in events(result)), events(result)
        assert not result_stats(result).get("postcopy"), result_stats(result)
        assert_moved(hosts, serial)


# -- --timeout and its actions ------------------------------------------------------


def test_timeout_postcopy_and_timeout_suspend(
    busy_guest: testguest.SerialReader, hosts: Cluster
) -> None:
    a, b = hosts.a, hosts.b
    # Pre-copy at 32 MiB/s never ends for this guest: after 3 s, switch.
    result = migrate(a, "g1", b, "--bandwidth", "32", "--postcopy", "--postcopy-bandwidth", "64",
                     "--timeout", "3", "--timeout-postcopy")  # fmt: skip
    assert result.returncode == 0, result.stderr + hosts.logs()
    switch = [e for e in events(result) if e["event"] == "postcopy"]
    assert switch and "--timeout 3s" in str(switch[0]["data"]), events(result)
    assert result_stats(result)["postcopy"] is True
    assert_moved(hosts, busy_guest)
    # Back to A with virsh's default action: pause the guest, finish the copy.
    result = migrate(b, "g1", a, "--bandwidth", "32", "--timeout", "3")
    assert result.returncode == 0, result.stderr + hosts.logs()
    decisions = [e for e in events(result) if e["event"] == "decision"]
    assert any("pausing the guest" in str(d["data"]) for d in decisions), events(result)
    assert not b.qemu_pids() and len(a.qemu_pids()) == 1
    busy_guest.reconnect(a.serial_socket("g1"))
    before = busy_guest.latest()
    assert before is not None
    after = busy_guest.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
    assert after.bad_pages == 0 and busy_guest.boot_count == 1
    assert a.ctl_json("dominfo", "g1")["state"] == "running"
