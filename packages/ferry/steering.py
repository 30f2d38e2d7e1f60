"""What to do next with a running outgoing migration: the levers, sans-I/O.

Perform feeds every ``query-migrate`` sample to a :class:`Steering` and
carries out the moves it returns.  The steering combines everything that
can change a migration while it runs:

- the operator's ``migrate-postcopy`` (a request, honoured at the next sample),
- ``--postcopy-after-precopy`` (switch once the first full pass is done),
- ``--timeout`` with its action (suspend the guest, switch to post-copy, abort),
- the convergence controller of ``--deadline`` (:mod:`ferry.converge`), whose
  actions become qemu parameter changes or the switch.

It holds no sockets and no clock: time comes in with each sample, so every
rule is tested on recorded sample streams without qemu.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.converge import (
    Controller,
    Goal,
    Note,
    SetDowntime,
    SetThrottle,
    StartPostcopy,
    Tick,
    Verdict,
)
from ferry.flags import MigrationFlags, MigrationParams
from ferry.qemu.migration import MigrationStats
from ferry.qemu.settings import QemuSettings

__all__ = [
    "DEFAULT_DOWNTIME_MS",
    "Abort",
    "Inform",
    "Move",
    "Steering",
    "Suspend",
    "SwitchToPostcopy",
    "Tune",
]

#: qemu's own default downtime limit.
DEFAULT_DOWNTIME_MS = 300


@dataclass(frozen=True)
class Tune:
    """Set these migration parameters (``migrate-set-parameters``)."""

    params: dict[str, Any]
    reason: str


@dataclass(frozen=True)
class SwitchToPostcopy:
    """``migrate-start-postcopy``: from now on the source never resumes."""

    reason: str


@dataclass(frozen=True)
class Suspend:
    """Pause the guest so the copy can finish (virsh's ``--timeout-suspend``)."""

    reason: str


@dataclass(frozen=True)
class Abort:
    """Cancel the migration (``--timeout-abort``); the VM keeps running here."""

    reason: str


@dataclass(frozen=True)
class Inform:
    """A decision worth logging that needs no command."""

    reason: str


Move = Tune | SwitchToPostcopy | Suspend | Abort | Inform


@dataclass
class Steering:
    """The in-flight levers of one outgoing migration (see the module docstring).

    ``controlled`` is true when ``--deadline`` put the controller in charge;
    without it the controller still runs, silently, for the ETA.
    """

    flags: MigrationFlags
    params: MigrationParams
    ram_bytes: int
    preflight: Verdict | None = None
    controller: Controller = field(init=False)
    controlled: bool = field(init=False)
    switched: bool = field(default=False, init=False)
    suspended: bool = field(default=False, init=False)
    timed_out: bool = field(default=False, init=False)
    _requested: str | None = field(default=None, init=False)
    _last_time: float = field(default=-1.0, init=False)

    def __post_init__(self) -> None:
        params = self.params
        self.controlled = params.deadline_s is not None
        postcopy = bool(self.flags & MigrationFlags.POSTCOPY)
        goal = Goal(
            deadline_s=params.deadline_s,
            max_downtime_ms=params.max_downtime_ms or DEFAULT_DOWNTIME_MS,
            max_throttle_pct=params.max_throttle_pct or 0 if self.controlled else 0,
            postcopy_allowed=postcopy and self.controlled,
        )
        cap = params.bandwidth_mib * 1024 * 1024 if params.bandwidth_mib else None
        self.controller = Controller(
            goal, ram_bytes=self.ram_bytes, bandwidth_cap_bps=cap, preflight=self.preflight
        )

    @property
    def plan(self) -> str:
        """The controller's plan in a few words ("" when it is not in charge)."""
        return self.controller.plan if self.controlled else ""

    def setup(self) -> QemuSettings | None:
        """Settings to add before ``migrate`` (the controller's opening position)."""
        if not self.controlled:
            return None
        start = self.controller.setup()
        caps: dict[str, bool] = {}
        params: dict[str, Any] = {"downtime-limit": start.downtime_ms}
        if start.auto_converge:
            caps["auto-converge"] = True
            params.update({
                "max-cpu-throttle": start.max_cpu_throttle,
                "cpu-throttle-initial": start.cpu_throttle_initial,
                "cpu-throttle-increment": start.cpu_throttle_increment,
            })  # fmt: skip
        return QemuSettings(caps=caps, params=params)

    def request_postcopy(self, why: str) -> None:
        """The operator asked for the switch (``ferryctl migrate-postcopy``)."""
        self._requested = why

    def eta_s(self) -> float | None:
        """Predicted seconds until the migration completes; None while unknown."""
        return self.controller.eta_s()

    def tick(self, stats: MigrationStats, elapsed_s: float) -> list[Move]:
        """Feed one sample taken ``elapsed_s`` after ``migrate``; the moves to make now."""
        moves: list[Move] = []
        if elapsed_s > self._last_time and stats.ram_total:
            self._last_time = elapsed_s
            actions = self.controller.feed(Tick(
                elapsed_s=elapsed_s, status=stats.status, transferred=stats.ram_transferred,
                remaining=stats.ram_remaining, total=stats.ram_total,
                dirty_rate_bps=float(stats.ram_dirty_pages_rate * (stats.ram_page_size or 4096)),
                passes=stats.ram_dirty_sync_count, throttle_pct=stats.cpu_throttle_percentage,
            ))  # fmt: skip
            if self.controlled:
                moves.extend(self._from_controller(actions))
        if self.switched or stats.status != "active":
            return moves
        can_switch = bool(self.flags & MigrationFlags.POSTCOPY)
        if can_switch and self._requested is not None:
            moves.append(self._switch(self._requested))
        elif (can_switch and self.params.postcopy_after_precopy
              and stats.ram_dirty_sync_count >= 2):  # fmt: skip
            moves.append(self._switch("--postcopy-after-precopy: the first full pass is done"))
        timeout = self.params.timeout_s
        if timeout is not None and elapsed_s >= timeout and not self.timed_out:
            self.timed_out = True
            action = self.params.timeout_action or "suspend"
            what = f"--timeout {timeout:g}s passed"
            if action == "postcopy" and not self.switched:
                moves.append(self._switch(f"{what}: switching to post-copy (--timeout-postcopy)"))
            elif action == "suspend" and not self.suspended:
                self.suspended = True
                moves.append(Suspend(f"{what}: pausing the guest so the copy can finish"))
            elif action == "abort":
                moves.append(Abort(f"{what}: cancelling (--timeout-abort)"))
        return moves

    def _switch(self, reason: str) -> SwitchToPostcopy:
        self.switched = True
        return SwitchToPostcopy(reason)

    def _from_controller(self, actions: list[Any]) -> list[Move]:
        moves: list[Move] = []
        for action in actions:
            if isinstance(action, SetDowntime):
                moves.append(Tune({"downtime-limit": action.ms}, action.reason))
            elif isinstance(action, SetThrottle):
                moves.append(Tune({"max-cpu-throttle": max(1, action.max_pct),
                                   "cpu-throttle-initial": max(1, action.initial_pct)},
                                  action.reason))  # fmt: skip
            elif isinstance(action, StartPostcopy):
                if not self.switched and self.flags & MigrationFlags.POSTCOPY:
                    moves.append(self._switch(action.reason))
            elif isinstance(action, Note):
                moves.append(Inform(action.reason))
        return moves
