"""Pre-flight verdict: can this guest be migrated within the operator's goal, and how?

Computed before ``migrate`` from three measurements (RAM, a 1 s
``calc-dirty-rate``, the data path's bandwidth) with the model of
:mod:`ferry.converge.eta`.  The verdict both informs the operator (``reasons``
are sentences with their figures) and seeds the controller, which would
otherwise be blind until qemu's second dirty sync, i.e. after the whole first
pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ferry.converge.eta import OVERHEAD_S, Model, postcopy_eta, precopy_eta

__all__ = [
    "EARLY_SWITCH_S",
    "Goal",
    "Measurements",
    "Verdict",
    "downtime_ladder",
    "mib",
    "verdict",
]

MIB = float(1 << 20)
# How soon after `migrate` the controller can switch to post-copy when the
# verdict says so: it waits for two active samples (the driver polls every
# 100 ms), so the pre-flight prediction assumes this much of the first pass
# was sent and may come back dirty.
EARLY_SWITCH_S = 0.3
# Deadlines are met with this much to spare (seconds, or fraction of the deadline).
MARGIN_S = 0.25
MARGIN_FRACTION = 0.03


@dataclass(frozen=True)
class Goal:
    """What the operator asked for.

    ``deadline_s``: whole migration, seconds from ``migrate`` (None = none);
    ``max_downtime_ms``: the most stop-and-copy may take; ``max_throttle_pct``:
    0..99, 0 = never slow the guest; ``postcopy_allowed``: ``--postcopy``.
    """

    deadline_s: float | None
    max_downtime_ms: int
    max_throttle_pct: int
    postcopy_allowed: bool


@dataclass(frozen=True)
class Measurements:
    """Pre-flight figures: guest RAM, pages touched (None = all), 1 s dirty rate, bandwidth."""

    ram_bytes: int
    resident_bytes: int | None
    dirty_rate_bps: float
    bandwidth_bps: float


@dataclass(frozen=True)
class Verdict:
    """The pre-flight answer; see the module docstring of :mod:`ferry.converge`."""

    converges: bool
    precopy_s: float | None
    throttle_needed_pct: int | None
    postcopy_s: float | None
    plan: str
    feasible: bool
    reasons: list[str]
    # Added: the figures the verdict was computed from (the controller's seed)
    # and the lowest downtime limit with which the plan meets the goal.
    dirty_rate_bps: float = 0.0
    bandwidth_bps: float = 0.0
    ram_bytes: int = 0
    resident_bytes: int = 0
    downtime_ms: int | None = None
    measurements: Measurements | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form: non-finite numbers become None."""
        return {
            "converges": self.converges,
            "precopy_s": _finite(self.precopy_s),
            "throttle_needed_pct": self.throttle_needed_pct,
            "postcopy_s": _finite(self.postcopy_s),
            "plan": self.plan,
            "feasible": self.feasible,
            "reasons": list(self.reasons),
            "dirty_rate_bps": _finite(self.dirty_rate_bps),
            "bandwidth_bps": _finite(self.bandwidth_bps),
            "ram_bytes": self.ram_bytes,
            "resident_bytes": self.resident_bytes,
            "downtime_ms": self.downtime_ms,
        }


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


def mib(value: float) -> str:
    """``value`` bytes (or bytes/s) as a short MiB figure for sentences."""
    return f"{value / MIB:.0f} MiB" if value >= 10 * MIB else f"{value / MIB:.1f} MiB"


def downtime_ladder(max_ms: int) -> list[int]:
    """Downtime limits the controller steps through, lowest first, ending at ``max_ms``.

    Starts at 100 ms: lower limits add passes for a pause nobody notices.
    """
    top = max(int(max_ms), 1)
    steps = [ms for ms in (100, 200, 300, 500, 1000, 2000, 5000, 10000, 30000) if ms < top]
    return [*steps, top]


def within(goal: Goal, finish_s: float | None) -> bool:
    """True when a predicted finish (seconds from ``migrate``) meets the goal.

    Without a deadline, finishing at all is the goal.
    """
    if finish_s is None or not math.isfinite(finish_s):
        return False
    if goal.deadline_s is None:
        return True
    margin = max(MARGIN_S, MARGIN_FRACTION * goal.deadline_s)
    return finish_s <= goal.deadline_s - margin


