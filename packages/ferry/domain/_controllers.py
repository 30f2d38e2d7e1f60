"""``<controller>``: usb, ide, sata, scsi, virtio-serial and the PCI tree.

The PCI controllers are what virt-manager and virt-install write for x86
guests: the root bus (``pci-root`` on pc, ``pcie-root`` on q35), and buses
plugged into it, each numbered by its ``index``: ``pcie-root-port`` (q35:
one slot, for one device and its functions), ``pcie-to-pci-bridge`` and
``dmi-to-pci-bridge`` (q35: a legacy PCI bus), ``pci-bridge`` (31 slots).
This module reads one controller; the checks across controllers and device
addresses (does the bus exist, is the slot free, does the controller plug
into a bus of the right kind) are in :mod:`ferry.domain._cross`, which also
gives controllers without ``index`` theirs (:data:`UNSET_INDEX` until then).
"""

from __future__ import annotations

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, int_attr, one, yes_no
from ferry.domain.model import OS, Controller
from ferry.errors import XMLUnsupported

__all__ = ["PCI_MODEL_NAMES", "Q35_ONLY", "UNSET_INDEX", "parse_controller"]

#: The index of a controller whose XML has none, until the cross-checks
#: assign it (the lowest free index of its type, as libvirt does).
UNSET_INDEX = -1

CONTROLLER_MODELS: dict[str, tuple[str, ...]] = {
    "usb": ("piix3-uhci", "qemu-xhci", "nec-xhci", "ich9-ehci1", "ich9-uhci1", "ich9-uhci2",
            "ich9-uhci3", "none"),
    "ide": (),
    "sata": (),
    "scsi": ("lsilogic", "virtio-scsi"),
    "virtio-serial": (),
    "pci": ("pci-root", "pcie-root", "pcie-root-port", "pcie-to-pci-bridge", "pci-bridge",
            "dmi-to-pci-bridge"),
}

#: ``<model name=…>`` (the qemu device) each PCI controller model may have;
#: the first is the default.
PCI_MODEL_NAMES: dict[str, tuple[str, ...]] = {
    "pcie-root-port": ("pcie-root-port", "ioh3420"),
    "pcie-to-pci-bridge": ("pcie-pci-bridge",),
    "pci-bridge": ("pci-bridge",),
    "dmi-to-pci-bridge": ("i82801b11-bridge",),
}

#: PCI controller models that only the q35 machine (PCI Express) has.
Q35_ONLY = ("pcie-root", "pcie-root-port", "pcie-to-pci-bridge", "dmi-to-pci-bridge")

_COMPANIONS = ("ich9-uhci1", "ich9-uhci2", "ich9-uhci3")
_CTL = "domain/devices/controller"


