"""The outcome rule end to end: a lost Finish reply, an unknown outcome, migrate-recover.

Real agents, real qemu, the two-namespace test bed; faults at exact points
(``[testing] faults``, see ferry.faults) and a real cut of the veth.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from faults import Link, thaw, wait_frozen
from test_migration import assert_moved, boot_guest

import testguest
from cluster import Cluster, guest_xml, wait_until

pytestmark = pytest.mark.e2e

FAST = {
    "migration.reply_timeout_s": 8,
    "migration.outcome_timeout_s": 5,
    "migration.stall_timeout_s": 5,
}


def _start(cluster: Cluster, **b_config: object) -> None:
    cluster.a.write_config(**FAST)
    cluster.b.write_config(**{**FAST, **b_config})
    cluster.start()


def _guest(cluster: Cluster, kernel: Path, virt: str, tmp: Path) -> testguest.SerialReader:
    return boot_guest(cluster.a, tmp, guest_xml("g1", kernel, virt_type=virt))


def _stays_then_moves(cluster: Cluster, serial: testguest.SerialReader) -> None:
    """The guest still runs on A, intact; and the next migration works."""
    after = serial.wait_for(lambda r: r.counter > 3, timeout=30)
    assert after.bad_pages == 0 and serial.boot_count == 1
    result = cluster.a.ferryctl("migrate", "g1", cluster.b.uri, "--live", timeout=120)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert_moved(cluster, serial)


def _migrate_during(
    argv: list[str], fault: Callable[[subprocess.Popen[str]], None], *, timeout: float = 120
) -> tuple[int, str, str]:
    """Run ferryctl in the background, apply ``fault`` while it runs; (exit code, out, err).

    The process is killed if the fault or the wait fails, so no ferryctl outlives the test.
    """
    mig = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        fault(mig)
        out, err = mig.communicate(timeout=timeout)
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.communicate()
    return mig.returncode, out, err


def _jobs(cluster: Cluster) -> list[Path]:
    return [*(cluster.a.run_dir / "jobs").glob("*.job"), *(cluster.b.run_dir / "jobs").glob("*")]


def test_lost_finish_reply_is_settled_by_asking(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """Issue 10's first failure: B started the CPUs, its reply was lost; A must not resume."""
    _start(cluster, **{"testing.faults": ["dst.finish=drop-reply"]})
    serial = _guest(cluster, guest_kernel, virt_type, tmp_path)
    try:
        result = cluster.a.ferryctl("migrate", "g1", cluster.b.uri, "--live", "--json",
                                    timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr + cluster.logs()
        lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
        assert any(e["event"] == "warning" and "asking b for the outcome" in
                   e["data"]["message"] for e in lines), result.stdout  # fmt: skip
        assert_moved(cluster, serial)
        assert "fault point dst.finish reached: drop-reply" in cluster.b.agent_log("destination")
        assert "asking b" in cluster.a.agent_log("source")
        assert not _jobs(cluster)
        # The copy left on A is fenced: starting it would make a second copy.
        refused = cluster.a.ferryctl("start", "g1")
        assert refused.returncode == 1
        assert "refusing to start domain 'g1'" in refused.stderr
        assert "moved it to b" in refused.stderr and "--force" in refused.stderr
    finally:
        serial.close()


def test_unknown_outcome_stays_paused_until_migrate_recover(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """Link down while B resumes: A stays paused and says why; migrate-recover settles it."""
    _start(cluster, **{"testing.faults": ["dst.finish=stop"]})
    serial = _guest(cluster, guest_kernel, virt_type, tmp_path)
    a, b = cluster.a, cluster.b
    before = serial.latest()
    assert before is not None
    with Link(cluster) as link:
        def fault(mig: subprocess.Popen[str]) -> None:
            pid = wait_frozen(b, "destination", 60, also=mig)
            link.cut()
            thaw(pid)  # B starts the CPUs; its reply goes nowhere

        code, out, err = _migrate_during(a.ferryctl_argv("migrate", "g1", b.uri, "--live"), fault)
        assert code == 1, out + err
        assert "(outcome-unknown)" in err, err
        assert "migrate-recover g1" in err
        info = a.ctl_json("dominfo", "g1")
        assert info["state"] == "paused"
        assert "outcome unknown" in info["reason"] and "b unreachable" in info["reason"]
        listed = {d["name"]: d for d in a.ctl_json("list")}
        assert "outcome unknown" in str(listed["g1"]["reason"])
        # B runs it (its CPUs started before the link came back).
        wait_until(lambda: b.domain_state("g1") == "running", 30, "g1 running on B")
        refused = a.ferryctl("resume", "g1")
        assert refused.returncode == 1 and "refusing to resume domain 'g1'" in refused.stderr
        # While the link is down, recovery cannot settle it.
        still = a.ferryctl("migrate-recover", "g1", "--json", timeout=120)
        assert still.returncode == 2, still.stdout + still.stderr
        assert json.loads(still.stdout)["result"] == "unknown"
        link.restore()
    settled = a.ferryctl("migrate-recover", "g1", "--json", timeout=120)
    assert settled.returncode == 0, settled.stderr + cluster.logs()
    answer = json.loads(settled.stdout)
    assert answer["result"] == "completed" and answer["peer"] == "b"
    assert_moved(cluster, serial)
    assert not _jobs(cluster)
    state = b.ctl_json("agent-state", agent="destination")
    assert state["tokens"] == 0 and state["incoming"] == []
    # Nothing left to recover.
    again = a.ferryctl("migrate-recover", "g1")
    assert again.returncode == 1 and "nothing to recover" in again.stderr
    serial.close()


def test_outcome_op_fences_a_prepared_migration(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """ferry-source killed after Prepare: restarted, it settles; B has no copy left."""
    _start(cluster, **{"testing.faults": ["dst.prepare=stop"]})
    serial = _guest(cluster, guest_kernel, virt_type, tmp_path)
    a, b = cluster.a, cluster.b
    try:
        def fault(mig: subprocess.Popen[str]) -> None:
            pid = wait_frozen(b, "destination", 60, also=mig)
            a.stop_agent("source", 9)
            thaw(pid)

        code, _out, err = _migrate_during(a.ferryctl_argv("migrate", "g1", b.uri, "--live"),
                                          fault, timeout=60)  # fmt: skip
        assert code == 1
        assert "lost the connection to ferry-source during migration" in err, err
        a.start_agent("source")
        wait_until(lambda: not b.qemu_pids(), 30, "B's incoming qemu to go")
        wait_until(lambda: not _jobs(cluster), 30, "no job records left")
        assert a.domain_state("g1") == "running"
        outcomes = b.ctl_json("agent-state", agent="destination")["outcomes"]
        assert [o["state"] for o in outcomes] == ["failed"]
        _stays_then_moves(cluster, serial)
    finally:
        serial.close()


def test_cut_link_during_perform_is_a_stall_not_a_hang(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """Issue 10's fourth failure: ferryctl must end with the real reason, and A resume."""
    # B's watchdog gives up after 10 s without progress or Finish.
    _start(cluster, **{"destination.incoming_timeout_s": 10})
    serial = boot_guest(cluster.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type,
                                                      wss_mib=64))  # fmt: skip
    a, b = cluster.a, cluster.b
    try:
        with Link(cluster) as link:
            def fault(mig: subprocess.Popen[str]) -> None:
                assert mig.stdout is not None
                for line in mig.stdout:  # the first progress event: data is moving
                    if '"progress"' in line:
                        break
                link.cut()

            code, _out, err = _migrate_during(
                a.ferryctl_argv("migrate", "g1", b.uri, "--live", "--bandwidth", "2", "--json"),
                fault,
            )
            assert code == 1
            assert "(migration-stalled)" in err, err
            assert "no data moved for 5 s: the link to b looks down" in err
            wait_until(lambda: a.domain_state("g1") == "running", 30, "g1 resumed on A")
            link.restore()
        # B gave up too (no progress, no Finish) and kept nothing.
        wait_until(lambda: not b.qemu_pids(), 60, "B's incoming qemu to go")
        wait_until(lambda: not _jobs(cluster), 60, "no job records left")
        outcome = b.ctl_json("agent-state", agent="destination")["outcomes"][0]
        assert outcome["state"] == "failed", outcome
        _stays_then_moves(cluster, serial)
    finally:
        serial.close()


def test_incoming_watchdog_spares_a_moving_stream(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """B's watchdog (3 s here) never kills a migration that still moves (~10 s at 4 MiB/s)."""
    _start(cluster, **{"destination.incoming_timeout_s": 3})
    # 24 MiB of written pages, rewritten at 1 MiB/s: ~6 s at 4 MiB/s, converging.
    serial = boot_guest(cluster.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type,
                                                      wss_mib=24, rate_mib_s=1))  # fmt: skip
    try:
        result = cluster.a.ferryctl("migrate", "g1", cluster.b.uri, "--live", "--bandwidth",
                                    "4", "--json", timeout=180)  # fmt: skip
        assert result.returncode == 0, result.stderr + cluster.logs()
        final = json.loads(result.stdout.splitlines()[-1])
        assert final["data"]["stats"]["total_time_ms"] > 4000
        assert_moved(cluster, serial)
    finally:
        serial.close()
