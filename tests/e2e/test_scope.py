"""qemu started through ``systemd-run --scope`` by the agents (``[qemu] cgroup = "scope"``).

What this can and cannot show on this machine: systemd is not PID 1 here
(``/run/systemd/system`` does not exist), so the real ``systemd-run`` cannot
create a scope: it needs a running system manager to talk to over
``/run/systemd/private`` or D-Bus, and fails with "System has not been booted
with systemd as init system (PID 1)". That is why ``cgroup = "auto"`` picks
the detached path here, and why these tests force ``cgroup = "scope"`` and put
a stand-in named ``systemd-run`` first on the agents' PATH.

The stand-in does only what matters to Ferry's side of the contract, exactly
as systemd-run does it after the manager created the scope (src/run/run.c,
``start_transient_scope()``): it prints "Running scope as unit: NAME" on
stderr and ``execvp()``\\ s the argv after ``--`` in its own process. It
records the argv it was given. Everything else is real: ferry-source and
ferry-destination, ferryctl, and qemu booting the test guest. The tests check
that the agents exec systemd-run with the right argv (scope name, slice,
properties, then qemu's argv untouched), that the pid they track and report
is qemu's (its command line is the argv after ``--``; its environment carries
the mark the stand-in set before exec, so it is the stand-in's exec'd
descendant), that the VM survives an agent restart, and that a failing
systemd-run gives a clear error naming the unit and systemd-run's message and
leaves nothing behind. The cgroup move itself (qemu's ``/proc/PID/cgroup``
ending in ``machine.slice/ferry-qemu-...scope``) is systemd's job and is not
exercised here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from standins import write_systemd_run

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

QEMU = shutil.which("qemu-system-x86_64")
UNIT_RE = re.compile(r"ferry-qemu-(?P<name>.+)-[0-9a-f]{8}\.scope")



def _use_standin(host: HostEnv) -> Path:
    """Configure ``host`` for scope mode with the stand-in first on its agents' PATH."""
    bindir = host.root / "standin"
    bindir.mkdir()
    write_systemd_run(bindir)
    host.write_config(**{"qemu.cgroup": "scope"})
    # A dict of its own: the cluster's hosts share one agent_env by default.
    host.agent_env = {**host.agent_env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    return bindir


def _calls(bindir: Path) -> list[dict[str, Any]]:
    path = bindir / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_call(call: dict[str, Any], bindir: Path, name: str, uuid: str) -> list[str]:
    """Assert the systemd-run argv; return qemu's argv (what follows ``--``)."""
    argv: list[str] = call["argv"]
    assert argv[0] == str(bindir / "systemd-run")
    cut = argv.index("--")
    unit = argv[3].removeprefix("--unit=")
    m = UNIT_RE.fullmatch(unit)
    assert m and m.group("name") == name, unit
    assert argv[1:cut] == [
        "--scope",
        "--slice=machine.slice",
        f"--unit={unit}",
        f"--description=Ferry qemu: domain {name} ({uuid})",
        "--collect",
        "--no-ask-password",
        "--property=DevicePolicy=closed",
        "--property=DeviceAllow=/dev/kvm rw",
        "--property=DeviceAllow=/dev/net/tun rw",
        "--property=DeviceAllow=/dev/vhost-net rw",
        "--property=DeviceAllow=/dev/vhost-vsock rw",
    ]
    qemu_argv = argv[cut + 1 :]
    assert qemu_argv[0] == QEMU  # made absolute by the agent
    assert "-daemonize" in qemu_argv and "-uuid" in qemu_argv
    assert qemu_argv[qemu_argv.index("-uuid") + 1] == uuid
    return qemu_argv


def _check_is_that_qemu(pid: int, call: dict[str, Any], qemu_argv: list[str]) -> None:
    """``pid`` is the qemu the stand-in exec'd, not the stand-in itself."""
    assert pid != call["pid"]  # -daemonize: the tracked qemu is the launcher's grandchild
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert cmdline == [a.encode() for a in qemu_argv]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"FERRY_STANDIN_PID={call['pid']}".encode() in environ
    assert b"SYSTEMD_LOG_LEVEL=info" in environ  # the env launch() gave systemd-run


def _define(host: HostEnv, tmp: Path, xml: str, name: str) -> None:
    path = tmp / f"{name}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)


def test_source_starts_qemu_through_systemd_run_scope(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """ferry-source execs systemd-run; qemu runs, is tracked, survives a restart."""
    a = cluster.a
    bindir = _use_standin(a)
    a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type), "g1")
    uuid = a.ctl_json("dominfo", "g1")["uuid"]

    a.ferryctl("start", "g1", check=True)
    (call,) = _calls(bindir)
    qemu_argv = _check_call(call, bindir, "g1", uuid)
    info = a.ctl_json("dominfo", "g1")
    pid = info["pid"]
    assert info["state"] == "running" and a.qemu_pids() == [pid]
    _check_is_that_qemu(pid, call, qemu_argv)

    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        before = serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        # systemctl restart (KillMode=process): SIGTERM to the agent only.
        assert a.stop_agent("source") == 0, a.agent_log("source")
        serial.wait_for(lambda r: r.counter > before.counter + 3, timeout=30)
        a.start_agent("source")
        info = a.ctl_json("dominfo", "g1")
        assert (info["state"], info["pid"]) == ("running", pid)
        # The scope's name outlives the agent that made it.
        status = json.loads((a.run_dir / "domains" / "g1.status").read_text())
        assert status["extra"]["scope_unit"].startswith("ferry-qemu-g1-"), status
        after = serial.wait_for(lambda r: r.counter > before.counter + 6, timeout=30)
        assert after.bad_pages == 0 and serial.boot_count == 1

        # systemd-run fails (here: no bus): a clear error, nothing started.
        (bindir / "fail").touch()
        _define(a, tmp_path, guest_xml("g2", guest_kernel, virt_type=virt_type), "g2")
        result = a.ferryctl("start", "g2")
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "systemd-run could not start scope machine.slice/ferry-qemu-g2-" in result.stderr
        assert "Failed to connect to bus: No such file or directory" in result.stderr
        assert "(qemu-launch)" in result.stderr and "Traceback" not in result.stderr
        assert a.qemu_pids() == [pid]
        assert a.domain_state("g2") == "shut off"
        assert not (a.run_dir / "domains" / "g2.status").exists()
        assert not (a.run_dir / "domains" / "g2.pid").exists()
        assert len(_calls(bindir)) == 1  # the failing stand-in logs no exec

        a.ferryctl("destroy", "g1", check=True)
        wait_until(lambda: not a.qemu_pids(), 10, "qemu to exit after destroy")
    finally:
        serial.close()


