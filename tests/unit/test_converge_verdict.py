"""Pre-flight verdict of issue 12: tables of guests, links and goals, and JSON safety."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.converge import Goal, Measurements, downtime_ladder, verdict

MIB = 1 << 20
GIB = 1 << 30
TARGET = Goal(deadline_s=10.0, max_downtime_ms=500, max_throttle_pct=50, postcopy_allowed=True)


def m(dirty_mib: float, bw_mib: float = 128, ram: int = GIB, resident: int | None = None) -> (
    Measurements
):
    return Measurements(ram, resident, dirty_mib * MIB, bw_mib * MIB)


def test_flat_out_guest_needs_post_copy() -> None:
    v = verdict(m(256), TARGET)
    assert not v.converges and v.precopy_s is None
    # 50% leaves 128 MiB/s of dirtying against a 128 MiB/s link: not enough.
    assert v.throttle_needed_pct is None or v.throttle_needed_pct > 50
    assert v.plan == "post-copy" and v.feasible
    assert v.postcopy_s is not None and 8.0 < v.postcopy_s < 9.0
    text = " ".join(v.reasons)
    assert "256 MiB/s" in text and "128 MiB/s" in text and "cannot converge" in text


def test_slow_guest_converges_in_pre_copy_with_a_low_downtime() -> None:
    v = verdict(m(16), TARGET)
    assert v.converges and v.plan == "pre-copy" and v.feasible
    assert v.throttle_needed_pct == 0
    assert v.precopy_s is not None and 8.0 < v.precopy_s < 9.5
    assert v.downtime_ms is not None and v.downtime_ms < 500


@pytest.mark.parametrize(
    ("dirty", "goal", "plan", "feasible"),
    [
        # throttle allowed, post-copy not: a guest at 160 MiB/s needs ~30%
        (160, Goal(None, 500, 60, False), "pre-copy + throttle", True),
        (160, Goal(60.0, 500, 60, False), "pre-copy + throttle", True),
        (160, Goal(None, 500, 10, False), "cannot converge", False),
        (160, Goal(None, 500, 10, True), "post-copy", True),
        (256, Goal(10.0, 500, 50, False), "cannot meet the deadline", False),
        (256, Goal(None, 500, 0, False), "cannot converge", False),
        (8, Goal(None, 300, 0, False), "pre-copy", True),
        # the first pass alone takes 8 s: nothing can meet 5 s
        (8, Goal(5.0, 500, 50, True), "cannot meet the deadline", False),
    ],
)
def test_plan_table(dirty: float, goal: Goal, plan: str, feasible: bool) -> None:
    v = verdict(m(dirty), goal)
    assert (v.plan, v.feasible) == (plan, feasible), v.reasons
    if plan == "pre-copy + throttle":
        assert v.throttle_needed_pct is not None
        assert 0 < v.throttle_needed_pct <= goal.max_throttle_pct
    if not goal.postcopy_allowed:
        assert v.postcopy_s is None


def test_deadline_shorter_than_the_first_pass_says_why() -> None:
    v = verdict(m(8), Goal(5.0, 500, 50, True))
    assert any("nothing left to pull" in r for r in v.reasons)


def test_untouched_memory_is_nearly_free() -> None:
    full = verdict(m(16), TARGET)
    half = verdict(m(16, resident=GIB // 2), TARGET)
    assert full.precopy_s is not None and half.precopy_s is not None
    assert half.precopy_s < 0.6 * full.precopy_s


def test_no_bandwidth_gives_a_json_safe_cannot_tell() -> None:
    v = verdict(Measurements(GIB, None, math.nan, 0.0), TARGET)
    assert v.plan == "cannot tell" and not v.feasible
    json.dumps(v.to_json(), allow_nan=False)


def test_ladder_ends_at_the_maximum() -> None:
    assert downtime_ladder(500) == [100, 200, 300, 500]
    assert downtime_ladder(50) == [50]
    assert downtime_ladder(0) == [1]


@settings(max_examples=300, deadline=None)
@given(
    ram=st.integers(0, 1 << 44),
    resident=st.none() | st.integers(-5, 1 << 44),
    dirty=st.floats(allow_nan=True, allow_infinity=True),
    bw=st.floats(allow_nan=True, allow_infinity=True),
    deadline=st.none() | st.floats(0, 1e6),
    downtime=st.integers(0, 100_000),
    throttle=st.integers(0, 99),
    postcopy=st.booleans(),
)
def test_any_measurement_gives_json(
    ram: int, resident: int | None, dirty: float, bw: float, deadline: float | None,
    downtime: int, throttle: int, postcopy: bool,
) -> None:
    goal = Goal(deadline, downtime, throttle, postcopy)
    v = verdict(Measurements(ram, resident, dirty, bw), goal)
    json.dumps(v.to_json(), allow_nan=False)
    assert v.feasible == (v.plan in ("pre-copy", "pre-copy + throttle", "post-copy"))
