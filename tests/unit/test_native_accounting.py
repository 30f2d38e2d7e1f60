"""Transfer accounting, run twice (compiled ``ferry_native`` and the reference) and compared."""

from __future__ import annotations

import importlib
import json
import math
import pickle
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ferry_native
import ferry_native.reference
from ferry_native import _accounting as native_accounting
from ferry_native.reference import accounting as reference_accounting

BACKENDS = ["ferry_native", "ferry_native.reference"]
MB = 1_000_000


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> ModuleType:
    """The module under test: the compiled package or the pure-Python reference."""
    return importlib.import_module(request.param)


def _feed_all(backend: ModuleType, samples: list[dict[str, Any]], **kwargs: Any) -> Any:
    account = backend.TransferAccount(**kwargs)
    for s in samples:
        account.feed(backend.Sample(**s))
    return account


def _steady(
    n: int,
    *,
    bandwidth: float = 100 * MB,
    remaining: int = 4000 * MB,
    drain: float | None = None,
    dirty_pages_rate: float = 0.0,
) -> list[dict[str, Any]]:
    """``n`` samples one second apart at a constant bandwidth; remaining drains at ``drain``/s."""
    drain = bandwidth if drain is None else drain
    return [
        {
            "time_s": 1000.0 + i,
            "transferred": int(i * bandwidth),
            "remaining": max(0, int(remaining - i * drain)),
            "total": 8000 * MB,
            "dirty_pages_rate": dirty_pages_rate,
        }
        for i in range(n)
    ]


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return type(a) is type(b) and a == b


def _assert_same_snapshot(native: dict[str, Any], reference: dict[str, Any]) -> None:
    assert native.keys() == reference.keys()
    for key in native:
        assert _same(native[key], reference[key]), (key, native[key], reference[key])


# -- hand-checked cases ------------------------------------------------------


def test_nothing_before_two_samples(backend: ModuleType) -> None:
    account = backend.TransferAccount()
    assert account.samples == 0
    assert account.bandwidth == 0.0
    assert account.converging is None
    assert account.predicted_remaining_s() is None
    assert account.predicted_downtime_s(0.3) == 0.0  # nothing known to remain
    account.feed(backend.Sample(0.0, 0, 100, 100, dirty_pages_rate=10))
    assert account.samples == 1
    assert account.bandwidth == 0.0
    assert account.smoothed_bandwidth == 0.0
    assert account.dirty_rate == 10 * 4096
    assert account.predicted_downtime_s(0.3) == math.inf
    assert not account.will_meet(0.3)
    assert account.snapshot()["stop_copy_s"] is None


def test_steady_bandwidth(backend: ModuleType) -> None:
    account = _feed_all(backend, _steady(5))
    assert account.bandwidth == pytest.approx(100 * MB)
    assert account.smoothed_bandwidth == pytest.approx(100 * MB)
    assert account.transferred == 400 * MB
    assert account.remaining == 3600 * MB
    assert account.total == 8000 * MB
    assert account.samples == 5


def test_ewma(backend: ModuleType) -> None:
    account = backend.TransferAccount(smoothing=0.3)
    account.feed(backend.Sample(0.0, 0, 0, 0))
    account.feed(backend.Sample(1.0, 100, 0, 0))
    account.feed(backend.Sample(2.0, 300, 0, 0))
    assert account.bandwidth == pytest.approx(200.0)
    assert account.smoothed_bandwidth == pytest.approx(0.3 * 200 + 0.7 * 100)
    account.feed(backend.Sample(4.0, 300, 0, 0))  # a stall over two seconds
    assert account.bandwidth == 0.0
    assert account.smoothed_bandwidth == pytest.approx(0.7 * 130)


