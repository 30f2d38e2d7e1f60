"""ferry.statefile: atomic writes and the domain status file format."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ferry.errors import StateFileError
from ferry.statefile import DomainStatus, JobFile, JobRecord, atomic_write


def _status() -> DomainStatus:
    return DomainStatus(
        name="g1",
        uuid="6f1b7a52-2a8e-4d2c-9a57-111111111111",
        pid=4242,
        qmp_path=Path("/run/ferry/qmp/g1.sock"),
        start_time=123456,
        run_state="running",
        cookie={"graphics": {"port": 5901}},
        extra={"note": "ü"},
    )


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "g1.status"
    original = _status()
    original.save(path)
    assert DomainStatus.load(path) == original
    # Minimal status: every optional field defaults.
    bare = DomainStatus(name="g2", uuid="u2")
    bare.save(path)
    assert DomainStatus.load(path) == bare


def test_atomic_write_mode_and_no_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "f"
    atomic_write(path, b"one")
    atomic_write(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_failed_rename_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "g1.status"
    _status().save(path)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(5, "simulated crash before rename")

    monkeypatch.setattr(os, "replace", broken_replace)
    changed = _status()
    changed.run_state = "paused"
    with pytest.raises(OSError, match="simulated"):
        changed.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["g1.status"]  # temp file cleaned up


def test_process_killed_before_rename_keeps_old_file(tmp_path: Path) -> None:
    # A real crash: the writer dies (os._exit) between fsync and rename.
    path = tmp_path / "g1.status"
    path.write_bytes(b'{"name": "g1", "uuid": "u"}')
    script = textwrap.dedent(
        f"""
        import os
        from pathlib import Path
        from ferry.statefile import atomic_write
        os.replace = lambda *a: os._exit(17)
        atomic_write(Path({str(path)!r}), b"new content")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=30)
    assert proc.returncode == 17
    assert json.loads(path.read_bytes()) == {"name": "g1", "uuid": "u"}
    # The orphaned temp file is hidden and never mistaken for the status.
    assert DomainStatus.load(path).name == "g1"


def test_unknown_keys_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "g1.status"
    data = _status().to_dict()
    data["future_field"] = {"x": 1}
    # A job left by the first layout is dropped, never written back stale.
    data["job"] = {"async_job": "migration-in", "phase": "prepare"}
    path.write_text(json.dumps(data))
    loaded = DomainStatus.load(path)
    assert loaded.name == "g1"
    loaded.save(path)
    again = json.loads(path.read_text())
    assert again["future_field"] == {"x": 1}
    assert "job" not in again


def test_job_file_round_trip(tmp_path: Path) -> None:
    record = JobRecord(
        async_job="migration-out",
        phase="perform",
        flags=0x41,
        owner="ferry-source",
        owner_pid=99,
        started=1700000000.5,
        migration_id="m-1",
        saved_migration={"caps": {"events": False}, "params": {"downtime-limit": 300}},
        data={"peer": "ferry://b", "was_running": True},
    )
    path = tmp_path / "u.job"
    atomic_write(path, JobFile(name="g1", uuid="u", job=record).dumps())
    loaded = JobFile.load(path)
    assert (loaded.name, loaded.uuid, loaded.job) == ("g1", "u", record)
    path.write_bytes(b'{"name": "g1", "uuid": "u", "job": {"flags": "x"}}')
    with pytest.raises(StateFileError, match="'flags' must be int"):
        JobFile.load(path)
    path.write_bytes(b"\xff")
    with pytest.raises(StateFileError, match="corrupt"):
        JobFile.load(path)


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"", "is empty"),
        (b'{"name": "g1", "uuid": ', "corrupt"),
        (b"\xff\xfe garbage", "not UTF-8"),
        (b"[1, 2]", "JSON object"),
        (b'{"name": "g1"}', "'uuid' is missing"),
        (b'{"name": "g1", "uuid": "u", "pid": "12"}', "'pid' must be int"),
        (b'{"name": "g1", "uuid": "u", "pid": true}', "'pid' must be int"),
        (b'{"name": "g1", "uuid": "u", "cookie": []}', "'cookie' must be dict"),
    ],
)
def test_corrupt_file_gives_clear_error(tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "g1.status"
    path.write_bytes(content)
    with pytest.raises(StateFileError) as info:
        DomainStatus.load(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)
    # No json traceback chained for the operator to wade through.
    assert info.value.__cause__ is None


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        DomainStatus.load(tmp_path / "nope.status")
