"""What the source does with a client-driven migration whose client went away.

In client-driven mode the client (``ferryctl migrate --client-driven``)
calls Begin, Perform and Confirm on the source agent and Prepare and
Finish on the destination.  Each agent binds the migration to the client's
connection; when it closes and no client takes the migration over within
the grace period (``ferryctl migrate-recover``), the migration is an
*orphan* and the agent ends it alone.  libvirt's close callbacks
(``qemuMigrationSrcCleanup``) do the same; this table is ours and is
sans-I/O, so every row is a unit test.

The outcome rule of "never two copies" decides once the stream may be
complete: the destination can have the whole state, and the client may
have sent Finish before it died, so the source never resumes on its own
then — it asks the destination (and stays paused, fenced, when it cannot).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["ClientStage", "OrphanAction", "OrphanDecision", "decide_orphan"]


class ClientStage(enum.StrEnum):
    """How far a client-driven migration got on the source."""

    #: Begin returned: the job is held, the VM untouched.
    BEGUN = "begun"
    #: Perform is running (the stream may be moving).
    PERFORMING = "performing"
    #: Perform failed before any switch; the migration was cancelled.
    PERFORM_FAILED = "perform-failed"
    #: Perform completed: qemu sent everything, our copy is paused.
    PERFORMED = "performed"


class OrphanAction(enum.StrEnum):
    """What the source does with an orphaned migration."""

    #: Nothing of the VM changed: drop the job.
    END_JOB = "end-job"
    #: Perform is still running: let it end, then decide again.
    WAIT_PERFORM = "wait-perform"
    #: The destination never got a complete stream: give the VM back.
    RESUME = "resume"
    #: The destination may run the VM: ask it (fence as unknown if unreachable).
    SETTLE = "settle"


@dataclass(frozen=True)
class OrphanDecision:
    """An action and why (the reason goes to the journal)."""

    action: OrphanAction
    reason: str


def decide_orphan(stage: ClientStage, *, source_alive: bool = True) -> OrphanDecision:
    """Decide the fate of a client-driven migration left without a client.

    ``source_alive`` is whether our qemu still exists: after a failed
    Perform whose qemu died there is nothing to resume, and the job ends.
    """
    if stage is ClientStage.BEGUN:
        return OrphanDecision(OrphanAction.END_JOB, "the client went away after Begin: "
                                                    "nothing had changed yet")  # fmt: skip
    if stage is ClientStage.PERFORMING:
        return OrphanDecision(OrphanAction.WAIT_PERFORM,
                              "the client went away during Perform: let it end first")  # fmt: skip
    if stage is ClientStage.PERFORM_FAILED:
        if not source_alive:
            return OrphanDecision(OrphanAction.END_JOB, "Perform failed and the source qemu "
                                                        "is gone: nothing to resume")  # fmt: skip
        return OrphanDecision(OrphanAction.RESUME, "Perform failed and the client went away "
                                                   "before Confirm")  # fmt: skip
    return OrphanDecision(OrphanAction.SETTLE, "the stream completed and the client went away "
                                               "before Confirm: it may have sent Finish, so "
                                               "the destination decides")  # fmt: skip
