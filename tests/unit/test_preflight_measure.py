"""The pre-flight's sans-I/O parts (issue 12): qemu's dirty rate, RSS, the goal,
the probe's bookkeeping, the destination's ``link_probe`` and ferryctl's text."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import pytest

from ferry.acl import Subject
from ferry.errors import AccessDenied, MessageInvalid, QMPError
from ferry.flags import MigrationFlags, MigrationParams
from ferry_destination.probe import MAX_PROBE_BYTES, link_probe
from ferry_source import preflight
from ferry_source.preflight import (
    LinkProbe,
    goal_from,
    json_safe,
    parse_dirty_rate,
    parse_resident_kib,
    resident_bytes,
)
from ferryctl.main import _finite, format_check

MIB = 1 << 20

# -- query-dirty-rate ----------------------------------------------------------


def test_dirty_rate_is_mib_per_second_once_measured() -> None:
    reply = {"status": "measured", "dirty-rate": 64, "mode": "dirty-bitmap", "calc-time": 1,
             "start-time": 13223, "sample-pages": 0}  # fmt: skip
    assert parse_dirty_rate(reply) == 64 * MIB
    assert parse_dirty_rate({**reply, "dirty-rate": 0}) == 0.0


@pytest.mark.parametrize("status", ["measuring", "unstarted"])
def test_dirty_rate_not_yet(status: str) -> None:
    assert parse_dirty_rate({"status": status, "start-time": 1, "calc-time": 1}) is None


@pytest.mark.parametrize(
    "reply",
    [None, [], {}, {"status": 3}, {"status": "measured"}, {"status": "measured", "dirty-rate": -1},
     {"status": "measured", "dirty-rate": True}, {"status": "measured", "dirty-rate": "64"}],
)  # fmt: skip
def test_dirty_rate_malformed(reply: Any) -> None:
    with pytest.raises(QMPError, match="query-dirty-rate"):
        parse_dirty_rate(reply)


class FakeQMP:
    """Answers calc-dirty-rate/query-dirty-rate from a script."""

    def __init__(
        self, refuse: set[str], polls: int, kvm: bool = True, migration: str = "none"
    ) -> None:
        self.refuse, self.polls, self.kvm, self.migration = refuse, polls, kvm, migration
        self.calls: list[tuple[str, Any]] = []
        self.mode = ""

    async def execute(self, cmd: str, args: Any = None, *, timeout: float | None = None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-kvm":
            return {"enabled": self.kvm, "present": True}
        if cmd == "query-migrate":
            return {"status": self.migration} if self.migration != "none" else {}
        if cmd == "calc-dirty-rate":
            if args["mode"] in self.refuse:
                raise QMPError("QMP command 'calc-dirty-rate' failed: mode not enabled",
                               command=cmd)  # fmt: skip
            self.mode = args["mode"]
            return {}
        self.polls -= 1
        if self.polls > 0:
            return {"status": "measuring", "start-time": 1, "calc-time": 1}
        return {"status": "measured", "dirty-rate": 12 if self.mode == "dirty-bitmap" else 10,
                "mode": self.mode}  # fmt: skip


async def test_dirty_bitmap_first_then_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight, "POLL_S", 0.0)
    qmp = FakeQMP(refuse=set(), polls=3)
    rate, method = await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]
    assert (rate, method) == (12 * MIB, "dirty-bitmap")
    assert [c[0] for c in qmp.calls] == ["query-kvm", "query-migrate", "calc-dirty-rate"] + [
        "query-dirty-rate"
    ] * 3
    # Where KVM's dirty ring is on qemu refuses dirty-bitmap: sampling instead.
    qmp = FakeQMP(refuse={"dirty-bitmap"}, polls=1)
    rate, method = await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]
    assert (rate, method) == (10 * MIB, "page-sampling")
    assert qmp.calls[-2][1] == {"calc-time": 0, "mode": "page-sampling", "sample-pages": 4096}
    qmp = FakeQMP(refuse={"dirty-bitmap", "page-sampling"}, polls=1)
    with pytest.raises(QMPError, match="calc-dirty-rate"):
        await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]


async def test_no_dirty_bitmap_without_kvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu 7.2 under TCG dies of SIGSEGV on calc-dirty-rate mode=dirty-bitmap."""
    monkeypatch.setattr(preflight, "POLL_S", 0.0)
    qmp = FakeQMP(refuse=set(), polls=1, kvm=False)
    rate, method = await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]
    assert method == "page-sampling" and rate == 10 * MIB
    assert all(args is None or args.get("mode") != "dirty-bitmap" for _, args in qmp.calls)


