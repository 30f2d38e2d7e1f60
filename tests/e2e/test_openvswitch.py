"""NICs on an Open vSwitch bridge: port added at start, moved by a live migration (issue 14).

Each test host runs its own Open vSwitch (ovsdb-server and ovs-vswitchd in
the host's network namespace, database and sockets in the test's directory)
with a bridge ``ovsbr0`` on the userspace datapath (``datapath_type=netdev``:
this kernel has no openvswitch module). One NIC names the bridge with
``<virtualport type='openvswitch'>`` and an explicit interface ID; the other
is ``<interface type='network'>`` on a network the host config maps to the
OVS bridge (``virtualport = "openvswitch"``), whose ID Ferry derives.

Shown: the taps are ports of ovsbr0 on A with libvirt's external IDs; after
a live migration they are ports on B with the same IDs, A's ports are gone
and the guest's memory is intact; destroying the VM on B removes B's ports;
a bridge that does not exist is refused at start with its name and leaves
no port behind.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

IFACE_ID = "0b5e6f1c-7d2a-4e8b-9c3f-1a2b3c4d5e6f"
DOMAIN_UUID = "5a1f0c2e-8b3d-4f6a-9e7c-2d4b6a8c0e11"


def _have_ovs() -> str | None:
    for tool in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovsdb-tool"):
        if not any(Path(d, tool).exists() for d in ("/usr/sbin", "/usr/bin")):
            return f"{tool} is not installed (Debian: openvswitch-switch; make deps)"
    return None


class Switch:
    """One host's private Open vSwitch, stopped (and waited for) by :meth:`stop`."""

    def __init__(self, host: HostEnv, root: Path) -> None:
        self.host = host
        self.root = root
        root.mkdir(parents=True)
        self.db = f"unix:{root}/db.sock"
        env = {"OVS_RUNDIR": str(root), "OVS_LOGDIR": str(root), "OVS_DBDIR": str(root),
               "OVS_SYSCONFDIR": str(root)}  # fmt: skip
        self.env = {**os.environ, **env}
        self.pidfds: list[int] = []
        subprocess.run(["ovsdb-tool", "create", str(root / "conf.db"),
                        "/usr/share/openvswitch/vswitch.ovsschema"], check=True)  # fmt: skip
        self._daemon(["ovsdb-server", f"--remote=punix:{root}/db.sock", str(root / "conf.db")],
                     "ovsdb-server")  # fmt: skip
        self.vsctl("--no-wait", "init")
        self._daemon(["ovs-vswitchd", self.db], "ovs-vswitchd")
        self.vsctl("add-br", "ovsbr0", "--", "set", "bridge", "ovsbr0", "datapath_type=netdev")

    def _daemon(self, argv: list[str], name: str) -> None:
        pidfile = self.root / f"{name}.pid"
        subprocess.run(self.host.ns.exec_argv([*argv, f"--pidfile={pidfile}", "--detach",
                                               f"--log-file={self.root / name}.log"]),
                       check=True, env=self.env, timeout=30)  # fmt: skip
        self.pidfds.append(os.pidfd_open(int(pidfile.read_text())))

    def vsctl(self, *args: str) -> str:
        done = subprocess.run(self.host.ns.exec_argv(["ovs-vsctl", f"--db={self.db}",
                                                      "--timeout=10", *args]),
                              capture_output=True, text=True, env=self.env, timeout=30)  # fmt: skip
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout.strip()

    def ports(self) -> dict[str, dict[str, str]]:
        """Ports of ovsbr0 (but the bridge's own) and their external IDs."""
        out = {}
        for port in self.vsctl("list-ports", "ovsbr0").split():
            ids = self.vsctl("get", "Interface", port, "external-ids")
            out[port] = dict(
                (k.strip(), v.strip().strip('"'))
                for k, v in (item.split("=", 1) for item in ids.strip("{}").split(", ") if item)
            )
        return out

    def stop(self) -> None:
        for ctl in sorted(self.root.glob("*.ctl"), reverse=True):  # vswitchd first
            subprocess.run(self.host.ns.exec_argv(["ovs-appctl", "-t", str(ctl), "exit"]),
                           capture_output=True, env=self.env, timeout=30)  # fmt: skip
        for fd in self.pidfds:  # the pidfd says when each daemon is gone
            select.select([fd], [], [], 10)
            os.close(fd)


