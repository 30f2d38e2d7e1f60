"""The domain model: what Ferry understands of a libvirt domain XML.

Every class is a frozen dataclass and every sequence a tuple, so a parsed
:class:`Domain` can be shared between tasks and compared with ``==`` (that
equality is what the parse → format → parse round trip is tested with).
Field names follow the XML (``target_dev`` is ``<target dev=…>``); values are
already normalised by the parser: units converted to KiB, UUIDs and MACs in
lower case, defaults filled in the way libvirt fills them on define (see
:mod:`ferry.domain` for the list), so two XML spellings of the same guest give
equal models.

The model holds no runtime state apart from graphics ports that the caller
may record after qemu picked them (``Graphics.port`` with ``autoport``), which
the migratable XML form leaves out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from ferry.domain._checks import check_name

__all__ = [
    "OS",
    "PM",
    "Address",
    "Audio",
    "CharDev",
    "Clock",
    "Controller",
    "Cpu",
    "CpuFeature",
    "CpuTopology",
    "CpuTune",
    "Disk",
    "Domain",
    "Features",
    "Filesystem",
    "Graphics",
    "GraphicsOption",
    "Hostdev",
    "HypervFeature",
    "Input",
    "Interface",
    "Loader",
    "Memballoon",
    "NumaCell",
    "NumaMemNode",
    "NumaTune",
    "Nvram",
    "Panic",
    "Redirdev",
    "Rng",
    "Sound",
    "Timer",
    "Tpm",
    "Video",
    "Watchdog",
    "is_libvirt_channel_path",
]

VirtType = Literal["kvm", "qemu"]


@dataclass(frozen=True)
class Address:
    """A device address (``<address type=…>``), kept for guest ABI stability.

    Only the fields of the address ``type`` are set: ``pci`` uses domain, bus,
    slot, function, multifunction; ``drive`` controller, bus, target, unit;
    ``virtio-serial`` controller, bus, port; ``usb`` bus, port.
    """

    type: Literal["pci", "drive", "virtio-serial", "usb"]
    domain: int | None = None
    bus: int | None = None
    slot: int | None = None
    function: int | None = None
    multifunction: bool | None = None
    controller: int | None = None
    target: int | None = None
    unit: int | None = None
    port: int | None = None


@dataclass(frozen=True)
class Loader:
    """``<os><loader>``: the firmware image.

    ``type='pflash'`` maps it as flash (with ``readonly`` the code part of a
    split UEFI firmware, whose variables live in the :class:`Nvram` file);
    ``type='rom'`` loads it as the BIOS ROM. ``path`` None: chosen from the
    host's firmware descriptors (``<os firmware='efi'>``).
    """

    path: str | None = None
    readonly: bool | None = None
    secure: bool | None = None
    type: Literal["rom", "pflash"] | None = None
    #: ``format='raw'`` (libvirt 9.2 and later write it; raw is the only one Ferry maps).
    format: Literal["raw"] | None = None


@dataclass(frozen=True)
class Nvram:
    """``<os><nvram>``: the VM's own UEFI variable store and its template.

    ``path`` None: Ferry's per-VM default (``state_dir/nvram/NAME_VARS.fd``),
    created from ``template`` when the VM first starts on a host;
    ``template`` None: the one the firmware descriptor of the loader names.
    """

    path: str | None = None
    template: str | None = None
    #: ``format`` and ``templateFormat``: raw (as libvirt 9.2 and later write them).
    format: Literal["raw"] | None = None
    template_format: Literal["raw"] | None = None


@dataclass(frozen=True)
class OS:
    """``<os>``: firmware type, machine, direct kernel boot and boot order."""

    type: str = "hvm"
    arch: str = "x86_64"
    machine: str = "pc"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    #: ``<boot dev=…>`` in order: hd, cdrom, network, fd.
    boot_devs: tuple[str, ...] = ()
    bootmenu: bool | None = None
    bootmenu_timeout: int | None = None
    #: ``<os firmware=…>``: efi or bios, chosen from the host's firmware descriptors.
    firmware: Literal["efi", "bios"] | None = None
    #: ``<firmware><feature enabled=… name=…/>``: (secure-boot|enrolled-keys, enabled).
    firmware_features: tuple[tuple[str, bool], ...] = ()
    loader: Loader | None = None
    nvram: Nvram | None = None

    @property
    def is_q35(self) -> bool:
        """True for the q35 machine family (pcie.0 root bus, built-in AHCI)."""
        return self.machine == "q35" or self.machine.startswith("pc-q35")


@dataclass(frozen=True)
class CpuFeature:
    """``<cpu><feature policy=… name=…/>``."""

    name: str
    policy: Literal["force", "require", "optional", "disable", "forbid"] = "require"


@dataclass(frozen=True)
class CpuTopology:
    """``<cpu><topology sockets dies cores threads/>``; the product equals the vCPU count."""

    sockets: int
    dies: int
    cores: int
    threads: int


@dataclass(frozen=True)
class Cpu:
    """``<cpu>``: the guest CPU model."""

    mode: Literal["custom", "host-model", "host-passthrough", "maximum"] = "custom"
    match: str | None = None
    check: str | None = None
    migratable: bool | None = None
    model: str | None = None
    fallback: str | None = None
    features: tuple[CpuFeature, ...] = ()
    topology: CpuTopology | None = None
    #: Not from the XML: the concrete CPU (qemu ``base`` properties) a
    #: host-model guest arriving by migration runs (:mod:`ferry.domain._cpu`).
    expansion: tuple[tuple[str, bool | int | str], ...] | None = None
    #: ``<numa><cell …/></numa>``: the guest NUMA nodes, by id (0, 1, …).
    numa: tuple[NumaCell, ...] = ()


@dataclass(frozen=True)
class NumaCell:
    """``<cpu><numa><cell id cpus memory memAccess discard/>``: one guest NUMA node.

    ``cpus`` is the cpuset text as written, normalised (``0-1,4``; empty for
    a node without CPUs); ``memory_kib`` is in KiB.
    """

    id: int
    cpus: str
    memory_kib: int
    #: ``memAccess='shared|private'``: this node's RAM shared (vhost-user) or not.
    mem_access: Literal["shared", "private"] | None = None
    #: ``discard='yes|no'``: give the node's RAM back to the host when qemu exits.
    discard: bool | None = None


@dataclass(frozen=True)
class NumaMemNode:
    """``<numatune><memnode cellid mode nodeset/>``: host nodes for one guest node's RAM."""

    cellid: int
    mode: Literal["strict", "preferred", "interleave", "restrictive"]
    nodeset: str


