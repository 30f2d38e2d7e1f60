"""Guest NUMA and host placement: ``<cpu><numa>``, ``<numatune>`` and ``<cputune>``.

A cpuset (``cpus`` of a cell, ``nodeset``, ``cpuset``) is libvirt's list
syntax: numbers and ranges separated by commas, ``^N`` taking a number out
again (``0-3,^2,8``). The model keeps it normalised (:func:`format_cpuset`:
``0-1,3,8``), as libvirt's dumpxml does.

What is checked here is what the XML alone decides: cells numbered 0..N-1,
each vCPU in exactly one cell, cell memory adding up to ``<memory>``, a
``<memnode>`` naming an existing cell, a ``<vcpupin>`` an existing vCPU. The
host's side (does it have those NUMA nodes and CPUs?) is checked when qemu
starts, on each host of a migration (:mod:`ferry.domain._argv_numa`,
:mod:`ferry.pinning`).
"""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx, Skip
from ferry.domain._values import all_of, elements, enum, get, int_attr, memory, one
from ferry.domain.model import CpuTune, NumaCell, NumaMemNode, NumaTune
from ferry.errors import XMLUnsupported

__all__ = [
    "MAX_CPU_ID",
    "check_cells",
    "format_cpuset",
    "parse_cells",
    "parse_cpuset",
    "parse_cputune",
    "parse_numatune",
]

#: The largest CPU or node number a cpuset may name (libvirt's mask length is 8192 bits).
MAX_CPU_ID = 8191

_ITEM_RE = re.compile(r"^(\^?)([0-9]+)(?:-([0-9]+))?$")


def parse_cpuset(value: str, *, allow_empty: bool = False) -> frozenset[int]:
    """The numbers of a cpuset text such as ``0-3,^2,8``.

    :raises ValueError: a malformed item, a range that runs backwards, a
        number above :data:`MAX_CPU_ID`, or (unless ``allow_empty``) a
        cpuset that names nothing; the message says which.
    """
    out: set[int] = set()
    text = "".join(value.split())
    if not text:
        if allow_empty:
            return frozenset()
        raise ValueError("the cpuset is empty")
    excluded: set[int] = set()
    for item in text.split(","):
        m = _ITEM_RE.fullmatch(item)
        if m is None:
            raise ValueError(f"{item!r} is not a number or a range N-M")
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if hi < lo:
            raise ValueError(f"range {item!r} runs backwards")
        if hi > MAX_CPU_ID:
            raise ValueError(f"{hi} is larger than {MAX_CPU_ID}")
        (excluded if m.group(1) else out).update(range(lo, hi + 1))
    result = frozenset(out - excluded)
    if not result and not allow_empty:
        raise ValueError("the cpuset names no CPU")
    return result


def format_cpuset(numbers: frozenset[int] | set[int]) -> str:
    """``numbers`` as a normalised cpuset: ascending ranges, ``0-3,8``."""
    parts: list[str] = []
    run: list[int] = []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            parts.append(_run(run))
        run = [n]
    if run:
        parts.append(_run(run))
    return ",".join(parts)


def _run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def _cpuset_attr(el: etree._Element, name: str, loc: Loc, what: str,
                 *, allow_empty: bool = False) -> str | None:  # fmt: skip
    """Attribute ``name`` as a normalised cpuset, None when absent."""
    raw = get(el, name)
    if raw is None:
        return None
    try:
        return format_cpuset(parse_cpuset(raw, allow_empty=allow_empty))
    except ValueError as exc:
        raise fail(
            loc,
            f"invalid {what} {raw!r}: {exc}",
            attribute=name,
            hint="use numbers and ranges such as 0-3,8 (^N leaves N out)",
        ) from None


# -- <cpu><numa> ----------------------------------------------------------------


def parse_cells(ctx: Ctx, cpu: etree._Element, vcpus: int | None) -> tuple[NumaCell, ...]:
    """The ``<numa>`` cells of ``<cpu>`` (empty without ``<numa>``).

    Each vCPU (0..``vcpus``-1) must be in exactly one cell; ``vcpus`` None
    (unreadable ``<vcpu>``) skips that check.
    """
    numa = one(ctx, cpu, "numa", ctx.loc(cpu, "domain/cpu"))
    if numa is None:
        return ()
    nloc = ctx.loc(numa, "domain/cpu/numa")
    mark = ctx.count
    cells: list[NumaCell] = []
    owner: dict[int, int] = {}
    for i, el in enumerate(all_of(numa, "cell")):
        cell = ctx.guard(_cell, ctx, el, i, vcpus, owner)
        if cell is not None:
            cells.append(cell)
    if not all_of(numa, "cell"):
        ctx.report(
            nloc,
            "<numa> needs at least one <cell>",
            hint="add <cell id='0' cpus='0-1' memory='1' unit='GiB'/>",
        )
    if ctx.count != mark:
        raise Skip()
    if vcpus is not None:
        missing = set(range(vcpus)) - set(owner)
        if missing:
            raise fail(
                nloc,
                f"vCPUs {format_cpuset(missing)} are in no NUMA cell (<vcpu> is {vcpus})",
                kind="conflict",
                hint="list every vCPU in the cpus of one <cell>",
            )
    return tuple(cells)


