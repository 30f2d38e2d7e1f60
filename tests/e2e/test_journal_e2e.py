"""A real migration's story in a real journald: both hosts, both agents, every
field an operator matches on, and ``ferryctl journal`` merging it by time.

The agents log to a private journald namespace (tests/journald_fixture.py),
never to a system journal. Two set-ups:

* one namespace for both hosts (``Cluster(agent_env=…)``): one ``journalctl
  FERRY_MIGRATION_ID=…`` sees the whole story;
* one namespace per host, as on two real machines: each journal holds only
  its own host's side, and ``ferryctl journal --migration`` fetches the peer's
  over TLS and merges the two; also with B's ferry-destination started the
  way the shipped socket unit starts it (dual-stack [::]:49160) (an IPv4
  peer seen as ::ffff:A.B.C.D must be recorded as A.B.C.D).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from test_migration import boot_guest

import testguest
from cluster import Cluster, HostEnv, guest_xml
from ferry.journal import MessageID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest_plugins = ("journald_fixture",)
if TYPE_CHECKING:
    from journald_fixture import PrivateJournal  # type: ignore[import-not-found]

pytestmark = pytest.mark.e2e

Entry = dict[str, Any]
PHASES = ("begin", "prepare", "perform", "finish", "confirm")
LINE = re.compile(
    r"^(?P<time>\d\d:\d\d:\d\d\.\d{3}) (?P<host>\S+)\s+(?P<agent>ferry-\S+)\s+"
    r"(?:\[(?P<phase>\w+)\] )?(?P<message>.*)$"
)


def _not_ready() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "end-to-end tests need root (network namespaces, journald)"
    for tool in ("ip", "qemu-system-x86_64", "as", "ld", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def _env_for(journal: PrivateJournal) -> dict[str, str]:
    """Agent environment that logs to (and reads from) ``journal``."""
    if journal.namespace:
        return {"FERRY_JOURNAL_NAMESPACE": journal.namespace}
    return {"FERRY_JOURNAL_SOCKET": str(journal.socket)}


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """Build test beds with a given agent environment; all torn down at the end."""
    reason = _not_ready()
    if reason:
        pytest.skip(reason)
    made: list[Cluster] = []

    def make(agent_env: dict[str, str]) -> Cluster:
        cluster = Cluster(agent_env=agent_env)
        made.append(cluster)
        return cluster

    try:
        yield make
    finally:
        report = getattr(request.node, "rep_call", None)
        for cluster in made:
            if report is not None and report.failed:
                print(cluster.logs())
            cluster.close()


@pytest.fixture
def second_journald(journald: PrivateJournal) -> Iterator[PrivateJournal]:
    """Another journald namespace: host B's own journal."""
    import journald_fixture

    if journald.namespace is None:
        pytest.skip("journald namespaces are not available here")
    journal = journald_fixture._start_namespaced(f"{journald.namespace}-b")
    if journal is None:
        pytest.skip("could not start a second journald namespace")
    try:
        yield journal
    finally:
        journald_fixture.stop_journal(journal)


# ----------------------------------------------------------------- helpers


def start_guest(host: HostEnv, tmp: Path, kernel: Path, virt_type: str) -> testguest.SerialReader:
    return boot_guest(host, tmp, guest_xml("g1", kernel, virt_type=virt_type))


def migrate(host: HostEnv, dest: HostEnv) -> tuple[subprocess.CompletedProcess[str], list[Entry]]:
    """``ferryctl migrate g1 … --live --json``: the process and its JSON events."""
    result = host.ferryctl("migrate", "g1", dest.uri, "--live", "--json", timeout=300)
    events = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    return result, events


def migration_id(events: list[Entry]) -> str:
    """The id every phase event carries (one migration: one id)."""
    ids = {e["data"]["migration_id"] for e in events if e["event"] in ("phase", "result")}
    assert len(ids) == 1, events
    return str(ids.pop())


def query(journal: PrivateJournal, mig: str) -> list[Entry]:
    return list(journal.query_json(f"FERRY_MIGRATION_ID={mig}"))


