"""Offline migration's sans-I/O decisions (ferry.offline) and its flag rules."""

from __future__ import annotations

import pytest

from ferry.allowed import is_allowed
from ferry.domain import Domain, parse_domain
from ferry.errors import DomainExists, FlagError, MigrationRefused
from ferry.flags import MigrationFlags as M
from ferry.flags import MigrationParams, validate
from ferry.offline import (
    ConfirmAction,
    Pending,
    PendingBook,
    confirm_action,
    define_decision,
    source_refusal,
)

UUID = "11111111-2222-3333-4444-555555555555"
OTHER = "99999999-2222-3333-4444-555555555555"


# -- the flag rules (libvirt's) ------------------------------------------------


def test_offline_needs_persistent() -> None:
    with pytest.raises(FlagError, match="PERSIST_DEST"):
        validate(M.OFFLINE, MigrationParams())
    assert validate(M.OFFLINE | M.PERSIST_DEST, MigrationParams()) == M.OFFLINE | M.PERSIST_DEST
    flags = M.OFFLINE | M.PERSIST_DEST | M.UNDEFINE_SOURCE | M.PEER2PEER
    assert validate(flags, MigrationParams()) == flags


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (M.LIVE, "LIVE"),
        (M.TUNNELLED, "TUNNELLED"),
        (M.POSTCOPY, "POSTCOPY"),
        (M.NON_SHARED_DISK, "cannot copy storage"),
        (M.NON_SHARED_INC, "cannot copy storage"),
    ],
)
def test_offline_refuses_what_moves_data(extra: M, needle: str) -> None:
    with pytest.raises(FlagError, match=needle):
        validate(M.OFFLINE | M.PERSIST_DEST | extra, MigrationParams())


# -- Begin: the source's refusals ----------------------------------------------


def definition(devices: str = "") -> Domain:
    return parse_domain(f"""<domain type='kvm'><name>g1</name><uuid>{UUID}</uuid>
  <memory unit='KiB'>65536</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>{devices}</devices>
</domain>""", where="t.xml")


HOSTDEV = """<hostdev mode='subsystem' type='pci' managed='yes'>
  <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source></hostdev>"""


def test_source_refuses_a_transient_domain() -> None:
    with pytest.raises(MigrationRefused, match="transient") as info:
        source_refusal("g1", None, snapshots=[])
    assert "'g1'" in info.value.message


def test_source_refuses_snapshots_and_fences_first() -> None:
    with pytest.raises(MigrationRefused, match=r"cannot migrate domain 'g1': it has 2 snapshot"):
        source_refusal("g1", definition(), snapshots=["s1", "s2"])
    with pytest.raises(MigrationRefused, match="migrate-recover g1"):
        source_refusal("g1", None, snapshots=["s1"], fenced="outcome unknown")


def test_source_allows_a_persistent_domain_even_with_a_host_device() -> None:
    source_refusal("g1", definition(), snapshots=[])
    # Nothing of the running VM moves: qemu's migration blockers do not apply
    # (a live migration of this domain is refused; see test_domain_hostdev).
    with_hostdev = definition(HOSTDEV)
    assert is_allowed(with_hostdev, True), "the live rule must refuse it"
    source_refusal("g1", with_hostdev, snapshots=[])


# -- Prepare/Finish: may the destination define it? ------------------------------


def _decide(**facts: str | None) -> bool:
    base: dict[str, str | None] = {"defined_uuid": None, "running_uuid": None,
                                   "uuid_defined_as": None, "uuid_running_as": None}
    base.update(facts)
    return define_decision("g1", UUID, "b", **base)  # type: ignore[arg-type]


def test_define_new_and_update_same_uuid() -> None:
    assert _decide() is False
    assert _decide(defined_uuid=UUID, uuid_defined_as="g1") is True


def test_define_refuses_another_uuid_of_that_name() -> None:
    with pytest.raises(DomainExists, match=f"another uuid \\({OTHER}"):
        _decide(defined_uuid=OTHER)


def test_define_refuses_a_running_domain() -> None:
    with pytest.raises(DomainExists, match="is running there"):
        _decide(running_uuid=UUID, defined_uuid=UUID, uuid_running_as="g1")
    with pytest.raises(DomainExists, match="domain 'other'"):
        _decide(uuid_running_as="other")


def test_define_refuses_the_uuid_under_another_name() -> None:
    with pytest.raises(DomainExists, match="as 'g2'"):
        _decide(uuid_defined_as="g2")


# -- Confirm ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("undefine", "finish", "action"),
    [
        (False, "completed", ConfirmAction.KEEP),
        (True, "completed", ConfirmAction.UNDEFINE),
        (False, "failed", ConfirmAction.NOTHING),
        (True, "failed", ConfirmAction.NOTHING),
        (False, "unknown", ConfirmAction.NOTHING),
        # The answer was lost: the source definition never goes on a guess.
        (True, "unknown", ConfirmAction.KEEP_UNKNOWN),
    ],
)
def test_confirm_undefines_only_once_the_destination_said_so(
    undefine: bool, finish: str, action: ConfirmAction
) -> None:
    assert confirm_action(undefine_source=undefine, finish=finish) is action


# -- the destination's waiting Prepares --------------------------------------------


def _pending(name: str = "g1", mid: str = "aa", created: float = 0.0) -> Pending:
    return Pending(migration_id=mid, name=name, domain=object(), source_host="a",
                   created=created)  # fmt: skip


def test_pending_take_matches_name_and_migration_id() -> None:
    book = PendingBook()
    book.add(_pending(), now=0.0)
    assert book.take("g1", "bb", now=1.0) is None
    assert book.take("g2", None, now=1.0) is None
    taken = book.take("g1", "aa", now=1.0)
    assert taken is not None and taken.migration_id == "aa"
    assert book.take("g1", "aa", now=1.0) is None  # once only


def test_pending_refuses_a_second_migration_of_the_domain() -> None:
    book = PendingBook()
    book.add(_pending(mid="aa"), now=0.0)
    with pytest.raises(MigrationRefused, match="offline migration aa from a"):
        book.add(_pending(mid="bb"), now=1.0)
    book.add(_pending(mid="aa"), now=2.0)  # the same one again replaces itself


def test_pending_expires_and_is_bounded() -> None:
    book = PendingBook(ttl_s=10.0, limit=2)
    book.add(_pending("g1", created=0.0), now=0.0)
    book.add(_pending("g2", mid="bb", created=5.0), now=5.0)
    with pytest.raises(MigrationRefused, match="too many"):
        book.add(_pending("g3", mid="cc", created=6.0), now=6.0)
    # g1 is past its TTL at 11: forgotten, so g3 fits and g1's Finish finds nothing.
    book.add(_pending("g3", mid="cc", created=11.0), now=11.0)
    assert book.take("g1", "aa", now=11.0) is None
    assert [p["name"] for p in book.describe()] == ["g2", "g3"]


# -- ferryctl's text result ------------------------------------------------------


def test_ferryctl_says_what_an_offline_migration_did(capsys: pytest.CaptureFixture[str]) -> None:
    from ferryctl.progress import Display

    Display().finish({"name": "g1", "dest_name": "g9", "dest_host": "b", "offline": True,
                      "source_state": "running", "source_definition": "undefined",
                      "stats": {"result": "completed", "offline": 1}})  # fmt: skip
    out = capsys.readouterr().out
    assert out.startswith("Offline migration completed: g9 is defined (inactive) on b;")
    assert "g1 is running here, its definition undefined" in out
    assert "now runs on" not in out
