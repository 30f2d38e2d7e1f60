"""<interface type='network'> through [networks.NAME], and taps Ferry makes itself (issue 14)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ferry.config import AgentConfig, parse_config
from ferry.domain import NicTap, RuntimePaths, parse_domain, to_qemu_argv
from ferry.errors import ConfigError, QemuLaunchError, XMLUnsupported
from ferry.netdev import bridge_of, check_networks, host_networks, network_problems
from ferry_destination.prepare import prepare

HOST = {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10", "name": "hv-a"}

XML = """<domain type='qemu'>
  <name>net</name>
  <memory>65536</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <interface type='network'>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <interface type='bridge'>
      <source bridge='br1'/>
      <model type='e1000'/>
    </interface>
    <interface type='user'/>
    <interface type='network'>
      <source network='storage'/>
    </interface>
  </devices>
</domain>
"""


def _config(**networks: Any) -> AgentConfig:
    return parse_config({"host": HOST, "networks": networks})


# -- [networks.NAME] ----------------------------------------------------------------------------


def test_networks_config() -> None:
    cfg = _config(default={"bridge": "br0"}, storage={"bridge": "br-stor.10"})
    assert {n: c.bridge for n, c in cfg.networks.items()} == {"default": "br0",
                                                              "storage": "br-stor.10"}
    assert parse_config({"host": HOST}).networks == {}
    for bad, match in (({"default": {}}, "bridge is required"),
                       ({"default": {"bridge": "a" * 16}}, "not an interface name"),
                       ({"default": {"bridge": "br 0"}}, "not an interface name"),
                       ({"default": {"bridge": "br0", "virtualport": "ovs"}},
                        "virtualport: 'ovs' is not supported"),
                       ({"default": {"bridge": "br0", "mode": "nat"}}, "unknown key"),
                       ({"default": "br0"}, "expected a table")):
        with pytest.raises(ConfigError, match=match):
            _config(**bad)


# -- define: an unmapped network is a problem like the others ----------------------------------


def test_define_lists_every_unmapped_network_with_line_and_setting() -> None:
    cfg = _config(default={"bridge": "br0"})
    parse_domain(XML)  # without a host: the XML alone is fine
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(XML, where="define", networks=host_networks(cfg))
    problems = info.value.details["problems"]
    assert [(p["line"], p["path"]) for p in problems] == [
        (16, "domain/devices/interface/source")]
    assert "network 'storage' is not mapped on host hv-a" in str(info.value)
    assert problems[0]["hint"].startswith(
        'add [networks.storage] bridge = "..." to agent.toml (the host bridge)')
    both = _config(default={"bridge": "br0"}, storage={"bridge": "br2"})
    domain = parse_domain(XML, where="define", networks=host_networks(both))
    assert [n.type for n in domain.interfaces] == ["network", "bridge", "user", "network"]


def test_unmapped_networks_are_listed_with_the_other_problems() -> None:
    xml = XML.replace("<interface type='user'/>", "<interface type='user'/><shmem/>")
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(xml, where="define", networks=host_networks(_config()))
    paths = sorted(str(p["path"]) for p in info.value.details["problems"])
    assert paths == ["domain/devices/interface/source", "domain/devices/interface/source",
                     "domain/devices/shmem"]


def test_a_network_name_toml_cannot_take_bare_is_quoted_in_the_hint() -> None:
    xml = XML.replace("network='storage'", "network='my net'")
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(xml, networks=host_networks(_config(default={"bridge": "br0"})))
    assert '[networks."my net"]' in info.value.details["problems"][0]["hint"]


def test_the_model_level_checks_name_the_setting() -> None:
    cfg = _config(default={"bridge": "br0"})
    domain = parse_domain(XML)
    assert len(network_problems(domain, cfg)) == 1
    with pytest.raises(XMLUnsupported, match=r"add \[networks.storage\] bridge"):
        check_networks(domain, cfg, where="start")
    assert [bridge_of(n, cfg) for n in domain.interfaces[:3]] == ["br0", "br1", None]
    with pytest.raises(XMLUnsupported, match="'storage' is not mapped on host hv-a"):
        bridge_of(domain.interfaces[3], cfg)


def test_prepare_refuses_a_network_the_destination_does_not_map() -> None:
    dst = SimpleNamespace(config=_config(default={"bridge": "br0"}))
    with pytest.raises(XMLUnsupported, match=r"add \[networks.storage\] bridge"):
        asyncio.run(prepare(dst, None, {"xml": XML}))  # type: ignore[arg-type]


# -- the argv: a tap descriptor per bridge/network NIC ---------------------------------------


def test_taps_are_passed_as_descriptors() -> None:
    domain = parse_domain(XML)
    paths = RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/p"))
    argv = to_qemu_argv(domain, paths=paths, nic_taps={
        0: NicTap(fd=7, ifname="ferry0", vnet_hdr=True), 1: NicTap(fd=8, ifname="ferry1"),
        3: NicTap(fd=9, ifname="ferry2")})  # fmt: skip
    joined = " ".join(argv)
    assert "-netdev tap,id=hostnet0,fd=7 " in joined
    assert "-netdev tap,id=hostnet1,fd=8 " in joined
    assert "-netdev user,id=hostnet2 " in joined
    assert "-netdev tap,id=hostnet3,fd=9 " in joined
    assert "bridge" not in joined
    # Without a tap, a bridge NIC still has qemu's helper; a network NIC has nothing.
    with pytest.raises(XMLUnsupported, match=r"\[networks.default\]"):
        to_qemu_argv(domain, paths=paths)


# -- real taps, in a network namespace of their own -------------------------------------------

_IN_NETNS = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    from ferry.config import parse_config
    from ferry.domain import parse_domain
    from ferry.netdev import open_taps
    subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)  # this netns' view
    subprocess.run(["ip", "link", "add", "br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "add", "br1", "type", "bridge"], check=True)
    cfg = parse_config({"host": {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10", "name": "a"},
                        "networks": {"default": {"bridge": "br0"}, "storage": {"bridge": "br1"}}})
    seen = {}
    with open_taps(parse_domain(sys.stdin.read()), cfg) as taps:
        for i, tap in taps.items():
            net = Path("/sys/class/net") / tap.ifname
            seen[i] = [tap.ifname, (net / "master").resolve().name,
                       (net / "operstate").read_text().strip() != "", tap.vnet_hdr]
    seen["left"] = sorted(p.name for p in Path("/sys/class/net").iterdir()
                          if p.name.startswith("ferry"))
    print(json.dumps(seen))
""")


