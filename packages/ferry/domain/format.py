"""Format a :class:`~ferry.domain.model.Domain` back to libvirt-style XML.

The output parses back to an equal model (the round trip the tests check).
It is libvirt's element order and names, with every default that the parser
filled in written out explicitly, so the XML that travels in a migration
cookie or lands in ``/var/lib/ferry/domains`` needs no re-interpretation.

``migratable=True`` produces the form libvirt produces with
``VIR_DOMAIN_XML_MIGRATABLE``: the definition without this host's runtime
choices. In Ferry's model the only such state is the port a graphics device
with ``autoport`` got when qemu started; it is written as ``port='-1'``
(and ``tlsPort`` left out), so the destination picks its own.
"""

from __future__ import annotations

from lxml import etree

from ferry.domain.model import (
    OS,
    Address,
    CharDev,
    Controller,
    Disk,
    Domain,
    Features,
    Graphics,
    Hostdev,
    Interface,
    Video,
)
from ferry.errors import XMLError

__all__ = ["format_domain"]

_Element = etree._Element


def _sub(parent: _Element, tag: str, text: str | None = None, **attrs: str | None) -> _Element:
    el = etree.SubElement(parent, tag)
    for key, value in attrs.items():
        if value is not None:
            # Python keywords cannot be attribute names; callers append "_".
            el.set(key.rstrip("_"), value)
    if text is not None:
        el.text = text
    return el


def _yn(value: bool | None, yes: str = "yes", no: str = "no") -> str | None:
    return None if value is None else (yes if value else no)


def _num(value: int | None) -> str | None:
    return None if value is None else str(value)


def _address(parent: _Element, addr: Address | None) -> None:
    if addr is None:
        return
    if addr.type == "pci":
        _sub(parent, "address", type="pci", domain=f"0x{addr.domain or 0:04x}",
             bus=f"0x{addr.bus or 0:02x}", slot=f"0x{addr.slot or 0:02x}",
             function=f"0x{addr.function or 0:x}",
             multifunction=_yn(addr.multifunction, "on", "off"))
    elif addr.type == "drive":
        _sub(parent, "address", type="drive", controller=_num(addr.controller),
             bus=_num(addr.bus), target=_num(addr.target), unit=_num(addr.unit))
    elif addr.type == "virtio-serial":
        _sub(parent, "address", type="virtio-serial", controller=_num(addr.controller),
             bus=_num(addr.bus), port=_num(addr.port))
    else:
        _sub(parent, "address", type="usb", bus=_num(addr.bus), port=_num(addr.port))


def _metadata(parent: _Element, content: str) -> None:
    from ferry.domain.parse import _load

    try:
        wrapper = _load(f"<metadata>{content}</metadata>", "domain/metadata")
    except XMLError as exc:
        raise XMLError(f"domain metadata is not well-formed XML: {exc}") from None
    parent.append(wrapper)


def _disk(parent: _Element, d: Disk) -> None:
    el = _sub(parent, "disk", type=d.type, device=d.device)
    drv = {"name": d.driver_name, "type": d.format, "cache": d.cache, "io": d.io,
           "discard": d.discard, "error_policy": d.error_policy,
           "rerror_policy": d.rerror_policy, "event_idx": _yn(d.event_idx, "on", "off"),
           "iothread": _num(d.iothread)}
    if any(v is not None for v in drv.values()):
        _sub(el, "driver", **drv)
    if d.source is not None:
        if d.type == "file":
            _sub(el, "source", file=d.source)
        else:
            _sub(el, "source", dev=d.source)
    _sub(el, "target", dev=d.target_dev, bus=d.target_bus)
    if d.readonly:
        _sub(el, "readonly")
    if d.shareable:
        _sub(el, "shareable")
    _address(el, d.address)