def test_converging_and_prediction(backend: ModuleType) -> None:
    """Remaining drains at the bandwidth: converging, done in remaining / bandwidth."""
    samples = _steady(8)
    account = _feed_all(backend, samples[:7], window=8)
    assert account.converging is None  # window not full yet
    account.feed(backend.Sample(**samples[7]))
    assert account.converging is True
    remaining = 4000 * MB - 7 * 100 * MB
    assert account.predicted_remaining_s() == pytest.approx(remaining / (100 * MB))
    # Down to what fits 0.5 s of downtime: 50 MB less to go.
    assert account.predicted_remaining_s(0.5) == pytest.approx((remaining - 50 * MB) / (100 * MB))
    assert account.predicted_downtime_s(0.3) == pytest.approx(0.3)  # qemu waits for it
    assert account.will_meet(0.3)
    assert account.snapshot()["stop_copy_s"] == pytest.approx(remaining / (100 * MB))


def test_dirty_rate_above_bandwidth_not_converging(backend: ModuleType) -> None:
    # 50k pages/s * 4 KiB = 204.8 MB/s dirtied against 100 MB/s sent.
    samples = _steady(10, dirty_pages_rate=50_000)
    account = _feed_all(backend, samples)
    assert account.dirty_rate == pytest.approx(50_000 * 4096)
    assert account.converging is False
    assert account.predicted_remaining_s() is None
    remaining = 4000 * MB - 9 * 100 * MB
    assert account.predicted_downtime_s(0.3) == pytest.approx(remaining / (100 * MB))
    assert not account.will_meet(0.3)
    assert account.will_meet(100.0)  # fits a generous limit already


def test_remaining_flat_not_converging(backend: ModuleType) -> None:
    account = _feed_all(backend, _steady(8, drain=0))
    assert account.converging is False
    assert account.predicted_remaining_s() is None


def test_sawtooth_trend(backend: ModuleType) -> None:
    """Remaining jumps at each bitmap sync, but trends down over the window."""
    samples = []
    remaining = 1000 * MB
    for i in range(12):
        if i % 3 == 0 and i:
            remaining += 150 * MB  # dirty pages found at the sync
        else:
            remaining -= 100 * MB
        samples.append(
            {"time_s": float(i), "transferred": i * 100 * MB, "remaining": remaining, "total": 0}
        )
    account = _feed_all(backend, samples, window=6)
    assert account.converging is True


def test_done_is_converging(backend: ModuleType) -> None:
    samples = _steady(3, remaining=150 * MB)
    samples.append({**samples[-1], "time_s": 1010.0, "remaining": 0})
    account = _feed_all(backend, samples, window=2)
    assert account.converging is True
    assert account.predicted_remaining_s() == 0.0
    assert account.predicted_downtime_s(0.0) == 0.0
    assert account.will_meet(0.0)


def test_tunnel_bandwidth(backend: ModuleType) -> None:
    account = backend.TransferAccount(smoothing=0.5)
    account.feed_relay(10.0, 0)
    assert account.tunnel_bandwidth == 0.0
    account.feed_relay(11.0, 1000)
    assert account.tunnel_bandwidth == pytest.approx(1000.0)
    account.feed_relay(12.0, 4000)
    assert account.tunnel_bandwidth == pytest.approx(0.5 * 3000 + 0.5 * 1000)
    assert account.samples == 0  # qemu's samples are accounted apart
    with pytest.raises(ValueError, match="not after"):
        account.feed_relay(12.0, 5000)
    with pytest.raises(ValueError, match="backwards"):
        account.feed_relay(13.0, 3999)
    with pytest.raises(ValueError):
        account.feed_relay(13.0, -1)
    assert account.tunnel_bandwidth == pytest.approx(2000.0)


def test_snapshot_is_json(backend: ModuleType) -> None:
    account = _feed_all(backend, _steady(9, dirty_pages_rate=100))
    account.feed_relay(0.0, 0)
    account.feed_relay(1.0, 10)
    snap = account.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["samples"] == 9
    assert snap["converging"] is True
    expected = {
        "samples",
        "iteration",
        "throttle_pct",
        "transferred",
        "remaining",
        "total",
        "bandwidth",
        "smoothed_bandwidth",
        "dirty_rate",
        "tunnel_bandwidth",
        "converging",
        "predicted_remaining_s",
        "stop_copy_s",
    }
    assert set(snap) == expected
    json.dumps(backend.TransferAccount().snapshot(), allow_nan=False)