def test_destination_starts_incoming_qemu_through_systemd_run_scope(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """ferry-destination's ``-incoming`` qemu goes through systemd-run too."""
    a, b = cluster.a, cluster.b
    bindir = _use_standin(b)
    cluster.start()
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type), "g1")
    uuid = a.ctl_json("dominfo", "g1")["uuid"]
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        result = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert result.returncode == 0, result.stderr + cluster.logs()
        wait_until(lambda: not a.qemu_pids(), 15, "qemu to leave A")

        (call,) = _calls(bindir)
        qemu_argv = _check_call(call, bindir, "g1", uuid)
        assert "-incoming" in qemu_argv
        info = b.ctl_json("dominfo", "g1")
        assert info["state"] == "running" and b.qemu_pids() == [info["pid"]]
        _check_is_that_qemu(info["pid"], call, qemu_argv)

        serial.reconnect(b.serial_socket("g1"))
        last = serial.wait_for(lambda r: True, timeout=30)
        later = serial.wait_for(lambda r: r.counter > last.counter + 3, timeout=30)
        assert later.bad_pages == 0 and serial.boot_count == 1

        # Restarting B's destination agent (which started that qemu) leaves it running.
        assert b.stop_agent("destination", signal.SIGTERM) == 0, b.agent_log("destination")
        serial.wait_for(lambda r: r.counter > later.counter + 3, timeout=30)
        assert b.qemu_pids() == [info["pid"]]
        b.ferryctl("destroy", "g1", check=True)
        wait_until(lambda: not b.qemu_pids(), 10, "qemu to exit after destroy")
    finally:
        serial.close()
