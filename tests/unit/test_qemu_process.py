"""ferry.qemu launch / reconnect / stop, against real qemu under TCG.

Each test uses its own UUID; the fixture kills every qemu whose command line
carries it, even when the test failed or a helper process launched it.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from standins import write_systemd_run

from ferry.errors import QemuLaunchError, QMPError
from ferry.qemu import DISCONNECTED, QMP, QemuProcess, launch, read_start_time, reconnect
from ferry.statefile import DomainStatus

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


def _kill_qemus_with(uuid: str) -> None:
    """SIGKILL every qemu whose argv mentions ``uuid`` and wait for it (pidfd)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu" not in cmdline.split(b"\0", 1)[0] or uuid.encode() not in cmdline:
            continue
        try:
            pidfd = os.pidfd_open(int(entry))
        except OSError:
            continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)


def _qemus_with(uuid: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if b"qemu" in cmd.split(b"\0", 1)[0] and uuid.encode() in cmd and state != b"Z":
                found.append(int(entry))
    return found


@dataclass
class VM:
    dir: Path
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    procs: list[QemuProcess] = field(default_factory=list)

    @property
    def pidfile(self) -> Path:
        return self.dir / "q.pid"

    @property
    def sock(self) -> Path:
        return self.dir / "q.sock"

    def argv(self, *extra: str) -> list[str]:
        assert QEMU is not None
        return [
            QEMU, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64",
            "-name", "ferry-test", "-uuid", self.uuid,
            "-daemonize", "-pidfile", str(self.pidfile),
            "-chardev", f"socket,id=monitor,path={self.sock},server=on,wait=off",
            "-mon", "chardev=monitor,mode=control",
            *extra,
        ]  # fmt: skip

    async def launch(self, *extra: str) -> QemuProcess:
        proc = await launch(self.argv(*extra), pidfile=self.pidfile, qmp_socket=self.sock)
        self.procs.append(proc)
        return proc


@pytest.fixture
async def vm() -> AsyncIterator[VM]:
    # Short directory under /tmp: unix socket paths are limited to 108 bytes.
    v = VM(Path(tempfile.mkdtemp(prefix="fq-", dir="/tmp")))
    try:
        yield v
    finally:
        for proc in v.procs:
            await proc.close()
        _kill_qemus_with(v.uuid)
        shutil.rmtree(v.dir, ignore_errors=True)


async def test_launch_status_and_stop_cont_events(vm: VM) -> None:
    t0 = time.monotonic()
    proc = await vm.launch()
    launch_s = time.monotonic() - t0
    assert launch_s < 10
    assert proc.alive()
    assert proc.start_time == read_start_time(proc.pid)
    assert int(vm.pidfile.read_text()) == proc.pid
    status = await proc.qmp.query_status()
    assert (status.running, status.status, status.reason) == (True, "running", None)

    with proc.qmp.subscribe() as events:
        await proc.qmp.execute("stop")
        await events.wait_for("STOP", 10)
        status = await proc.qmp.query_status()
        assert (status.running, status.status, status.reason) == (False, "paused", "user")
        await proc.qmp.execute("cont")
        resume = await events.wait_for("RESUME", 10)
        assert resume.timestamp > 0
    assert (await proc.qmp.query_status()).running


async def test_qmp_errors_name_command_and_qemu_message(vm: VM) -> None:
    proc = await vm.launch()
    with pytest.raises(QMPError) as info:
        await proc.qmp.execute("no-such-command")
    assert "no-such-command" in str(info.value)
    assert "CommandNotFound" in str(info.value)
    with pytest.raises(QMPError, match="migrate-set-parameters"):
        await proc.qmp.execute("migrate-set-parameters", {"downtime-limit": -5})

    # qemu serves one QMP client: a second one is never greeted.
    second = QMP("second")
    with pytest.raises(QMPError, match="no greeting"):
        await second.connect(vm.sock, timeout=0.3)

    missing = QMP("missing")
    with pytest.raises(QMPError, match="cannot connect"):
        await missing.connect(vm.dir / "nope.sock", timeout=1)


async def test_query_status_io_error_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    qmp = QMP("fake")

    async def fake_execute(cmd: str, args: object = None, *, timeout: object = None) -> object:
        assert cmd == "query-status"
        return {"running": False, "singlestep": False, "status": "io-error"}

    monkeypatch.setattr(qmp, "execute", fake_execute)
    status = await qmp.query_status()
    assert (status.running, status.status, status.reason) == (False, "io-error", "io-error")


async def test_launch_failure_reports_qemu_message(vm: VM) -> None:
    with pytest.raises(QemuLaunchError) as info:
        await launch(vm.argv("-no-such-option"), pidfile=vm.pidfile, qmp_socket=vm.sock)
    assert "-no-such-option" in str(info.value)
    assert "invalid option" in str(info.value)
    assert info.value.details["returncode"] == 1
    assert not vm.pidfile.exists() and not vm.sock.exists()
    assert _qemus_with(vm.uuid) == []


async def test_launch_timeout_leaves_nothing(vm: VM) -> None:
    # A "qemu" that never finishes starting.
    argv = ["/bin/sh", "-c", "sleep 30", "-daemonize", "-pidfile", str(vm.pidfile)]
    t0 = time.monotonic()
    with pytest.raises(QemuLaunchError, match=r"did not finish starting within 0\.5s"):
        await launch(argv, pidfile=vm.pidfile, qmp_socket=vm.sock, timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert not vm.pidfile.exists()


async def test_launch_argv_checks(vm: VM) -> None:
    argv = vm.argv()
    argv.remove("-daemonize")
    with pytest.raises(QemuLaunchError, match="-daemonize"):
        await launch(argv, pidfile=vm.pidfile, qmp_socket=vm.sock)
    with pytest.raises(QemuLaunchError, match="launch\\(\\) was told"):
        await launch(vm.argv(), pidfile=vm.dir / "other.pid", qmp_socket=vm.sock)
    with pytest.raises(QemuLaunchError, match="cannot execute"):
        await launch(
            ["/nonexistent/qemu", "-daemonize", "-pidfile", str(vm.pidfile)],
            pidfile=vm.pidfile,
            qmp_socket=vm.sock,
        )


async def test_launch_refuses_pidfile_of_running_qemu(vm: VM) -> None:
    first = await vm.launch()
    with pytest.raises(QemuLaunchError, match=f"locked by a running qemu \\(pid {first.pid}\\)"):
        await launch(vm.argv(), pidfile=vm.pidfile, qmp_socket=vm.dir / "other.sock")
    # The refusal touched nothing of the running qemu.
    assert first.alive() and vm.pidfile.exists() and vm.sock.exists()
    assert (await first.qmp.query_status()).running


async def test_stale_pidfile_is_replaced(vm: VM) -> None:
    vm.pidfile.write_text("1\n")  # left by a qemu that died
    proc = await vm.launch()
    assert int(vm.pidfile.read_text()) == proc.pid


_HELPER = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from pathlib import Path
    from ferry.qemu import launch
    from ferry.statefile import DomainStatus

    async def main():
        argv, pidfile, sock, status_path, uuid = json.loads(sys.argv[1])
        proc = await launch(argv, pidfile=Path(pidfile), qmp_socket=Path(sock))
        DomainStatus(name="g1", uuid=uuid, pid=proc.pid, qmp_path=Path(sock),
                     start_time=proc.start_time, run_state="running").save(Path(status_path))
        # The agent dies hard, QMP connection and all.
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_qemu_survives_killed_agent_and_reconnect_finds_it(vm: VM) -> None:
    import json

    status_path = vm.dir / "g1.status"
    args = json.dumps([vm.argv(), str(vm.pidfile), str(vm.sock), str(status_path), vm.uuid])
    helper = await asyncio.create_subprocess_exec(sys.executable, "-c", _HELPER, args)
    assert await asyncio.wait_for(helper.wait(), 60) == -signal.SIGKILL

    status = DomainStatus.load(status_path)
    proc = await reconnect(status, timeout=10)
    assert proc is not None
    vm.procs.append(proc)
    assert proc.pid == status.pid and proc.alive()
    assert (await proc.qmp.query_status()).running
    with proc.qmp.subscribe() as events:
        await proc.qmp.execute("stop")
        await events.wait_for("STOP", 10)

    # close() leaves qemu running, and it can be found again.
    await proc.close()
    assert _qemus_with(vm.uuid) == [status.pid]
    again = await reconnect(status)
    assert again is not None
    vm.procs.append(again)
    assert not (await again.qmp.query_status()).running


async def test_reconnect_refuses_other_processes(vm: VM) -> None:
    proc = await vm.launch()
    good = DomainStatus(
        name="g1", uuid=vm.uuid, pid=proc.pid, qmp_path=vm.sock, start_time=proc.start_time
    )
    assert proc.start_time is not None
    reused = DomainStatus(**{**good.__dict__, "start_time": proc.start_time + 1})
    other_uuid = DomainStatus(**{**good.__dict__, "uuid": str(uuidlib.uuid4())})
    me = os.getpid()
    not_qemu = DomainStatus(**{**good.__dict__, "pid": me, "start_time": read_start_time(me)})
    no_pid = DomainStatus(name="g1", uuid=vm.uuid)
    for stale in (reused, other_uuid, not_qemu, no_pid):
        assert await reconnect(stale) is None
    # The live qemu holds the single QMP connection: reconnect must not
    # call that "gone" (the caller would clean up a running VM).
    with pytest.raises(QMPError, match="no greeting"):
        await reconnect(good, timeout=0.3)

    await proc.kill()
    assert await reconnect(good) is None


async def test_shutdown_falls_back_to_quit(vm: VM) -> None:
    proc = await vm.launch()
    pid = proc.pid
    with proc.qmp.subscribe(None) as events:
        t0 = time.monotonic()
        await proc.shutdown(timeout=0.5)  # the kernel-less guest ignores ACPI
        elapsed = time.monotonic() - t0
        names = [e.name for e in events.pending()]
        final = await events.get(0)
    assert 0.5 <= elapsed < 5
    assert "POWERDOWN" in names and "SHUTDOWN" in names
    assert final.name == DISCONNECTED
    assert not proc.alive()
    assert _qemus_with(vm.uuid) == []
    # qemu removed its own files on the clean quit.
    assert not vm.pidfile.exists() and not vm.sock.exists()
    assert read_start_time(pid) is None


async def test_wait_exit_is_prompt_via_pidfd(vm: VM) -> None:
    proc = await vm.launch()
    events = proc.qmp.subscribe()
    assert not await proc.wait_exit(0.05)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)  # someone else kills it
    assert await proc.wait_exit(5)
    elapsed = time.monotonic() - t0
    # PID 1 here takes ~1.2 s to reap orphans: a pid poll would be late.
    assert elapsed < 0.8, elapsed
    assert not proc.alive()
    assert (await events.wait_for(DISCONNECTED, 5)).name == DISCONNECTED
    assert not proc.qmp.connected
    with pytest.raises(QMPError, match="query-status"):
        await proc.qmp.query_status()


async def test_kill_removes_stale_files(vm: VM) -> None:
    proc = await vm.launch()
    await proc.kill()
    assert not proc.alive()
    assert _qemus_with(vm.uuid) == []
    assert not vm.pidfile.exists() and not vm.sock.exists()
    await proc.close()  # idempotent after kill


async def test_shutdown_without_qmp_uses_sigterm(vm: VM) -> None:
    proc = await vm.launch()
    await proc.qmp.close()  # e.g. QMP connection lost; the pidfd still works
    assert proc.alive()
    t0 = time.monotonic()
    await proc.shutdown(timeout=30, quit_timeout=10)
    assert time.monotonic() - t0 < 5  # no powerdown wait without QMP
    assert _qemus_with(vm.uuid) == []


async def test_wait_for_keeps_skipped_events_in_order() -> None:
    from ferry.qemu.qmp import QMPEvent

    qmp = QMP("fake")
    sub = qmp.subscribe(None, maxsize=3)
    for i, name in enumerate(["STOP", "MIGRATION_PASS", "RESUME", "SHUTDOWN"]):
        sub._push(QMPEvent(name, {"i": i}))
    assert sub.dropped == 1  # bounded: the oldest (STOP) went
    assert (await sub.wait_for("RESUME", 1)).data == {"i": 2}
    assert [e.name for e in sub.pending()] == ["MIGRATION_PASS", "SHUTDOWN"]
    with pytest.raises(QMPError, match="no STOP event"):
        await sub.wait_for("STOP", 0.01)
    sub._push(QMPEvent(DISCONNECTED, {"reason": "gone"}))
    with pytest.raises(QMPError, match="closed while waiting for STOP: gone"):
        await sub.wait_for("STOP", 1)
    assert [e.name async for e in sub] == [DISCONNECTED]
    sub.close()


async def test_close_while_waiting_for_exit(vm: VM) -> None:
    from ferry.errors import QemuError

    proc = await vm.launch()
    waiter = asyncio.create_task(proc.wait_exit(30))
    await asyncio.sleep(0)  # let it register on the pidfd
    await proc.close()
    with pytest.raises(QemuError, match="closed"):
        await waiter
    assert _qemus_with(vm.uuid) == [proc.pid]  # close() never kills


# ----------------------------------------------------------------- scope mode (systemd-run)
#
# systemd is not PID 1 here, so the real systemd-run cannot create a scope
# ("System has not been booted with systemd as init system"). A stand-in
# named systemd-run, first on PATH, records its argv, prints what the real
# one prints when the scope exists ("Running scope as unit: NAME") and execs
# what follows "--" in its own process, as systemd-run does. What runs is a
# real qemu; the cgroup move itself is systemd's and is not exercised.



@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch, vm: VM) -> Path:
    """A directory holding the stand-in systemd-run, put first on PATH."""
    from ferry.qemu import scope as scope_mod

    d = vm.dir / "bin"
    d.mkdir()
    write_systemd_run(d)
    monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(scope_mod, "_versions", {})
    return d