def _controller(parent: _Element, c: Controller) -> None:
    """A ``<controller>`` with its children in libvirt's order."""
    el = _sub(parent, "controller", type=c.type, index=str(c.index), model=c.model,
              ports=_num(c.ports))
    if c.queues is not None:
        _sub(el, "driver", queues=str(c.queues))
    if c.master_startport is not None:
        _sub(el, "master", startport=str(c.master_startport))
    if c.model_name is not None:
        _sub(el, "model", name=c.model_name)
    if (c.chassis, c.port, c.chassis_nr, c.hotplug) != (None, None, None, None):
        _sub(el, "target", chassisNr=_num(c.chassis_nr), chassis=_num(c.chassis),
             port=None if c.port is None else f"{c.port:#x}",
             hotplug=_yn(c.hotplug, "on", "off"))
    _address(el, c.address)


def _interface(parent: _Element, n: Interface) -> None:
    el = _sub(parent, "interface", type=n.type)
    _sub(el, "mac", address=n.mac)
    if n.type == "network":
        _sub(el, "source", network=n.source)
    elif n.type == "bridge":
        _sub(el, "source", bridge=n.source)
    if n.sndbuf is not None:
        _sub(_sub(el, "tune"), "sndbuf", str(n.sndbuf))
    if n.model is not None:
        _sub(el, "model", type=n.model)
    if n.mtu is not None:
        _sub(el, "mtu", size=str(n.mtu))
    if n.virtualport is not None:
        vp = _sub(el, "virtualport", type=n.virtualport.type)
        if n.virtualport.interfaceid is not None or n.virtualport.profileid is not None:
            _sub(vp, "parameters", interfaceid=n.virtualport.interfaceid,
                 profileid=n.virtualport.profileid)
    _address(el, n.address)


def _chardev(parent: _Element, kind: str, c: CharDev) -> None:
    el = _sub(parent, kind, type=c.type)
    if c.type == "unix":
        _sub(el, "source", mode=c.source_mode, path=c.source_path)
    elif c.type == "file":
        _sub(el, "source", path=c.source_path, append=_yn(c.append, "on", "off"))
    elif c.type == "tcp":
        _sub(el, "source", mode=c.source_mode, host=c.host, service=_num(c.service))
        _sub(el, "protocol", type=c.protocol)
    if kind == "channel":
        _sub(el, "target", type=c.target_type, name=c.target_name)
    else:
        tgt = _sub(el, "target", type=c.target_type, port=_num(c.target_port))
        if c.target_model is not None:
            _sub(tgt, "model", name=c.target_model)
    _address(el, c.address)


def _numa_tunes(root: _Element, d: Domain) -> None:
    """``<cputune>`` and ``<numatune>`` (libvirt's place: after ``<iothreads>``)."""
    if d.cputune is not None:
        ct = _sub(root, "cputune")
        for vcpu, cpuset in d.cputune.vcpupins:
            _sub(ct, "vcpupin", vcpu=str(vcpu), cpuset=cpuset)
        if d.cputune.emulatorpin is not None:
            _sub(ct, "emulatorpin", cpuset=d.cputune.emulatorpin)
        for iothread, cpuset in d.cputune.iothreadpins:
            _sub(ct, "iothreadpin", iothread=str(iothread), cpuset=cpuset)
    if d.numatune is not None:
        nt = _sub(root, "numatune")
        if d.numatune.mode is not None:
            _sub(nt, "memory", mode=d.numatune.mode, nodeset=d.numatune.nodeset)
        for mn in d.numatune.memnodes:
            _sub(nt, "memnode", cellid=str(mn.cellid), mode=mn.mode, nodeset=mn.nodeset)


def _memory_backing(root: _Element, d: Domain) -> None:
    if (d.memory_allocation is None and d.prealloc_threads is None and not d.hugepages
            and d.memory_source is None and d.memory_access is None):
        return
    mb = _sub(root, "memoryBacking")
    if d.hugepages:
        hp = _sub(mb, "hugepages")
        if d.hugepage_kib is not None:
            _sub(hp, "page", size=str(d.hugepage_kib), unit="KiB")
    if d.memory_source is not None:
        _sub(mb, "source", type=d.memory_source)
    if d.memory_access is not None:
        _sub(mb, "access", mode=d.memory_access)
    if d.memory_allocation is not None or d.prealloc_threads is not None:
        _sub(mb, "allocation", mode=d.memory_allocation, threads=_num(d.prealloc_threads))


