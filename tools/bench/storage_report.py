"""The figures and tables of ``storage.py`` (no I/O but printing; unit-tested).

A repetition (:class:`StorageRep`) is one migration with its disk copied,
timed end to end. :func:`build_report` folds the repetitions of one run into
one table per workload: median/min/max of every figure per variant, the
ratio of each Ferry variant to its floor (the bare-qemu driver doing the
same qemu work with the same TLS flavour), and what was refused, failed or
did not converge. Ratios whose denominator is missing or not positive are
``None`` (printed ``n/a``), never Infinity/NaN, so the report is valid JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from migration import summary

__all__ = [
    "FLOOR_OF",
    "TARGET_RATIO",
    "StorageRep",
    "VariantStatus",
    "build_report",
    "print_report",
    "ratio_summary",
]

MIB = 1024 * 1024
#: The issue's target: a Ferry copy at most 10 % slower than the floor.
TARGET_RATIO = 1.10
#: The floor each Ferry variant is compared with, in order of preference.
FLOOR_OF: dict[str, tuple[str, ...]] = {
    "ferry": ("floor-tls",),
    "ferry-tunnelled": ("floor-tls",),
    "ferry-plain": ("floor-plain",),
    "ferry-sync": ("floor-tls-sync", "floor-tls"),
}


@dataclass
class StorageRep:
    """One migration with its disk copied (times in ms)."""

    variant: str
    workload: str  # "idle" or "busy"
    round: int  # 1-based; the variants of one round ran next to each other
    wall_ms: float  # end to end: ferryctl's process, or the floor driver's steps
    #: The disk copy: from the mirror's start to all disks in sync.
    disk_ms: float | None
    memory_ms: float | None  # qemu's total_time_ms of the memory migration
    downtime_ms: float | None
    disk_bytes: int
    #: The floor's steps, or Ferry's phases (ms).
    steps: dict[str, float] = field(default_factory=dict)
    #: Ferry: the source agent's ``wall_time_ms`` (Begin to Confirm, without
    #: ferryctl's own start-up and connect).
    agent_ms: float | None = None

    @property
    def disk_mib_s(self) -> float | None:
        """Disk copy throughput, MiB/s."""
        if not self.disk_ms or self.disk_ms <= 0:
            return None
        return self.disk_bytes / MIB / (self.disk_ms / 1000)


@dataclass
class VariantStatus:
    """What went wrong with a variant in one workload (nothing: all ran)."""

    refused: str | None = None  # it cannot run at all (first attempt refused/failed)
    failures: list[str] = field(default_factory=list)
    not_converged: int = 0  # migrations cut off at --timeout (busy guest)
    attempts: int = 0


def _med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _summ(values: Sequence[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    return summary(vals) if vals else None


def ratio_summary(
    reps: Sequence[StorageRep], floor: Sequence[StorageRep]
) -> dict[str, float | None] | None:
    """Wall time of ``reps`` against ``floor``'s: the ratio of the medians, and
    min/max of the per-round ratios (a rep and the floor rep of its round)."""
    mv, mf = _med([r.wall_ms for r in reps]), _med([r.wall_ms for r in floor])
    if mv is None or mf is None or mf <= 0:
        return None
    by_round = {r.round: r.wall_ms for r in floor}
    pairs = [r.wall_ms / by_round[r.round] for r in reps if by_round.get(r.round, 0) > 0]
    return {
        "median": mv / mf,
        "min": min(pairs) if pairs else None,
        "max": max(pairs) if pairs else None,
    }


def _agent_ratio(reps: Sequence[StorageRep], floor: Sequence[StorageRep]) -> float | None:
    """Median agent wall time over the floor's median wall time (None: either missing)."""
    ma, mf = _med([r.agent_ms for r in reps if r.agent_ms]), _med([r.wall_ms for r in floor])
    return None if ma is None or mf is None or mf <= 0 else ma / mf


def _floor_for(variant: str, by_variant: Mapping[str, Sequence[StorageRep]]) -> str | None:
    for name in FLOOR_OF.get(variant, ()):
        if by_variant.get(name):
            return name
    return None


