"""Cross-checks: what spans several devices (unique targets, ports, names and
addresses; the PCI controller tree and the addresses on it; video needs
graphics; IDE disks need a machine with IDE)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from lxml import etree

from ferry.domain._checks import Loc
from ferry.domain._context import Ctx
from ferry.domain._controllers import UNSET_INDEX
from ferry.domain._devices import DEVICES, Devices
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
    _controllers(ctx, out, os_, dev_loc, conflict)
    ids: set[int] = set()
    for i, a in enumerate(out.audios):
        if a.id in ids:
            conflict(dev_loc("audio", i), f"audio id {a.id} is used twice",
                     "give each <audio> its own id")
        ids.add(a.id)

    # A PCI slot/function or a drive position can hold only one device.
    tree = _PciTree(out, os_)
    pci: dict[tuple[int, int, int], str] = {}
    drive: dict[tuple[str, int, int, int, int], str] = {}
    vser: dict[tuple[int, int], str] = {}
    hint = "give each device its own address, or remove the addresses (Ferry assigns them)"
    for what, addr, loc in _addressed(out, dev_loc, dloc):
        if addr.type == "pci":
            key = (addr.bus or 0, addr.slot or 0, addr.function or 0)
            on = f"bus {key[0]:#04x} " if key[0] else ""
            if key in pci:
                conflict(loc, f"pci address {on}slot {key[1]:#04x} function {key[2]} is used "
                              f"by both {pci[key]} and {what}", hint)
            pci.setdefault(key, what)
            if os_ is not None:
                tree.check(ctx, loc, what, addr)
        elif addr.type == "drive":
            bus = what.split()[0]
            dkey = (bus, addr.controller or 0, addr.bus or 0, addr.target or 0, addr.unit or 0)
            if dkey in drive:
                conflict(loc, f"drive address {dkey[1:]} is used by both {drive[dkey]} "
                              f"and {what}", hint)
            drive.setdefault(dkey, what)
        elif addr.type == "virtio-serial" and addr.port is not None:
            vkey = (addr.controller or 0, addr.port)
            if vkey in vser:
                conflict(loc, f"virtio-serial port {vkey} is used by both {vser[vkey]} "
                              f"and {what}", hint)
            vser.setdefault(vkey, what)


def _assign_indexes(out: Devices) -> None:
    """Give controllers without ``index`` the lowest free one of their type (libvirt's rule).

    PCI index 0 is the root bus's: a root without index gets it, the other
    PCI controllers start from 1.
    """
    ctls = out.controllers
    taken = {(c.type, c.index) for c in ctls if c.index != UNSET_INDEX}
    for i, c in enumerate(ctls):
        if c.index == UNSET_INDEX:
            if c.model in ("pci-root", "pcie-root"):
                ctls[i] = dataclasses.replace(c, index=0)
                continue
            n = 1 if c.type == "pci" else 0
            while (c.type, n) in taken:
                n += 1
            taken.add((c.type, n))
            ctls[i] = dataclasses.replace(c, index=n)


_ICH9 = ("ich9-ehci1", "ich9-uhci1", "ich9-uhci2", "ich9-uhci3")


def _controllers(
    ctx: Ctx, out: Devices, os_: OS | None, dev_loc: Callable[[str, int], Loc],
    conflict: Callable[..., None],
) -> None:
    """Indexes unique per type (an ich9-ehci1 shares its index with its uhci companions)."""
    _assign_indexes(out)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, ct in enumerate(out.controllers):
        groups.setdefault((ct.type, ct.index), []).append(i)
    for (ctype, index), members in groups.items():
        models = [out.controllers[i].model for i in members]
        ich9 = ctype == "usb" and all(m in _ICH9 for m in models)
        if ich9 and len(set(models)) == len(models):
            if "ich9-ehci1" not in models:
                conflict(dev_loc("controller", members[0]),
                         f"usb controller {index}: the {models[0]} companion needs an "
                         "ich9-ehci1 controller with the same index (its master)",
                         f"add <controller type='usb' index='{index}' model='ich9-ehci1'/>")
            continue
        for i in members[1:]:
            conflict(dev_loc("controller", i),
                     f"{ctype} controller index {index} is defined twice",
                     "remove one of them (or give it another index)")
    if os_ is None:
        return
    for i, ct in enumerate(out.controllers):
        a = ct.address
        builtin = _BUILTIN_CONTROLLERS.get((ct.type, os_.is_q35))
        if builtin is not None and a is not None and a.type == "pci" and (
                (a.bus or 0, a.slot or 0, a.function or 0) != builtin):
            conflict(dev_loc("controller", i),
                     f"the {ct.type} controller is built into the {os_.machine!r} machine at "
                     f"pci 00:{builtin[1]:02x}.{builtin[2]}; it cannot be moved",
                     f"use <address type='pci' domain='0x0000' bus='0x00' "
                     f"slot='{builtin[1]:#04x}' function='{builtin[2]:#x}'/> "
                     "(or remove the address)", cls=XMLUnsupported)
    chassis: dict[int, int] = {}
    for i, ct in enumerate(out.controllers):
        if ct.model == "pcie-root-port":
            ch = ct.chassis if ct.chassis is not None else ct.index
            if ch in chassis:
                conflict(dev_loc("controller", i),
                         f"pcie-root-port {ct.index} has chassis {ch}, as has pcie-root-port "
                         f"{chassis[ch]} (qemu needs each root port's chassis unique)",
                         "give each root port its own <target chassis=…> (or leave it out: "
                         "it is then the index)")
            chassis.setdefault(ch, ct.index)


#: Controllers built into a machine, at a fixed (bus, slot, function): (type, q35).
_BUILTIN_CONTROLLERS: dict[tuple[str, bool], tuple[int, int, int]] = {
    ("sata", True): (0, 0x1F, 2),
    ("ide", False): (0, 1, 1),
}

#: Functions of the root bus the machine itself occupies: (bus, slot, function) → what.
_BUILTIN_FUNCTIONS: dict[bool, dict[tuple[int, int, int], str]] = {
    True: {(0, 0, 0): "the host bridge", (0, 0x1F, 0): "the ICH9 LPC (ISA) bridge",
           (0, 0x1F, 2): "the ICH9 SATA controller", (0, 0x1F, 3): "the ICH9 SMBus"},
    False: {(0, 0, 0): "the host bridge", (0, 1, 0): "the PIIX3 ISA bridge",
            (0, 1, 1): "the PIIX3 IDE controller", (0, 1, 3): "the PIIX4 ACPI function"},
}

#: The buses each PCI controller model may plug into (by the model of that bus).
_PARENTS: dict[str, tuple[str, ...]] = {
    "pcie-root-port": ("pcie-root",),
    "pcie-to-pci-bridge": ("pcie-root", "pcie-root-port"),
    "dmi-to-pci-bridge": ("pcie-root",),
    "pci-bridge": ("pci-root", "pcie-root", "pci-bridge", "pcie-to-pci-bridge",
                   "dmi-to-pci-bridge"),
}

#: The slots a bus of each model has.
_SLOTS: dict[str, tuple[int, int]] = {
    "pci-root": (1, 0x1F),
    "pcie-root": (1, 0x1F),
    "pcie-root-port": (0, 0),
    "pcie-to-pci-bridge": (1, 0x1F),
    "pci-bridge": (1, 0x1F),
    "dmi-to-pci-bridge": (0, 0x1F),
}


class _PciTree:
    """The guest's PCI buses by number: the root (0) and one per PCI controller index."""

    def __init__(self, out: Devices, os_: OS | None) -> None:
        self.q35 = os_ is not None and os_.is_q35
        root = "pcie-root" if self.q35 else "pci-root"
        self.buses: dict[int, str] = {0: root}
        for ct in out.controllers:
            if ct.type == "pci" and ct.index > 0 and ct.model is not None:
                self.buses[ct.index] = ct.model
        self.by_what = {f"pci controller {ct.index}": ct for ct in out.controllers
                        if ct.type == "pci"}

    def names(self) -> str:
        return ", ".join(f"{n} ({m})" for n, m in sorted(self.buses.items()))

    def check(self, ctx: Ctx, loc: Loc, what: str, addr: Address) -> None:
        """The bus of ``addr`` exists, has that slot, and takes ``what``."""
        bus, slot, fn = addr.bus or 0, addr.slot or 0, addr.function or 0
        model = self.buses.get(bus)
        if model is None:
            ctx.report(loc, f"the pci address of {what} names bus {bus:#04x}, which does not "
                            f"exist (the buses are {self.names()})", kind="conflict",
                       hint=f"add <controller type='pci' index='{bus}' model="
                            f"'{'pcie-root-port' if self.q35 else 'pci-bridge'}'/>, use one of "
                            "the buses, or remove the address (Ferry assigns one)")
            return
        lo, hi = _SLOTS[model]
        if not lo <= slot <= hi:
            only = f"only slot {lo}" if lo == hi else f"slots {lo:#04x}..{hi:#04x}"
            ctx.report(loc, f"the pci address of {what} is slot {slot:#04x} of bus {bus:#04x}, "
                            f"a {model}, which has {only}", kind="conflict",
                       hint=f"use slot='{lo:#04x}'" if lo == hi else
                            f"use a slot from {lo:#04x} to {hi:#04x}")
        builtin = _BUILTIN_FUNCTIONS[self.q35].get((bus, slot, fn))
        ctl = self.by_what.get(what)
        mine = {("sata controller 0", True): (0, 0x1F, 2),
                ("ide controller 0", False): (0, 1, 1)}.get((what, self.q35))
        if builtin is not None and mine != (bus, slot, fn):
            ctx.report(loc, f"the pci address of {what} is {bus:02x}:{slot:02x}.{fn}, where "
                            f"the machine has {builtin}", kind="conflict",
                       hint="use another slot, or remove the address (Ferry assigns one)")
        if ctl is not None and ctl.model in _PARENTS:
            if bus >= ctl.index:
                ctx.report(loc, f"{what} ({ctl.model}) plugs into bus {bus:#04x}, which is not "
                                f"lower than its own index {ctl.index}", kind="conflict",
                           hint="plug it into a bus with a lower index (buses are created "
                                "in index order)")
            elif model not in _PARENTS[ctl.model]:
                ctx.report(loc, f"{what} ({ctl.model}) cannot plug into bus {bus:#04x}, a "
                                f"{model}", kind="conflict",
                           hint=f"plug it into a {' or '.join(_PARENTS[ctl.model])}")


def _addressed(
    out: Devices, device_loc: Callable[[str, int], Loc], dloc: Loc
) -> Iterator[tuple[str, Address, Loc]]:
    """Every device with an address: (what it is, its address, where the address is)."""

    def dev_loc(tag: str, n: int) -> Loc:
        found = out.element(tag, n)
        addr = found.find("address") if found is not None else None
        if addr is None:
            return device_loc(tag, n)
        loc = device_loc(tag, n)
        line = addr.sourceline
        return Loc(loc.where, line if isinstance(line, int) else loc.line,
                   f"domain/devices/{tag}/address")

    for i, d in enumerate(out.disks):
        if d.address:
            yield f"{d.target_bus} disk {d.target_dev}", d.address, dev_loc("disk", i)
    for i, c in enumerate(out.controllers):
        if c.address:
            yield f"{c.type} controller {c.index}", c.address, dev_loc("controller", i)
    for i, n in enumerate(out.interfaces):
        if n.address:
            yield f"interface {n.mac}", n.address, dev_loc("interface", i)
    # Every other device kind (the table grows): by its Domain field.
    for tag, kind in DEVICES.items():
        if tag in ("disk", "controller", "interface"):
            continue
        models = out.fields().get(kind.field)
        found = [models] if kind.single is not None else list(models or ())
        for i, m in enumerate(found):
            addr = getattr(m, "address", None)
            if isinstance(addr, Address):
                yield (tag if kind.single is not None else f"{tag} {i}"), addr, (
                    dev_loc(tag, i) if out.element(tag, i) is not None else dloc)
