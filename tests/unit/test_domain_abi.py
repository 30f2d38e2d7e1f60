"""check_abi_stability: every allowed and every refused difference."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ferry.domain import (
    Address,
    Audio,
    CpuFeature,
    Domain,
    Timer,
    check_abi_stability,
    format_domain,
    parse_domain,
)
from ferry.errors import ABIError, XMLError

GOLDEN = Path(__file__).resolve().parent / "golden" / "domain"
BASE = parse_domain((GOLDEN / "q35-kitchen-sink.xml").read_bytes())
r = dataclasses.replace


def _with(field: str, index: int, **changes: Any) -> Callable[[Domain], Domain]:
    """Change one device of a device tuple."""

    def change(d: Domain) -> Domain:
        items = list(getattr(d, field))
        items[index] = r(items[index], **changes)
        return r(d, **{field: tuple(items)})

    return change


def _os(**changes: Any) -> Callable[[Domain], Domain]:
    return lambda d: r(d, os=r(d.os, **changes))


def _cpu(**changes: Any) -> Callable[[Domain], Domain]:
    def change(d: Domain) -> Domain:
        assert d.cpu is not None
        return r(d, cpu=r(d.cpu, **changes))

    return change


def _topology(**changes: Any) -> Callable[[Domain], Domain]:
    def change(d: Domain) -> Domain:
        assert d.cpu is not None and d.cpu.topology is not None
        return r(d, cpu=r(d.cpu, topology=r(d.cpu.topology, **changes)))

    return change


ALLOWED: dict[str, Callable[[Domain], Domain]] = {
    "title": lambda d: r(d, title="Another title"),
    "description": lambda d: r(d, description=None),
    "metadata": lambda d: r(d, metadata="<x:y xmlns:x='urn:x'/>"),
    "emulator": lambda d: r(d, emulator="/opt/qemu/bin/qemu-system-x86_64"),
    "lifecycle": lambda d: r(d, on_poweroff="restart", on_reboot="restart", on_crash="destroy"),
    "vcpu cpuset and placement": lambda d: r(d, vcpu_cpuset="8-11", vcpu_placement="auto"),
    "memory allocation": lambda d: r(d, memory_allocation="ondemand", prealloc_threads=None),
    "disk source path": _with("disks", 0, source="/srv/other/root.qcow2"),
    "disk type file to block": _with("disks", 0, type="block", source="/dev/vg1/root"),
    "disk format and cache": _with("disks", 1, format="qcow2", cache="writeback",
                                   io=None, discard="ignore"),
    "disk error policies": _with("disks", 1, error_policy="report", rerror_policy=None),
    "interface host side": _with("interfaces", 0, type="user", source=None, sndbuf=4096),
    "serial host side": _with("serials", 1, type="unix", source_path="/run/x/s.sock",
                              source_mode="bind", append=None),
    "channel socket path": _with("channels", 1, source_path="/run/other/ext.sock"),
    "console host side": _with("consoles", 1, type="pty"),
    "graphics listen": _with("graphics", 0, listen="127.0.0.1"),
    "graphics ports": _with("graphics", 1, port=5999, tls_port=5998, autoport=False),
    "vnc websocket": _with("graphics", 0, websocket=5701),
    "audio backends": lambda d: r(d, audios=(Audio(id=1, type="pulseaudio"), Audio(2, "none"))),
    "rng backend": _with("rngs", 0, backend_model="random", backend_path="/dev/urandom"),
}


@pytest.mark.parametrize("change", list(ALLOWED.values()), ids=list(ALLOWED))
def test_allowed_differences(change: Callable[[Domain], Domain]) -> None:
    check_abi_stability(BASE, change(BASE))
    check_abi_stability(change(BASE), BASE)


def test_identical_and_reparsed_domains_are_stable() -> None:
    check_abi_stability(BASE, BASE)
    check_abi_stability(BASE, parse_domain(format_domain(BASE)))
    check_abi_stability(BASE, parse_domain(format_domain(BASE, migratable=True)))


def test_rename_needs_permission() -> None:
    renamed = BASE.renamed("sink-2")
    with pytest.raises(ABIError, match=r"^name differs: sink,with,commas vs sink-2"):
        check_abi_stability(BASE, renamed)
    check_abi_stability(BASE, renamed, allow_rename=True)
    # ... but never a new UUID, even with a rename.
    with pytest.raises(ABIError, match=r"^uuid differs"):
        check_abi_stability(BASE, r(renamed, uuid="11111111-2222-3333-4444-555555555555"),
                            allow_rename=True)


REFUSED: dict[str, tuple[Callable[[Domain], Domain], str]] = {
    "virt type": (lambda d: r(d, virt_type="qemu"), "domain type differs: kvm vs qemu"),
    "memory": (lambda d: r(d, memory_kib=2097152),
               "memory differs: 1048576 KiB vs 2097152 KiB"),
    "currentMemory": (lambda d: r(d, current_memory_kib=1048576),
                      "currentMemory differs: 786432 KiB vs 1048576 KiB"),
    "vcpus": (lambda d: r(d, vcpus=8), "vcpu count differs: 4 vs 8"),
    "arch": (_os(arch="i686"), "os arch differs: x86_64 vs i686"),
    "machine": (_os(machine="pc-q35-7.1"), "machine type differs: pc-q35-7.2 vs pc-q35-7.1"),
    "kernel": (_os(kernel="/boot/vmlinuz"), "os kernel differs: none vs /boot/vmlinuz"),
    "initrd": (_os(initrd="/boot/initrd"), "os initrd differs"),
    "cmdline": (_os(cmdline="quiet"), "os cmdline differs"),
    "boot order": (_os(boot_devs=("hd", "cdrom")),
                   "boot order differs: [cdrom, hd] vs [hd, cdrom]"),
    "boot menu": (_os(bootmenu=False), "boot menu differs: yes vs no"),
    "cpu presence": (lambda d: r(d, cpu=None), "cpu definition differs: yes vs no"),
    "cpu mode": (_cpu(mode="host-passthrough", model=None), "cpu mode differs: custom vs host"),
    "cpu model": (_cpu(model="Haswell"), "cpu model differs: Skylake-Client vs Haswell"),
    "cpu features": (_cpu(features=(CpuFeature("vmx"),)), "cpu features differs"),
    "cpu topology": (_topology(cores=1, threads=4), "cpu topology differs"),
    "cpu migratable": (_cpu(migratable=False), "cpu migratable differs: none vs no"),
    "acpi": (lambda d: r(d, features=r(d.features, acpi=False)), "feature acpi differs"),
    "apic eoi": (lambda d: r(d, features=r(d.features, apic_eoi=False)),
                 "feature apic eoi differs: yes vs no"),
    "pae": (lambda d: r(d, features=r(d.features, pae=False)), "feature pae differs"),
    "clock offset": (lambda d: r(d, clock=r(d.clock, offset="utc")),
                     "clock offset differs: localtime vs utc"),
    "clock timers": (lambda d: r(d, clock=r(d.clock, timers=(Timer("rtc"),))),
                     "clock timers differs"),
    "pm": (lambda d: r(d, pm=r(d.pm, suspend_to_mem=True)), "pm suspend-to-mem differs: no vs yes"),
    "disk count": (lambda d: r(d, disks=d.disks[:3]), "device count differs: 4 disks vs 3"),
    "disk bus": (_with("disks", 1, target_bus="sata"), "disk sda target bus differs: scsi vs sata"),
    "disk target": (_with("disks", 1, target_dev="sdb"), "disk sda target dev differs: sda vs sdb"),
    "disk order": (lambda d: r(d, disks=(d.disks[1], d.disks[0], *d.disks[2:])),
                   "disk vda target dev differs: vda vs sda"),
    "disk device": (_with("disks", 2, device="disk"), "disk sdc device differs: cdrom vs disk"),
    "disk readonly": (_with("disks", 0, readonly=True), "disk vda readonly differs: no vs yes"),
    "disk shareable": (_with("disks", 1, shareable=False), "disk sda shareable differs"),
    "disk event_idx": (_with("disks", 0, event_idx=None), "disk vda event_idx differs"),
    "disk address": (_with("disks", 3, address=Address("usb", bus=0, port=3)),
                     "disk sdd address differs: usb(bus=0, port=2) vs usb(bus=0, port=3)"),
    "controller count": (lambda d: r(d, controllers=d.controllers[1:]),
                         "device count differs: 5 controllers vs 4"),
    "controller model": (_with("controllers", 0, model="lsilogic"),
                         "scsi controller 0 model differs: virtio-scsi vs lsilogic"),
    "controller ports": (_with("controllers", 1, ports=4),
                         "usb controller 0 ports differs: 8 vs 4"),
    "controller address": (_with("controllers", 4, address=None),
                           "virtio-serial controller 0 address differs"),
    "interface count": (lambda d: r(d, interfaces=d.interfaces[:1]),
                        "device count differs: 2 interfaces vs 1"),
    "mac": (_with("interfaces", 0, mac="52:54:00:00:00:01"),
            "interface 0 (52:54:00:aa:bb:cc) mac differs: 52:54:00:aa:bb:cc vs 52:54:00:00:00:01"),
    "nic model": (_with("interfaces", 1, model="e1000"), "interface 1 (52:54:00:aa:bb:cd) model"),
    "mtu": (_with("interfaces", 0, mtu=1500), "interface 0 (52:54:00:aa:bb:cc) mtu differs"),
    "nic address": (_with("interfaces", 1, address=None),
                    "interface 1 (52:54:00:aa:bb:cd) address"),
    "serial count": (lambda d: r(d, serials=d.serials[:1]), "device count differs: 2 serials vs 1"),
    "serial port": (_with("serials", 1, target_port=2), "serial 1 target port differs: 1 vs 2"),
    "console target": (_with("consoles", 1, target_type="serial"),
                       "console 1 target type differs: virtio vs serial"),
    "channel name": (_with("channels", 0, target_name="org.other"),
                     "channel 0 target name differs: org.qemu.guest_agent.0 vs org.other"),
    "channel address": (_with("channels", 1, address=None), "channel 1 address differs"),
    "input bus": (_with("inputs", 1, bus="usb"), "input 1 bus differs: virtio vs usb"),
    "input count": (lambda d: r(d, inputs=d.inputs[:2]), "device count differs: 4 inputs vs 2"),
    "graphics count": (lambda d: r(d, graphics=d.graphics[:1]),
                       "device count differs: 2 graphics vs 1"),
    "graphics type": (lambda d: r(d, graphics=(d.graphics[1], d.graphics[0])),
                      "graphics 0 type differs: vnc vs spice"),
    "keymap": (_with("graphics", 0, keymap="de"), "graphics 0 keymap differs: en-us vs de"),
    "video model": (_with("videos", 1, model="virtio"), "video 1 model differs: qxl vs virtio"),
    "video ram": (_with("videos", 1, vram=16384), "video 1 vram differs: 65536 vs 16384"),
    "video heads": (_with("videos", 0, heads=1), "video 0 heads differs: 2 vs 1"),
    "video address": (_with("videos", 0, address=Address("pci", 0, 0, 9, 0)),
                      "video 0 address differs: none vs pci(domain=0, bus=0, slot=9, function=0)"),
    "balloon model": (lambda d: r(d, memballoon=r(d.memballoon, model="none", address=None)),
                      "memballoon model differs: virtio vs none"),
    "balloon address": (lambda d: r(d, memballoon=r(d.memballoon, address=None)),
                        "memballoon address differs"),
    "rng count": (lambda d: r(d, rngs=()), "device count differs: 2 rngs vs 0"),
    "rng rate": (_with("rngs", 1, rate_bytes=2048), "rng 1 rate bytes differs: 1024 vs 2048"),
}


@pytest.mark.parametrize(("change", "message"), list(REFUSED.values()), ids=list(REFUSED))
def test_refused_differences(change: Callable[[Domain], Domain], message: str) -> None:
    new = change(BASE)
    with pytest.raises(ABIError) as info:
        check_abi_stability(BASE, new, allow_rename=True)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, XMLError)  # ABIError is an XMLError on the wire
    assert {"field", "old", "new"} <= set(info.value.details)


def test_the_first_difference_is_reported() -> None:
    new = r(BASE, memory_kib=2 * BASE.memory_kib, vcpus=8, disks=BASE.disks[:1])
    with pytest.raises(ABIError, match=r"^memory differs"):
        check_abi_stability(BASE, new)


def test_abi_check_from_xml_edits() -> None:
    """The way Begin/Prepare use it: two XML texts of the same guest."""
    xml = (GOLDEN / "guest1.xml").read_text()
    old = parse_domain(xml)
    moved = parse_domain(xml.replace("/run/ferry/serial/guest1.sock", "/run/ferry/b/g.sock")
                         .replace("<allocation mode='immediate'/>", ""))
    check_abi_stability(old, moved)
    bigger = parse_domain(xml.replace("<memory unit='MiB'>256", "<memory unit='MiB'>512"))
    with pytest.raises(ABIError, match=r"^memory differs: 262144 KiB vs 524288 KiB$"):
        check_abi_stability(old, bigger)
