"""ferry.jobs: job masks, nesting, busy messages, cross-process lock, persistence."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from ferry.errors import JobAborted, JobBusy, JobError, StateFileError
from ferry.jobs import (
    ASYNC_JOB_MASKS,
    AsyncJob,
    DomainLock,
    JobManager,
    JobType,
    allowed_during,
)
from ferry.statefile import DomainStatus, JobRecord

UUID = "0b4f3a52-1111-4c2c-9a57-2b3c4d5e6f70"
SYNC_TYPES = [t for t in JobType if t is not JobType.NESTED]
SHORT = 0.05  # timeout for attempts that are expected to fail

# What libvirt allows (qemuMigrationJobStart, VIR_JOB_DEFAULT_MASK, DESTROY always).
EXPECTED_ALLOWED = {
    AsyncJob.MIGRATION_OUT: {"query", "destroy", "abort", "suspend", "migration-op"},
    AsyncJob.MIGRATION_IN: {"destroy"},
    AsyncJob.SAVE: {"query", "destroy", "abort"},
    AsyncJob.DUMP: {"query", "destroy", "abort"},
    AsyncJob.SNAPSHOT: {"query", "destroy", "abort"},
}


@pytest.fixture
def mgr(tmp_path: Path) -> JobManager:
    return JobManager(tmp_path / "locks", tmp_path / "jobs", agent="ferry-source")


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    (tmp_path / "locks").mkdir()
    (tmp_path / "domains").mkdir()


def test_mask_table_matches_libvirt() -> None:
    assert {k: {str(t) for t in v} for k, v in ASYNC_JOB_MASKS.items()} == EXPECTED_ALLOWED
    for sync in SYNC_TYPES:
        assert allowed_during(None, sync)
    assert not allowed_during(None, JobType.NESTED)
    for aj in AsyncJob:
        assert not allowed_during(aj, JobType.MODIFY)
        assert allowed_during(aj, JobType.DESTROY)


@pytest.mark.parametrize("async_type", list(AsyncJob))
@pytest.mark.parametrize("sync_type", SYNC_TYPES)
async def test_sync_job_during_async_job(
    mgr: JobManager, async_type: AsyncJob, sync_type: JobType
) -> None:
    job = await mgr.begin_async(UUID, "g1", async_type, phase="p1")
    if str(sync_type) in EXPECTED_ALLOWED[async_type]:
        async with mgr.sync_job(UUID, "g1", sync_type, timeout=SHORT) as sync:
            record = mgr.current(UUID)
            assert record is not None
            assert (record.async_job, record.active) == (str(async_type), str(sync_type))
            assert sync.type is sync_type
    else:
        with pytest.raises(JobBusy) as info:
            await mgr.begin_sync(UUID, "g1", sync_type, timeout=SHORT)
        assert f"async job {async_type} (phase p1) held by ferry-source" in str(info.value)
    await mgr.end_async(job)
    assert mgr.current(UUID) is None


async def test_one_sync_job_at_a_time(mgr: JobManager) -> None:
    first = await mgr.begin_sync(UUID, "g1", JobType.QUERY)
    with pytest.raises(JobBusy, match="is busy: job query held by ferry-source"):
        await mgr.begin_sync(UUID, "g1", JobType.MODIFY, timeout=SHORT)
    # A waiter gets the domain as soon as the holder ends.
    waiter = asyncio.create_task(mgr.begin_sync(UUID, "g1", JobType.MODIFY, timeout=10))
    await asyncio.sleep(0)
    assert not waiter.done()
    await mgr.end_sync(first)
    second = await asyncio.wait_for(waiter, 10)
    assert second.type is JobType.MODIFY
    await mgr.end_sync(second)
    with pytest.raises(JobError, match="not running"):
        await mgr.end_sync(second)


async def test_async_job_waits_for_sync_and_async(mgr: JobManager) -> None:
    query = await mgr.begin_sync(UUID, "g1", JobType.QUERY)
    with pytest.raises(JobBusy, match="job query held by"):
        await mgr.begin_async(UUID, "g1", AsyncJob.SAVE, timeout=SHORT)
    await mgr.end_sync(query)
    save = await mgr.begin_async(UUID, "g1", AsyncJob.SAVE, phase="write")
    with pytest.raises(JobBusy, match=r"async job save \(phase write\)"):
        await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, timeout=SHORT)
    await mgr.end_async(save)
    out = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, timeout=SHORT)
    await mgr.end_async(out)


async def test_busy_message_names_holder(mgr: JobManager) -> None:
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, phase="perform")
    with pytest.raises(JobBusy) as info:
        await mgr.begin_sync(UUID, "g1", JobType.MODIFY, timeout=SHORT)
    assert re.fullmatch(
        rf"domain 'g1' is busy: async job migration-out \(phase perform\) held by "
        rf"ferry-source pid {os.getpid()} since \d\d:\d\d:\d\d",
        str(info.value),
    )
    assert info.value.code == "job-busy"
    assert info.value.details["holder"]["job"] == "migration-out"
    await mgr.end_async(job)


async def test_busy_message_names_the_migration(mgr: JobManager) -> None:
    # A client-driven migration holds the domain between the client's calls:
    # whoever finds it busy is told which migration to look up.
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, phase="begin",
                                migration_id="3f2a9c")  # fmt: skip
    with pytest.raises(JobBusy) as info:
        await mgr.begin_sync(UUID, "g1", JobType.MODIFY, timeout=SHORT)
    assert "async job migration-out (phase begin, migration ID 3f2a9c) held by" in str(info.value)
    assert info.value.details["holder"]["migration_id"] == "3f2a9c"
    await mgr.end_async(job)


async def test_nested_job_excludes_other_sync_jobs(mgr: JobManager) -> None:
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, phase="perform")
    # An allowed QUERY runs; the owner's nested job waits for it.
    query = await mgr.begin_sync(UUID, "g1", JobType.QUERY)
    with pytest.raises(JobBusy, match="job query held by"):
        async with mgr.nested(job, timeout=SHORT):
            pass
    await mgr.end_sync(query)

    async with mgr.nested(job) as inner:
        assert inner.type is JobType.NESTED and inner.parent is job
        with pytest.raises(
            JobBusy,
            match=r"job async-nested of async job migration-out \(phase perform\) held by",
        ):
            await mgr.begin_sync(UUID, "g1", JobType.QUERY, timeout=SHORT)
        with pytest.raises(JobError, match="nested job is still active"):
            await mgr.end_async(job)
        # Even DESTROY waits for the monitor to be free.
        with pytest.raises(JobBusy):
            await mgr.begin_sync(UUID, "g1", JobType.DESTROY, timeout=SHORT)
    async with mgr.sync_job(UUID, "g1", JobType.QUERY, timeout=SHORT):
        pass
    with pytest.raises(JobError, match="nested"):
        await mgr.begin_sync(UUID, "g1", JobType.NESTED)
    await mgr.end_async(job)
    with pytest.raises(JobError, match="cannot nest"):
        async with mgr.nested(job):
            pass


async def test_lock_file_held_until_last_job_ends(mgr: JobManager, tmp_path: Path) -> None:
    # A second open file description behaves like another process for flock.
    other = DomainLock(mgr.lock_path(UUID))
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT)
    query = await mgr.begin_sync(UUID, "g1", JobType.QUERY)
    assert not other.try_acquire()
    holder = mgr.holder(UUID)
    assert holder is not None
    assert (holder["agent"], holder["pid"], holder["job"]) == (
        "ferry-source",
        os.getpid(),
        "migration-out",
    )
    await mgr.end_async(job)
    assert not other.try_acquire()  # the QUERY the mask let in still holds it
    holder = mgr.holder(UUID)
    assert holder is not None and holder["job"] == "query"
    await mgr.end_sync(query)
    assert other.try_acquire()
    with pytest.raises(JobBusy, match="held by another process"):
        await mgr.begin_sync(UUID, "g1", JobType.QUERY, timeout=SHORT)
    other.release()
    async with mgr.sync_job(UUID, "g1", JobType.QUERY, timeout=SHORT):
        pass


async def test_cancelled_waiter_leaves_no_trace(mgr: JobManager) -> None:
    job = await mgr.begin_async(UUID, "g1", AsyncJob.SAVE)
    waiter = asyncio.create_task(mgr.begin_sync(UUID, "g1", JobType.MODIFY, timeout=10))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await mgr.end_async(job)
    async with mgr.sync_job(UUID, "g1", JobType.MODIFY, timeout=SHORT):
        pass


async def test_abort_request(mgr: JobManager) -> None:
    assert not mgr.request_abort(UUID)
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT)
    job.check_aborted()
    async with mgr.sync_job(UUID, "g1", JobType.ABORT, timeout=SHORT):
        assert mgr.request_abort(UUID)
    with pytest.raises(JobAborted, match="migration-out"):
        job.check_aborted()
    await mgr.end_async(job)


def _job(mgr: JobManager) -> JobRecord:
    record = mgr.recover(UUID, "g1")
    assert record is not None
    return record


async def test_persisted_at_every_change(mgr: JobManager) -> None:
    # The domain's status file is someone else's: never touched here.
    status_path = mgr.jobs_dir.parent / "g1.status"
    DomainStatus(name="g1", uuid=UUID, pid=77, run_state="running").save(status_path)
    before = status_path.read_bytes()
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_OUT, flags=0x9, phase="begin")
    st = _job(mgr)
    assert (st.async_job, st.phase, st.flags) == ("migration-out", "begin", 9)
    assert (st.owner, st.owner_pid) == ("ferry-source", os.getpid())
    assert st.started == pytest.approx(job.started)

    job.phase = "perform"
    assert _job(mgr).phase == "perform"
    holder = mgr.holder(UUID)
    assert holder is not None and holder["phase"] == "perform"
    job.migration_id = "mig-42"
    assert _job(mgr).migration_id == "mig-42"
    job.saved_migration = {"caps": {"events": False}, "params": {"max-bandwidth": 1}}
    assert _job(mgr).saved_migration == job.saved_migration
    job.record(peer="ferry://b", was_running=True)
    job.record(outcome="running")
    assert _job(mgr).data == {"peer": "ferry://b", "was_running": True, "outcome": "running"}

    # A QUERY is not tracked (libvirt's VIR_DOMAIN_TRACK_JOBS), a DESTROY is.
    async with mgr.sync_job(UUID, "g1", JobType.QUERY):
        assert _job(mgr).active is None
    async with mgr.sync_job(UUID, "g1", JobType.DESTROY):
        assert _job(mgr).active == "destroy"
    assert _job(mgr).active is None

    await mgr.end_async(job)
    assert mgr.recover(UUID) is None
    assert not mgr.job_path(UUID).exists()
    assert status_path.read_bytes() == before
    with pytest.raises(JobError, match="has ended"):
        job.phase = "late"
    with pytest.raises(JobError, match="has ended"):
        job.record(x=1)


async def test_a_status_rewrite_cannot_lose_the_job(mgr: JobManager) -> None:
    """The bug of issue 10: starting qemu replaced the status file holding the job."""
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_IN, phase="prepare")
    DomainStatus(name="g1", uuid=UUID, pid=5, run_state="incoming").save(
        mgr.jobs_dir.parent / "g1.status"
    )
    assert _job(mgr).phase == "prepare"
    await mgr.end_async(job)


async def test_sync_jobs_have_no_phase(mgr: JobManager) -> None:
    async with mgr.sync_job(UUID, "g1", JobType.QUERY) as job:
        with pytest.raises(JobError, match="only kept for async jobs"):
            job.phase = "x"
    # Untracked jobs never create a job file.
    assert not mgr.job_path(UUID).exists()


async def test_recover_and_adopt(mgr: JobManager, tmp_path: Path) -> None:
    job = await mgr.begin_async(UUID, "g1", AsyncJob.MIGRATION_IN, flags=5, phase="prepare")
    job.migration_id = "m-7"
    job.record(peer="ferry://a")
    # Simulate the agent dying: forget the in-memory state, drop the flock.
    mgr._domains[UUID].lock.release()
    mgr._domains.clear()

    restarted = JobManager(tmp_path / "locks", tmp_path / "jobs", agent="ferry-destination")
    (tmp_path / "jobs" / "junk.job").write_text("{not json")
    record = restarted.recover(UUID)
    assert record is not None
    assert (record.async_job, record.phase, record.flags) == ("migration-in", "prepare", 5)
    assert (record.owner, record.migration_id) == ("ferry-source", "m-7")
    assert record.data == {"peer": "ferry://a"}
    assert restarted.recover(UUID, "g1") == record
    assert restarted.recover("no-such-uuid") is None
    with pytest.raises(StateFileError, match="belongs to domain"):
        restarted.recover(UUID, "other-name")
    assert [(f.name, f.uuid) for f in restarted.recorded()] == [("g1", UUID)]

    adopted = await restarted.adopt(UUID, "g1", record)
    assert (adopted.type, adopted.phase, adopted.flags) == (AsyncJob.MIGRATION_IN, "prepare", 5)
    assert adopted.started == pytest.approx(job.started)
    assert adopted.data == {"peer": "ferry://a"}
    assert _job(restarted).owner == "ferry-destination"
    adopted.phase = "finish"
    await restarted.end_async(adopted)
    assert restarted.recover(UUID, "g1") is None
    assert restarted.recorded() == []


_HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from ferry.jobs import AsyncJob, JobManager

    async def main():
        lock_dir, status_dir, uuid = sys.argv[1:4]
        mgr = JobManager(Path(lock_dir), Path(status_dir), agent="ferry-destination")
        job = await mgr.begin_async(uuid, "g1", AsyncJob.MIGRATION_IN, phase="prepare")
        print("held", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await mgr.end_async(job)
        print("released", flush=True)

    asyncio.run(main())
    """
)