def wait_entries(
    journal: PrivateJournal, mig: str, done: Callable[[list[Entry]], bool], what: str
) -> list[Entry]:
    """``journalctl FERRY_MIGRATION_ID=mig`` once it shows what ``done`` wants."""
    deadline = time.monotonic() + 20
    while True:
        journal.sync()
        entries = query(journal, mig)
        if done(entries):
            return entries
        if time.monotonic() > deadline:
            raise AssertionError(f"journal never showed {what}: {entries}")
        time.sleep(0.1)


def has(entries: list[Entry], host: str, message_id: str) -> bool:
    return any(e.get("FERRY_HOST") == host and e.get("MESSAGE_ID") == message_id for e in entries)


def one(entries: list[Entry], host: str, message_id: str) -> Entry:
    found = [
        e for e in entries if e.get("FERRY_HOST") == host and e.get("MESSAGE_ID") == message_id
    ]
    names = MessageID.names()
    assert len(found) == 1, (host, names.get(message_id), found)
    return found[0]


def is_subsequence(wanted: list[Any], seq: list[Any]) -> bool:
    it = iter(seq)
    return all(item in it for item in wanted)


def ferryctl_story(host: HostEnv, mig: str) -> tuple[list[dict[str, str]], list[Entry]]:
    """``ferryctl journal --migration`` on ``host``'s source: (text lines parsed, JSON entries)."""
    text = host.ferryctl("journal", "--migration", mig, check=True)
    assert "warning" not in text.stderr, text.stderr
    lines = []
    for raw in text.stdout.splitlines():
        m = LINE.match(raw)
        assert m, f"unexpected journal line: {raw!r}"
        lines.append(m.groupdict())
    js = host.ferryctl("journal", "--migration", mig, "--json", check=True)
    entries = [json.loads(ln) for ln in js.stdout.splitlines()]
    return lines, entries


def check_story(lines: list[dict[str, str]], entries: list[Entry], cursors: set[str]) -> None:
    """One merged, time-ordered story with host labels, as text and as JSON."""
    # --json: one object per line, each with its host and a Unix timestamp.
    assert {e["host"] for e in entries} == {"a", "b"}, entries
    assert all(isinstance(e["timestamp"], float) for e in entries), entries
    stamps = [e["timestamp"] for e in entries]
    assert stamps == sorted(stamps), "ferryctl journal --json is not sorted by time"
    # Exactly the journal's entries of this migration, each once.
    assert len(entries) == len(cursors)
    assert {e["cursor"] for e in entries} == cursors
    # The text form is the same story in the same order, labelled by host.
    assert [(ln["host"], ln["agent"], ln["message"]) for ln in lines] == [
        (e["host"], e["agent"], e["message"]) for e in entries
    ]
    assert {ln["host"] for ln in lines} == {"a", "b"}
    assert all(ln["phase"] in PHASES for ln in lines if ln["phase"])


# ----------------------------------------------------------------- a completed migration


