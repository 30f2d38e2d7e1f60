"""Storage devices: ``<disk>`` and ``<controller>``."""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import check_host_path, fail
from ferry.domain._context import Ctx, DeviceEnv
from ferry.domain._values import enum, get, ident, int_attr, one, yes_no
from ferry.domain.model import Controller, Disk
from ferry.errors import XMLUnsupported

__all__ = ["parse_controller", "parse_disk"]

TARGET_DEV_RE = re.compile(r"^(hd|sd|vd)[a-z]{1,3}$")


def parse_disk(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Disk:
    """A ``<disk>``: file or block, disk or cdrom."""
    path = "domain/devices/disk"
    loc = ctx.loc(el, path)
    dtype = enum(el, "type", loc, ("file", "block"), default="file", what="disk type")
    device = enum(el, "device", loc, ("disk", "cdrom"), default="disk", what="disk device")
    tgt = one(el, "target", loc)
    if tgt is None:
        raise fail(loc, "<disk> needs a <target>")
    tloc = ctx.loc(tgt, f"{path}/target")
    dev = get(tgt, "dev")
    if dev is None:
        raise fail(tloc, "<target> needs a dev attribute")
    dev = ident(dev, tloc, "disk target", TARGET_DEV_RE)
    bus = enum(tgt, "bus", tloc, ("virtio", "ide", "scsi", "sata", "usb"), what="disk bus")
    if bus is None:
        bus = {"hd": "ide", "sd": "scsi", "vd": "virtio"}[dev[:2]]
    if device == "cdrom" and bus == "virtio":
        raise fail(tloc, "a cdrom on the virtio bus is not supported", cls=XMLUnsupported)

    source = None
    src = one(el, "source", loc)
    if src is not None:
        sloc = ctx.loc(src, f"{path}/source")
        want, other = ("file", "dev") if dtype == "file" else ("dev", "file")
        if get(src, other) is not None:
            raise fail(sloc, f"a disk of type {dtype!r} takes <source {want}=…>, not {other}")
        value = get(src, want)
        if value is not None:
            source = check_host_path(value, sloc, "disk source", allow_dev=dtype == "block")
    if source is None and device == "disk":
        raise fail(loc, f"disk {dev} has no source (only a cdrom may be empty)")

    fmt = cache = io = discard = error_policy = rerror_policy = name = None
    event_idx = None
    drv = one(el, "driver", loc)
    if drv is not None:
        drloc = ctx.loc(drv, f"{path}/driver")
        name = enum(drv, "name", drloc, ("qemu",), what="disk driver")
        fmt = enum(drv, "type", drloc, ("raw", "qcow2"), what="disk format")
        cache = enum(drv, "cache", drloc,
                     ("none", "writeback", "writethrough", "directsync", "unsafe"),
                     what="cache mode")
        io = enum(drv, "io", drloc, ("native", "threads", "io_uring"), what="io mode")
        discard = enum(drv, "discard", drloc, ("unmap", "ignore"), what="discard")
        error_policy = enum(drv, "error_policy", drloc, ("stop", "report", "ignore", "enospace"),
                            what="error_policy")
        rerror_policy = enum(drv, "rerror_policy", drloc, ("stop", "report", "ignore"),
                             what="rerror_policy")
        event_idx = yes_no(drv, "event_idx", drloc, yes="on", no="off")
        if io == "native" and cache not in ("none", "directsync"):
            # qemu refuses aio=native without O_DIRECT; say so at define time.
            raise fail(drloc, "io='native' needs cache='none' or cache='directsync'")
        if event_idx is not None and bus != "virtio":
            raise fail(drloc, "event_idx only applies to virtio disks")
    address = parse_address(ctx, el, loc, ("pci", "drive", "usb"))
    if address is not None:
        expected = {"virtio": "pci", "usb": "usb"}.get(bus, "drive")
        if address.type != expected:
            raise fail(loc, f"a {bus} disk takes a {expected} address, not {address.type}")
    return Disk(
        type=cast(Any, dtype), device=cast(Any, device), target_dev=dev,
        target_bus=cast(Any, bus), source=source, driver_name=name, format=fmt,
        cache=cache, io=io, discard=discard, error_policy=error_policy,
        rerror_policy=rerror_policy, event_idx=event_idx,
        # libvirt makes every cdrom read-only; so does Ferry (and says so in the XML).
        readonly=device == "cdrom" or one(el, "readonly", loc) is not None,
        shareable=one(el, "shareable", loc) is not None,
        address=address,
    )


_CONTROLLER_MODELS: dict[str, tuple[str, ...]] = {
    "usb": ("piix3-uhci", "qemu-xhci", "nec-xhci", "ich9-ehci1", "none"),
    "ide": (),
    "sata": (),
    "scsi": ("lsilogic", "virtio-scsi"),
    "virtio-serial": (),
    "pci": ("pci-root", "pcie-root"),
}


def parse_controller(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Controller:
    """A ``<controller>``: usb, ide, sata, scsi, virtio-serial or the PCI root."""
    os_ = env.os
    loc = ctx.loc(el, "domain/devices/controller")
    ctype = enum(el, "type", loc, tuple(_CONTROLLER_MODELS), what="controller type")
    if ctype is None:
        raise fail(loc, "<controller> needs a type")
    index = int_attr(el, "index", loc, hi=31) or 0
    model = enum(el, "model", loc, _CONTROLLER_MODELS[ctype], what=f"{ctype} controller model")
    if ctype == "pci":
        want = "pcie-root" if os_.is_q35 else "pci-root"
        if model != want or index != 0:
            raise fail(loc, f"only the {want} controller with index 0 is supported on machine "
                            f"{os_.machine!r} (no PCI bridges)", cls=XMLUnsupported)
    ports = int_attr(el, "ports", loc, lo=1, hi=31 if ctype == "virtio-serial" else 15)
    if ports is not None and not (ctype == "virtio-serial"
                                  or (ctype == "usb" and model in ("qemu-xhci", "nec-xhci"))):
        raise fail(loc, "ports is only valid for virtio-serial and xhci USB controllers")
    if ctype in ("ide", "sata", "usb", "scsi") and index != 0:
        raise fail(loc, f"only one {ctype} controller (index 0) is supported",
                   cls=XMLUnsupported)
    if ctype == "ide" and os_.is_q35:
        raise fail(loc, "the q35 machine has no IDE controller (use sata)", cls=XMLUnsupported)
    address = parse_address(ctx, el, loc, ("pci",))
    return Controller(type=ctype, index=index, model=model, ports=ports, address=address)

