"""Outcome records (destination), fences (source) and the test fault points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ferry.errors import ConfigError, DomainState, StateFileError
from ferry.faults import Faults, parse_faults
from ferry.fences import MIGRATED, UNKNOWN, Fence, FenceBook
from ferry.outcomes import FAILED, FINISHING, PREPARED, RUNNING, OutcomeBook

MID = "0123456789abcdef0123456789abcdef"


def test_outcome_answers(tmp_path: Path) -> None:
    book = OutcomeBook(tmp_path / "outcomes", retention_s=60)
    assert book.get(MID) is None
    expected = {PREPARED: "pending", FINISHING: "pending", RUNNING: "running",
                FAILED: "not-running"}  # fmt: skip
    for state, outcome in expected.items():
        book.record(MID, state, domain="g1", uuid="u", reason=f"r-{state}", source_host="a")
        entry = book.get(MID)
        assert entry is not None and entry.state == state
        answer = entry.answer()
        assert answer["outcome"] == outcome and answer["reason"] == f"r-{state}"
    # Durable: a new book (a restarted agent) reads the same.
    again = OutcomeBook(tmp_path / "outcomes", retention_s=60).get(MID)
    assert again is not None and again.state == FAILED and again.source_host == "a"


def test_outcome_ids_are_file_names_only(tmp_path: Path) -> None:
    book = OutcomeBook(tmp_path, retention_s=60)
    for bad in ("../x", "", "a/b", "x" * 65, "ABC"):
        with pytest.raises(StateFileError, match="not a valid id"):
            book.record(bad, RUNNING, domain="g1", uuid="u")
        assert book.get(bad) is None
    with pytest.raises(StateFileError, match="unknown outcome state"):
        book.record(MID, "maybe", domain="g1", uuid="u")


def test_outcome_prune_keeps_undecided(tmp_path: Path) -> None:
    book = OutcomeBook(tmp_path, retention_s=10)
    book.record("aa", RUNNING, domain="g1", uuid="u")
    book.record("bb", PREPARED, domain="g2", uuid="v")
    book.prune(now=time.time() + 100)
    assert book.get("aa") is None
    assert book.get("bb") is not None
    (tmp_path / "cc.json").write_text("{broken")
    with pytest.raises(StateFileError, match="corrupt"):
        book.get("cc")
    assert [e.migration_id for e in book.all()] == ["bb"]


def test_fences(tmp_path: Path) -> None:
    book = FenceBook(tmp_path / "fences")
    assert book.get("u") is None and book.all() == []
    book.put(Fence(uuid="u", name="g1", migration_id=MID, peer="b", peer_uri="ferry://b",
                   outcome=UNKNOWN, reason="b unreachable"))  # fmt: skip
    fence = book.get("u")
    assert fence is not None and fence.since > 0
    assert fence.describe() == f"migration {MID} to b: outcome unknown, b unreachable"
    error = fence.refusal("resume")
    assert isinstance(error, DomainState)
    assert "refusing to resume domain 'g1'" in str(error)
    assert "migrate-recover g1" in str(error) and "--force" in str(error)
    book.put(Fence(uuid="u", name="g1", migration_id=MID, peer="b", peer_uri="ferry://b",
                   outcome=MIGRATED))  # fmt: skip
    assert "moved it to b" in str(book.get("u").refusal("start"))  # type: ignore[union-attr]
    assert book.clear("u") and not book.clear("u")
    # A damaged fence still refuses: refusing is the safe reading.
    (tmp_path / "fences" / "v.json").write_text("not json")
    damaged = book.get("v")
    assert damaged is not None and damaged.outcome == UNKNOWN


def test_parse_faults() -> None:
    specs = parse_faults(["dst.finish=drop-reply", "src.perform=stop"])
    assert [(s.point, s.action) for s in specs] == [("dst.finish", "drop-reply"),
                                                    ("src.perform", "stop")]  # fmt: skip
    for bad in ("dst.finish", "nowhere=stop", "dst.finish=explode"):
        with pytest.raises(ConfigError, match="POINT=ACTION"):
            parse_faults([bad])


def test_fault_fires_once() -> None:
    faults = Faults(parse_faults(["dst.finish=drop-reply"]))
    assert faults.hit("dst.prepare") is None
    assert faults.hit("dst.finish") == "drop-reply"
    assert faults.hit("dst.finish") is None


def test_stop_fault_freezes_the_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        from ferry.faults import Faults, parse_faults
        f = Faults(parse_faults(["src.begin=stop"]))
        print("before", flush=True)
        f.hit("src.begin")
        print("after", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == "before\n"
    deadline = time.monotonic() + 30
    while Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1][0] != "T":
        assert time.monotonic() < deadline, "the process never stopped"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGCONT)
    assert proc.stdout.readline() == "after\n"
    assert proc.wait(30) == 0