@pytest.fixture
def switches(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Switch, Switch]]:
    reason = _have_ovs()
    if reason:
        pytest.skip(reason)
    made: list[Switch] = []
    try:
        for host in (cluster.a, cluster.b):
            sw = Switch(host, tmp_path / f"ovs-{host.ns.name}")
            made.append(sw)
            host.write_config(**{
                "networks.sdn.bridge": "ovsbr0", "networks.sdn.virtualport": "openvswitch",
                "openvswitch.db": sw.db})  # fmt: skip
        yield made[0], made[1]
    finally:
        for sw in made:
            with contextlib.suppress(Exception):
                sw.stop()


NICS = (
    "<interface type='bridge'><mac address='52:54:00:0f:00:01'/><source bridge='ovsbr0'/>"
    "<virtualport type='openvswitch'><parameters interfaceid='" + IFACE_ID + "'/></virtualport>"
    "<model type='virtio'/></interface>"
    "<interface type='network'><mac address='52:54:00:0f:00:02'/><source network='sdn'/>"
    "<model type='e1000'/></interface>"
)


def test_ovs_ports_move_with_a_live_migration(
    cluster: Cluster, switches: tuple[Switch, Switch], guest_kernel: Path, virt_type: str,
    tmp_path: Path,
) -> None:
    sw_a, sw_b = switches
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "ovs.xml"
    xml.write_text(guest_xml("ovsg", guest_kernel, virt_type=virt_type, uuid=DOMAIN_UUID,
                             extra_devices=NICS))  # fmt: skip
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "ovsg", check=True)
    derived = str(uuid.uuid5(uuid.UUID("6f2c3e0a-5d1b-4c3e-9a57-0f3e1d2c4b5a"),
                             f"{DOMAIN_UUID}/52:54:00:0f:00:02"))  # fmt: skip
    want = {("52:54:00:0f:00:01", IFACE_ID), ("52:54:00:0f:00:02", derived)}
    serial = testguest.SerialReader(a.serial_socket("ovsg"))
    try:
        on_a = sw_a.ports()
        assert {(p["attached-mac"], p["iface-id"]) for p in on_a.values()} == want, on_a
        assert all(p["vm-id"] == DOMAIN_UUID and p["iface-status"] == "active"
                   for p in on_a.values()), on_a  # fmt: skip
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        moved = a.ferryctl("migrate", "ovsg", b.uri, "--live", timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("ovsg") == "running"
        on_b = sw_b.ports()
        assert {(p["attached-mac"], p["iface-id"]) for p in on_b.values()} == want, on_b
        wait_until(lambda: not sw_a.ports(), 20, "A's switch ports to go with A's qemu")
        serial.reconnect(b.serial_socket("ovsg"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        b.ferryctl("destroy", "ovsg", check=True)
        wait_until(lambda: not sw_b.ports(), 20, "B's switch ports to go with the VM")
    finally:
        serial.close()


def test_missing_ovs_bridge_is_refused_at_start_and_leaves_no_port(
    cluster: Cluster, switches: tuple[Switch, Switch], guest_kernel: Path, virt_type: str,
    tmp_path: Path,
) -> None:
    sw_a, _ = switches
    a = cluster.a
    a.start_agent("source")
    xml = tmp_path / "ovs2.xml"
    good = ("<interface type='bridge'><mac address='52:54:00:0f:00:03'/>"
            "<source bridge='ovsbr0'/><virtualport type='openvswitch'/></interface>")  # fmt: skip
    bad = ("<interface type='bridge'><mac address='52:54:00:0f:00:04'/>"
           "<source bridge='ovsnone'/><virtualport type='openvswitch'/></interface>")  # fmt: skip
    xml.write_text(guest_xml("ovs2", guest_kernel, virt_type=virt_type, extra_devices=good + bad))
    a.ferryctl("define", str(xml), check=True)
    result = a.ferryctl("start", "ovs2")
    assert result.returncode == 1
    assert "Open vSwitch bridge 'ovsnone' does not exist" in result.stderr, result.stderr
    assert a.domain_state("ovs2") == "shut off" and not a.qemu_pids()
    assert sw_a.ports() == {}, "the first NIC's port outlived the failed start"
