"""Phase order of a v3 migration, one state machine per side.

Source (Src): ``none → begin → perform → confirm``; a migration cancelled
before Perform goes ``begin → confirm`` with ``cancelled=True``; ``abort()``
leaves ``begin`` or ``perform`` for the terminal ``aborted``.

Destination (Dst): ``none → prepare → finish`` (``finish`` with
``cancelled=True`` when Perform failed); ``abort()`` leaves ``prepare`` for
``aborted`` (the source vanished before Finish).

:meth:`advance` checks before it changes anything: an illegal step raises
:class:`~ferry.errors.PhaseError` naming the current and the attempted phase,
and the machine is left as it was, so a late or duplicated request cannot move
a migration backwards. A machine can be rebuilt at a recorded phase (an agent
restarted mid-migration reads it from its status file).
"""

from __future__ import annotations

from collections.abc import Mapping

from ferry.errors import PhaseError

__all__ = ["PHASES", "DestinationPhases", "SourcePhases"]

PHASES: frozenset[str] = frozenset(
    {"none", "begin", "perform", "confirm", "prepare", "finish", "aborted"}
)


def _expected(options: tuple[str, ...]) -> str:
    if not options:
        return "nothing (the migration is over)"
    quoted = [repr(o) for o in options]
    if len(quoted) == 1:
        return quoted[0]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1]


class _Phases:
    """Shared machinery: a transition table, a current phase, a cancelled mark."""

    SIDE: str = ""
    # current phase -> phases that may follow it
    TRANSITIONS: Mapping[str, tuple[str, ...]] = {}
    # (from, to) steps that are only legal as the cancel path
    CANCEL_ONLY: frozenset[tuple[str, str]] = frozenset()
    TERMINAL: frozenset[str] = frozenset()

    def __init__(self, current: str = "none", *, cancelled: bool = False) -> None:
        """Start at ``current`` (default "none").

        Raises :class:`~ferry.errors.PhaseError` if ``current`` is not a phase
        of this side.
        """
        if current not in self.TRANSITIONS:
            raise PhaseError(
                f"{self.SIDE}: unknown phase {current!r}", current=str(current), side=self.SIDE
            )
        self._current = current
        self._cancelled = cancelled

    def __repr__(self) -> str:
        return f"{type(self).__name__}(current={self._current!r}, cancelled={self._cancelled})"

    @property
    def current(self) -> str:
        """The phase last entered ("none" before the first)."""
        return self._current

    @property
    def done(self) -> bool:
        """True once a terminal phase is reached (nothing may follow)."""
        return self._current in self.TERMINAL

    @property
    def cancelled(self) -> bool:
        """True if the terminal phase was entered on the cancel path."""
        return self._cancelled

    def allowed(self) -> tuple[str, ...]:
        """Return the phases that may follow the current one."""
        return self.TRANSITIONS[self._current]

    def advance(self, phase: str, *, cancelled: bool = False) -> None:
        """Enter ``phase`` (``cancelled=True`` for the cancel path of the last phase).

        Raises :class:`~ferry.errors.PhaseError` naming the current and the
        attempted phase if the step is illegal; nothing changes then.
        """
        allowed = self.TRANSITIONS[self._current]
        details = {"current": self._current, "attempted": str(phase), "side": self.SIDE}
        if phase not in allowed:
            raise PhaseError(
                f"cannot enter {phase!r} from {self._current!r}: expected {_expected(allowed)}",
                **details,
            )
        if (self._current, phase) in self.CANCEL_ONLY and not cancelled:
            raise PhaseError(
                f"cannot enter {phase!r} from {self._current!r} unless cancelled",
                **details,
            )
        self._current = phase
        self._cancelled = cancelled

    def abort(self) -> None:
        """Enter the terminal "aborted" phase.

        Raises :class:`~ferry.errors.PhaseError` naming the current phase if
        aborting is not allowed from it; nothing changes then.
        """
        self.advance("aborted")


class SourcePhases(_Phases):
    """Source side: begin → perform → confirm (or begin → confirm cancelled, or aborted)."""

    SIDE = "source"
    TRANSITIONS = {
        "none": ("begin",),
        "begin": ("perform", "confirm", "aborted"),
        "perform": ("confirm", "aborted"),
        "confirm": (),
        "aborted": (),
    }
    CANCEL_ONLY = frozenset({("begin", "confirm")})
    TERMINAL = frozenset({"confirm", "aborted"})


class DestinationPhases(_Phases):
    """Destination side: prepare → finish (cancelled or not), or aborted after prepare."""

    SIDE = "destination"
    TRANSITIONS = {
        "none": ("prepare",),
        "prepare": ("finish", "aborted"),
        "finish": (),
        "aborted": (),
    }
    TERMINAL = frozenset({"finish", "aborted"})
