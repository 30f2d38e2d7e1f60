"""What to do with a migration job found after a restart or a lost reply.

Sans-I/O: recorded state and observations in, one action out.  The agents
are thin drivers: they gather the observations (the job record, qemu's
``query-status``/``query-migrate``, the destination's answer to
``migration_outcome``), call :func:`decide_outgoing` or
:func:`decide_incoming`, and carry the action out.  libvirt's
``qemuProcessRecoverMigrationOut``/``In`` are the model; this table is ours.

The safety rule both tables keep: the source resumes its copy only when it
*knows* the destination's copy cannot run (Finish was never sent, or the
destination says it killed its copy); the destination keeps a copy only
when its CPUs were started (recorded before Finish's reply).

Outgoing (ferry-source), by recorded phase:

=========  ==============================  ====================================
phase      observation                     action
=========  ==============================  ====================================
begin,     any                             NOTHING: the stream never started
prepare                                    (the destination discards its qemu
                                           when our connection closes)
perform    qemu still migrating            CANCEL, then RESUME
perform    qemu completed, failed, idle    RESUME: Finish was never sent (the
                                           phase is recorded as finish before
                                           it is), so the destination never
                                           started its CPUs
finish     peer says running               CONFIRM (stop our copy)
finish     peer says not running           RESUME
finish     peer pending                    ASK again
finish     peer not asked yet              ASK
finish     peer unreachable past deadline  FENCE_UNKNOWN (stay paused, say why)
confirm    recorded result completed       CONFIRM
confirm    recorded result failed          RESUME
any, with  qemu still in post-copy         FOLLOW_POSTCOPY (wait for the last
post-copy                                  page, then ask and confirm)
recorded   qemu completed                  ASK; peer running → CONFIRM,
                                           anything else → FENCE_POSTCOPY
           qemu paused, failed or gone     FENCE_POSTCOPY (never resume: the
                                           CPU state went to the destination)
=========  ==============================  ====================================

Incoming (ferry-destination), by recorded outcome state:

==========  =====================  =============================================
state       qemu                   action
==========  =====================  =============================================
prepared    any                    KILL (Finish never arrived: the source resumes)
finishing   CPUs running           KEEP (record running)
finishing   not running / gone     KILL (record failed; the source resumes)
running     any                    KEEP (the VM is ours; if qemu died, it died here)
failed      any                    KILL (make sure nothing is left)
any but     in post-copy, running  KEEP (record running)
failed      in post-copy, stopped  HOLD (record postcopy: the source never
                                   resumes; ``--postcopy-resume`` finishes it)
==========  =====================  =============================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = [
    "MIGRATING",
    "POSTCOPY_STATES",
    "Decision",
    "IncomingAction",
    "OutgoingAction",
    "PeerOutcome",
    "QemuView",
    "decide_incoming",
    "decide_outgoing",
]

#: query-migrate states of a qemu in post-copy (either end).
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})

#: query-migrate states in which the source's qemu is still sending.
MIGRATING = frozenset(
    {"setup", "active", "pre-switchover", "device", "cancelling", "wait-unplug"}
)


class OutgoingAction(enum.Enum):
    """What ferry-source does with an outgoing job."""

    NOTHING = "nothing"
    CANCEL = "cancel"
    RESUME = "resume"
    ASK = "ask"
    CONFIRM = "confirm"
    FENCE_UNKNOWN = "fence-unknown"
    FOLLOW_POSTCOPY = "follow-postcopy"
    FENCE_POSTCOPY = "fence-postcopy"


class IncomingAction(enum.Enum):
    """What ferry-destination does with an incoming job."""

    KILL = "kill"
    KEEP = "keep"
    HOLD = "hold"


class PeerOutcome(enum.Enum):
    """The destination's answer to ``migration_outcome`` (or its absence)."""

    RUNNING = "running"
    NOT_RUNNING = "not-running"
    POSTCOPY = "postcopy"
    PENDING = "pending"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class QemuView:
    """What qemu says: alive at all, CPUs running, and its migration state."""

    alive: bool
    running: bool = False
    migration: str = "none"