async def test_no_dirty_bitmap_during_a_migration(monkeypatch: pytest.MonkeyPatch) -> None:
    """dirty-bitmap clears KVM's dirty log, which a running migration needs."""
    monkeypatch.setattr(preflight, "POLL_S", 0.0)
    for status in ("setup", "active", "postcopy-active", "device"):
        qmp = FakeQMP(refuse=set(), polls=1, migration=status)
        _, method = await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]
        assert method == "page-sampling", status
    qmp = FakeQMP(refuse=set(), polls=1, migration="completed")
    _, method = await preflight.dirty_rate(qmp, "g1", calc_time=0)  # type: ignore[arg-type]
    assert method == "dirty-bitmap"


# -- resident memory -------------------------------------------------------------

STATUS = """Name:\tqemu-system-x86
VmPeak:\t 1234567 kB
VmRSS:\t  300000 kB
RssAnon:\t  262144 kB
RssFile:\t   30000 kB
RssShmem:\t    1024 kB
Threads:\t5
"""


def test_resident_is_anon_plus_shmem() -> None:
    assert parse_resident_kib(STATUS) == 262144 + 1024
    assert parse_resident_kib("VmRSS:\t 2048 kB\n") == 2048
    assert parse_resident_kib("Name:\tx\n") is None
    assert parse_resident_kib("") is None


def test_resident_capped_at_ram_and_none_when_gone() -> None:
    assert resident_bytes(os.getpid(), 4096) == 4096
    mine = resident_bytes(os.getpid(), 1 << 40)
    assert mine is not None and mine > MIB
    assert resident_bytes(2**22 + 12345, 1 << 30) is None  # beyond pid_max


# -- the goal ----------------------------------------------------------------------------


def test_goal_defaults() -> None:
    goal = goal_from(MigrationFlags.LIVE, MigrationParams())
    assert goal.deadline_s is None and goal.max_downtime_ms == 300
    assert goal.max_throttle_pct == 0 and goal.postcopy_allowed is False


def test_goal_from_limits() -> None:
    flags = MigrationFlags.LIVE | MigrationFlags.AUTO_CONVERGE | MigrationFlags.POSTCOPY
    goal = goal_from(flags, MigrationParams(deadline_s=5.0, max_downtime_ms=50))
    assert (goal.deadline_s, goal.max_downtime_ms, goal.max_throttle_pct,
            goal.postcopy_allowed) == (5.0, 50, 99, True)  # fmt: skip
    goal = goal_from(flags, MigrationParams(max_throttle_pct=40, max_downtime_ms=0))
    assert goal.max_throttle_pct == 40 and goal.max_downtime_ms == 0


def test_json_safe_and_probe_rate() -> None:
    value = {"a": float("inf"), "b": [float("nan"), 1.5], "c": (2, "x")}
    assert json_safe(value) == {"a": None, "b": [None, 1.5], "c": [2, "x"]}
    assert LinkProbe(bytes=32 * MIB, seconds=0.5, in_flight=4).bps == 64 * MIB
    assert LinkProbe(bytes=0, seconds=0.0, in_flight=4).bps == 0.0


# -- the probe's sender (a fake peer session) ----------------------------------------------


class FakeSession:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.closed = False

    async def request(self, op: str, args: dict[str, Any], *, timeout: float | None) -> Any:
        assert op == "link_probe"
        self.sizes.append(len(args["data"]))
        return {"bytes": len(args["data"])}

    async def close(self) -> None:
        self.closed = True


async def test_probe_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    session = FakeSession()

    async def connect(config: Any, host: str, port: int, **kw: Any) -> FakeSession:
        return session

    monkeypatch.setattr(preflight, "connect_peer", connect)
    ctx = SimpleNamespace(config=None)
    probe = await preflight.probe_link(ctx, "b", 49160, seconds=30.0,  # type: ignore[arg-type]
                                       max_bytes=4 * MIB, chunk=512 * 1024)  # fmt: skip
    # A small warm-up request, then at most max_bytes in chunks under the frame limit.
    assert session.sizes[0] == 4096
    assert probe.bytes == sum(session.sizes[1:]) == 4 * MIB
    assert max(session.sizes) == 512 * 1024 and session.closed
    assert probe.seconds < 5 and probe.bps > 0


