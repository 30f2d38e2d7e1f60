"""Other devices: ``<input>``, ``<memballoon>``, ``<rng>``, ``<sound>``,
``<redirdev>``, ``<watchdog>`` and ``<panic>``."""

from __future__ import annotations

from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, check_listen, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import all_of, enum, get, int_attr, one, text
from ferry.domain.model import Input, Memballoon, Panic, Redirdev, Rng, Sound, Watchdog
from ferry.errors import XMLUnsupported

__all__ = [
    "parse_input",
    "parse_memballoon",
    "parse_panic",
    "parse_redirdev",
    "parse_rng",
    "parse_sound",
    "parse_watchdog",
]


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


_SOUND = "domain/devices/sound"


def parse_sound(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Sound:
    """A ``<sound>`` card: ich9 or ich6 (Intel HDA, with codecs) or ac97."""
    loc = ctx.loc(el, _SOUND)
    model = enum(el, "model", loc, ("ich9", "ich6", "ac97"), what="sound model")
    if model is None:
        raise fail(loc, "<sound> needs a model", hint="add model='ich9'")
    mark = ctx.count
    codecs: list[str] = []
    for c in all_of(el, "codec"):
        cloc = ctx.loc(c, f"{_SOUND}/codec")
        ctype = ctx.guard(enum, c, "type", cloc, ("duplex", "micro", "output"),
                          what="codec type")
        if ctype is None:
            if get(c, "type") is None:
                ctx.report(cloc, "<codec> needs a type", hint="add type='duplex'")
            continue
        if model == "ac97":
            ctx.report(cloc, "an ac97 card has no HDA codecs", kind="conflict",
                       hint="remove <codec>, or use model='ich9'")
        codecs.append(ctype)
    audio_id = None
    au = one(ctx, el, "audio", loc)
    if au is not None:
        audio_id = ctx.guard(int_attr, au, "id", ctx.loc(au, f"{_SOUND}/audio"), lo=1,
                             hi=1 << 31)
        if audio_id is None and get(au, "id") is None:
            ctx.report(ctx.loc(au, f"{_SOUND}/audio"), "<audio> needs an id",
                       hint="add id='1' (the id of an <audio> backend)")
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if ctx.count != mark:
        raise Skip()
    return Sound(model=cast(Any, model), codecs=tuple(codecs), audio_id=audio_id,
                 address=address)


_REDIRDEV = "domain/devices/redirdev"


def parse_redirdev(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Redirdev:
    """A USB ``<redirdev>`` from a spice client (spicevmc) or a TCP peer (usbredir)."""
    loc = ctx.loc(el, _REDIRDEV)
    mark = ctx.count
    ctx.guard(enum, el, "bus", loc, ("usb",), default="usb", what="redirdev bus")
    rtype = enum(el, "type", loc, ("spicevmc", "tcp"), what="redirdev type")
    if rtype is None:
        raise fail(loc, "<redirdev> needs a type", hint="add type='spicevmc'")
    host = mode = protocol = None
    service = None
    src = one(ctx, el, "source", loc)
    proto = one(ctx, el, "protocol", loc)
    if rtype == "spicevmc":
        for extra in (src, proto):
            if extra is not None:
                ctx.report(ctx.loc(extra, f"{_REDIRDEV}/{extra.tag}"),
                           f"a spicevmc redirdev takes no <{extra.tag}>",
                           hint=f"remove <{extra.tag}>")
    else:
        tcp = ctx.guard(_tcp_source, ctx, src, loc)
        if tcp is not None:
            host, service, mode = tcp
        if proto is not None:
            protocol = ctx.guard(enum, proto, "type", ctx.loc(proto, f"{_REDIRDEV}/protocol"),
                                 ("raw",), default="raw", what="redirdev protocol")
    address = ctx.guard(parse_address, ctx, el, loc, ("usb",))
    if ctx.count != mark:
        raise Skip()
    return Redirdev(type=cast(Any, rtype), host=host, service=service, mode=cast(Any, mode),
                    protocol=protocol, address=address)


def _tcp_source(ctx: Ctx, src: etree._Element | None, loc: Loc) -> tuple[str, int, str]:
    if src is None:
        raise fail(loc, "a tcp redirdev needs <source host=… service=…>",
                   hint="add <source mode='connect' host='127.0.0.1' service='4000'/>")
    sloc = ctx.loc(src, f"{_REDIRDEV}/source")
    mode = enum(src, "mode", sloc, ("connect", "bind"), default="connect", what="source mode")
    raw_host, raw_service = get(src, "host"), get(src, "service")
    if raw_host is None or raw_service is None:
        raise fail(sloc, "<source> needs host and service", hint="add host='…' service='…'")
    host = check_listen(raw_host, sloc)
    service = int_attr(src, "service", sloc, lo=1, hi=65535)
    assert service is not None and mode is not None
    return host, service, mode


_WATCHDOG = "domain/devices/watchdog"
#: libvirt's watchdog actions: those qemu's ``-action watchdog=`` has, and
#: ``dump`` (qemu pauses; ferry-source writes a memory dump, then resumes).
WATCHDOG_ACTIONS = ("reset", "shutdown", "poweroff", "pause", "none", "inject-nmi", "dump")


def parse_watchdog(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Watchdog:
    """A ``<watchdog>``: i6300esb (PCI), itco (q35's LPC) or ib700 (ISA)."""
    loc = ctx.loc(el, _WATCHDOG)
    model = enum(el, "model", loc, ("i6300esb", "itco", "ib700"), what="watchdog model")
    if model is None:
        raise fail(loc, "<watchdog> needs a model", hint="add model='i6300esb'")
    mark = ctx.count
    action = ctx.guard(enum, el, "action", loc, WATCHDOG_ACTIONS, default="reset",
                       what="watchdog action")
    if model == "itco" and env.os is not None and not env.os.is_q35:
        ctx.report(loc, "the itco watchdog is part of the q35 machine", kind="conflict",
                   hint="use model='i6300esb', or machine='q35'")
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if address is not None and model != "i6300esb":
        ctx.report(loc, f"a {model} watchdog takes no address", hint="remove the address")
    if ctx.count != mark:
        raise Skip()
    return Watchdog(model=cast(Any, model), action=action or "reset", address=address)


_PANIC = "domain/devices/panic"


def parse_panic(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Panic:
    """A ``<panic>`` notifier: isa (qemu's ISA pvpanic) or hyperv (``hv-crash``)."""
    loc = ctx.loc(el, _PANIC)
    model = enum(el, "model", loc, ("isa", "hyperv"), default="isa", what="panic model")
    iobase = None
    a = one(ctx, el, "address", loc)
    if a is not None:
        aloc = ctx.loc(a, f"{_PANIC}/address")
        if model != "isa":
            raise fail(aloc, f"a {model} panic device takes no address here",
                       cls=XMLUnsupported, hint="remove the address")
        enum(a, "type", aloc, ("isa",), what="address type")
        iobase = int_attr(a, "iobase", aloc, lo=1, hi=0xFFFF, hex_ok=True)
        if get(a, "irq") is not None:
            raise fail(aloc, "an isa panic device has no irq", hint="remove irq")
    return Panic(model=cast(Any, model), iobase=iobase)