_Action = TypeVar("_Action", OutgoingAction, IncomingAction)


@dataclass(frozen=True)
class Decision(Generic[_Action]):
    """An action and the reason to log with it."""

    action: _Action
    reason: str


def decide_outgoing(
    phase: str | None,
    qemu: QemuView,
    *,
    result: str | None = None,
    peer: PeerOutcome | None = None,
    deadline_passed: bool = False,
    postcopy: bool = False,
) -> Decision[OutgoingAction]:
    """The outgoing table (see the module docstring).

    ``result`` is the outcome recorded on entering confirm (``completed`` or
    ``failed``); ``peer`` the destination's last answer, None if not asked;
    ``postcopy`` whether the switch to post-copy was recorded (from then on
    nothing resumes the source).
    """
    act = OutgoingAction
    if postcopy:
        return _decide_postcopy(qemu, result, peer)
    if phase in (None, "begin", "prepare"):
        return Decision(act.NOTHING, "the migration stream never started")
    if phase == "perform":
        if qemu.alive and qemu.migration in MIGRATING:
            return Decision(act.CANCEL, "qemu was still sending: cancel, then resume")
        return Decision(act.RESUME, "Finish was never sent: the destination cannot be running")
    if phase == "confirm" and result in ("completed", "failed"):
        if result == "completed":
            return Decision(act.CONFIRM, "the destination had reported success")
        return Decision(act.RESUME, "the destination had reported failure")
    # finish (or a confirm without a recorded result): only the destination knows.
    if peer is PeerOutcome.RUNNING:
        return Decision(act.CONFIRM, "the destination runs the VM")
    if peer is PeerOutcome.NOT_RUNNING:
        return Decision(act.RESUME, "the destination does not run the VM")
    if peer is PeerOutcome.POSTCOPY:
        return Decision(act.FENCE_UNKNOWN, "the destination holds the VM in post-copy")
    if peer is None:
        return Decision(act.ASK, "Finish was sent: ask the destination for the outcome")
    if deadline_passed:
        return Decision(act.FENCE_UNKNOWN, "the destination did not say what became of it")
    return Decision(act.ASK, f"the destination's answer was {peer.value}: ask again")


def _decide_postcopy(
    qemu: QemuView, result: str | None, peer: PeerOutcome | None
) -> Decision[OutgoingAction]:
    act = OutgoingAction
    if result == "completed":
        return Decision(act.CONFIRM, "post-copy had completed and the destination runs the VM")
    if qemu.alive and qemu.migration in ("postcopy-active", "postcopy-recover"):
        return Decision(act.FOLLOW_POSTCOPY, "qemu is still sending pages in post-copy")
    if qemu.alive and qemu.migration == "completed":
        if peer is PeerOutcome.RUNNING:
            return Decision(act.CONFIRM, "post-copy completed and the destination runs the VM")
        if peer is None:
            return Decision(act.ASK, "post-copy completed: ask whether the destination runs it")
        return Decision(act.FENCE_POSTCOPY,
                        "post-copy completed but the destination has not started the CPUs")
    return Decision(act.FENCE_POSTCOPY,
                    "the migration switched to post-copy and did not complete: never resume")


def decide_incoming(state: str | None, qemu: QemuView) -> Decision[IncomingAction]:
    """The incoming table (see the module docstring); ``state`` from the outcome record."""
    act = IncomingAction
    if state != "failed" and qemu.alive and qemu.migration in POSTCOPY_STATES:
        if qemu.running:
            return Decision(act.KEEP, "post-copy: the CPUs run here")
        return Decision(act.HOLD, "post-copy: the CPU state is here; wait for the source")
    if state == "running":
        return Decision(act.KEEP, "the CPUs had been started here")
    if state == "finishing":
        if qemu.alive and qemu.running:
            return Decision(act.KEEP, "Finish had started the CPUs")
        return Decision(act.KILL, "Finish was interrupted before the CPUs started")
    if state == "failed":
        return Decision(act.KILL, "the migration had failed")
    return Decision(act.KILL, "Finish never arrived")
