"""Guest ABI stability: may a destination run ``new`` for a guest defined as ``old``?

A migration moves a running guest's device state into a fresh qemu; that
qemu must present exactly the same virtual hardware, or the guest sees a
device change under its feet (and qemu usually refuses the stream). This is
libvirt's ``virDomainDefCheckABIStability`` for Ferry's model.

May differ (host side, not guest visible):
  title, description, metadata; name only with ``allow_rename``; emulator;
  lifecycle actions (on_poweroff/on_reboot/on_crash); vCPU placement and
  cpuset; memory allocation (a destination may preallocate); disk type and
  source path, format, cache, io, discard and error policies; interface type,
  source and sndbuf; serial/console/channel host side (type, path, mode);
  graphics listen address, port, autoport, tlsPort, websocket; audio
  backends; rng backend; iothreads and a disk's iothread; memory backing
  (source, access, hugepages); a redirdev's tcp peer; a watchdog's action;
  a TPM's persistent_state and active PCR banks; ``<numatune>`` and
  ``<cputune>`` (host placement and pinning) and a NUMA cell's memAccess
  and discard.

Must be equal (guest visible): virt type, UUID (always), memory and
currentMemory, vCPU count and vCPUs online, os type/arch/machine/kernel/initrd/cmdline/boot
order/boot menu, firmware (efi/bios, its features, loader type, read-only
and secure; not the loader and NVRAM paths), CPU mode/model/match/features/topology/migratable,
the guest NUMA cells (count, and each one's vCPUs and memory: each cell's RAM
is a block ``ram-nodeN`` of the migration stream),
features (acpi, apic, pae, vmport, smm, kvm, hyperv), clock offset and timers,
pm, and every device's presence, order, kind, model, bus, target, MAC, MTU
and address (sound cards with their codecs, redirdevs, watchdogs, panic
notifiers included; a TPM's model and version). The PCI controller tree
(each bus by index and model; a root port's chassis and port, a bridge's
chassisNr) is compared first, so
a different tree is named as such; with equal models both ends place the
devices without addresses identically (:mod:`ferry.domain.argv`), so equal
models mean identical qemu device trees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ferry.domain.model import (
    OS,
    Address,
    CharDev,
    Controller,
    Disk,
    Domain,
    Graphics,
    HypervFeature,
    Input,
    Interface,
    NumaCell,
    Rng,
    Video,
)
from ferry.errors import ABIError

__all__ = ["check_abi_stability"]

_T = TypeVar("_T")


def _show(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Address):
        fields = ("domain", "bus", "slot", "function", "controller", "target", "unit", "port")
        parts = [f"{k}={getattr(value, k)}" for k in fields if getattr(value, k) is not None]
        return f"{value.type}({', '.join(parts)})"
    if isinstance(value, tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def _same(what: str, old: object, new: object, unit: str = "") -> None:
    if old != new:
        suffix = f" {unit}" if unit else ""
        raise ABIError(
            f"{what} differs: {_show(old)}{suffix} vs {_show(new)}{suffix}",
            field=what, old=_show(old), new=_show(new),
        )


def _each(
    plural: str,
    old: Sequence[_T],
    new: Sequence[_T],
    label: Callable[[int, _T], str],
    fields: Callable[[_T], list[tuple[str, Any]]],
) -> None:
    if len(old) != len(new):
        raise ABIError(
            f"device count differs: {len(old)} {plural} vs {len(new)}",
            field=plural, old=str(len(old)), new=str(len(new)),
        )
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        name = label(i, a)
        for (field, va), (_, vb) in zip(fields(a), fields(b), strict=True):
            _same(f"{name} {field}", va, vb)


def _disk_fields(d: Disk) -> list[tuple[str, Any]]:
    return [("target dev", d.target_dev), ("target bus", d.target_bus), ("device", d.device),
            ("readonly", d.readonly), ("shareable", d.shareable), ("event_idx", d.event_idx),
            ("address", d.address)]


def _controller_fields(c: Controller) -> list[tuple[str, Any]]:
    return [("type", c.type), ("index", c.index), ("model", c.model),
            ("model name", c.model_name), ("ports", c.ports), ("target chassis", c.chassis),
            ("target port", c.port), ("target chassisNr", c.chassis_nr),
            ("target hotplug", c.hotplug), ("master startport", c.master_startport),
            ("driver queues", c.queues), ("address", c.address)]


def _controller_label(c: Controller) -> str:
    if c.type == "pci":
        return f"pci controller {c.index} ({c.model or 'root'})"
    if c.master_startport is not None:
        return f"usb controller {c.index} ({c.model})"
    return f"{c.type} controller {c.index}"


def _pci_tree(old: Sequence[Controller], new: Sequence[Controller]) -> None:
    """The PCI buses (index → model) are the same; else name the first difference."""
    o = {c.index: c.model for c in old if c.type == "pci"}
    n = {c.index: c.model for c in new if c.type == "pci"}
    for index in sorted(set(o) | set(n)):
        if index not in n or index not in o:
            side, model = ("source", o[index]) if index in o else ("destination", n[index])
            raise ABIError(
                f"pci controller tree differs: bus {index} ({model or 'root'}) is only in the "
                f"{side} definition (source buses: {_buses(o)}; destination: {_buses(n)})",
                field="pci controller tree", old=_buses(o), new=_buses(n),
            )
        if o[index] != n[index]:
            _same(f"pci controller tree differs: bus {index} model", o[index], n[index])


def _buses(tree: dict[int, str | None]) -> str:
    return ", ".join(f"{i} {m or 'root'}" for i, m in sorted(tree.items())) or "none"


def _interface_fields(n: Interface) -> list[tuple[str, Any]]:
    return [("mac", n.mac), ("model", n.model), ("mtu", n.mtu), ("address", n.address)]


def _chardev_fields(c: CharDev) -> list[tuple[str, Any]]:
    return [("target type", c.target_type), ("target port", c.target_port),
            ("target name", c.target_name), ("target model", c.target_model),
            ("address", c.address)]


def _input_fields(i: Input) -> list[tuple[str, Any]]:
    return [("type", i.type), ("bus", i.bus), ("address", i.address)]


def _graphics_fields(g: Graphics) -> list[tuple[str, Any]]:
    return [("type", g.type), ("keymap", g.keymap), ("sharePolicy", g.share_policy),
            ("defaultMode", g.default_mode),
            ("options", tuple(f"{o.element}{dict(o.attrs)}" for o in g.options))]


def _video_fields(v: Video) -> list[tuple[str, Any]]:
    return [("model", v.model), ("vram", v.vram), ("ram", v.ram), ("vgamem", v.vgamem),
            ("heads", v.heads), ("primary", v.primary), ("address", v.address)]


def _rng_fields(r: Rng) -> list[tuple[str, Any]]:
    return [("model", r.model), ("rate bytes", r.rate_bytes), ("rate period", r.rate_period),
            ("address", r.address)]


def check_abi_stability(old: Domain, new: Domain, *, allow_rename: bool = False) -> None:
    """Check that ``new`` presents the guest with the same virtual hardware as ``old``.

    Used in Begin (a ``--xml`` given for the destination) and Prepare. The
    module docstring lists what may and may not differ.

    :raises ABIError: naming the first difference, e.g. ``memory differs:
        1048576 KiB vs 2097152 KiB``, ``disk vda target bus differs: virtio
        vs ide`` or ``device count differs: 2 disks vs 3``; details carry
        ``field``, ``old`` and ``new``.
    """
    _same("domain type", old.virt_type, new.virt_type)
    _same("uuid", old.uuid, new.uuid)
    if not allow_rename and old.name != new.name:
        raise ABIError(
            f"name differs: {old.name} vs {new.name} (renaming was not requested)",
            field="name", old=old.name, new=new.name,
        )
    _same("memory", old.memory_kib, new.memory_kib, "KiB")
    _same("currentMemory", old.current_memory_kib, new.current_memory_kib, "KiB")
    _same("vcpu count", old.vcpus, new.vcpus)
    _same("vcpus online", old.online_vcpus, new.online_vcpus)

    o, n = old.os, new.os
    _same("os type", o.type, n.type)
    _same("os arch", o.arch, n.arch)
    _same("machine type", o.machine, n.machine)
    _same("os kernel", o.kernel, n.kernel)
    _same("os initrd", o.initrd, n.initrd)
    _same("os cmdline", o.cmdline, n.cmdline)
    _same("boot order", o.boot_devs, n.boot_devs)
    _same("boot menu", o.bootmenu, n.bootmenu)
    _same("boot menu timeout", o.bootmenu_timeout, n.bootmenu_timeout)
    _firmware(o, n)

    _same("cpu definition", old.cpu is not None, new.cpu is not None)
    if old.cpu is not None and new.cpu is not None:
        oc, nc = old.cpu, new.cpu
        _same("cpu mode", oc.mode, nc.mode)
        _same("cpu model", oc.model, nc.model)
        _same("cpu match", oc.match, nc.match)
        _same("cpu migratable", oc.migratable, nc.migratable)
        _same("cpu topology", oc.topology, nc.topology)
        _same("cpu features", tuple(f"{f.policy}:{f.name}" for f in oc.features),
              tuple(f"{f.policy}:{f.name}" for f in nc.features))
        _numa_cells(oc.numa, nc.numa)

    of, nf = old.features, new.features
    _same("feature acpi", of.acpi, nf.acpi)
    _same("feature apic", of.apic, nf.apic)
    _same("feature apic eoi", of.apic_eoi, nf.apic_eoi)
    _same("feature pae", of.pae, nf.pae)
    _same("feature vmport", of.vmport, nf.vmport)
    smm = (of.smm, nf.smm)
    if o.firmware == n.firmware == "efi" and None in smm:
        # Unstated, SMM is the firmware autoselection's choice (a definition
        # as written vs the one it resolved to at start).
        smm = (of.smm if of.smm is not None else nf.smm,) * 2
    _same("feature smm", *smm)
    _same("feature kvm", of.kvm, nf.kvm)
    _same("feature hyperv mode", of.hyperv_mode, nf.hyperv_mode)
    _same("feature hyperv", tuple(_hv(h) for h in of.hyperv), tuple(_hv(h) for h in nf.hyperv))
    _same("clock offset", old.clock.offset, new.clock.offset)
    _same("clock timers", old.clock.timers, new.clock.timers)
    _same("pm suspend-to-mem", old.pm.suspend_to_mem, new.pm.suspend_to_mem)
    _same("pm suspend-to-disk", old.pm.suspend_to_disk, new.pm.suspend_to_disk)

    _each("disks", old.disks, new.disks, lambda i, d: f"disk {d.target_dev}", _disk_fields)
    _pci_tree(old.controllers, new.controllers)
    _each("controllers", old.controllers, new.controllers,
          lambda i, c: _controller_label(c), _controller_fields)
    _each("interfaces", old.interfaces, new.interfaces,
          lambda i, n: f"interface {i} ({n.mac})", _interface_fields)
    _each("serials", old.serials, new.serials, lambda i, c: f"serial {i}", _chardev_fields)
    _each("consoles", old.consoles, new.consoles, lambda i, c: f"console {i}", _chardev_fields)
    _each("channels", old.channels, new.channels, lambda i, c: f"channel {i}", _chardev_fields)
    _each("inputs", old.inputs, new.inputs, lambda i, x: f"input {i}", _input_fields)
    _each("graphics", old.graphics, new.graphics, lambda i, g: f"graphics {i}",
          _graphics_fields)
    _each("videos", old.videos, new.videos, lambda i, v: f"video {i}", _video_fields)
    _same("memballoon model", old.memballoon.model, new.memballoon.model)
    _same("memballoon address", old.memballoon.address, new.memballoon.address)
    _each("rngs", old.rngs, new.rngs, lambda i, r: f"rng {i}", _rng_fields)
    _each("sounds", old.sounds, new.sounds, lambda i, s: f"sound {i}",
          lambda s: [("model", s.model), ("codecs", s.codecs), ("address", s.address)])
    _each("redirdevs", old.redirdevs, new.redirdevs, lambda i, r: f"redirdev {i}",
          lambda r: [("bus", r.bus), ("type", r.type), ("address", r.address)])
    _each("watchdogs", old.watchdogs, new.watchdogs, lambda i, w: f"watchdog {i}",
          lambda w: [("model", w.model), ("address", w.address)])
    _each("panics", old.panics, new.panics, lambda i, p: f"panic {i}",
          lambda p: [("model", p.model), ("iobase", p.iobase)])
    _each("filesystems", old.filesystems, new.filesystems, lambda i, f: f"filesystem {i}",
          lambda f: [("mount tag", f.target_dir), ("queue", f.queue), ("address", f.address)])
    _each("hostdevs", old.hostdevs, new.hostdevs, lambda i, h: f"hostdev {i}",
          lambda h: [("type", h.type), ("device", h.describe()), ("address", h.address)])
    # The TPM's state moves in the stream (swtpm's blobs); its interface and
    # version must be the ones the guest has (PCR banks and persistence are
    # host side: the banks are the state's, which moves).
    _each("tpms", old.tpms, new.tpms, lambda i, t: f"tpm {i}",
          lambda t: [("model", t.model), ("version", t.tpm_version)])


def _firmware(o: OS, n: OS) -> None:
    """The firmware the guest sees: kind, features, loader type, read-only, secure.

    Paths are the host's (the image is in the migration stream, a pflash
    like RAM; each host has its own NVRAM file). A loader attribute only one
    side states is the host's choice on the other (firmware autoselection).
    """
    _same("os firmware", o.firmware, n.firmware)
    _same("os firmware features", o.firmware_features, n.firmware_features)
    _same("os loader", o.loader is not None or o.firmware == "efi",
          n.loader is not None or n.firmware == "efi")
    _same("os nvram", o.nvram is not None or o.firmware == "efi",
          n.nvram is not None or n.firmware == "efi")
    if o.loader is not None and n.loader is not None:
        for field in ("type", "readonly", "secure"):
            a, b = getattr(o.loader, field), getattr(n.loader, field)
            if a is not None and b is not None:
                _same(f"os loader {field}", a, b)


def _numa_cells(old: Sequence[NumaCell], new: Sequence[NumaCell]) -> None:
    if len(old) != len(new):
        raise ABIError(
            f"NUMA cell count differs: {len(old)} vs {len(new)}",
            field="numa cells", old=str(len(old)), new=str(len(new)),
        )
    for a, b in zip(old, new, strict=True):
        _same(f"NUMA cell {a.id} cpus", a.cpus or "none", b.cpus or "none")
        _same(f"NUMA cell {a.id} memory", a.memory_kib, b.memory_kib, "KiB")


def _hv(h: HypervFeature) -> str:
    extra = "".join(f" {k}={v}" for k, v in (("retries", h.retries), ("value", h.value),
                                             ("direct", h.direct)) if v is not None)
    return f"{h.name}={'on' if h.state else 'off'}{extra}"
