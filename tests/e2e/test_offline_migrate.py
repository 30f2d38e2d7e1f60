"""Offline migration end to end (``migrate --offline --persistent``): the definition moves.

B's config has a migrate hook that rewrites the domain's ``<description>``;
B must end with the hooked definition, inactive (no qemu), and A with its
domain exactly as it was (a running guest keeps running with its memory
check intact, a stopped one stays defined and stopped), until
``--undefine-source``.  Real agents, real TLS, real qemu for the running one.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_client_driven import run_mig
from test_migration import boot_guest, events, refused

from cluster import Cluster, HostEnv, guest_xml
from ferry.journal import MessageID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest_plugins = ("journald_fixture",)
if TYPE_CHECKING:
    from journald_fixture import PrivateJournal  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e

OTHER_UUID = "0f0f0f0f-1111-2222-3333-444444444444"
HOOK_NOTE = "rewritten by the migrate hook of b"
# The hook gets the XML on stdin and prints what B defines (libvirt's qemu hook ABI).
HOOK = f"""#!/bin/sh
sed -e 's#<description>[^<]*</description>##' -e 's#</name>#</name><description>{HOOK_NOTE} \
for '"$1"'</description>#'
"""


@pytest.fixture
def hosts(cluster: Cluster, tmp_path: Path) -> Cluster:
    """A and B with B's rewriting migrate hook; the operator admitted (client-driven)."""
    hook = tmp_path / "migrate-hook"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    cluster.a.write_config(**cluster.operator_config())
    cluster.b.write_config(**cluster.operator_config(), **{"hooks.migrate": str(hook)})
    return cluster.start()


