"""Phase order: legal paths, and every illegal step refused without a change."""

from __future__ import annotations

import pytest

from ferry.errors import PhaseError
from ferry.protocol.phases import PHASES, DestinationPhases, SourcePhases

SourceOrDest = type[SourcePhases] | type[DestinationPhases]


def test_source_happy_path() -> None:
    p = SourcePhases()
    assert p.current == "none" and not p.done
    p.advance("begin")
    p.advance("perform")
    assert not p.done
    p.advance("confirm")
    assert p.current == "confirm" and p.done and not p.cancelled


def test_source_cancel_path_skips_perform() -> None:
    p = SourcePhases()
    p.advance("begin")
    p.advance("confirm", cancelled=True)
    assert p.done and p.cancelled


def test_source_confirm_after_failed_perform_may_be_cancelled() -> None:
    p = SourcePhases()
    p.advance("begin")
    p.advance("perform")
    p.advance("confirm", cancelled=True)
    assert p.done and p.cancelled


def test_source_confirm_from_begin_requires_cancelled() -> None:
    p = SourcePhases("begin")
    with pytest.raises(PhaseError) as info:
        p.advance("confirm")
    assert "'confirm'" in str(info.value) and "'begin'" in str(info.value)
    assert p.current == "begin"


@pytest.mark.parametrize("start", ["begin", "perform"])
def test_source_abort(start: str) -> None:
    p = SourcePhases(start)
    p.abort()
    assert p.current == "aborted" and p.done


@pytest.mark.parametrize("start", ["none", "confirm", "aborted"])
def test_source_abort_refused(start: str) -> None:
    p = SourcePhases(start)
    with pytest.raises(PhaseError, match=f"from '{start}'"):
        p.abort()
    assert p.current == start


def test_destination_happy_and_cancel_paths() -> None:
    p = DestinationPhases()
    p.advance("prepare")
    p.advance("finish")
    assert p.done and not p.cancelled
    q = DestinationPhases()
    q.advance("prepare")
    q.advance("finish", cancelled=True)
    assert q.done and q.cancelled
    r = DestinationPhases("prepare")
    r.abort()
    assert r.current == "aborted" and r.done


def test_message_example() -> None:
    with pytest.raises(PhaseError) as info:
        DestinationPhases().advance("finish")
    assert str(info.value) == "cannot enter 'finish' from 'none': expected 'prepare'"
    assert info.value.details["current"] == "none"
    assert info.value.details["attempted"] == "finish"


LEGAL = {
    SourcePhases: {
        ("none", "begin"),
        ("begin", "perform"),
        ("begin", "confirm"),
        ("begin", "aborted"),
        ("perform", "confirm"),
        ("perform", "aborted"),
    },
    DestinationPhases: {("none", "prepare"), ("prepare", "finish"), ("prepare", "aborted")},
}
ILLEGAL = [
    (cls, current, attempted)
    for cls in (SourcePhases, DestinationPhases)
    for current in sorted(cls.TRANSITIONS)
    for attempted in sorted(PHASES | {"bogus"})
    if (current, attempted) not in LEGAL[cls]
]


@pytest.mark.parametrize(
    ("cls", "current", "attempted"),
    ILLEGAL,
    ids=[f"{c.SIDE}:{a}->{b}" for c, a, b in ILLEGAL],
)
def test_every_illegal_transition_names_both_phases_and_changes_nothing(
    cls: SourceOrDest, current: str, attempted: str
) -> None:
    for cancelled in (False, True):
        p = cls(current)
        with pytest.raises(PhaseError) as info:
            p.advance(attempted, cancelled=cancelled)
        message = str(info.value)
        assert f"cannot enter {attempted!r} from {current!r}" in message
        assert p.current == current
        assert not p.cancelled


def test_legal_table_matches_the_machines() -> None:
    for cls, legal in LEGAL.items():
        for current, attempted in legal:
            p = cls(current)
            p.advance(attempted, cancelled=True)
            assert p.current == attempted


def test_terminal_phase_says_the_migration_is_over() -> None:
    p = SourcePhases("confirm")
    with pytest.raises(PhaseError, match="migration is over"):
        p.advance("begin")


def test_restore_at_recorded_phase_and_refuse_unknown() -> None:
    assert SourcePhases("perform").allowed() == ("confirm", "aborted")
    with pytest.raises(PhaseError, match="'prepare'"):
        SourcePhases("prepare")  # a destination phase
    with pytest.raises(PhaseError):
        DestinationPhases("perform")
