"""Client-driven migration end to end: ferryctl runs the five phases itself.

ferryctl runs in host A's network namespace with an operator certificate
(``ferryctl pki client ops``): Begin/Perform/Confirm on A's admin socket,
Prepare/Finish on B's agent port over TLS.  Real agents, real qemu.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_migration import assert_moved, assert_stayed, boot_guest, events, refused

import testguest
from cluster import Cluster, guest_xml, wait_until

pytestmark = pytest.mark.e2e

GRACE_S = 3


@pytest.fixture
def client_hosts(cluster: Cluster) -> Cluster:
    """Both hosts admit the operator 'ops' for the client-driven ops; short grace."""
    for host in (cluster.a, cluster.b):
        host.write_config(**cluster.operator_config(), **{"migration.client_grace_s": GRACE_S})
    return cluster.start()


@pytest.fixture
def guest(
    client_hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    serial = boot_guest(client_hosts.a, tmp_path, guest_xml("g1", guest_kernel,
                                                             virt_type=virt_type))  # fmt: skip
    try:
        yield serial
    finally:
        serial.close()


def test_client_driven_live_migration_moves_the_guest(
    guest: testguest.SerialReader, client_hosts: Cluster
) -> None:
    result = run_mig(client_hosts, "--live", "--json")
    assert result.returncode == 0, result.stderr + client_hosts.logs()
    evs = events(result)
    phases = [e["data"]["phase"] for e in evs if e["event"] == "phase"]  # type: ignore[index]
    assert phases == ["begin", "prepare", "perform", "finish", "confirm"], phases
    assert_moved(client_hosts, guest)


def run_mig(cluster: Cluster, *args: str, dest: str | None = None, fault: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``ferryctl migrate g1 DEST --client-driven ARGS`` from host A."""
    argv = cluster.client_argv("migrate", "g1", dest or cluster.b.uri, "--client-driven", *args,
                               fault=fault)  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def nothing_held(cluster: Cluster) -> bool:
    """No job record on either host, no incoming migration or token on B."""
    a_jobs = list((cluster.a.run_dir / "jobs").glob("*.job"))
    b_jobs = list((cluster.b.run_dir / "jobs").glob("*.job"))
    state = cluster.b.ctl_json("agent-state", agent="destination")
    return not a_jobs and not b_jobs and not state["incoming"] and state["tokens"] == 0


@pytest.mark.parametrize(
    ("flags", "dest_name"),
    [
        (("--persistent", "--undefine-source"), "g1"),
        (("--dname", "g2"), "g2"),
        (("--tunnelled",), "g1"),
        (("--tunnelled", "--parallel", "--parallel-connections", "2"), "g1"),
        (("--auto-converge",), "g1"),
    ],
    ids=["persistent-undefine-source", "dname", "tunnelled", "tunnelled-parallel",
         "auto-converge"],
)
def test_client_driven_flag_combinations(
    guest: testguest.SerialReader, client_hosts: Cluster, flags: tuple[str, ...], dest_name: str
) -> None:
    a, b = client_hosts.a, client_hosts.b
    result = run_mig(client_hosts, "--live", "--json", *flags)
    assert result.returncode == 0, result.stderr + client_hosts.logs()
    final = events(result)[-1]
    assert final["event"] == "result", final
    stats = final["data"]["stats"]  # type: ignore[index]
    if "--tunnelled" in flags:
        assert stats["tunnel_bytes"] > 0, stats
    assert_moved(client_hosts, guest, dest_name=dest_name)
    assert nothing_held(client_hosts)
    if "--persistent" in flags:
        assert b.ctl_json("dominfo", "g1")["persistent"] is True
        # --undefine-source: A forgot the domain altogether.
        assert a.domain_state("g1") is None
        listed = a.ctl_json("list", "--all")
        assert "g1" not in json.dumps(listed), listed