def _features(root: _Element, f: Features) -> None:
    if not (f.acpi or f.apic or f.pae or f.vmport is not None or f.smm is not None or f.kvm
            or f.hyperv_mode is not None):
        return
    fel = _sub(root, "features")
    if f.acpi:
        _sub(fel, "acpi")
    if f.apic:
        _sub(fel, "apic", eoi=_yn(f.apic_eoi, "on", "off"))
    if f.pae:
        _sub(fel, "pae")
    if f.hyperv_mode is not None:
        hv = _sub(fel, "hyperv", mode=f.hyperv_mode)
        for h in f.hyperv:
            hel = _sub(hv, h.name, state=_yn(h.state, "on", "off"), retries=_num(h.retries),
                       value=h.value)
            if h.direct is not None:
                _sub(hel, "direct", state=_yn(h.direct, "on", "off"))
    if f.kvm:
        kel = _sub(fel, "kvm")
        for name, state in f.kvm:
            _sub(kel, name, state=_yn(state, "on", "off"))
    if f.vmport is not None:
        _sub(fel, "vmport", state=_yn(f.vmport, "on", "off"))
    if f.smm is not None:
        _sub(fel, "smm", state=_yn(f.smm, "on", "off"))


def _firmware(os_el: _Element, o: OS) -> None:
    """``<firmware>``, ``<loader>`` and ``<nvram>`` in libvirt's order."""
    if o.firmware_features:
        fw = _sub(os_el, "firmware")
        for name, enabled in o.firmware_features:
            _sub(fw, "feature", enabled=_yn(enabled), name=name)
    if o.loader is not None:
        ld = o.loader
        _sub(os_el, "loader", ld.path, readonly=_yn(ld.readonly), secure=_yn(ld.secure),
             type=ld.type, format=ld.format)
    if o.nvram is not None:
        nv = o.nvram
        _sub(os_el, "nvram", nv.path, template=nv.template, templateFormat=nv.template_format,
             format=nv.format)


def _misc_devices(devs: _Element, d: Domain) -> None:
    """sound, redirdev, watchdog and panic (after rng; libvirt's order differs, harmlessly)."""
    for s in d.sounds:
        sel = _sub(devs, "sound", model=s.model)
        for codec in s.codecs:
            _sub(sel, "codec", type=codec)
        if s.audio_id is not None:
            _sub(sel, "audio", id=str(s.audio_id))
        _address(sel, s.address)
    for r in d.redirdevs:
        rel = _sub(devs, "redirdev", bus=r.bus, type=r.type)
        if r.type == "tcp":
            _sub(rel, "source", mode=r.mode, host=r.host, service=_num(r.service))
            if r.protocol is not None:
                _sub(rel, "protocol", type=r.protocol)
        _address(rel, r.address)
    for w in d.watchdogs:
        wel = _sub(devs, "watchdog", model=w.model, action=w.action)
        _address(wel, w.address)
    for p in d.panics:
        pel = _sub(devs, "panic", model=p.model)
        if p.iobase is not None:
            _sub(pel, "address", type="isa", iobase=f"0x{p.iobase:x}")
    for h in d.hostdevs:
        _hostdev(devs, h)
    for fs in d.filesystems:
        fel = _sub(devs, "filesystem", type="mount", accessmode=fs.accessmode)
        _sub(fel, "driver", type="virtiofs", queue=_num(fs.queue))
        _sub(fel, "source", dir=fs.source_dir)
        _sub(fel, "target", dir=fs.target_dir)
        _address(fel, fs.address)


def _tpms(devs: _Element, d: Domain) -> None:
    """``<tpm>`` (libvirt writes it after the panic notifiers too)."""
    for t in d.tpms:
        tel = _sub(devs, "tpm", model=t.model)
        bel = _sub(tel, "backend", type=t.backend, version=t.version,
                   persistent_state=_yn(t.persistent_state))
        if t.pcr_banks:
            pel = _sub(bel, "active_pcr_banks")
            for bank in t.pcr_banks:
                _sub(pel, bank)