def _calls(standin: Path) -> list[dict[str, object]]:
    import json

    path = standin / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_scope_launch_execs_qemu_through_systemd_run(vm: VM, standin: Path) -> None:
    from ferry.qemu.scope import scope_for

    req = scope_for("scope", "ferry-test", vm.uuid)
    assert req is not None
    argv = vm.argv()
    argv[0] = "qemu-system-x86_64"  # resolved on PATH by launch()
    proc = await launch(argv, pidfile=vm.pidfile, qmp_socket=vm.sock, scope=req)
    vm.procs.append(proc)
    assert proc.scope_unit == req.unit
    (call,) = _calls(standin)
    recorded = call["argv"]
    assert isinstance(recorded, list)
    assert recorded[0] == str(standin / "systemd-run")
    cut = recorded.index("--")
    assert recorded[1:cut] == [
        "--scope",
        "--slice=machine.slice",
        f"--unit={req.unit}",
        f"--description=Ferry qemu: domain ferry-test ({vm.uuid})",
        "--collect",
        "--no-ask-password",
        *(f"--property={p}" for p in req.properties),
    ]
    assert recorded[cut + 1 :] == [QEMU, *argv[1:]]
    # The pid we track is qemu's (read from its pidfile), not systemd-run's:
    # the stand-in's process became qemu, which then daemonized.
    assert proc.pid == int(vm.pidfile.read_text())
    assert proc.pid != call["pid"]
    assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1] == [
        a.encode() for a in recorded[cut + 1 :]
    ]
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
    assert f"FERRY_STANDIN_PID={call['pid']}".encode() in environ
    # qemu's stderr seen by the caller no longer has systemd-run's line.
    assert "Running scope as unit" not in proc.launch_stderr
    assert (await proc.qmp.query_status()).status == "running"


