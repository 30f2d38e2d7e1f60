"""ferry.qemu.migration: caps/params snapshot and restore, query-migrate parsing."""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import tempfile
import time
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ferry.qemu import (
    MigrationStats,
    QemuProcess,
    SampleFields,
    SavedMigrationSettings,
    launch,
    query_caps,
    query_migrate,
    query_params,
    set_caps,
    set_params,
)

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


def _check_sample_accepted(sample: SampleFields) -> None:
    """The accounting code (reference backend) takes these fields as they are."""
    try:
        from ferry_native.reference.accounting import Sample
    except ImportError:  # the native package is built by another part of the tree
        return
    built = Sample(**sample)
    assert built.total == sample["total"]


@pytest.fixture
async def qemu() -> AsyncIterator[QemuProcess]:
    """One running TCG qemu, SIGKILLed at teardown whatever the test did."""
    assert QEMU is not None
    d = Path(tempfile.mkdtemp(prefix="fqm-", dir="/tmp"))
    uuid = str(uuidlib.uuid4())
    argv = [
        QEMU, "-nodefaults", "-display", "none", "-machine", "pc,accel=tcg", "-m", "64",
        "-uuid", uuid, "-daemonize", "-pidfile", str(d / "q.pid"),
        "-chardev", f"socket,id=monitor,path={d / 'q.sock'},server=on,wait=off",
        "-mon", "chardev=monitor,mode=control",
    ]  # fmt: skip
    proc = await launch(argv, pidfile=d / "q.pid", qmp_socket=d / "q.sock")
    pidfd = os.pidfd_open(proc.pid)  # our own handle: survives proc.close()
    try:
        yield proc
    finally:
        await proc.close()
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            select.select([pidfd], [], [], 10)
        except ProcessLookupError:
            pass
        os.close(pidfd)
        shutil.rmtree(d, ignore_errors=True)


@needs_qemu
async def test_caps_and_params_set_and_restore(qemu: QemuProcess) -> None:
    qmp = qemu.qmp
    saved = await SavedMigrationSettings.snapshot(qmp)
    assert saved.caps["auto-converge"] is False
    assert saved.params["max-bandwidth"] == 128 * 1024 * 1024  # qemu's default
    assert saved.params["downtime-limit"] == 300

    await set_caps(qmp, {"auto-converge": True, "events": True})
    await set_params(qmp, {"max-bandwidth": 0, "downtime-limit": 1234, "cpu-throttle-initial": 35})
    caps = await query_caps(qmp)
    params = await query_params(qmp)
    assert caps["auto-converge"] and caps["events"]
    assert (params["max-bandwidth"], params["downtime-limit"]) == (0, 1234)
    assert params["cpu-throttle-initial"] == 35

    # The snapshot survives a trip through the job record (JSON).
    restored = SavedMigrationSettings.from_dict(saved.to_dict())
    await restored.restore(qmp)
    assert await query_caps(qmp) == saved.caps
    assert await query_params(qmp) == saved.params
    await set_caps(qmp, {})  # no-op
    await set_params(qmp, {})


@needs_qemu
async def test_query_migrate_idle(qemu: QemuProcess) -> None:
    stats = await query_migrate(qemu.qmp)
    assert stats.status == "none"
    assert stats.ram_total == 0 and stats.total_time_ms is None
    assert not stats.finished
    sample = stats.to_sample()
    assert sample == {
        "time_s": 0.0, "transferred": 0, "remaining": 0, "total": 0,
        "dirty_pages_rate": 0.0, "page_size": 4096, "iteration": 0, "throttle_pct": 0,
    }  # fmt: skip
    _check_sample_accepted(sample)


@needs_qemu
async def test_migrate_to_null_reports_events_and_stats(qemu: QemuProcess) -> None:
    qmp = qemu.qmp
    saved = await SavedMigrationSettings.snapshot(qmp)
    # MIGRATION / MIGRATION_PASS events exist only with the "events" capability.
    await set_caps(qmp, {"events": True})
    await set_params(qmp, {"max-bandwidth": 0})
    with qmp.subscribe({"MIGRATION", "MIGRATION_PASS", "STOP"}) as events:
        await qmp.execute("migrate", {"uri": "exec:cat > /dev/null"})
        done = await events.wait_for("MIGRATION", 30, match={"status": "completed"})
        seen = [e.name for e in events.pending()]
    assert done.data == {"status": "completed"}
    # wait_for left the events it skipped queued: the source CPUs stopped for
    # the final pass, and the passes over RAM were announced.
    assert "STOP" in seen and "MIGRATION_PASS" in seen
    stats = await query_migrate(qmp)
    assert stats.status == "completed" and stats.finished
    assert stats.ram_total >= 64 * 1024 * 1024
    assert stats.ram_page_size == 4096
    assert stats.total_time_ms is not None and stats.downtime_ms is not None
    assert stats.ram_dirty_sync_count >= 1
    sample = stats.to_sample()
    _check_sample_accepted(sample)
    assert sample["total"] == stats.ram_total
    assert sample["time_s"] == stats.total_time_ms / 1000
    # qemu sends "completed" while still in finish-migrate; postmigrate follows.
    status = await qmp.query_status()
    deadline = time.monotonic() + 10
    while status.status == "finish-migrate" and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        status = await qmp.query_status()
    assert (status.running, status.status, status.reason) == (False, "postmigrate", "migration")
    await saved.restore(qmp)
    assert await query_caps(qmp) == saved.caps


def test_stats_from_reply() -> None:
    reply = {
        "status": "active",
        "total-time": 1500,
        "expected-downtime": 120,
        "setup-time": 3,
        "cpu-throttle-percentage": 30,
        "ram": {
            "transferred": 1000, "remaining": 2000, "total": 4096000, "duplicate": 5,
            "normal": 7, "normal-bytes": 28672, "dirty-pages-rate": 900, "page-size": 4096,
            "dirty-sync-count": 3, "mbps": 12.5,
        },
    }  # fmt: skip
    stats = MigrationStats.from_qmp(reply)
    assert stats.to_sample() == {
        "time_s": 1.5, "transferred": 1000, "remaining": 2000, "total": 4096000,
        "dirty_pages_rate": 900.0, "page_size": 4096, "iteration": 3, "throttle_pct": 30,
    }  # fmt: skip
    _check_sample_accepted(stats.to_sample())
    assert stats.expected_downtime_ms == 120 and stats.downtime_ms is None
    assert stats.ram_mbps == 12.5
    failed = MigrationStats.from_qmp({"status": "failed", "error-desc": "boom", "ram": "junk"})
    assert failed.finished and failed.error_desc == "boom" and failed.ram_total == 0


def test_saved_settings_from_bad_dict() -> None:
    with pytest.raises(ValueError, match="caps"):
        SavedMigrationSettings.from_dict({"params": {}})
