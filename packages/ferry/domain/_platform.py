"""The guest platform: ``<os>``, ``<cpu>``, ``<features>``, ``<clock>`` and ``<pm>``."""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._checks import Loc, check_host_path, check_safe_text, fail
from ferry.domain._context import Ctx
from ferry.domain._values import (
    MAX_VCPUS,
    all_of,
    enum,
    get,
    ident,
    int_attr,
    one,
    text,
    yes_no,
)
from ferry.domain.model import OS, PM, Clock, Cpu, CpuFeature, CpuTopology, Features, Timer
from ferry.errors import XMLUnsupported

__all__ = ["parse_clock", "parse_cpu", "parse_features", "parse_os", "parse_pm"]

MACHINE_RE = re.compile(r"^(pc|q35|pc-i440fx-[0-9.]+|pc-q35-[0-9.]+)$")


def parse_os(ctx: Ctx, root: etree._Element, dloc: Loc) -> OS:
    """The ``<os>`` of ``root`` (required): type, machine, kernel, boot order."""
    el = one(root, "os", dloc)
    if el is None:
        raise fail(dloc, "<os> is required")
    loc = ctx.loc(el, "domain/os")
    t = one(el, "type", loc)
    if t is None:
        raise fail(loc, "<os><type> is required")
    tloc = ctx.loc(t, "domain/os/type")
    ostype = text(t).strip()
    if ostype != "hvm":
        raise fail(tloc, f"os type {ostype!r} is not supported (supported: hvm)",
                   cls=XMLUnsupported)
    arch = enum(t, "arch", tloc, ("x86_64", "i686"), default="x86_64", what="architecture")
    machine = get(t, "machine") or "pc"
    if not MACHINE_RE.fullmatch(machine):
        raise fail(tloc, f"machine type {machine!r} is not supported (supported: pc, q35, "
                         "pc-i440fx-*, pc-q35-*)", cls=XMLUnsupported)

    def path_of(tag: str) -> str | None:
        k = one(el, tag, loc)
        if k is None:
            return None
        return check_host_path(text(k).strip(), ctx.loc(k, f"domain/os/{tag}"), tag)

    kernel = path_of("kernel")
    initrd = path_of("initrd")
    cmdline = None
    c = one(el, "cmdline", loc)
    if c is not None:
        cmdline = check_safe_text(text(c), ctx.loc(c, "domain/os/cmdline"), "cmdline")
    if (initrd or cmdline) and not kernel:
        raise fail(loc, "<initrd> and <cmdline> need a <kernel>")

    boot_devs: list[str] = []
    for b in all_of(el, "boot"):
        bloc = ctx.loc(b, "domain/os/boot")
        dev = enum(b, "dev", bloc, ("hd", "cdrom", "network"), what="boot device")
        if dev is None:
            raise fail(bloc, "<boot> needs a dev attribute")
        if dev in boot_devs:
            raise fail(bloc, f"boot device {dev!r} is listed twice")
        boot_devs.append(dev)
    if not boot_devs and kernel is None:
        boot_devs.append("hd")  # libvirt's default when nothing says how to boot
    bootmenu = timeout = None
    bm = one(el, "bootmenu", loc)
    if bm is not None:
        bmloc = ctx.loc(bm, "domain/os/bootmenu")
        bootmenu = yes_no(bm, "enable", bmloc)
        timeout = int_attr(bm, "timeout", bmloc, hi=65535)
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
    )