def test_client_driven_refusals_leave_the_guest_where_it_was(
    guest: testguest.SerialReader, client_hosts: Cluster, tmp_path: Path
) -> None:
    a, b = client_hosts.a, client_hosts.b
    # Refused where p2p refuses: the same host, an ABI-changing --xml, a snapshot.
    refused(run_mig(client_hosts, "--live", dest=a.uri), "migration-refused", "same host")
    xml = a.ctl_json("dumpxml", "g1")["xml"]
    changed = tmp_path / "bigger.xml"
    changed.write_text(xml.replace("<vcpu>1</vcpu>", "<vcpu>2</vcpu>").replace(
        "<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>2</vcpu>"))  # fmt: skip
    refused(run_mig(client_hosts, "--live", "--xml", str(changed)), "abi-unstable", "vcpu")
    a.ferryctl("snapshot-create-as", "g1", "s1", check=True)
    refused(run_mig(client_hosts, "--live"), "migration-refused", "1 snapshot")
    a.ferryctl("snapshot-delete", "g1", "s1", check=True)
    # What this mode cannot do is refused by name, before anything starts.
    refused(run_mig(client_hosts, "--live", "--postcopy"), "migration-refused",
            "--postcopy is not supported in client-driven mode")  # fmt: skip
    refused(run_mig(client_hosts, "--live", "--deadline", "30"), "migration-refused",
            "--deadline is not supported in client-driven mode")  # fmt: skip
    # No operator certificate: said before anything is asked of either agent.
    bare = subprocess.run(a.ns.exec_argv(a.ferryctl_argv("migrate", "g1", b.uri, "--live",
                                                         "--client-driven")),
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})  # fmt: skip
    assert bare.returncode == 1 and "needs an operator certificate" in bare.stderr, bare.stderr
    assert_stayed(client_hosts, guest)
    assert nothing_held(client_hosts)


def test_operator_without_acl_rule_is_refused_by_the_destination(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """B admits the operator on its port but has no [[acl]] rule for prepare: refused,
    and A (which had taken the job in Begin) gives the domain back at once."""
    cluster.a.write_config(**cluster.operator_config())
    cluster.b.write_config(**{"peers.operators": [Cluster.OPERATOR]})
    cluster.start()
    serial = boot_guest(cluster.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))
    try:
        refused(run_mig(cluster, "--live"), "access-denied", "operator 'ops'", "'prepare'")
        assert_stayed(cluster, serial)
        assert nothing_held(cluster)
    finally:
        serial.close()


def settled(cluster: Cluster) -> None:
    """Wait until both agents have ended the orphaned migration (past their grace)."""
    wait_until(lambda: nothing_held(cluster), GRACE_S + 60, "both agents to end the migration")


@pytest.mark.parametrize(
    ("point", "runs_on"),
    [
        ("after-begin", "a"),
        ("after-prepare", "a"),
        ("during-perform", "a"),
        ("after-perform", "a"),
        ("after-finish", "b"),
    ],
)
def test_client_killed_leaves_one_copy_and_nothing_held(
    guest: testguest.SerialReader, client_hosts: Cluster, point: str, runs_on: str
) -> None:
    """kill -9 of ferryctl itself at each point of the protocol: after the grace, both
    agents end the migration alone; one copy runs, nothing is held, and the domain
    migrates again at once."""
    a, b = client_hosts.a, client_hosts.b
    # Capped so that Perform is still running when the client dies in it.
    cap = ("--bandwidth", "8") if point == "during-perform" else ()
    result = run_mig(client_hosts, "--live", "--json", *cap, fault=point)
    assert result.returncode == -9, (result.returncode, result.stderr)
    migration_id = next(str(e["data"]["migration_id"]) for e in events(result)  # type: ignore[index]
                        if e["event"] == "phase")  # fmt: skip
    settled(client_hosts)
    if runs_on == "a":
        assert_stayed(client_hosts, guest)
        assert a.ctl_json("dominfo", "g1")["state"] == "running"
    else:
        wait_until(lambda: not a.qemu_pids(), 30, "A's copy to be stopped")
        assert_moved(client_hosts, guest)
    # The journal tells why, under the migration's ID.
    log = a.agent_log("source")
    assert f"no client took over migration {migration_id}" in log, log[-3000:]
    # The next migration works at once (p2p, back to or on from where it runs).
    source, dest = (a, b) if runs_on == "a" else (b, a)
    again = source.ferryctl("migrate", "g1", dest.uri, "--live", "--json", timeout=120)
    assert again.returncode == 0, again.stderr + client_hosts.logs()
    serial_host = dest
    guest.reconnect(serial_host.serial_socket("g1"))
    report = guest.wait_for(lambda r: r.counter > 2, timeout=30)
    assert report.bad_pages == 0 and guest.boot_count == 1