def build_report(
    config: Mapping[str, Any],
    reps: Sequence[StorageRep],
    status: Mapping[str, Mapping[str, VariantStatus]],
    variants: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """The whole run: ``variants[workload]`` in table order, ``status[workload][variant]``."""
    tables: dict[str, Any] = {}
    for workload, names in variants.items():
        by_variant = {
            v: [r for r in reps if r.workload == workload and r.variant == v] for v in names
        }
        rows: dict[str, Any] = {}
        for v in names:
            rs = by_variant[v]
            st = status.get(workload, {}).get(v, VariantStatus())
            floor = _floor_for(v, by_variant)
            step_names: list[str] = []
            for r in rs:
                step_names += [k for k in r.steps if k not in step_names]
            rows[v] = {
                "ok": len(rs),
                "attempts": st.attempts,
                "refused": st.refused,
                "failures": list(st.failures),
                "not_converged": st.not_converged,
                "wall_ms": _summ([r.wall_ms for r in rs]),
                "disk_ms": _summ([r.disk_ms for r in rs]),
                "disk_mib_s": _summ([r.disk_mib_s for r in rs]),
                "memory_ms": _summ([r.memory_ms for r in rs]),
                "downtime_ms": _summ([r.downtime_ms for r in rs]),
                "floor": floor,
                "ratio_to_floor": (
                    ratio_summary(rs, by_variant[floor]) if floor is not None else None
                ),
                "agent_ms": _summ([r.agent_ms for r in rs]),
                "agent_ratio_to_floor": _agent_ratio(rs, by_variant[floor] if floor else []),
                "steps_ms": {k: _summ([r.steps.get(k) for r in rs]) for k in step_names},
            }
        ferry = rows.get("ferry", {}).get("ratio_to_floor")
        tables[workload] = {
            "rows": rows,
            "verdict": None
            if not ferry
            else {
                "ferry_over_floor": ferry["median"],
                "target": TARGET_RATIO,
                "met": ferry["median"] <= TARGET_RATIO,
            },
        }
    return {
        "config": dict(config),
        "tables": tables,
        "reps": [{**asdict(r), "disk_mib_s": r.disk_mib_s} for r in reps],
    }


def _s(value: float | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    return "n/a" if value is None else format(value / scale, fmt)


def _mmm(s: Mapping[str, float | None] | None, scale: float = 1.0, fmt: str = ".1f") -> str:
    if s is None:
        return "-"
    return f"{_s(s['median'], scale, fmt)} [{_s(s['min'], scale, fmt)}..{_s(s['max'], scale, fmt)}]"


def _state(row: Mapping[str, Any], busy: bool) -> str:
    if row["refused"]:
        return f"refused: {row['refused']}"
    parts = [f"converged {row['ok']}/{row['attempts']}"] if busy else []
    if row["not_converged"]:
        parts.append(f"did not converge {row['not_converged']}/{row['attempts']}")
    if row["failures"]:
        parts.append(f"{len(row['failures'])} failed")
    return ", ".join(parts) or "ok"


def print_report(report: Mapping[str, Any]) -> None:
    """The tables on stdout: one per workload, then the floor's steps and failures."""
    cfg = report["config"]
    print(
        f"storage copy benchmark: {cfg['disk_mib']} MiB raw disk (random content), guest "
        f"{cfg['mem_mib']} MiB, virt {cfg['virt']}, {cfg['reps']} interleaved rounds, "
        f"{cfg['cpus']} CPUs; median [min..max]"
    )
    for workload, table in report["tables"].items():
        title = (
            "guest idle on its disk"
            if workload == "idle"
            else f"guest writing {cfg['guest_write_mib_s']} MiB/s to its disk"
        )
        print(f"\n== {title} ==")
        head = (
            f"{'variant':<16}{'ok':>4}  {'wall s':<22}{'ratio to floor':<36}"
            f"{'disk copy s':<22}{'disk MiB/s':<22}{'memory ms':<20}{'downtime ms':<16}"
            "status"
        )
        print(head)
        print("-" * len(head))
        for v, row in table["rows"].items():
            ratio = row["ratio_to_floor"]
            rtext = "-" if ratio is None else f"{_mmm(ratio, fmt='.2f')} vs {row['floor']}"
            print(
                f"{v:<16}{row['ok']:>4}  {_mmm(row['wall_ms'], 1000, '.2f'):<22}{rtext:<36}"
                f"{_mmm(row['disk_ms'], 1000, '.2f'):<22}{_mmm(row['disk_mib_s'], fmt='.0f'):<22}"
                f"{_mmm(row['memory_ms'], fmt='.0f'):<20}"
                f"{_mmm(row['downtime_ms'], fmt='.0f'):<16}{_state(row, workload == 'busy')}"
            )
        verdict = table["verdict"]
        if verdict is not None:
            print(
                f"ferry / floor-tls (median wall): {verdict['ferry_over_floor']:.2f}x; target "
                f"<= {verdict['target']:.2f}x: {'MET' if verdict['met'] else 'NOT MET'}"
            )
        for v, row in table["rows"].items():
            if row["agent_ratio_to_floor"] is not None:
                print(
                    f"  {v}: agent wall_time_ms (without ferryctl's start-up) / {row['floor']} "
                    f"wall: {row['agent_ratio_to_floor']:.2f}x"
                )
        for v, row in table["rows"].items():
            if row["steps_ms"]:
                steps = ", ".join(
                    f"{k} {_s(s['median'] if s else None, fmt='.0f')}"
                    for k, s in row["steps_ms"].items()
                )
                print(f"  {v} steps (median ms): {steps}")
            for text in row["failures"]:
                print(f"  {v} FAILED: {text}")