def parse_cpu(ctx: Ctx, el: etree._Element, vcpus: int) -> Cpu:
    """A ``<cpu>``: mode, model, features, topology (which must give ``vcpus``)."""
    loc = ctx.loc(el, "domain/cpu")
    mode = enum(el, "mode", loc, ("custom", "host-model", "host-passthrough", "maximum"),
                default="custom", what="cpu mode")
    match = enum(el, "match", loc, ("minimum", "exact", "strict"))
    check = enum(el, "check", loc, ("none", "partial", "full"))
    migratable = yes_no(el, "migratable", loc, yes="on", no="off")
    if migratable is not None and mode not in ("host-passthrough", "maximum"):
        raise fail(loc, "migratable is only valid for host-passthrough and maximum")
    model = fallback = None
    m = one(el, "model", loc)
    if m is not None:
        mloc = ctx.loc(m, "domain/cpu/model")
        fallback = enum(m, "fallback", mloc, ("allow", "forbid"))
        name = text(m).strip()
        if name:
            model = ident(name, mloc, "CPU model")
    features: list[CpuFeature] = []
    seen: set[str] = set()
    for f in all_of(el, "feature"):
        floc = ctx.loc(f, "domain/cpu/feature")
        fname = get(f, "name")
        if fname is None:
            raise fail(floc, "<feature> needs a name")
        fname = ident(fname, floc, "CPU feature name")
        if fname in seen:
            raise fail(floc, f"CPU feature {fname!r} is listed twice")
        seen.add(fname)
        policy = enum(f, "policy", floc, ("force", "require", "optional", "disable", "forbid"),
                      default="require", what="feature policy")
        features.append(CpuFeature(fname, cast(Any, policy)))
    topology = None
    t = one(el, "topology", loc)
    if t is not None:
        tloc = ctx.loc(t, "domain/cpu/topology")
        vals = {k: int_attr(t, k, tloc, lo=1, hi=MAX_VCPUS) for k in
                ("sockets", "dies", "cores", "threads")}
        topology = CpuTopology(
            sockets=vals["sockets"] or 1, dies=vals["dies"] or 1,
            cores=vals["cores"] or 1, threads=vals["threads"] or 1,
        )
        product = topology.sockets * topology.dies * topology.cores * topology.threads
        if product != vcpus:
            raise fail(tloc, f"topology gives {product} vCPUs but <vcpu> says {vcpus}")
    return Cpu(
        mode=cast(Any, mode), match=match, check=check, migratable=migratable,
        model=model, fallback=fallback, features=tuple(features), topology=topology,
    )


def parse_features(ctx: Ctx, el: etree._Element) -> Features:
    """``<features>``: acpi, apic, pae."""
    loc = ctx.loc(el, "domain/features")
    apic = one(el, "apic", loc)
    eoi = None
    if apic is not None:
        eoi = yes_no(apic, "eoi", ctx.loc(apic, "domain/features/apic"), yes="on", no="off")
    return Features(
        acpi=one(el, "acpi", loc) is not None,
        apic=apic is not None,
        apic_eoi=eoi,
        pae=one(el, "pae", loc) is not None,
    )


def parse_clock(ctx: Ctx, el: etree._Element) -> Clock:
    """``<clock>``: offset and timers."""
    loc = ctx.loc(el, "domain/clock")
    offset = enum(el, "offset", loc, ("utc", "localtime"), default="utc", what="clock offset")
    timers: list[Timer] = []
    seen: set[str] = set()
    for t in all_of(el, "timer"):
        tloc = ctx.loc(t, "domain/clock/timer")
        name = enum(t, "name", tloc, ("rtc", "pit", "hpet", "kvmclock"), what="timer")
        if name is None:
            raise fail(tloc, "<timer> needs a name")
        if name in seen:
            raise fail(tloc, f"timer {name!r} is listed twice")
        seen.add(name)
        present = yes_no(t, "present", tloc)
        # kvm-pit knows only delay and discard as lost tick policies.
        policies = {"rtc": ("catchup", "delay"), "pit": ("delay", "discard"),
                    "hpet": (), "kvmclock": ()}[name]
        tickpolicy = enum(t, "tickpolicy", tloc, policies, what=f"{name} tickpolicy")
        track = enum(t, "track", tloc, ("guest", "wall", "realtime") if name == "rtc" else (),
                     what=f"{name} track")
        timers.append(Timer(name, present, tickpolicy, track))
    return Clock(offset=cast(Any, offset), timers=tuple(timers))


def parse_pm(ctx: Ctx, el: etree._Element) -> PM:
    """``<pm>``: suspend to memory and to disk."""
    loc = ctx.loc(el, "domain/pm")
    values: dict[str, bool | None] = {}
    for tag in ("suspend-to-mem", "suspend-to-disk"):
        s = one(el, tag, loc)
        values[tag] = None if s is None else yes_no(s, "enabled", ctx.loc(s, f"domain/pm/{tag}"))
    return PM(suspend_to_mem=values["suspend-to-mem"], suspend_to_disk=values["suspend-to-disk"])

