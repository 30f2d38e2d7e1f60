"""The guest platform: ``<os>``, ``<cpu>``, ``<features>``, ``<clock>`` and ``<pm>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from lxml import etree

from ferry.domain._checks import Loc, check_host_path, check_safe_text, fail
from ferry.domain._context import Ctx, Skip
from ferry.domain._numa import parse_cells
from ferry.domain._values import (
    MAX_VCPUS,
    all_of,
    elements,
    enum,
    get,
    ident,
    int_attr,
    one,
    text,
    yes_no,
)
from ferry.domain.model import (
    OS,
    PM,
    Clock,
    Cpu,
    CpuFeature,
    CpuTopology,
    Features,
    HypervFeature,
    Loader,
    Nvram,
    Timer,
)
from ferry.errors import XMLUnsupported

__all__ = ["parse_clock", "parse_cpu", "parse_features", "parse_os", "parse_pm"]

MACHINE_RE = re.compile(r"^(pc|q35|pc-i440fx-[0-9.]+|pc-q35-[0-9.]+)$")


def parse_os(ctx: Ctx, root: etree._Element, dloc: Loc) -> OS:
    """The ``<os>`` of ``root`` (required): type, machine, kernel, boot order."""
    el = one(ctx, root, "os", dloc)
    if el is None:
        raise fail(dloc, "<os> is required", hint="add <os><type arch='x86_64'>hvm</type></os>")
    loc = ctx.loc(el, "domain/os")
    t = one(ctx, el, "type", loc)
    if t is None:
        raise fail(loc, "<os><type> is required", hint="add <type arch='x86_64'>hvm</type>")
    mark = ctx.count
    tloc = ctx.loc(t, "domain/os/type")
    ostype = text(t).strip()
    if ostype != "hvm":
        ctx.report(tloc, f"os type {ostype!r} is not supported (supported: hvm)",
                   cls=XMLUnsupported, hint="use hvm")
    arch = ctx.guard(enum, t, "arch", tloc, ("x86_64", "i686"), default="x86_64",
                     what="architecture")
    machine = get(t, "machine") or "pc"
    if not MACHINE_RE.fullmatch(machine):
        ctx.report(tloc, f"machine type {machine!r} is not supported (supported: pc, q35, "
                         "pc-i440fx-*, pc-q35-*)", cls=XMLUnsupported,
                   hint="use machine='q35' or machine='pc' (or a versioned one)")

    def path_of(tag: str) -> str | None:
        k = one(ctx, el, tag, loc)
        if k is None:
            return None
        return check_host_path(text(k).strip(), ctx.loc(k, f"domain/os/{tag}"), tag)

    paths = ctx.count
    kernel = ctx.guard(path_of, "kernel")
    initrd = ctx.guard(path_of, "initrd")
    cmdline = ctx.guard(_cmdline, ctx, el, loc)
    if (initrd or cmdline) and not kernel and ctx.count == paths:
        ctx.report(loc, "<initrd> and <cmdline> need a <kernel>",
                   hint="add <kernel>, or remove <initrd> and <cmdline>")
    boot_devs = _boot_devs(ctx, el)
    if not boot_devs and kernel is None:
        boot_devs.append("hd")  # libvirt's default when nothing says how to boot
    bootmenu = timeout = None
    bm = one(ctx, el, "bootmenu", loc)
    if bm is not None:
        bmloc = ctx.loc(bm, "domain/os/bootmenu")
        bootmenu = ctx.guard(yes_no, bm, "enable", bmloc)
        timeout = ctx.guard(int_attr, bm, "timeout", bmloc, hi=65535)
    firmware = ctx.guard(_firmware, ctx, root, el, loc, machine)
    if ctx.count != mark or firmware is None:
        raise Skip()
    return OS(
        type="hvm",
        arch=arch or "x86_64",
        machine=machine,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        boot_devs=tuple(boot_devs),
        bootmenu=bootmenu,
        bootmenu_timeout=timeout,
        firmware=cast(Any, firmware.kind),
        firmware_features=firmware.features,
        loader=firmware.loader,
        nvram=firmware.nvram,
    )


@dataclass(frozen=True)
class _Firmware:
    kind: str | None
    features: tuple[tuple[str, bool], ...]
    loader: Loader | None
    nvram: Nvram | None


#: ``<firmware><feature name=…>`` names Ferry matches against the firmware descriptors.
FIRMWARE_FEATURES = ("secure-boot", "enrolled-keys")


def _firmware(ctx: Ctx, root: etree._Element, el: etree._Element, loc: Loc,
              machine: str) -> _Firmware:
    """``<os firmware>``, ``<firmware>``, ``<loader>`` and ``<nvram>``, as libvirt checks them.

    A secure-boot loader needs ``<features><smm state='on'/>`` and a q35
    machine (libvirt refuses it otherwise: without SMM the guest could
    write the variable store behind the firmware's back).
    """
    mark = ctx.count
    kind = ctx.guard(enum, el, "firmware", loc, ("efi", "bios"), what="firmware")
    features = _firmware_features(ctx, el, loc, kind)
    loader = ctx.guard(_loader, ctx, el, loc, kind)
    nvram = ctx.guard(_nvram, ctx, el, loc)
    if ctx.count != mark:
        raise Skip()
    smm_el = root.find("features/smm")
    smm = None if smm_el is None else get(smm_el, "state")
    q35 = machine == "q35" or machine.startswith("pc-q35")
    feats = dict(features)
    if kind == "bios" and (feats or (loader is not None and loader.type == "pflash")
                           or nvram is not None):
        raise fail(loc, "firmware='bios' has no secure boot, pflash loader or NVRAM",
                   kind="conflict", hint="use firmware='efi', or remove <firmware>, "
                                         "<loader type='pflash'> and <nvram>")
    if nvram is not None and kind != "efi" and (loader is None or loader.type == "rom"):
        raise fail(loc.child("nvram"), "<nvram> needs a pflash <loader> or firmware='efi'",
                   kind="conflict", hint="add <loader readonly='yes' type='pflash'>…</loader> "
                                         "or <os firmware='efi'>")
    if kind == "efi" and loader is not None and loader.type == "rom":
        raise fail(loc.child("loader"), "a rom loader with firmware='efi' is not supported "
                   "(Ferry maps UEFI firmware as pflash)", cls=XMLUnsupported,
                   hint="use type='pflash', or leave type out")
    if loader is not None and nvram is not None and loader.type == "rom":
        raise fail(loc.child("nvram"), "a loader of type 'rom' has no NVRAM", kind="conflict",
                   hint="use type='pflash', or remove <nvram>")
    if feats.get("enrolled-keys") and feats.get("secure-boot") is False:
        raise fail(loc.child("firmware"), "firmware feature 'enrolled-keys' needs "
                   "'secure-boot' (it is disabled)", kind="conflict",
                   hint="enable secure-boot, or disable enrolled-keys")
    secure = (loader is not None and loader.secure) or feats.get("secure-boot")
    if secure and smm != "on" and ((loader is not None and loader.secure) or smm == "off"):
        raise fail(loc.child("loader"), "secure boot needs system management mode (SMM): "
                   "without it the guest could write the UEFI variables directly",
                   kind="conflict", hint="add <features><smm state='on'/></features>")
    if secure and not q35:
        raise fail(loc, f"secure boot needs a q35 machine (not {machine!r})",
                   cls=XMLUnsupported, hint="use machine='q35'")
    return _Firmware(kind, features, loader, nvram)


def _firmware_features(ctx: Ctx, el: etree._Element, loc: Loc,
                       kind: str | None) -> tuple[tuple[str, bool], ...]:
    fw = one(ctx, el, "firmware", loc)
    if fw is None:
        return ()
    floc = ctx.loc(fw, "domain/os/firmware")
    if kind != "efi":
        ctx.report(floc, "<firmware> features need <os firmware='efi'>", kind="conflict",
                   hint="add firmware='efi' to <os>, or remove <firmware>")
    out: list[tuple[str, bool]] = []
    for f in all_of(fw, "feature"):
        feloc = ctx.loc(f, "domain/os/firmware/feature")
        name = ctx.guard(enum, f, "name", feloc, FIRMWARE_FEATURES, what="firmware feature")
        enabled = ctx.guard(yes_no, f, "enabled", feloc)
        if name is None or enabled is None:
            if get(f, "name") is None or get(f, "enabled") is None:
                ctx.report(feloc, "<feature> needs name and enabled",
                           hint="e.g. <feature enabled='yes' name='secure-boot'/>")
            continue
        if any(n == name for n, _ in out):
            ctx.report(feloc, f"firmware feature {name!r} is listed twice", hint="list it once")
            continue
        out.append((name, enabled))
    return tuple(out)


def _loader(ctx: Ctx, el: etree._Element, loc: Loc, kind: str | None) -> Loader | None:
    ld = one(ctx, el, "loader", loc)
    if ld is None:
        return None
    lloc = ctx.loc(ld, "domain/os/loader")
    mark = ctx.count
    ltype = ctx.guard(enum, ld, "type", lloc, ("rom", "pflash"), what="loader type")
    readonly = ctx.guard(yes_no, ld, "readonly", lloc)
    secure = ctx.guard(yes_no, ld, "secure", lloc)
    fmt = ctx.guard(enum, ld, "format", lloc, ("raw",), what="loader format")
    raw = text(ld).strip()
    path = ctx.guard(check_host_path, raw, lloc, "loader") if raw else None
    if ctx.count != mark:
        raise Skip()
    if path is None and kind != "efi":
        raise fail(lloc, "<loader> needs the firmware's path (or <os firmware='efi'> to "
                         "choose one)", hint="add the path, e.g. "
                                             "/usr/share/OVMF/OVMF_CODE_4M.fd, or firmware='efi'")
    if ltype == "rom" and secure:
        raise fail(lloc, "a loader of type 'rom' cannot be secure", kind="conflict",
                   hint="use type='pflash'")
    return Loader(path=path, readonly=readonly, secure=secure, type=cast(Any, ltype),
                  format=cast(Any, fmt))


def _nvram(ctx: Ctx, el: etree._Element, loc: Loc) -> Nvram | None:
    nv = one(ctx, el, "nvram", loc)
    if nv is None:
        return None
    nloc = ctx.loc(nv, "domain/os/nvram")
    mark = ctx.count
    raw = text(nv).strip()
    path = ctx.guard(check_host_path, raw, nloc, "nvram") if raw else None
    tpl = get(nv, "template")
    template = ctx.guard(check_host_path, tpl, nloc, "nvram template") if tpl else None
    fmt = ctx.guard(enum, nv, "format", nloc, ("raw",), what="nvram format")
    tfmt = ctx.guard(enum, nv, "templateFormat", nloc, ("raw",), what="nvram templateFormat")
    if ctx.count != mark:
        raise Skip()
    return Nvram(path=path, template=template, format=cast(Any, fmt),
                 template_format=cast(Any, tfmt))


def _cmdline(ctx: Ctx, el: etree._Element, loc: Loc) -> str | None:
    c = one(ctx, el, "cmdline", loc)
    if c is None:
        return None
    return check_safe_text(text(c), ctx.loc(c, "domain/os/cmdline"), "cmdline")


def _boot_devs(ctx: Ctx, el: etree._Element) -> list[str]:
    """The boot order: each <boot dev> once."""
    boot_devs: list[str] = []
    for b in all_of(el, "boot"):
        bloc = ctx.loc(b, "domain/os/boot")
        dev = ctx.guard(enum, b, "dev", bloc, ("hd", "cdrom", "network"), what="boot device")
        if dev is None:
            if get(b, "dev") is None:
                ctx.report(bloc, "<boot> needs a dev attribute", hint="add dev='hd'")
            continue
        if dev in boot_devs:
            ctx.report(bloc, f"boot device {dev!r} is listed twice", hint="list it once")
            continue
        boot_devs.append(dev)
    return boot_devs


def parse_cpu(ctx: Ctx, el: etree._Element, vcpus: int | None) -> Cpu:
    """A ``<cpu>``: mode, model, features, topology (which must give ``vcpus``).

    ``vcpus`` is None when ``<vcpu>`` could not be read (the topology is then
    not compared with it).
    """
    loc = ctx.loc(el, "domain/cpu")
    mark = ctx.count
    mode = ctx.guard(enum, el, "mode", loc, ("custom", "host-model", "host-passthrough",
                                              "maximum"), default="custom", what="cpu mode")
    match = ctx.guard(enum, el, "match", loc, ("minimum", "exact", "strict"))
    check = ctx.guard(enum, el, "check", loc, ("none", "partial", "full"))
    migratable = ctx.guard(yes_no, el, "migratable", loc, yes="on", no="off")
    if migratable is not None and mode is not None \
            and mode not in ("host-passthrough", "maximum"):
        ctx.report(loc, "migratable is only valid for host-passthrough and maximum",
                   hint="remove migratable")
    model_fallback = ctx.guard(_cpu_model, ctx, el, loc)
    features = _cpu_features(ctx, el)
    topology = ctx.guard(_cpu_topology, ctx, el, loc, vcpus)
    numa = ctx.guard(parse_cells, ctx, el, vcpus)
    if model_fallback is None or numa is None or ctx.count != mark:
        raise Skip()
    model, fallback = model_fallback
    return Cpu(
        mode=cast(Any, mode), match=match, check=check, migratable=migratable,
        model=model, fallback=fallback, features=tuple(features), topology=topology,
        numa=numa,
    )


def _cpu_model(ctx: Ctx, el: etree._Element, loc: Loc) -> tuple[str | None, str | None]:
    """The CPU model and its fallback."""
    model = fallback = None
    m = one(ctx, el, "model", loc)
    if m is not None:
        mloc = ctx.loc(m, "domain/cpu/model")
        fallback = enum(m, "fallback", mloc, ("allow", "forbid"))
        name = text(m).strip()
        if name:
            model = ident(name, mloc, "CPU model")
    return model, fallback


def _cpu_features(ctx: Ctx, el: etree._Element) -> list[CpuFeature]:
    seen: set[str] = set()
    found = (ctx.guard(_cpu_feature, ctx, f, seen) for f in all_of(el, "feature"))
    return [f for f in found if f is not None]


def _cpu_feature(ctx: Ctx, f: etree._Element, seen: set[str]) -> CpuFeature:
    floc = ctx.loc(f, "domain/cpu/feature")
    fname = get(f, "name")
    if fname is None:
        raise fail(floc, "<feature> needs a name", hint="add name='…' (a CPU flag)")
    fname = ident(fname, floc, "CPU feature name")
    if fname in seen:
        raise fail(floc, f"CPU feature {fname!r} is listed twice", hint="list it once")
    seen.add(fname)
    policy = enum(f, "policy", floc, ("force", "require", "optional", "disable", "forbid"),
                  default="require", what="feature policy")
    return CpuFeature(fname, cast(Any, policy))


def _cpu_topology(
    ctx: Ctx, el: etree._Element, loc: Loc, vcpus: int | None
) -> CpuTopology | None:
    t = one(ctx, el, "topology", loc)
    if t is None:
        return None
    tloc = ctx.loc(t, "domain/cpu/topology")
    vals = {k: int_attr(t, k, tloc, lo=1, hi=MAX_VCPUS) for k in
            ("sockets", "dies", "cores", "threads")}
    topology = CpuTopology(
        sockets=vals["sockets"] or 1, dies=vals["dies"] or 1,
        cores=vals["cores"] or 1, threads=vals["threads"] or 1,
    )
    product = topology.sockets * topology.dies * topology.cores * topology.threads
    if vcpus is not None and product != vcpus:
        raise fail(tloc, f"topology gives {product} vCPUs but <vcpu> says {vcpus}",
                   kind="conflict", hint="make sockets * dies * cores * threads equal <vcpu>")
    return topology


def parse_features(ctx: Ctx, el: etree._Element) -> Features:
    """``<features>``: acpi, apic, pae, vmport, smm, kvm, hyperv."""
    loc = ctx.loc(el, "domain/features")
    mark = ctx.count
    apic = one(ctx, el, "apic", loc)
    eoi = None
    if apic is not None:
        eoi = ctx.guard(yes_no, apic, "eoi", ctx.loc(apic, "domain/features/apic"),
                        yes="on", no="off")
    switches: dict[str, bool | None] = {}
    for tag in ("vmport", "smm"):
        sw = one(ctx, el, tag, loc)
        switches[tag] = None if sw is None else ctx.guard(
            _state, ctx, sw, f"domain/features/{tag}")
    kvm = one(ctx, el, "kvm", loc)
    kvm_features = () if kvm is None else _kvm_features(ctx, kvm)
    hv = one(ctx, el, "hyperv", loc)
    hv_mode = None
    hv_features: tuple[HypervFeature, ...] = ()
    if hv is not None:
        hv_mode = ctx.guard(enum, hv, "mode", ctx.loc(hv, "domain/features/hyperv"),
                            ("custom", "passthrough"), default="custom", what="hyperv mode")
        hv_features = _hyperv_features(ctx, hv)
    if ctx.count != mark:
        raise Skip()
    return Features(
        acpi=one(ctx, el, "acpi", loc) is not None,
        apic=apic is not None,
        apic_eoi=eoi,
        pae=one(ctx, el, "pae", loc) is not None,
        vmport=switches["vmport"],
        smm=switches["smm"],
        kvm=kvm_features,
        hyperv_mode=cast(Any, hv_mode),
        hyperv=hv_features,
    )


def _state(ctx: Ctx, el: etree._Element, path: str) -> bool:
    """The required ``state='on|off'`` of a feature switch."""
    loc = ctx.loc(el, path)
    state = yes_no(el, "state", loc, yes="on", no="off")
    if state is None:
        raise fail(loc, f"<{el.tag}> needs state='on' or state='off'", hint="add state='on'")
    return state


def _kvm_features(ctx: Ctx, kvm: etree._Element) -> tuple[tuple[str, bool], ...]:
    """``<kvm>`` children: hidden, hint-dedicated, poll-control, pv-ipi."""
    out: list[tuple[str, bool]] = []
    for child in elements(kvm):
        tag = str(child.tag)
        if any(name == tag for name, _ in out):
            ctx.report(ctx.loc(child, f"domain/features/kvm/{tag}"),
                       f"<{tag}> appears more than once", hint=f"keep one <{tag}>")
            continue
        state = ctx.guard(_state, ctx, child, f"domain/features/kvm/{tag}")
        if state is not None:
            out.append((tag, state))
    return tuple(out)


#: spinlocks retries: libvirt's bounds.
_SPINLOCK_RETRIES = (4095, 0xFFFFFFFF)
_VENDOR_ID_RE = re.compile(r"^[A-Za-z0-9_ -]{1,12}$")


def _hyperv_features(ctx: Ctx, hv: etree._Element) -> tuple[HypervFeature, ...]:
    out: list[HypervFeature] = []
    for child in elements(hv):
        found = ctx.guard(_hyperv_feature, ctx, child, {f.name for f in out})
        if found is not None:
            out.append(found)
    return tuple(out)


def _hyperv_feature(ctx: Ctx, child: etree._Element, seen: set[str]) -> HypervFeature:
    tag = str(child.tag)
    path = f"domain/features/hyperv/{tag}"
    loc = ctx.loc(child, path)
    if tag in seen:
        raise fail(loc, f"<{tag}> appears more than once", hint=f"keep one <{tag}>")
    state = _state(ctx, child, path)
    retries = value = direct = None
    if tag == "spinlocks" and state:
        lo, hi = _SPINLOCK_RETRIES
        retries = int_attr(child, "retries", loc, lo=lo, hi=hi)
        if retries is None:
            raise fail(loc, "<spinlocks state='on'> needs retries", hint="add retries='8191'")
    elif tag == "vendor_id" and state:
        raw = get(child, "value")
        if raw is None or not _VENDOR_ID_RE.fullmatch(raw):
            raise fail(loc, "<vendor_id state='on'> needs a value of 1 to 12 letters or digits",
                       hint="add value='KVMKVMKVM'")
        value = raw
    elif tag == "stimer":
        d = one(ctx, child, "direct", loc)
        if d is not None:
            direct = _state(ctx, d, f"{path}/direct")
    for attr, owner in (("retries", "spinlocks"), ("value", "vendor_id")):
        if get(child, attr) is not None and (tag != owner or not state):
            raise fail(loc, f"{attr} applies to <{owner} state='on'> only",
                       hint=f"remove {attr}")
    return HypervFeature(tag, state, retries=retries, value=value, direct=direct)


def parse_clock(ctx: Ctx, el: etree._Element) -> Clock:
    """``<clock>``: offset and timers."""
    loc = ctx.loc(el, "domain/clock")
    mark = ctx.count
    offset = ctx.guard(enum, el, "offset", loc, ("utc", "localtime"), default="utc",
                       what="clock offset")
    seen: set[str] = set()
    found = (ctx.guard(_timer, ctx, t, seen) for t in all_of(el, "timer"))
    timers = [t for t in found if t is not None]
    if ctx.count != mark:
        raise Skip()
    return Clock(offset=cast(Any, offset), timers=tuple(timers))


def _timer(ctx: Ctx, t: etree._Element, seen: set[str]) -> Timer:
    tloc = ctx.loc(t, "domain/clock/timer")
    name = enum(t, "name", tloc, ("rtc", "pit", "hpet", "kvmclock", "hypervclock"),
                what="timer")
    if name is None:
        raise fail(tloc, "<timer> needs a name",
                   hint="add name='rtc' (or pit, hpet, kvmclock, hypervclock)")
    if name in seen:
        raise fail(tloc, f"timer {name!r} is listed twice", hint="list it once")
    seen.add(name)
    present = yes_no(t, "present", tloc)
    # kvm-pit knows only delay and discard as lost tick policies.
    policies = {"rtc": ("catchup", "delay"), "pit": ("delay", "discard"),
                "hpet": (), "kvmclock": (), "hypervclock": ()}[name]
    tickpolicy = enum(t, "tickpolicy", tloc, policies, what=f"{name} tickpolicy")
    track = enum(t, "track", tloc, ("guest", "wall", "realtime") if name == "rtc" else (),
                 what=f"{name} track")
    return Timer(name, present, tickpolicy, track)


def parse_pm(ctx: Ctx, el: etree._Element) -> PM:
    """``<pm>``: suspend to memory and to disk."""
    loc = ctx.loc(el, "domain/pm")
    mark = ctx.count
    values: dict[str, bool | None] = {}
    for tag in ("suspend-to-mem", "suspend-to-disk"):
        s = one(ctx, el, tag, loc)
        values[tag] = None if s is None else ctx.guard(
            yes_no, s, "enabled", ctx.loc(s, f"domain/pm/{tag}"))
    if ctx.count != mark:
        raise Skip()
    return PM(suspend_to_mem=values["suspend-to-mem"], suspend_to_disk=values["suspend-to-disk"])
