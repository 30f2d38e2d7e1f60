"""Transfer accounting of a live migration, in pure Python (reference backend).

A :class:`TransferAccount` is fed successive samples of qemu's migration
statistics (the ``ram`` section of QMP ``query-migrate``, plus the time it was
taken) and derives the figures that progress events, ferryctl and the
convergence policy need.  ``ferry_native._accounting`` is the compiled
version; both give the same answers (the test suite compares them), so this
module is the readable specification of the model.

The model
---------
Sampled values (``Sample``): ``time_s`` (any clock, seconds), ``transferred``
(bytes sent so far, cumulative, counts re-sent dirty pages), ``remaining``
(bytes still to send as of qemu's last dirty-bitmap sync), ``total`` (guest
RAM), ``dirty_pages_rate`` (pages/s, qemu's own estimate of the last
iteration), ``page_size``, ``iteration`` (qemu's ``dirty-sync-count``) and
``throttle_pct`` (auto-converge CPU throttle).

*Bandwidth* -- ``bandwidth`` is the raw rate of the last interval, the
increase of ``transferred`` over the increase of ``time_s``; 0 until two
samples.  ``smoothed_bandwidth`` is its exponentially weighted moving average
(EWMA), ``s = a*b + (1 - a)*s`` with ``a = smoothing``, seeded with the first
interval's rate.

*Dirty rate* -- ``dirty_rate = dirty_pages_rate * page_size`` in bytes/s,
smoothed by the same EWMA, seeded with the first sample.

*Tunnel* -- :meth:`TransferAccount.feed_relay` takes the relay's byte counter
(``Relay.bytes_copied``) with its time; ``tunnel_bandwidth`` is the EWMA of its
interval rates (0 until two relay samples).  It is tracked apart from qemu's
figures: the two counters are sampled at different moments.

*Convergence* -- ``converging`` is ``None`` until ``window`` samples were fed.
Then it is true when ``remaining`` is 0, or when both
(1) the least-squares slope of ``remaining`` against time over the last
``window`` samples is negative (remaining is trending down; the window spans
qemu's saw-tooth of per-iteration bitmap syncs, so one sync does not flip the
verdict), and (2) ``smoothed_bandwidth > dirty_rate`` (the guest dirties
memory more slowly than it is sent, so each iteration is shorter than the
last).  Otherwise false.

*Predictions* -- with ``B = smoothed_bandwidth``, ``D = dirty_rate`` and
``R = remaining``:

- ``predicted_remaining_s(L)``: time until ``R`` shrinks to the switch-over
  threshold ``B*L`` (what qemu can send within the downtime limit ``L``; the
  default ``L = 0`` means "until nothing is left"), draining at the net rate
  ``B - D``: ``max(0, R - B*L) / (B - D)``.  ``None`` unless converging.
- ``predicted_downtime_s(L)``: how long the final stop-and-copy would take,
  ``R / B`` (``inf`` if nothing was measured yet and ``R > 0``).  When the
  migration is converging, qemu waits until the stop-and-copy fits ``L``, so
  the prediction is capped at ``L``.
- ``will_meet(L)``: ``predicted_downtime_s(L) <= L``, i.e. the data left fits
  the limit now, or the migration converges towards it.

Limits: the model is linear and the future is assumed to look like the
window.  qemu's ``remaining`` only grows at bitmap syncs, so between syncs
the slope looks better than the truth (criterion 2 guards against that);
``dirty_pages_rate`` is itself an average over qemu's last iteration; a change
of guest workload, of the bandwidth limit or of the throttle shows up only
after a few samples (speed set by ``smoothing``).  Compression, multifd and
xbzrle change what a "byte" costs and are not modelled.

Invalid input raises :class:`ValueError` and leaves the account unchanged:
negative counts, non-finite times or rates, a time not after the previous
sample's, ``transferred`` going backwards (a new migration needs a new
account).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass
from typing import SupportsFloat, SupportsIndex

__all__ = ["MAX_COUNT", "MAX_WINDOW", "Sample", "TransferAccount"]

# Counters are 64-bit in qemu and in the native backend; beyond that both
# backends refuse the value rather than disagree.
MAX_COUNT = (1 << 63) - 1
MAX_WINDOW = 1 << 16


def _count(name: str, value: SupportsIndex, minimum: int = 0, maximum: int = MAX_COUNT) -> int:
    """Return ``value`` as an int in ``minimum..maximum``.

    Raises:
        TypeError: not an integer.
        ValueError: out of range.
    """
    number = operator.index(value)
    if number < minimum or number > maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, not {number}")
    return number


def _real(name: str, value: SupportsFloat, minimum: float | None = None) -> float:
    """Return ``value`` as a finite float, at least ``minimum`` if given.

    Raises:
        TypeError: not a real number.
        ValueError: NaN, infinite or below ``minimum``.
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, not {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {number}")
    return number


@dataclass(frozen=True, init=False)
class Sample:
    """One sample of qemu's migration statistics, taken at ``time_s`` seconds.

    Raises:
        ValueError: a negative or out-of-range count, ``page_size < 1``,
            ``throttle_pct`` outside 0..100, a non-finite time or rate.
        TypeError: a count that is not an integer, a time that is not a number.
    """

    time_s: float
    transferred: int
    remaining: int
    total: int
    dirty_pages_rate: float
    page_size: int
    iteration: int
    throttle_pct: int

    def __init__(
        self,
        time_s: float,
        transferred: int,
        remaining: int,
        total: int,
        dirty_pages_rate: float = 0.0,
        page_size: int = 4096,
        iteration: int = 0,
        throttle_pct: int = 0,
    ) -> None:
        # frozen: assign through object.__setattr__, once, after validation.
        values = {
            "time_s": _real("time_s", time_s),
            "transferred": _count("transferred", transferred),
            "remaining": _count("remaining", remaining),
            "total": _count("total", total),
            "dirty_pages_rate": _real("dirty_pages_rate", dirty_pages_rate, 0.0),
            "page_size": _count("page_size", page_size, 1),
            "iteration": _count("iteration", iteration),
            "throttle_pct": _count("throttle_pct", throttle_pct, 0, 100),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)


class TransferAccount:
    """Derived figures of one migration's transfer, fed with :class:`Sample` objects.

    Raises:
        ValueError: ``smoothing`` outside (0, 1] or ``window`` outside
            2..``MAX_WINDOW``.
    """

    def __init__(self, *, smoothing: float = 0.3, window: int = 8) -> None:
        alpha = _real("smoothing", smoothing)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], not {alpha}")
        self._alpha = alpha
        self._window = _count("window", window, 2, MAX_WINDOW)
        # (time_s, remaining as float) of the last `window` samples, oldest first.
        self._points: deque[tuple[float, float]] = deque(maxlen=self._window)
        self._samples = 0
        self._last: Sample | None = None
        self._bandwidth = 0.0
        self._smoothed = 0.0
        self._dirty = 0.0
        self._relay_samples = 0
        self._relay_time = 0.0
        self._relay_bytes = 0
        self._tunnel = 0.0

    def feed(self, sample: Sample) -> None:
        """Account one more sample; samples must come in time order.

        Raises:
            TypeError: ``sample`` is not a :class:`Sample` of this backend.
            ValueError: its time is not after the previous sample's, or its
                ``transferred`` is below the previous one.  The account is
                unchanged.
        """
        if not isinstance(sample, Sample):
            raise TypeError(f"feed() needs a Sample, not {type(sample).__name__}")
        last = self._last
        if last is not None:
            if not sample.time_s > last.time_s:
                raise ValueError(
                    f"sample time {sample.time_s} is not after the previous {last.time_s}"
                )
            if sample.transferred < last.transferred:
                raise ValueError(
                    f"transferred went backwards: {sample.transferred} < {last.transferred}"
                )
        alpha = self._alpha
        dirty = sample.dirty_pages_rate * sample.page_size
        if last is None:
            self._dirty = dirty
        else:
            self._dirty = alpha * dirty + (1.0 - alpha) * self._dirty
            rate = (sample.transferred - last.transferred) / (sample.time_s - last.time_s)
            self._bandwidth = rate
            if self._samples == 1:
                self._smoothed = rate
            else:
                self._smoothed = alpha * rate + (1.0 - alpha) * self._smoothed
        self._points.append((sample.time_s, float(sample.remaining)))
        self._samples += 1
        self._last = sample

    def feed_relay(self, time_s: float, bytes_through: int) -> None:
        """Account the tunnel relay's byte counter (``Relay.bytes_copied``) at ``time_s``.

        Raises:
            ValueError: time not after the previous relay sample's, a negative
                count, or a count below the previous one.
        """
        t = _real("time_s", time_s)
        count = _count("bytes_through", bytes_through)
        if self._relay_samples:
            if not t > self._relay_time:
                raise ValueError(
                    f"relay sample time {t} is not after the previous {self._relay_time}"
                )
            if count < self._relay_bytes:
                raise ValueError(f"bytes_through went backwards: {count} < {self._relay_bytes}")
            rate = (count - self._relay_bytes) / (t - self._relay_time)
            if self._relay_samples == 1:
                self._tunnel = rate
            else:
                self._tunnel = self._alpha * rate + (1.0 - self._alpha) * self._tunnel
        self._relay_time = t
        self._relay_bytes = count
        self._relay_samples += 1

    def _slope(self) -> float:
        """Least-squares slope of remaining against time over the window (bytes/s)."""
        points = self._points
        n = len(points)
        # Times relative to the oldest point keep the sums well conditioned
        # with large clock values.  Plain loops, not sum(): the native backend
        # adds in the same order and must get the same bits.
        t0 = points[0][0]
        mean_t = 0.0
        mean_r = 0.0
        for t, r in points:
            mean_t += t - t0
            mean_r += r
        mean_t /= n
        mean_r /= n
        sxy = 0.0
        sxx = 0.0
        for t, r in points:
            dt = (t - t0) - mean_t
            sxy += dt * (r - mean_r)
            sxx += dt * dt
        if not sxx > 0.0:
            # Only with times so close that their squares underflow: no trend.
            return 0.0
        return sxy / sxx

    @property
    def converging(self) -> bool | None:
        """Remaining trends down and bandwidth beats dirty rate? None before ``window`` samples."""
        if self._samples < self._window or self._last is None:
            return None
        if self._last.remaining == 0:
            return True
        return self._slope() < 0.0 and self._smoothed > self._dirty

    def predicted_remaining_s(self, downtime_limit_s: float = 0.0) -> float | None:
        """Seconds until remaining reaches the switch-over threshold; None unless converging.

        The threshold is what can be sent within ``downtime_limit_s`` at the
        smoothed bandwidth (0: until nothing remains).

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        limit = _real("downtime_limit_s", downtime_limit_s, 0.0)
        if self.converging is not True or self._last is None:
            return None
        left = self._last.remaining - self._smoothed * limit
        if left <= 0.0:
            return 0.0
        return left / (self._smoothed - self._dirty)

    def _stop_copy_s(self) -> float:
        """Seconds the stop-and-copy of what remains would take now (inf if unmeasured)."""
        remaining = self.remaining
        if remaining == 0:
            return 0.0
        if self._smoothed <= 0.0:
            return math.inf
        return remaining / self._smoothed

    def predicted_downtime_s(self, downtime_limit_s: float) -> float:
        """Predicted downtime of the switch-over: remaining / smoothed bandwidth.

        Capped at ``downtime_limit_s`` while converging, since qemu then waits
        until the stop-and-copy fits the limit.  ``inf`` when remaining > 0 and
        no bandwidth was measured.

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        limit = _real("downtime_limit_s", downtime_limit_s, 0.0)
        now = self._stop_copy_s()
        if self.converging is True and now > limit:
            return limit
        return now

    def will_meet(self, downtime_limit_s: float) -> bool:
        """Whether the migration fits ``downtime_limit_s``: now, or by converging.

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        return self.predicted_downtime_s(downtime_limit_s) <= downtime_limit_s

    def snapshot(self) -> dict[str, float | int | bool | None]:
        """All figures as a flat dict for progress events and JSON.

        ``stop_copy_s`` is the uncapped stop-and-copy time (None instead of
        inf, so the dict stays valid JSON).
        """
        stop_copy = self._stop_copy_s()
        return {
            "samples": self.samples,
            "iteration": self.iteration,
            "throttle_pct": self.throttle_pct,
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "bandwidth": self.bandwidth,
            "smoothed_bandwidth": self.smoothed_bandwidth,
            "dirty_rate": self.dirty_rate,
            "tunnel_bandwidth": self.tunnel_bandwidth,
            "converging": self.converging,
            "predicted_remaining_s": self.predicted_remaining_s(),
            "stop_copy_s": None if math.isinf(stop_copy) else stop_copy,
        }

    @property
    def smoothing(self) -> float:
        """EWMA weight of the newest interval."""
        return self._alpha

    @property
    def window(self) -> int:
        """Number of samples the convergence trend looks at."""
        return self._window

    @property
    def samples(self) -> int:
        """Number of samples fed."""
        return self._samples

    @property
    def bandwidth(self) -> float:
        """Bytes/s over the last interval (0 until two samples)."""
        return self._bandwidth

    @property
    def smoothed_bandwidth(self) -> float:
        """EWMA of ``bandwidth`` (0 until two samples)."""
        return self._smoothed

    @property
    def dirty_rate(self) -> float:
        """EWMA of dirty_pages_rate * page_size, bytes/s."""
        return self._dirty

    @property
    def tunnel_bandwidth(self) -> float:
        """EWMA of the relay's bytes/s (0 until two relay samples)."""
        return self._tunnel

    @property
    def throttle_pct(self) -> int:
        """CPU throttle of the last sample."""
        return self._last.throttle_pct if self._last is not None else 0

    @property
    def iteration(self) -> int:
        """qemu's dirty-sync count of the last sample."""
        return self._last.iteration if self._last is not None else 0

    @property
    def transferred(self) -> int:
        """Bytes transferred as of the last sample."""
        return self._last.transferred if self._last is not None else 0

    @property
    def remaining(self) -> int:
        """Bytes remaining as of the last sample."""
        return self._last.remaining if self._last is not None else 0

    @property
    def total(self) -> int:
        """Total guest RAM bytes as of the last sample."""
        return self._last.total if self._last is not None else 0

    def __repr__(self) -> str:
        return (
            f"<TransferAccount samples={self._samples} remaining={self.remaining} "
            f"smoothed_bandwidth={self._smoothed:.0f} converging={self.converging}>"
        )
