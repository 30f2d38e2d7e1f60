"""The destination's side of a client-driven migration (issue 13), without sockets or qemu.

- :class:`~ferry_destination.incoming.Binding`: a closed source connection
  ends a p2p migration at once; a closed client connection gets the grace,
  and a client that adopts the migration within it replaces the old one.
- The watchdog follows the binding: an adopted migration survives its first
  client, one nobody adopts is discarded with a reason saying so.
- ``adopt_incoming``: the errors (nothing here and what the record says,
  driven by its source host, a peer asking, Finish begun) and the reply:
  Prepare's answer, a fresh token for the source host while the old one is
  unused, none once a channel was redeemed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import ferry_destination.incoming as incoming_mod
from ferry.acl import Subject
from ferry.config import parse_config
from ferry.errors import AccessDenied, AuthError, FerryError, PhaseError, QMPError
from ferry.flags import MigrationFlags
from ferry.outcomes import FAILED, PREPARED, OutcomeBook
from ferry.tunnel import TokenBook
from ferry_destination.adopt import adopt_incoming
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Binding, Incoming, watchdog
from ferry_destination.tunnel import IncomingTunnel

MIG = "0123456789abcdef0123456789abcdef"
ALICE = Subject(kind="operator", operator="alice")
BOB = Subject(kind="operator", operator="bob")
HOST_A = Subject(kind="peer", peer="a")


class FakeSession:
    """A control connection that closes when told."""

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def close(self) -> None:
        self._closed.set()


class Closable:
    """A connection for the sans-I/O Binding tests (no event loop)."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed

    async def wait_closed(self) -> None:  # pragma: no cover - never awaited here
        pass


# -- Binding: the decision, apart from any socket -------------------------------------


def test_p2p_ends_with_its_source_connection_at_once() -> None:
    conn = Closable()
    binding = Binding(conn, client_driven=False, grace_s=15)
    assert binding.verdict(100.0) is None
    conn.closed = True
    assert binding.verdict(100.0) == "the source's connection closed before Finish"
    with pytest.raises(PhaseError, match="driven by its source host, not a client"):
        binding.adopt(Closable())


def test_client_driven_waits_the_grace_then_says_why() -> None:
    conn = Closable()
    binding = Binding(conn, client_driven=True, grace_s=15)
    conn.closed = True
    assert binding.verdict(100.0) is None and binding.lost_at == 100.0
    assert binding.verdict(114.9) is None
    assert binding.verdict(115.0) == (
        "the client's connection closed before Finish and no client took the migration "
        "over within 15 s (ferryctl migrate-recover)"
    )


def test_a_client_that_adopts_in_the_grace_is_followed_instead() -> None:
    first, second = Closable(), Closable()
    binding = Binding(first, client_driven=True, grace_s=15)
    first.closed = True
    assert binding.verdict(100.0) is None
    assert binding.adopt(second) is False  # the one it replaced had gone
    assert binding.session is second and binding.lost_at is None
    assert binding.verdict(200.0) is None  # the new client is there: no deadline
    second.closed = True
    assert binding.verdict(300.0) is None  # a fresh grace from now
    assert binding.verdict(315.0) is not None
    # Taking over from a client still connected is allowed (and reported).
    third, fourth = Closable(), Closable()
    binding = Binding(third, client_driven=True, grace_s=15)
    assert binding.adopt(fourth) is True


# -- the watchdog and adopt_incoming with a fake agent --------------------------------


class FakeHost:
    def __init__(self) -> None:
        self.killed: list[str] = []

    async def kill(self, name: str) -> None:
        self.killed.append(name)


class FakeJobs:
    def __init__(self) -> None:
        self.ended: list[Any] = []

    async def end_async(self, job: Any) -> None:
        self.ended.append(job)


class NoQMP:
    """An incoming qemu that is not in post-copy (query-migrate fails: not held)."""

    async def execute(self, cmd: str, args: Any = None, *, timeout: float | None = None) -> Any:
        raise QMPError(f"{cmd}: no qemu in this test")