def _clean(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else 0.0


def verdict(m: Measurements, goal: Goal) -> Verdict:
    """Predict plain pre-copy, throttled pre-copy and post-copy for ``m`` and pick a plan.

    Never raises on odd figures: a zero or non-finite bandwidth gives a verdict
    of "cannot tell" (infeasible, every time None).
    """
    ram = max(int(m.ram_bytes), 0)
    resident = ram if m.resident_bytes is None else min(max(int(m.resident_bytes), 0), ram)
    bw = _clean(m.bandwidth_bps)
    dirty = _clean(m.dirty_rate_bps)
    max_l = max(goal.max_downtime_ms, 1) / 1000.0
    max_p = min(max(goal.max_throttle_pct, 0), 99)
    common: dict[str, Any] = {
        "dirty_rate_bps": dirty, "bandwidth_bps": bw, "ram_bytes": ram,
        "resident_bytes": resident, "measurements": m,
    }
    if bw <= 0:
        return Verdict(False, None, None, None, "cannot tell", False,
                       ["no bandwidth was measured: nothing can be predicted"], **common)
    model = Model(bw, dirty, float(max(resident, 1)))

    def pre(l_s: float, pct: int = 0) -> float | None:
        # Auto-converge starts throttling after two dirty syncs: from pass 2 on.
        return precopy_eta(model, remaining=float(resident), pass_age_s=0.0, downtime_s=l_s,
                           throttle_pct=pct, throttled_from=2 if pct else 0)

    precopy_s = pre(max_l)
    converges = precopy_s is not None
    reasons: list[str] = []
    first_pass = resident / bw
    reasons.append(f"the first pass sends {mib(resident)} at {mib(bw)}/s: {first_pass:.1f} s")
    if converges:
        reasons.append(f"the guest dirties {mib(dirty)}/s, the link moves {mib(bw)}/s: "
                       f"pre-copy converges in about {precopy_s:.1f} s "
                       f"with a {goal.max_downtime_ms} ms downtime limit")
    else:
        reasons.append(f"the guest dirties {mib(dirty)}/s, the link moves {mib(bw)}/s "
                       f"({mib(bw * max_l)} fit in {goal.max_downtime_ms} ms): "
                       "pre-copy cannot converge")

    throttle_needed: int | None = None
    if within(goal, precopy_s):
        throttle_needed = 0
    else:
        for pct in range(1, 100):
            if within(goal, pre(max_l, pct)):
                throttle_needed = pct
                break
    postcopy_s: float | None = None
    if goal.postcopy_allowed:
        sent = min(bw * EARLY_SWITCH_S, float(resident))
        after = postcopy_eta(model, remaining=resident - sent, sent_in_pass=sent,
                             pass_age_s=EARLY_SWITCH_S, first_pass=True)
        postcopy_s = None if after is None else EARLY_SWITCH_S + after

    deadline = goal.deadline_s
    goal_text = "the deadline" if deadline is not None else "convergence"
    if within(goal, precopy_s):
        plan, feasible = "pre-copy", True
    elif throttle_needed is not None and throttle_needed <= max_p:
        plan, feasible = "pre-copy + throttle", True
        reasons.append(f"a {throttle_needed}% CPU throttle (at most {max_p}% allowed) "
                       f"makes pre-copy meet {goal_text}")
    elif goal.postcopy_allowed and within(goal, postcopy_s):
        plan, feasible = "post-copy", True
        if throttle_needed is None:
            why = "no throttle up to 99% helps"
        else:
            why = f"a {throttle_needed}% throttle would be needed, {max_p}% is allowed"
        reasons.append(f"{why}; switching to post-copy after {EARLY_SWITCH_S:.1f} s "
                       f"finishes in about {postcopy_s:.1f} s")
    else:
        plan = "cannot meet the deadline" if deadline is not None else "cannot converge"
        feasible = False
        best = [x for x in (precopy_s, postcopy_s) if x is not None]
        if deadline is not None and resident / bw + OVERHEAD_S > deadline:
            reasons.append(f"even the first pass alone ({first_pass:.1f} s) exceeds the "
                           f"{deadline:g} s deadline: nothing left to pull")
        elif best:
            reasons.append(f"the best allowed plan takes about {min(best):.1f} s"
                           + (f", over the {deadline:g} s deadline" if deadline else ""))
        else:
            reasons.append("no allowed lever makes pre-copy converge and post-copy is not "
                           "allowed")
    downtime_ms: int | None = None
    if plan == "pre-copy":
        for ms in downtime_ladder(goal.max_downtime_ms):
            if within(goal, pre(ms / 1000.0)):
                downtime_ms = ms
                break
    else:
        downtime_ms = max(goal.max_downtime_ms, 1)
    return Verdict(converges, precopy_s, throttle_needed, postcopy_s, plan, feasible, reasons,
                   downtime_ms=downtime_ms, **common)