# -- the destination's link_probe ---------------------------------------------------------


def _dst(acl: tuple[Any, ...] = ()) -> Any:
    return SimpleNamespace(config=SimpleNamespace(acl=acl))


def _req(subject: Subject) -> Any:
    return SimpleNamespace(subject=subject)


async def test_link_probe_counts_and_refuses_oversize() -> None:
    peer = Subject(kind="peer", peer="hv-a")
    assert await link_probe(_dst(), _req(peer), {"data": b"x" * 1000}) == {"bytes": 1000}
    assert await link_probe(_dst(), _req(peer), {"data": b""}) == {"bytes": 0}
    with pytest.raises(MessageInvalid, match="over the 1048576"):
        await link_probe(_dst(), _req(peer), {"data": b"x" * (MAX_PROBE_BYTES + 1)})


async def test_link_probe_checks_the_acl() -> None:
    rule = SimpleNamespace(peers=("hv-a",), users=(), groups=(), ops=("prepare",), domains=("*",))
    with pytest.raises(AccessDenied, match="link_probe"):
        await link_probe(_dst((rule,)), _req(Subject(kind="peer", peer="hv-a")), {"data": b"x"})
    local = Subject(kind="local", uid=1000, user="alice")
    with pytest.raises(AccessDenied):
        await link_probe(_dst((rule,)), _req(local), {"data": b"x"})


# -- ferryctl's text and JSON -----------------------------------------------------------------


def _result(**verdict: Any) -> dict[str, Any]:
    return {
        "name": "g1", "dest": "10.0.0.2",
        "measurements": {"ram_bytes": 256 * MIB, "resident_bytes": 200 * MIB,
                         "dirty_rate_bps": 64.0 * MIB, "bandwidth_bps": 32.0 * MIB,
                         "run_state": "running", "dirty_rate_method": "dirty-bitmap",
                         "probe": {"bytes": 32 * MIB, "seconds": 0.05, "bps": 640.0 * MIB,
                                   "in_flight": 4},
                         "bandwidth_cap_bps": 32.0 * MIB, "notes": []},
        "verdict": {"converges": False, "precopy_s": None, "throttle_needed_pct": None,
                    "postcopy_s": None, "plan": "precopy", "feasible": False,
                    "reasons": ["the guest dirties faster than the link"], **verdict},
    }  # fmt: skip


def test_text_when_it_converges() -> None:
    text = "\n".join(format_check(_result(converges=True, precopy_s=9.2, feasible=True,
                                          reasons=[])))  # fmt: skip
    assert "plain pre-copy converges in ~9.2 s" in text
    assert "64.0 MiB/s" in text and "200 MiB of 256 MiB RAM" in text
    assert "capped by --bandwidth 32.0 MiB/s" in text and "goal        feasible" in text


def test_text_when_it_cannot() -> None:
    text = "\n".join(format_check(_result(throttle_needed_pct=60, postcopy_s=8.0)))
    assert "pre-copy cannot converge: the guest dirties 64.0 MiB/s, the link moves 32.0" in text
    assert "a throttle of 60% would make it converge" in text
    assert "post-copy would take: ~8.0 s" in text
    assert "NOT feasible" in text and "the guest dirties faster than the link" in text


def test_text_when_it_needs_postcopy() -> None:
    text = "\n".join(format_check(_result(postcopy_s=12.5, plan="post-copy", feasible=True,
                                          downtime_ms=300)))  # fmt: skip
    assert "no throttle up to 99% makes it converge in time; needs post-copy: ~12 s" in text
    assert "plan        post-copy (downtime limit 300 ms)" in text


def test_json_has_no_infinity() -> None:
    result = _result(precopy_s=float("inf"), postcopy_s=float("nan"))
    text = json.dumps(_finite(result), allow_nan=False)
    assert json.loads(text)["verdict"]["precopy_s"] is None
