"""Host CPU pinning of a qemu's threads: ``<cputune>`` and ``<vcpu cpuset>``.

libvirt's rules, applied after qemu has started paused (``-S``), before a
vCPU runs, on every host a domain runs on (at start, and on the destination
of a migration once its incoming qemu is up):

* vCPU *k* runs on ``<vcpupin vcpu='k' cpuset>``, else on ``<vcpu cpuset>``;
* I/O thread *k* (``iothreadK``) on ``<iothreadpin iothread='k' cpuset>``,
  else on ``<vcpu cpuset>``;
* every other thread of qemu (the main loop, RCU, workers: libvirt's
  "emulator") on ``<emulatorpin cpuset>``, else on ``<vcpu cpuset>``;
* where none of those says anything, the thread is left alone.

Threads qemu creates later (migration, workers) inherit the affinity of the
thread that creates them, the main loop's: the emulator set.

The plan (:func:`pin_plan`: the domain and qemu's thread ids in, a list of
``(tid, cpus)`` out) and the host check (:func:`check_host_cpus`) are pure;
:func:`apply_pinning` asks qemu for its vCPU and I/O thread ids (QMP
``query-cpus-fast``, ``query-iothreads``), lists ``/proc/PID/task`` and calls
``sched_setaffinity``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ferry.domain._numa import format_cpuset, parse_cpuset
from ferry.domain.model import Domain
from ferry.errors import QemuLaunchError

__all__ = [
    "PinSets",
    "apply_pinning",
    "check_host_cpus",
    "host_online_cpus",
    "pin_plan",
    "pin_sets",
]

log = logging.getLogger("ferry.pinning")


@dataclass(frozen=True)
class PinSets:
    """The host CPUs each kind of qemu thread should run on (None: left alone)."""

    vcpus: Mapping[int, frozenset[int]]
    iothreads: Mapping[int, frozenset[int]]
    emulator: frozenset[int] | None
    #: ``<vcpu cpuset>``: vCPUs and I/O threads without their own pin.
    default: frozenset[int] | None

    @property
    def empty(self) -> bool:
        """True when nothing is pinned."""
        return (
            not self.vcpus and not self.iothreads and self.emulator is None and self.default is None
        )

    def vcpu(self, k: int) -> frozenset[int] | None:
        """The CPUs of vCPU ``k`` (0-based)."""
        return self.vcpus.get(k, self.default)

    def iothread(self, k: int) -> frozenset[int] | None:
        """The CPUs of I/O thread ``k`` (1-based: ``iothreadK``)."""
        return self.iothreads.get(k, self.default)


def pin_sets(domain: Domain) -> PinSets:
    """What ``domain`` asks: :class:`PinSets` from ``<cputune>`` and ``<vcpu cpuset>``.

    :raises QemuLaunchError: ``<vcpu cpuset>`` names no CPU (e.g. ``^0``
        alone); the other cpusets are checked by the parser.
    """
    default = None
    if domain.vcpu_cpuset is not None:
        try:
            default = parse_cpuset(domain.vcpu_cpuset)
        except ValueError as exc:
            raise QemuLaunchError(
                f"domain {domain.name}: <vcpu cpuset='{domain.vcpu_cpuset}'>: {exc}",
                domain=domain.name,
            ) from None
    tune = domain.cputune
    vcpus = {k: parse_cpuset(c) for k, c in tune.vcpupins} if tune else {}
    iothreads = {k: parse_cpuset(c) for k, c in tune.iothreadpins} if tune else {}
    emulator = parse_cpuset(tune.emulatorpin) if tune and tune.emulatorpin else default
    return PinSets(vcpus=vcpus, iothreads=iothreads, emulator=emulator, default=default)


def check_host_cpus(domain: Domain, online: frozenset[int]) -> None:
    """Every pinned cpuset of ``domain`` names CPUs that are online on this host.

    :raises QemuLaunchError: listing each cpuset with CPUs the host lacks.
    """
    sets = pin_sets(domain)
    named: list[tuple[str, frozenset[int]]] = []
    if sets.default is not None:
        named.append(("<vcpu cpuset>", sets.default))
    named += [(f"<vcpupin vcpu='{k}'>", c) for k, c in sorted(sets.vcpus.items())]
    if (
        domain.cputune is not None
        and domain.cputune.emulatorpin is not None
        and sets.emulator is not None
    ):
        named.append(("<emulatorpin>", sets.emulator))
    named += [(f"<iothreadpin iothread='{k}'>", c) for k, c in sorted(sets.iothreads.items())]
    problems = [
        f"{what} cpuset '{format_cpuset(cpus)}' names CPU(s) {format_cpuset(cpus - online)}"
        for what, cpus in named
        if cpus - online
    ]
    if problems:
        raise QemuLaunchError(
            f"domain {domain.name}: {'; '.join(problems)}, which this host does not have "
            f"online (its CPUs: {format_cpuset(online) or 'none'}); pin to CPUs of this host",
            domain=domain.name,
            host_cpus=format_cpuset(online),
        )


def pin_plan(
    sets: PinSets,
    *,
    vcpu_tids: Mapping[int, int],
    iothread_tids: Mapping[int, int],
    all_tids: Iterable[int],
) -> list[tuple[int, frozenset[int]]]:
    """The ``(tid, cpus)`` to apply, emulator threads first, then I/O threads, then vCPUs.

    ``vcpu_tids`` maps a vCPU index (``cpu-index``) to its thread id,
    ``iothread_tids`` an I/O thread number (``iothreadK`` → K) to its; every
    other tid of ``all_tids`` is an emulator thread.
    """
    special = set(vcpu_tids.values()) | set(iothread_tids.values())
    plan: list[tuple[int, frozenset[int]]] = []
    if sets.emulator is not None:
        plan += [(tid, sets.emulator) for tid in sorted(set(all_tids) - special)]
    for k, tid in sorted(iothread_tids.items()):
        cpus = sets.iothread(k)
        if cpus is not None:
            plan.append((tid, cpus))
    for k, tid in sorted(vcpu_tids.items()):
        cpus = sets.vcpu(k)
        if cpus is not None:
            plan.append((tid, cpus))
    return plan


def host_online_cpus() -> frozenset[int]:
    """The host's online CPUs (``/sys/devices/system/cpu/online``; else our affinity)."""
    with contextlib.suppress(OSError, ValueError):
        return parse_cpuset(Path("/sys/devices/system/cpu/online").read_text().strip())
    return frozenset(os.sched_getaffinity(0))