@dataclass(frozen=True)
class NumaTune:
    """``<numatune>``: on which host NUMA nodes guest RAM is allocated.

    ``mode``/``nodeset`` come from ``<memory>`` (None without it) and apply
    to every guest node without its own ``<memnode>``.
    """

    mode: Literal["strict", "preferred", "interleave", "restrictive"] | None = None
    nodeset: str | None = None
    memnodes: tuple[NumaMemNode, ...] = ()


@dataclass(frozen=True)
class CpuTune:
    """``<cputune>``: host CPUs for vCPU, emulator and I/O threads (normalised cpusets).

    ``vcpupins`` and ``iothreadpins`` are (vcpu or iothread id, cpuset)
    pairs in document order.
    """

    vcpupins: tuple[tuple[int, str], ...] = ()
    emulatorpin: str | None = None
    iothreadpins: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class HypervFeature:
    """One ``<features><hyperv>`` child: ``<relaxed state='on'/>``, ...

    ``retries`` belongs to spinlocks, ``value`` to vendor_id, ``direct`` to
    stimer (its ``<direct state=…/>`` child).
    """

    name: str
    state: bool
    retries: int | None = None
    value: str | None = None
    direct: bool | None = None


@dataclass(frozen=True)
class Features:
    """``<features>``: only the hypervisor features Ferry knows."""

    acpi: bool = False
    apic: bool = False
    #: ``<apic eoi='on|off'/>``: paravirtual EOI (KVM only).
    apic_eoi: bool | None = None
    pae: bool = False
    #: ``<vmport state=…/>``: VMware's I/O port (``-machine vmport``).
    vmport: bool | None = None
    #: ``<smm state=…/>``: system management mode (``-machine smm``).
    smm: bool | None = None
    #: ``<kvm>`` children in document order: (name, state), e.g. ("hidden", True).
    kvm: tuple[tuple[str, bool], ...] = ()
    #: ``<hyperv mode=…>``: None without ``<hyperv>``; custom or passthrough.
    hyperv_mode: Literal["custom", "passthrough"] | None = None
    hyperv: tuple[HypervFeature, ...] = ()


