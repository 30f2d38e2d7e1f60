"""The transfer model shared by the pre-flight verdict and the controller (pure arithmetic).

Pre-copy sends RAM in passes.  Pass 0 is the guest's resident memory; every
later pass is what the guest dirtied while the previous one was sent.  qemu
stops the guest and copies the rest once what is left fits the downtime limit
``L`` at bandwidth ``B`` (``B * L`` bytes).

How much a guest dirties in ``t`` seconds is *not* ``rate * t``: a guest
rewrites its working set, so the set of pages it touched grows more slowly
than time.  ``calc-dirty-rate`` measures the set dirtied in one second,
``D``.  We model the set dirtied in ``t`` seconds as ``D * t`` up to one
second and ``D * (1 + ln t)`` beyond (sub-linear growth), never more than a
ceiling: the working set once the controller has seen a pass saturate
(the flat-out 256 MiB guest dirties 256 MiB per pass whether the pass lasts
2 s or 8 s), else all resident memory.  The log is a heuristic: it matches
the recorded streams (a 16 MiB/s guest over a 64 MiB working set dirtied
64 MiB in an 8 s pass, where ``D * t`` says 128 MiB) and is corrected by the
controller as soon as a real pass has been observed.

Pre-copy counts as converging only while each pass is at most
``SHRINK`` of the one before: near ``D == B`` the linear model says
"converges in 50 passes" and reality says "never".

Post-copy: once switched, the source stops dirtying; what is still to send
is what was not sent yet plus what was sent but dirtied again, sent at ``B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "OVERHEAD_S",
    "SHRINK",
    "Model",
    "better",
    "count",
    "dirtied_bytes",
    "finite_or_none",
    "postcopy_eta",
    "precopy_eta",
    "real",
    "when",
]

# setup + device state + the completion handshake; the recordings show
# setup-time 1-2 ms and post-copy downtime 3 ms, the rest is polling.
OVERHEAD_S = 0.05
# A pass must be at most this fraction of the previous one to count as progress.
SHRINK = 0.9
# More passes than this is "never" in practice (and bounds the loop).
MAX_PASSES = 40


@dataclass(frozen=True)
class Model:
    """What the transfer looks like now.

    ``bandwidth_bps`` > 0; ``dirty_rate_bps`` (>= 0) is the set dirtied in one
    second per second; ``ceiling_bytes`` (> 0) caps what one pass can dirty.
    """

    bandwidth_bps: float
    dirty_rate_bps: float
    ceiling_bytes: float


def dirtied_bytes(rate_bps: float, seconds: float, ceiling: float) -> float:
    """Bytes a guest with 1-second dirty rate ``rate_bps`` touches in ``seconds``."""
    if seconds <= 0 or rate_bps <= 0:
        return 0.0
    grown = rate_bps * seconds if seconds <= 1.0 else rate_bps * (1.0 + math.log(seconds))
    return min(grown, ceiling)


def precopy_eta(
    model: Model,
    *,
    remaining: float,
    pass_age_s: float,
    downtime_s: float,
    throttle_pct: int = 0,
    throttled_from: int = 0,
    pass_bytes: float | None = None,
) -> float | None:
    """Seconds until pre-copy completes, or None when it does not converge.

    ``remaining`` bytes are left in the current pass of ``pass_bytes`` bytes
    (default: ``remaining``, a pass just begun), which started ``pass_age_s``
    ago.  The throttle (``throttle_pct``, 0..99) slows the
    dirtying of the passes from index ``throttled_from`` on (0 = the current
    one): qemu's auto-converge only starts after two dirty syncs that saw
    too much dirtying.
    """
    b = model.bandwidth_bps
    if not b > 0 or not math.isfinite(b):
        return None
    threshold = b * max(downtime_s, 0.0)
    t = 0.0
    size = max(remaining, 0.0)
    # The progress test compares whole passes, not what is left of this one.
    whole = max(size, pass_bytes or 0.0)
    age = max(pass_age_s, 0.0)
    for index in range(MAX_PASSES):
        if size <= threshold:
            return t + size / b + OVERHEAD_S
        duration = size / b
        t += duration
        slowed = throttle_pct if index >= throttled_from else 0
        rate = model.dirty_rate_bps * (1.0 - min(max(slowed, 0), 99) / 100.0)
        fresh = dirtied_bytes(rate, age + duration, model.ceiling_bytes)
        if fresh > threshold and fresh > SHRINK * whole:
            return None
        size = whole = fresh
        age = 0.0
    return None


def postcopy_eta(
    model: Model, *, remaining: float, sent_in_pass: float, pass_age_s: float, first_pass: bool
) -> float | None:
    """Seconds until post-copy completes if it is started now.

    ``remaining`` bytes are left of the current pass, ``sent_in_pass`` bytes
    of it were sent in the ``pass_age_s`` seconds it has run.  In the first
    pass only pages already sent can come back dirty (the others are still
    to send anyway); in later passes anything dirtied since the last sync
    is added by qemu's final sync.
    """
    b = model.bandwidth_bps
    if not b > 0 or not math.isfinite(b):
        return None
    again = dirtied_bytes(model.dirty_rate_bps, pass_age_s, model.ceiling_bytes)
    if first_pass:
        again = min(again, max(sent_in_pass, 0.0))
    return (max(remaining, 0.0) + again) / b + OVERHEAD_S


# ---- helpers shared by the verdict and the controller


def real(value: object) -> float:
    """A finite float >= 0 from anything; odd input becomes 0."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) and number > 0 else 0.0


def count(value: object) -> int:
    """An int >= 0 from anything; odd input becomes 0."""
    number = real(value)
    return int(min(number, float(1 << 62)))


def finite_or_none(value: float | None) -> float | None:
    """``value`` if finite (at least 0), else None: JSON has no Infinity."""
    if value is None or not math.isfinite(value):
        return None
    return max(value, 0.0)


def better(throttled: float | None, plain: float | None) -> bool:
    """True when a throttled pre-copy finishes clearly sooner (or at all)."""
    if throttled is None:
        return False
    return plain is None or throttled < plain - max(1.0, 0.1 * plain)


def when(seconds: float | None) -> str:
    """A predicted moment for a sentence: "8.3 s" or "never"."""
    return "never" if seconds is None else f"{seconds:.1f} s"