def test_second_client_gets_job_busy_naming_the_migration(
    guest: testguest.SerialReader, client_hosts: Cluster
) -> None:
    """The job is held from Begin to Confirm: a second migration is refused with
    job-busy naming the first one's ID, and the first completes."""
    a, b = client_hosts.a, client_hosts.b
    # Capped (~8 s for 128 MiB) so that it is still running while the others try;
    # the downtime limit lets the guest's 16 MiB working set converge at that rate.
    argv = client_hosts.client_argv("migrate", "g1", b.uri, "--client-driven", "--live",
                                    "--json", "--bandwidth", "16",
                                    "--max-downtime", "2000")  # fmt: skip
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: a.ctl_json("jobinfo", "g1")["job"] is not None, 30,
                   "the first migration to hold the job")  # fmt: skip
        second = a.ferryctl("migrate", "g1", b.uri, "--live")
        refused(second, "job-busy", "is busy: migration")
        third = subprocess.run(client_hosts.client_argv("migrate", "g1", b.uri,
                                                        "--client-driven", "--live"),
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        refused(third, "job-busy", "is busy: migration")
        out, err = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err + client_hosts.logs()
    migration_id = next(str(e["data"]["migration_id"]) for e in
                        (json.loads(x) for x in out.splitlines() if x.startswith("{"))
                        if e["event"] == "phase")  # fmt: skip
    assert migration_id in second.stderr and migration_id in third.stderr, second.stderr
    assert_moved(client_hosts, guest)


def test_migrate_recover_takes_over_an_orphan_and_finishes_it(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """The client dies after Prepare; within the grace ``ferryctl migrate-recover`` takes
    the migration over on both agents and drives it to the end: the guest moves."""
    for host in (cluster.a, cluster.b):
        host.write_config(**cluster.operator_config(), **{"migration.client_grace_s": 60})
    cluster.start()
    serial = boot_guest(cluster.a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))
    try:
        result = run_mig(cluster, "--live", "--json", fault="after-prepare")
        assert result.returncode == -9, result.stderr
        migration_id = next(str(e["data"]["migration_id"]) for e in events(result)  # type: ignore[index]
                            if e["event"] == "phase")  # fmt: skip
        # Held on both hosts meanwhile: B still has the incoming qemu.
        assert len(cluster.b.qemu_pids()) == 1
        recover = subprocess.run(cluster.client_argv("migrate-recover", "g1", "--json"),
                                 capture_output=True, text=True, timeout=180)  # fmt: skip
        assert recover.returncode == 0, recover.stderr + cluster.logs()
        final = json.loads(recover.stdout.splitlines()[-1])
        assert final["event"] == "result" and final["data"]["migration_id"] == migration_id
        assert_moved(cluster, serial)
        assert nothing_held(cluster)
    finally:
        serial.close()


def test_ctrl_c_aborts_a_client_driven_migration_cleanly(
    guest: testguest.SerialReader, client_hosts: Cluster
) -> None:
    """Ctrl-C asks the source to abort Perform; ferryctl then cancels Finish and
    Confirm itself, so nothing waits for the grace period."""
    a = client_hosts.a
    argv = client_hosts.client_argv("migrate", "g1", client_hosts.b.uri, "--client-driven",
                                    "--live", "--bandwidth", "8")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: a.ctl_json("jobinfo", "g1").get("transferred", 0) > 4 << 20, 60,
                   "the transfer to get going")  # fmt: skip
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, (out, err)
    assert "aborting the migration" in err and "(job-aborted)" in err, err
    assert "resumed on the source" in err, err
    # Ended by the client's own Finish and Confirm, not by the grace.
    assert nothing_held(client_hosts)
    assert "no client took over" not in a.agent_log("source")
    assert_stayed(client_hosts, guest)
