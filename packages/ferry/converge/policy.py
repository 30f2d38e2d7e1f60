"""The convergence controller: qemu migration samples in, lever actions out (sans-I/O).

The source agent's Perform drives it: ``setup()`` before ``migrate`` (qemu 7.2
cannot change capabilities mid-migration), then ``feed()`` with every
``query-migrate`` sample, applying the returned actions in order over QMP and
logging their ``reason``.  The controller owns no clock and no socket; time
comes in the samples.

Each active pre-copy sample, it predicts the finish with the current levers
(:mod:`ferry.converge.eta`) and, if that misses the goal, escalates, cheapest
lever first, never backing off (no oscillation, and each step is a sentence
in the journal):

1. raise the downtime limit, one rung of the ladder at a time, up to
   ``max_downtime_ms`` (costs the guest a longer pause, nothing else);
2. raise the CPU throttle, if auto-converge was armed in the setup, to the
   smallest percentage (at most ``max_throttle_pct``) that meets the goal;
3. switch to post-copy, if allowed, when that meets the goal or is the
   fastest way to finish at all; confirmed on two samples in a row, since it
   cannot be undone (the guest then lives on the destination);
4. otherwise say once that the goal will be missed and do the best possible
   with the allowed levers.

The dirty rate the predictions need comes from the pre-flight verdict (qemu
reports none until its second dirty sync, i.e. after the whole first pass),
then from each pass qemu actually sent: a pass that did not shrink is proof
that pre-copy is not converging, whatever the rates say.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from ferry.converge.eta import (
    OVERHEAD_S,
    Model,
    better,
    count,
    dirtied_bytes,
    finite_or_none,
    postcopy_eta,
    precopy_eta,
    real,
    when,
)
from ferry.converge.verdict import Goal, Verdict, downtime_ladder, mib, within

__all__ = [
    "Action",
    "Controller",
    "Note",
    "SetDowntime",
    "SetThrottle",
    "Setup",
    "StartPostcopy",
    "Tick",
]

# Post-copy is irreversible: want it on this many consecutive samples.
CONFIRM_SAMPLES = 2
# Bandwidth is measured over this much history (s); shorter spans are noise.
BW_WINDOW_S = 2.0
BW_MIN_SPAN_S = 0.5
# qemu's auto-converge step when the controller has armed it.
THROTTLE_INCREMENT = 10


@dataclass(frozen=True)
class Tick:
    """One qemu ``query-migrate`` sample (see the issue-12 interface)."""

    elapsed_s: float
    status: str
    transferred: int
    remaining: int
    total: int
    dirty_rate_bps: float
    passes: int
    throttle_pct: int
    bandwidth_bps: float = 0.0


@dataclass(frozen=True)
class Setup:
    """Migration parameters and capabilities to set before ``migrate``."""

    downtime_ms: int
    auto_converge: bool
    max_cpu_throttle: int
    cpu_throttle_initial: int
    cpu_throttle_increment: int
    postcopy_ram: bool
    reason: str


@dataclass(frozen=True)
class SetDowntime:
    """``migrate-set-parameters downtime-limit``."""

    ms: int
    reason: str


@dataclass(frozen=True)
class SetThrottle:
    """``migrate-set-parameters max-cpu-throttle`` / ``cpu-throttle-initial``."""

    max_pct: int
    initial_pct: int
    reason: str


@dataclass(frozen=True)
class StartPostcopy:
    """``migrate-start-postcopy`` (issued at most once)."""

    reason: str


@dataclass(frozen=True)
class Note:
    """A decision worth logging that needs no command."""

    reason: str


Action = SetDowntime | SetThrottle | StartPostcopy | Note


class Controller:
    """Closed-loop convergence policy for one migration (create one per migration)."""

    def __init__(
        self,
        goal: Goal,
        *,
        ram_bytes: int,
        bandwidth_cap_bps: float | None = None,
        preflight: Verdict | None = None,
    ) -> None:
        self._goal = goal
        self._ram = count(ram_bytes)
        cap = real(bandwidth_cap_bps) if bandwidth_cap_bps is not None else 0.0
        self._cap = cap or None
        self._preflight = preflight
        self._max_ms = max(int(goal.max_downtime_ms), 1)
        self._max_pct = min(max(int(goal.max_throttle_pct), 0), 99)
        self._ladder = downtime_ladder(self._max_ms)
        # The 1 s dirty rate; only ever raised (see the module docstring).
        self._dirty = real(preflight.dirty_rate_bps) if preflight is not None else 0.0
        resident = preflight.resident_bytes if preflight is not None else 0
        self._resident_frac = (
            min(max(resident / self._ram, 0.0), 1.0) if resident and self._ram else 1.0
        )
        self._ceiling: float | None = None  # working set, once a pass saturated
        self._last_pass_size: float | None = None
        self._setup = self._make_setup()
        self._downtime_ms = self._setup.downtime_ms
        # A ceiling of 1% is "armed, off" (qemu's lowest), anything above is a throttle.
        ceiling = self._setup.max_cpu_throttle
        self._throttle_pct = ceiling if self._setup.auto_converge and ceiling > 1 else 0
        self._armed = self._setup.auto_converge
        self._last: Tick | None = None
        self._points: deque[tuple[float, int]] = deque()
        self._passes = 0
        self._pass_start_s = 0.0
        self._pass_start_bytes = 0
        self._switched_at: float | None = None
        self._want_post = 0
        self._best_effort = False
        self._noted: set[str] = set()
        self._eta: float | None = None
        self._done = False

    # ------------------------------------------------------------------ setup

    def _make_setup(self) -> Setup:
        goal, pre = self._goal, self._preflight
        postcopy = bool(goal.postcopy_allowed)
        # Armed with a 1% ceiling, auto-converge costs the guest nothing but
        # lets the controller throttle later: qemu 7.2 cannot turn the
        # capability on once the migration runs.
        armed = self._max_pct > 0
        if pre is None:
            ms = min(self._max_ms, 300)
            return Setup(ms, armed, 1, 1, THROTTLE_INCREMENT, postcopy,
                         f"no pre-flight figures: qemu's default {ms} ms downtime limit until "
                         "the first pass shows how fast the guest dirties memory")
        if pre.plan == "pre-copy + throttle" and self._max_pct:
            pct = min(max(pre.throttle_needed_pct or self._max_pct, 1), self._max_pct)
            return Setup(self._max_ms, True, pct, pct, THROTTLE_INCREMENT, postcopy,
                         f"pre-flight: {pre.reasons[-1]}; throttle up to {pct}%, "
                         f"downtime limit {self._max_ms} ms")
        if pre.plan in ("pre-copy", "post-copy"):
            ms = pre.downtime_ms if pre.plan == "pre-copy" and pre.downtime_ms else self._max_ms
            ms = min(max(ms, 1), self._max_ms)
            return Setup(ms, armed, 1, 1, THROTTLE_INCREMENT, postcopy,
                         f"pre-flight plan {pre.plan}: {'; '.join(pre.reasons[1:])}; "
                         f"downtime limit {ms} ms")
        # Infeasible: best effort from the start.
        if postcopy:
            return Setup(self._max_ms, armed, 1, 1, THROTTLE_INCREMENT, postcopy,
                         f"pre-flight: {pre.reasons[-1]}; post-copy as soon as it is the fastest")
        # Throttle from the start only if the model says it changes the
        # outcome: when the first pass alone is too long it does not.
        pct = max(self._max_pct, 1) if armed and self._throttle_helps(pre) else 1
        return Setup(self._max_ms, armed, pct, pct, THROTTLE_INCREMENT, postcopy,
                     f"pre-flight: {pre.reasons[-1]}; best effort: downtime limit "
                     f"{self._max_ms} ms" + (f", throttle up to {pct}%" if pct > 1 else ""))

    def _throttle_helps(self, pre: Verdict) -> bool:
        if pre.bandwidth_bps <= 0:
            return False
        model = Model(pre.bandwidth_bps, pre.dirty_rate_bps, float(max(pre.resident_bytes, 1)))

        def eta(pct: int) -> float | None:
            return precopy_eta(model, remaining=float(pre.resident_bytes), pass_age_s=0.0,
                               downtime_s=self._max_ms / 1000.0, throttle_pct=pct,
                               throttled_from=2)

        plain = eta(0)
        # Not converging at all: the throttle is the only lever with a chance
        # (the guest may dirty less under it than the model assumes).
        return plain is None or better(eta(self._max_pct), plain)

    def setup(self) -> Setup:
        """What to set before ``migrate`` (capabilities cannot change later)."""
        return self._setup

    # ------------------------------------------------------------------ state

    @property
    def plan(self) -> str:
        """The current plan, short, for the progress display."""
        if self._switched_at is not None:
            return f"post-copy (switched at {self._switched_at:.1f} s)"
        prefix = "best effort: " if self._best_effort else ""
        if self._preflight is None and self._passes <= 1:
            return prefix + "pre-copy (post-copy after the first pass if it does not converge)"
        if self._preflight is not None and self._preflight.plan == "post-copy":
            return prefix + "post-copy as soon as the first samples confirm"
        text = "pre-copy"
        if self._throttle_pct:
            text += f" + throttle ≤ {self._throttle_pct}%"
        return prefix + text

    def eta_s(self) -> float | None:
        """Predicted seconds from the last sample until completion (None = unknown/never)."""
        return finite_or_none(self._eta)

    def _bandwidth(self, tick: Tick) -> float | None:
        if tick.bandwidth_bps > 0:
            return tick.bandwidth_bps
        if len(self._points) >= 2:
            (t0, b0), (t1, b1) = self._points[0], self._points[-1]
            if t1 - t0 >= BW_MIN_SPAN_S or (self._cap is None and t1 > t0):
                rate = (b1 - b0) / (t1 - t0)
                if rate > 0:
                    return rate
        return self._cap

    def _model(self, bandwidth: float) -> Model:
        ceiling = self._ceiling if self._ceiling else float(max(self._ram, 1))
        return Model(bandwidth, self._dirty, ceiling)

    # ------------------------------------------------------------------ feed

    def feed(self, tick: Tick) -> list[Action]:
        """Account one sample and return the actions to apply, in order.

        Never raises: samples with non-increasing or non-finite time are
        ignored, odd counts are read as 0.
        """
        try:
            elapsed = float(tick.elapsed_s)
        except (TypeError, ValueError, OverflowError):
            return []
        if not math.isfinite(elapsed) or (self._last is not None
                                          and not elapsed > self._last.elapsed_s):
            return []
        t = Tick(elapsed, str(tick.status), count(tick.transferred), count(tick.remaining),
                 count(tick.total), real(tick.dirty_rate_bps), count(tick.passes),
                 int(min(count(tick.throttle_pct), 99)), real(tick.bandwidth_bps))
        if self._last is not None and t.transferred < self._last.transferred:
            self._points.clear()  # counters restarted: old rates mean nothing
        self._last = t
        self._points.append((t.elapsed_s, t.transferred))
        while len(self._points) > 2 and self._points[1][0] <= t.elapsed_s - BW_WINDOW_S:
            self._points.popleft()
        if self._done:
            return []
        status = t.status
        if status == "completed":
            self._done, self._eta = True, 0.0
            return []
        if status in ("failed", "cancelled", "cancelling", "postcopy-paused",
                      "postcopy-recover"):
            self._eta = None
            return []
        if status in ("pre-switchover", "device", "wait-unplug"):
            self._eta = OVERHEAD_S
            return []
        bandwidth = self._bandwidth(t)
        if status == "postcopy-active":
            # After the switch only the ETA matters: the rest streams at B.
            self._eta = None if not bandwidth else t.remaining / bandwidth + OVERHEAD_S
            return []
        if status != "active" or t.total == 0:
            self._eta = self._preflight_eta(elapsed)
            return []
        self._track_passes(t, bandwidth)
        if bandwidth is None:
            self._eta = None
            return []
        if self._switched_at is not None:
            # Switch issued, qemu not yet in postcopy-active.
            self._eta = self._postcopy_eta(t, bandwidth)
            return []
        return self._decide(t, bandwidth)

    def _preflight_eta(self, elapsed: float) -> float | None:
        pre = self._preflight
        if pre is None:
            return None
        finish = pre.postcopy_s if pre.plan == "post-copy" else pre.precopy_s
        return None if finish is None else max(finish - elapsed, OVERHEAD_S)

    def _track_passes(self, t: Tick, bandwidth: float | None) -> None:
        """Follow qemu's dirty syncs; learn the guest's dirtying from each finished pass."""
        if t.dirty_rate_bps > 0 and t.throttle_pct == 0:
            # qemu's figure averages over a whole pass, so it can only
            # understate the 1 s rate: a floor, never a replacement.
            self._dirty = max(self._dirty, t.dirty_rate_bps)
        if t.passes <= self._passes:
            return
        if self._passes >= 1 and t.passes >= 2:
            size = float(t.remaining)
            duration = max(t.elapsed_s - self._pass_start_s, 1e-3)
            unbounded = dirtied_bytes(self._dirty, duration, math.inf)
            if self._dirty > 0 and size < 0.8 * unbounded:
                # The pass dirtied less than the rate says: the guest keeps
                # rewriting a working set of about this size.
                self._ceiling = max(self._ceiling or 0.0, size)
            elif t.throttle_pct == 0:
                self._dirty = max(self._dirty, size / max(min(duration, 1.0),
                                                          1.0 + math.log(max(duration, 1.0))))
            prev = self._last_pass_size
            if prev is not None and size > 0.9 * prev and bandwidth and t.throttle_pct == 0:
                # No shrinking: dirtying over a pass this long reproduces it.
                again = size / bandwidth
                self._dirty = max(self._dirty, size / max(min(again, 1.0),
                                                          1.0 + math.log(max(again, 1.0))))
            self._last_pass_size = size
        self._passes = t.passes
        self._pass_start_s = t.elapsed_s if t.passes >= 2 else 0.0
        self._pass_start_bytes = t.transferred if t.passes >= 2 else 0

    def _remaining(self, t: Tick) -> float:
        # In the first pass, never-touched pages are in `remaining` but cost
        # almost nothing to send.
        frac = self._resident_frac if self._passes <= 1 else 1.0
        return t.remaining * frac

    def _postcopy_eta(self, t: Tick, bandwidth: float) -> float | None:
        return postcopy_eta(self._model(bandwidth), remaining=self._remaining(t),
                            sent_in_pass=float(t.transferred - self._pass_start_bytes),
                            pass_age_s=t.elapsed_s - self._pass_start_s,
                            first_pass=self._passes <= 1)

    def _precopy_eta(self, t: Tick, bandwidth: float, ms: int, pct: int) -> float | None:
        # auto-converge needs two dirty syncs that saw heavy dirtying.
        start = 0 if t.throttle_pct > 0 else max(0, 3 - max(self._passes, 1))
        remaining = self._remaining(t)
        sent = float(max(t.transferred - self._pass_start_bytes, 0))
        return precopy_eta(self._model(bandwidth), remaining=remaining,
                           pass_age_s=t.elapsed_s - self._pass_start_s,
                           downtime_s=ms / 1000.0, throttle_pct=pct, throttled_from=start,
                           pass_bytes=remaining + sent)

    def _note_once(self, key: str, reason: str, actions: list[Action]) -> None:
        if key not in self._noted:
            self._noted.add(key)
            actions.append(Note(reason))

    def _figures(self, bandwidth: float) -> str:
        return (f"the guest dirties {mib(self._dirty)}/s, the link moves {mib(bandwidth)}/s "
                f"({mib(bandwidth * self._max_ms / 1000.0)} fit in {self._max_ms} ms)")

    def _decide(self, t: Tick, bandwidth: float) -> list[Action]:
        goal, e = self._goal, t.elapsed_s
        actions: list[Action] = []

        def finish(x: float | None) -> float | None:
            return None if x is None else e + x

        current = self._precopy_eta(t, bandwidth, self._downtime_ms, self._throttle_pct)
        self._eta = current
        deadline = "" if goal.deadline_s is None else f" (deadline {goal.deadline_s:g} s)"
        if goal.deadline_s is not None and e > goal.deadline_s:
            self._note_once("late", f"the {goal.deadline_s:g} s deadline has passed", actions)
        if within(goal, finish(current)):
            self._want_post = 0
            return actions
        # 1. a longer pause, nothing else.
        for ms in self._ladder:
            if ms > self._downtime_ms:
                eta = self._precopy_eta(t, bandwidth, ms, self._throttle_pct)
                if within(goal, finish(eta)):
                    actions.append(SetDowntime(ms, self._say(
                        f"pre-copy would end at {when(finish(current))} with "
                        f"{self._downtime_ms} ms; with {ms} ms it ends at {when(finish(eta))}"
                        f"{deadline}")))
                    self._downtime_ms, self._eta, self._want_post = ms, eta, 0
                    return actions
        # 2. slow the guest, as little as will do, at the longest allowed pause.
        if self._armed and self._max_pct > self._throttle_pct:
            for pct in range(self._throttle_pct + 1, self._max_pct + 1):
                eta = self._precopy_eta(t, bandwidth, self._max_ms, pct)
                if within(goal, finish(eta)):
                    self._raise_downtime(actions, "with the throttle")
                    actions.append(SetThrottle(pct, pct, self._say(
                        f"{self._figures(bandwidth)}: a {pct}% CPU throttle makes pre-copy "
                        f"end at {when(finish(eta))}{deadline}")))
                    self._throttle_pct, self._eta, self._want_post = pct, eta, 0
                    return actions
        # 3. post-copy.
        best_pct = self._max_pct if self._armed else self._throttle_pct
        best_pre = self._precopy_eta(t, bandwidth, self._max_ms, best_pct)
        post = self._postcopy_eta(t, bandwidth) if goal.postcopy_allowed else None
        if post is not None and (within(goal, finish(post)) or best_pre is None
                                 or post < best_pre):
            self._want_post += 1
            self._eta = post
            # The pre-flight verdict counts as one confirmation: a driver
            # polling once a second must not lose a second (128 MiB) to it.
            seeded = self._preflight is not None and self._preflight.plan == "post-copy"
            if self._want_post < CONFIRM_SAMPLES - int(seeded):
                return actions
            pre_text = ("cannot converge" if best_pre is None
                        else f"would end at {when(finish(best_pre))}")
            if not within(goal, finish(post)):
                self._note_once("miss", f"the deadline will be missed: post-copy, the fastest "
                                f"way, ends at about {when(finish(post))}{deadline}", actions)
            actions.append(StartPostcopy(self._say(
                f"{self._figures(bandwidth)}: pre-copy {pre_text} even at {self._max_ms} ms "
                f"and {best_pct}% throttle; post-copy now sends "
                f"{mib(post * bandwidth)} more and ends at about {when(finish(post))}"
                f"{deadline}")))
            self._switched_at = e
            return actions
        self._want_post = 0
        # 4. nothing meets the goal: say so once, do the best allowed.
        if not self._best_effort:
            self._best_effort = True
            if best_pre is None:
                why = (f"{self._figures(bandwidth)}: pre-copy cannot converge with the "
                       "allowed levers")
            elif self._pass_is_first_and_too_long(t, bandwidth):
                end = finish(self._remaining(t) / bandwidth)
                why = f"the first pass alone ends at {when(end)}{deadline}: nothing left to pull"

            else:
                why = f"pre-copy ends at {when(finish(best_pre))} at best{deadline}"
            self._note_once("miss", f"the goal will be missed: {why}"
                            + ("" if goal.postcopy_allowed else "; post-copy is not allowed"),
                            actions)
        self._raise_downtime(actions, "best effort")
        if self._armed and self._throttle_pct < self._max_pct:
            gain = self._precopy_eta(t, bandwidth, self._max_ms, self._max_pct)
            plain = self._precopy_eta(t, bandwidth, self._max_ms, self._throttle_pct)
            # Throttling the guest is only worth it if it changes the outcome,
            # or if nothing else gives pre-copy a chance to converge at all.
            if plain is None or better(gain, plain):
                actions.append(SetThrottle(self._max_pct, self._max_pct, self._say(
                    f"best effort: throttle up to {self._max_pct}%, pre-copy then ends at "
                    f"{when(finish(gain))}")))
                self._throttle_pct = self._max_pct
        self._eta = self._precopy_eta(t, bandwidth, self._downtime_ms, self._throttle_pct)
        return actions

    def _pass_is_first_and_too_long(self, t: Tick, bandwidth: float) -> bool:
        deadline = self._goal.deadline_s
        return (self._passes <= 1 and deadline is not None
                and t.elapsed_s + self._remaining(t) / bandwidth > deadline)

    def _raise_downtime(self, actions: list[Action], why: str) -> None:
        if self._downtime_ms < self._max_ms:
            actions.append(SetDowntime(self._max_ms, self._say(
                f"downtime limit to the allowed {self._max_ms} ms ({why})")))
            self._downtime_ms = self._max_ms

    def _say(self, text: str) -> str:
        last = self._last
        return text if last is None else f"at {last.elapsed_s:.1f} s: {text}"
