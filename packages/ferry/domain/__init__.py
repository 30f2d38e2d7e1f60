"""Domain XML: parse, validate, format, check ABI stability, build the qemu argv.

Ferry reads a subset of libvirt's domain XML, with libvirt's names. The
rule is simple: what Ferry reads it models, formats back and (where it has a
meaning for qemu) turns into argv; what it does not read it refuses with
:class:`~ferry.errors.XMLUnsupported` naming the element path and source
line (``domain/devices/hostdev``). Nothing is silently dropped, with the few
exceptions listed under "accepted and ignored". Every problem of a document
is reported at once, in one error that lists them grouped by kind and
sorted by line, each with its element path and what to do
(``details["problems"]``; see :mod:`ferry.domain._problems`).

Modelled (parsed, formatted, compared, and used in the argv)
    ``<domain type='kvm|qemu'>``, name, uuid, title, description;
    ``<metadata>`` (kept verbatim, opaque); memory and currentMemory with
    units (b, k/KiB, KB, M/MiB, MB, G/GiB, ... default KiB); ``<memoryBacking>``
    with ``<allocation mode='immediate|ondemand' threads=N/>``, ``<source
    type='anonymous|memfd'/>``, ``<access mode='shared|private'/>`` and
    ``<hugepages>`` (one optional ``<page size>``, 2 MiB or 1 GiB); vcpu
    (placement, cpuset, current); ``<iothreads>``; ``<os>`` type hvm with
    arch x86_64/i686 and machine pc/q35/pc-i440fx-*/pc-q35-*, kernel, initrd, cmdline, boot dev
    (hd/cdrom/network), bootmenu; ``<cpu>`` modes custom/host-model/
    host-passthrough/maximum with model, features, topology, migratable,
    ``<numa>`` cells (id, cpus, memory, memAccess, discard); ``<numatune>``
    (``<memory>`` and ``<memnode>``: strict/preferred/interleave/restrictive
    with a nodeset); ``<cputune>`` vcpupin, emulatorpin, iothreadpin;
    ``<features>`` acpi, apic (eoi), pae, vmport, smm, ``<kvm>`` (hidden,
    hint-dedicated, poll-control, pv-ipi), ``<hyperv mode='custom|passthrough'>``
    (relaxed, vapic, spinlocks retries, vpindex, runtime, synic, stimer with
    direct, reset, vendor_id value, frequencies, reenlightenment, tlbflush,
    ipi, evmcs, avic, emsr_bitmap, xmm_input); ``<clock>`` offset
    utc/localtime and timers rtc/pit/hpet/kvmclock/hypervclock;
    on_poweroff/on_reboot/on_crash; ``<pm>``.
    Devices: emulator; disk (file/block, disk/cdrom, driver qemu raw/qcow2
    with cache, io, discard, error_policy, rerror_policy, event_idx, iothread; target
    on virtio/ide/scsi/sata/usb; readonly; shareable; address); controller
    (usb, ide, sata, scsi, virtio-serial, pci-root/pcie-root); interface
    (user, bridge, network; mac, model, mtu, tune/sndbuf, address); graphics
    vnc and spice (port, autoport, tlsPort, websocket, listen attribute and
    ``<listen type='address'>``, keymap, sharePolicy, defaultMode, spice
    channel/image/jpeg/zlib/playback/streaming/clipboard/filetransfer/mouse);
    video (vga, cirrus, qxl, virtio, bochs, none; only with graphics); serial
    and console (pty, file, unix bind/connect, null, tcp bind/connect with
    protocol raw/telnet; isa-serial, virtio
    console); channel (pty/unix/file/null/spicevmc, virtio target name;
    a unix path under libvirt's channel directory, ``/var/lib/libvirt/qemu/
    channel/target/domain-…``, is kept but the socket goes into Ferry's run
    directory, and the live XML shows that path); input
    (mouse/keyboard/tablet on ps2/usb/virtio); audio (id, type);
    memballoon (virtio/none); rng (virtio, backend random or builtin, rate);
    sound (ich9, ich6 with codecs, ac97; ``<audio id>``); redirdev (usb,
    spicevmc or tcp); watchdog (i6300esb, itco, ib700; action); panic (isa
    with its iobase, hyperv); hostdev (subsystem pci through vfio-pci, usb
    by vendor/product or bus/device: defined and started, never migrated);
    tpm (tpm-tis, tpm-crb; backend emulator,
    version 1.2/2.0, persistent_state, active_pcr_banks: a swtpm the host
    runs, :mod:`ferry.swtpm`; passthrough, external and an encrypted state
    are refused, see :mod:`ferry.domain._tpm`).

Defaults filled in on parse, the way libvirt does on define (so the
formatted XML is explicit and round-trips): a random UUID; random
52:54:00 MACs; currentMemory = memory; machine pc and arch x86_64; boot from
hd when there is neither kernel nor boot device; clock offset utc;
lifecycle destroy/restart/destroy; disk bus from the target name
(hd→ide, sd→scsi, vd→virtio); cdroms are read-only; serial ports numbered
in order; console target serial; unix sockets bind (and, in bind mode, may
omit their path: qemu then gets one under ``RuntimePaths.run_dir``); a virtio memballoon
when none is given; a vga video device when graphics have none.

Accepted and ignored
    ``<domain id=…>`` (libvirt's runtime id); the ``<source path>`` of a pty
    chardev (libvirt's live XML shows the allocated /dev/pts/N); a device's
    ``<alias name=…/>`` (libvirt's runtime device name; libvirt ignores it
    in an inactive definition too, user aliases ``ua-…`` included); a
    channel's ``<target state=…>`` (whether the guest agent is connected);
    XML comments and processing instructions outside ``<metadata>``.

Modelled but not in the argv (see :mod:`ferry.domain.argv`): emulator,
vcpu cpuset/placement, sndbuf, ps2 inputs and built-in controllers, an
``<audio>`` no sound card plays through, and the Hyper-V and KVM CPU
flags under TCG (as ``<apic eoi>`` and kvmclock). An interface of type
'network' is the bridge the host's configuration maps the network to
(``[networks.NAME]``, :mod:`ferry.netdev`): ``parse_domain(networks=…)``
refuses one the host does not map (define, Prepare), and the argv needs
the tap the agent made for it.

Refused (``XMLUnsupported``, with element path and line): every element
and attribute not listed above, e.g. hostdev, filesystem,
smartcard, hub, shmem, iommu, vsock, numatune, memoryBacking's locked,
nosharepages, discard and ``source type='file'``, cputune, memtune,
blkiotune, seclabel, resource, sysinfo, launchSecurity, os loader/nvram/
shim/dtb, disk type network/volume/dir/nvme, floppy and lun devices,
per-device ``<boot order>``, disk serial/wwn/iotune,
interface types other than user/bridge/network, chardev types other than
pty/file/unix/null, channel targets other than virtio, video without
graphics, PCI addresses off the root bus, and any namespaced element
outside ``<metadata>`` (such as ``qemu:commandline``).

Hostile input: DOCTYPE and ENTITY declarations are refused outright, the
document is limited to :data:`~ferry.domain.parse.MAX_XML_BYTES`, lxml runs
without entity resolution, network or DTD loading; every host path (kernel,
initrd, disk sources, chardev paths, emulator) must be absolute,
normalised, free of control characters and outside /proc, /sys and /dev
(block disks may be under /dev). Only :class:`~ferry.errors.XMLError` and
its subclasses escape :func:`parse_domain`.
"""

