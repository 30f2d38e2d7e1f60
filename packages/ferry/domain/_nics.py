"""Network interfaces: ``<interface>``."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, check_safe_text, fail, normalise_mac, normalise_uuid
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, ident, int_attr, one, text, uint
from ferry.domain.model import Interface, VirtualPort
from ferry.errors import XMLUnsupported

__all__ = ["HostNetworks", "check_host_networks", "network_table", "parse_interface"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def network_table(name: str) -> str:
    """The TOML table of network ``name`` in the agent configuration: ``networks.NAME``."""
    return f"networks.{name}" if _BARE_KEY.match(name) else f"networks.{json.dumps(name)}"


@dataclass(frozen=True)
class HostNetworks:
    """The network names a host maps to bridges (``[networks.NAME]``), for define."""

    names: frozenset[str]
    #: The host's name and configuration file, for the message and hint.
    host: str
    config_file: str = "agent.toml"


def check_host_networks(ctx: Ctx, root: etree._Element, networks: HostNetworks) -> None:
    """Report every ``<interface type='network'>`` whose network the host does not map."""
    for el in root.iterfind("devices/interface"):
        if get(el, "type") != "network":
            continue
        for s in el.iterfind("source"):
            name = get(s, "network")
            if name is None or name in networks.names:
                continue
            setting = f'add [{network_table(name)}] bridge = "..." to {networks.config_file}'
            ctx.report(ctx.loc(s, f"{_NIC}/source"),
                       f"network {name!r} is not mapped on host {networks.host}: {setting}",
                       cls=XMLUnsupported, kind="unsupported-value", attribute="network",
                       value=name, hint=f"{setting} (the host bridge), or use another network")

BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_NIC = "domain/devices/interface"


def _random_mac() -> str:
    # libvirt's prefix for generated addresses (QEMU's OUI).
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def parse_interface(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Interface:
    """An ``<interface>``: user, bridge or network."""
    loc = ctx.loc(el, _NIC)
    itype = enum(el, "type", loc, ("user", "bridge", "network"), what="interface type")
    if itype is None:
        raise fail(loc, "<interface> needs a type", hint="add type='bridge' (or user, network)")
    mark = ctx.count
    mac = ctx.guard(_mac, ctx, el, loc)
    model = ctx.guard(_model, ctx, el, loc)
    source = ctx.guard(_source, ctx, el, loc, itype)
    mtu = ctx.guard(_mtu, ctx, el, loc)
    sndbuf = ctx.guard(_sndbuf, ctx, el, loc)
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    virtualport = ctx.guard(_virtualport, ctx, el, loc, itype)
    if mac is None or ctx.count != mark:
        raise Skip()
    return Interface(type=cast(Any, itype), mac=mac, model=model, source=source, mtu=mtu,
                     sndbuf=sndbuf, address=address, virtualport=virtualport)


def _virtualport(ctx: Ctx, el: etree._Element, loc: Loc, itype: str) -> VirtualPort | None:
    """``<virtualport type='openvswitch'>`` (libvirt's other port types need switch
    hardware (802.1Qbg/Qbh) or a MidoNet controller that Ferry does not drive)."""
    vp = one(ctx, el, "virtualport", loc)
    if vp is None:
        return None
    vloc = ctx.loc(vp, f"{_NIC}/virtualport")
    vtype = enum(vp, "type", vloc, ("openvswitch",), what="virtualport type")
    if vtype is None:
        raise fail(vloc, "<virtualport> needs a type", hint="add type='openvswitch'")
    if itype not in ("bridge", "network"):
        raise fail(vloc, f"an interface of type {itype!r} has no switch port",
                   hint="remove <virtualport>, or use type='bridge' with an Open vSwitch bridge")
    interfaceid = profileid = None
    params = one(ctx, vp, "parameters", vloc)
    if params is not None:
        ploc = ctx.loc(params, f"{_NIC}/virtualport/parameters")
        raw = get(params, "interfaceid")
        if raw is not None:
            interfaceid = normalise_uuid(raw, ploc)
        raw = get(params, "profileid")
        if raw is not None:
            profileid = check_safe_text(raw, ploc, "profileid")
            if not 0 < len(profileid) <= 255:
                raise fail(ploc, "profileid must have 1 to 255 characters",
                           hint="shorten profileid or remove it")
    return VirtualPort(type="openvswitch", interfaceid=interfaceid, profileid=profileid)


def _mac(ctx: Ctx, el: etree._Element, loc: Loc) -> str:
    mac_el = one(ctx, el, "mac", loc)
    if mac_el is None:
        return _random_mac()
    mloc = ctx.loc(mac_el, f"{_NIC}/mac")
    raw = get(mac_el, "address")
    if raw is None:
        raise fail(mloc, "<mac> needs an address", hint="add address='52:54:00:…' or remove <mac>")
    return normalise_mac(raw, mloc)


def _model(ctx: Ctx, el: etree._Element, loc: Loc) -> str | None:
    m = one(ctx, el, "model", loc)
    if m is None:
        return None
    return enum(m, "type", ctx.loc(m, f"{_NIC}/model"),
                ("virtio", "rtl8139", "e1000", "e1000e"), what="NIC model")


def _source(ctx: Ctx, el: etree._Element, loc: Loc, itype: str) -> str | None:
    source = None
    s = one(ctx, el, "source", loc)
    if s is not None:
        sloc = ctx.loc(s, f"{_NIC}/source")
        net, br = get(s, "network"), get(s, "bridge")
        if itype == "network" and net is not None and br is None:
            source = check_safe_text(net, sloc, "network name")
            if not source:
                raise fail(sloc, "empty network name", hint="name the network")
        elif itype == "bridge" and br is not None and net is None:
            source = ident(br, sloc, "bridge name", BRIDGE_RE)
        elif itype == "user" and net is None and br is None:
            pass
        else:
            raise fail(sloc, f"<source> does not fit an interface of type {itype!r}",
                       hint=_SOURCE_HINT[itype])
    if itype in ("bridge", "network") and source is None:
        raise fail(loc, f"an interface of type {itype!r} needs <source {itype}=…>",
                   hint=_SOURCE_HINT[itype])
    return source


_SOURCE_HINT = {
    "user": "remove <source>: a user interface has none",
    "bridge": "use <source bridge='br0'/> (the host bridge's name)",
    "network": "use <source network='NAME'/>",
}


def _mtu(ctx: Ctx, el: etree._Element, loc: Loc) -> int | None:
    mt = one(ctx, el, "mtu", loc)
    if mt is None:
        return None
    mtloc = ctx.loc(mt, f"{_NIC}/mtu")
    mtu = int_attr(mt, "size", mtloc, lo=68, hi=65535)
    if mtu is None:
        raise fail(mtloc, "<mtu> needs a size", hint="add size='1500' or remove <mtu>")
    return mtu


def _sndbuf(ctx: Ctx, el: etree._Element, loc: Loc) -> int | None:
    tune = one(ctx, el, "tune", loc)
    if tune is None:
        return None
    sb = one(ctx, tune, "sndbuf", ctx.loc(tune, f"{_NIC}/tune"))
    if sb is None:
        return None
    return uint(text(sb), ctx.loc(sb, f"{_NIC}/tune/sndbuf"), "sndbuf")