def offline(
    host: HostEnv, name: str, dest: HostEnv, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``ferryctl migrate NAME B --offline --persistent --json`` (no --live)."""
    return host.ferryctl("migrate", name, dest.uri, "--offline", "--persistent", "--json",
                         *extra, timeout=60)  # fmt: skip


def listed(host: HostEnv) -> dict[str, dict[str, Any]]:
    """``ferryctl list --all`` by name."""
    return {d["name"]: d for d in host.ctl_json("list", "--all")}


def inactive_xml(host: HostEnv, name: str) -> str:
    return str(host.ctl_json("dumpxml", name, "--inactive")["xml"])


def define(host: HostEnv, tmp: Path, xml: str, name: str) -> None:
    path = tmp / f"{host.label}-{name}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)


def nothing_pending(b: HostEnv) -> None:
    """B holds no incoming migration, no waiting offline Prepare, no job, no qemu."""
    state = b.ctl_json("agent-state", agent="destination")
    assert state["incoming"] == [] and state["offline"] == [] and state["jobs"] == [], state
    assert b.qemu_pids() == []


def assert_offline_result(result: subprocess.CompletedProcess[str], source_state: str,
                          source_definition: str) -> None:  # fmt: skip
    evs = events(result)
    phases = [e["data"]["phase"] for e in evs if e["event"] == "phase"]  # type: ignore[index]
    assert phases == ["begin", "prepare", "finish", "confirm"], phases
    final = evs[-1]
    assert final["event"] == "result", final
    data: Any = final["data"]
    assert data["offline"] is True
    assert data["source_state"] == source_state
    assert data["source_definition"] == source_definition


def test_offline_migration_moves_the_definition(
    hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = hosts.a, hosts.b
    serial = boot_guest(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type))
    try:
        define(a, tmp_path, guest_xml("g2", guest_kernel, virt_type=virt_type), "g2")
        pids = a.qemu_pids()
        assert len(pids) == 1

        # -- a running domain: its definition moves, the VM stays ------------------
        result = offline(a, "g1", b)
        assert result.returncode == 0, result.stderr + hosts.logs()
        assert_offline_result(result, "running", "kept")
        assert a.qemu_pids() == pids, "the source qemu changed"
        before = serial.latest()
        assert before is not None
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert after.bad_pages == 0 and serial.boot_count == 1
        info = a.ctl_json("dominfo", "g1")
        assert info["state"] == "running" and info["persistent"] is True and info["job"] is None
        # Nothing moved: no fence on A, so A may still migrate and start it.
        assert not list((a.state_dir / "fences").glob("*")), "a fence was written"
        on_b = listed(b)
        assert on_b["g1"]["state"] == "shut off" and on_b["g1"]["persistent"] is True
        assert on_b["g1"]["uuid"] == info["uuid"]
        assert f"{HOOK_NOTE} for g1" in inactive_xml(b, "g1")
        assert HOOK_NOTE not in inactive_xml(a, "g1")
        nothing_pending(b)

        # The same UUID again: B updates its inactive definition.
        again = offline(a, "g1", b)
        assert again.returncode == 0, again.stderr + hosts.logs()
        assert listed(b)["g1"]["state"] == "shut off"

        # -- a stopped domain (no --live), undefining the source --------------------
        result = offline(a, "g2", b, "--undefine-source")
        assert result.returncode == 0, result.stderr + hosts.logs()
        assert_offline_result(result, "shut off", "undefined")
        assert "g2" not in listed(a)
        assert listed(b)["g2"]["state"] == "shut off"
        assert f"{HOOK_NOTE} for g2" in inactive_xml(b, "g2")
        nothing_pending(b)
        # B can start what it received (and stop it again).
        b.ferryctl("start", "g2", check=True)
        assert b.domain_state("g2") == "running"
        b.ferryctl("destroy", "g2", check=True)

        # -- refusals: nothing changes on either host ---------------------------------
        before_b = listed(b)
        define(a, tmp_path, guest_xml("g3", guest_kernel, virt_type=virt_type), "g3")
        define(b, tmp_path, guest_xml("g3", guest_kernel, virt_type=virt_type,
                                      uuid=OTHER_UUID), "g3")  # fmt: skip
        refused(offline(a, "g3", b), "domain-exists", "another uuid", OTHER_UUID)
        assert listed(b)["g3"]["uuid"] == OTHER_UUID
        assert HOOK_NOTE not in inactive_xml(b, "g3")
        # B's hook says no: B defines nothing.
        hook = tmp_path / "migrate-hook"
        hook.write_text("#!/bin/sh\ncat >/dev/null\necho 'no definitions on sundays' >&2\nexit 1\n")
        define(a, tmp_path, guest_xml("g4", guest_kernel, virt_type=virt_type), "g4")
        refused(offline(a, "g4", b), "hook-refused", "no definitions on sundays")
        assert "g4" not in listed(b) and listed(a)["g4"]["state"] == "shut off"
        hook.write_text(HOOK)
        refused(offline(a, "g1", b, "--copy-storage-all"), "flags-invalid",
                "cannot copy storage")  # fmt: skip
        missing = a.ferryctl("migrate", "g3", b.uri, "--offline", timeout=60)
        refused(missing, "flags-invalid", "PERSIST_DEST")
        refused(offline(a, "g1", b, "--live"), "flags-invalid", "LIVE")
        nothing_pending(b)
        assert {k: v["uuid"] for k, v in listed(b).items()} == {
            **{k: v["uuid"] for k, v in before_b.items()}, "g3": OTHER_UUID}

        # -- --undefine-source of a running domain: it runs on, transient ----------------
        result = offline(a, "g1", b, "--undefine-source")
        assert result.returncode == 0, result.stderr + hosts.logs()
        assert_offline_result(result, "running", "undefined")
        info = a.ctl_json("dominfo", "g1")
        assert info["state"] == "running" and info["persistent"] is False
        assert a.qemu_pids() == pids
        # A transient domain has no definition to move.
        refused(offline(a, "g1", b), "migration-refused", "transient", "'g1'")
        nothing_pending(b)
        before = serial.latest()
        assert before is not None
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert after.bad_pages == 0 and serial.boot_count == 1
    finally:
        serial.close()


def test_client_driven_offline_migration(
    hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = hosts.a, hosts.b
    define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type), "g1")
    uuid = listed(a)["g1"]["uuid"]
    # Renamed on the way (--dname): B defines g9; A keeps g1.
    result = run_mig(hosts, "--offline", "--persistent", "--dname", "g9", "--json", timeout=60)
    assert result.returncode == 0, result.stderr + hosts.logs()
    assert_offline_result(result, "shut off", "kept")
    assert listed(b)["g9"]["uuid"] == uuid and "g1" not in listed(b)
    assert f"{HOOK_NOTE} for g9" in inactive_xml(b, "g9")
    # B has that UUID as g9 now: g1 is refused there, and A's Begin is cancelled.
    refused(run_mig(hosts, "--offline", "--persistent", "--undefine-source", timeout=60),
            "domain-exists", f"uuid {uuid} is defined there as 'g9'")  # fmt: skip
    assert listed(a)["g1"]["state"] == "shut off" and "g1" not in listed(b)
    nothing_pending(b)
    assert not list((a.run_dir / "jobs").glob("*.job"))
    b.ferryctl("undefine", "g9", check=True)
    result = run_mig(hosts, "--offline", "--persistent", "--undefine-source", "--json",
                     timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr + hosts.logs()
    assert_offline_result(result, "shut off", "undefined")
    assert "g1" not in listed(a)
    assert listed(b)["g1"]["state"] == "shut off"
    assert f"{HOOK_NOTE} for g1" in inactive_xml(b, "g1")
    nothing_pending(b)
    assert not list((a.run_dir / "jobs").glob("*.job"))


def test_offline_migration_in_the_journal(
    request: pytest.FixtureRequest, journald: PrivateJournal, guest_kernel: Path,
    virt_type: str, tmp_path: Path,
) -> None:  # fmt: skip
    """Both hosts journal the offline migration under its FERRY_MIGRATION_ID."""
    env = ({"FERRY_JOURNAL_NAMESPACE": journald.namespace} if journald.namespace
           else {"FERRY_JOURNAL_SOCKET": str(journald.socket)})  # fmt: skip
    cluster = Cluster(agent_env=env)
    try:
        cluster.start()
        a, b = cluster.a, cluster.b
        define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type), "g1")
        result = offline(a, "g1", b)
        assert result.returncode == 0, result.stderr + cluster.logs()
        mig = str(events(result)[-1]["data"]["migration_id"])  # type: ignore[index]
        wanted = {(host, MessageID.MIGRATION_STARTED) for host in ("a", "b")} | {
            (host, MessageID.MIGRATION_COMPLETED) for host in ("a", "b")}
        deadline = time.monotonic() + 20
        while True:
            journald.sync()
            entries = list(journald.query_json(f"FERRY_MIGRATION_ID={mig}"))
            seen = {(e.get("FERRY_HOST"), e.get("MESSAGE_ID")) for e in entries}
            if wanted <= seen:
                break
            assert time.monotonic() < deadline, f"journal never showed both hosts: {entries}"
            time.sleep(0.1)
        assert all(e.get("FERRY_DOMAIN") == "g1" for e in entries), entries
        b_phases = {e.get("FERRY_PHASE") for e in entries if e.get("FERRY_HOST") == "b"}
        assert {"prepare", "finish"} <= b_phases, b_phases
        a_phases = {e.get("FERRY_PHASE") for e in entries if e.get("FERRY_HOST") == "a"}
        assert {"begin", "prepare", "finish", "confirm"} <= a_phases, a_phases
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(cluster.logs())
        cluster.close()
