"""ferry.journal and ferry.sdnotify against a real journald, a real notify socket
and a real ``systemd-socket-activate``.

The journald is a private namespaced instance (see tests/journald_fixture.py),
so nothing here reads or writes a system journal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ferry import journal as fj
from ferry import sdnotify

# tests/ holds the reusable journald fixture. It is registered as a plugin
# rather than imported: pytest then rewrites its asserts, and linters see no
# fixture name redefined by the test arguments.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest_plugins = ("journald_fixture",)
if TYPE_CHECKING:
    from journald_fixture import PrivateJournal  # type: ignore[import-not-found]

HERE = str(Path(__file__).resolve())


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """setup_logging() changes the root logger; put it back after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


def _setup(journal: PrivateJournal, agent: str = "ferry-source", host: str = "host-a") -> None:
    if journal.namespace:
        fj.setup_logging(agent, host=host, namespace=journal.namespace, level=logging.DEBUG)
    else:
        fj.setup_logging(agent, host=host, level=logging.DEBUG)


def _read(journal: PrivateJournal, **kw: str) -> list[dict[str, object]]:
    return fj.read_journal(namespace=journal.namespace, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------- journal


def test_journalctl_sees_all_fields(journald: PrivateJournal) -> None:
    _setup(journald)
    mig, dom_uuid = _new_id(), uuid.uuid4()
    log = logging.getLogger("ferry.test.journal")
    with fj.LogContext(domain="g1", uuid=dom_uuid, migration_id=mig):
        fj.log_event(
            log,
            fj.MessageID.MIGRATION_PHASE,
            "entering perform",
            phase="perform",
            job="migration-out",
            peer="host-b",
            downtime_ms=12,
        )
        log.warning("slow convergence")
    entries = journald.wait_for(lambda: journald.query_json(f"FERRY_MIGRATION_ID={mig}"), count=2)
    assert [e["MESSAGE"] for e in entries] == ["entering perform", "slow convergence"]
    ev, warn = entries
    assert ev["PRIORITY"] == "6" and warn["PRIORITY"] == "4"
    assert ev["SYSLOG_IDENTIFIER"] == "ferry-source"
    assert ev["MESSAGE_ID"] == fj.MessageID.MIGRATION_PHASE
    assert ev["CODE_FILE"] == HERE  # the caller, not journal.py
    assert ev["CODE_FUNC"] == "test_journalctl_sees_all_fields"
    assert int(ev["CODE_LINE"]) > 0
    assert ev["LOGGER"] == "ferry.test.journal"
    assert ev["FERRY_HOST"] == "host-a"
    assert ev["FERRY_DOMAIN"] == "g1"
    assert ev["FERRY_DOMAIN_UUID"] == str(dom_uuid)
    assert ev["FERRY_MIGRATION_ID"] == mig
    assert ev["FERRY_PHASE"] == "perform"
    assert ev["FERRY_JOB"] == "migration-out"
    assert ev["FERRY_PEER"] == "host-b"
    assert ev["FERRY_DOWNTIME_MS"] == "12"
    # Per-call fields do not leak into the next record.
    assert "FERRY_PHASE" not in warn and "MESSAGE_ID" not in warn
    assert warn["FERRY_MIGRATION_ID"] == mig


def test_read_journal_filters_and_merges(journald: PrivateJournal) -> None:
    _setup(journald, agent="ferry-source", host="host-a")
    mig = _new_id()
    log = logging.getLogger("ferry.test.read")
    t0 = time.time()
    fj.log_event(log, fj.MessageID.MIGRATION_STARTED, "begin", domain="g2", migration_id=mig)
    fj.log_event(log, fj.MessageID.DOMAIN_STARTED, "unrelated", domain="other-dom")
    try:
        raise RuntimeError("qemu went away")
    except RuntimeError:
        fj.log_event(
            log,
            fj.MessageID.MIGRATION_FAILED,
            "perform failed",
            domain="g2",
            migration_id=mig,
            level=logging.ERROR,
            exc_info=True,
        )
    _setup(journald, agent="ferry-destination", host="host-b")
    fj.log_event(
        log, fj.MessageID.MIGRATION_ABORTED, "finish: aborted", domain="g2", migration_id=mig
    )

    entries = journald.wait_for(lambda: _read(journald, migration_id=mig), count=3)
    assert [e["message_id"] for e in entries] == [
        fj.MessageID.MIGRATION_STARTED,
        fj.MessageID.MIGRATION_FAILED,
        fj.MessageID.MIGRATION_ABORTED,
    ]
    first, failed, aborted = entries
    json.dumps(entries)  # JSON-safe
    assert isinstance(first["timestamp"], float) and first["timestamp"] >= t0 - 1
    assert first["host"] == "host-a" and first["agent"] == "ferry-source"
    assert aborted["host"] == "host-b" and aborted["agent"] == "ferry-destination"
    assert first["message"] == "begin" and first["priority"] == 6
    assert first["FERRY_DOMAIN"] == "g2" and first["FERRY_MIGRATION_ID"] == mig
    assert failed["priority"] == 3
    assert str(failed["message"]).startswith("perform failed\nTraceback")
    assert "RuntimeError: qemu went away" in str(failed["message"])

    # Domain filter, both filters together, since.
    by_dom = _read(journald, domain="g2")
    assert {e["FERRY_MIGRATION_ID"] for e in by_dom} >= {mig}
    assert all(e["FERRY_DOMAIN"] == "g2" for e in by_dom)
    assert _read(journald, domain="other-dom", migration_id=mig) == []
    later = fj.read_journal(
        migration_id=mig, since=float(aborted["timestamp"]), namespace=journald.namespace
    )
    assert [e["message"] for e in later] == ["finish: aborted"]

    # merge_entries: by timestamp, duplicates dropped.
    src = [e for e in entries if e["agent"] == "ferry-source"]
    dst = [e for e in entries if e["agent"] == "ferry-destination"]
    assert fj.merge_entries(dst, src, src) == entries


def test_merge_entries_pure() -> None:
    a = [
        {"timestamp": 1.0, "host": "a", "cursor": "x1"},
        {"timestamp": 3.0, "host": "a", "cursor": "x2"},
    ]
    b = [{"timestamp": 2.0, "host": "b", "cursor": "x1"}, {"timestamp": 0.5, "host": "b"}]
    merged = fj.merge_entries(a, b)
    assert [e["timestamp"] for e in merged] == [0.5, 1.0, 2.0, 3.0]


def test_large_entry_via_memfd(journald: PrivateJournal) -> None:
    """Entries larger than a datagram go as a sealed memfd, like libsystemd does."""
    mig = _new_id()
    sender = fj._NativeSender(journald.socket)
    try:
        big = "x" * 300_000
        sender._send_memfd(
            fj._encode_native(
                {"MESSAGE": "big\n" + big, "FERRY_MIGRATION_ID": mig, "PRIORITY": "6"}
            )
        )
    finally:
        sender.close()
    [entry] = journald.wait_for(lambda: _read(journald, migration_id=mig))
    assert entry["message"] == "big\n" + big


def test_systemd_journal_send_path(journald: PrivateJournal, tmp_path: Path) -> None:
    """The default transport (systemd.journal.send → /run/systemd/journal/socket).

    sd_journal_send() only knows the default socket path, so the child runs in
    a private mount namespace where /run/systemd/journal is our private
    journald's directory. The system's /run is not touched.
    """
    if journald.namespace is None:
        pytest.skip("the fixture is using the default journal; covered by the other tests")
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) missing")
    mig = _new_id()
    child = textwrap.dedent(
        f"""
        import logging
        from ferry import journal as fj
        fj.setup_logging("ferry-destination", host="host-b")
        handler = logging.getLogger().handlers[-1]
        assert type(handler._sender).__name__ == "_SystemdSender", handler
        fj.log_event(logging.getLogger("child"), fj.MessageID.AGENT_READY,
                     "ready\\nsecond line", migration_id="{mig}", phase="none")
        """
    )
    script = f"""set -e
mkdir -p {tmp_path}/j
mount --bind {journald.socket.parent} {tmp_path}/j
mount -t tmpfs tmpfs /run/systemd
mkdir /run/systemd/journal
mount --bind {tmp_path}/j /run/systemd/journal
exec "$0" -c "$1"
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_JOURNAL")}
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            sys.executable,
            child,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr + proc.stdout:
        pytest.skip(f"no mount namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    [entry] = journald.wait_for(lambda: journald.query_json(f"FERRY_MIGRATION_ID={mig}"))
    assert entry["MESSAGE"] == "ready\nsecond line"
    assert entry["MESSAGE_ID"] == fj.MessageID.AGENT_READY
    assert entry["SYSLOG_IDENTIFIER"] == "ferry-destination"
    assert entry["FERRY_HOST"] == "host-b"
    assert entry["CODE_FUNC"] == "<module>"


# ----------------------------------------------------------------- stderr fallback

LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ferry-source\[(\d+)\] INFO "
    r"\[dom=g1 mig=abcd phase=perform\] message$"
)


def test_stderr_fallback_when_socket_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fj.setup_logging("ferry-source", journal_socket=tmp_path / "no-such-socket")
    log = logging.getLogger("ferry.test.stderr")
    with fj.LogContext(domain="g1", migration_id="abcd"):
        log.info("message", extra={"ferry_fields": {"FERRY_PHASE": "perform"}})
        fj.log_event(log, fj.MessageID.MIGRATION_PHASE, "message", phase="perform")
    log.warning("no context")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3, lines
    for line in lines[:2]:
        m = LINE_RE.match(line)
        assert m, line
        assert int(m.group(1)) == os.getpid()
    assert re.match(r"^\S+ \S+ ferry-source\[\d+\] WARNING no context$", lines[2])


def test_stderr_env_override_and_forcing(
    monkeypatch: pytest.MonkeyPatch, journald: PrivateJournal, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(fj.ENV_SOCKET, "none")
    fj.setup_logging("ferry-source")
    assert isinstance(logging.getLogger().handlers[-1], fj.StderrHandler)
    # The env names a socket that exists: journal.
    monkeypatch.setenv(fj.ENV_SOCKET, str(journald.socket))
    fj.setup_logging("ferry-source")
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, fj.JournalHandler | fj.StderrHandler)
    ]
    assert len(handlers) == 1 and isinstance(handlers[0], fj.JournalHandler)
    # stderr=True wins over an existing socket.
    fj.setup_logging("ferry-source", stderr=True)
    assert isinstance(logging.getLogger().handlers[-1], fj.StderrHandler)
    logging.getLogger("x").info("to stderr")
    assert "ferry-source[" in capsys.readouterr().err


def test_journal_send_failure_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Forced journal whose socket does not exist: each record lands on stderr.
    fj.setup_logging("ferry-source", stderr=False, journal_socket=tmp_path / "gone")
    with fj.LogContext(migration_id="m1"):
        logging.getLogger("x").error("journald is down")
    err = capsys.readouterr().err
    assert "ferry-source[" in err and "ERROR [mig=m1] journald is down" in err


async def test_context_follows_asyncio_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fj.setup_logging("ferry-source", journal_socket=tmp_path / "none")
    log = logging.getLogger("ferry.test.tasks")

    async def migration(name: str, mig: str) -> None:
        fj.bind_context(domain=name, migration_id=mig)  # this task only
        for phase in ("begin", "perform", "confirm"):
            with fj.LogContext(phase=phase):
                await asyncio.sleep(0)
                log.info("step")

    await asyncio.gather(migration("vm1", "m1"), migration("vm2", "m2"))
    log.info("outside")
    lines = capsys.readouterr().err.splitlines()
    assert sum("[dom=vm1 mig=m1 phase=" in ln for ln in lines) == 3
    assert sum("[dom=vm2 mig=m2 phase=" in ln for ln in lines) == 3
    assert lines[-1].endswith("INFO outside")
    assert fj.current_context() == {}


def test_field_names() -> None:
    assert fj._fields({"domain": "d", "uuid": 1, "bytes-sent": 3, "x": None}) == {
        "FERRY_DOMAIN": "d",
        "FERRY_DOMAIN_UUID": "1",
        "FERRY_BYTES_SENT": "3",
    }
    assert fj._field_name("ferry_job") == "FERRY_JOB"
    assert len(fj._field_name("a" * 100)) == 64


def test_message_ids_stable_and_unique() -> None:
    names = fj.MessageID.names()
    assert len(names) == 11
    for mid, name in names.items():
        assert re.fullmatch(r"[0-9a-f]{32}", mid), name
        assert getattr(fj.MessageID, name) == mid
    # Hard-coded: changing one breaks every saved journalctl filter.
    assert fj.MessageID.MIGRATION_COMPLETED == "72b172e482e245d49b07672ac9d8b453"


# ----------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_notify_messages(notify_socket: socket.socket) -> None:
    assert fj.notify("READY=1")
    assert notify_socket.recv(4096) == b"READY=1"
    assert sdnotify.status("migrating g1 (perform)")
    assert notify_socket.recv(4096) == b"STATUS=migrating g1 (perform)"
    assert sdnotify.watchdog_ping()
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.ready("serving 0 domains")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 0 domains"
    assert sdnotify.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ferry-test-notify-{os.getpid()}-{_new_id()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert fj.notify("READY=1\nSTATUS=up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_notify_without_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert fj.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert fj.notify("READY=1") is False


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert fj.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert fj.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert fj.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert fj.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert fj.watchdog_interval() is None


async def test_run_watchdog_pings(notify_socket: socket.socket) -> None:
    notify_socket.setblocking(False)
    task = asyncio.create_task(sdnotify.run_watchdog(0.04))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = []
    while True:
        try:
            pings.append(notify_socket.recv(64))
        except BlockingIOError:
            break
    assert len(pings) >= 3 and set(pings) == {b"WATCHDOG=1"}


# ----------------------------------------------------------------- socket activation


def test_listen_fds_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert fj.listen_fds() == []


CHILD = textwrap.dedent(
    """
    import json, os, socket
    from ferry.journal import listen_fds
    env_before = os.environ.get("LISTEN_FDS")
    socks = listen_fds()
    s = socks[0]
    conn, _ = s.accept()
    conn.sendall(json.dumps({
        "count": len(socks),
        "fileno": s.fileno(),
        "family": int(s.family),
        "type": int(s.type),
        "addr": list(s.getsockname()),
        "env_before": env_before,
        "env_after": os.environ.get("LISTEN_FDS"),
    }).encode())
    conn.close()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_listen_fds_under_systemd_socket_activate() -> None:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate missing")
    port = _free_port()
    proc = subprocess.Popen(
        [tool, "-l", f"127.0.0.1:{port}", sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # systemd-socket-activate binds, then starts the child on the first
        # connection (like a socket unit): connect until the port is up.
        deadline = time.monotonic() + 10
        while True:
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        with conn:
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
        info = json.loads(data)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert info["count"] == 1
    assert info["fileno"] == 3  # SD_LISTEN_FDS_START
    assert info["family"] == socket.AF_INET
    assert info["type"] == socket.SOCK_STREAM
    assert info["addr"] == ["127.0.0.1", port]
    assert info["env_before"] == "1"
    assert info["env_after"] is None  # unset so qemu children do not inherit it