@dataclass(frozen=True)
class Timer:
    """``<clock><timer …/>`` (rtc, pit, hpet, kvmclock, hypervclock)."""

    name: str
    present: bool | None = None
    tickpolicy: str | None = None
    track: str | None = None


@dataclass(frozen=True)
class Clock:
    """``<clock offset=…>`` and its timers."""

    offset: Literal["utc", "localtime"] = "utc"
    timers: tuple[Timer, ...] = ()


@dataclass(frozen=True)
class PM:
    """``<pm>``: guest power management (ACPI S3/S4) switches."""

    suspend_to_mem: bool | None = None
    suspend_to_disk: bool | None = None


@dataclass(frozen=True)
class Disk:
    """``<disk>``: a file or block device seen as a disk or cdrom."""

    type: Literal["file", "block"]
    device: Literal["disk", "cdrom"]
    target_dev: str
    target_bus: Literal["virtio", "ide", "scsi", "sata", "usb"]
    #: ``<source file=…>`` or ``<source dev=…>``; None for an empty cdrom.
    source: str | None = None
    driver_name: str | None = None
    #: ``<driver type=…>``: raw or qcow2; None means raw (never probed).
    format: str | None = None
    cache: str | None = None
    io: str | None = None
    discard: str | None = None
    error_policy: str | None = None
    rerror_policy: str | None = None
    event_idx: bool | None = None
    #: ``<driver iothread=K>``: the disk's I/O runs in iothread K (1-based).
    iothread: int | None = None
    readonly: bool = False
    shareable: bool = False
    address: Address | None = None


@dataclass(frozen=True)
class Controller:
    """``<controller>``: usb, ide, sata, scsi, virtio-serial, or a PCI bus of the tree.

    PCI controllers (``type='pci'``) form the guest's PCI tree: the root
    (``pci-root`` on pc, ``pcie-root`` on q35, index 0) and the buses that
    plug into it, each exposing bus number ``index`` (``pcie-root-port``,
    ``pcie-to-pci-bridge``, ``pci-bridge``, ``dmi-to-pci-bridge``). A
    controller without ``index`` in the XML gets the lowest free one of its
    type, as libvirt assigns it. ``chassis``/``port`` (root ports) and
    ``chassis_nr`` (pci-bridge) left None take libvirt's defaults when qemu
    starts (chassis = index, port = slot << 3 | function).
    """

    type: str
    index: int = 0
    model: str | None = None
    ports: int | None = None
    address: Address | None = None
    #: ``<model name=…>``: the qemu device of a PCI controller (pcie-root-port, ioh3420, …).
    model_name: str | None = None
    #: ``<target chassis=… port=…>`` of a root port; ``chassisNr`` of a pci-bridge.
    chassis: int | None = None
    port: int | None = None
    chassis_nr: int | None = None
    #: ``<target hotplug='on|off'>`` of a root port.
    hotplug: bool | None = None
    #: ``<master startport=…>`` of a USB companion (ich9-uhci1..3 of an ich9-ehci1).
    master_startport: int | None = None
    #: ``<driver queues=…>`` of a virtio-scsi controller.
    queues: int | None = None


@dataclass(frozen=True)
class VirtualPort:
    """``<virtualport type='openvswitch'>``: the NIC's port on an Open vSwitch bridge."""

    type: Literal["openvswitch"]
    #: The port's identity for an SDN controller (OVS ``external-ids:iface-id``);
    #: None: derived from the domain UUID and the MAC (the same on every host).
    interfaceid: str | None = None
    profileid: str | None = None


