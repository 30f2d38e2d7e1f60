"""Guest RAM blocks and NUMA nodes for the qemu command line (sans-I/O, but the host's nodes).

libvirt's naming: with guest NUMA cells each cell's RAM is its own memory
backend ``ram-nodeN`` and ``-numa node,nodeid=N,cpus=…,memdev=ram-nodeN``;
without cells the RAM is one block, ``pc.ram`` (see :mod:`ferry.domain.argv`).
The backend ids are the RAM block names of the migration stream, so both
ends must derive them from the same model (the ABI check compares cells).

``<numatune>`` becomes the backends' ``host-nodes=…,policy=…``: strict is
``bind``, preferred and interleave are themselves. restrictive (libvirt:
cgroup ``cpuset.mems``, changeable at run time) is ``bind`` too: Ferry
changes no placement at run time, so where the RAM may live is the same.
A ``<memnode>`` replaces ``<memory>`` for its cell. ``discard`` of a cell
concerns file-backed RAM (``discard-data``); Ferry's RAM is anonymous or
memfd, which the kernel frees when qemu exits, so it changes nothing.

The host must have the nodes a nodeset names: checked (from
``/sys/devices/system/node/online``) before qemu starts, on the source at
start and on the destination in Prepare, whose host may differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ferry.domain._numa import format_cpuset, parse_cpuset
from ferry.domain.model import Domain
from ferry.errors import QemuLaunchError

__all__ = [
    "RamBlock",
    "check_host_nodes",
    "host_numa_nodes",
    "numa_node_args",
    "ram_blocks",
    "whole_ram_placement",
]

#: libvirt's numatune modes → qemu's memory backend ``policy``.
POLICY = {
    "strict": "bind",
    "preferred": "preferred",
    "interleave": "interleave",
    "restrictive": "bind",
}


@dataclass(frozen=True)
class RamBlock:
    """One memory backend of guest RAM.

    ``host_nodes``/``policy`` None: the kernel's default placement.
    ``share`` None: not shared (the backend's default).
    """

    id: str
    size_mib: int
    share: bool | None = None
    host_nodes: str | None = None
    policy: str | None = None


def _mib(kib: int) -> int:
    return -(-kib // 1024)


def ram_blocks(d: Domain) -> tuple[RamBlock, ...]:
    """The guest's NUMA RAM blocks, one per cell (``ram-node0``, …); empty without cells."""
    cells = d.cpu.numa if d.cpu is not None else ()
    tune = d.numatune
    out = []
    for cell in cells:
        nodes = policy = None
        memnode = next((m for m in tune.memnodes if m.cellid == cell.id), None) if tune else None
        if memnode is not None:
            nodes, policy = memnode.nodeset, POLICY[memnode.mode]
        elif tune is not None and tune.mode is not None:
            nodes, policy = tune.nodeset, POLICY[tune.mode]
        access = cell.mem_access or d.memory_access
        out.append(
            RamBlock(
                id=f"ram-node{cell.id}",
                size_mib=_mib(cell.memory_kib),
                share=True if access == "shared" else None,
                host_nodes=nodes,
                policy=policy,
            )
        )
    return tuple(out)


def whole_ram_placement(d: Domain) -> tuple[str | None, str | None]:
    """``(host_nodes, policy)`` of the single ``pc.ram`` block (no cells), or Nones."""
    tune = d.numatune
    if tune is None or tune.mode is None or (d.cpu is not None and d.cpu.numa):
        return None, None
    return tune.nodeset, POLICY[tune.mode]


def numa_node_args(d: Domain) -> list[str]:
    """``-numa node,nodeid=N,cpus=A-B[,cpus=C],memdev=ram-nodeN`` for each cell."""
    args: list[str] = []
    for cell in d.cpu.numa if d.cpu is not None else ():
        spec = f"node,nodeid={cell.id}"
        # qemu's cpus= takes one range; a cpuset with several is repeated.
        for part in cell.cpus.split(",") if cell.cpus else ():
            spec += f",cpus={part}"
        args += ["-numa", f"{spec},memdev=ram-node{cell.id}"]
    return args


def host_numa_nodes() -> frozenset[int]:
    """The host's online NUMA nodes (``/sys/devices/system/node/online``; ``{0}`` if unknown)."""
    with contextlib.suppress(OSError, ValueError):
        return parse_cpuset(Path("/sys/devices/system/node/online").read_text().strip())
    return frozenset({0})


def check_host_nodes(d: Domain, host_nodes: frozenset[int]) -> None:
    """Every nodeset of ``<numatune>`` names nodes ``host_nodes`` has.

    :raises QemuLaunchError: listing each nodeset that names a missing node.
    """
    tune = d.numatune
    if tune is None:
        return
    sets = [("<numatune><memory>", tune.nodeset)] + [
        (f"<numatune><memnode cellid='{m.cellid}'>", m.nodeset) for m in tune.memnodes
    ]
    problems = []
    for what, nodeset in sets:
        if nodeset is None:
            continue
        missing = parse_cpuset(nodeset) - host_nodes
        if missing:
            problems.append(
                f"{what} nodeset '{nodeset}' names host NUMA node(s) {format_cpuset(missing)}"
            )
    if problems:
        raise QemuLaunchError(
            f"domain {d.name}: {'; '.join(problems)}, which this host does not have (its "
            f"nodes: {format_cpuset(host_nodes) or 'none'}); use nodes of this host or "
            "remove the nodeset",
            domain=d.name,
            host_nodes=format_cpuset(host_nodes),
        )