def test_iteration_and_throttle(backend: ModuleType) -> None:
    account = backend.TransferAccount()
    account.feed(backend.Sample(1.0, 0, 5, 10, 0.0, 4096, 3, 20))
    assert (account.iteration, account.throttle_pct) == (3, 20)


# -- invalid input -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"transferred": -1},
        {"remaining": -1},
        {"total": -5},
        {"time_s": math.nan},
        {"time_s": math.inf},
        {"dirty_pages_rate": -1.0},
        {"dirty_pages_rate": math.nan},
        {"page_size": 0},
        {"iteration": -1},
        {"throttle_pct": 101},
        {"throttle_pct": -1},
        {"transferred": 1 << 63},
    ],
)
def test_invalid_sample(backend: ModuleType, kwargs: dict[str, Any]) -> None:
    args = {"time_s": 1.0, "transferred": 0, "remaining": 0, "total": 0, **kwargs}
    with pytest.raises(ValueError):
        backend.Sample(**args)


def test_sample_types(backend: ModuleType) -> None:
    with pytest.raises(TypeError):
        backend.Sample(1.0, 1.5, 0, 0)
    with pytest.raises((TypeError, ValueError)):
        backend.Sample("soon", 0, 0, 0)


def test_time_must_increase(backend: ModuleType) -> None:
    account = backend.TransferAccount()
    account.feed(backend.Sample(5.0, 100, 10, 10))
    before = account.snapshot()
    for sample in (backend.Sample(5.0, 200, 10, 10), backend.Sample(4.0, 200, 10, 10)):
        with pytest.raises(ValueError, match="not after"):
            account.feed(sample)
    with pytest.raises(ValueError, match="backwards"):
        account.feed(backend.Sample(6.0, 99, 10, 10))
    assert account.snapshot() == before  # refused samples change nothing


def test_feed_wrong_type(backend: ModuleType) -> None:
    account = backend.TransferAccount()
    other = (ferry_native.reference if backend.BACKEND == "native" else ferry_native).Sample(
        1.0, 0, 0, 0
    )
    for bad in (other, {"time_s": 1.0}, None):
        with pytest.raises(TypeError):
            account.feed(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"smoothing": 0.0},
        {"smoothing": 1.5},
        {"smoothing": math.nan},
        {"window": 1},
        {"window": 1 << 20},
    ],
)
def test_invalid_account(backend: ModuleType, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        backend.TransferAccount(**kwargs)


def test_invalid_limit(backend: ModuleType) -> None:
    account = backend.TransferAccount()
    for limit in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError):
            account.predicted_downtime_s(limit)
        with pytest.raises(ValueError):
            account.will_meet(limit)
        with pytest.raises(ValueError):
            account.predicted_remaining_s(limit)


# -- Sample value semantics --------------------------------------------------


def test_sample_value(backend: ModuleType) -> None:
    a = backend.Sample(1, 2, 3, 4, 5, 4096, 6, 7)
    b = backend.Sample(1.0, 2, 3, 4, 5.0, 4096, 6, 7)
    assert a == b
    assert hash(a) == hash(b)
    assert a != backend.Sample(1.0, 2, 3, 4)
    assert pickle.loads(pickle.dumps(a)) == a
    assert isinstance(a.time_s, float)
    assert isinstance(a.dirty_pages_rate, float)
    with pytest.raises(AttributeError):
        a.remaining = 0


def test_same_api() -> None:
    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    args = (1.0, 2, 3, 4)
    assert public(ferry_native.Sample(*args)) == public(ferry_native.reference.Sample(*args))
    assert public(ferry_native.TransferAccount()) == public(
        ferry_native.reference.TransferAccount()
    )