def _dst(tmp_path: Path, **tables: Any) -> DestinationContext:
    config = parse_config({
        "host": {"uuid": "00000000-0000-4000-8000-00000000000b", "name": "b"},
        "acl": [{"operators": ["alice", "bob"], "ops": ["prepare"]}],
        **tables,
    })  # fmt: skip
    return DestinationContext(
        config=config, host=FakeHost(), jobs=FakeJobs(),  # type: ignore[arg-type]
        outcomes=OutcomeBook(tmp_path / "outcomes", 3600), fences=None,  # type: ignore[arg-type]
        tokens=TokenBook(), faults=None,  # type: ignore[arg-type]
        notify_status=lambda: None,
    )  # fmt: skip


def _incoming(
    dst: DestinationContext,
    session: Any,
    *,
    client_driven: bool,
    grace_s: float = 15.0,
    tunnel: IncomingTunnel | None = None,
) -> Incoming:
    domain = SimpleNamespace(name="vm1", uuid="11111111-2222-4333-8444-555555555555")
    incoming = Incoming(
        domain, SimpleNamespace(name="job"), SimpleNamespace(qmp=NoQMP()),  # type: ignore[arg-type]
        MIG, MigrationFlags(0), source_host="a", tunnel=tunnel,
        binding=Binding(session, client_driven=client_driven, grace_s=grace_s),
    )  # fmt: skip
    incoming.phases.advance("prepare")
    if client_driven:
        incoming.answer = {"uri": "tunnel" if tunnel else "tcp:10.0.0.2:49200",
                           "cookie": b"cookie", "name": "vm1"}  # fmt: skip
    dst.outcomes.record(MIG, PREPARED, domain="vm1", uuid=domain.uuid, source_host="a")
    dst.incoming["vm1"] = incoming
    return incoming


def _request(session: Any, subject: Subject) -> Any:
    return SimpleNamespace(session=session, subject=subject, request_id=1, op="adopt_incoming")


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def fast_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incoming_mod, "WATCH_INTERVAL", 0.01)


async def test_watchdog_discards_p2p_when_its_source_goes(tmp_path: Path) -> None:
    dst = _dst(tmp_path)
    session = FakeSession()
    incoming = _incoming(dst, session, client_driven=False)
    task = asyncio.create_task(watchdog(dst, incoming))
    session.close()
    await asyncio.wait_for(task, 5)
    assert "vm1" not in dst.incoming
    record = dst.outcomes.get(MIG)
    assert record is not None and record.state == FAILED
    assert record.reason == "the source's connection closed before Finish"


async def test_watchdog_follows_the_adopting_client_then_discards_after_grace(
    tmp_path: Path,
) -> None:
    dst = _dst(tmp_path)
    first = FakeSession()
    incoming = _incoming(dst, first, client_driven=True, grace_s=0.3)
    incoming.watchdog = asyncio.create_task(watchdog(dst, incoming))
    first.close()
    await asyncio.sleep(0.1)
    second = FakeSession()
    reply = await adopt_incoming(dst, _request(second, BOB), {"migration_id": MIG})
    assert reply["name"] == "vm1"
    await asyncio.sleep(0.6)  # well past the first grace: the new client holds it
    assert dst.incoming.get("vm1") is incoming and not incoming.watchdog.done()
    second.close()
    await asyncio.wait_for(incoming.watchdog, 5)
    assert "vm1" not in dst.incoming and dst.host.killed == ["vm1"]  # type: ignore[attr-defined]
    record = dst.outcomes.get(MIG)
    assert record is not None and record.state == FAILED
    assert record.reason == (
        "the client's connection closed before Finish and no client took the migration "
        "over within 0.3 s (ferryctl migrate-recover)"
    )
    # Too late now: the record says why.
    with pytest.raises(PhaseError) as info:
        await adopt_incoming(dst, _request(FakeSession(), ALICE), {"migration_id": MIG})
    assert str(info.value) == (
        f"migration {MIG}: no incoming migration to take over on b (outcome: failed: "
        "the client's connection closed before Finish and no client took the migration "
        "over within 0.3 s (ferryctl migrate-recover))"
    )