@dataclass(frozen=True)
class Interface:
    """``<interface>``: a NIC and its host side (user, bridge or network)."""

    type: Literal["user", "bridge", "network"]
    mac: str
    model: str | None = None
    #: bridge name (type bridge) or network name (type network).
    source: str | None = None
    mtu: int | None = None
    sndbuf: int | None = None
    address: Address | None = None
    virtualport: VirtualPort | None = None


@dataclass(frozen=True)
class GraphicsOption:
    """One spice child element kept as (element, attributes), e.g. ``channel``."""

    element: str
    attrs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Graphics:
    """``<graphics type='vnc|spice'>``.

    ``autoport`` means the port is chosen when qemu starts; ``port`` is then
    None in a definition, or the port in use when the caller recorded it.
    ``tls_port`` with ``autoport`` is None, -1 (the XML's ``tlsPort='-1'``:
    a TLS port where the host has spice TLS) or the TLS port recorded.
    """

    type: Literal["vnc", "spice"]
    port: int | None = None
    autoport: bool = True
    tls_port: int | None = None
    #: vnc websocket port; -1 means "pick one".
    websocket: int | None = None
    #: The listen address (attribute or ``<listen type='address'>``); None:
    #: the host's default (``[graphics] listen``).
    listen: str | None = None
    #: A ``<listen type='address'/>`` without an address (virt-manager writes
    #: it): the host's default too; kept so that the element round-trips.
    listen_element: bool = False
    keymap: str | None = None
    share_policy: str | None = None
    default_mode: str | None = None
    options: tuple[GraphicsOption, ...] = ()


@dataclass(frozen=True)
class Video:
    """``<video><model type=…/>``; sizes in KiB as in the XML."""

    model: str = "vga"
    vram: int | None = None
    ram: int | None = None
    vgamem: int | None = None
    heads: int | None = None
    primary: bool | None = None
    address: Address | None = None


@dataclass(frozen=True)
class CharDev:
    """A ``<serial>``, ``<console>`` or ``<channel>``: host side and guest side.

    ``type`` is the host side (pty, file, unix, null); ``target_*`` the guest
    side. A unix socket in bind mode may leave ``source_path`` None: it is
    then created under the runtime directory (``RuntimePaths.run_dir``) when
    qemu starts, which keeps host paths out of a definition that migrates.
    """

    type: Literal["pty", "file", "unix", "null", "spicevmc", "tcp"]
    target_type: str
    source_path: str | None = None
    #: unix sockets: bind (qemu listens) or connect.
    source_mode: Literal["bind", "connect"] | None = None
    append: bool | None = None
    target_port: int | None = None
    target_name: str | None = None
    target_model: str | None = None
    address: Address | None = None
    #: tcp: ``<source host service>`` (mode is ``source_mode``) and
    #: ``<protocol type='raw|telnet'>``.
    host: str | None = None
    service: int | None = None
    protocol: Literal["raw", "telnet"] | None = None


#: libvirt's own place for channel sockets (``channelTargetDir``): a path there
#: is the one libvirt chose for a run (``domain-ID-NAME/…``), not configuration.
_LIBVIRT_CHANNEL_DIRS = ("/var/lib/libvirt/qemu/channel/target/",
                         "/run/libvirt/qemu/channel/target/")


def is_libvirt_channel_path(path: str | None) -> bool:
    """True for a socket path under libvirt's channel target directory.

    ``virsh dumpxml`` shows the path libvirt chose for a guest-agent channel
    (``/var/lib/libvirt/qemu/channel/target/domain-1-NAME/org.qemu.guest_agent.0``,
    or under ``~/.config/libvirt/qemu/lib/channel/target/`` for a session),
    and virt-install writes what it is given. The directory is libvirt's and
    the ``domain-ID`` part changes with every run, so Ferry treats such a
    path like a missing one: the socket goes into the domain's run directory
    (as libvirt drops its default path from migratable XML).
    """
    if path is None:
        return False
    return path.startswith(_LIBVIRT_CHANNEL_DIRS) or "/libvirt/qemu/lib/channel/target/" in path


@dataclass(frozen=True)
class Input:
    """``<input type=… bus=…>``."""

    type: Literal["mouse", "keyboard", "tablet"]
    bus: Literal["ps2", "usb", "virtio"]
    address: Address | None = None


