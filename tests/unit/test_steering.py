"""The in-flight levers of a migration (ferry.steering), sans-I/O: samples in, moves out."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.flags import MigrationFlags as F
from ferry.flags import MigrationParams
from ferry.qemu.migration import MigrationStats
from ferry.steering import Abort, Steering, Suspend, SwitchToPostcopy, Tune

GIB = 1 << 30
MIB = 1 << 20


def sample(t: float, *, passes: int = 1, status: str = "active", remaining: int = GIB // 2,
           rate_pages: int = 0) -> MigrationStats:  # fmt: skip
    """A query-migrate sample of a 1 GiB guest over a 128 MiB/s link."""
    sent = int(min(t * 128 * MIB, 4 * GIB))
    return MigrationStats(status=status, total_time_ms=int(t * 1000), ram_transferred=sent,
                          ram_remaining=remaining, ram_total=GIB, ram_page_size=4096,
                          ram_dirty_pages_rate=rate_pages, ram_dirty_sync_count=passes)  # fmt: skip


def run(steering: Steering, samples: list[MigrationStats]) -> list[object]:
    moves: list[object] = []
    for s in samples:
        moves.extend(steering.tick(s, (s.total_time_ms or 0) / 1000))
    return moves


def test_operator_switch_needs_postcopy_and_happens_once() -> None:
    steering = Steering(F.LIVE | F.POSTCOPY, MigrationParams(), GIB)
    assert run(steering, [sample(0.1)]) == []
    steering.request_postcopy("the operator asked")
    moves = run(steering, [sample(0.2), sample(0.3), sample(0.4)])
    assert moves == [SwitchToPostcopy("the operator asked")]
    # Without --postcopy both ends lack postcopy-ram: never switch.
    plain = Steering(F.LIVE, MigrationParams(), GIB)
    plain.request_postcopy("the operator asked")
    assert run(plain, [sample(0.2)]) == []


def test_after_precopy_switches_once_the_first_pass_is_done() -> None:
    steering = Steering(F.LIVE | F.POSTCOPY, MigrationParams(postcopy_after_precopy=True), GIB)
    assert run(steering, [sample(t / 10) for t in range(1, 30)]) == []
    moves = run(steering, [sample(3.1, passes=2), sample(3.2, passes=3)])
    assert len(moves) == 1 and isinstance(moves[0], SwitchToPostcopy)
    assert "first full pass" in moves[0].reason


def test_no_switch_outside_active_precopy() -> None:
    steering = Steering(F.LIVE | F.POSTCOPY, MigrationParams(postcopy_after_precopy=True), GIB)
    assert run(steering, [sample(1.0, passes=2, status="setup"),
                          sample(1.1, passes=2, status="device")]) == []  # fmt: skip


def test_timeout_actions() -> None:
    def fire(flags: F, action: str | None) -> list[object]:
        params = MigrationParams(timeout_s=2.0, timeout_action=action)
        return run(Steering(flags, params, GIB), [sample(1.0), sample(2.5), sample(3.0)])

    suspend = fire(F.LIVE, None)  # virsh's default
    assert len(suspend) == 1 and isinstance(suspend[0], Suspend)
    assert "--timeout 2s" in suspend[0].reason
    abort = fire(F.LIVE, "abort")
    assert len(abort) == 1 and isinstance(abort[0], Abort)
    post = fire(F.LIVE | F.POSTCOPY, "postcopy")
    assert len(post) == 1 and isinstance(post[0], SwitchToPostcopy)


def test_without_deadline_the_controller_only_predicts() -> None:
    steering = Steering(F.LIVE | F.POSTCOPY, MigrationParams(bandwidth_mib=128), GIB)
    assert not steering.controlled and steering.plan == "" and steering.setup() is None
    moves = run(steering, [sample(t / 10, rate_pages=70000) for t in range(1, 40)])
    assert moves == []


def test_deadline_puts_the_controller_in_charge() -> None:
    params = MigrationParams(deadline_s=10, max_downtime_ms=500, max_throttle_pct=50,
                             bandwidth_mib=128)  # fmt: skip
    steering = Steering(F.LIVE | F.POSTCOPY, params, GIB)
    assert steering.controlled and steering.plan
    setup = steering.setup()
    assert setup is not None and "downtime-limit" in setup.params
    assert setup.params["downtime-limit"] <= 500
    # Throttling allowed: auto-converge must be on before the stream starts.
    assert setup.caps.get("auto-converge") and setup.params["max-cpu-throttle"] <= 50
    # A guest dirtying 256 MiB/s of its 256 MiB against 128 MiB/s: the
    # controller moves a lever (and only those it may).
    moves = run(steering, [sample(t / 10, rate_pages=65536, passes=1 + t // 20)
                           for t in range(1, 60)])  # fmt: skip
    assert moves
    for move in moves:
        assert move.reason  # type: ignore[attr-defined]
        if isinstance(move, Tune):
            assert move.params.get("downtime-limit", 0) <= 500
            assert move.params.get("max-cpu-throttle", 0) <= 50
    assert sum(isinstance(m, SwitchToPostcopy) for m in moves) <= 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.integers(0, 2 * GIB),
                          st.integers(0, 10**6), st.integers(0, 20),
                          st.sampled_from(["setup", "active", "postcopy-active", "device"])),
                max_size=40))  # fmt: skip
def test_any_samples_any_order_never_raise_and_eta_is_json(
    raw: list[tuple[float, int, int, int, str]],
) -> None:
    steering = Steering(F.LIVE | F.POSTCOPY,
                        MigrationParams(deadline_s=10, max_throttle_pct=50), GIB)  # fmt: skip
    switches = 0
    for t, remaining, rate, passes, status in raw:
        stats = sample(t, remaining=remaining, rate_pages=rate, passes=passes, status=status)
        switches += sum(isinstance(m, SwitchToPostcopy) for m in steering.tick(stats, t))
        eta = steering.eta_s()
        assert eta is None or math.isfinite(eta)
    assert switches <= 1
