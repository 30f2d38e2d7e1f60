"""Display ports chosen by the host (autoport), recorded, and listen elements kept (issue 14)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest

import ferry.host
from ferry.config import AgentConfig, parse_config
from ferry.domain import Domain, GraphicsPorts, format_domain, parse_domain
from ferry.errors import ConfigError, QemuLaunchError, XMLUnsupported
from ferry.host import Host, _choose

HOST = {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10", "name": "hv-a"}

# What virt-install --graphics spice writes, with virt-manager's listen element.
VIRT_INSTALL_SPICE = """<domain type='qemu'><name>{name}</name><memory>65536</memory>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>
<graphics type="spice" port="-1" tlsPort="-1" autoport="yes">
  <listen type="address"/>
  <image compression="off"/>
</graphics>
</devices></domain>"""


def _spice(name: str = "g") -> Domain:
    return parse_domain(VIRT_INSTALL_SPICE.format(name=name))


def _config(tmp: Path, **graphics: Any) -> AgentConfig:
    return parse_config({
        "host": HOST,
        "paths": {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run")},
        "qemu": {"cgroup": "detached"},
        "graphics": graphics,
    })  # fmt: skip


# -- the XML ------------------------------------------------------------------------------


def test_virt_install_spice_round_trips_with_its_listen_element_and_tls_port() -> None:
    d = _spice()
    g = d.graphics[0]
    assert g.autoport and g.port is None and g.tls_port == -1
    assert g.listen is None and g.listen_element
    text = format_domain(d)
    assert 'tlsPort="-1"' in text and '<listen type="address"/>' in text
    assert parse_domain(text) == d
    assert parse_domain(format_domain(d, migratable=True)) == d


def test_listen_address_element_round_trips() -> None:
    d = parse_domain(
        "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><graphics type='vnc' port='-1'><listen type='address' address='::1'/>"
        "</graphics></devices></domain>")  # fmt: skip
    assert d.graphics[0].listen == "::1"
    assert '<listen type="address" address="::1"/>' in format_domain(d)
    assert parse_domain(format_domain(d)) == d


def test_listen_type_network_is_refused_clearly() -> None:
    with pytest.raises(XMLUnsupported, match="listen type 'network'") as info:
        parse_domain(
            "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type>"
            "</os><devices><graphics type='spice' autoport='yes'>"
            "<listen type='network' network='default'/></graphics></devices></domain>")
    assert "type='address'" in info.value.details["problems"][0]["hint"]


def test_recorded_ports_show_in_the_live_xml_and_not_in_the_migratable_one() -> None:
    d = _spice()
    live = dataclasses.replace(d, graphics=(
        dataclasses.replace(d.graphics[0], port=5900, tls_port=5901),))
    assert 'port="5900" autoport="yes" tlsPort="5901"' in format_domain(live)
    assert parse_domain(format_domain(live)) == live
    migratable = format_domain(live, migratable=True)
    assert "5900" not in migratable and "5901" not in migratable


# -- which ports a display needs --------------------------------------------------------------


def _picker() -> tuple[list[tuple[int, int, str]], Any]:
    calls: list[tuple[int, int, str]] = []
    nxt = iter(range(6000, 6100))

    def pick(lo: int, hi: int, what: str) -> int:
        calls.append((lo, hi, what))
        return next(nxt)

    return calls, pick


def test_spice_gets_a_plain_port_and_a_tls_port_only_where_the_host_has_tls() -> None:
    g = _spice().graphics[0]
    calls, pick = _picker()
    assert _choose(g, pick, (5900, 65535), (5700, 65535), tls=False, domain="g") == \
        GraphicsPorts(port=6000)
    assert _choose(g, pick, (5900, 65535), (5700, 65535), tls=True, domain="g") == \
        GraphicsPorts(port=6001, tls_port=6002)
    assert [c[2] for c in calls] == ["spice", "spice", "spice TLS"]


def test_secure_spice_needs_the_hosts_tls_and_then_has_no_plain_port() -> None:
    g = dataclasses.replace(_spice().graphics[0], default_mode="secure")
    _, pick = _picker()
    with pytest.raises(QemuLaunchError, match=r"\[graphics\] spice_tls_dir"):
        _choose(g, pick, (5900, 65535), (5700, 65535), tls=False, domain="g")
    assert _choose(g, pick, (5900, 65535), (5700, 65535), tls=True, domain="g") == \
        GraphicsPorts(port=None, tls_port=6000)


def test_vnc_ports_start_at_5900_and_websocket_takes_its_own_range() -> None:
    g = parse_domain(
        "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><graphics type='vnc' port='-1' websocket='-1'/></devices></domain>"
    ).graphics[0]
    calls, pick = _picker()
    assert _choose(g, pick, (5000, 5999), (5700, 5800), tls=False, domain="g") == \
        GraphicsPorts(port=6000, websocket=6001)
    assert calls == [(5900, 5999, "vnc"), (5700, 5800, "vnc websocket")]


# -- the host's choice ----------------------------------------------------------------------


def _free_range(count: int) -> tuple[int, int]:
    """A range of ``count`` ports that bind on 127.0.0.1 now (probably free for the test)."""
    for first in range(42000, 60000, 97):
        ok = True
        for port in range(first, first + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return first, first + count - 1
    raise AssertionError("no free port range")


def test_reserved_ports_are_skipped_and_a_bound_port_is_probed(tmp_path: Path) -> None:
    lo, hi = _free_range(4)
    host = Host(_config(tmp_path, port_range=[lo, hi]), "source")
    host.ensure_dirs()
    first, displays = host._reserve_graphics(_spice("one"))
    assert first == {0: GraphicsPorts(port=lo)}
    assert displays == [{"type": "spice", "port": lo, "tls_port": None, "websocket": None,
                         "listen": "127.0.0.1"}]
    assert host.ports_path("one").read_text() == f"[{lo}]"
    with socket.socket() as busy:  # someone else's listener on the next port
        busy.bind(("127.0.0.1", lo + 1))
        busy.listen()
        second, _ = host._reserve_graphics(_spice("two"))
    assert second == {0: GraphicsPorts(port=lo + 2)}
    # Choosing again for the same domain ignores its own old reservation.
    assert host._reserve_graphics(_spice("one"))[0] == {0: GraphicsPorts(port=lo)}
    host.cleanup("one")
    assert not host.ports_path("one").exists()


def test_no_free_port_names_the_setting(tmp_path: Path) -> None:
    lo, hi = _free_range(1)
    host = Host(_config(tmp_path, port_range=[lo, hi]), "source")
    host.ensure_dirs()
    host._reserve_graphics(_spice("one"))
    with pytest.raises(QemuLaunchError, match=r"port_range"):
        host._reserve_graphics(_spice("two"))


class _FakeProc:
    pid = 4242
    start_time = 1
    scope_unit = None


def test_start_passes_the_chosen_ports_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lo, hi = _free_range(2)
    config = _config(tmp_path, port_range=[lo, hi], listen="127.0.0.1")
    host = Host(config, "source")
    host.ensure_dirs()
    seen: dict[str, Any] = {}

    async def fake_launch(argv: list[str], **kwargs: Any) -> _FakeProc:
        seen["argv"] = argv
        seen["live"] = host.live_xml_path("g").read_text()
        return _FakeProc()

    monkeypatch.setattr(ferry.host, "launch", fake_launch)
    asyncio.run(host.start(_spice("g")))
    joined = " ".join(seen["argv"])
    assert f"-spice port={lo},addr=127.0.0.1," in joined
    assert f'port="{lo}" autoport="yes" tlsPort="-1"' in seen["live"]
    live = host.live_definition("g")
    assert live is not None and live.graphics[0].port == lo
    assert host.graphics("g") == [{"type": "spice", "port": lo, "tls_port": None,
                                   "websocket": None, "listen": "127.0.0.1"}]
    host.cleanup("g")
    assert not host.ports_path("g").exists()


def test_a_failed_launch_releases_the_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lo, hi = _free_range(2)
    host = Host(_config(tmp_path, port_range=[lo, hi]), "source")
    host.ensure_dirs()

    async def failing(argv: list[str], **kwargs: Any) -> _FakeProc:
        raise QemuLaunchError("qemu said no")

    monkeypatch.setattr(ferry.host, "launch", failing)
    with pytest.raises(QemuLaunchError):
        asyncio.run(host.start(_spice("g")))
    assert not host.ports_path("g").exists()
    assert not host.live_xml_path("g").exists()


# -- [graphics] ---------------------------------------------------------------------------


def test_graphics_config_defaults_and_checks(tmp_path: Path) -> None:
    cfg = parse_config({"host": HOST}).graphics
    assert (cfg.listen, cfg.port_range, cfg.spice_tls_dir) == ("127.0.0.1", (5900, 65535), None)
    assert _config(tmp_path, spice_tls_dir="/etc/pki/s").graphics.spice_tls_dir == \
        Path("/etc/pki/s")
    for bad, match in (({"listen": "localhost"}, "not an IP"),
                       ({"port_range": [6000, 5999]}, "FIRST, LAST"),
                       ({"port_range": [100, 200]}, "5900"),
                       ({"spice_tls_dir": "rel"}, "absolute"),
                       ({"colour": 1}, "unknown key")):
        with pytest.raises(ConfigError, match=match):
            _config(tmp_path, **bad)


def test_a_network_attribute_on_an_address_listen_is_not_dropped() -> None:
    with pytest.raises(XMLUnsupported, match="'network' only applies"):
        parse_domain(
            "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type>"
            "</os><devices><graphics type='vnc' port='-1'>"
            "<listen type='address' address='::1' network='x'/></graphics></devices></domain>")