@dataclass(frozen=True)
class Audio:
    """``<audio id=… type=…>``: an audio backend (kept; Ferry has no sound devices)."""

    id: int
    type: str


@dataclass(frozen=True)
class Sound:
    """``<sound model=…>``: an emulated sound card with its HDA codecs."""

    model: Literal["ich9", "ich6", "ac97"]
    #: ``<codec type=…>`` of an HDA card (duplex, micro, output); none means duplex.
    codecs: tuple[str, ...] = ()
    #: ``<audio id=…/>``: the ``<audio>`` backend it plays through (None: the first).
    audio_id: int | None = None
    address: Address | None = None


@dataclass(frozen=True)
class Redirdev:
    """``<redirdev bus='usb'>``: a USB device redirected from a spice client or a TCP peer."""

    type: Literal["spicevmc", "tcp"]
    bus: Literal["usb"] = "usb"
    #: tcp: the peer (``<source mode host service>``); connect or bind.
    host: str | None = None
    service: int | None = None
    mode: Literal["connect", "bind"] | None = None
    #: tcp: ``<protocol type='raw'|'telnet'>``.
    protocol: str | None = None
    address: Address | None = None


@dataclass(frozen=True)
class Watchdog:
    """``<watchdog model=… action=…>``."""

    model: Literal["i6300esb", "itco", "ib700"]
    action: str = "reset"
    address: Address | None = None


@dataclass(frozen=True)
class Tpm:
    """``<tpm model=…><backend type='emulator' version=…/></tpm>``: a TPM that
    ``swtpm`` emulates (:mod:`ferry.swtpm`); its state moves with a migration."""

    model: Literal["tpm-tis", "tpm-crb"] = "tpm-tis"
    backend: Literal["emulator"] = "emulator"
    #: ``version`` as written (None: libvirt's default, 2.0).
    version: Literal["1.2", "2.0"] | None = None
    #: ``persistent_state='yes'``: keep the state when a transient domain ends.
    persistent_state: bool | None = None
    #: ``<active_pcr_banks>``: the PCR banks swtpm_setup activates (sha1, sha256, …).
    pcr_banks: tuple[str, ...] = ()

    @property
    def tpm_version(self) -> Literal["1.2", "2.0"]:
        """The TPM version the guest sees."""
        return self.version or "2.0"


@dataclass(frozen=True)
class Panic:
    """``<panic model=…>``: isa (pvpanic at an I/O port) or hyperv (``hv-crash``)."""

    model: Literal["isa", "hyperv"]
    #: isa: ``<address type='isa' iobase=…/>`` (0x505 when absent).
    iobase: int | None = None


@dataclass(frozen=True)
class Filesystem:
    """A virtiofs ``<filesystem type='mount'>``: host ``source_dir`` as mount tag ``target_dir``."""

    source_dir: str
    target_dir: str
    accessmode: Literal["passthrough"] | None = None
    queue: int | None = None
    address: Address | None = None


@dataclass(frozen=True)
class Hostdev:
    """``<hostdev mode='subsystem' type='pci|usb'>``: a host device given to the guest.

    pci: the host's PCI function ``pci_addr`` (domain, bus, slot, function)
    through vfio-pci. usb: by ``vendor``/``product`` id, or by the host's
    ``usb_bus``/``usb_device`` numbers. ``address`` is the guest's address.
    """

    type: Literal["pci", "usb"]
    managed: bool | None = None
    pci_addr: tuple[int, int, int, int] | None = None
    driver: str | None = None
    vendor: int | None = None
    product: int | None = None
    usb_bus: int | None = None
    usb_device: int | None = None
    address: Address | None = None

    def describe(self) -> str:
        """How an operator recognises the device (``lspci``/``lsusb`` style)."""
        if self.type == "pci" and self.pci_addr is not None:
            d, b, s, f = self.pci_addr
            return f"PCI host device {d:04x}:{b:02x}:{s:02x}.{f:x}"
        if self.vendor is not None and self.product is not None:
            return f"USB host device {self.vendor:04x}:{self.product:04x}"
        return f"USB host device at bus {self.usb_bus} device {self.usb_device}"


