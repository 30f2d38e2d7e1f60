"""The children of ``<domain>``: identity, memory, vCPUs, platform, lifecycle, devices.

The typed parse runs the :data:`SECTIONS` in order; each reads its elements
of the root and sets :class:`~ferry.domain.model.Domain` fields. A section
may read the fields of the sections before it (the cpu topology checks the
vCPU count, the devices need the machine type): a field is missing when its
section had problems, and what depends on it is then not checked. A section
with problems does not stop the others: every problem is recorded.
Supporting a new child of ``<domain>`` takes its entry in
:data:`~ferry.domain._schema.SCHEMA`, one small section function here and its
place in :data:`SECTIONS`.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from typing import Any, Literal, cast

from lxml import etree

from ferry.domain._checks import check_name, check_safe_text, fail, normalise_uuid
from ferry.domain._context import Ctx
from ferry.domain._cross import cross_checks
from ferry.domain._devices import Devices, parse_devices
from ferry.domain._numa import check_cells, parse_cputune, parse_numatune
from ferry.domain._platform import parse_clock, parse_cpu, parse_features, parse_os, parse_pm
from ferry.domain._values import MAX_VCPUS, enum, get, int_attr, memory, one, text, uint
from ferry.domain.model import PM, Clock, Domain, Features
from ferry.errors import XMLUnsupported

__all__ = ["SECTIONS", "parse_top"]

#: The Domain fields found so far, by name.
Fields = dict[str, Any]
#: ``(ctx, root, fields)``: read some children of ``root`` into ``fields``.
Section = Callable[[Ctx, etree._Element, Fields], None]

_CPUSET_RE = re.compile(r"^\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*$")


def _child(ctx: Ctx, root: etree._Element, tag: str) -> etree._Element | None:
    return one(ctx, root, tag, ctx.loc(root, "domain"))


def _virt_type(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    loc = ctx.loc(root, "domain")
    virt_type = cast(Literal["kvm", "qemu"], enum(root, "type", loc, ("kvm", "qemu"),
                                                  what="domain type"))
    if virt_type is None:
        raise fail(loc, "the domain type attribute (kvm or qemu) is required",
                   hint="add type='kvm' to <domain>")
    f["virt_type"] = virt_type


def _name(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "name")
    if el is None:
        raise fail(ctx.loc(root, "domain"), "<name> is required", hint="add <name>…</name>")
    f["name"] = check_name(text(el), ctx.loc(el, "domain/name"))


def _uuid(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "uuid")
    f["uuid"] = (normalise_uuid(text(el), ctx.loc(el, "domain/uuid")) if el is not None
                 else str(uuidlib.uuid4()))


def _title(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "title")
    f["title"] = (check_safe_text(text(el), ctx.loc(el, "domain/title"), "title")
                  if el is not None else None)


def _description(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "description")
    f["description"] = (check_safe_text(text(el), ctx.loc(el, "domain/description"),
                                        "description", newlines=True)
                        if el is not None else None)


def _metadata(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "metadata")
    f["metadata"] = _verbatim(el) if el is not None else None


def _verbatim(el: etree._Element) -> str:
    """The content of <metadata> serialised verbatim (namespaces declared in place)."""
    parts = [el.text or ""]
    for child in el:
        parts.append(etree.tostring(child, encoding="unicode", with_tail=True))
    return "".join(parts)


def _memory(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "memory")
    if el is None:
        raise fail(ctx.loc(root, "domain"), "<memory> is required",
                   hint="add <memory unit='MiB'>1024</memory>")
    f["memory_kib"] = memory(el, ctx.loc(el, "domain/memory"), "memory")


def _current_memory(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    memory_kib: int | None = f.get("memory_kib")
    current_kib = memory_kib
    el = _child(ctx, root, "currentMemory")
    if el is not None:
        cloc = ctx.loc(el, "domain/currentMemory")
        current_kib = memory(el, cloc, "currentMemory")
        if memory_kib is not None and current_kib > memory_kib:
            raise fail(cloc, f"currentMemory {current_kib} KiB is larger than "
                             f"memory {memory_kib} KiB", kind="conflict",
                       hint="make currentMemory at most memory, or remove it")
    f["current_memory_kib"] = current_kib


def _memory_backing(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    allocation: Literal["immediate", "ondemand"] | None = None
    prealloc_threads = source = access = hugepage_kib = None
    hugepages = False
    mb = _child(ctx, root, "memoryBacking")
    if mb is not None:
        mbloc = ctx.loc(mb, "domain/memoryBacking")
        al = one(ctx, mb, "allocation", mbloc)
        if al is not None:
            aloc = ctx.loc(al, "domain/memoryBacking/allocation")
            allocation = cast(Literal["immediate", "ondemand"] | None,
                              ctx.guard(enum, al, "mode", aloc, ("immediate", "ondemand")))
            prealloc_threads = ctx.guard(int_attr, al, "threads", aloc, lo=1, hi=1024)
        src = one(ctx, mb, "source", mbloc)
        if src is not None:
            # type='file' needs a memory backing directory on the host: not done.
            source = ctx.guard(enum, src, "type", ctx.loc(src, "domain/memoryBacking/source"),
                               ("anonymous", "memfd"), default="anonymous",
                               what="memory source type")
        acc = one(ctx, mb, "access", mbloc)
        if acc is not None:
            access = ctx.guard(enum, acc, "mode", ctx.loc(acc, "domain/memoryBacking/access"),
                               ("shared", "private"), default="private",
                               what="memory access mode")
        hp = one(ctx, mb, "hugepages", mbloc)
        if hp is not None:
            hugepages = True
            hugepage_kib = ctx.guard(_hugepage_size, ctx, hp)
    f["memory_allocation"] = allocation
    f["prealloc_threads"] = prealloc_threads
    f["memory_source"] = source
    f["memory_access"] = access
    f["hugepages"] = hugepages
    f["hugepage_kib"] = hugepage_kib


#: Huge page sizes of x86_64, in KiB.
_HUGEPAGE_KIB = (2048, 1048576)


def _hugepage_size(ctx: Ctx, hp: etree._Element) -> int | None:
    """The one ``<page size>`` of ``<hugepages>`` in KiB (None: the host's default)."""
    page = one(ctx, hp, "page", ctx.loc(hp, "domain/memoryBacking/hugepages"))
    if page is None:
        return None
    ploc = ctx.loc(page, "domain/memoryBacking/hugepages/page")
    size = get(page, "size")
    if size is None:
        raise fail(ploc, "<page> needs a size", hint="add size='2' unit='MiB'")
    scaled = etree.Element("page", unit=get(page, "unit") or "KiB")
    scaled.text = size
    kib = memory(scaled, ploc, "huge page size")
    if kib not in _HUGEPAGE_KIB:
        raise fail(ploc, f"huge page size {kib} KiB is not one of x86_64's (2048, 1048576 KiB)",
                   cls=XMLUnsupported, hint="use size='2' unit='MiB' or size='1' unit='GiB'")
    return kib


def _iothreads(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "iothreads")
    f["iothreads"] = None if el is None else uint(
        text(el), ctx.loc(el, "domain/iothreads"), "iothreads count", lo=0, hi=64)


def _vcpu(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "vcpu")
    if el is None:
        f.update(vcpus=1, vcpu_placement=None, vcpu_cpuset=None)
        return
    vloc = ctx.loc(el, "domain/vcpu")
    vcpus = ctx.guard(uint, text(el), vloc, "vcpu count", lo=1, hi=MAX_VCPUS)
    if vcpus is not None:  # the cpu topology is checked against it
        f["vcpus"] = vcpus
    current = ctx.guard(int_attr, el, "current", vloc, lo=1, hi=MAX_VCPUS)
    if current is not None and vcpus is not None and current > vcpus:
        ctx.report(vloc, f"current vCPUs {current} is more than the maximum {vcpus}",
                   kind="conflict", hint="make current at most the <vcpu> count")
        current = None
    f["vcpus_current"] = current
    f["vcpu_placement"] = ctx.guard(enum, el, "placement", vloc, ("static", "auto"))
    cpuset = get(el, "cpuset")
    if cpuset is not None and not _CPUSET_RE.fullmatch(cpuset):
        raise fail(vloc, f"invalid cpuset {cpuset!r}", attribute="cpuset",
                   hint="use a list of CPUs and ranges such as 0-3,8,^2")
    f["vcpu_cpuset"] = cpuset


def _os(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    f["os"] = parse_os(ctx, root, ctx.loc(root, "domain"))


def _cpu(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "cpu")
    f["cpu"] = parse_cpu(ctx, el, f.get("vcpus")) if el is not None else None


def _numa(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    """``<numatune>`` and ``<cputune>``, and the NUMA cells' memory against ``<memory>``."""
    cells = None
    if "cpu" in f:  # None: no <cpu>, so no cells; missing: <cpu> had problems
        cells = f["cpu"].numa if f["cpu"] is not None else ()
    if cells is not None:
        check_cells(ctx, root, cells, f.get("memory_kib"))
    el = _child(ctx, root, "numatune")
    f["numatune"] = None if el is None else ctx.guard(parse_numatune, ctx, el, cells)
    el = _child(ctx, root, "cputune")
    iothreads = (f["iothreads"] or 0) if "iothreads" in f else None
    f["cputune"] = None if el is None else ctx.guard(parse_cputune, ctx, el, f.get("vcpus"),
                                                     iothreads)


def _features(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "features")
    f["features"] = parse_features(ctx, el) if el is not None else Features()


def _clock(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "clock")
    f["clock"] = parse_clock(ctx, el) if el is not None else Clock()


def _pm(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "pm")
    f["pm"] = parse_pm(ctx, el) if el is not None else PM()


_ACTIONS = ("destroy", "restart", "preserve", "rename-restart")
_LIFECYCLE: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("on_poweroff", "destroy", _ACTIONS),
    ("on_reboot", "restart", _ACTIONS),
    ("on_crash", "destroy", (*_ACTIONS, "coredump-destroy", "coredump-restart")),
)


def _lifecycle(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    for tag, default, choices in _LIFECYCLE:
        el = _child(ctx, root, tag)
        value = default
        if el is not None:
            value = text(el).strip()
            if value not in choices:
                ctx.report(ctx.loc(el, f"domain/{tag}"),
                           f"{tag} action {value!r} is not supported (supported: "
                           f"{', '.join(choices)})", cls=XMLUnsupported,
                           hint=f"use one of: {', '.join(choices)}")
        f[tag] = value


def _devices(ctx: Ctx, root: etree._Element, f: Fields) -> None:
    el = _child(ctx, root, "devices")
    if el is None:
        devices = Devices()
    else:
        devices = parse_devices(ctx, el, f.get("os"))
        cross_checks(ctx, el, devices, f.get("os"))
        _iothread_refs(ctx, devices, f.get("iothreads"))
    f.update(devices.fields())


def _iothread_refs(ctx: Ctx, devices: Devices, iothreads: int | None) -> None:
    """A disk's ``<driver iothread=K>`` names one of the ``<iothreads>``."""
    for i, d in enumerate(devices.disks):
        if d.iothread is None:
            continue
        el = devices.element("disk", i)
        if el is None:  # pragma: no cover (a parsed disk has its element)
            continue
        loc = ctx.loc(el, "domain/devices/disk/driver")
        if d.target_bus != "virtio":
            ctx.report(loc, f"disk {d.target_dev}: iothread applies to virtio disks only",
                       kind="conflict", hint="remove iothread, or use bus='virtio'")
        elif d.iothread > (iothreads or 0):
            ctx.report(loc, f"disk {d.target_dev}: iothread {d.iothread} does not exist "
                            f"(<iothreads> is {iothreads or 0})", kind="conflict",
                       hint=f"add <iothreads>{d.iothread}</iothreads>, or use a smaller iothread")


#: The sections of the typed parse, in the order they run.
SECTIONS: tuple[Section, ...] = (
    _virt_type, _name, _uuid, _title, _description, _metadata, _memory, _current_memory,
    _memory_backing, _vcpu, _iothreads, _os, _cpu, _numa, _features, _clock, _pm, _lifecycle,
    _devices,
)


def parse_top(ctx: Ctx, root: etree._Element) -> Domain | None:
    """The typed parse of a ``<domain>`` after the schema walk.

    Every section runs; the problems are recorded in ``ctx``, and then the
    result is None.
    """
    f: Fields = {}
    for section in SECTIONS:
        ctx.guard(section, ctx, root, f)
    if ctx.failed:
        return None
    return Domain(**f)
