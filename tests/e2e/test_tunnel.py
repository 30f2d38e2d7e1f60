"""Tunnelled migration: qemu → ferry-source → TLS data connections → ferry-destination → qemu.

Two namespace hosts, real qemu, real certificates.  After every test the
agents must be back where they started: no relay thread (the OS threads
are named ``ferry-tunnel``), no extra open fd, no qemu left on B.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_migration import assert_moved, assert_stayed, boot_guest, events, migrate, refused

import testguest
from cluster import AGENT_PORT, Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e


def agent_pid(host: HostEnv, agent: str) -> int:
    """The pid of one of the host's agents (``ip netns exec`` execs it)."""
    return host.procs[agent].pid


def relay_threads(pid: int) -> int:
    """Threads of ``pid`` named ``ferry-tunnel``."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() == "ferry-tunnel":
                count += 1
        except OSError:
            continue
    return count


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


class AgentBaseline:
    """fd counts of the agents that carry tunnels, to compare after a test.

    The ferry-source that runs the guest holds its QMP connections, so when
    the guest moved, each host's ferry-source is compared with the other's
    count from before.
    """

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.pids = {
            (host.label, agent): agent_pid(host, agent)
            for host in (cluster.a, cluster.b)
            for agent in ("source", "destination")
        }
        self.fds = {key: open_fds(pid) for key, pid in self.pids.items()}

    def assert_clean(self, *, moved: bool = True, skip: tuple[str, ...] = ()) -> None:
        """No relay thread and no fd more than expected, on every agent."""
        a, b = self.cluster.a.label, self.cluster.b.label
        other = {a: b, b: a}
        for (label, agent), pid in self.pids.items():
            if f"{label}/{agent}" in skip:
                continue
            key = (other[label], agent) if moved and agent == "source" else (label, agent)
            limit = self.fds[key]
            what = f"{label}/{agent}"
            wait_until(lambda pid=pid: relay_threads(pid) == 0, 20, f"{what}: relay threads to end")
            wait_until(lambda pid=pid, limit=limit: open_fds(pid) <= limit, 20,
                       f"{what}: fds back to {limit} (now {open_fds(pid)})")  # fmt: skip


@pytest.fixture
def two_hosts(cluster: Cluster) -> Cluster:
    """Both agents on both hosts."""
    return cluster.start()


def start_guest(
    cluster: Cluster, tmp: Path, kernel: Path, virt_type: str, **xml: int
) -> testguest.SerialReader:
    return boot_guest(cluster.a, tmp, guest_xml("g1", kernel, virt_type=virt_type, **xml))


@pytest.fixture
def guest(
    two_hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    """g1 (256 MiB, all of it written) on A."""
    serial = start_guest(two_hosts, tmp_path, guest_kernel, virt_type, mem_mib=256)
    try:
        yield serial
    finally:
        serial.close()


@pytest.fixture
def dirtying_guest(
    two_hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    """A guest rewriting 64 MiB at 200 MiB/s: more than a 32 MiB/s cap can copy."""
    serial = start_guest(two_hosts, tmp_path, guest_kernel, virt_type,
                         mem_mib=256, wss_mib=64, rate_mib_s=200)  # fmt: skip
    try:
        yield serial
    finally:
        serial.close()


def final_stats(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    final = events(result)[-1]
    assert final["event"] == "result", final
    return final["data"]["stats"]  # type: ignore[index,no-any-return]


def test_tunnelled_encrypted_then_plaintext(
    guest: testguest.SerialReader, two_hosts: Cluster
) -> None:
    a, b = two_hosts.a, two_hosts.b
    baseline = AgentBaseline(two_hosts)
    result = migrate(a, "g1", b, "--tunnelled")
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    stats = final_stats(result)
    assert stats["tunnel_mode"] == "tls" and stats["tunnel_channels"] == 1, stats
    # Everything qemu sent went through the relay (the RAM and the device state).
    assert int(stats["tunnel_bytes"]) >= int(stats["transferred"]) > 200 << 20, stats  # type: ignore[call-overload]
    progress = [e for e in events(result) if e["event"] == "progress"]
    assert any("tunnel_bytes" in e["data"] for e in progress), progress  # type: ignore[operator]
    assert_moved(two_hosts, guest)
    baseline.assert_clean()

    # Plaintext needs both hosts' consent.
    refused(migrate(b, "g1", a, "--tunnelled", "--tunnel-plaintext"),
            "migration-refused", "allow_plaintext_tunnel")  # fmt: skip
    b.write_config(**{"tls.allow_plaintext_tunnel": True})
    b.stop_agent("source")
    b.start_agent("source")
    refused(migrate(b, "g1", a, "--tunnelled", "--tunnel-plaintext"),
            "auth-failed", "plaintext tunnel refused")  # fmt: skip
    wait_until(lambda: not a.qemu_pids(), 15, "A's incoming qemu to go")
    a.write_config(**{"tls.allow_plaintext_tunnel": True})
    a.stop_agent("destination")
    a.start_agent("destination")
    baseline = AgentBaseline(two_hosts)
    result = migrate(b, "g1", a, "--tunnelled", "--tunnel-plaintext")
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    assert final_stats(result)["tunnel_mode"] == "plain"
    wait_until(lambda: len(a.qemu_pids()) == 1 and not b.qemu_pids(), 15, "the move back")
    guest.reconnect(a.serial_socket("g1"))
    before = guest.latest()
    assert before is not None
    after = guest.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
    assert after.bad_pages == 0 and guest.boot_count == 1
    baseline.assert_clean()


@pytest.mark.parametrize("channels", [2, 4])
def test_tunnelled_parallel(
    channels: int, guest: testguest.SerialReader, two_hosts: Cluster
) -> None:
    baseline = AgentBaseline(two_hosts)
    result = migrate(two_hosts.a, "g1", two_hosts.b, "--tunnelled", "--parallel",
                     "--parallel-connections", str(channels))  # fmt: skip
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    stats = final_stats(result)
    # The main stream plus one data connection per multifd channel.
    assert stats["tunnel_channels"] == channels + 1, stats
    assert_moved(two_hosts, guest)
    baseline.assert_clean()
    # The qemu that arrived with multifd on goes back on a single stream:
    # both ends must agree on the capability again.
    back = migrate(two_hosts.b, "g1", two_hosts.a, "--tunnelled")
    assert back.returncode == 0, back.stderr + two_hosts.logs()
    assert final_stats(back)["tunnel_channels"] == 1
    wait_until(lambda: len(two_hosts.a.qemu_pids()) == 1 and not two_hosts.b.qemu_pids(), 15,
               "the guest back on A")  # fmt: skip


@pytest.mark.multipass
def test_tunnelled_auto_converge(
    dirtying_guest: testguest.SerialReader, two_hosts: Cluster
) -> None:
    baseline = AgentBaseline(two_hosts)
    result = migrate(two_hosts.a, "g1", two_hosts.b, "--tunnelled", "--bandwidth", "32",
                     "--auto-converge", "--auto-converge-initial", "50",
                     "--auto-converge-increment", "25")  # fmt: skip
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    stats = final_stats(result)
    assert int(stats["throttle_pct"]) >= 50, stats  # type: ignore[call-overload]
    assert_moved(two_hosts, dirtying_guest)
    baseline.assert_clean()


def start_capped_migration(cluster: Cluster) -> subprocess.Popen[str]:
    a, b = cluster.a, cluster.b
    argv = [str(Path(sys.executable).parent / "ferryctl"), "--connect", str(a.source_socket),
            "migrate", "g1", b.uri, "--live", "--json", "--tunnelled",
            "--bandwidth", "32"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: a.ctl_json("jobinfo", "g1").get("tunnel_bytes", 0) > 8 << 20
               or proc.poll() is not None, 60, "the tunnelled transfer to get going")  # fmt: skip
    assert proc.poll() is None, proc.communicate()
    return proc


@pytest.mark.multipass
def test_abort_during_tunnelled_transfer(
    dirtying_guest: testguest.SerialReader, two_hosts: Cluster
) -> None:
    a, b = two_hosts.a, two_hosts.b
    baseline = AgentBaseline(two_hosts)
    proc = start_capped_migration(two_hosts)
    try:
        assert relay_threads(agent_pid(a, "source")) >= 1
        assert relay_threads(agent_pid(b, "destination")) >= 1
        info = a.ctl_json("jobinfo", "g1")
        assert info["tunnel_bytes_per_s"] > 0, info
        a.ferryctl("jobabort", "g1", check=True)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "(job-aborted)" in err, (out, err)
    assert_stayed(two_hosts, dirtying_guest)
    baseline.assert_clean(moved=False)
    # Nothing left behind: the next tunnelled migration succeeds.
    result = migrate(a, "g1", b, "--tunnelled", "--auto-converge")
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    assert_moved(two_hosts, dirtying_guest)


def test_killing_the_destination_agent_mid_transfer(
    dirtying_guest: testguest.SerialReader, two_hosts: Cluster
) -> None:
    a, b = two_hosts.a, two_hosts.b
    baseline = AgentBaseline(two_hosts)
    proc = start_capped_migration(two_hosts)
    try:
        b.stop_agent("destination", sig=signal.SIGKILL)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "(migration-failed)" in err or "(tunnel-failed)" in err, err
    # The VM kept running on A.
    assert len(a.qemu_pids()) == 1 and a.domain_state("g1") == "running"
    before = dirtying_guest.latest()
    assert before is not None
    after = dirtying_guest.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
    assert after.bad_pages == 0 and dirtying_guest.boot_count == 1
    # B's orphaned incoming qemu is killed when its agent comes back.
    b.start_agent("destination")
    wait_until(lambda: not b.qemu_pids(), 30, "the interrupted incoming qemu on B to go")
    baseline.assert_clean(moved=False, skip=(f"{b.label}/destination",))
    assert relay_threads(agent_pid(b, "destination")) == 0
    assert a.ctl_json("jobinfo", "g1")["job"] is None


FORGE = textwrap.dedent(
    """
    import json, socket, ssl, sys
    from ferry.errors import FerryError
    from ferry.tls import TLSFiles
    from ferry.tunnel.channel import make_endpoint, open_channel
    from ferry.tunnel.wire import PREAMBLE
    host, port, pki, label = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    out = {}
    files = TLSFiles(ca=f"{pki}/ca.pem", cert=f"{pki}/{label}.pem", key=f"{pki}/{label}-key.pem")
    try:
        open_channel(make_endpoint(files, server=False), host, port,
                     token="forged-token", index=0, mode="tls")
        out["bad_token"] = "accepted"
    except FerryError as exc:
        out["bad_token"] = f"{exc} ({exc.code})"
    # No client certificate: the server must end the handshake.
    ctx = ssl.create_default_context(cafile=f"{pki}/ca.pem")
    ctx.check_hostname = False
    with socket.create_connection((host, port), timeout=10) as raw:
        raw.sendall(PREAMBLE)
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.sendall(b"x" * 16)
                data = tls.recv(16)
                out["no_cert"] = f"read {data!r}"
        except (ssl.SSLError, OSError) as exc:
            out["no_cert"] = f"refused: {exc}"
    print(json.dumps(out))
    """
)


def test_forged_data_connections_are_refused(
    guest: testguest.SerialReader, two_hosts: Cluster, tmp_path: Path
) -> None:
    a, b = two_hosts.a, two_hosts.b
    baseline = AgentBaseline(two_hosts)
    script = tmp_path / "forge.py"
    script.write_text(FORGE)
    run = subprocess.run(
        a.ns.exec_argv([sys.executable, str(script), b.ns.address, str(AGENT_PORT),
                        str(a.pki_dir), a.label]),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout.strip().splitlines()[-1]
    import json

    verdict = json.loads(out)
    assert "tunnel token unknown" in verdict["bad_token"], verdict
    assert "(auth-failed)" in verdict["bad_token"], verdict
    assert verdict["no_cert"].startswith("refused") or verdict["no_cert"] == "read b''", verdict
    assert "refused data connection" in b.agent_log("destination") or (
        "tunnel data connection refused" in b.agent_log("destination")
    )
    # The refusals changed nothing: the guest still migrates through the tunnel.
    result = migrate(a, "g1", b, "--tunnelled")
    assert result.returncode == 0, result.stderr + two_hosts.logs()
    assert_moved(two_hosts, guest)
    baseline.assert_clean()