@dataclass(frozen=True)
class Memballoon:
    """``<memballoon model='virtio|none'>``; absent in the XML means virtio."""

    model: Literal["virtio", "none"] = "virtio"
    address: Address | None = None


@dataclass(frozen=True)
class Rng:
    """``<rng model='virtio'>`` with a random (host file) or builtin backend."""

    model: Literal["virtio"] = "virtio"
    backend_model: Literal["random", "builtin"] = "random"
    backend_path: str | None = None
    rate_bytes: int | None = None
    rate_period: int | None = None
    address: Address | None = None


@dataclass(frozen=True)
class Domain:
    """A parsed, validated domain definition."""

    virt_type: VirtType
    name: str
    uuid: str
    memory_kib: int
    current_memory_kib: int
    vcpus: int
    os: OS = field(default_factory=OS)
    title: str | None = None
    description: str | None = None
    #: the content of ``<metadata>``, verbatim (serialised XML), or None.
    metadata: str | None = None
    #: ``<memoryBacking><allocation mode=…>``: immediate preallocates guest RAM.
    memory_allocation: Literal["immediate", "ondemand"] | None = None
    prealloc_threads: int | None = None
    vcpu_placement: str | None = None
    vcpu_cpuset: str | None = None
    #: ``<vcpu current=N>``: vCPUs online at start (``vcpus`` is the maximum).
    vcpus_current: int | None = None
    #: ``<iothreads>N</iothreads>``: I/O threads ``iothread1..N``.
    iothreads: int | None = None
    #: ``<memoryBacking><source type=…/>``: anonymous or memfd.
    memory_source: Literal["anonymous", "memfd"] | None = None
    #: ``<memoryBacking><access mode=…/>``: shared (vhost-user needs it) or private.
    memory_access: Literal["shared", "private"] | None = None
    #: ``<memoryBacking><hugepages/>``; with ``<page size>`` in KiB (None: the host's default).
    hugepages: bool = False
    hugepage_kib: int | None = None
    cpu: Cpu | None = None
    #: ``<numatune>``: host NUMA placement of guest RAM.
    numatune: NumaTune | None = None
    #: ``<cputune>``: host CPU pinning of qemu's threads.
    cputune: CpuTune | None = None
    features: Features = field(default_factory=Features)
    clock: Clock = field(default_factory=Clock)
    pm: PM = field(default_factory=PM)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    emulator: str | None = None
    disks: tuple[Disk, ...] = ()
    controllers: tuple[Controller, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    serials: tuple[CharDev, ...] = ()
    consoles: tuple[CharDev, ...] = ()
    channels: tuple[CharDev, ...] = ()
    inputs: tuple[Input, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    audios: tuple[Audio, ...] = ()
    videos: tuple[Video, ...] = ()
    memballoon: Memballoon = field(default_factory=Memballoon)
    rngs: tuple[Rng, ...] = ()
    sounds: tuple[Sound, ...] = ()
    redirdevs: tuple[Redirdev, ...] = ()
    watchdogs: tuple[Watchdog, ...] = ()
    panics: tuple[Panic, ...] = ()
    hostdevs: tuple[Hostdev, ...] = ()
    filesystems: tuple[Filesystem, ...] = ()
    tpms: tuple[Tpm, ...] = ()

    @property
    def memory_mib(self) -> int:
        """Guest RAM in MiB, rounded up (qemu on x86 sizes RAM in whole MiB)."""
        return -(-self.memory_kib // 1024)

    @property
    def online_vcpus(self) -> int:
        """vCPUs online when qemu starts (``<vcpu current>``, else all)."""
        return self.vcpus_current if self.vcpus_current is not None else self.vcpus

    @property
    def preallocated(self) -> bool:
        """True when guest RAM is allocated up front (``allocation mode='immediate'``)."""
        return self.memory_allocation == "immediate"

    def renamed(self, new_name: str) -> Domain:
        """Return a copy named ``new_name`` (same UUID), as ``--dname`` does.

        :raises XMLError: ``new_name`` is not a valid domain name.
        """
        check_name(new_name)
        return dataclasses.replace(self, name=new_name)
