"""The source's table for client-driven migrations whose client went away."""

from __future__ import annotations

import pytest

from ferry.jobs.orphans import ClientStage, OrphanAction, decide_orphan


@pytest.mark.parametrize(
    ("stage", "alive", "action"),
    [
        (ClientStage.BEGUN, True, OrphanAction.END_JOB),
        (ClientStage.BEGUN, False, OrphanAction.END_JOB),
        (ClientStage.PERFORMING, True, OrphanAction.WAIT_PERFORM),
        (ClientStage.PERFORMING, False, OrphanAction.WAIT_PERFORM),
        (ClientStage.PERFORM_FAILED, True, OrphanAction.RESUME),
        (ClientStage.PERFORM_FAILED, False, OrphanAction.END_JOB),
        (ClientStage.PERFORMED, True, OrphanAction.SETTLE),
        (ClientStage.PERFORMED, False, OrphanAction.SETTLE),
    ],
)
def test_every_row(stage: ClientStage, alive: bool, action: OrphanAction) -> None:
    decision = decide_orphan(stage, source_alive=alive)
    assert decision.action is action
    assert decision.reason


def test_never_resumes_once_the_stream_may_be_complete() -> None:
    # The safety rule: after a completed Perform the client may have sent
    # Finish; only the destination's answer can let the source run again.
    for alive in (True, False):
        assert decide_orphan(ClientStage.PERFORMED, source_alive=alive).action is not (
            OrphanAction.RESUME
        )
