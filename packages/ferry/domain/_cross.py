"""Cross-checks: what spans several devices (unique targets, ports, names and
addresses; video needs graphics; IDE disks need a machine with IDE)."""

from __future__ import annotations

from collections.abc import Iterator

from lxml import etree

from ferry.domain._checks import Loc
from ferry.domain._context import Ctx
from ferry.domain._devices import Devices
from ferry.domain.model import OS, Address, Video
from ferry.errors import XMLError, XMLUnsupported

__all__ = ["cross_checks"]


def cross_checks(ctx: Ctx, el: etree._Element, out: Devices, os_: OS | None) -> None:
    """Checks that span devices: unique targets and addresses, video needs graphics.

    Every conflict is recorded. Devices that had problems of their own are
    not in ``out``; a check that would need them is skipped. Adds the video
    device libvirt adds for graphics that have none.
    """
    dloc = ctx.loc(el, "domain/devices")

    def dev_loc(tag: str, n: int) -> Loc:
        found = out.element(tag, n)
        return ctx.loc(found, f"domain/devices/{tag}") if found is not None else dloc

    def conflict(loc: Loc, message: str, hint: str, *,
                 cls: type[XMLError] = XMLError) -> None:
        ctx.report(loc, message, cls=cls, kind="conflict", hint=hint)

    seen: dict[str, int] = {}
    for i, d in enumerate(out.disks):
        if d.target_dev in seen:
            conflict(dev_loc("disk", i), f"disk target {d.target_dev!r} is used twice",
                     "give each disk its own target dev")
        seen[d.target_dev] = i
        if d.target_bus == "ide" and os_ is not None and os_.is_q35:
            conflict(dev_loc("disk", i), "the q35 machine has no IDE bus (use sata)",
                     "use bus='sata' (and an sd… target)", cls=XMLUnsupported)

    if out.videos and not out.graphics and "graphics" not in out.failed:
        conflict(dev_loc("video", 0), "<video> without <graphics> is not supported "
                                      "(Ferry guests are headless unless they have graphics)",
                 "remove <video>, or add <graphics>", cls=XMLUnsupported)
    for kind in ("vnc", "spice"):
        if sum(g.type == kind for g in out.graphics) > 1:
            conflict(dloc, f"more than one {kind} <graphics> is not supported",
                     f"keep one {kind} <graphics>", cls=XMLUnsupported)
    if out.graphics and not out.videos and "video" not in out.failed:
        out.add("video", Video())  # libvirt adds a default video device too
    for i, v in enumerate(out.videos):
        if v.model == "none" and len(out.videos) > 1:
            conflict(dev_loc("video", i), "video model 'none' must be the only video",
                     "remove the other videos, or this one")
        if i > 0 and v.primary:
            conflict(dev_loc("video", i), "only the first <video> may be primary",
                     "remove primary='yes' here", cls=XMLUnsupported)
        if i > 0 and v.model not in ("qxl", "virtio"):
            conflict(dev_loc("video", i), f"a secondary video must be qxl or virtio, "
                                          f"not {v.model!r}",
                     "use model type='qxl' or 'virtio'", cls=XMLUnsupported)

    ports: set[int] = set()
    for i, s in enumerate(out.serials):
        assert s.target_port is not None
        if s.target_port in ports:
            conflict(dev_loc("serial", i), f"serial port {s.target_port} is used twice",
                     "give each serial its own <target port>")
        ports.add(s.target_port)
    cports: set[int] = set()
    for i, c in enumerate(out.consoles):
        if c.target_type == "serial":
            assert c.target_port is not None
            if c.target_port in cports:
                conflict(dev_loc("console", i), f"console port {c.target_port} is used twice",
                         "give each console its own <target port>")
            cports.add(c.target_port)
            if c.target_port > 3:
                conflict(dev_loc("console", i), "a serial console port must be 0..3",
                         "use a port from 0 to 3, or a virtio console")
    names: set[str] = set()
    for i, c in enumerate(out.channels):
        if c.target_name is not None:
            if c.target_name in names:
                conflict(dev_loc("channel", i), f"channel name {c.target_name!r} is used twice",
                         "give each channel its own name")
            names.add(c.target_name)
    ctrls: set[tuple[str, int]] = set()
    for i, ct in enumerate(out.controllers):
        if (ct.type, ct.index) in ctrls:
            conflict(dev_loc("controller", i),
                     f"{ct.type} controller index {ct.index} is defined twice",
                     "remove one of them")
        ctrls.add((ct.type, ct.index))
    ids: set[int] = set()
    for i, a in enumerate(out.audios):
        if a.id in ids:
            conflict(dev_loc("audio", i), f"audio id {a.id} is used twice",
                     "give each <audio> its own id")
        ids.add(a.id)

    # A PCI slot/function or a drive position can hold only one device.
    pci: dict[tuple[int, int], str] = {}
    drive: dict[tuple[str, int, int, int, int], str] = {}
    vser: dict[tuple[int, int], str] = {}
    hint = "give each device its own address, or remove the addresses (Ferry assigns them)"
    for what, addr in _addressed(out):
        if addr.type == "pci":
            key = (addr.slot or 0, addr.function or 0)
            if key in pci:
                conflict(dloc, f"pci address slot {key[0]:#04x} function {key[1]} is used by "
                               f"both {pci[key]} and {what}", hint)
            pci.setdefault(key, what)
        elif addr.type == "drive":
            bus = what.split()[0]
            dkey = (bus, addr.controller or 0, addr.bus or 0, addr.target or 0, addr.unit or 0)
            if dkey in drive:
                conflict(dloc, f"drive address {dkey[1:]} is used by both {drive[dkey]} "
                               f"and {what}", hint)
            drive.setdefault(dkey, what)
        elif addr.type == "virtio-serial" and addr.port is not None:
            vkey = (addr.controller or 0, addr.port)
            if vkey in vser:
                conflict(dloc, f"virtio-serial port {vkey} is used by both {vser[vkey]} "
                               f"and {what}", hint)
            vser.setdefault(vkey, what)


def _addressed(out: Devices) -> Iterator[tuple[str, Address]]:
    for d in out.disks:
        if d.address:
            yield f"{d.target_bus} disk {d.target_dev}", d.address
    for c in out.controllers:
        if c.address:
            yield f"{c.type} controller {c.index}", c.address
    for n in out.interfaces:
        if n.address:
            yield f"interface {n.mac}", n.address
    for i, ch in enumerate(out.consoles):
        if ch.address:
            yield f"console {i}", ch.address
    for i, ch in enumerate(out.channels):
        if ch.address:
            yield f"channel {i}", ch.address
    for i, inp in enumerate(out.inputs):
        if inp.address:
            yield f"input {i}", inp.address
    for i, v in enumerate(out.videos):
        if v.address:
            yield f"video {i}", v.address
    if out.memballoon.address:
        yield "memballoon", out.memballoon.address
    for i, r in enumerate(out.rngs):
        if r.address:
            yield f"rng {i}", r.address
