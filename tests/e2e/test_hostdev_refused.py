"""Host devices start but refuse migration in Begin, naming the device (issue 14).

A guest with two ``<hostdev type='usb'>`` by vendor:product, neither
plugged into this host (qemu's usb-host then starts without the device and
waits for it; one given by host bus/device must be present, or qemu
refuses to start) defines, starts, runs; ``ferryctl
migrate`` is refused by the source in Begin with both devices named, before
the destination starts anything, and the guest keeps running on A. (A PCI
host device needs a vfio-bound function, which these hosts do not have:
its argv and refusal are unit-tested.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e

HOSTDEVS = """
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0xfeed'/><product id='0xbeef'/></source></hostdev>
    <hostdev mode='subsystem' type='usb'>
      <source><vendor id='0xfeed'/><product id='0xf00d'/></source></hostdev>
"""


def test_usb_hostdevs_start_and_refuse_migration_in_begin(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "g1.xml"
    xml.write_text(guest_xml("g1", guest_kernel, virt_type=virt_type, wss_mib=4,
                             extra_devices=HOSTDEVS))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        live = a.ferryctl("dumpxml", "g1", check=True).stdout
        assert live.count("<hostdev ") == 2 and '<vendor id="0xfeed"/>' in live, live
        (pid,) = a.qemu_pids()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert "usb-host,vendorid=0xfeed,productid=0xbeef,id=hostdev0,bus=usb.0" in cmdline
        assert "usb-host,vendorid=0xfeed,productid=0xf00d,id=hostdev1,bus=usb.0" in cmdline

        refused = a.ferryctl("migrate", "g1", b.uri, "--live", timeout=120)
        assert refused.returncode != 0, refused.stdout + cluster.logs()
        assert "(migration-refused)" in refused.stderr, refused.stderr + cluster.logs()
        assert "USB host device feed:beef" in refused.stderr, refused.stderr
        assert "USB host device feed:f00d" in refused.stderr, refused.stderr
        # Refused in Begin: the destination never heard of it, A runs on.
        assert b.qemu_pids() == [] and b.domain_state("g1") is None
        assert "g1" not in b.agent_log("destination")
        assert a.domain_state("g1") == "running"
        serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=60)
        a.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()