async def _start_holder(tmp_path: Path) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, str(tmp_path / "locks"), str(tmp_path / "jobs"), UUID,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 30) == b"held\n"
    return proc


async def test_other_process_holds_the_domain(mgr: JobManager, tmp_path: Path) -> None:
    holder = await _start_holder(tmp_path)
    try:
        with pytest.raises(JobBusy) as info:
            await mgr.begin_sync(UUID, "g1", JobType.DESTROY, timeout=0.3)
        assert re.fullmatch(
            rf"domain 'g1' is busy: async job migration-in \(phase prepare\) held by "
            rf"ferry-destination pid {holder.pid} since \d\d:\d\d:\d\d",
            str(info.value),
        )
        # Released while we wait: we get it.
        waiter = asyncio.create_task(mgr.begin_sync(UUID, "g1", JobType.DESTROY, timeout=30))
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"go\n")
        await holder.stdin.drain()
        job = await asyncio.wait_for(waiter, 30)
        assert await holder.stdout.readline() == b"released\n"
        await mgr.end_sync(job)
    finally:
        if holder.returncode is None:
            holder.kill()
        await holder.wait()


async def test_killed_holder_releases_lock_and_job_is_recoverable(
    mgr: JobManager, tmp_path: Path
) -> None:
    holder = await _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    assert await holder.wait() == -signal.SIGKILL
    record = mgr.recover(UUID, "g1")
    assert record is not None
    assert (record.async_job, record.phase, record.owner, record.owner_pid) == (
        "migration-in",
        "prepare",
        "ferry-destination",
        holder.pid,
    )
    job = await mgr.adopt(UUID, "g1", record, timeout=5)
    await mgr.end_async(job)
    assert mgr.recover(UUID, "g1") is None


async def test_lock_dir_is_created(tmp_path: Path) -> None:
    mgr = JobManager(tmp_path / "new" / "locks", tmp_path / "new" / "jobs")
    async with mgr.sync_job(UUID, "g1", JobType.DESTROY):
        assert mgr.lock_path(UUID).exists()
        assert mgr.job_path(UUID).exists()
