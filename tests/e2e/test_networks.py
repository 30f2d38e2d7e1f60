"""Networks through [networks.NAME], taps Ferry makes itself, spice autoport (issue 14).

Each host is a network namespace, so a test makes its bridges there
(``ip link add br0 type bridge``). Host A maps virt-install's
``network='default'`` to br0, host B to br-lan: the same XML starts on both.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

NICS = """
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <interface type='bridge'><source bridge='br0'/><model type='e1000'/></interface>
    <graphics type='spice' port='-1' tlsPort='-1' autoport='yes'><listen type='address'/>
    </graphics>
"""


def _in_ns(host: HostEnv, *argv: str) -> str:
    done = subprocess.run(host.ns.exec_argv(list(argv)), capture_output=True, text=True,
                          timeout=30, check=True)  # fmt: skip
    return done.stdout


def _taps(host: HostEnv) -> dict[str, str]:
    """Ferry's tap devices in ``host``'s namespace and the bridge each is attached to."""
    out: dict[str, str] = {}
    for line in _in_ns(host, "ip", "-o", "link", "show").splitlines():
        m = re.match(r"\d+: (ferry\d+)[:@].* master (\S+)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _spice_port(host: HostEnv, name: str) -> int:
    xml = host.ferryctl("dumpxml", name, check=True).stdout
    m = re.search(r'<graphics type="spice" port="(\d+)" autoport="yes"', xml)
    assert m, xml
    return int(m.group(1))


def _listening(host: HostEnv, port: int) -> bool:
    return f":{port} " in _in_ns(host, "ss", "-Hltn") + " "


def test_network_nics_start_and_migrate_with_the_hosts_bridges(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    _in_ns(a, "ip", "link", "add", "br0", "type", "bridge")
    for bridge in ("br0", "br-lan"):
        _in_ns(b, "ip", "link", "add", bridge, "type", "bridge")
    a.write_config(**{"networks.default.bridge": "br0"})
    cluster.start()
    xml = tmp_path / "g1.xml"
    xml.write_text(guest_xml("g1", guest_kernel, virt_type=virt_type, extra_devices=NICS))

    # A host without the mapping refuses the definition, naming the setting.
    refused = b.ferryctl("define", str(xml))
    assert refused.returncode == 1
    assert "(xml-unsupported)" in refused.stderr
    assert "network 'default' is not mapped on host b" in refused.stderr
    assert '[networks.default] bridge = "..."' in refused.stderr
    assert b.domain_state("g1") is None

    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        taps = _taps(a)
        assert sorted(taps.values()) == ["br0", "br0"], taps  # network default and bridge br0
        port = _spice_port(a, "g1")
        assert port >= 5900 and _listening(a, port)
        assert 'tlsPort="-1"' in a.ferryctl("dumpxml", "g1", "--inactive", check=True).stdout

        # B does not map the network yet: Prepare refuses, the guest stays on A.
        moved = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert moved.returncode != 0
        assert "[networks.default]" in moved.stderr, moved.stderr
        assert a.domain_state("g1") == "running"
        assert b.qemu_pids() == []

        b.stop_agent("destination")
        b.write_config(**{"networks.default.bridge": "br-lan"})
        b.start_agent("destination")
        # The boot line comes before the first report: wait for one (latest()
        # right after boot raced with it under load).
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        moved = a.ferryctl("migrate", "g1", b.uri, "--live", "--json", timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("g1") == "running"
        wait_until(lambda: not _taps(a), 20, "A's taps to go with its qemu")
        assert sorted(_taps(b).values()) == ["br-lan", "br0"]
        port_b = _spice_port(b, "g1")
        assert _listening(b, port_b)
        # The destination's ports reached the source in the cookie (spice clients follow).
        assert f"spice clients told to follow to 127.0.0.1:{port_b}" in a.agent_log("source")
        serial.reconnect(b.serial_socket("g1"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0

        b.ferryctl("destroy", "g1", check=True)
        wait_until(lambda: not _taps(b), 20, "B's taps to go with its qemu")
    finally:
        serial.close()