def test_sample_repr_matches() -> None:
    args = (1.5, 2, 3, 4, 5.25, 4096, 6, 7)
    assert repr(ferry_native.Sample(*args)) == repr(ferry_native.reference.Sample(*args))


def test_model_documented_identically() -> None:
    def model(doc: str | None) -> str:
        assert doc
        return doc[doc.index("The model") :]

    assert model(native_accounting.__doc__) == model(reference_accounting.__doc__)


# -- native == reference on generated sequences -----------------------------

_sample_step = st.tuples(
    st.just("sample"),
    st.floats(1e-3, 10.0),  # time step
    st.integers(0, 1 << 32),  # transferred increase
    st.integers(-(1 << 32), 1 << 31),  # remaining change: mostly draining, with syncs
    st.one_of(st.just(0.0), st.floats(0.0, 1e5)),  # dirty pages/s
    st.integers(0, 100),  # throttle
)
_step = st.one_of(
    _sample_step,
    _sample_step,
    _sample_step,
    st.tuples(st.just("relay"), st.floats(1e-3, 10.0), st.integers(0, 1 << 32)),
    st.tuples(st.just("bad"), st.sampled_from(["time", "transferred", "relay-time"])),
)


def _apply(backend: ModuleType, account: Any, state: dict[str, Any], step: tuple[Any, ...]) -> Any:
    """Apply one generated step; return what it raised (class) or None."""
    try:
        if step[0] == "sample":
            _, dt, inc, change, dirty, throttle = step
            state["t"] += dt
            state["transferred"] += inc
            state["remaining"] = max(0, state["remaining"] + change)
            state["iteration"] += 1
            account.feed(
                backend.Sample(
                    state["t"],
                    state["transferred"],
                    state["remaining"],
                    1 << 40,
                    dirty,
                    state["page_size"],
                    state["iteration"] // 3,
                    throttle,
                )
            )
        elif step[0] == "relay":
            _, dt, inc = step
            state["rt"] += dt
            state["rbytes"] += inc
            account.feed_relay(state["rt"], state["rbytes"])
        elif step[1] == "time":
            account.feed(backend.Sample(state["t"], state["transferred"], 0, 0))
        elif step[1] == "transferred":
            account.feed(backend.Sample(state["t"] + 1, state["transferred"] - 1, 0, 0))
        else:
            account.feed_relay(state["rt"], state["rbytes"])
    except ValueError:
        return ValueError
    return None


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(_step, max_size=50),
    smoothing=st.floats(0.01, 1.0),
    window=st.integers(2, 12),
    page_size=st.sampled_from([4096, 65536, 2 << 20]),
    start=st.floats(-1e6, 1e9),
    remaining=st.integers(0, 1 << 40),
    limits=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=3),
)
def test_backends_agree(
    steps: list[tuple[Any, ...]],
    smoothing: float,
    window: int,
    page_size: int,
    start: float,
    remaining: int,
    limits: list[float],
) -> None:
    accounts = []
    for backend in (ferry_native, ferry_native.reference):
        state = {
            "t": start,
            "transferred": 0,
            "remaining": remaining,
            "iteration": 0,
            "rt": start,
            "rbytes": 0,
            "page_size": page_size,
        }
        account = backend.TransferAccount(smoothing=smoothing, window=window)
        trace = []
        for step in steps:
            raised = _apply(backend, account, dict(state) if step[0] == "bad" else state, step)
            figures: dict[str, Any] = dict(account.snapshot())
            for limit in limits:
                figures[f"downtime@{limit}"] = account.predicted_downtime_s(limit)
                figures[f"meet@{limit}"] = account.will_meet(limit)
                figures[f"remaining_s@{limit}"] = account.predicted_remaining_s(limit)
            trace.append((raised, figures))
        accounts.append(trace)
    native, reference = accounts
    for (n_raised, n_figures), (r_raised, r_figures) in zip(native, reference, strict=True):
        assert n_raised is r_raised
        _assert_same_snapshot(n_figures, r_figures)