def _cell(ctx: Ctx, el: etree._Element, index: int, vcpus: int | None,
          owner: dict[int, int]) -> NumaCell:  # fmt: skip
    loc = ctx.loc(el, "domain/cpu/numa/cell")
    mark = ctx.count
    cid = ctx.guard(int_attr, el, "id", loc, hi=MAX_CPU_ID)
    if cid is None and get(el, "id") is None:
        cid = index  # libvirt numbers cells without an id by their position
    if cid is not None and cid != index:
        ctx.report(
            loc,
            f"cell id {cid} is out of order: cell ids are 0, 1, … in document "
            f"order (this is cell {index})",
            hint=f"use id='{index}'",
        )
    cpus = ctx.guard(_cpuset_attr, el, "cpus", loc, "cell cpus", allow_empty=True)
    if cpus:
        numbers = parse_cpuset(cpus)
        if vcpus is not None and max(numbers) >= vcpus:
            ctx.report(
                loc,
                f"cell {index} names vCPU {max(numbers)}, but there are only "
                f"{vcpus} (0..{vcpus - 1})",
                kind="conflict",
                hint="use vCPU numbers below the <vcpu> count",
            )
        twice = sorted(n for n in numbers if n in owner)
        if twice:
            ctx.report(
                loc,
                f"vCPUs {format_cpuset(set(twice))} of cell {index} are already "
                f"in cell {owner[twice[0]]}",
                kind="conflict",
                hint="put each vCPU in one cell",
            )
        for n in numbers:
            owner.setdefault(n, index)
    mem_kib = None
    if get(el, "memory") is None:
        ctx.report(loc, "<cell> needs memory", hint="add memory='1048576' (KiB) or a unit")
    else:
        sized = etree.Element("memory", unit=get(el, "unit") or "KiB")
        sized.text = get(el, "memory")
        mem_kib = ctx.guard(memory, sized, loc, "cell memory")
    access = ctx.guard(enum, el, "memAccess", loc, ("shared", "private"), what="cell memAccess")
    discard = ctx.guard(enum, el, "discard", loc, ("yes", "no"), what="cell discard")
    if ctx.count != mark or mem_kib is None:
        raise Skip()
    return NumaCell(
        id=index,
        cpus=cpus or "",
        memory_kib=mem_kib,
        mem_access=cast(Any, access),
        discard=None if discard is None else discard == "yes",
    )


def check_cells(ctx: Ctx, root: etree._Element, cells: tuple[NumaCell, ...],
                memory_kib: int | None) -> None:  # fmt: skip
    """The cells' memory adds up to ``<memory>`` (None: unreadable, not compared)."""
    if not cells or memory_kib is None:
        return
    total = sum(c.memory_kib for c in cells)
    if total != memory_kib:
        numa = root.find("cpu/numa")
        loc = ctx.loc(numa if numa is not None else root, "domain/cpu/numa")
        sizes = " + ".join(str(c.memory_kib) for c in cells)
        ctx.report(
            loc,
            f"the NUMA cells have {sizes} = {total} KiB of memory, but <memory> "
            f"is {memory_kib} KiB",
            kind="conflict",
            hint="make the cells' memory add up to <memory>",
        )


# -- <numatune> -------------------------------------------------------------------

_MODES = ("strict", "preferred", "interleave", "restrictive")


def parse_numatune(ctx: Ctx, el: etree._Element, cells: tuple[NumaCell, ...] | None
                   ) -> NumaTune:  # fmt: skip
    """``<numatune>``: ``<memory mode nodeset>`` and ``<memnode cellid mode nodeset>``.

    ``cells`` None: the guest NUMA cells could not be read (memnodes are
    then not compared with them).
    """
    loc = ctx.loc(el, "domain/numatune")
    mark = ctx.count
    mode = nodeset = None
    mem = one(ctx, el, "memory", loc)
    if mem is not None:
        mloc = ctx.loc(mem, "domain/numatune/memory")
        mode = ctx.guard(enum, mem, "mode", mloc, _MODES, default="strict", what="numatune mode")
        placement = ctx.guard(
            enum, mem, "placement", mloc, ("static", "auto"), what="numatune placement"
        )
        if placement == "auto":
            ctx.report(
                mloc,
                "placement='auto' needs numad, which Ferry does not use",
                cls=XMLUnsupported,
                hint="name the host nodes: nodeset='0'",
            )
        else:
            nodeset = ctx.guard(_cpuset_attr, mem, "nodeset", mloc, "nodeset")
            if nodeset is None and get(mem, "nodeset") is None:
                ctx.report(
                    mloc, "<memory> needs a nodeset (the host NUMA nodes)", hint="add nodeset='0'"
                )
    memnodes: list[NumaMemNode] = []
    for mn in all_of(el, "memnode"):
        found = ctx.guard(_memnode, ctx, mn, cells, {m.cellid for m in memnodes})
        if found is not None:
            memnodes.append(found)
    if ctx.count != mark:
        raise Skip()
    return NumaTune(mode=cast(Any, mode), nodeset=nodeset, memnodes=tuple(memnodes))