def _graphics(parent: _Element, g: Graphics, migratable: bool) -> None:
    port = g.port
    tls_port = g.tls_port
    if g.autoport and migratable:
        # The ports are this host's runtime choice: the destination picks its own
        # (a TLS port too where the definition asked for one with tlsPort='-1').
        port = None
        tls_port = -1 if tls_port == -1 else None
    port_text = str(port) if port is not None else ("-1" if g.autoport else None)
    el = _sub(parent, "graphics", type=g.type, port=port_text, autoport=_yn(g.autoport),
              tlsPort=_num(tls_port), websocket=_num(g.websocket), listen=g.listen,
              keymap=g.keymap, sharePolicy=g.share_policy,
              defaultMode=g.default_mode)
    if g.listen is not None or g.listen_element:
        _sub(el, "listen", type="address", address=g.listen)
    for opt in g.options:
        _sub(el, opt.element, **dict(opt.attrs))


def _video(parent: _Element, v: Video) -> None:
    el = _sub(parent, "video")
    _sub(el, "model", type=v.model, ram=_num(v.ram), vram=_num(v.vram), vgamem=_num(v.vgamem),
         heads=_num(v.heads), primary=_yn(v.primary))
    _address(el, v.address)


def _indent(el: _Element, level: int = 0) -> None:
    """Indent by two spaces per level, leaving <metadata> content untouched."""
    children = [c for c in el if isinstance(c.tag, str)]
    if not children or el.tag == "metadata":
        return
    pad = "\n" + "  " * (level + 1)
    el.text = pad
    for child in children:
        child.tail = pad
        _indent(child, level + 1)
    children[-1].tail = "\n" + "  " * level


def format_domain(domain: Domain, *, migratable: bool = False) -> str:
    """Return the domain as libvirt-style XML text (no XML declaration).

    ``migratable`` leaves out host-specific runtime state the way libvirt's
    ``VIR_DOMAIN_XML_MIGRATABLE`` does: graphics ports chosen by autoport are
    written as ``port='-1'`` and their ``tlsPort`` is omitted. Everything
    else is identical in both forms (Ferry's model has no other runtime-only
    state: no live ids, aliases or pty paths).

    :raises XMLError: ``domain.metadata`` is not well-formed XML content, or
        a model built in code holds text XML cannot carry (NUL, control
        characters).
    """
    try:
        return _format(domain, migratable)
    except ValueError as exc:  # lxml refuses strings XML cannot represent
        raise XMLError(f"domain {domain.name!r} cannot be written as XML: {exc}") from None


