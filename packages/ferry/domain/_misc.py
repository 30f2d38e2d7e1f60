"""Other devices: ``<input>``, ``<memballoon>`` and ``<rng>``."""

from __future__ import annotations

from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, int_attr, one, text
from ferry.domain.model import Input, Memballoon, Rng

__all__ = ["parse_input", "parse_memballoon", "parse_rng"]


def parse_input(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Input:
    """An ``<input>``: mouse, keyboard or tablet."""
    loc = ctx.loc(el, "domain/devices/input")
    itype = enum(el, "type", loc, ("mouse", "keyboard", "tablet"), what="input type")
    if itype is None:
        raise fail(loc, "<input> needs a type", hint="add type='tablet' (or mouse, keyboard)")
    bus = enum(el, "bus", loc, ("ps2", "usb", "virtio"), what="input bus",
               default="usb" if itype == "tablet" else "ps2")
    mark = ctx.count
    if itype == "tablet" and bus == "ps2":
        ctx.report(loc, "a tablet cannot be on the ps2 bus", hint="use bus='usb'")
    address = ctx.guard(parse_address, ctx, el, loc, ("usb", "pci"))
    expected = {"usb": "usb", "virtio": "pci"}.get(bus or "")
    if address is not None and address.type != expected:
        ctx.report(loc, f"a {bus} input does not take a {address.type} address",
                   kind="conflict", hint=(f"use an address of type '{expected}'" if expected
                                          else "remove the address"))
    if ctx.count != mark:
        raise Skip()
    return Input(type=cast(Any, itype), bus=cast(Any, bus), address=address)


def parse_memballoon(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Memballoon:
    """The ``<memballoon>`` (virtio or none)."""
    loc = ctx.loc(el, "domain/devices/memballoon")
    model = enum(el, "model", loc, ("virtio", "none"), what="memballoon model")
    if model is None:
        raise fail(loc, "<memballoon> needs a model", hint="add model='virtio' (or 'none')")
    mark = ctx.count
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if address is not None and model == "none":
        ctx.report(loc, "memballoon model 'none' takes no address", hint="remove the address")
    if ctx.count != mark:
        raise Skip()
    return Memballoon(model=cast(Any, model), address=address)


# Host entropy sources a guest may read; anything else under /dev is refused.
_RNG_SOURCES = ("/dev/urandom", "/dev/random", "/dev/hwrng")
_RNG = "domain/devices/rng"


def parse_rng(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Rng:
    """A virtio ``<rng>`` with a random or builtin backend."""
    loc = ctx.loc(el, _RNG)
    mark = ctx.count
    ctx.guard(enum, el, "model", loc, ("virtio",), what="rng model")
    backend = ctx.guard(_rng_backend, ctx, el, loc)
    rate = ctx.guard(_rng_rate, ctx, el, loc)
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if backend is None or rate is None or ctx.count != mark:
        raise Skip()
    (bmodel, bpath), (rate_bytes, rate_period) = backend, rate
    return Rng(backend_model=cast(Any, bmodel), backend_path=bpath, rate_bytes=rate_bytes,
               rate_period=rate_period, address=address)


def _rng_backend(ctx: Ctx, el: etree._Element, loc: Loc) -> tuple[str, str | None]:
    """The backend model and (for random) the host source."""
    be = one(ctx, el, "backend", loc)
    if be is None:
        raise fail(loc, "<rng> needs a <backend>",
                   hint="add <backend model='random'>/dev/urandom</backend>")
    bloc = ctx.loc(be, f"{_RNG}/backend")
    bmodel = enum(be, "model", bloc, ("random", "builtin"), what="rng backend")
    if bmodel is None:
        raise fail(bloc, "<backend> needs a model", hint="add model='random' (or 'builtin')")
    bpath = None
    content = text(be).strip()
    if bmodel == "random":
        bpath = content or "/dev/urandom"
        if bpath not in _RNG_SOURCES:
            raise fail(bloc, f"rng source {bpath!r} is not allowed (allowed: "
                             f"{', '.join(_RNG_SOURCES)})", hint="use /dev/urandom")
    elif content:
        raise fail(bloc, "the builtin backend takes no path", hint="remove the path")
    return bmodel, bpath


def _rng_rate(ctx: Ctx, el: etree._Element, loc: Loc) -> tuple[int | None, int | None]:
    """The rate limit: bytes per period (ms)."""
    rate = one(ctx, el, "rate", loc)
    if rate is None:
        return None, None
    rloc = ctx.loc(rate, f"{_RNG}/rate")
    rate_bytes = int_attr(rate, "bytes", rloc, lo=1, hi=1 << 31)
    rate_period = int_attr(rate, "period", rloc, lo=1, hi=1 << 31)
    if rate_bytes is None:
        raise fail(rloc, "<rate> needs bytes", hint="add bytes='1024' or remove <rate>")
    return rate_bytes, rate_period