def _netns_ok() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and \
        shutil.which("ip") is not None and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _netns_ok(), reason="needs root, unshare, ip and /dev/net/tun")
def test_taps_are_made_attached_and_gone_with_their_descriptor() -> None:
    argv = ["unshare", "--net", "--mount", sys.executable, "-c", _IN_NETNS]
    done = subprocess.run(argv, input=XML,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    import json

    seen = json.loads(done.stdout)
    assert seen["0"][1] == "br0" and seen["0"][3] is True
    assert seen["1"][1] == "br1" and seen["1"][3] is False
    assert seen["3"][1] == "br1"
    assert "2" not in seen  # user networking has no tap
    assert len({seen[k][0] for k in ("0", "1", "3")}) == 3
    assert all(seen[k][0].startswith("ferry") for k in ("0", "1", "3"))
    assert seen["left"] == []  # closed descriptors: the kernel removed the taps


@pytest.mark.skipif(not _netns_ok(), reason="needs root, unshare, ip and /dev/net/tun")
def test_a_missing_bridge_is_named_and_leaves_no_tap() -> None:
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from ferry.config import parse_config
        from ferry.domain import parse_domain
        from ferry.errors import QemuLaunchError
        from ferry.netdev import open_taps
        import subprocess
        subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
        cfg = parse_config({"host": {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10",
                                     "name": "a"}, "networks": {"default": {"bridge": "br9"}}})
        xml = sys.stdin.read()
        try:
            with open_taps(parse_domain(xml), cfg):
                pass
        except QemuLaunchError as exc:
            print(exc)
        print(sorted(p.name for p in Path("/sys/class/net").iterdir()))
    """)
    xml = XML.split("<interface type='bridge'>")[0] + "</devices></domain>"
    done = subprocess.run(["unshare", "--net", "--mount", sys.executable, "-c", code], input=xml,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "bridge 'br9' does not exist" in done.stdout
    assert "ip link add br9 type bridge" in done.stdout
    assert "['lo']" in done.stdout


def test_no_tun_device_is_a_clear_launch_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ferry.netdev

    def no_tun(vnet_hdr: bool) -> tuple[int, str]:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ferry.netdev, "_create_tap", no_tun)
    with pytest.raises(QemuLaunchError, match="CAP_NET_ADMIN"), \
            ferry.netdev.open_taps(parse_domain(XML), _config(default={"bridge": "br0"})):
        pass


# -- Open vSwitch -------------------------------------------------------------------------------

OVS_NIC = """<domain type='qemu'>
  <name>ovs</name>
  <uuid>5a1f0c2e-8b3d-4f6a-9e7c-2d4b6a8c0e11</uuid>
  <memory>65536</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:0f:00:01'/>
      <source bridge='ovsbr0'/>
      <virtualport type='openvswitch'>
        <parameters interfaceid='0B5E6F1C-7D2A-4E8B-9C3F-1A2B3C4D5E6F' profileid='gold'/>
      </virtualport>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:0f:00:02'/>
      <source network='sdn'/>
    </interface>
  </devices>
</domain>
"""


def test_openvswitch_config() -> None:
    cfg = parse_config({"host": HOST, "networks": {"sdn": {"bridge": "ovsbr0",
                                                           "virtualport": "openvswitch"}},
                        "openvswitch": {"db": "unix:/run/ovs/db.sock"}})  # fmt: skip
    assert cfg.networks["sdn"].virtualport == "openvswitch"
    assert cfg.openvswitch.db == "unix:/run/ovs/db.sock" and cfg.openvswitch.vsctl == "ovs-vsctl"
    with pytest.raises(ConfigError, match=r"virtualport: '802\.1Qbh' is not supported"):
        _config(sdn={"bridge": "br0", "virtualport": "802.1Qbh"})
    with pytest.raises(ConfigError, match=r"\[openvswitch\] vsctl and db must not be empty"):
        parse_config({"host": HOST, "openvswitch": {"db": " "}})


def test_virtualport_parses_and_round_trips() -> None:
    from ferry.domain import format_domain

    d = parse_domain(OVS_NIC)
    vp = d.interfaces[0].virtualport
    assert vp is not None and vp.type == "openvswitch" and vp.profileid == "gold"
    assert vp.interfaceid == "0b5e6f1c-7d2a-4e8b-9c3f-1a2b3c4d5e6f"  # canonical form
    assert d.interfaces[1].virtualport is None
    assert parse_domain(format_domain(d)) == d


@pytest.mark.parametrize(("fragment", "words"), [
    ("<virtualport type='802.1Qbh'/>", "virtualport type"),
    ("<virtualport/>", "<virtualport> needs a type"),
    ("<virtualport type='openvswitch'><parameters interfaceid='nope'/></virtualport>",
     "invalid UUID"),
])  # fmt: skip
def test_bad_virtualport_is_refused_with_its_problem(fragment: str, words: str) -> None:
    from ferry.errors import XMLError

    xml = OVS_NIC.replace("<source network='sdn'/>", "<source network='sdn'/>" + fragment)
    with pytest.raises(XMLError, match=words):
        parse_domain(xml)


def test_user_interface_has_no_switch_port() -> None:
    from ferry.errors import XMLError

    xml = OVS_NIC.replace("<interface type='network'>\n      <mac address='52:54:00:0f:00:02'/>\n"
                          "      <source network='sdn'/>",
                          "<interface type='user'><virtualport type='openvswitch'/>")  # fmt: skip
    with pytest.raises(XMLError, match="has no switch port"):
        parse_domain(xml)


def test_switch_ports_and_their_ovs_vsctl_argv() -> None:
    from ferry import ovs
    from ferry.netdev import switch_port_of

    cfg = parse_config({"host": HOST, "networks": {
        "sdn": {"bridge": "ovsbr0", "virtualport": "openvswitch"}, "plain": {"bridge": "br0"}},
        "openvswitch": {"db": "unix:/x/db.sock"}})  # fmt: skip
    d = parse_domain(OVS_NIC)
    explicit = switch_port_of(d, d.interfaces[0], "ovsbr0", "ferry3", cfg)
    derived = switch_port_of(d, d.interfaces[1], "ovsbr0", "ferry4", cfg)
    assert explicit is not None and derived is not None
    assert explicit.interface_id == "0b5e6f1c-7d2a-4e8b-9c3f-1a2b3c4d5e6f"
    # Derived from UUID and MAC: the same on every host, different per NIC.
    assert derived.interface_id == ovs.default_interface_id(d.uuid, "52:54:00:0F:00:02")
    assert derived.interface_id != ovs.default_interface_id(d.uuid, "52:54:00:0f:00:01")
    argv = ovs.add_port_argv(cfg.openvswitch, explicit)
    assert argv[:3] == ["ovs-vsctl", "--db=unix:/x/db.sock", "--timeout=10"]
    assert argv[3:12] == ["--", "--if-exists", "del-port", "ferry3",
                          "--", "add-port", "ovsbr0", "ferry3", "--"]  # fmt: skip
    assert f'external-ids:iface-id="{explicit.interface_id}"' in argv
    assert f'external-ids:vm-id="{d.uuid}"' in argv
    assert 'external-ids:port-profile="gold"' in argv
    # A NIC on a network mapped to a Linux bridge is not a switch port.
    plain = parse_domain(OVS_NIC.replace("network='sdn'", "network='plain'"))
    assert switch_port_of(plain, plain.interfaces[1], "br0", "ferry5", cfg) is None
