"""``<hostdev mode='subsystem' type='pci|usb'>``: host devices given to the guest.

A host PCI function goes to the guest through ``vfio-pci`` (the host must
have bound it to vfio-pci: Ferry does not rebind drivers, whatever
``managed`` says); a host USB device through ``usb-host`` (by vendor and
product id, with which qemu starts without the device and attaches it when
it appears, or by the host's bus and device numbers, which qemu needs
present at start). Neither can move with the
guest: :func:`migration_blockers` names them and Begin refuses the
migration (libvirt refuses PCI host devices; it lets USB ones "migrate"
when the destination has the device, which Ferry does not look up, so it
refuses those too rather than let the guest lose its device).
"""

from __future__ import annotations

from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, int_attr, one, yes_no
from ferry.domain.model import Domain, Hostdev

__all__ = ["hostdev_device", "migration_blockers", "parse_hostdev"]

_HOSTDEV = "domain/devices/hostdev"


def parse_hostdev(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Hostdev:
    """A ``<hostdev mode='subsystem'>`` of type pci or usb."""
    loc = ctx.loc(el, _HOSTDEV)
    mark = ctx.count
    ctx.guard(enum, el, "mode", loc, ("subsystem",), default="subsystem", what="hostdev mode")
    htype = enum(el, "type", loc, ("pci", "usb"), what="hostdev type")
    if htype is None:
        raise fail(loc, "<hostdev> needs a type", hint="add type='pci' or type='usb'")
    managed = ctx.guard(yes_no, el, "managed", loc)
    src = one(ctx, el, "source", loc)
    if src is None:
        raise fail(loc, "<hostdev> needs a <source> naming the host device",
                   hint="add <source><address bus='…' slot='…' function='…'/></source>"
                   if htype == "pci" else "add <source><vendor id='0x…'/><product id='0x…'/>"
                                          "</source>")
    sloc = ctx.loc(src, f"{_HOSTDEV}/source")
    fields: dict[str, Any] = {}
    if htype == "pci":
        fields["pci_addr"] = ctx.guard(_pci_source, ctx, src, sloc)
        drv = one(ctx, el, "driver", loc)
        if drv is not None:
            fields["driver"] = ctx.guard(enum, drv, "name", ctx.loc(drv, f"{_HOSTDEV}/driver"),
                                         ("vfio",), what="hostdev driver")
    else:
        usb = ctx.guard(_usb_source, ctx, src, sloc)
        if usb is not None:
            fields.update(usb)
    address = ctx.guard(parse_address, ctx, el, loc, (htype,))
    if ctx.count != mark:
        raise Skip()
    return Hostdev(type=cast(Any, htype), managed=managed, address=address, **fields)


def _pci_source(ctx: Ctx, src: etree._Element, sloc: Loc) -> tuple[int, int, int, int]:
    a = one(ctx, src, "address", sloc)
    if a is None:
        raise fail(sloc, "a PCI <hostdev> needs <source><address …/>",
                   hint="add <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>")
    aloc = ctx.loc(a, f"{_HOSTDEV}/source/address")
    if get(a, "device") is not None:
        raise fail(aloc, "device is a USB source attribute", hint="remove device")
    domain = int_attr(a, "domain", aloc, hi=0xFFFF, hex_ok=True) or 0
    bus = int_attr(a, "bus", aloc, hi=0xFF, hex_ok=True)
    slot = int_attr(a, "slot", aloc, hi=0x1F, hex_ok=True)
    function = int_attr(a, "function", aloc, hi=7, hex_ok=True) or 0
    if bus is None or slot is None:
        raise fail(aloc, "the host PCI address needs bus and slot",
                   hint="add bus='0x…' slot='0x…' (see lspci -D)")
    return domain, bus, slot, function


def _usb_source(ctx: Ctx, src: etree._Element, sloc: Loc) -> dict[str, int]:
    vendor, product, addr = (one(ctx, src, t, sloc) for t in ("vendor", "product", "address"))
    out: dict[str, int] = {}
    for tag, child in (("vendor", vendor), ("product", product)):
        if child is not None:
            value = int_attr(child, "id", ctx.loc(child, f"{_HOSTDEV}/source/{tag}"),
                             hi=0xFFFF, hex_ok=True)
            if value is None:
                raise fail(ctx.loc(child, f"{_HOSTDEV}/source/{tag}"), f"<{tag}> needs an id",
                           hint=f"add id='0x…' (lsusb shows {tag}:product)")
            out[tag] = value
    if (vendor is None) != (product is None):
        raise fail(sloc, "a USB <hostdev> by id needs both <vendor> and <product>",
                   hint="add the one missing (lsusb shows vendor:product)")
    if addr is not None:
        aloc = ctx.loc(addr, f"{_HOSTDEV}/source/address")
        for attr in ("domain", "slot", "function"):
            if get(addr, attr) is not None:
                raise fail(aloc, f"{attr} is a PCI source attribute", hint=f"remove {attr}")
        bus = int_attr(addr, "bus", aloc, lo=1, hi=0xFF)
        device = int_attr(addr, "device", aloc, lo=1, hi=0x7F)
        if bus is None or device is None:
            raise fail(aloc, "the host USB address needs bus and device",
                       hint="add bus='1' device='3' (lsusb shows them)")
        out["usb_bus"], out["usb_device"] = bus, device
    if not out:
        raise fail(sloc, "a USB <hostdev> needs <vendor>/<product> or <address bus device>",
                   hint="add <vendor id='0x…'/><product id='0x…'/>")
    return out


def hostdev_device(h: Hostdev, index: int, placement: str | None) -> str:
    """The ``-device`` value of host device ``index`` (``placement``: its PCI bus/addr)."""
    hid = f"hostdev{index}"
    if h.type == "pci":
        assert h.pci_addr is not None and placement is not None
        d, b, s, f = h.pci_addr
        return f"vfio-pci,host={d:04x}:{b:02x}:{s:02x}.{f:x},id={hid},{placement}"
    parts = ["usb-host"]
    if h.vendor is not None and h.product is not None:
        parts += [f"vendorid=0x{h.vendor:04x}", f"productid=0x{h.product:04x}"]
    if h.usb_bus is not None and h.usb_device is not None:
        parts += [f"hostbus={h.usb_bus}", f"hostaddr={h.usb_device}"]
    parts += [f"id={hid}", "bus=usb.0"]
    if h.address is not None and h.address.port is not None:
        parts.append(f"port={h.address.port}")
    return ",".join(parts)


def migration_blockers(domain: Domain) -> list[str]:
    """The host devices of ``domain``, each named with why it cannot migrate."""
    out = []
    for h in domain.hostdevs:
        if h.type == "pci":
            why = ("a host PCI device (vfio-pci) is this host's hardware and its state "
                   "cannot move with the guest")
        else:
            why = ("a host USB device is plugged into this host, and Ferry does not check "
                   "that the destination has it")
        out.append(f"<hostdev mode='subsystem' type='{h.type}'> {h.describe()}: {why}; "
                   "detach it first")
    return out
