"""Other devices: ``<input>``, ``<memballoon>`` and ``<rng>``."""

from __future__ import annotations

from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import fail
from ferry.domain._context import Ctx, DeviceEnv
from ferry.domain._values import enum, int_attr, one, text
from ferry.domain.model import Input, Memballoon, Rng

__all__ = ["parse_input", "parse_memballoon", "parse_rng"]


def parse_input(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Input:
    """An ``<input>``: mouse, keyboard or tablet."""
    loc = ctx.loc(el, "domain/devices/input")
    itype = enum(el, "type", loc, ("mouse", "keyboard", "tablet"), what="input type")
    if itype is None:
        raise fail(loc, "<input> needs a type")
    bus = enum(el, "bus", loc, ("ps2", "usb", "virtio"), what="input bus",
               default="usb" if itype == "tablet" else "ps2")
    if itype == "tablet" and bus == "ps2":
        raise fail(loc, "a tablet cannot be on the ps2 bus")
    address = parse_address(ctx, el, loc, ("usb", "pci"))
    if address is not None and address.type != {"usb": "usb", "virtio": "pci"}.get(bus or ""):
        raise fail(loc, f"a {bus} input does not take a {address.type} address")
    return Input(type=cast(Any, itype), bus=cast(Any, bus), address=address)



def parse_memballoon(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Memballoon:
    """The ``<memballoon>`` (virtio or none)."""
    loc = ctx.loc(el, "domain/devices/memballoon")
    model = enum(el, "model", loc, ("virtio", "none"), what="memballoon model")
    if model is None:
        raise fail(loc, "<memballoon> needs a model")
    address = parse_address(ctx, el, loc, ("pci",))
    if address is not None and model == "none":
        raise fail(loc, "memballoon model 'none' takes no address")
    return Memballoon(model=cast(Any, model), address=address)


# Host entropy sources a guest may read; anything else under /dev is refused.
_RNG_SOURCES = ("/dev/urandom", "/dev/random", "/dev/hwrng")


def parse_rng(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Rng:
    """A virtio ``<rng>`` with a random or builtin backend."""
    path = "domain/devices/rng"
    loc = ctx.loc(el, path)
    enum(el, "model", loc, ("virtio",), what="rng model")
    be = one(el, "backend", loc)
    if be is None:
        raise fail(loc, "<rng> needs a <backend>")
    bloc = ctx.loc(be, f"{path}/backend")
    bmodel = enum(be, "model", bloc, ("random", "builtin"), what="rng backend")
    if bmodel is None:
        raise fail(bloc, "<backend> needs a model")
    bpath = None
    content = text(be).strip()
    if bmodel == "random":
        bpath = content or "/dev/urandom"
        if bpath not in _RNG_SOURCES:
            raise fail(bloc, f"rng source {bpath!r} is not allowed (allowed: "
                             f"{', '.join(_RNG_SOURCES)})")
    elif content:
        raise fail(bloc, "the builtin backend takes no path")
    rate_bytes = rate_period = None
    rate = one(el, "rate", loc)
    if rate is not None:
        rloc = ctx.loc(rate, f"{path}/rate")
        rate_bytes = int_attr(rate, "bytes", rloc, lo=1, hi=1 << 31)
        rate_period = int_attr(rate, "period", rloc, lo=1, hi=1 << 31)
        if rate_bytes is None:
            raise fail(rloc, "<rate> needs bytes")
    return Rng(backend_model=cast(Any, bmodel), backend_path=bpath, rate_bytes=rate_bytes,
               rate_period=rate_period, address=parse_address(ctx, el, loc, ("pci",)))