def parse_controller(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Controller:
    """A ``<controller>``: usb, ide, sata, scsi, virtio-serial or a PCI controller."""
    os_ = env.os
    loc = ctx.loc(el, _CTL)
    ctype = enum(el, "type", loc, tuple(CONTROLLER_MODELS), what="controller type")
    if ctype is None:
        raise fail(loc, "<controller> needs a type",
                   hint=f"add type= one of {', '.join(CONTROLLER_MODELS)}")
    mark = ctx.count
    index = ctx.guard(int_attr, el, "index", loc, hi=255 if ctype == "pci" else 31)
    if index is None and get(el, "index") is None:
        index = UNSET_INDEX
    model = ctx.guard(enum, el, "model", loc, CONTROLLER_MODELS[ctype],
                      what=f"{ctype} controller model")
    if ctype == "pci" and model is None and get(el, "model") is None and index not in (0, None):
        ctx.report(loc, "a pci controller other than the root (index 0) needs a model",
                   hint="add model='pcie-root-port' (q35) or model='pci-bridge' (pc)")
    if ctype == "pci" and os_ is not None and index is not None:
        _pci_machine(ctx, loc, os_, index, model)
    ports = ctx.guard(int_attr, el, "ports", loc, lo=1,
                      hi=31 if ctype == "virtio-serial" else 15)
    if ports is not None and not (ctype == "virtio-serial"
                                  or (ctype == "usb" and model in ("qemu-xhci", "nec-xhci"))):
        ctx.report(loc, "ports is only valid for virtio-serial and xhci USB controllers",
                   hint="remove ports")
    if ctype in ("ide", "sata", "usb", "scsi") and index not in (0, UNSET_INDEX, None):
        ctx.report(loc, f"only one {ctype} controller (index 0) is supported",
                   cls=XMLUnsupported, hint="remove the controllers with another index")
    if ctype == "ide" and os_ is not None and os_.is_q35:
        ctx.report(loc, "the q35 machine has no IDE controller (use sata)", cls=XMLUnsupported,
                   hint="remove the ide controller; use sata disks")
    model_name = ctx.guard(_model_name, ctx, el, loc, ctype, model)
    target = ctx.guard(_target, ctx, el, loc, model)
    startport = ctx.guard(_master, ctx, el, loc, model)
    queues = ctx.guard(_driver, ctx, el, loc, model)
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if ctx.count != mark or index is None:
        raise Skip()
    chassis, port, chassis_nr, hotplug = target or (None, None, None, None)
    return Controller(type=ctype, index=index, model=model, ports=ports, address=address,
                      model_name=model_name, chassis=chassis, port=port,
                      chassis_nr=chassis_nr, hotplug=hotplug, master_startport=startport,
                      queues=queues)


def _pci_machine(ctx: Ctx, loc: Loc, os_: OS, index: int, model: str | None) -> None:
    """A PCI controller model the machine has, and the root at index 0 only."""
    root = "pcie-root" if os_.is_q35 else "pci-root"
    if model in Q35_ONLY and not os_.is_q35:
        ctx.report(loc, f"pci controller model {model!r} needs the q35 machine (PCI Express); "
                        f"this guest's machine is {os_.machine!r}", cls=XMLUnsupported,
                   hint="use machine='q35', or on 'pc' use pci-bridge controllers "
                        "(model='pci-bridge')")
    elif model == "pci-root" and os_.is_q35:
        ctx.report(loc, f"the root bus of the q35 machine ({os_.machine!r}) is pcie-root, "
                        "not pci-root", cls=XMLUnsupported, hint="use model='pcie-root'")
    elif model in ("pci-root", "pcie-root") and index not in (0, UNSET_INDEX):
        ctx.report(loc, f"the root bus ({model}) is index 0, not {index}",
                   hint="use index='0' (there is one root bus)")
    elif index == 0 and model not in (None, root):
        ctx.report(loc, f"pci controller index 0 is the root bus ({root}), not a {model}",
                   hint=f"give the {model} another index (1 and up); index 0 is {root}")


def _model_name(
    ctx: Ctx, el: etree._Element, loc: Loc, ctype: str, model: str | None
) -> str | None:
    m = one(ctx, el, "model", loc)
    if m is None:
        return None
    mloc = ctx.loc(m, f"{_CTL}/model")
    names = PCI_MODEL_NAMES.get(model or "") if ctype == "pci" else None
    if not names:
        raise fail(mloc, f"<model name> is not valid for a {model or ctype} controller",
                   hint="remove <model>")
    return enum(m, "name", mloc, names, what=f"{model} model name")


def _target(
    ctx: Ctx, el: etree._Element, loc: Loc, model: str | None
) -> tuple[int | None, int | None, int | None, bool | None] | None:
    t = one(ctx, el, "target", loc)
    if t is None:
        return None
    tloc = ctx.loc(t, f"{_CTL}/target")
    allowed = {"pcie-root-port": ("chassis", "port", "hotplug"),
               "pci-bridge": ("chassisNr",)}.get(model or "", ())
    wrong = [str(a) for a in t.attrib if str(a) not in allowed]
    if wrong:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no <target>"
        raise fail(tloc, f"<target {' '.join(wrong)}> is not valid for a {model} controller "
                         f"(a {model} {takes})", hint=f"remove {', '.join(wrong)}")
    return (
        int_attr(t, "chassis", tloc, hi=255),
        int_attr(t, "port", tloc, hi=255, hex_ok=True),
        int_attr(t, "chassisNr", tloc, lo=1, hi=255),
        yes_no(t, "hotplug", tloc, yes="on", no="off"),
    )


def _master(ctx: Ctx, el: etree._Element, loc: Loc, model: str | None) -> int | None:
    m = one(ctx, el, "master", loc)
    if m is None:
        if model in _COMPANIONS:
            raise fail(loc, f"a {model} companion controller needs <master startport=…>",
                       hint="add <master startport='0'/> (uhci1: 0, uhci2: 2, uhci3: 4)")
        return None
    mloc = ctx.loc(m, f"{_CTL}/master")
    if model not in _COMPANIONS:
        raise fail(mloc, "<master> is only valid for the ich9-uhci1..3 companions of an "
                         "ich9-ehci1", hint="remove <master>")
    start = int_attr(m, "startport", mloc, hi=5)
    if start is None:
        raise fail(mloc, "<master> needs startport", hint="add startport='0'")
    return start


def _driver(ctx: Ctx, el: etree._Element, loc: Loc, model: str | None) -> int | None:
    d = one(ctx, el, "driver", loc)
    if d is None:
        return None
    dloc = ctx.loc(d, f"{_CTL}/driver")
    if model != "virtio-scsi":
        raise fail(dloc, "<driver queues> is only supported for virtio-scsi controllers",
                   cls=XMLUnsupported, hint="remove <driver>")
    return int_attr(d, "queues", dloc, lo=1, hi=1024)