def _memnode(ctx: Ctx, el: etree._Element, cells: tuple[NumaCell, ...] | None,
             seen: set[int]) -> NumaMemNode:  # fmt: skip
    loc = ctx.loc(el, "domain/numatune/memnode")
    cellid = int_attr(el, "cellid", loc, hi=MAX_CPU_ID)
    if cellid is None:
        raise fail(loc, "<memnode> needs a cellid", hint="add cellid='0'")
    if cellid in seen:
        raise fail(loc, f"cell {cellid} has two <memnode>", hint="keep one")
    seen.add(cellid)
    if cells is not None and not cells:
        raise fail(
            loc,
            "<memnode> needs guest NUMA cells (<cpu><numa>)",
            kind="conflict",
            hint="add <cpu><numa><cell …/></numa></cpu>, or remove the <memnode>",
        )
    if cells is not None and cellid >= len(cells):
        raise fail(
            loc,
            f"<memnode cellid='{cellid}'> names no guest NUMA cell (the guest has {len(cells)})",
            kind="conflict",
            hint="add the cell to <cpu><numa>, or remove the <memnode>",
        )
    mode = enum(el, "mode", loc, _MODES, default="strict", what="memnode mode") or "strict"
    nodeset = _cpuset_attr(el, "nodeset", loc, "nodeset")
    if nodeset is None:
        raise fail(loc, "<memnode> needs a nodeset", hint="add nodeset='0'")
    return NumaMemNode(cellid, cast(Any, mode), nodeset)


# -- <cputune> --------------------------------------------------------------------


def parse_cputune(ctx: Ctx, el: etree._Element, vcpus: int | None, iothreads: int | None
                  ) -> CpuTune:  # fmt: skip
    """``<cputune>``: vcpupin, emulatorpin, iothreadpin (the schema refuses the rest)."""
    mark = ctx.count
    vcpupins: list[tuple[int, str]] = []
    iopins: list[tuple[int, str]] = []
    emulator = None
    for child in elements(el):
        tag = str(child.tag)
        cloc = ctx.loc(child, f"domain/cputune/{tag}")
        if tag == "emulatorpin":
            if emulator is not None:
                ctx.report(cloc, "<emulatorpin> appears more than once", hint="keep one")
                continue
            emulator = ctx.guard(_required_cpuset, child, cloc)
        elif tag in ("vcpupin", "iothreadpin"):
            pins = vcpupins if tag == "vcpupin" else iopins
            pin = ctx.guard(
                _pin,
                child,
                cloc,
                tag,
                vcpus if tag == "vcpupin" else iothreads,
                {k for k, _ in pins},
            )
            if pin is not None:
                pins.append(pin)
    if ctx.count != mark:
        raise Skip()
    return CpuTune(vcpupins=tuple(vcpupins), emulatorpin=emulator, iothreadpins=tuple(iopins))


def _required_cpuset(el: etree._Element, loc: Loc) -> str:
    cpuset = _cpuset_attr(el, "cpuset", loc, "cpuset")
    if cpuset is None:
        raise fail(loc, f"<{el.tag}> needs a cpuset", hint="add cpuset='0-1'")
    return cpuset


def _pin(el: etree._Element, loc: Loc, tag: str, count: int | None,
         seen: set[int]) -> tuple[int, str]:  # fmt: skip
    """One ``<vcpupin vcpu cpuset>`` (0-based) or ``<iothreadpin iothread cpuset>`` (1-based)."""
    key = "vcpu" if tag == "vcpupin" else "iothread"
    lo = 0 if tag == "vcpupin" else 1
    number = int_attr(el, key, loc, lo=lo, hi=MAX_CPU_ID)
    if number is None:
        raise fail(loc, f"<{tag}> needs {key}", hint=f"add {key}='{lo}'")
    if number in seen:
        raise fail(loc, f"{key} {number} is pinned twice", hint=f"keep one <{tag}>")
    seen.add(number)
    if count is not None:
        last = count - 1 if tag == "vcpupin" else count
        if number > last:
            what = f"<vcpu> is {count}" if tag == "vcpupin" else f"<iothreads> is {count}"
            raise fail(
                loc,
                f"<{tag} {key}='{number}'> names no {key} ({what})",
                kind="conflict",
                hint=f"use a {key} from {lo} to {last}" if last >= lo else f"remove the <{tag}>",
            )
    return number, _required_cpuset(el, loc)