class _Qmp(Protocol):
    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any: ...  # fmt: skip


def _iothread_number(qom_id: str) -> int | None:
    if qom_id.startswith("iothread") and qom_id[8:].isdigit():
        return int(qom_id[8:])
    return None


async def apply_pinning(domain: Domain, pid: int, qmp: _Qmp) -> list[tuple[int, frozenset[int]]]:
    """Pin the threads of ``domain``'s qemu (process ``pid``, paused) as it asks.

    Returns the plan applied (empty when the domain pins nothing).

    :raises QemuLaunchError: a thread id qemu reported is not one of its
        threads, or the kernel refused an affinity (a CPU outside this
        process's cgroup cpuset).
    :raises QMPError: qemu did not answer ``query-cpus-fast``/``query-iothreads``.
    """
    sets = pin_sets(domain)
    if sets.empty:
        return []
    cpus = await qmp.execute("query-cpus-fast", timeout=10)
    vcpu_tids = {int(c["cpu-index"]): int(c["thread-id"]) for c in cpus}
    iothread_tids: dict[int, int] = {}
    if domain.iothreads:
        for t in await qmp.execute("query-iothreads", timeout=10):
            k = _iothread_number(str(t.get("id", "")))
            if k is not None:
                iothread_tids[k] = int(t["thread-id"])
    try:
        all_tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError as exc:
        raise QemuLaunchError(
            f"domain {domain.name}: cannot list the threads of qemu pid {pid}: {exc}",
            domain=domain.name,
        ) from None
    plan = pin_plan(sets, vcpu_tids=vcpu_tids, iothread_tids=iothread_tids, all_tids=all_tids)
    for tid, mask in plan:
        if tid not in all_tids:
            raise QemuLaunchError(
                f"domain {domain.name}: qemu reported thread {tid}, which is "
                f"not a thread of pid {pid}",
                domain=domain.name,
            )
        try:
            os.sched_setaffinity(tid, mask)
        except OSError as exc:
            raise QemuLaunchError(
                f"domain {domain.name}: cannot pin qemu thread {tid} to CPUs "
                f"{format_cpuset(mask)}: {exc.strerror}",
                domain=domain.name,
                tid=tid,
                cpus=format_cpuset(mask),
            ) from None
    log.info(
        "domain %s: pinned %d vCPU thread(s), %d I/O thread(s), %s",
        domain.name,
        sum(1 for k in vcpu_tids if sets.vcpu(k) is not None),
        sum(1 for k in iothread_tids if sets.iothread(k) is not None),
        "emulator threads to " + format_cpuset(sets.emulator)
        if sets.emulator is not None
        else "emulator threads unpinned",
    )
    return plan
