"""The agents under systemd's service protocol, without systemd: real agents,
real qemu, a real notify socket and a real ``systemd-socket-activate``.

* ``Type=notify`` + ``WatchdogSec=``: READY=1 once the agent serves (and, for
  ferry-source, after it reconnected its running domains), STATUS= lines,
  WATCHDOG=1 at half the interval, STOPPING=1 on SIGTERM, exit status 0;
  every datagram from the agent's own pid (``NotifyAccess=main``).
* ``ferry-destination.socket``: the agent started on the first connection to
  a socket it did not open serves a live migration on it.
* ``KillMode=process``: stopping and restarting both agents of a host while a
  VM runs leaves the VM running, and the restarted agents take it over.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_migration import boot_guest

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
WATCHDOG_USEC = 2_000_000


# ----------------------------------------------------------------- helpers


def agent_binary(agent: str) -> str:
    """The console script of ``ferry-<agent>`` in this venv."""
    path = VENV_BIN / f"ferry-{agent}"
    return str(path) if path.exists() else f"ferry-{agent}"


def spawn(
    host: HostEnv, agent: str, argv: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Run ``argv`` in the host's namespace as its ``agent``, logging to the
    agent's log file; registered in ``host.procs`` so that the test bed's
    teardown stops it whatever happens."""
    log = (host.root / f"{agent}.log").open("ab")
    try:
        proc = subprocess.Popen(
            host.ns.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    finally:
        log.close()
    host.procs[agent] = proc
    return proc


def agent_env(**extra: str) -> dict[str, str]:
    """Our environment minus systemd's variables, logging to stderr."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))
    }
    env["FERRY_JOURNAL_SOCKET"] = "/nonexistent"
    env.update(extra)
    return env


def accepts_unix(path: Path) -> bool:
    """True when a unix stream socket at ``path`` accepts a connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def accepts_tcp(host: HostEnv, address: str, port: int) -> bool:
    """True when ``address:port`` accepts a TCP connection inside the host's namespace."""
    probe = (
        "import socket, sys\n"
        f"s = socket.create_connection(({address!r}, {port}), timeout=5)\n"
        "s.close()\n"
    )
    result = subprocess.run(
        host.ns.exec_argv([sys.executable, "-c", probe]),
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    return result.returncode == 0


@contextlib.contextmanager
def running_guest(
    host: HostEnv, tmp: Path, kernel: Path, virt_type: str
) -> Iterator[testguest.SerialReader]:
    """g1 running on ``host``, its serial port read and reporting."""
    serial = boot_guest(host, tmp, guest_xml("g1", kernel, virt_type=virt_type))
    try:
        yield serial
    finally:
        serial.close()


def keeps_running(serial: testguest.SerialReader, reports: int = 3) -> testguest.Report:
    """Wait until the guest's counter climbed by ``reports`` more; no reboot, no bad page."""
    before = serial.latest()
    assert before is not None
    after = serial.wait_for(lambda r: r.counter >= before.counter + reports, timeout=30)
    assert serial.boot_count == 1, "the guest rebooted"
    assert after.bad_pages == 0
    assert after.checksum == before.checksum
    return after


# ----------------------------------------------------------------- notify socket


@dataclass
class Notification:
    """One datagram on the notify socket."""

    at: float  # time.monotonic() on receipt
    pid: int  # sender, from SCM_CREDENTIALS
    fields: dict[str, str]

    def __contains__(self, key: str) -> bool:
        return key in self.fields


class NotifySocket:
    """What systemd listens on for ``Type=notify`` services: a datagram socket
    at a path (abstract sockets belong to one network namespace, a path works
    from the agent's namespace too), sender credentials attached.

    ``on_ready`` runs in the reader thread as soon as READY=1 arrives, before
    the next datagram is read.
    """

    def __init__(self, path: Path, on_ready: Callable[[Notification], None] | None = None) -> None:
        self.path = path
        self.on_ready = on_ready
        self.ready_error: BaseException | None = None
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self._messages: list[Notification] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        creds_size = socket.CMSG_SPACE(struct.calcsize("iII"))
        while not self._closed:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, creds_size)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[: struct.calcsize("iII")])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            note = Notification(time.monotonic(), pid, fields)
            if "READY" in note and self.on_ready is not None:
                try:
                    self.on_ready(note)
                except BaseException as exc:  # reported by the test, not lost in a thread
                    self.ready_error = exc
            with self._cond:
                self._messages.append(note)
                self._cond.notify_all()

    def messages(self) -> list[Notification]:
        with self._cond:
            return list(self._messages)

    def wait_for(
        self, predicate: Callable[[list[Notification]], bool], timeout: float, what: str
    ) -> list[Notification]:
        """Wait until ``predicate(all messages so far)`` holds; return them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [m.fields for m in self._messages]
                    raise TimeoutError(f"no {what} within {timeout:.0f}s; got {got}")
                self._cond.wait(min(left, 0.5))
            return list(self._messages)

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def after(messages: list[Notification], first: Notification) -> list[Notification]:
    """The messages that arrived after ``first``."""
    return messages[messages.index(first) + 1 :]


# ----------------------------------------------------------------- READY, WATCHDOG, STOPPING


@pytest.mark.parametrize("agent", ["source", "destination"])
def test_notify_protocol(
    agent: str, cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    admin = a.source_socket if agent == "source" else a.destination_socket
    listen_addr, listen_port = a.ns.address, 49160
    stack = contextlib.ExitStack()
    with stack:
        guest_pid = None
        if agent == "source":
            # A VM already runs when the monitored agent starts: READY=1 must
            # come after the agent has found it again.
            a.start_agent("source")
            serial = stack.enter_context(running_guest(a, tmp_path, guest_kernel, virt_type))
            guest_pid = a.ctl_json("dominfo", "g1")["pid"]
            assert a.stop_agent("source") == 0

        at_ready: dict[str, object] = {}

        def on_ready(note: Notification) -> None:
            # Freeze the agent where it said READY=1: whatever it would open
            # only later cannot make the checks pass. (NotifyAccess=main: the
            # sender must be the agent itself.)
            pid = proc.pid
            assert note.pid == pid, f"READY=1 from pid {note.pid}, not the agent's {pid}"
            os.kill(pid, signal.SIGSTOP)
            try:
                at_ready["admin"] = accepts_unix(admin)
                if agent == "destination":
                    at_ready["tcp"] = accepts_tcp(a, listen_addr, listen_port)
                else:
                    at_ready["log"] = a.agent_log("source")
            finally:
                os.kill(pid, signal.SIGCONT)

        notify = NotifySocket(tmp_path / "notify.sock", on_ready=on_ready)
        stack.callback(notify.close)
        env = agent_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
        # WATCHDOG_PID is the agent's own pid: sh exports its $$ and execs the
        # agent in its place (ip netns exec execs too), so the pid stays.
        argv = ["sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"',
                agent_binary(agent), "--config", str(a.config_path), "--debug"]  # fmt: skip
        proc = spawn(a, agent, argv, env)

        msgs = notify.wait_for(
            lambda ms: any("READY" in m for m in ms) or proc.poll() is not None, 60, "READY=1"
        )
        assert proc.poll() is None, a.agent_log(agent)
        if notify.ready_error is not None:
            raise notify.ready_error
        ready = next(m for m in msgs if "READY" in m)
        assert ready.fields["READY"] == "1"
        assert at_ready["admin"] is True, "READY=1 before the admin socket accepted connections"
        if agent == "destination":
            assert at_ready["tcp"] is True, "READY=1 before the peer port accepted connections"
            assert "migration(s) in" in ready.fields.get("STATUS", ""), ready.fields
        else:
            assert "ready: 1 running domain(s) reconnected" in str(at_ready["log"])
            assert ready.fields.get("STATUS", "").startswith("1 domain(s) running"), ready.fields

        # WATCHDOG=1 at half of WATCHDOG_USEC (2 s): every ~1 s, never a gap
        # the watchdog would fire on. Gaps spanning the SIGSTOP above are not counted.
        period = WATCHDOG_USEC / 2e6
        msgs = notify.wait_for(
            lambda ms: sum("WATCHDOG" in m for m in after(ms, ready)) >= 6, 30, "6 WATCHDOG=1"
        )
        pings = [m.at for m in after(msgs, ready) if "WATCHDOG" in m][1:]
        gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
        assert len(gaps) >= 4, gaps
        assert max(gaps) < 2 * period, f"a watchdog gap reached WATCHDOG_USEC: {gaps}"
        assert 0.8 * period <= statistics.median(gaps) <= 1.3 * period, gaps

        if agent == "source":
            # STATUS= is refreshed while it runs (every second).
            statuses = [m.fields["STATUS"] for m in after(msgs, ready) if "STATUS" in m]
            assert len(statuses) >= 3, statuses
            assert all(s.startswith("1 domain(s) running, 0 migration(s) out") for s in statuses)
            info = a.ctl_json("dominfo", "g1")
            assert (info["state"], info["pid"]) == ("running", guest_pid)

        sigterm_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, a.agent_log(agent)
        a.procs.pop(agent, None)
        msgs = notify.wait_for(lambda ms: any("STOPPING" in m for m in ms), 10, "STOPPING=1")
        stopping = next(m for m in msgs if "STOPPING" in m)
        assert stopping.fields["STOPPING"] == "1"
        assert "stopping" in stopping.fields.get("STATUS", "")
        assert stopping.at >= sigterm_at and msgs.index(stopping) > msgs.index(ready)
        # NotifyAccess=main: every datagram came from the agent itself.
        assert {m.pid for m in msgs} == {proc.pid}, {m.pid for m in msgs}
        assert sum("READY" in m for m in msgs) == 1

        if agent == "source":
            # Stopping the agent left the VM alone.
            assert a.qemu_pids() == [guest_pid]
            keeps_running(serial)


# ----------------------------------------------------------------- socket activation


@pytest.mark.parametrize("form", ["address", "dual-stack"])
def test_socket_activated_destination_serves_a_migration(
    form: str, cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    if shutil.which("systemd-socket-activate") is None:
        pytest.skip("systemd-socket-activate is not installed")
    a, b = cluster.a, cluster.b
    a.start_agent("source")
    a.start_agent("destination")
    b.start_agent("source")
    address, port = b.ns.address, 49160
    assert b.uri == f"ferry://{address}:{port}"
    # What ferry-destination.socket does: bind the peer port, start the agent
    # on the first connection with the socket as fd 3. "address": the
    # config's listen address; "dual-stack": the shipped unit's
    # ListenStream=49160 with BindIPv6Only=both, i.e. [::]:49160 taking IPv4
    # peers too. The tool passes only the environment it is told to.
    listen = f"{address}:{port}" if form == "address" else f"[::]:{port}"
    notify = NotifySocket(tmp_path / "notify.sock")
    argv = ["systemd-socket-activate", "-l", listen,
            "--setenv=FERRY_JOURNAL_SOCKET=/nonexistent",
            f"--setenv=NOTIFY_SOCKET={notify.path}",
            agent_binary("destination"), "--config", str(b.config_path), "--debug"]  # fmt: skip
    proc = spawn(b, "destination", argv, agent_env())
    wait_until(lambda: f"Listening on {listen} as 3." in b.agent_log("destination")
               or proc.poll() is not None, 30, "systemd-socket-activate to listen")  # fmt: skip
    assert proc.poll() is None, b.agent_log("destination")
    # Nothing runs yet but the listening socket: no agent, no admin socket.
    assert not accepts_unix(b.destination_socket)
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "systemd-socket-"

    with running_guest(a, tmp_path, guest_kernel, virt_type) as serial:
        # The migration's control connection is the first one: it starts the agent.
        result = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr + cluster.logs()
        log = b.agent_log("destination")
        assert "Communication attempt on fd 3" in log, log
        assert "listening on the socket systemd passed (socket activation)" in log, log
        # STATUS= followed the incoming migration: one in, then none.
        statuses = [m.fields["STATUS"] for m in notify.wait_for(
            lambda ms: any(m.fields.get("STATUS", "").startswith("0 migration(s) in")
                           for m in ms[1:]), 20, "STATUS after the migration")
            if "STATUS" in m]  # fmt: skip
        assert any(st.startswith("1 migration(s) in (0 tunnelled)") for st in statuses), statuses
        notify.close()
        # The tool exec'd the agent in its place: same pid, LISTEN_PID matched.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(arg.endswith(b"ferry-destination") for arg in cmdline), cmdline

        # The VM runs on B, not on A, and kept going.
        wait_until(lambda: not a.qemu_pids(), 15, "qemu to leave A")
        assert len(b.qemu_pids()) == 1
        serial.reconnect(b.serial_socket("g1"))
        keeps_running(serial)
        info = b.ctl_json("dominfo", "g1")
        assert info["state"] == "running" and info["pid"] == b.qemu_pids()[0]

    assert b.stop_agent("destination") == 0, b.agent_log("destination")


# ----------------------------------------------------------------- restart with a VM running


def test_restarting_both_agents_leaves_the_vm_running(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    with running_guest(a, tmp_path, guest_kernel, virt_type) as serial:
        info = a.ctl_json("dominfo", "g1")
        pid = info["pid"]
        assert info["state"] == "running" and a.qemu_pids() == [pid]

        # systemctl stop (KillMode=process): SIGTERM to each agent only.
        assert a.stop_agent("source") == 0, a.agent_log("source")
        assert a.stop_agent("destination") == 0, a.agent_log("destination")
        assert not accepts_unix(a.source_socket)
        # With no agent at all the VM keeps running, its state on disk.
        keeps_running(serial)
        assert a.qemu_pids() == [pid]
        assert (a.run_dir / "domains" / "g1.status").exists()

        a.start_agent("source")
        a.start_agent("destination")
        info = a.ctl_json("dominfo", "g1")
        assert (info["state"], info["pid"]) == ("running", pid)
        keeps_running(serial)
        assert a.qemu_pids() == [pid]

        # The restarted agents own the VM again: out through A's source,
        # back in through A's destination.
        result = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.logs()
        wait_until(lambda: not a.qemu_pids(), 15, "qemu to leave A")
        serial.reconnect(b.serial_socket("g1"))
        keeps_running(serial)
        result = b.ferryctl("migrate", "g1", a.uri, "--live", "--json", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.logs()
        wait_until(lambda: not b.qemu_pids(), 15, "qemu to leave B")
        serial.reconnect(a.serial_socket("g1"))
        keeps_running(serial)
        assert a.ctl_json("dominfo", "g1")["state"] == "running"