from ferry.domain.abi import check_abi_stability
from ferry.domain.argv import (
    GraphicsPorts,
    NicTap,
    PassedFiles,
    RuntimePaths,
    kvm_usable,
    qemu_disk_ids,
    to_qemu_argv,
)
from ferry.domain.format import format_domain
from ferry.domain.model import (
    OS,
    PM,
    Address,
    Audio,
    CharDev,
    Clock,
    Controller,
    Cpu,
    CpuFeature,
    CpuTopology,
    Disk,
    Domain,
    Features,
    Graphics,
    GraphicsOption,
    Input,
    Interface,
    Memballoon,
    Rng,
    Timer,
    Video,
    VirtualPort,
)
from ferry.domain.parse import MAX_XML_BYTES, HostNetworks, parse_domain

__all__ = [
    "MAX_XML_BYTES",
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
    "Disk",
    "Domain",
    "Features",
    "Graphics",
    "GraphicsOption",
    "GraphicsPorts",
    "HostNetworks",
    "Input",
    "Interface",
    "Memballoon",
    "NicTap",
    "PassedFiles",
    "Rng",
    "RuntimePaths",
    "Timer",
    "Video",
    "VirtualPort",
    "check_abi_stability",
    "format_domain",
    "kvm_usable",
    "parse_domain",
    "qemu_disk_ids",
    "to_qemu_argv",
]
