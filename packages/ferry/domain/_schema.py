"""The schema: what Ferry understands of libvirt's domain XML, by element path.

Every element and attribute of a document is checked against :data:`SCHEMA`
(see :mod:`ferry.domain._walk`); whatever is not listed is refused, so that
nothing is ever silently dropped. Supporting a new element starts with an
entry here (its path, its attributes, whether it carries text), followed by
the small function that turns it into the model (see
:mod:`ferry.domain._devices` for devices, :mod:`ferry.domain._top` for the
children of ``<domain>``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.domain._tpm import PCR_BANKS

__all__ = ["ADDRESS", "HYPERV_FEATURES", "KVM_FEATURES", "SCHEMA", "Spec", "spec"]


@dataclass(frozen=True)
class Spec:
    """What one element may carry."""

    attrs: frozenset[str] = frozenset()
    text: bool = False  # may carry non-blank text
    opaque: bool = False  # content kept verbatim, not walked


def spec(*attrs: str, text: bool = False, opaque: bool = False) -> Spec:
    """A :class:`Spec` with attributes ``attrs``."""
    return Spec(frozenset(attrs), text, opaque)


_s = spec

#: Every device's ``<address>``; which attributes fit which address type is
#: checked by :func:`ferry.domain._address.parse_address`.
ADDRESS = _s("type", "domain", "bus", "slot", "function", "multifunction",
             "controller", "target", "unit", "port")

#: ``<features><kvm>`` children.
KVM_FEATURES = ("hidden", "hint-dedicated", "poll-control", "pv-ipi")
#: ``<features><hyperv>`` children and their attributes.
HYPERV_FEATURES: dict[str, tuple[str, ...]] = {
    **{k: ("state",) for k in ("relaxed", "vapic", "vpindex", "runtime", "synic", "stimer",
                               "reset", "frequencies", "reenlightenment", "tlbflush", "ipi",
                               "evmcs", "avic", "emsr_bitmap", "xmm_input")},
    "spinlocks": ("state", "retries"),
    "vendor_id": ("state", "value"),
}

SCHEMA: dict[str, Spec] = {
    # `id` is the runtime domain id of libvirt's live XML: accepted, ignored.
    "domain": _s("type", "id"),
    "domain/name": _s(text=True),
    "domain/uuid": _s(text=True),
    "domain/title": _s(text=True),
    "domain/description": _s(text=True),
    "domain/metadata": _s(opaque=True),
    "domain/memory": _s("unit", text=True),
    "domain/currentMemory": _s("unit", text=True),
    "domain/memoryBacking": _s(),
    "domain/memoryBacking/allocation": _s("mode", "threads"),
    "domain/memoryBacking/source": _s("type"),
    "domain/memoryBacking/access": _s("mode"),
    "domain/memoryBacking/hugepages": _s(),
    "domain/memoryBacking/hugepages/page": _s("size", "unit"),
    "domain/vcpu": _s("placement", "cpuset", "current", text=True),
    "domain/iothreads": _s(text=True),
    "domain/os": _s("firmware"),
    "domain/os/firmware": _s(),
    "domain/os/firmware/feature": _s("enabled", "name"),
    "domain/os/loader": _s("readonly", "secure", "type", "format", text=True),
    "domain/os/nvram": _s("template", "format", "templateFormat", text=True),
    "domain/os/type": _s("arch", "machine", text=True),
    "domain/os/kernel": _s(text=True),
    "domain/os/initrd": _s(text=True),
    "domain/os/cmdline": _s(text=True),
    "domain/os/boot": _s("dev"),
    "domain/os/bootmenu": _s("enable", "timeout"),
    "domain/cpu": _s("mode", "match", "check", "migratable"),
    "domain/cpu/model": _s("fallback", text=True),
    "domain/cpu/feature": _s("policy", "name"),
    "domain/cpu/topology": _s("sockets", "dies", "cores", "threads"),
    "domain/cpu/numa": _s(),
    "domain/cpu/numa/cell": _s("id", "cpus", "memory", "unit", "memAccess", "discard"),
    "domain/numatune": _s(),
    "domain/numatune/memory": _s("mode", "nodeset", "placement"),
    "domain/numatune/memnode": _s("cellid", "mode", "nodeset"),
    # <cputune>: pinning only; shares, period, quota and the schedulers are
    # cgroup and scheduler settings Ferry does not make (refused).
    "domain/cputune": _s(),
    "domain/cputune/vcpupin": _s("vcpu", "cpuset"),
    "domain/cputune/emulatorpin": _s("cpuset"),
    "domain/cputune/iothreadpin": _s("iothread", "cpuset"),
    "domain/features": _s(),
    "domain/features/acpi": _s(),
    "domain/features/apic": _s("eoi"),
    "domain/features/pae": _s(),
    "domain/features/vmport": _s("state"),
    "domain/features/smm": _s("state"),
    "domain/features/kvm": _s(),
    **{f"domain/features/kvm/{k}": _s("state") for k in KVM_FEATURES},
    "domain/features/hyperv": _s("mode"),
    **{f"domain/features/hyperv/{k}": _s(*a) for k, a in HYPERV_FEATURES.items()},
    "domain/features/hyperv/stimer/direct": _s("state"),
    "domain/clock": _s("offset"),
    "domain/clock/timer": _s("name", "present", "tickpolicy", "track"),
    "domain/on_poweroff": _s(text=True),
    "domain/on_reboot": _s(text=True),
    "domain/on_crash": _s(text=True),
    "domain/pm": _s(),
    "domain/pm/suspend-to-mem": _s("enabled"),
    "domain/pm/suspend-to-disk": _s("enabled"),
    "domain/devices": _s(),
    "domain/devices/emulator": _s(text=True),
    "domain/devices/disk": _s("type", "device"),
    "domain/devices/disk/driver": _s("name", "type", "cache", "io", "discard", "error_policy",
                                     "rerror_policy", "event_idx", "iothread"),
    "domain/devices/disk/source": _s("file", "dev"),
    "domain/devices/disk/target": _s("dev", "bus"),
    "domain/devices/disk/readonly": _s(),
    "domain/devices/disk/shareable": _s(),
    "domain/devices/disk/address": ADDRESS,
    "domain/devices/controller": _s("type", "index", "model", "ports"),
    "domain/devices/controller/address": ADDRESS,
    "domain/devices/controller/model": _s("name"),
    "domain/devices/controller/target": _s("chassis", "port", "chassisNr", "hotplug"),
    "domain/devices/controller/master": _s("startport"),
    "domain/devices/controller/driver": _s("queues"),
    "domain/devices/interface": _s("type"),
    "domain/devices/interface/mac": _s("address"),
    "domain/devices/interface/source": _s("network", "bridge"),
    "domain/devices/interface/model": _s("type"),
    "domain/devices/interface/mtu": _s("size"),
    "domain/devices/interface/tune": _s(),
    "domain/devices/interface/tune/sndbuf": _s(text=True),
    "domain/devices/interface/virtualport": _s("type"),
    "domain/devices/interface/virtualport/parameters": _s("interfaceid", "profileid"),
    "domain/devices/interface/address": ADDRESS,
    "domain/devices/serial": _s("type"),
    "domain/devices/serial/source": _s("path", "mode", "append", "host", "service"),
    "domain/devices/serial/protocol": _s("type"),
    "domain/devices/serial/target": _s("type", "port"),
    "domain/devices/serial/target/model": _s("name"),
    "domain/devices/console": _s("type"),
    "domain/devices/console/source": _s("path", "mode", "append", "host", "service"),
    "domain/devices/console/protocol": _s("type"),
    "domain/devices/console/target": _s("type", "port"),
    "domain/devices/console/address": ADDRESS,
    "domain/devices/channel": _s("type"),
    "domain/devices/channel/source": _s("path", "mode", "append"),
    # target@state: the guest agent's connection state in libvirt's live XML
    # (runtime state): accepted and ignored.
    "domain/devices/channel/target": _s("type", "name", "state"),
    "domain/devices/channel/address": ADDRESS,
    "domain/devices/input": _s("type", "bus"),
    "domain/devices/input/address": ADDRESS,
    "domain/devices/graphics": _s("type", "port", "autoport", "tlsPort", "websocket", "listen",
                                  "keymap", "sharePolicy", "defaultMode"),
    "domain/devices/graphics/listen": _s("type", "address", "network"),
    "domain/devices/graphics/channel": _s("name", "mode"),
    "domain/devices/graphics/image": _s("compression"),
    "domain/devices/graphics/jpeg": _s("compression"),
    "domain/devices/graphics/zlib": _s("compression"),
    "domain/devices/graphics/playback": _s("compression"),
    "domain/devices/graphics/streaming": _s("mode"),
    "domain/devices/graphics/clipboard": _s("copypaste"),
    "domain/devices/graphics/filetransfer": _s("enable"),
    "domain/devices/graphics/mouse": _s("mode"),
    "domain/devices/video": _s(),
    "domain/devices/video/model": _s("type", "vram", "ram", "vgamem", "heads", "primary"),
    "domain/devices/video/address": ADDRESS,
    "domain/devices/audio": _s("id", "type"),
    "domain/devices/memballoon": _s("model"),
    "domain/devices/memballoon/address": ADDRESS,
    "domain/devices/rng": _s("model"),
    "domain/devices/rng/rate": _s("bytes", "period"),
    "domain/devices/rng/backend": _s("model", text=True),
    "domain/devices/rng/address": ADDRESS,
    "domain/devices/sound": _s("model"),
    "domain/devices/sound/codec": _s("type"),
    "domain/devices/sound/audio": _s("id"),
    "domain/devices/sound/address": ADDRESS,
    "domain/devices/redirdev": _s("bus", "type"),
    "domain/devices/redirdev/source": _s("mode", "host", "service"),
    "domain/devices/redirdev/protocol": _s("type"),
    "domain/devices/redirdev/address": ADDRESS,
    "domain/devices/watchdog": _s("model", "action"),
    "domain/devices/watchdog/address": ADDRESS,
    "domain/devices/panic": _s("model"),
    "domain/devices/filesystem": _s("type", "accessmode"),
    "domain/devices/filesystem/driver": _s("type", "queue"),
    "domain/devices/filesystem/source": _s("dir"),
    "domain/devices/filesystem/target": _s("dir"),
    "domain/devices/filesystem/address": ADDRESS,
    "domain/devices/hostdev": _s("mode", "type", "managed"),
    "domain/devices/hostdev/source": _s(),
    "domain/devices/hostdev/source/address": _s("domain", "bus", "slot", "function", "device"),
    "domain/devices/hostdev/source/vendor": _s("id"),
    "domain/devices/hostdev/source/product": _s("id"),
    "domain/devices/hostdev/driver": _s("name"),
    "domain/devices/hostdev/address": ADDRESS,
    # An isa panic's port (libvirt's dumpxml writes it); not an ADDRESS type.
    "domain/devices/panic/address": _s("type", "iobase", "irq"),
    # <tpm>: see ferry.domain._tpm (passthrough's <device> and <encryption>
    # are read only to be refused with the reason).
    "domain/devices/tpm": _s("model"),
    "domain/devices/tpm/backend": _s("type", "version", "persistent_state"),
    "domain/devices/tpm/backend/device": _s("path"),
    "domain/devices/tpm/backend/encryption": _s("secret"),
    "domain/devices/tpm/backend/active_pcr_banks": _s(),
    **{f"domain/devices/tpm/backend/active_pcr_banks/{b}": _s() for b in PCR_BANKS},
}

# <alias name='…'/> on a device: libvirt's runtime device name (live XML),
# accepted and ignored as libvirt ignores it in an inactive definition.
for _dev in ("disk", "controller", "interface", "serial", "console", "channel", "input",
             "video", "memballoon", "rng", "sound", "redirdev", "watchdog", "panic",
             "hostdev", "filesystem", "tpm"):
    SCHEMA[f"domain/devices/{_dev}/alias"] = _s("name")
