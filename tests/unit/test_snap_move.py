"""The source's decisions for snapshots that move: the feature check, the bounds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ferry.errors import MigrationRefused
from ferry.flags import MigrationFlags
from ferry.snapshots import Snapshot, SnapshotStore, SnapshotTree
from ferry_source.snapshot_move import check_peer, snapshot_frames


def _session(features: set[str] | None) -> Any:
    negotiated = None if features is None else SimpleNamespace(features=frozenset(features))
    return SimpleNamespace(conn=SimpleNamespace(negotiated=negotiated))


def _out(name: str = "vm", flags: int = 0) -> Any:
    return SimpleNamespace(name=name, peer="hostb", flags=MigrationFlags(flags))


FRAMES = [{"seq": 0, "snapshots": ["<a/>", "<b/>"], "last": True, "current": None}]


def test_a_peer_without_the_feature_gets_the_old_refusal() -> None:
    with pytest.raises(MigrationRefused, match=r"with 2 snapshot\(s\).*'snapshots' feature"):
        check_peer(_session({"tunnel", "journal"}), _out(), FRAMES)
    with pytest.raises(MigrationRefused):
        check_peer(_session(None), _out(), FRAMES)


def test_a_peer_with_the_feature_or_no_snapshots_passes() -> None:
    check_peer(_session({"snapshots"}), _out(), FRAMES)
    check_peer(_session(set()), _out(), [{"seq": 0, "snapshots": [], "last": True}])


def _ctx(tmp_path: Path, max_frame: int) -> Any:
    return SimpleNamespace(config=SimpleNamespace(
        paths=SimpleNamespace(snapshots_dir=tmp_path), max_frame=max_frame))  # fmt: skip


def test_frames_come_from_the_store_and_over_the_bounds_is_refused(tmp_path: Path) -> None:
    assert snapshot_frames(_ctx(tmp_path, 1 << 20), _out()) == [
        {"seq": 0, "snapshots": [], "last": True, "current": None}]  # fmt: skip
    tree = SnapshotTree()
    tree.create(Snapshot("s1", description="z" * 9000))
    SnapshotStore(tmp_path).save_all("vm", tree)
    frames = snapshot_frames(_ctx(tmp_path, 1 << 20), _out())
    assert len(frames) == 1 and frames[0]["current"] == "s1"
    with pytest.raises(MigrationRefused, match=r"with its snapshots: .*'s1'"):
        snapshot_frames(_ctx(tmp_path, 8192), _out())


def test_the_features_this_build_speaks_include_snapshots() -> None:
    from ferry.rpc import FEATURES

    assert "snapshots" in FEATURES


def test_internal_snapshots_refuse_a_storage_copy(tmp_path: Path) -> None:
    tree = SnapshotTree()
    tree.create(Snapshot("meta"))
    tree.create(Snapshot("mem", kind="internal", memory="internal", vmstate_disk="vda-format"))
    SnapshotStore(tmp_path).save_all("vm", tree)
    ctx = _ctx(tmp_path, 1 << 20)
    assert len(snapshot_frames(ctx, _out())[0]["snapshots"]) == 2
    with pytest.raises(MigrationRefused, match=r"storage copy: its snapshot.* mem keep"):
        snapshot_frames(ctx, _out(flags=int(MigrationFlags.NON_SHARED_DISK)))