async def test_scope_launch_failure_names_unit_and_stderr(vm: VM, standin: Path) -> None:
    from ferry.qemu.scope import scope_for

    (standin / "fail").touch()
    req = scope_for("scope", "ferry-test", vm.uuid)
    assert req is not None
    with pytest.raises(QemuLaunchError) as info:
        await launch(vm.argv(), pidfile=vm.pidfile, qmp_socket=vm.sock, scope=req)
    msg = info.value.message
    assert f"systemd-run could not start scope machine.slice/{req.unit}" in msg
    assert "Failed to connect to bus: No such file or directory" in msg
    assert info.value.details["unit"] == req.unit
    assert info.value.details["returncode"] == 1
    # Nothing half-started.
    assert _qemus_with(vm.uuid) == []
    assert not vm.pidfile.exists() and not vm.sock.exists()


async def test_scope_launch_qemu_failure_is_qemus(vm: VM, standin: Path) -> None:
    from ferry.qemu.scope import scope_for

    req = scope_for("scope", "ferry-test", vm.uuid)
    assert req is not None
    with pytest.raises(QemuLaunchError) as info:
        await launch(vm.argv("-no-such-option"), pidfile=vm.pidfile, qmp_socket=vm.sock, scope=req)
    msg = info.value.message
    assert msg.startswith(f"qemu exited with status 1 in scope machine.slice/{req.unit}: ")
    assert "invalid option" in msg and "Running scope as unit" not in msg
    assert _qemus_with(vm.uuid) == []
    assert not vm.pidfile.exists() and not vm.sock.exists()


async def test_scope_launch_without_systemd_run(vm: VM, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.qemu.scope import scope_for

    monkeypatch.setenv("PATH", str(vm.dir))
    req = scope_for("scope", "ferry-test", vm.uuid)
    assert req is not None
    with pytest.raises(QemuLaunchError, match="systemd-run is not on PATH") as info:
        await launch(vm.argv(), pidfile=vm.pidfile, qmp_socket=vm.sock, scope=req)
    assert req.where in info.value.message
    assert _qemus_with(vm.uuid) == []
