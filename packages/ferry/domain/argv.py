"""Build the qemu command line for a domain.

The argv is a list of strings, executed directly (never through a shell).
Every option value that qemu splits on commas has its commas doubled
(qemu's ``,,`` escape), and values that cannot be escaped (NUL, newline)
are refused, so nothing from the XML can add an option.

Both ends of a migration build the argv from the same model with this one
function; everything guest visible (device order, ids, PCI slots, RAM block
name) is therefore a function of the model alone. That is why PCI slots for
devices without an ``<address>`` are assigned here, deterministically, in
the emission order, instead of leaving it to qemu: explicitly addressed
devices anywhere on the command line can then never collide with an
automatically placed one.

The PCI tree is the XML's: each PCI controller of index N is a
``-device`` with ``id=pci.N`` (``pcie-root-port,port=…,chassis=…``,
``pcie-pci-bridge``, ``pci-bridge,chassis_nr=…``, ``i82801b11-bridge``),
emitted first and in index order, and a device with an ``<address>`` goes
to ``bus=pci.N,addr=0xS.0xF`` (bus 0 is ``pcie.0`` or ``pci.0``). Root
ports without an address are packed as libvirt packs them (functions 0..7
of slot 2, then 3, …; ``port`` = slot << 3 | function, ``chassis`` = index);
devices without an address go to free slots of the root bus. An ich9-ehci1
and its uhci companions without addresses share one slot (functions 7, 0,
1, 2). Function 0 of a slot with other functions in use is made
multifunction.

What the argv does with the model (where it does nothing, it says so):

* ``-machine TYPE,accel=kvm|tcg,usb=off,dump-guest-core=off,acpi=on|off``
  (``acpi`` follows ``<features><acpi/>`` as in libvirt), ``hpet=off`` for
  ``<timer name='hpet' present='no'/>``, ``vmport``/``smm`` from
  ``<features>``.
* Guest RAM: ``-m MiB`` (rounded up to a whole MiB, as libvirt does on x86).
  ``<allocation mode='immediate'/>`` adds ``-object memory-backend-ram,
  id=pc.ram,…,prealloc=on`` and ``-machine memory-backend=pc.ram``. The id
  must be ``pc.ram``: it names the RAM block in the migration stream, and
  ``pc.ram`` is the name plain ``-m`` uses, so a preallocated destination
  accepts a stream from a source that is not preallocated (checked with
  qemu 7.2: any other id fails the migration). ``<memoryBacking>`` with
  ``<source type='memfd'/>``, ``<access mode='shared'/>`` or ``<hugepages>``
  uses the same id: ``memory-backend-memfd`` (``hugetlb=on,hugetlbsize=…``
  for huge pages, checked against the host's free huge pages first, so
  that a host without them is a clear error and not qemu's ENOMEM) or
  ``memory-backend-ram``, with ``share=on`` for shared access. Guest NUMA
  cells (``<cpu><numa>``) replace ``pc.ram`` with one backend per cell,
  ``ram-nodeN``, and ``-numa node,nodeid=N,cpus=…,memdev=ram-nodeN``;
  ``<numatune>`` adds ``host-nodes``/``policy`` to the backends, checked
  against the host's NUMA nodes first (:mod:`ferry.domain._argv_numa`).
* ``-cpu``: custom → the model (qemu64 when none), with ``enforce`` for a
  named model unless ``check='none'`` (a host lacking a feature is an error
  naming it); a host-model guest that arrived by migration runs the
  source's CPU as ``base,…,enforce`` (:mod:`ferry.domain._cpu`); host-passthrough and
  host-model → ``host`` under KVM, ``max`` under TCG (TCG has no host CPU to
  pass through); features as ``NAME=on|off``; ``<apic eoi>`` and
  ``<timer name='kvmclock'>`` as ``kvm-pv-eoi``/``kvmclock`` under KVM only,
  and so are ``<kvm>`` (``kvm=off`` hides KVM; ``kvm-hint-dedicated``, ...),
  ``<hyperv>`` (``hv-relaxed``, ``hv-spinlocks=0x1fff``, ... or
  ``hv-passthrough``), ``<timer name='hypervclock'>`` (``hv-time``) and a
  hyperv ``<panic>`` (``hv-crash``).
* ``-smp N,sockets,cores,threads`` (from ``<cpu><topology>`` or N sockets);
  ``-smp CURRENT,maxcpus=N,…`` for ``<vcpu current>``. ``-object
  iothread,id=iothreadK`` for ``<iothreads>``; a virtio disk's
  ``<driver iothread=K>`` is its ``iothread=iothreadK``.
* UEFI firmware (:mod:`ferry.domain._argv_firmware`): ``-blockdev`` nodes
  ``pflash0``/``pflash1`` (code read-only, the NVRAM file read-write) and
  ``-machine pflash0=…,pflash1=…``; a secure loader adds ``-global
  driver=cfi.pflash01,property=secure,value=on``; a rom loader is ``-bios``.
* ``-kernel/-initrd/-append``, ``-boot order=…,menu=…``, ``-no-reboot`` for
  ``on_reboot=destroy``. Other lifecycle actions are the agent's job.
* Files the agent opened for qemu (:class:`PassedFiles`): ``-add-fd`` and
  ``/dev/fdset/N`` for disks, ``/proc/self/fd/N`` for kernel and initrd.
* ``-rtc base=…[,driftfix=slew][,clock=…]``; pit tickpolicy as
  ``-global kvm-pit.lost_tick_policy`` under KVM (TCG's PIT has no policy).
* ``<pm>`` as ``-global PIIX4_PM|ICH9-LPC.disable_s3/disable_s4``.
* QMP on ``paths.qmp_socket``, ``-daemonize -pidfile``, ``-msg
  timestamp=on``, ``-sandbox on,obsolete=deny,resourcecontrol=deny``
  (``spawn=deny`` and ``elevateprivileges=deny`` make qemu 7.2 die when it
  daemonizes, so they are not used).
* Devices in libvirt's order: controllers, disks (``-blockdev`` storage +
  format nodes, then the front end), NICs, serials, consoles, channels,
  inputs, graphics, videos, sound cards (``-audiodev`` spice with spice
  graphics else none, or the ``<audio>`` it names; ``ich9-intel-hda``/
  ``intel-hda`` with ``hda-duplex|micro|output`` codecs, ``AC97``),
  watchdogs (``i6300esb``, ``ib700``, q35's iTCO via
  ``ICH9-LPC.noreboot=off``; ``-action watchdog=…``), USB redirection
  (``usb-redir`` on a ``spicevmc`` or tcp socket chardev, which reconnects
  every second until its peer listens), balloon, rng,
  a tcp serial or console (``-chardev socket,host,port``: ``server=on,wait=off``
  in bind mode, ``reconnect=1`` in connect mode, ``telnet=on`` for telnet),
  an isa ``pvpanic``, the TPM (``-tpmdev emulator`` on the socket of the
  swtpm the host started: :mod:`ferry.domain._argv_tpm`). A ``spicevmc`` channel is the spice agent
  (``-chardev spicevmc,name=vdagent``). A unix channel with one of
  libvirt's per-run paths gets its socket in ``RuntimePaths.run_dir``, like
  one without a path (:func:`live_sockets` writes the paths into the live
  XML, :func:`unplaced_sockets` takes them out for a migration). Not in
  the argv: ``<emulator>`` (the host chooses ``qemu_binary``), an
  ``<audio>`` no sound card uses, ``<vcpu cpuset>`` and ``<cputune>`` (the
  host pins qemu's threads after the start: :mod:`ferry.pinning`), vcpu placement,
  interface ``sndbuf`` (no tap devices), ps2 inputs and the IDE/SATA
  controllers built into the machine (q35's SATA at 00:1f.2, pc's IDE at
  00:01.1), pci-root/pcie-root.
* NICs: ``user`` → ``-netdev user``. ``bridge`` and ``network`` → ``-netdev
  tap,fd=N`` with the tap device the caller created and attached to the
  bridge (``nic_taps``; :mod:`ferry.netdev`: a ``network`` is the bridge
  ``[networks.NAME]`` names on the host). Without a tap a ``bridge`` NIC
  falls back to qemu's bridge helper (``-netdev bridge``, which needs
  ``/etc/qemu/bridge.conf``) and a ``network`` NIC is refused.
* Displays listen on their XML address, else ``graphics_listen`` (the
  host's ``[graphics] listen``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ferry.domain import _argv_numa as numa
from ferry.domain._argv_firmware import firmware_argv
from ferry.domain._argv_tpm import tpm_argv
from ferry.domain._checks import UNIX_PATH_MAX, Loc, fail
from ferry.domain._cpu import CpuExpansion, cpu_opts
from ferry.domain._filesystem import filesystem_argv
from ferry.domain._filesystem import start_refusal as fs_start_refusal
from ferry.domain._hostdev import hostdev_device
from ferry.domain._nics import network_table
from ferry.domain.model import (
    Address,
    CharDev,
    Controller,
    Disk,
    Domain,
    Graphics,
    Video,
    is_libvirt_channel_path,
)
from ferry.errors import QemuLaunchError, XMLUnsupported

__all__ = [
    "SANDBOX",
    "GraphicsPorts",
    "NicTap",
    "PassedFiles",
    "RuntimePaths",
    "kvm_usable",
    "live_sockets",
    "placed_socket",
    "qemu_disk_ids",
    "to_qemu_argv",
    "unplaced_sockets",
]

#: The seccomp policy: everything qemu 7.2 tolerates together with -daemonize.
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"

# The RAM block id of plain ``-m``: see the module docstring.
_RAM_ID = "pc.ram"


@dataclass(frozen=True)
class RuntimePaths:
    """Host paths of one qemu process (chosen by the agent, not by the XML).

    ``run_dir`` holds the sockets the XML leaves unnamed: a unix serial or
    console without a path (``serialN.sock``, ``consoleN.sock``) and a unix
    channel without one (``NAME.sock``, after its target name). It must
    exist, and be short enough for 107-byte socket paths.

    ``log_file``, when set, is passed as ``-D``. With ``-daemonize``, qemu
    7.2 then writes its messages there once it has detached (before that
    they go to the launcher's stderr), but it truncates the file when it
    starts: keep one file per qemu run, or rotate it before a start.

    ``spice_tls_dir`` is the x509 directory for spice ``tlsPort``.
    """

    run_dir: Path
    qmp_socket: Path
    pidfile: Path
    log_file: Path | None = None
    spice_tls_dir: Path | None = None


@dataclass(frozen=True)
class PassedFiles:
    """Files the agent opened for qemu, so that qemu gets descriptors, not paths.

    :mod:`ferry.storage_policy` opens them (after checking the policy) and
    keeps them open across the exec of qemu. ``fd_sets`` become ``-add-fd
    fd=FD,set=SET,opaque=TEXT`` (one set per disk, with one descriptor in
    the disk's access mode); ``disks`` maps a disk's target dev to the
    file name qemu opens instead of its source (``/dev/fdset/SET``), and
    ``kernel``/``initrd`` replace those paths (``/proc/self/fd/FD``: qemu
    reads them with ``fopen``, which knows nothing of fd sets).
    """

    fd_sets: tuple[tuple[int, int, str], ...] = ()
    disks: tuple[tuple[str, str], ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    #: The firmware images as qemu opens them: pflash code then variables
    #: (``/dev/fdset/N``), or a rom (``/proc/self/fd/N``); see :mod:`ferry.firmware_files`.
    firmware: tuple[str, ...] = ()

    def disk_file(self, target_dev: str) -> str | None:
        """The file name qemu opens for disk ``target_dev``, if it was passed."""
        return next((f for dev, f in self.disks if dev == target_dev), None)


@dataclass(frozen=True)
class GraphicsPorts:
    """Ports the caller chose for an ``autoport`` graphics device.

    ``port`` None: no plain port (a spice display with TLS only).
    """

    port: int | None
    tls_port: int | None = None
    websocket: int | None = None


@dataclass(frozen=True)
class NicTap:
    """A tap device the caller opened for a NIC: its descriptor, passed to qemu."""

    fd: int
    #: The device's name (for messages; qemu gets the descriptor).
    ifname: str = ""
    #: Opened with IFF_VNET_HDR (virtio NICs); qemu finds that out itself.
    vnet_hdr: bool = False
    #: A port of an Open vSwitch bridge (removed when the VM leaves the host).
    switch_port: bool = False


def _kvm_problem(dev: str = "/dev/kvm") -> str | None:
    if not os.path.exists(dev):
        return f"{dev} does not exist"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by uid {os.getuid()}"
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"cannot open {dev}: {exc.strerror or exc}"
    os.close(fd)
    return None


def kvm_usable() -> bool:
    """Return True if ``/dev/kvm`` exists and can be opened read-write."""
    return _kvm_problem() is None


def _esc(value: str) -> str:
    """Escape a value for qemu's comma-separated option syntax."""
    if "\0" in value or "\n" in value or "\r" in value:
        raise QemuLaunchError(f"value {value!r} cannot be passed to qemu (NUL or newline)")
    return value.replace(",", ",,")


def _plain(value: str | Path, what: str) -> str:
    """A value passed as a whole argument (not split by qemu)."""
    text = str(value)
    if "\0" in text or "\n" in text:
        raise QemuLaunchError(f"{what} {text!r} contains a NUL or newline")
    return text


def _opts(head: str | tuple[str, object | None], *pairs: tuple[str, object | None]) -> str:
    """``head,k=v,…`` with escaped values; pairs whose value is None are left out.

    ``head`` is written as is (a device type, or an already escaped value);
    given as a pair it is treated like the others.
    """
    parts: list[str] = []
    if isinstance(head, tuple):
        pairs = (head, *pairs)
    else:
        parts.append(head)
    for key, value in pairs:
        if value is None:
            continue
        text = ("on" if value else "off") if isinstance(value, bool) else _esc(str(value))
        parts.append(f"{key}={text}")
    return ",".join(parts)


def _disk_index(dev: str) -> int:
    """hda → 0, hdb → 1, vdaa → 26 (libvirt's virDiskNameToIndex)."""
    idx = 0
    for ch in dev[2:]:
        idx = idx * 26 + (ord(ch) - ord("a") + 1)
    return idx - 1


def qemu_disk_ids(domain: Domain) -> dict[str, str]:
    """Map each disk's target dev to its qemu device id (``virtio-disk0``, ``ide0-0-1``...).

    The block node names are ``ID-storage`` (the file) and ``ID-format``
    (raw/qcow2); QMP events about a disk name these.
    """
    return {d.target_dev: _disk_id(domain, d) for d in domain.disks}


def _disk_id(domain: Domain, d: Disk) -> str:
    idx = _disk_index(d.target_dev)
    a = d.address
    if d.target_bus == "ide":
        bus, unit = (a.bus or 0, a.unit or 0) if a else (idx // 2, idx % 2)
        return f"ide0-{bus}-{unit}"
    if d.target_bus == "sata":
        unit = (a.unit or 0) if a else idx
        return f"sata0-0-{unit}"
    if d.target_bus == "scsi":
        target, unit = _scsi_position(domain, d)
        return f"scsi0-0-{target}-{unit}"
    if d.target_bus == "usb":
        return f"usb-disk{idx}"
    return f"virtio-disk{idx}"


def _scsi_model(domain: Domain) -> str:
    for c in domain.controllers:
        if c.type == "scsi":
            return c.model or "lsilogic"
    return "lsilogic"  # libvirt's default SCSI controller on x86


def _scsi_position(domain: Domain, d: Disk) -> tuple[int, int]:
    """(scsi-id, lun) of a SCSI disk."""
    idx = _disk_index(d.target_dev)
    a = d.address
    if _scsi_model(domain) == "lsilogic":
        # lsi53c895a: one LUN per target, 7 targets; libvirt puts the unit in scsi-id.
        return ((a.unit or 0) if a else idx, 0)
    return ((a.target or 0) if a else 0, (a.unit or 0) if a else idx)


class _Pci:
    """Deterministic PCI placement on the guest's PCI tree.

    Bus 0 is the root (``pcie.0`` on q35, ``pci.0`` on pc); a PCI controller
    of index N makes bus N (qemu id ``pci.N``). A device with an ``<address>``
    goes where it says (checked at define by :mod:`ferry.domain._cross`); one
    without goes to the next free slot of the root bus, as before there were
    bridges. All explicit addresses are reserved first, so an automatically
    placed device never takes a slot an explicit one names; PCI controllers
    without an address are placed before any other device, root ports packed
    eight to a slot (functions 0..7, from slot 2) as libvirt packs them.
    """

    def __init__(self, domain: Domain) -> None:
        self.q35 = domain.os.is_q35
        self.bus = "pcie.0" if self.q35 else "pci.0"
        # Slot 0: host bridge. pc: slot 1 is the PIIX3 (ISA, IDE, USB, ACPI);
        # q35: 0x1f is the LPC/SATA/SMBus function group.
        self.used: set[int] = {0, 0x1F} if self.q35 else {0, 1}
        #: Functions named by explicit addresses, by (bus, slot).
        self.functions: dict[tuple[int, int], set[int]] = {}
        for addr in _explicit_pci(domain):
            assert addr.slot is not None
            bus = addr.bus or 0
            self.functions.setdefault((bus, addr.slot), set()).add(addr.function or 0)
            if bus == 0:
                self.used.add(addr.slot)
        # libvirt keeps the primary video in a fixed slot (pc: 2, q35: 1);
        # reserve it now, as devices placed before the video would take it.
        self.video_slot: int | None = None
        videos = domain.videos
        if videos and videos[0].model != "none" and videos[0].address is None:
            slot = 1 if self.q35 else 2
            if slot not in self.used:
                self.video_slot = slot
                self.used.add(slot)
        #: Where each PCI controller (by index) goes: (bus, slot, function, bus=…,addr=…).
        self.controllers: dict[int, tuple[int, int, int, str]] = {}
        self._plan_controllers(domain)

    def bus_name(self, bus: int) -> str:
        """The qemu id of PCI bus ``bus``."""
        return self.bus if bus == 0 else f"pci.{bus}"

    def _where(self, bus: int, slot: int, function: int, multi: bool) -> str:
        fn = f".0x{function:x}" if function else ""
        return f"bus={self.bus_name(bus)},addr=0x{slot:x}{fn}{',multifunction=on' if multi else ''}"

    def free_slot(self, first: int = 1) -> int:
        """Take the next root-bus slot from ``first`` that no function uses."""
        free = [s for s in range(first, 0x20) if s not in self.used]
        if not free:
            raise XMLUnsupported("too many PCI devices on the root bus: give some of them "
                                 "<address> elements on other buses (pcie-root-port, "
                                 "pci-bridge)")
        self.used.add(free[0])
        return free[0]

    def _plan_controllers(self, domain: Domain) -> None:
        pcis = sorted((c for c in domain.controllers if c.type == "pci" and c.index > 0),
                      key=lambda c: c.index)
        packing: tuple[int, int] | None = None  # the root-port slot being filled, next function
        for c in pcis:
            a = c.address
            if a is not None and a.type == "pci":
                self.controllers[c.index] = (a.bus or 0, a.slot or 0, a.function or 0,
                                             self.place(a))
            elif c.model == "pcie-root-port":
                if packing is None or packing[1] == 8:
                    packing = (self.free_slot(2), 0)
                slot, fn = packing
                self.functions.setdefault((0, slot), set()).add(fn)
                self.controllers[c.index] = (0, slot, fn, "")
                packing = (slot, fn + 1)
            else:
                if c.model == "dmi-to-pci-bridge" and 0x1E not in self.used:
                    slot = 0x1E  # where libvirt puts it
                    self.used.add(slot)
                else:
                    slot = self.free_slot()
                self.controllers[c.index] = (0, slot, 0, self._where(0, slot, 0, False))
        for index, (bus, slot, fn, where) in self.controllers.items():
            if not where:  # a packed root port: function 0 is multifunction if others follow
                multi = fn == 0 and len(self.functions[(bus, slot)]) > 1
                self.controllers[index] = (bus, slot, fn, self._where(bus, slot, fn, multi))

    def place(self, addr: Address | None, *, video: bool = False) -> str:
        """Return ``bus=…,addr=…`` for a device: its own address, or the next free slot.

        Function 0 of a slot whose other functions are in use is made
        multifunction (as libvirt sets it), whatever the XML says.
        """
        if addr is not None:
            bus, slot, fn = addr.bus or 0, addr.slot or 0, addr.function or 0
            multi = bool(addr.multifunction) or (
                fn == 0 and len(self.functions.get((bus, slot), ())) > 1)
            return self._where(bus, slot, fn, multi)
        slot = self.video_slot if video and self.video_slot is not None else self.free_slot()
        return f"bus={self.bus},addr=0x{slot:x}"


def _explicit_pci(domain: Domain) -> Iterable[Address]:
    """The pci addresses of every device of ``domain`` (whatever its kind)."""
    found: list[Address] = []
    for f in dataclasses.fields(domain):
        value = getattr(domain, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            addr = getattr(item, "address", None)
            if isinstance(addr, Address) and addr.type == "pci":
                found.append(addr)
    return found


def _refuse(domain: Domain, element: str, message: str) -> XMLUnsupported:
    err = fail(Loc(f"domain {domain.name}", None, element), message, cls=XMLUnsupported)
    assert isinstance(err, XMLUnsupported)
    return err


_USB_MODELS = {
    "piix3-uhci": "piix3-usb-uhci",
    "qemu-xhci": "qemu-xhci",
    "nec-xhci": "nec-usb-xhci",
    "ich9-ehci1": "ich9-usb-ehci1",
    "ich9-uhci1": "ich9-usb-uhci1",
    "ich9-uhci2": "ich9-usb-uhci2",
    "ich9-uhci3": "ich9-usb-uhci3",
}
# The functions of an ich9 USB group sharing one slot (libvirt's layout).
_ICH9_USB_FUNCTION = {"ich9-ehci1": 7, "ich9-uhci1": 0, "ich9-uhci2": 1, "ich9-uhci3": 2}
_NIC_MODELS = {
    "virtio": "virtio-net-pci",
    "rtl8139": "rtl8139",
    "e1000": "e1000",
    "e1000e": "e1000e",
}
# Cache mode → (cache.direct, cache.no-flush, device write-cache), as libvirt maps them.
_CACHE = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


class _Builder:
    def __init__(self, domain: Domain, paths: RuntimePaths, kvm: bool,
                 graphics_ports: Mapping[int, GraphicsPorts],
                 files: PassedFiles | None = None,
                 nic_taps: Mapping[int, NicTap] | None = None,
                 graphics_listen: str = "127.0.0.1") -> None:
        self.d = domain
        self.paths = paths
        self.files = files or PassedFiles()
        self.kvm = kvm
        self.ports = graphics_ports
        self.taps = nic_taps or {}
        self.listen = graphics_listen
        self.argv: list[str] = []
        self.pci = _Pci(domain)
        #: ``bus=…,addr=…`` of the ich9 USB controllers placed as a group, by model.
        self.usb_where: dict[str, str] = {}
        #: ``-machine pflash0=…,pflash1=…`` of the UEFI firmware (ferry.domain._argv_firmware).
        self.firmware: list[tuple[str, object | None]] = []

    def add(self, *args: str) -> None:
        self.argv.extend(args)

    def device(self, spec: str) -> None:
        self.add("-device", spec)

    # -- machine, cpu, memory ------------------------------------------------

    def machine(self) -> None:
        d = self.d
        hpet = next((t.present for t in d.clock.timers if t.name == "hpet"), None)
        self.add("-machine", _opts(
            _esc(d.os.machine),
            ("accel", "kvm" if self.kvm else "tcg"),
            ("usb", False),
            ("dump-guest-core", False),
            ("acpi", d.features.acpi),
            ("hpet", hpet),
            ("vmport", d.features.vmport),
            ("smm", d.features.smm),
            ("memory-backend", _RAM_ID if _ram_backend(d) else None),
            *self.firmware,
        ))

    def cpu(self) -> None:
        d = self.d
        c = d.cpu
        flags: list[tuple[str, object | None]] = []
        base: str | None = None
        if c is not None and c.expansion is not None:
            # The CPU the migration source ran, exactly (ferry.domain._cpu).
            base = "base"
            flags += cpu_opts(CpuExpansion(c.expansion))
        elif c is not None:
            if c.mode == "custom":
                base = c.model or "qemu64"
                if c.model and c.check != "none" \
                        and not any(f.policy == "force" for f in c.features):
                    # libvirt's partial/full check: a host lacking a feature
                    # of the model is an error naming it, not a quieter CPU
                    # (a forced feature is claimed whatever the host has).
                    flags.append(("enforce", True))
            elif c.mode in ("host-passthrough", "host-model"):
                base = "host" if self.kvm else "max"
            else:
                base = "max"
            if c.migratable is False:
                flags.append(("migratable", False))
            for f in c.features:
                if f.policy in ("force", "require"):
                    flags.append((f.name, True))
                elif f.policy in ("disable", "forbid"):
                    flags.append((f.name, False))
        if self.kvm:
            if d.features.apic_eoi is not None:
                flags.append(("kvm-pv-eoi", d.features.apic_eoi))
            kvmclock = next((t.present for t in d.clock.timers if t.name == "kvmclock"), None)
            if kvmclock is not None:
                flags.append(("kvmclock", kvmclock))
            flags += _kvm_hyperv_flags(d)
        if base is None and flags:
            base = "qemu64"  # qemu's own default model, made explicit to carry flags
        if base is not None:
            self.add("-cpu", _opts(_esc(base), *flags))

    def memory(self) -> None:
        d = self.d
        numa.check_host_nodes(d, numa.host_numa_nodes())
        blocks = numa.ram_blocks(d)
        if blocks:  # guest NUMA: one backend per cell, no machine memory-backend
            for block in blocks:
                self.ram_backend(block)
            self.add(*numa.numa_node_args(d))
            self.add("-m", str(sum(b.size_mib for b in blocks)))
            return
        if _ram_backend(d):
            nodes, policy = numa.whole_ram_placement(d)
            self.ram_backend(numa.RamBlock(
                _RAM_ID, d.memory_mib, share=True if d.memory_access == "shared" else None,
                host_nodes=nodes, policy=policy))
        self.add("-m", str(d.memory_mib))

    def ram_backend(self, block: numa.RamBlock) -> None:
        """One ``-object memory-backend-*`` of guest RAM (see the module docstring)."""
        d = self.d
        memfd = d.memory_source == "memfd" or d.hugepages
        hugetlbsize = None
        if d.hugepages:
            page_kib = d.hugepage_kib or _default_hugepage_kib()
            if block.id == _RAM_ID or block.id == "ram-node0":
                _check_hugepages(d, page_kib)  # the whole guest's pages, once
            if block.size_mib * 1024 % page_kib:
                raise QemuLaunchError(
                    f"<memoryBacking><hugepages>: guest RAM block {block.id} of "
                    f"{block.size_mib} MiB is not a whole number of {page_kib} KiB pages",
                    domain=d.name)
            hugetlbsize = page_kib * 1024
        self.add("-object", _opts(
            "memory-backend-memfd" if memfd else "memory-backend-ram",
            ("id", block.id), ("size", block.size_mib * 1024 * 1024),
            ("hugetlb", True if d.hugepages else None), ("hugetlbsize", hugetlbsize),
            ("share", block.share),
            ("prealloc", True if d.preallocated else None),
            ("prealloc-threads", d.prealloc_threads if d.preallocated else None),
            # qemu's host-nodes takes one range: a nodeset with several is repeated.
            *(("host-nodes", part) for part in (block.host_nodes or "").split(",") if part),
            ("policy", block.policy),
        ))

    def smp(self) -> None:
        d = self.d
        t = d.cpu.topology if d.cpu else None
        # <vcpu current=N>: N online, the rest hot-pluggable up to maxcpus.
        head = (f"{d.vcpus_current},maxcpus={d.vcpus}" if d.vcpus_current is not None
                else str(d.vcpus))
        if t is None:
            self.add("-smp", f"{head},sockets={d.vcpus},cores=1,threads=1")
        else:
            dies = f",dies={t.dies}" if t.dies != 1 else ""
            self.add("-smp", f"{head},sockets={t.sockets}{dies},cores={t.cores},"
                             f"threads={t.threads}")
        for k in range(1, (d.iothreads or 0) + 1):
            self.add("-object", f"iothread,id=iothread{k}")

    # -- firmware-ish ---------------------------------------------------------

    def boot(self) -> None:
        os_ = self.d.os
        if os_.kernel:
            self.add("-kernel", _plain(self.files.kernel or os_.kernel, "kernel path"))
        if os_.initrd:
            # For a multiboot kernel qemu splits -initrd on commas (module
            # list) but does not for Linux: no escaping works for both.
            if "," in os_.initrd:
                raise _refuse(self.d, "domain/os/initrd", "an initrd path with ',' cannot be "
                                                          "passed to qemu")
            self.add("-initrd", _plain(self.files.initrd or os_.initrd, "initrd path"))
        if os_.cmdline is not None:
            self.add("-append", _plain(os_.cmdline, "kernel command line"))
        letters = "".join({"hd": "c", "cdrom": "d", "network": "n"}[b] for b in os_.boot_devs)
        menu = os_.bootmenu
        if letters or menu is not None:
            self.add("-boot", _opts(
                ("order", letters or None), ("menu", menu),
                ("splash-time", os_.bootmenu_timeout if menu else None),
            ))

    def clock_and_pm(self) -> None:
        d = self.d
        rtc: list[tuple[str, object | None]] = []
        for t in d.clock.timers:
            if t.name == "rtc":
                if t.tickpolicy == "catchup":
                    rtc.append(("driftfix", "slew"))
                if t.track is not None:
                    rtc.append(("clock", {"guest": "vm", "wall": "host", "realtime": "rt"}
                                [t.track]))
        self.add("-rtc", _opts(f"base={d.clock.offset}", *rtc))
        for t in d.clock.timers:
            if t.name == "pit" and t.tickpolicy and self.kvm:
                self.add("-global", f"kvm-pit.lost_tick_policy={t.tickpolicy}")
        pm_dev = "ICH9-LPC" if d.os.is_q35 else "PIIX4_PM"
        for value, prop in ((d.pm.suspend_to_mem, "disable_s3"),
                            (d.pm.suspend_to_disk, "disable_s4")):
            if value is not None:
                self.add("-global", f"{pm_dev}.{prop}={0 if value else 1}")
        if d.on_reboot == "destroy":
            self.add("-no-reboot")

    # -- controllers ------------------------------------------------------------

    def controllers(self) -> None:
        d = self.d
        needs_usb = any(x.target_bus == "usb" for x in d.disks) or any(
            i.bus == "usb" for i in d.inputs
        ) or bool(d.redirdevs) or any(h.type == "usb" for h in d.hostdevs)
        usb = [c for c in d.controllers if c.type == "usb"]
        if needs_usb and usb and usb[0].model == "none":
            raise _refuse(d, "domain/devices/controller",
                          "USB devices need a USB controller, but its model is 'none'")
        ctrls = list(d.controllers)
        if needs_usb and not usb:
            ctrls.insert(0, Controller("usb"))  # implicit, as libvirt adds it
        vser = [c for c in ctrls if c.type == "virtio-serial"]
        if not vser and (d.channels or any(c.target_type == "virtio" for c in d.consoles)):
            ctrls.append(Controller("virtio-serial"))
        has_scsi = any(c.type == "scsi" for c in ctrls)
        if any(x.target_bus == "scsi" for x in d.disks) and not has_scsi:
            ctrls.append(Controller("scsi"))
        has_sata = any(c.type == "sata" for c in ctrls)
        if any(x.target_bus == "sata" for x in d.disks) and not has_sata:
            ctrls.append(Controller("sata"))
        # The PCI tree first, parents before children (by index), so that
        # every device after it finds its bus.
        for c in sorted((c for c in ctrls if c.type == "pci" and c.index > 0),
                        key=lambda c: c.index):
            self.pci_controller(c)
        # An ich9-ehci1 before its uhci companions (they name it as masterbus);
        # a group without addresses shares one slot, as on real ICH9 boards.
        ich9 = [c for c in ctrls if c.type == "usb" and c.model in _ICH9_USB_FUNCTION]
        if len(ich9) > 1 and all(c.address is None for c in ich9):
            slot = self.pci.free_slot()
            for c in ich9:
                assert c.model is not None
                fn = _ICH9_USB_FUNCTION[c.model]
                self.usb_where[c.model] = (f"bus={self.pci.bus},addr=0x{slot:x}"
                                           + (f".0x{fn:x}" if fn else ",multifunction=on"))
        ich9.sort(key=lambda c: c.model != "ich9-ehci1")
        for c in ctrls:
            if c.type == "pci":
                continue
            if c in ich9:
                for companion in ich9:
                    self.controller(companion)
                ich9 = []
            elif c.model not in _ICH9_USB_FUNCTION or c.type != "usb":
                self.controller(c)

    def pci_controller(self, c: Controller) -> None:
        """A bus of the PCI tree: ``-device pcie-root-port,…,id=pci.N,bus=…,addr=…``."""
        _, slot, fn, where = self.pci.controllers[c.index]
        cid = ("id", f"pci.{c.index}")
        if c.model == "pcie-root-port":
            port = c.port if c.port is not None else (slot << 3) | fn
            spec = _opts(c.model_name or "pcie-root-port", ("port", f"{port:#x}"),
                         ("chassis", c.chassis if c.chassis is not None else c.index), cid,
                         ("hotplug", c.hotplug))
        elif c.model == "pci-bridge":
            spec = _opts("pci-bridge", ("chassis_nr", c.chassis_nr or c.index), cid)
        elif c.model == "pcie-to-pci-bridge":
            spec = _opts("pcie-pci-bridge", cid)
        elif c.model == "dmi-to-pci-bridge":
            spec = _opts("i82801b11-bridge", cid)
        else:
            raise _refuse(self.d, "domain/devices/controller",
                          f"pci controller {c.index}: model {c.model!r} cannot be built")
        self.device(spec + "," + where)

    def controller(self, c: Controller) -> None:
        if c.type == "usb":
            model = c.model or ("qemu-xhci" if self.pci.q35 else "piix3-uhci")
            if model == "none":
                return
            if model == "piix3-uhci" and c.address is None and not self.pci.q35:
                # Function 2 of the PIIX3 in slot 1, where real i440FX boards have it.
                where = f"bus={self.pci.bus},addr=0x1.0x2"
            elif model in self.usb_where:
                where = self.usb_where[model]
            else:
                where = self.pci.place(c.address)
            if c.master_startport is not None:  # an ich9-uhci companion of the ehci1
                self.device(_opts(_USB_MODELS[model], ("masterbus", "usb.0"),
                                  ("firstport", c.master_startport)) + "," + where)
                return
            ports = c.ports if model in ("qemu-xhci", "nec-xhci") else None
            self.device(_opts(_USB_MODELS[model], ("p2", ports), ("p3", ports), ("id", "usb"))
                        + "," + where)
        elif c.type == "scsi":
            dev = "lsi" if (c.model or "lsilogic") == "lsilogic" else "virtio-scsi-pci"
            self.device(_opts(dev, ("num_queues", c.queues), ("id", f"scsi{c.index}"))
                        + "," + self.pci.place(c.address))
        elif c.type == "sata":
            if not self.pci.q35:  # q35 has its AHCI built in (bus ide.N)
                self.device(f"ahci,id=sata{c.index},{self.pci.place(c.address)}")
        elif c.type == "virtio-serial":
            self.device(_opts("virtio-serial-pci", ("id", f"virtio-serial{c.index}"),
                              ("max_ports", c.ports)) + "," + self.pci.place(c.address))
        # ide (built into pc) and pci-root/pcie-root need nothing; the other PCI
        # controllers are built by pci_controller.

    # -- disks ----------------------------------------------------------------

    def disk(self, d: Disk) -> None:
        dom = self.d
        did = _disk_id(dom, d)
        cache = _CACHE.get(d.cache or "")
        drive: str | None = None
        if d.source is not None:
            storage, fmt = f"{did}-storage", f"{did}-format"
            if d.type == "file":
                driver = "file"
            else:
                driver = "host_cdrom" if d.device == "cdrom" else "host_device"
            cache_opts: list[tuple[str, object | None]] = []
            if cache is not None:
                cache_opts = [("cache.direct", cache[0]), ("cache.no-flush", cache[1])]
            passed = self.files.disk_file(d.target_dev)
            # A passed descriptor has one access mode: qemu must not reopen
            # the file with another (auto-read-only would, and a reopen via
            # an fd set leaves the old description, and its image locks, in
            # place until qemu exits).
            access: list[tuple[str, object | None]] = (
                [("read-only", True if d.readonly else None)] if passed
                else [("auto-read-only", True)]
            )  # fmt: skip
            self.add("-blockdev", _opts(
                f"driver={driver}", ("filename", passed or d.source), ("node-name", storage),
                *access, ("discard", d.discard), *cache_opts,
                ("aio", d.io),
            ))
            self.add("-blockdev", _opts(
                f"node-name={fmt}", ("read-only", d.readonly), ("driver", d.format or "raw"),
                ("file", storage), *cache_opts,
            ))
            drive = fmt
        werror = {"enospace": "enospc"}.get(d.error_policy or "", d.error_policy)
        rerror = d.rerror_policy or (d.error_policy if d.error_policy != "enospace" else None)
        common: list[tuple[str, object | None]] = [
            ("drive", drive), ("id", did),
            ("write-cache", cache[2] if cache is not None and drive else None),
            ("werror", werror if drive else None), ("rerror", rerror if drive else None),
        ]
        a = d.address
        cd = d.device == "cdrom"
        idx = _disk_index(d.target_dev)
        if d.target_bus == "virtio":
            self.device(_opts("virtio-blk-pci", *common, ("event_idx", d.event_idx),
                              ("iothread", f"iothread{d.iothread}" if d.iothread else None))
                        + "," + self.pci.place(a))
        elif d.target_bus == "ide":
            bus, unit = (a.bus or 0, a.unit or 0) if a else (idx // 2, idx % 2)
            if (a and (a.controller or a.target)) or bus > 1 or unit > 1:
                raise _refuse(dom, "domain/devices/disk", f"disk {d.target_dev}: the IDE "
                              "controller has 2 buses of 2 units")
            self.device(_opts("ide-cd" if cd else "ide-hd", ("bus", f"ide.{bus}"),
                              ("unit", unit), *common))
        elif d.target_bus == "sata":
            unit = (a.unit or 0) if a else idx
            if (a and (a.controller or a.bus or a.target)) or unit > 5:
                raise _refuse(dom, "domain/devices/disk", f"disk {d.target_dev}: the SATA "
                              "controller has 6 ports on bus 0")
            sata_bus = f"ide.{unit}" if self.pci.q35 else f"sata0.{unit}"
            self.device(_opts("ide-cd" if cd else "ide-hd", ("bus", sata_bus), *common))
        elif d.target_bus == "scsi":
            target, lun = _scsi_position(dom, d)
            lsi = _scsi_model(dom) == "lsilogic"
            if (a and (a.controller or a.bus)) or (lsi and (target > 6 or (a and a.target))):
                raise _refuse(dom, "domain/devices/disk", f"disk {d.target_dev}: only SCSI "
                              "controller 0, bus 0 is supported (lsilogic: units 0..6)")
            self.device(_opts("scsi-cd" if cd else "scsi-hd", ("bus", "scsi0.0"),
                              ("channel", 0), ("scsi-id", target), ("lun", lun),
                              *common))
        else:
            port = a.port if a else None
            self.device(_opts("usb-storage", ("bus", "usb.0"), ("port", port),
                              ("removable", True if cd else None), *common))

    # -- network --------------------------------------------------------------

    def interfaces(self) -> None:
        for i, n in enumerate(self.d.interfaces):
            tap = self.taps.get(i)
            if n.type == "user":
                self.add("-netdev", f"user,id=hostnet{i}")
            elif tap is not None:
                # A tap the agent created and attached to the bridge; qemu
                # only gets the descriptor (the device goes when qemu exits)
                # and reads its IFF_VNET_HDR itself (vnet_hdr= is invalid with fd=).
                self.add("-netdev", _opts("tap", ("id", f"hostnet{i}"), ("fd", tap.fd)))
            elif n.type == "bridge":
                # No tap from the caller: qemu-bridge-helper attaches one (it
                # must be allowed in /etc/qemu/bridge.conf on this host).
                self.add("-netdev", _opts("bridge", ("id", f"hostnet{i}"), ("br", n.source)))
            else:
                raise _refuse(self.d, "domain/devices/interface",
                              f"interface type 'network' ({n.source}) needs the host's bridge "
                              f"for network {n.source!r} (add [{network_table(str(n.source))}] "
                              'bridge = "br0" to the agent configuration; the agent then creates '
                              "the tap device)")
            model = n.model or "rtl8139"  # libvirt's default NIC model on x86
            mtu = n.mtu if model == "virtio" else None
            self.device(_opts(_NIC_MODELS[model], ("netdev", f"hostnet{i}"), ("id", f"net{i}"),
                              ("mac", n.mac), ("host_mtu", mtu))
                        + "," + self.pci.place(n.address))

    # -- character devices ------------------------------------------------------

    def chardev(self, c: CharDev, cid: str, default_path: Path | None = None) -> None:
        if c.type == "pty":
            self.add("-chardev", f"pty,id={cid}")
        elif c.type == "null":
            self.add("-chardev", f"null,id={cid}")
        elif c.type == "file":
            self.add("-chardev", _opts("file", ("id", cid), ("path", c.source_path),
                                       ("append", c.append)))
        elif c.type == "spicevmc":
            self.add("-chardev", f"spicevmc,id={cid},name=vdagent")
        elif c.type == "tcp":
            # As a tcp redirdev: a connecting one retries every second, so
            # neither a start nor a migration's destination fails while the
            # peer is not (yet) listening; a listening one does not wait.
            server = c.source_mode == "bind"
            self.add("-chardev", _opts("socket", ("id", cid), ("host", c.host),
                                       ("port", c.service),
                                       ("server", True if server else None),
                                       ("wait", False if server else None),
                                       ("reconnect", None if server else 1),
                                       ("telnet", True if c.protocol == "telnet" else None)))
        else:
            path = placed_socket(c, default_path)
            if path is None:  # pragma: no cover - every caller passes a default
                raise QemuLaunchError(f"{cid}: unix socket without a path")
            if len(path.encode()) > UNIX_PATH_MAX:
                raise QemuLaunchError(f"unix socket path {path!r} is longer than "
                                      f"{UNIX_PATH_MAX} bytes")
            server = c.source_mode != "connect"
            self.add("-chardev", _opts("socket", ("id", cid), ("path", path),
                                       ("server", True if server else None),
                                       ("wait", False if server else None)))

    def serials_consoles_channels(self) -> None:
        d = self.d
        for i, s in enumerate(d.serials):
            self.chardev(s, f"charserial{i}", self.paths.run_dir / f"serial{i}.sock")
            self.device(f"isa-serial,chardev=charserial{i},id=serial{i},index={s.target_port}")
        serial_ports = {s.target_port for s in d.serials}
        vser = sorted(c.index for c in d.controllers if c.type == "virtio-serial") or [0]
        for i, c in enumerate(d.consoles):
            if c.target_type == "serial":
                if c.target_port in serial_ports:
                    continue  # the console is that serial port (libvirt's alias)
                serial_ports.add(c.target_port)
                self.chardev(c, f"charconsole{i}", self.paths.run_dir / f"console{i}.sock")
                self.device(f"isa-serial,chardev=charconsole{i},id=console{i},"
                            f"index={c.target_port}")
            else:
                self.chardev(c, f"charconsole{i}", self.paths.run_dir / f"console{i}.sock")
                ctrl = c.address.controller if c.address else vser[0]
                self.device(f"virtconsole,bus=virtio-serial{ctrl}.0,chardev=charconsole{i},"
                            f"id=console{i}")
        used: set[tuple[int, int]] = {
            (c.address.controller or 0, c.address.port)
            for c in d.channels if c.address and c.address.port is not None
        }
        for i, c in enumerate(d.channels):
            ctrl = (c.address.controller or 0) if c.address else vser[0]
            port = c.address.port if c.address else None
            if port is None:
                # Port 0 of a virtio-serial bus is for a console.
                port = next(p for p in range(1, 32) if (ctrl, p) not in used)
                used.add((ctrl, port))
            default = self.paths.run_dir / f"{c.target_name or f'channel{i}'}.sock"
            self.chardev(c, f"charchannel{i}", default)
            self.device(_opts(f"virtserialport,bus=virtio-serial{ctrl}.0", ("nr", port),
                              ("chardev", f"charchannel{i}"), ("id", f"channel{i}"),
                              ("name", c.target_name)))

    # -- input, graphics, video -------------------------------------------------

    def inputs(self) -> None:
        for i, inp in enumerate(self.d.inputs):
            if inp.bus == "ps2":
                continue  # the i8042 is part of the pc and q35 machines
            if inp.bus == "usb":
                dev = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
                port = inp.address.port if inp.address else None
                self.device(_opts(dev[inp.type], ("id", f"input{i}"), ("bus", "usb.0"),
                                  ("port", port)))
            else:
                dev = {"tablet": "virtio-tablet-pci", "mouse": "virtio-mouse-pci",
                       "keyboard": "virtio-keyboard-pci"}
                self.device(f"{dev[inp.type]},id=input{i},{self.pci.place(inp.address)}")

    def graphics(self) -> None:
        d = self.d
        if not d.graphics:
            self.add("-display", "none")
            return
        for i, g in enumerate(d.graphics):
            chosen = self.ports.get(i)
            if g.type == "vnc":
                self.vnc(g, chosen)
            else:
                self.spice(g, chosen)
        # qemu has one keyboard layout for all displays: the first one set wins.
        keymap = next((g.keymap for g in d.graphics if g.keymap), None)
        if keymap:
            self.add("-k", keymap)

    def _host(self, g: Graphics) -> str:
        host = g.listen or self.listen
        try:
            if ipaddress.ip_address(host).version == 6:
                return f"[{host}]"
        except ValueError:
            pass
        return host

    def vnc(self, g: Graphics, chosen: GraphicsPorts | None) -> None:
        port = chosen.port if (g.autoport and chosen) else (None if g.autoport else g.port)
        if port is not None and not 5900 <= port <= 65535:
            raise QemuLaunchError(f"VNC port {port} is not in 5900..65535")
        if port is None:
            # qemu takes the first free display from :0 to :99 (5900..5999);
            # the caller learns the port from QMP query-vnc.
            head = f"{self._host(g)}:0"
            to: int | None = 99
        else:
            head, to = f"{self._host(g)}:{port - 5900}", None
        ws: object | None = None
        if g.websocket is not None:
            ws = chosen.websocket if (chosen and chosen.websocket) else g.websocket
            ws = True if ws == -1 else ws
        self.add("-vnc", _opts(head, ("to", to), ("websocket", ws), ("share", g.share_policy)))

    def spice(self, g: Graphics, chosen: GraphicsPorts | None) -> None:
        port: int | None
        tls: int | None
        if g.autoport:
            if chosen is None:
                raise QemuLaunchError("spice graphics with autoport needs the ports chosen by "
                                      "the caller (graphics_ports)")
            port, tls = chosen.port, chosen.tls_port
        else:
            port, tls = g.port, g.tls_port
        opts: list[tuple[str, object | None]] = [("port", port), ("tls-port", tls)]
        if tls is not None:
            if self.paths.spice_tls_dir is None:
                raise QemuLaunchError("spice tlsPort needs RuntimePaths.spice_tls_dir "
                                      "(the x509 certificate directory)")
            opts.append(("x509-dir", str(self.paths.spice_tls_dir)))
        opts += [("addr", g.listen or self.listen), ("disable-ticketing", True)]
        if g.default_mode == "secure":
            opts.append(("tls-channel", "default"))
        elif g.default_mode == "insecure":
            opts.append(("plaintext-channel", "default"))
        for o in g.options:
            a = dict(o.attrs)
            if o.element == "channel":
                key = {"secure": "tls-channel", "insecure": "plaintext-channel"}.get(a["mode"])
                if key:
                    opts.append((key, a["name"]))
            elif o.element in ("image", "jpeg", "zlib", "playback"):
                key = {"image": "image-compression", "jpeg": "jpeg-wan-compression",
                       "zlib": "zlib-glz-wan-compression",
                       "playback": "playback-compression"}[o.element]
                opts.append((key, a["compression"]))
            elif o.element == "streaming":
                opts.append(("streaming-video", a["mode"]))
            elif o.element == "clipboard":
                opts.append(("disable-copy-paste", a["copypaste"] == "no"))
            elif o.element == "filetransfer":
                opts.append(("disable-agent-file-xfer", a["enable"] == "no"))
            elif o.element == "mouse":
                opts.append(("agent-mouse", a["mode"] == "client"))
        opts.append(("seamless-migration", True))
        self.add("-spice", _opts(*opts))

    def video(self, i: int, v: Video) -> None:
        if v.model == "none":
            return
        primary = i == 0

        def mib(kib: int | None) -> int | None:
            return None if kib is None else max(1, kib // 1024)

        if v.model == "vga":
            spec = _opts("VGA", ("id", f"video{i}"), ("vgamem_mb", mib(v.vram)))
        elif v.model == "cirrus":
            spec = f"cirrus-vga,id=video{i}"
        elif v.model == "bochs":
            spec = _opts("bochs-display", ("id", f"video{i}"),
                         ("vgamem", v.vram * 1024 if v.vram else None))
        elif v.model == "qxl":
            spec = _opts(
                "qxl-vga" if primary else "qxl", ("id", f"video{i}"),
                ("ram_size", v.ram * 1024 if v.ram else None),
                ("vram_size", v.vram * 1024 if v.vram else None),
                ("vgamem_mb", mib(v.vgamem)), ("max_outputs", v.heads),
            )
        else:
            spec = _opts("virtio-vga" if primary else "virtio-gpu-pci", ("id", f"video{i}"),
                         ("max_outputs", v.heads))
        self.device(spec + "," + self.pci.place(v.address, video=primary))

    # -- the rest ---------------------------------------------------------------

    def sounds(self) -> None:
        d = self.d
        if not d.sounds:
            return
        spice = any(g.type == "spice" for g in d.graphics)
        backends = {a.id: a.type for a in d.audios}
        emitted: set[int] = set()
        for i, s in enumerate(d.sounds):
            if s.audio_id is not None and s.audio_id not in backends:
                raise _refuse(d, "domain/devices/sound/audio",
                              f"sound {i} plays through <audio id='{s.audio_id}'>, which "
                              "is not defined")
            aid = s.audio_id if s.audio_id is not None else (min(backends) if backends else 1)
            # libvirt's default backend: spice with spice graphics, else none.
            driver = backends.get(aid) or ("spice" if spice else "none")
            if driver not in ("none", "spice"):
                raise _refuse(d, "domain/devices/audio", f"audio type {driver!r} plays on the "
                              "host's sound system, which Ferry does not use; use type "
                              "'spice' (with spice graphics) or 'none'")
            if driver == "spice" and not spice:
                raise _refuse(d, "domain/devices/audio",
                              "audio type 'spice' needs spice graphics")
            if aid not in emitted:
                emitted.add(aid)
                self.add("-audiodev", f"{driver},id=audio{aid}")
            sid = f"sound{i}"
            if s.model == "ac97":
                self.device(f"AC97,id={sid},audiodev=audio{aid},{self.pci.place(s.address)}")
                continue
            hda = "ich9-intel-hda" if s.model == "ich9" else "intel-hda"
            self.device(f"{hda},id={sid},{self.pci.place(s.address)}")
            for cad, codec in enumerate(s.codecs or ("duplex",)):
                self.device(f"hda-{codec},id={sid}-codec{cad},bus={sid}.0,cad={cad},"
                            f"audiodev=audio{aid}")

    def watchdogs(self) -> None:
        d = self.d
        actions = {w.action for w in d.watchdogs}
        if len(actions) > 1:
            raise _refuse(d, "domain/devices/watchdog", "qemu has one watchdog action for "
                          f"all watchdogs; these ask for {', '.join(sorted(actions))}")
        for i, w in enumerate(d.watchdogs):
            if w.model == "i6300esb":
                self.device(f"i6300esb,id=watchdog{i},{self.pci.place(w.address)}")
            elif w.model == "ib700":
                self.device(f"ib700,id=watchdog{i}")
            else:  # q35's built-in iTCO: let it reset the machine, as libvirt does
                self.add("-global", "ICH9-LPC.noreboot=off")
        if actions:
            # dump: qemu pauses, ferry-source dumps and resumes (agents/ferry_source/save.py).
            action = actions.pop()
            self.add("-action", f"watchdog={'pause' if action == 'dump' else action}")

    def redirdevs(self) -> None:
        for i, r in enumerate(self.d.redirdevs):
            cid = f"charredir{i}"
            if r.type == "spicevmc":
                if not any(g.type == "spice" for g in self.d.graphics):
                    raise _refuse(self.d, "domain/devices/redirdev",
                                  "a spicevmc redirdev needs spice graphics")
                self.add("-chardev", f"spicevmc,id={cid},name=usbredir")
            else:
                # A peer that is not listening yet does not stop the start
                # (libvirt's qemu would exit): qemu retries every second and
                # attaches the device once it connects. So does the
                # destination of a migration, while the source still holds
                # the peer's one connection.
                server = r.mode == "bind"
                self.add("-chardev", _opts("socket", ("id", cid), ("host", r.host),
                                           ("port", r.service),
                                           ("server", True if server else None),
                                           ("wait", False if server else None),
                                           ("reconnect", None if server else 1)))
            port = r.address.port if r.address else None
            self.device(_opts("usb-redir", ("chardev", cid), ("id", f"redir{i}"),
                              ("bus", "usb.0"), ("port", port)))

    def hostdevs(self) -> None:
        for i, h in enumerate(self.d.hostdevs):
            placement = self.pci.place(h.address) if h.type == "pci" else None
            self.device(hostdev_device(h, i, placement))

    def panics(self) -> None:
        for p in self.d.panics:
            if p.model == "isa":  # hyperv is the hv-crash CPU flag
                self.device(_opts("pvpanic", ("ioport", p.iobase)))

    def balloon_rng(self) -> None:
        d = self.d
        if d.memballoon.model == "virtio":
            self.device("virtio-balloon-pci,id=balloon0," + self.pci.place(d.memballoon.address))
        for i, r in enumerate(d.rngs):
            if r.backend_model == "random":
                self.add("-object", _opts("rng-random", ("id", f"objrng{i}"),
                                          ("filename", r.backend_path)))
            else:
                self.add("-object", f"rng-builtin,id=objrng{i}")
            self.device(_opts("virtio-rng-pci", ("rng", f"objrng{i}"), ("id", f"rng{i}"),
                              ("max-bytes", r.rate_bytes),
                              ("period", r.rate_period if r.rate_bytes else None))
                        + "," + self.pci.place(r.address))


def _ram_backend(d: Domain) -> bool:
    """Whether guest RAM needs one explicit backend object (id ``pc.ram``).

    Not with guest NUMA cells: each cell has its own (``ram-nodeN``).
    """
    if d.cpu is not None and d.cpu.numa:
        return False
    return (d.preallocated or d.hugepages or d.memory_source == "memfd"
            or d.memory_access == "shared" or numa.whole_ram_placement(d) != (None, None))


# Huge pages of the host: module level so that tests can replace them.
def _default_hugepage_kib() -> int:
    """The host's default huge page size in KiB (/proc/meminfo), 2048 if unknown."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Hugepagesize:"):
                return int(line.split()[1])
    return 2048


def _free_hugepages(page_kib: int) -> int | None:
    """Free huge pages of ``page_kib`` KiB on the host (None: the kernel has no such pages)."""
    try:
        text = Path(f"/sys/kernel/mm/hugepages/hugepages-{page_kib}kB/free_hugepages"
                    ).read_text()  # fmt: skip
    except OSError:
        return None
    return int(text.strip() or 0)


def _check_hugepages(d: Domain, page_kib: int) -> None:
    free = _free_hugepages(page_kib)
    need = -(-d.memory_mib * 1024 // page_kib)
    if free is None:
        raise QemuLaunchError(
            f"<memoryBacking><hugepages> needs huge pages of {page_kib} KiB, which this "
            "host's kernel does not offer (no /sys/kernel/mm/hugepages/"
            f"hugepages-{page_kib}kB)", domain=d.name)
    if free < need:
        raise QemuLaunchError(
            f"<memoryBacking><hugepages>: the guest needs {need} huge pages of {page_kib} KiB, "
            f"this host has {free} free (reserve them, e.g. sysctl vm.nr_hugepages={need})",
            domain=d.name, needed=need, free=free)


_HV_FLAGS = {"emsr_bitmap": "hv-emsr-bitmap", "xmm_input": "hv-xmm-input",
             "vendor_id": "hv-vendor-id"}
_KVM_FLAGS = {"hint-dedicated": "kvm-hint-dedicated", "poll-control": "kvm-poll-control",
              "pv-ipi": "kvm-pv-ipi"}


def _kvm_hyperv_flags(d: Domain) -> list[tuple[str, object | None]]:
    """``-cpu`` flags of ``<features><kvm>``, ``<hyperv>``, hypervclock and a hyperv panic."""
    flags: list[tuple[str, object | None]] = []
    for name, state in d.features.kvm:
        if name == "hidden":
            flags.append(("kvm", not state))  # hide the KVM signature
        else:
            flags.append((_KVM_FLAGS[name], state))
    hvclock = next((t.present for t in d.clock.timers if t.name == "hypervclock"), None)
    if hvclock:
        flags.append(("hv-time", True))
    if d.features.hyperv_mode == "passthrough":
        flags.append(("hv-passthrough", True))
    for f in d.features.hyperv:
        if not f.state:
            continue  # off is qemu's default (libvirt writes nothing either)
        name = _HV_FLAGS.get(f.name, f"hv-{f.name}")
        if f.name == "spinlocks":
            flags.append((name, f"0x{f.retries or 0:x}"))
        elif f.name == "vendor_id":
            flags.append((name, f.value))
        else:
            flags.append((name, True))
            if f.name == "stimer" and f.direct:
                flags.append(("hv-stimer-direct", True))
    if any(p.model == "hyperv" for p in d.panics):
        flags.append(("hv-crash", True))
    return flags


def placed_socket(c: CharDev, default: Path | None) -> str | None:
    """The unix socket qemu gets for ``c``: its own path, or ``default``.

    ``default`` (in ``RuntimePaths.run_dir``) when the XML names no path or
    a path libvirt chose for one run (:func:`~ferry.domain.model.is_libvirt_channel_path`).
    """
    if c.source_path is not None and not is_libvirt_channel_path(c.source_path):
        return c.source_path
    return str(default) if default is not None else None


def _placed_defaults(d: Domain, run_dir: Path) -> dict[tuple[str, int], Path]:
    """(kind, index) → the socket Ferry places for each unix chardev (as the argv does)."""
    out: dict[tuple[str, int], Path] = {}
    serial_ports = {s.target_port for s in d.serials}
    for i, _s in enumerate(d.serials):
        out["serial", i] = run_dir / f"serial{i}.sock"
    for i, c in enumerate(d.consoles):
        if c.target_type == "serial" and c.target_port in serial_ports:
            continue
        out["console", i] = run_dir / f"console{i}.sock"
    for i, c in enumerate(d.channels):
        out["channel", i] = run_dir / f"{c.target_name or f'channel{i}'}.sock"
    return out


def live_sockets(domain: Domain, paths: RuntimePaths) -> Domain:
    """``domain`` with each unix socket Ferry places written in: for the live XML.

    A unix serial, console or channel without a path, or with one of
    libvirt's per-run channel paths, gets its socket in ``paths.run_dir``;
    the live XML says where it really is. :func:`unplaced_sockets` undoes
    it for a migration, whose destination places its own.
    """
    placed = _placed_defaults(domain, paths.run_dir)

    def fix(kind: str, devs: tuple[CharDev, ...]) -> tuple[CharDev, ...]:
        out = []
        for i, c in enumerate(devs):
            where = placed.get((kind, i))
            if c.type == "unix" and where is not None:
                c = dataclasses.replace(c, source_path=placed_socket(c, where))
            out.append(c)
        return tuple(out)

    return dataclasses.replace(domain, serials=fix("serial", domain.serials),
                               consoles=fix("console", domain.consoles),
                               channels=fix("channel", domain.channels))


def unplaced_sockets(domain: Domain, run_dir: Path) -> Domain:
    """``domain`` without the socket paths Ferry placed in ``run_dir`` (the migratable form)."""
    placed = _placed_defaults(domain, run_dir)

    def fix(kind: str, devs: tuple[CharDev, ...]) -> tuple[CharDev, ...]:
        out = []
        for i, c in enumerate(devs):
            where = placed.get((kind, i))
            if c.type == "unix" and where is not None and c.source_path == str(where):
                c = dataclasses.replace(c, source_path=None)
            out.append(c)
        return tuple(out)

    return dataclasses.replace(domain, serials=fix("serial", domain.serials),
                               consoles=fix("console", domain.consoles),
                               channels=fix("channel", domain.channels))


def to_qemu_argv(
    domain: Domain,
    *,
    paths: RuntimePaths,
    incoming: bool = False,
    qemu_binary: str = "qemu-system-x86_64",
    kvm_usable: Callable[[], bool] | None = None,
    paused: bool = False,
    graphics_ports: Mapping[int, GraphicsPorts] | None = None,
    sandbox: bool = True,
    files: PassedFiles | None = None,
    nic_taps: Mapping[int, NicTap] | None = None,
    graphics_listen: str = "127.0.0.1",
) -> list[str]:
    """Return the qemu argv (a list of strings, for exec, never a shell) for ``domain``.

    ``incoming`` adds ``-incoming defer`` (the destination of a migration;
    QMP ``migrate-incoming`` then gives the URI). ``paused`` adds ``-S``.
    ``graphics_ports`` maps the index of an ``autoport`` graphics device to
    the ports the caller reserved; without it a VNC server takes the first
    free display in 5900..5999 (``to=99``; read it back with QMP
    ``query-vnc``), and spice, which cannot pick a port itself, is refused.
    ``kvm_usable`` replaces the check of ``/dev/kvm`` for ``type='kvm'``
    (tests, or hosts with their own policy). ``sandbox=False`` leaves out
    ``-sandbox`` for qemu builds without seccomp. ``files`` replaces disk,
    kernel and initrd paths with descriptors the caller opened and passes
    to qemu (see :class:`PassedFiles`). ``nic_taps`` maps the index of a
    bridge or network NIC to the tap device the caller opened for it
    (:mod:`ferry.netdev`); ``graphics_listen`` is where a display whose XML
    names no address listens.

    The module docstring lists what each part of the model becomes.

    :raises QemuLaunchError: ``type='kvm'`` but /dev/kvm cannot be used;
        spice autoport without ports; spice TLS without a certificate
        directory; a runtime path qemu cannot take.
    :raises XMLUnsupported: the definition is valid but cannot run here
        (interface type 'network', an initrd path with a comma, a disk
        position the controller does not have, too many PCI devices).
    """
    d = domain
    kvm = d.virt_type == "kvm"
    if kvm:
        if kvm_usable is None:
            problem = _kvm_problem()
        else:
            problem = None if kvm_usable() else "the host's KVM check failed"
        if problem is not None:
            raise QemuLaunchError(
                f"domain type 'kvm' needs /dev/kvm, which cannot be used here: {problem} "
                "(use <domain type='qemu'> for TCG emulation)",
                domain=d.name, reason=problem,
            )
    refusal = fs_start_refusal(d)
    if refusal is not None:
        raise _refuse(d, "domain/devices/filesystem", refusal)
    b = _Builder(d, paths, kvm, graphics_ports or {}, files, nic_taps, graphics_listen)
    b.add(_plain(qemu_binary, "qemu binary"))
    firmware_args, b.firmware = firmware_argv(d, b.files.firmware)
    b.add("-name", _opts(f"guest={_esc(d.name)}", ("debug-threads", True)))
    if paused:
        b.add("-S")
    b.add("-uuid", d.uuid, "-msg", "timestamp=on", "-no-user-config", "-nodefaults")
    b.machine()
    b.cpu()
    b.memory()
    b.smp()
    if sandbox:
        b.add("-sandbox", SANDBOX)
    b.add("-chardev", _opts("socket", ("id", "charmonitor"), ("path", str(paths.qmp_socket)),
                            ("server", True), ("wait", False)),
          "-mon", "chardev=charmonitor,id=monitor,mode=control")
    b.add("-pidfile", _plain(paths.pidfile, "pidfile"), "-daemonize")
    if paths.log_file is not None:
        b.add("-D", _plain(paths.log_file, "log file"))
    for fd, fdset, opaque in (files.fd_sets if files else ()):
        b.add("-add-fd", _opts(("fd", fd), ("set", fdset), ("opaque", opaque)))
    b.add(*firmware_args)
    b.clock_and_pm()
    b.boot()
    b.graphics()
    b.controllers()
    for disk in d.disks:
        b.disk(disk)
    b.interfaces()
    b.serials_consoles_channels()
    b.inputs()
    for i, video in enumerate(d.videos):
        b.video(i, video)
    b.sounds()
    b.watchdogs()
    b.redirdevs()
    b.balloon_rng()
    b.panics()
    b.hostdevs()
    b.add(*filesystem_argv(d, paths.run_dir, b.pci.place))
    b.add(*tpm_argv(d, paths.run_dir))
    if incoming:
        b.add("-incoming", "defer")
    return b.argv
