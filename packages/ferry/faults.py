"""Test-only fault points: a deterministic place to break a migration.

The fault matrix (``tests/faults/``) must hit an agent at an exact point of
a phase, not "about then" with sleeps.  An agent whose config has
``[testing] faults = ["POINT=ACTION", …]`` calls :meth:`Faults.hit` at each
point below; without that config line every call is a no-op.

Points (who reaches them, and when):

=================  ===================  ============================================
point              agent                reached
=================  ===================  ============================================
``src.begin``      ferry-source         Begin recorded its job, before the peer is
                                        contacted
``dst.prepare``    ferry-destination    the incoming qemu runs and the job is
                                        recorded, before Prepare's reply
``src.perform``    ferry-source         qemu's migration is active and has moved
                                        data, before the next progress poll
``dst.finish.begin`` ferry-destination  Finish received and recorded, before the
                                        CPUs start
``dst.finish``     ferry-destination    the CPUs started and the outcome is
                                        recorded, before Finish's reply
``src.confirm``    ferry-source         the outcome is known and recorded, before
                                        the source's qemu is stopped
``src.postcopy``   ferry-source         qemu runs in post-copy (the switch is
                                        recorded), before Finish is sent
``src.mirror``     ferry-source         ``--copy-storage-*``: the disks' mirrors
                                        have moved data, not all in sync yet
``src.switchover`` ferry-source         ``--copy-storage-*``: qemu waits at
                                        switchover, the mirrors ended in sync,
                                        before the device state is sent
``src.save``       ferry-source         save/managedsave/full dump: qemu's migration
                                        to the file was started, the header is still
                                        marked partial
=================  ===================  ============================================

Actions:

- ``stop``: log the point, then SIGSTOP this agent.  The test acts (kills a
  process, cuts the link) while the agent is frozen, then SIGCONTs it (or
  kills it).
- ``drop-reply``: the reply of this step is lost: the destination aborts the
  peer connection instead of answering (``dst.*``); the source aborts the
  peer connection (``src.perform``, ``src.postcopy``) or its client's admin connection
  (``src.begin``, ``src.confirm``) and carries on.

Each configured fault fires once per agent process.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from ferry.errors import ConfigError

__all__ = ["ACTIONS", "POINTS", "FaultSpec", "Faults", "parse_faults"]

log = logging.getLogger("ferry.faults")

POINTS = frozenset(
    {"src.begin", "dst.prepare", "src.perform", "dst.finish.begin", "dst.finish", "src.confirm",
     "src.postcopy", "src.mirror", "src.switchover", "src.save"}
)
ACTIONS = frozenset({"stop", "drop-reply"})


@dataclass(frozen=True)
class FaultSpec:
    """One configured fault: do ``action`` when ``point`` is reached."""

    point: str
    action: str


def parse_faults(items: Iterable[str]) -> tuple[FaultSpec, ...]:
    """``["dst.finish=drop-reply"]`` → specs.

    Raises:
        ConfigError: an unknown point or action, or not ``POINT=ACTION``.
    """
    out = []
    for item in items:
        point, sep, action = item.partition("=")
        if not sep or point not in POINTS or action not in ACTIONS:
            raise ConfigError(
                f"[testing] faults: {item!r} is not POINT=ACTION with POINT one of "
                f"{', '.join(sorted(POINTS))} and ACTION one of {', '.join(sorted(ACTIONS))}"
            )
        out.append(FaultSpec(point, action))
    return tuple(out)


class Faults:
    """The faults of one agent process; each fires once."""

    def __init__(self, specs: Iterable[FaultSpec] = ()) -> None:
        self._pending = {spec.point: spec.action for spec in specs}

    def hit(self, point: str) -> str | None:
        """Reach ``point``: returns the action to carry out (``drop-reply``), or None.

        ``stop`` is carried out here (the process freezes until SIGCONT);
        the caller only has to handle ``drop-reply``.
        """
        assert point in POINTS, point
        action = self._pending.pop(point, None)
        if action is None:
            return None
        log.warning("fault point %s reached: %s (test fault injection)", point, action)
        if action == "stop":
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)
            return None
        return action
