"""A q35 guest with virt-install's root port tree, devices on the ports, migrated live (issue 14).

virt-install writes fourteen unnumbered ``pcie-root-port`` controllers for
every q35 guest; ``virsh dumpxml`` then shows devices on the buses they
make. This guest has both: the tree as virt-install writes it, a virtio NIC
on bus 1 and a virtio rng on bus 3 (root ports 1 and 3), and a
pcie-to-pci-bridge on root port 14 with an e1000 behind it. It starts on a
real agent, migrates live, and the guest's memory counter goes on: the
destination's qemu took the stream, which it does only for the same tree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e

TREE = (
    "<controller type='pci' model='pcie-root'/>"
    + "<controller type='pci' model='pcie-root-port'/>" * 14
    + "<controller type='pci' index='15' model='pcie-to-pci-bridge'>"
      "<model name='pcie-pci-bridge'/>"
      "<address type='pci' domain='0x0000' bus='0x0e' slot='0x00' function='0x0'/></controller>"
    "<interface type='user'><mac address='52:54:00:14:00:01'/><model type='virtio'/>"
    "<address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>"
    "<interface type='user'><mac address='52:54:00:14:00:02'/><model type='e1000'/>"
    "<address type='pci' domain='0x0000' bus='0x0f' slot='0x01' function='0x0'/></interface>"
    "<rng model='virtio'><backend model='random'>/dev/urandom</backend>"
    "<address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/></rng>"
)


def test_q35_root_port_guest_migrates_live(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "q35.xml"
    text = guest_xml("q35", guest_kernel, virt_type=virt_type, extra_devices=TREE)
    xml.write_text(text.replace("machine='pc'", "machine='q35'"))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "q35", check=True)
    serial = testguest.SerialReader(a.serial_socket("q35"))
    try:
        serial.wait_for_boot(timeout=60)
        live = a.ferryctl("dumpxml", "q35", check=True).stdout
        assert live.count('model="pcie-root-port"') == 14 and 'index="14"' in live, live
        # The boot line comes before the first report: wait for one (latest()
        # right after boot raced with it under load).
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        moved = a.ferryctl("migrate", "q35", b.uri, "--live", "--json", timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("q35") == "running"
        live_b = b.ferryctl("dumpxml", "q35", check=True).stdout
        assert "bus=\"0x0f\" slot=\"0x01\"" in live_b, live_b
        serial.reconnect(b.serial_socket("q35"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        b.ferryctl("destroy", "q35", check=True)
    finally:
        serial.close()