def test_migration_story_in_the_journal(
    journald: PrivateJournal,
    make_cluster: Callable[..., Cluster],
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    cluster = make_cluster(_env_for(journald)).start()
    a, b = cluster.a, cluster.b
    serial = start_guest(a, tmp_path, guest_kernel, virt_type)
    try:
        dom_uuid = a.ctl_json("dominfo", "g1")["uuid"]
        result, events = migrate(a, b)
        assert result.returncode == 0, result.stderr + cluster.logs()
    finally:
        serial.close()
    mig = migration_id(events)
    stats = events[-1]["data"]["stats"]

    entries = wait_entries(
        journald, mig,
        lambda es: has(es, "a", MessageID.MIGRATION_SUMMARY)
        and has(es, "b", MessageID.MIGRATION_COMPLETED),
        "the summary on a and the completion on b",
    )  # fmt: skip

    # Both hosts, both agents, every record tagged for journalctl matches.
    assert {e["FERRY_HOST"] for e in entries} == {"a", "b"}
    pairs = {(e["FERRY_HOST"], e["SYSLOG_IDENTIFIER"]) for e in entries}
    assert {("a", "ferry-source"), ("b", "ferry-destination")} <= pairs, pairs
    for e in entries:
        assert e["FERRY_MIGRATION_ID"] == mig, e
        assert e["FERRY_DOMAIN"] == "g1", e
        assert e["FERRY_DOMAIN_UUID"] == dom_uuid, e
        if e.get("MESSAGE_ID") in MessageID.names():
            assert e.get("FERRY_PHASE") in PHASES, e

    # The source's side: started, every phase, completed, summary.
    started = one(entries, "a", MessageID.MIGRATION_STARTED)
    assert (started["SYSLOG_IDENTIFIER"], started["FERRY_PHASE"]) == ("ferry-source", "begin")
    assert started["FERRY_PEER_URI"] == b.uri
    phases = [
        e["FERRY_PHASE"]
        for e in entries
        if e.get("MESSAGE_ID") == MessageID.MIGRATION_PHASE and e["FERRY_HOST"] == "a"
    ]
    assert phases == ["prepare", "perform", "finish", "confirm"]
    completed = one(entries, "a", MessageID.MIGRATION_COMPLETED)
    assert "migrated to b" in completed["MESSAGE"]
    # The summary carries the figures ferryctl reported, field by field.
    summary = one(entries, "a", MessageID.MIGRATION_SUMMARY)
    for key in ("downtime_ms", "transferred", "total_time_ms", "wall_time_ms", "result"):
        assert key in stats, stats
    for key, value in stats.items():
        assert summary[f"FERRY_SUMMARY_{key.upper()}"] == str(value), (key, summary)
        assert f"{key}={value}" in summary["MESSAGE"]
    assert summary["FERRY_SUMMARY_RESULT"] == "completed"
    assert int(summary["FERRY_SUMMARY_TRANSFERRED"]) > 0

    # The destination's side: started at prepare, completed at finish.
    dest_started = one(entries, "b", MessageID.MIGRATION_STARTED)
    assert (dest_started["SYSLOG_IDENTIFIER"], dest_started["FERRY_PHASE"]) == (
        "ferry-destination", "prepare")  # fmt: skip
    assert dest_started["FERRY_PEER_URI"] == a.uri
    dest_done = one(entries, "b", MessageID.MIGRATION_COMPLETED)
    assert dest_done["FERRY_PHASE"] == "finish"
    assert "now runs here on b" in dest_done["MESSAGE"]

    # In the order things happened across the two hosts.
    expected = [
        ("a", MessageID.MIGRATION_STARTED, "begin"),
        ("a", MessageID.MIGRATION_PHASE, "prepare"),
        ("b", MessageID.MIGRATION_STARTED, "prepare"),
        ("a", MessageID.MIGRATION_PHASE, "perform"),
        ("a", MessageID.MIGRATION_PHASE, "finish"),
        ("b", MessageID.MIGRATION_COMPLETED, "finish"),
        ("a", MessageID.MIGRATION_PHASE, "confirm"),
        ("a", MessageID.MIGRATION_COMPLETED, "confirm"),
        ("a", MessageID.MIGRATION_SUMMARY, "confirm"),
    ]
    actual = [(e["FERRY_HOST"], e.get("MESSAGE_ID"), e.get("FERRY_PHASE")) for e in entries]
    assert is_subsequence(expected, actual), actual

    # ferryctl journal, asked on either host, tells the same merged story.
    cursors = {e["__CURSOR"] for e in entries}
    stories = []
    for host in (a, b):
        lines, merged = ferryctl_story(host, mig)
        check_story(lines, merged, cursors)
        stories.append([e["cursor"] for e in merged])
    assert stories[0] == stories[1]


# ----------------------------------------------------------------- a failed migration


def test_failed_migration_records_the_reason(
    journald: PrivateJournal,
    make_cluster: Callable[..., Cluster],
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    cluster = make_cluster(_env_for(journald))
    a, b = cluster.a, cluster.b
    b.write_config(**{"testing.fail_cpu_start": True})
    cluster.start()
    serial = start_guest(a, tmp_path, guest_kernel, virt_type)
    try:
        result, events = migrate(a, b)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "(migration-failed)" in result.stderr, result.stderr
        # The guest stayed on A and runs.
        before = serial.latest()
        assert before is not None
        serial.wait_for(lambda r: r.counter >= before.counter + 2, timeout=30)
        assert a.domain_state("g1") == "running"
    finally:
        serial.close()
    mig = migration_id(events)

    entries = wait_entries(
        journald, mig,
        lambda es: has(es, "a", MessageID.MIGRATION_FAILED)
        and has(es, "b", MessageID.MIGRATION_FAILED),
        "MIGRATION_FAILED from both hosts",
    )  # fmt: skip
    reason = "fail_cpu_start"
    dest_failed = one(entries, "b", MessageID.MIGRATION_FAILED)
    assert dest_failed["SYSLOG_IDENTIFIER"] == "ferry-destination"
    assert dest_failed["FERRY_PHASE"] == "finish"
    assert reason in dest_failed["MESSAGE"] and "starting the CPUs failed" in dest_failed["MESSAGE"]
    assert dest_failed["PRIORITY"] == "3"
    src_failed = one(entries, "a", MessageID.MIGRATION_FAILED)
    assert src_failed["SYSLOG_IDENTIFIER"] == "ferry-source"
    assert reason in src_failed["MESSAGE"], src_failed
    assert src_failed["FERRY_RESULT"] == "migration-failed"
    assert src_failed["FERRY_DOMAIN"] == "g1" and src_failed["FERRY_MIGRATION_ID"] == mig
    # A failure is never reported as a success.
    for e in entries:
        assert e.get("MESSAGE_ID") not in (
            MessageID.MIGRATION_COMPLETED,
            MessageID.MIGRATION_SUMMARY,
        ), e

    lines, merged = ferryctl_story(a, mig)
    check_story(lines, merged, {e["__CURSOR"] for e in entries})
    assert sum(reason in ln["message"] for ln in lines) >= 2


# ----------------------------------------------------------------- one journal per host


def test_each_host_keeps_its_own_journal_and_ferryctl_merges_them(
    journald: PrivateJournal,
    second_journald: PrivateJournal,
    make_cluster: Callable[..., Cluster],
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    cluster = make_cluster(_env_for(journald))
    a, b = cluster.a, cluster.b
    b.agent_env = _env_for(second_journald)  # B logs to, and reads from, its own
    cluster.start()
    serial = start_guest(a, tmp_path, guest_kernel, virt_type)
    try:
        result, events = migrate(a, b)
        assert result.returncode == 0, result.stderr + cluster.logs()
    finally:
        serial.close()
    mig = migration_id(events)

    side_a = wait_entries(journald, mig, lambda es: has(es, "a", MessageID.MIGRATION_SUMMARY),
                          "the summary in a's journal")  # fmt: skip
    side_b = wait_entries(second_journald, mig,
                          lambda es: has(es, "b", MessageID.MIGRATION_COMPLETED),
                          "the completion in b's journal")  # fmt: skip
    assert {e["FERRY_HOST"] for e in side_a} == {"a"}
    assert {e["FERRY_HOST"] for e in side_b} == {"b"}

    # Asked on either host, ferryctl fetches the other host's side over TLS
    # (from its ferry-destination) and merges both by time.
    cursors = {e["__CURSOR"] for e in side_a + side_b}
    for host in (a, b):
        lines, merged = ferryctl_story(host, mig)
        check_story(lines, merged, cursors)
        labels = [e["host"] for e in merged]
        assert labels.index("b") > labels.index("a"), "the story starts on the source"


def test_merge_behind_the_dual_stack_peer_port(
    journald: PrivateJournal,
    second_journald: PrivateJournal,
    make_cluster: Callable[..., Cluster],
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    """As on two real hosts: own journals, B's ferry-destination started by
    its socket unit on [::]:49160; ``ferryctl journal`` on B must still reach
    back to A for A's side."""
    import shutil

    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed")
    cluster = make_cluster(_env_for(journald))
    a, b = cluster.a, cluster.b
    b.agent_env = _env_for(second_journald)
    a.start_agent("source")
    a.start_agent("destination")
    b.start_agent("source")
    setenv = [f"--setenv={k}={v}" for k, v in b.agent_env.items()]
    log = (b.root / "destination.log").open("ab")
    try:
        b.procs["destination"] = subprocess.Popen(
            b.ns.exec_argv([tool, "-l", "[::]:49160", *setenv,
                            str(Path(sys.executable).parent / "ferry-destination"),
                            "--config", str(b.config_path), "--debug"]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    finally:
        log.close()
    deadline = time.monotonic() + 30
    while "Listening on [::]:49160" not in b.agent_log("destination"):
        assert time.monotonic() < deadline, b.agent_log("destination")
        time.sleep(0.05)
    serial = start_guest(a, tmp_path, guest_kernel, virt_type)
    try:
        result, events = migrate(a, b)
        assert result.returncode == 0, result.stderr + cluster.logs()
    finally:
        serial.close()
    mig = migration_id(events)
    side_a = wait_entries(journald, mig, lambda es: has(es, "a", MessageID.MIGRATION_SUMMARY),
                          "the summary in a's journal")  # fmt: skip
    side_b = wait_entries(second_journald, mig,
                          lambda es: has(es, "b", MessageID.MIGRATION_COMPLETED),
                          "the completion in b's journal")  # fmt: skip
    # What B's destination recorded as the way back to A's agents.
    peer_uri = one(side_b, "b", MessageID.MIGRATION_STARTED)["FERRY_PEER_URI"]
    assert peer_uri == a.uri, peer_uri
    lines, merged = ferryctl_story(b, mig)
    check_story(lines, merged, {e["__CURSOR"] for e in side_a + side_b})


def test_client_driven_story_in_each_hosts_journal(
    journald: PrivateJournal,
    second_journald: PrivateJournal,
    make_cluster: Callable[..., Cluster],
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    """Issue 13: a client-driven migration has the same ID and fields on both hosts,
    and ``ferryctl journal --migration`` merges the two sides as for p2p."""
    cluster = make_cluster(_env_for(journald))
    a, b = cluster.a, cluster.b
    b.agent_env = _env_for(second_journald)
    for host in (a, b):
        host.write_config(**cluster.operator_config())
    cluster.start()
    serial = start_guest(a, tmp_path, guest_kernel, virt_type)
    try:
        dom_uuid = a.ctl_json("dominfo", "g1")["uuid"]
        argv = cluster.client_argv("migrate", "g1", b.uri, "--client-driven", "--live", "--json")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr + cluster.logs()
    finally:
        serial.close()
    events = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    mig = migration_id(events)
    side_a = wait_entries(journald, mig, lambda es: has(es, "a", MessageID.MIGRATION_SUMMARY),
                          "the summary in a's journal")  # fmt: skip
    side_b = wait_entries(second_journald, mig,
                          lambda es: has(es, "b", MessageID.MIGRATION_COMPLETED),
                          "the completion in b's journal")  # fmt: skip
    for e in side_a + side_b:
        assert e["FERRY_DOMAIN"] == "g1" and e["FERRY_DOMAIN_UUID"] == dom_uuid, e
        if e.get("MESSAGE_ID") in MessageID.names():
            assert e.get("FERRY_PHASE") in PHASES, e
    assert "client-driven by operator 'ops'" in one(side_b, "b",
                                                    MessageID.MIGRATION_STARTED)["MESSAGE"]
    # A's own phases: the client ran Prepare and Finish on B.
    phases = [e["FERRY_PHASE"] for e in side_a
              if e.get("MESSAGE_ID") == MessageID.MIGRATION_PHASE]  # fmt: skip
    assert phases == ["perform", "confirm"], phases
    cursors = {e["__CURSOR"] for e in side_a + side_b}
    lines, merged = ferryctl_story(a, mig)
    check_story(lines, merged, cursors)
