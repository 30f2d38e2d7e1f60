"""The ``<address>`` of a device: pci (on any bus of the PCI tree), drive,
virtio-serial or usb."""

from __future__ import annotations

from lxml import etree

from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx
from ferry.domain._values import enum, int_attr, one, yes_no
from ferry.domain.model import Address
from ferry.errors import XMLUnsupported

__all__ = ["parse_address"]

# The attributes each address type takes.
_FIELDS: dict[str, tuple[str, ...]] = {
    "pci": ("type", "domain", "bus", "slot", "function", "multifunction"),
    "drive": ("type", "controller", "bus", "target", "unit"),
    "virtio-serial": ("type", "controller", "bus", "port"),
    "usb": ("type", "bus", "port"),
}


def parse_address(
    ctx: Ctx, parent: etree._Element, ploc: Loc, allowed: tuple[str, ...]
) -> Address | None:
    """The ``<address>`` child of ``parent`` (None when absent), of a type in ``allowed``.

    :raises XMLError: the address cannot be read (callers guard it, so that
        the rest of the device is still checked).
    """
    el = one(ctx, parent, "address", ploc)
    if el is None:
        return None
    loc = ctx.loc(el, f"{ploc.element}/address")
    atype = enum(el, "type", loc, allowed, what="address type")
    if atype is None:
        raise fail(loc, "<address> needs a type", hint=f"add type='{allowed[0]}'")
    for name in el.attrib:
        if str(name) not in _FIELDS[atype]:
            ctx.report(loc, f"attribute {name!r} is not valid for a {atype} address",
                       cls=XMLUnsupported, kind="unsupported-attribute",
                       hint=f"remove {name!r} (a {atype} address takes "
                            f"{', '.join(_FIELDS[atype][1:])})", attribute=str(name))
    if atype == "pci":
        domain = int_attr(el, "domain", loc, hi=0xFFFF, hex_ok=True) or 0
        bus = int_attr(el, "bus", loc, hi=0xFF, hex_ok=True) or 0
        slot = int_attr(el, "slot", loc, hi=0x1F, hex_ok=True)
        function = int_attr(el, "function", loc, hi=7, hex_ok=True) or 0
        if slot is None:
            raise fail(loc, "a pci address needs a slot", hint="add slot='0x…'")
        if domain != 0:
            # One PCI domain (no pci-expander-bus / pxb): whether the bus
            # exists is checked with the controller tree (ferry.domain._cross).
            raise fail(loc, f"pci domain {domain:#06x} does not exist: x86 guests have only "
                            "PCI domain 0", cls=XMLUnsupported,
                       hint="use domain='0x0000' (or remove the address)")
        multi = yes_no(el, "multifunction", loc, yes="on", no="off")
        return Address("pci", domain=domain, bus=bus, slot=slot, function=function,
                       multifunction=multi)
    if atype == "drive":
        return Address(
            "drive",
            controller=int_attr(el, "controller", loc, hi=31, hex_ok=True) or 0,
            bus=int_attr(el, "bus", loc, hi=31, hex_ok=True) or 0,
            target=int_attr(el, "target", loc, hi=255, hex_ok=True) or 0,
            unit=int_attr(el, "unit", loc, hi=16383, hex_ok=True) or 0,
        )
    if atype == "virtio-serial":
        return Address(
            "virtio-serial",
            controller=int_attr(el, "controller", loc, hi=31, hex_ok=True) or 0,
            bus=int_attr(el, "bus", loc, hi=0, hex_ok=True) or 0,
            port=int_attr(el, "port", loc, lo=1, hi=31, hex_ok=True),
        )
    return Address(
        "usb",
        bus=int_attr(el, "bus", loc, hi=31, hex_ok=True) or 0,
        port=int_attr(el, "port", loc, lo=1, hi=127),
    )

