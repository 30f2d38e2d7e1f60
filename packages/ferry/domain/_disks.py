"""Storage devices: ``<disk>`` (controllers: :mod:`ferry.domain._controllers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, check_host_path, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, ident, int_attr, one, yes_no
from ferry.domain.model import Disk
from ferry.errors import XMLUnsupported

__all__ = ["parse_disk"]

TARGET_DEV_RE = re.compile(r"^(hd|sd|vd)[a-z]{1,3}$")
_DISK = "domain/devices/disk"


def parse_disk(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Disk:
    """A ``<disk>``: file or block, disk or cdrom."""
    loc = ctx.loc(el, _DISK)
    # The rest of the disk is read according to these two: a problem stops it.
    dtype = enum(el, "type", loc, ("file", "block"), default="file", what="disk type")
    device = enum(el, "device", loc, ("disk", "cdrom"), default="disk", what="disk device")
    mark = ctx.count
    target = ctx.guard(_disk_target, ctx, el, loc, device)
    source = ctx.guard(_disk_source, ctx, el, loc, dtype, device,
                       target[0] if target is not None else None)
    bus = target[1] if target is not None else None
    driver = ctx.guard(_disk_driver, ctx, el, loc, bus)
    address = ctx.guard(parse_address, ctx, el, loc, ("pci", "drive", "usb"))
    if address is not None and bus is not None:
        expected = {"virtio": "pci", "usb": "usb"}.get(bus, "drive")
        if address.type != expected:
            ctx.report(loc, f"a {bus} disk takes a {expected} address, not {address.type}",
                       kind="conflict", hint=f"use an address of type '{expected}'")
    readonly = one(ctx, el, "readonly", loc) is not None
    shareable = one(ctx, el, "shareable", loc) is not None
    if target is None or driver is None or ctx.count != mark:
        raise Skip()
    dev, bus = target
    return Disk(
        type=cast(Any, dtype), device=cast(Any, device), target_dev=dev,
        target_bus=cast(Any, bus), source=source, driver_name=driver.name, format=driver.format,
        cache=driver.cache, io=driver.io, discard=driver.discard,
        error_policy=driver.error_policy, rerror_policy=driver.rerror_policy,
        event_idx=driver.event_idx, iothread=driver.iothread,
        # libvirt makes every cdrom read-only; so does Ferry (and says so in the XML).
        readonly=device == "cdrom" or readonly,
        shareable=shareable,
        address=address,
    )


def _disk_target(
    ctx: Ctx, el: etree._Element, loc: Loc, device: str | None
) -> tuple[str, str]:
    """The target (dev, bus) of a disk: required; the bus defaults from the name."""
    tgt = one(ctx, el, "target", loc)
    if tgt is None:
        raise fail(loc, "<disk> needs a <target>", hint="add <target dev='vda' bus='virtio'/>")
    tloc = ctx.loc(tgt, f"{_DISK}/target")
    dev = get(tgt, "dev")
    if dev is None:
        raise fail(tloc, "<target> needs a dev attribute", hint="add dev='vda' (or sda, hda)")
    dev = ident(dev, tloc, "disk target", TARGET_DEV_RE)
    bus = enum(tgt, "bus", tloc, ("virtio", "ide", "scsi", "sata", "usb"), what="disk bus")
    if bus is None:
        bus = {"hd": "ide", "sd": "scsi", "vd": "virtio"}[dev[:2]]
    if device == "cdrom" and bus == "virtio":
        raise fail(tloc, "a cdrom on the virtio bus is not supported", cls=XMLUnsupported,
                   hint="put the cdrom on the sata, scsi or ide bus")
    return dev, bus


def _disk_source(
    ctx: Ctx, el: etree._Element, loc: Loc, dtype: str | None, device: str | None,
    dev: str | None,
) -> str | None:
    """The source path of a disk (required but for a cdrom)."""
    source = None
    src = one(ctx, el, "source", loc)
    if src is not None:
        sloc = ctx.loc(src, f"{_DISK}/source")
        want, other = ("file", "dev") if dtype == "file" else ("dev", "file")
        if get(src, other) is not None:
            raise fail(sloc, f"a disk of type {dtype!r} takes <source {want}=…>, not {other}",
                       hint=f"use <source {want}=…>")
        value = get(src, want)
        if value is not None:
            source = check_host_path(value, sloc, "disk source", allow_dev=dtype == "block")
    if source is None and device == "disk":
        which = f"disk {dev}" if dev else "the disk"
        raise fail(loc, f"{which} has no source (only a cdrom may be empty)",
                   hint="add <source file='/path/to/image'/>")
    return source


@dataclass(frozen=True)
class _Driver:
    name: str | None = None
    format: str | None = None
    cache: str | None = None
    io: str | None = None
    discard: str | None = None
    error_policy: str | None = None
    rerror_policy: str | None = None
    event_idx: bool | None = None
    iothread: int | None = None


def _disk_driver(ctx: Ctx, el: etree._Element, loc: Loc, bus: str | None) -> _Driver:
    """The ``<driver>`` of a disk; every attribute is checked on its own."""
    drv = one(ctx, el, "driver", loc)
    if drv is None:
        return _Driver()
    drloc = ctx.loc(drv, f"{_DISK}/driver")
    mark = ctx.count

    def choice(name: str, choices: tuple[str, ...], what: str) -> str | None:
        return ctx.guard(enum, drv, name, drloc, choices, what=what)

    d = _Driver(
        name=choice("name", ("qemu",), "disk driver"),
        format=choice("type", ("raw", "qcow2"), "disk format"),
        cache=choice("cache", ("none", "writeback", "writethrough", "directsync", "unsafe"),
                     "cache mode"),
        io=choice("io", ("native", "threads", "io_uring"), "io mode"),
        discard=choice("discard", ("unmap", "ignore"), "discard"),
        error_policy=choice("error_policy", ("stop", "report", "ignore", "enospace"),
                            "error_policy"),
        rerror_policy=choice("rerror_policy", ("stop", "report", "ignore"), "rerror_policy"),
        event_idx=ctx.guard(yes_no, drv, "event_idx", drloc, yes="on", no="off"),
        # checked against <iothreads> by ferry.domain._top
        iothread=ctx.guard(int_attr, drv, "iothread", drloc, lo=1, hi=64),
    )
    if ctx.count != mark:
        raise Skip()
    if d.io == "native" and d.cache not in ("none", "directsync"):
        # qemu refuses aio=native without O_DIRECT; say so at define time.
        ctx.report(drloc, "io='native' needs cache='none' or cache='directsync'",
                   hint="add cache='none', or use io='threads'")
    if d.event_idx is not None and bus is not None and bus != "virtio":
        ctx.report(drloc, "event_idx only applies to virtio disks", hint="remove event_idx")
    return d
