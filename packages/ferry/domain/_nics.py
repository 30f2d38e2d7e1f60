"""Network interfaces: ``<interface>``."""

from __future__ import annotations

import re
import secrets
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import check_safe_text, fail, normalise_mac
from ferry.domain._context import Ctx, DeviceEnv
from ferry.domain._values import enum, get, ident, int_attr, one, text, uint
from ferry.domain.model import Interface

__all__ = ["parse_interface"]

BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def _random_mac() -> str:
    # libvirt's prefix for generated addresses (QEMU's OUI).
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def parse_interface(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Interface:
    """An ``<interface>``: user, bridge or network."""
    path = "domain/devices/interface"
    loc = ctx.loc(el, path)
    itype = enum(el, "type", loc, ("user", "bridge", "network"), what="interface type")
    if itype is None:
        raise fail(loc, "<interface> needs a type")
    mac_el = one(el, "mac", loc)
    if mac_el is not None:
        mloc = ctx.loc(mac_el, f"{path}/mac")
        raw = get(mac_el, "address")
        if raw is None:
            raise fail(mloc, "<mac> needs an address")
        mac = normalise_mac(raw, mloc)
    else:
        mac = _random_mac()
    model = None
    m = one(el, "model", loc)
    if m is not None:
        model = enum(m, "type", ctx.loc(m, f"{path}/model"),
                     ("virtio", "rtl8139", "e1000", "e1000e"), what="NIC model")
    source = None
    s = one(el, "source", loc)
    if s is not None:
        sloc = ctx.loc(s, f"{path}/source")
        net, br = get(s, "network"), get(s, "bridge")
        if itype == "network" and net is not None and br is None:
            source = check_safe_text(net, sloc, "network name")
            if not source:
                raise fail(sloc, "empty network name")
        elif itype == "bridge" and br is not None and net is None:
            source = ident(br, sloc, "bridge name", BRIDGE_RE)
        elif itype == "user" and net is None and br is None:
            pass
        else:
            raise fail(sloc, f"<source> does not fit an interface of type {itype!r}")
    if itype in ("bridge", "network") and source is None:
        raise fail(loc, f"an interface of type {itype!r} needs <source {itype}=…>")
    mtu = None
    mt = one(el, "mtu", loc)
    if mt is not None:
        mtu = int_attr(mt, "size", ctx.loc(mt, f"{path}/mtu"), lo=68, hi=65535)
        if mtu is None:
            raise fail(ctx.loc(mt, f"{path}/mtu"), "<mtu> needs a size")
    sndbuf = None
    tune = one(el, "tune", loc)
    if tune is not None:
        sb = one(tune, "sndbuf", ctx.loc(tune, f"{path}/tune"))
        if sb is not None:
            sndbuf = uint(text(sb), ctx.loc(sb, f"{path}/tune/sndbuf"), "sndbuf")
    return Interface(type=cast(Any, itype), mac=mac, model=model, source=source, mtu=mtu,
                     sndbuf=sndbuf, address=parse_address(ctx, el, loc, ("pci",)))