async def test_adopt_refusals(tmp_path: Path) -> None:
    dst = _dst(tmp_path)
    session = FakeSession()
    with pytest.raises(PhaseError, match=f"migration {MIG}: no incoming migration to take "
                                         "over on b \\(b has no record of it\\)"):  # fmt: skip
        await adopt_incoming(dst, _request(session, ALICE), {"migration_id": MIG})
    incoming = _incoming(dst, FakeSession(), client_driven=False)
    with pytest.raises(PhaseError, match="is driven by its source host a, not a client"):
        await adopt_incoming(dst, _request(session, ALICE), {"migration_id": MIG})
    incoming.binding = Binding(FakeSession(), client_driven=True)
    with pytest.raises(AccessDenied, match="only a client"):
        await adopt_incoming(dst, _request(session, HOST_A), {"migration_id": MIG})
    with pytest.raises(AccessDenied, match="operator 'carol' may not run 'prepare'"):
        carol = Subject(kind="operator", operator="carol")
        await adopt_incoming(dst, _request(session, carol), {"migration_id": MIG})
    incoming.finishing = True
    with pytest.raises(PhaseError, match="Finish has begun on b"):
        await adopt_incoming(dst, _request(session, ALICE), {"migration_id": MIG})
    assert incoming.binding.session is not session


async def test_adopt_replies_prepares_answer_without_token_when_not_tunnelled(
    tmp_path: Path,
) -> None:
    dst = _dst(tmp_path)
    incoming = _incoming(dst, FakeSession(), client_driven=True)
    session = FakeSession()
    reply = await adopt_incoming(dst, _request(session, ALICE), {"migration_id": MIG})
    assert reply == {"name": "vm1", "migration_id": MIG, "phase": "prepare",
                     "uri": "tcp:10.0.0.2:49200", "cookie": b"cookie"}  # fmt: skip
    assert incoming.binding is not None and incoming.binding.session is session


async def test_adopt_issues_a_fresh_token_for_the_source_host_until_a_channel_connects(
    tmp_path: Path,
) -> None:
    dst = _dst(tmp_path)
    tunnel = IncomingTunnel("vm1", tmp_path / "t.sock", 2)
    _incoming(dst, FakeSession(), client_driven=True, tunnel=tunnel)
    old = dst.tokens.issue("vm1", 2, 60, tunnel, redeemer="a")
    reply = await adopt_incoming(dst, _request(FakeSession(), ALICE), {"migration_id": MIG})
    assert reply["uri"] == "tunnel" and reply["tunnel"]["channels"] == 2
    token = reply["tunnel"]["token"]
    with pytest.raises(AuthError, match="unknown"):
        dst.tokens.redeem(old, 0, "tls")  # the old client's token is revoked
    grant = dst.tokens.redeem(token, 0, "tls")
    assert grant.redeemer == "a" and grant.sink is tunnel
    grant.check_redeemer(Subject(kind="peer", peer="a"))
    with pytest.raises(AuthError, match="is for host a; refused for operator"):
        grant.check_redeemer(ALICE)
    # Channel 0 is in: the source host has what it needs, no new token.
    reply = await adopt_incoming(dst, _request(FakeSession(), BOB), {"migration_id": MIG})
    assert "tunnel" not in reply
    dst.tokens.redeem(token, 1, "tls")  # the token still works for the next channel


async def test_adopt_of_an_unknown_id_checks_the_acl_before_saying_anything(
    tmp_path: Path,
) -> None:
    dst = _dst(tmp_path)
    with pytest.raises(AccessDenied):
        carol = Subject(kind="operator", operator="carol")
        await adopt_incoming(dst, _request(FakeSession(), carol), {"migration_id": MIG})
    with pytest.raises(FerryError):
        await adopt_incoming(dst, _request(FakeSession(), ALICE), {"migration_id": "zz"})
