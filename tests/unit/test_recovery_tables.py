"""The recovery tables of ferry.jobs.recovery: every row, and the safety rule across all inputs."""

from __future__ import annotations

import itertools

import pytest

from ferry.jobs.recovery import (
    MIGRATING,
    IncomingAction,
    OutgoingAction,
    PeerOutcome,
    QemuView,
    decide_incoming,
    decide_outgoing,
)

O = OutgoingAction  # noqa: E741
I = IncomingAction  # noqa: E741
GONE = QemuView(alive=False)
PAUSED_DONE = QemuView(alive=True, running=False, migration="completed")
SENDING = QemuView(alive=True, running=True, migration="active")


@pytest.mark.parametrize(
    ("phase", "qemu", "kwargs", "action"),
    [
        (None, SENDING, {}, O.NOTHING),
        ("begin", SENDING, {}, O.NOTHING),
        ("prepare", SENDING, {}, O.NOTHING),
        ("perform", SENDING, {}, O.CANCEL),
        ("perform", QemuView(True, False, "pre-switchover"), {}, O.CANCEL),
        ("perform", PAUSED_DONE, {}, O.RESUME),
        ("perform", QemuView(True, False, "failed"), {}, O.RESUME),
        ("perform", GONE, {}, O.RESUME),
        ("finish", PAUSED_DONE, {}, O.ASK),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.RUNNING}, O.CONFIRM),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.NOT_RUNNING}, O.RESUME),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.PENDING}, O.ASK),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.UNREACHABLE}, O.ASK),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.UNREACHABLE, "deadline_passed": True},
         O.FENCE_UNKNOWN),
        ("finish", PAUSED_DONE, {"peer": PeerOutcome.PENDING, "deadline_passed": True},
         O.FENCE_UNKNOWN),
        ("confirm", PAUSED_DONE, {"result": "completed"}, O.CONFIRM),
        ("confirm", PAUSED_DONE, {"result": "failed"}, O.RESUME),
        ("confirm", PAUSED_DONE, {}, O.ASK),
    ],
)
def test_outgoing_rows(
    phase: str | None, qemu: QemuView, kwargs: dict[str, object], action: OutgoingAction
) -> None:
    decision = decide_outgoing(phase, qemu, **kwargs)  # type: ignore[arg-type]
    assert decision.action is action
    assert decision.reason


def test_outgoing_never_resumes_after_finish_without_a_no() -> None:
    """The safety rule: past Finish, only a definite NOT_RUNNING (or a recorded failure) resumes."""
    views = [GONE, PAUSED_DONE, SENDING, QemuView(True, True, "completed")]
    peers = [None, *PeerOutcome]
    for view, peer, passed in itertools.product(views, peers, (False, True)):
        decision = decide_outgoing("finish", view, peer=peer, deadline_passed=passed)
        if decision.action is O.RESUME:
            assert peer is PeerOutcome.NOT_RUNNING
        if decision.action is O.CONFIRM:
            assert peer is PeerOutcome.RUNNING


def test_perform_cancels_in_every_migrating_state() -> None:
    for state in MIGRATING:
        assert decide_outgoing("perform", QemuView(True, False, state)).action is O.CANCEL


@pytest.mark.parametrize(
    ("state", "qemu", "action"),
    [
        (None, SENDING, I.KILL),
        ("prepared", QemuView(True, False), I.KILL),
        ("finishing", QemuView(True, True), I.KEEP),
        ("finishing", QemuView(True, False), I.KILL),
        ("finishing", GONE, I.KILL),
        ("running", QemuView(True, True), I.KEEP),
        ("running", GONE, I.KEEP),
        ("failed", QemuView(True, False), I.KILL),
    ],
)
def test_incoming_rows(state: str | None, qemu: QemuView, action: IncomingAction) -> None:
    assert decide_incoming(state, qemu).action is action


def test_incoming_keeps_only_started_cpus() -> None:
    for state, view in itertools.product(
        [None, "prepared", "finishing", "running", "failed"],
        [GONE, QemuView(True, False), QemuView(True, True)],
    ):
        if decide_incoming(state, view).action is I.KEEP:
            assert state == "running" or (state == "finishing" and view.running)