def _format(domain: Domain, migratable: bool) -> str:
    d = domain
    root = etree.Element("domain", type=d.virt_type)
    _sub(root, "name", d.name)
    _sub(root, "uuid", d.uuid)
    if d.title is not None:
        _sub(root, "title", d.title)
    if d.description is not None:
        _sub(root, "description", d.description)
    if d.metadata is not None:
        _metadata(root, d.metadata)
    _sub(root, "memory", str(d.memory_kib), unit="KiB")
    _sub(root, "currentMemory", str(d.current_memory_kib), unit="KiB")
    _memory_backing(root, d)
    _sub(root, "vcpu", str(d.vcpus), placement=d.vcpu_placement, cpuset=d.vcpu_cpuset,
         current=_num(d.vcpus_current))
    if d.iothreads is not None:
        _sub(root, "iothreads", str(d.iothreads))
    _numa_tunes(root, d)

    os_el = _sub(root, "os", firmware=d.os.firmware)
    _sub(os_el, "type", d.os.type, arch=d.os.arch, machine=d.os.machine)
    _firmware(os_el, d.os)
    if d.os.kernel is not None:
        _sub(os_el, "kernel", d.os.kernel)
    if d.os.initrd is not None:
        _sub(os_el, "initrd", d.os.initrd)
    if d.os.cmdline is not None:
        _sub(os_el, "cmdline", d.os.cmdline)
    for dev in d.os.boot_devs:
        _sub(os_el, "boot", dev=dev)
    if d.os.bootmenu is not None or d.os.bootmenu_timeout is not None:
        _sub(os_el, "bootmenu", enable=_yn(d.os.bootmenu), timeout=_num(d.os.bootmenu_timeout))

    _features(root, d.features)

    if d.cpu is not None:
        c = d.cpu
        cel = _sub(root, "cpu", mode=c.mode, match=c.match, check=c.check,
                   migratable=_yn(c.migratable, "on", "off"))
        if c.model is not None or c.fallback is not None:
            _sub(cel, "model", c.model, fallback=c.fallback)
        if c.topology is not None:
            t = c.topology
            _sub(cel, "topology", sockets=str(t.sockets), dies=str(t.dies), cores=str(t.cores),
                 threads=str(t.threads))
        for feat in c.features:
            _sub(cel, "feature", policy=feat.policy, name=feat.name)
        if c.numa:
            nel = _sub(cel, "numa")
            for cell in c.numa:
                _sub(nel, "cell", id=str(cell.id), cpus=cell.cpus or None,
                     memory=str(cell.memory_kib), unit="KiB", memAccess=cell.mem_access,
                     discard=_yn(cell.discard))

    clock = _sub(root, "clock", offset=d.clock.offset)
    for timer in d.clock.timers:
        _sub(clock, "timer", name=timer.name, tickpolicy=timer.tickpolicy, track=timer.track,
             present=_yn(timer.present))
    _sub(root, "on_poweroff", d.on_poweroff)
    _sub(root, "on_reboot", d.on_reboot)
    _sub(root, "on_crash", d.on_crash)
    if d.pm.suspend_to_mem is not None or d.pm.suspend_to_disk is not None:
        pm = _sub(root, "pm")
        if d.pm.suspend_to_mem is not None:
            _sub(pm, "suspend-to-mem", enabled=_yn(d.pm.suspend_to_mem))
        if d.pm.suspend_to_disk is not None:
            _sub(pm, "suspend-to-disk", enabled=_yn(d.pm.suspend_to_disk))

    devs = _sub(root, "devices")
    if d.emulator is not None:
        _sub(devs, "emulator", d.emulator)
    for disk in d.disks:
        _disk(devs, disk)
    for ctl in d.controllers:
        _controller(devs, ctl)
    for nic in d.interfaces:
        _interface(devs, nic)
    for ser in d.serials:
        _chardev(devs, "serial", ser)
    for con in d.consoles:
        _chardev(devs, "console", con)
    for chan in d.channels:
        _chardev(devs, "channel", chan)
    for inp in d.inputs:
        iel = _sub(devs, "input", type=inp.type, bus=inp.bus)
        _address(iel, inp.address)
    for g in d.graphics:
        _graphics(devs, g, migratable)
    for audio in d.audios:
        _sub(devs, "audio", id=str(audio.id), type=audio.type)
    for video in d.videos:
        _video(devs, video)
    mb = _sub(devs, "memballoon", model=d.memballoon.model)
    _address(mb, d.memballoon.address)
    for rng in d.rngs:
        rel = _sub(devs, "rng", model=rng.model)
        if rng.rate_bytes is not None:
            _sub(rel, "rate", bytes=str(rng.rate_bytes), period=_num(rng.rate_period))
        _sub(rel, "backend", rng.backend_path, model=rng.backend_model)
        _address(rel, rng.address)
    _misc_devices(devs, d)
    _tpms(devs, d)

    _indent(root)
    return etree.tostring(root, encoding="unicode") + "\n"


def _hostdev(devs: _Element, h: Hostdev) -> None:
    hel = _sub(devs, "hostdev", mode="subsystem", type=h.type, managed=_yn(h.managed))
    if h.driver is not None:
        _sub(hel, "driver", name=h.driver)
    src = _sub(hel, "source")
    if h.pci_addr is not None:
        d, b, s, f = h.pci_addr
        _sub(src, "address", domain=f"0x{d:04x}", bus=f"0x{b:02x}", slot=f"0x{s:02x}",
             function=f"0x{f:x}")
    if h.vendor is not None and h.product is not None:
        _sub(src, "vendor", id=f"0x{h.vendor:04x}")
        _sub(src, "product", id=f"0x{h.product:04x}")
    if h.usb_bus is not None and h.usb_device is not None:
        _sub(src, "address", bus=str(h.usb_bus), device=str(h.usb_device))
    _address(hel, h.address)
