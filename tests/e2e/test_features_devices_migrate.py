"""virt-install's devices on a real agent: started, listed in the live XML, migrated (issue 14).

A guest with a sound card, a watchdog, a pvpanic and a guest-agent channel at
libvirt's per-run path (``/var/lib/libvirt/qemu/channel/target/domain-N-…``,
which ``virsh dumpxml`` shows and virt-install passes on). The channel's
socket goes into the host's own run directory and the live XML says so; the
definition keeps what it was given; the guest migrates live with all of it
and the destination's live XML names the destination's socket.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e

LIBVIRT_AGENT = "/var/lib/libvirt/qemu/channel/target/domain-7-g1/org.qemu.guest_agent.0"

DEVICES = f"""
    <channel type='unix'><source mode='bind' path='{LIBVIRT_AGENT}'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='disconnected'/>
      <alias name='channel0'/></channel>
    <sound model='ich9'/>
    <watchdog model='i6300esb' action='reset'/>
    <panic model='isa'/>
"""


def test_devices_start_show_their_socket_and_migrate(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "g1.xml"
    xml.write_text(guest_xml("g1", guest_kernel, virt_type=virt_type, extra_devices=DEVICES))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        placed_a = a.serial_socket("g1").parent / "org.qemu.guest_agent.0.sock"
        assert placed_a.exists()
        live = a.ferryctl("dumpxml", "g1", check=True).stdout
        assert f'path="{placed_a}"' in live and "libvirt" not in live, live
        assert '<sound model="ich9"/>' in live and '<watchdog model="i6300esb"' in live
        inactive = a.ferryctl("dumpxml", "g1", "--inactive", check=True).stdout
        assert LIBVIRT_AGENT in inactive

        # The boot line comes before the first report: wait for one (latest()
        # right after boot raced with it under load).
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        moved = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("g1") == "running"
        placed_b = b.serial_socket("g1").parent / "org.qemu.guest_agent.0.sock"
        assert placed_b.exists()
        live_b = b.ferryctl("dumpxml", "g1", check=True).stdout
        assert f'path="{placed_b}"' in live_b, live_b
        serial.reconnect(b.serial_socket("g1"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        b.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()
