# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Transfer accounting of a live migration, compiled (native backend).

A :class:`TransferAccount` is fed successive samples of qemu's migration
statistics (the ``ram`` section of QMP ``query-migrate``, plus the time it was
taken) and derives the figures that progress events, ferryctl and the
convergence policy need.  ``ferry_native.reference.accounting`` is the same
model in pure Python; both give the same answers (the test suite compares
them, and checks that this description matches the reference's).

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

cdef extern from *:
    # No fused multiply-add (GCC contracts a*b + c*d by default when the
    # target has FMA, e.g. -march=native): the reference rounds each
    # operation, and both backends must give the same bits.  A pragma, since
    # setuptools' Cython build drops "# distutils:" compile flags.
    """
    #if defined(__clang__)
    #pragma clang fp contract(off)
    #elif defined(__GNUC__)
    #pragma GCC optimize ("fp-contract=off")
    #endif
    """

from libc.math cimport INFINITY, isinf, isfinite
from libc.stdint cimport int64_t
from libc.stdlib cimport free, malloc

import operator

__all__ = ["MAX_COUNT", "MAX_WINDOW", "Sample", "TransferAccount"]

# Counters are 64-bit in qemu and here; the reference refuses the same range.
MAX_COUNT = (1 << 63) - 1
MAX_WINDOW = 1 << 16


def _count(str name, value, minimum=0, maximum=MAX_COUNT):
    # Same checks and messages as the reference's _count.
    number = operator.index(value)
    if number < minimum or number > maximum:
        raise ValueError(f"{name} must be between {minimum} and {maximum}, not {number}")
    return number


def _real(str name, value, minimum=None):
    # Same checks and messages as the reference's _real.
    cdef double number = float(value)
    if not isfinite(number):
        raise ValueError(f"{name} must be finite, not {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be at least {minimum}, not {number}")
    return number


cdef class Sample:
    """One sample of qemu's migration statistics, taken at ``time_s`` seconds.

    Raises:
        ValueError: a negative or out-of-range count, ``page_size < 1``,
            ``throttle_pct`` outside 0..100, a non-finite time or rate.
        TypeError: a count that is not an integer, a time that is not a number.
    """

    def __init__(self, time_s, transferred, remaining, total, dirty_pages_rate=0.0,
                 page_size=4096, iteration=0, throttle_pct=0):
        # Validate everything before assigning anything (as the reference).
        cdef double t = _real("time_s", time_s)
        cdef int64_t tr = _count("transferred", transferred)
        cdef int64_t rem = _count("remaining", remaining)
        cdef int64_t tot = _count("total", total)
        cdef double dpr = _real("dirty_pages_rate", dirty_pages_rate, 0.0)
        cdef int64_t ps = _count("page_size", page_size, 1)
        cdef int64_t it = _count("iteration", iteration)
        cdef int64_t thr = _count("throttle_pct", throttle_pct, 0, 100)
        self.time_s = t
        self.transferred = tr
        self.remaining = rem
        self.total = tot
        self.dirty_pages_rate = dpr
        self.page_size = ps
        self.iteration = it
        self.throttle_pct = thr

    cdef tuple _fields(self):
        return (self.time_s, self.transferred, self.remaining, self.total,
                self.dirty_pages_rate, self.page_size, self.iteration, self.throttle_pct)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._fields() == (<Sample>other)._fields()

    def __hash__(self):
        return hash(self._fields())

    def __reduce__(self):
        return (Sample, self._fields())

    def __repr__(self):
        return (
            f"Sample(time_s={self.time_s!r}, transferred={self.transferred!r}, "
            f"remaining={self.remaining!r}, total={self.total!r}, "
            f"dirty_pages_rate={self.dirty_pages_rate!r}, page_size={self.page_size!r}, "
            f"iteration={self.iteration!r}, throttle_pct={self.throttle_pct!r})"
        )


cdef class TransferAccount:
    """Derived figures of one migration's transfer, fed with :class:`Sample` objects.

    Raises:
        ValueError: ``smoothing`` outside (0, 1] or ``window`` outside
            2..``MAX_WINDOW``.
    """

    def __cinit__(self):
        self._pt = NULL
        self._pr = NULL

    def __init__(self, *, smoothing=0.3, window=8):
        cdef double alpha = _real("smoothing", smoothing)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], not {alpha}")
        cdef Py_ssize_t size = _count("window", window, 2, MAX_WINDOW)
        free(self._pt)
        free(self._pr)
        self._pt = <double *>malloc(size * sizeof(double))
        self._pr = <double *>malloc(size * sizeof(double))
        if self._pt == NULL or self._pr == NULL:
            raise MemoryError()
        self._alpha = alpha
        self._window = size
        self._head = 0
        self._npoints = 0
        self._samples = 0
        self._last = None
        self._bandwidth = 0.0
        self._smoothed = 0.0
        self._dirty = 0.0
        self._relay_samples = 0
        self._relay_time = 0.0
        self._relay_bytes = 0
        self._tunnel = 0.0

    def __dealloc__(self):
        free(self._pt)
        free(self._pr)

    def feed(self, sample):
        """Account one more sample; samples must come in time order.

        Raises:
            TypeError: ``sample`` is not a :class:`Sample` of this backend.
            ValueError: its time is not after the previous sample's, or its
                ``transferred`` is below the previous one.  The account is
                unchanged.
        """
        if not isinstance(sample, Sample):
            raise TypeError(f"feed() needs a Sample, not {type(sample).__name__}")
        cdef Sample s = <Sample>sample
        cdef Sample last = self._last
        cdef double alpha = self._alpha
        cdef double dirty
        cdef double rate
        if last is not None:
            if not s.time_s > last.time_s:
                raise ValueError(
                    f"sample time {s.time_s!r} is not after the previous {last.time_s!r}"
                )
            if s.transferred < last.transferred:
                raise ValueError(
                    f"transferred went backwards: {s.transferred} < {last.transferred}"
                )
        # Same operations in the same order as the reference: same bits.
        dirty = s.dirty_pages_rate * <double>s.page_size
        if last is None:
            self._dirty = dirty
        else:
            self._dirty = alpha * dirty + (1.0 - alpha) * self._dirty
            rate = <double>(s.transferred - last.transferred) / (s.time_s - last.time_s)
            self._bandwidth = rate
            if self._samples == 1:
                self._smoothed = rate
            else:
                self._smoothed = alpha * rate + (1.0 - alpha) * self._smoothed
        self._pt[self._head] = s.time_s
        self._pr[self._head] = <double>s.remaining
        self._head = (self._head + 1) % self._window
        if self._npoints < self._window:
            self._npoints += 1
        self._samples += 1
        self._last = s

    def feed_relay(self, time_s, bytes_through):
        """Account the tunnel relay's byte counter (``Relay.bytes_copied``) at ``time_s``.

        Raises:
            ValueError: time not after the previous relay sample's, a negative
                count, or a count below the previous one.
        """
        cdef double t = _real("time_s", time_s)
        cdef int64_t count = _count("bytes_through", bytes_through)
        cdef double rate
        if self._relay_samples:
            if not t > self._relay_time:
                raise ValueError(
                    f"relay sample time {t!r} is not after the previous {self._relay_time!r}"
                )
            if count < self._relay_bytes:
                raise ValueError(
                    f"bytes_through went backwards: {count} < {self._relay_bytes}"
                )
            rate = <double>(count - self._relay_bytes) / (t - self._relay_time)
            if self._relay_samples == 1:
                self._tunnel = rate
            else:
                self._tunnel = self._alpha * rate + (1.0 - self._alpha) * self._tunnel
        self._relay_time = t
        self._relay_bytes = count
        self._relay_samples += 1

    cdef double _slope(self) noexcept:
        # Least-squares slope of remaining against time over the window, in
        # the reference's order of operations (oldest point first).
        cdef Py_ssize_t n = self._npoints
        cdef Py_ssize_t start = (self._head - n + self._window) % self._window
        cdef Py_ssize_t i, j
        cdef double t0 = self._pt[start]
        cdef double mean_t = 0.0
        cdef double mean_r = 0.0
        cdef double sxy = 0.0
        cdef double sxx = 0.0
        cdef double dt
        for i in range(n):
            j = (start + i) % self._window
            mean_t += self._pt[j] - t0
            mean_r += self._pr[j]
        mean_t /= <double>n
        mean_r /= <double>n
        for i in range(n):
            j = (start + i) % self._window
            dt = (self._pt[j] - t0) - mean_t
            sxy += dt * (self._pr[j] - mean_r)
            sxx += dt * dt
        if not sxx > 0.0:
            return 0.0
        return sxy / sxx

    cdef object _converging(self):
        if self._samples < self._window or self._last is None:
            return None
        if self._last.remaining == 0:
            return True
        return self._slope() < 0.0 and self._smoothed > self._dirty

    @property
    def converging(self):
        """Remaining trends down and bandwidth beats dirty rate? None before ``window`` samples."""
        return self._converging()

    def predicted_remaining_s(self, downtime_limit_s=0.0):
        """Seconds until remaining reaches the switch-over threshold; None unless converging.

        The threshold is what can be sent within ``downtime_limit_s`` at the
        smoothed bandwidth (0: until nothing remains).

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        cdef double limit = _real("downtime_limit_s", downtime_limit_s, 0.0)
        cdef double left
        if self._converging() is not True or self._last is None:
            return None
        left = <double>self._last.remaining - self._smoothed * limit
        if left <= 0.0:
            return 0.0
        return left / (self._smoothed - self._dirty)

    cdef double _stop_copy_s(self) noexcept:
        if self._last is None or self._last.remaining == 0:
            return 0.0
        if self._smoothed <= 0.0:
            return INFINITY
        return <double>self._last.remaining / self._smoothed

    def predicted_downtime_s(self, downtime_limit_s):
        """Predicted downtime of the switch-over: remaining / smoothed bandwidth.

        Capped at ``downtime_limit_s`` while converging, since qemu then waits
        until the stop-and-copy fits the limit.  ``inf`` when remaining > 0 and
        no bandwidth was measured.

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        cdef double limit = _real("downtime_limit_s", downtime_limit_s, 0.0)
        cdef double now = self._stop_copy_s()
        if self._converging() is True and now > limit:
            return limit
        return now

    def will_meet(self, downtime_limit_s):
        """Whether the migration fits ``downtime_limit_s``: now, or by converging.

        Raises:
            ValueError: a negative or non-finite ``downtime_limit_s``.
        """
        return self.predicted_downtime_s(downtime_limit_s) <= float(downtime_limit_s)

    def snapshot(self):
        """All figures as a flat dict for progress events and JSON.

        ``stop_copy_s`` is the uncapped stop-and-copy time (None instead of
        inf, so the dict stays valid JSON).
        """
        cdef double stop_copy = self._stop_copy_s()
        return {
            "samples": self.samples,
            "iteration": self.iteration,
            "throttle_pct": self.throttle_pct,
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "bandwidth": self._bandwidth,
            "smoothed_bandwidth": self._smoothed,
            "dirty_rate": self._dirty,
            "tunnel_bandwidth": self._tunnel,
            "converging": self._converging(),
            "predicted_remaining_s": self.predicted_remaining_s(),
            "stop_copy_s": None if isinf(stop_copy) else stop_copy,
        }

    @property
    def smoothing(self):
        """EWMA weight of the newest interval."""
        return self._alpha

    @property
    def window(self):
        """Number of samples the convergence trend looks at."""
        return self._window

    @property
    def samples(self):
        """Number of samples fed."""
        return self._samples

    @property
    def bandwidth(self):
        """Bytes/s over the last interval (0 until two samples)."""
        return self._bandwidth

    @property
    def smoothed_bandwidth(self):
        """EWMA of ``bandwidth`` (0 until two samples)."""
        return self._smoothed

    @property
    def dirty_rate(self):
        """EWMA of dirty_pages_rate * page_size, bytes/s."""
        return self._dirty

    @property
    def tunnel_bandwidth(self):
        """EWMA of the relay's bytes/s (0 until two relay samples)."""
        return self._tunnel

    @property
    def throttle_pct(self):
        """CPU throttle of the last sample."""
        return self._last.throttle_pct if self._last is not None else 0

    @property
    def iteration(self):
        """qemu's dirty-sync count of the last sample."""
        return self._last.iteration if self._last is not None else 0

    @property
    def transferred(self):
        """Bytes transferred as of the last sample."""
        return self._last.transferred if self._last is not None else 0

    @property
    def remaining(self):
        """Bytes remaining as of the last sample."""
        return self._last.remaining if self._last is not None else 0

    @property
    def total(self):
        """Total guest RAM bytes as of the last sample."""
        return self._last.total if self._last is not None else 0

    def __repr__(self):
        return (
            f"<TransferAccount samples={self._samples} remaining={self.remaining} "
            f"smoothed_bandwidth={self._smoothed:.0f} converging={self._converging()}>"
        )
