"""The job manager: who may work on a domain, now, in this process and on this host.

Rules (libvirt's ``qemuDomainObjBeginJob*``):

- one sync job and one async job per domain at a time; a sync job may start
  during an async job only if the async job's mask allows it
  (:data:`~ferry.jobs.model.ASYNC_JOB_MASKS`);
- a new async job waits until there is neither an async nor a sync job;
- the async job's owner talks to qemu inside :meth:`JobManager.nested`, which
  takes the sync slot, so its monitor commands never interleave with another
  sync job's;
- whoever cannot start within its timeout gets :class:`~ferry.errors.JobBusy`
  naming the job that holds the domain, who runs it and since when.

In one process this is asyncio conditions. Across the host's two agents it is
the per-domain flock (:mod:`ferry.jobs.lockfile`), held while this process
has any job on the domain. Cross-process exclusion is total: masks are not
shared between processes, so another process's QUERY waits for the whole
job; two agents driving one qemu at once is what this model exists to prevent.

Every change of an async job (begin, phase, migration id, saved migration
settings, recovery data, end) and of a DESTROY job is written to the domain's
job file (``JOBS_DIR/UUID.job``) while the flock is held, so a restarted agent
can :meth:`~JobManager.recover` what was in flight and
:meth:`~JobManager.adopt` it to finish or roll back.  This module is the only
writer of job files: the file exists exactly while a tracked job runs, and
the domain's status file (qemu's pid, sockets…) never holds a job, so no
writer of either can drop the other's record.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import JobAborted, JobBusy, JobError, StateFileError
from ferry.jobs.lockfile import DomainLock, read_holder
from ferry.jobs.model import TRACKED_SYNC_JOBS, AsyncJob, JobType, allowed_during
from ferry.statefile import JobFile, JobRecord, atomic_write

__all__ = ["Job", "JobManager"]


def _async_type(dom: _Domain) -> AsyncJob | None:
    job = dom.async_job
    return job.type if job is not None and isinstance(job.type, AsyncJob) else None


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class Job:
    """A job held by this process; returned by the ``begin_*`` methods.

    Setting :attr:`phase`, :attr:`migration_id` or :attr:`saved_migration`
    of an async job writes the job file at once (and updates the lock
    file's holder record), so a crash right after the assignment is
    recoverable.
    """

    def __init__(
        self,
        manager: JobManager,
        dom: _Domain,
        job_type: JobType | AsyncJob,
        *,
        flags: int = 0,
        phase: str | None = None,
        migration_id: str | None = None,
        saved_migration: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        started: float | None = None,
        parent: Job | None = None,
    ) -> None:
        self._manager = manager
        self._dom = dom
        self.type = job_type
        self.flags = flags
        self.started = started if started is not None else time.time()
        self.owner = manager.agent
        self.pid = os.getpid()
        self.parent = parent
        self.ended = False
        self.abort_requested = False
        self._phase = phase
        self._migration_id = migration_id
        self._saved_migration = saved_migration
        self._data: dict[str, Any] = dict(data or {})

    @property
    def data(self) -> dict[str, Any]:
        """Recovery data of an async job (a copy; change it with :meth:`record`)."""
        return dict(self._data)

    def record(self, **values: Any) -> None:
        """Merge ``values`` into the recovery data and persist it at once.

        Values must be JSON-encodable.  A crash right after this returns is
        recoverable with them.
        """
        self._require_async("data")
        self._data.update(values)
        self._manager._changed(self)

    @property
    def uuid(self) -> str:
        """UUID of the domain this job runs on."""
        return self._dom.uuid

    @property
    def name(self) -> str:
        """Name of the domain this job runs on."""
        return self._dom.name

    @property
    def is_async(self) -> bool:
        """True for an async job (migration, save, dump, snapshot)."""
        return isinstance(self.type, AsyncJob)

    @property
    def phase(self) -> str | None:
        """Phase of an async job (``begin``, ``perform``, …), persisted when set."""
        return self._phase

    @phase.setter
    def phase(self, value: str | None) -> None:
        self._require_async("phase")
        self._phase = value
        self._manager._changed(self)

    @property
    def migration_id(self) -> str | None:
        """Migration id of an async migration job, persisted when set."""
        return self._migration_id

    @migration_id.setter
    def migration_id(self, value: str | None) -> None:
        self._require_async("migration_id")
        self._migration_id = value
        self._manager._changed(self)

    @property
    def saved_migration(self) -> dict[str, Any] | None:
        """Migration caps/params saved before a migration
        (``SavedMigrationSettings.to_dict()``), persisted when set."""
        return self._saved_migration

    @saved_migration.setter
    def saved_migration(self, value: dict[str, Any] | None) -> None:
        self._require_async("saved_migration")
        self._saved_migration = value
        self._manager._changed(self)

    def _require_async(self, what: str) -> None:
        if not self.is_async:
            raise JobError(f"{what} is only kept for async jobs, not for job {self.type}")
        if self.ended:
            raise JobError(f"async job {self.type} on domain '{self.name}' has ended")

    def check_aborted(self) -> None:
        """Raise if an ABORT job asked this async job to stop.

        :raises JobAborted: :meth:`JobManager.request_abort` was called.
        """
        if self.abort_requested:
            raise JobAborted(
                f"{self.describe()} on domain '{self.name}' was aborted", domain=self.name
            )

    def describe(self) -> str:
        """``async job migration-out (phase perform, migration ID 3f2a…)`` / ``job query``.

        A migration's ID is named so that whoever finds the domain busy can
        look the migration up (``ferryctl journal --migration ID``).
        """
        if self.parent is not None:
            return f"job {self.type} of {self.parent.describe()}"
        text = f"async job {self.type}" if self.is_async else f"job {self.type}"
        notes = [f"phase {self._phase}"] if self._phase else []
        if self.migration_id:
            notes.append(f"migration ID {self.migration_id}")
        if notes:
            text += f" ({', '.join(notes)})"
        return text

    def holder_info(self) -> dict[str, Any]:
        """The record written into the lock file for other processes."""
        return {
            "domain": self.name,
            "agent": self.owner,
            "pid": self.pid,
            "job": str(self.type),
            "async": self.is_async,
            "phase": self._phase,
            "migration_id": self.migration_id,
            "since": self.started,
        }

    def __repr__(self) -> str:
        return f"<Job {self.describe()} domain={self.name!r}>"


@dataclass(eq=False)
class _Domain:
    uuid: str
    name: str
    lock: DomainLock
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    lock_mutex: asyncio.Lock = field(default_factory=asyncio.Lock)
    lock_refs: int = 0
    sync: Job | None = None
    async_job: Job | None = None
    users: int = 0

    def idle(self) -> bool:
        return self.sync is None and self.async_job is None and self.users == 0


class JobManager:
    """Per-domain job rules for one agent process (see the module docstring).

    :param lock_dir: where ``UUID.lock`` files live (``/run/ferry/locks``).
    :param jobs_dir: where ``UUID.job`` files live (``/run/ferry/jobs``).
    :param agent: this agent's name, shown to whoever finds the domain busy.
    """

    def __init__(self, lock_dir: Path, jobs_dir: Path, *, agent: str = "ferry") -> None:
        self.lock_dir = Path(lock_dir)
        self.jobs_dir = Path(jobs_dir)
        self.agent = agent
        self._domains: dict[str, _Domain] = {}

    # -- paths --------------------------------------------------------------

    def lock_path(self, uuid: str) -> Path:
        """Path of the domain's lock file."""
        return self.lock_dir / f"{uuid}.lock"

    def job_path(self, uuid: str) -> Path:
        """Path of the domain's job file."""
        return self.jobs_dir / f"{uuid}.job"

    # -- sync jobs ----------------------------------------------------------

    async def begin_sync(
        self, uuid: str, name: str, job_type: JobType, *, timeout: float = 30.0
    ) -> Job:
        """Start a sync job; pair with :meth:`end_sync` (or use :meth:`sync_job`).

        Waits while the domain's sync slot is taken, or while an async job
        whose mask does not allow ``job_type`` runs, or while another process
        holds the domain.

        :raises JobBusy: not possible within ``timeout`` seconds; the message
            names the holding job, agent, pid and start time.
        :raises JobError: ``job_type`` is NESTED (use :meth:`nested`).
        :raises OSError: the lock or jobs directory is unusable.
        """
        job_type = JobType(job_type)
        if job_type is JobType.NESTED:
            raise JobError("a nested job is taken with JobManager.nested(async_job)")
        deadline = asyncio.get_running_loop().time() + timeout
        dom = self._domain(uuid, name)
        dom.users += 1
        try:
            async with dom.cond:
                await self._wait(
                    dom,
                    lambda: dom.sync is None and allowed_during(_async_type(dom), job_type),
                    deadline,
                    job_type,
                    timeout,
                )
                job = Job(self, dom, job_type)
                dom.sync = job  # reserve the slot before any await
            try:
                await self._hold_lock(dom, deadline, job_type, timeout)
                try:
                    if job_type in TRACKED_SYNC_JOBS:
                        self._persist(dom, create=True)
                except BaseException:
                    self._drop_lock(dom)
                    raise
            except BaseException:
                dom.sync = None
                await self._notify(dom)
                raise
            self._write_holder(dom)
            return job
        finally:
            dom.users -= 1
            self._forget_if_idle(dom)

    async def end_sync(self, job: Job) -> None:
        """End a sync job taken with :meth:`begin_sync`.

        :raises JobError: ``job`` is not this domain's current sync job
            (ended twice, or a nested job).
        :raises OSError: the job file could not be updated
            (the job is ended regardless).
        """
        dom = job._dom
        if job.ended or dom.sync is not job or job.parent is not None:
            raise JobError(f"{job.describe()} on domain '{job.name}' is not running")
        job.ended = True
        dom.sync = None
        try:
            if job.type in TRACKED_SYNC_JOBS:
                self._persist(dom)
        finally:
            self._drop_lock(dom)
            self._write_holder(dom)
            await self._notify(dom)
            self._forget_if_idle(dom)

    @asynccontextmanager
    async def sync_job(
        self, uuid: str, name: str, job_type: JobType, *, timeout: float = 30.0
    ) -> AsyncIterator[Job]:
        """``async with mgr.sync_job(uuid, name, JobType.QUERY) as job:`` — see :meth:`begin_sync`.

        :raises JobBusy: the job could not start within ``timeout``.
        """
        job = await self.begin_sync(uuid, name, job_type, timeout=timeout)
        try:
            yield job
        finally:
            await self.end_sync(job)

    # -- async jobs ---------------------------------------------------------

    async def begin_async(
        self,
        uuid: str,
        name: str,
        job_type: AsyncJob,
        *,
        flags: int = 0,
        phase: str | None = None,
        migration_id: str | None = None,
        timeout: float = 30.0,
    ) -> Job:
        """Start an async job; end it with :meth:`end_async`.

        Waits until the domain has neither an async nor a sync job, here or
        in another process. The job is written to its job file before
        this returns.

        :raises JobBusy: not possible within ``timeout`` seconds.
        :raises OSError: the lock or jobs directory is unusable.
        """
        dom = self._domain(uuid, name)
        job = Job(self, dom, AsyncJob(job_type), flags=flags, phase=phase,
                  migration_id=migration_id)  # fmt: skip
        return await self._begin_async(dom, job, timeout)

    async def adopt(self, uuid: str, name: str, record: JobRecord, *, timeout: float = 30.0) -> Job:
        """Take over an async job a previous agent left in its job file.

        For a restarted agent: ``record`` comes from :meth:`recover`; the
        returned job keeps its type, phase, flags, start time, migration id
        and saved migration settings, now owned by this process, so the
        caller can finish or roll back and then :meth:`end_async`.

        :raises JobError: ``record`` holds no async job.
        :raises JobBusy: the domain is held (e.g. by the other agent) past ``timeout``.
        :raises StateFileError, OSError: as :meth:`begin_async`.
        """
        if record.async_job is None:
            raise JobError(f"domain '{name}': the recorded job has no async job to adopt")
        try:
            job_type = AsyncJob(record.async_job)
        except ValueError:
            raise JobError(
                f"domain '{name}': unknown async job {record.async_job!r} in its job file"
            ) from None
        dom = self._domain(uuid, name)
        job = Job(
            self,
            dom,
            job_type,
            flags=record.flags,
            phase=record.phase,
            migration_id=record.migration_id,
            saved_migration=record.saved_migration,
            data=record.data,
            started=record.started,
        )
        return await self._begin_async(dom, job, timeout)

    async def _begin_async(self, dom: _Domain, job: Job, timeout: float) -> Job:
        deadline = asyncio.get_running_loop().time() + timeout
        dom.users += 1
        try:
            async with dom.cond:
                await self._wait(
                    dom,
                    lambda: dom.sync is None and dom.async_job is None,
                    deadline,
                    job.type,
                    timeout,
                )
                dom.async_job = job
            try:
                await self._hold_lock(dom, deadline, job.type, timeout)
                try:
                    self._persist(dom, create=True)
                except BaseException:
                    self._drop_lock(dom)
                    raise
            except BaseException:
                dom.async_job = None
                await self._notify(dom)
                raise
            self._write_holder(dom)
            return job
        finally:
            dom.users -= 1
            self._forget_if_idle(dom)

    async def end_async(self, job: Job) -> None:
        """End an async job: delete its job file, release the domain.

        Sync jobs the mask let in keep running (and keep the domain locked
        until they end).

        :raises JobError: ``job`` is not the domain's running async job, or
            its nested job is still active.
        :raises OSError: the job file could not be updated
            (the job is ended regardless).
        """
        dom = job._dom
        if job.ended or dom.async_job is not job:
            raise JobError(f"{job.describe()} on domain '{job.name}' is not running")
        if dom.sync is not None and dom.sync.parent is job:
            raise JobError(
                f"cannot end {job.describe()} on domain '{job.name}': "
                "its nested job is still active"
            )
        job.ended = True
        dom.async_job = None
        try:
            self._persist(dom)
        finally:
            self._drop_lock(dom)
            self._write_holder(dom)
            await self._notify(dom)
            self._forget_if_idle(dom)

    @asynccontextmanager
    async def nested(self, job: Job, *, timeout: float = 30.0) -> AsyncIterator[Job]:
        """Enter the monitor as the owner of async ``job``: ``async with mgr.nested(job):``.

        Takes the domain's sync slot (waiting for a running sync job, e.g. a
        QUERY, to finish) so no other sync job talks to qemu meanwhile. Needs
        no lock file: the async job already holds the domain.

        :raises JobError: ``job`` is not a running async job of this manager.
        :raises JobBusy: the sync slot stayed taken for ``timeout`` seconds.
        """
        dom = job._dom
        if not job.is_async or job.ended or dom.async_job is not job or job._manager is not self:
            raise JobError(f"{job.describe()} is not a running async job; cannot nest")
        deadline = asyncio.get_running_loop().time() + timeout
        async with dom.cond:
            await self._wait(dom, lambda: dom.sync is None, deadline, JobType.NESTED, timeout)
            inner = Job(self, dom, JobType.NESTED, parent=job)
            dom.sync = inner
        try:
            yield inner
        finally:
            inner.ended = True
            dom.sync = None
            await self._notify(dom)

    # -- inspection and recovery -------------------------------------------

    def current(self, uuid: str) -> JobRecord | None:
        """This process's jobs on the domain as a record (None: no job here).

        Unlike the job file, this includes untracked sync jobs (QUERY…).
        """
        dom = self._domains.get(uuid)
        if dom is None or (dom.sync is None and dom.async_job is None):
            return None
        return self._record(dom, tracked_only=False)

    def holder(self, uuid: str) -> dict[str, Any] | None:
        """Who holds the domain's lock according to its lock file (any process), or None."""
        return read_holder(self.lock_path(uuid))

    def recover(self, uuid: str, name: str | None = None) -> JobRecord | None:
        """Read back the job recorded for the domain (after a restart); None if none.

        ``name``, when given, must match the recorded one.

        :raises StateFileError: the job file is corrupt or names another domain.
        """
        try:
            found = JobFile.load(self.job_path(uuid))
        except FileNotFoundError:
            return None
        if found.uuid != uuid or (name is not None and found.name != name):
            raise StateFileError(
                f"job file {self.job_path(uuid)} belongs to domain "
                f"{found.name!r} ({found.uuid}), not {name!r} ({uuid})"
            )
        return found.job

    def recorded(self) -> list[JobFile]:
        """Every job recorded on this host (corrupt files are skipped)."""
        out = []
        for path in sorted(self.jobs_dir.glob("*.job")) if self.jobs_dir.is_dir() else []:
            try:
                out.append(JobFile.load(path))
            except (OSError, StateFileError):
                continue
        return out

    def request_abort(self, uuid: str) -> bool:
        """Ask the domain's async job to stop (its owner sees ``check_aborted``).

        Call it from inside an ABORT sync job. Returns False when this process
        runs no async job on the domain.
        """
        dom = self._domains.get(uuid)
        if dom is None or dom.async_job is None:
            return False
        dom.async_job.abort_requested = True
        return True

    # -- internals ----------------------------------------------------------

    def _domain(self, uuid: str, name: str) -> _Domain:
        dom = self._domains.get(uuid)
        if dom is None:
            dom = _Domain(uuid=uuid, name=name, lock=DomainLock(self.lock_path(uuid)))
            self._domains[uuid] = dom
        elif dom.idle():
            dom.name = name  # a renamed domain (migration with --dname)
        return dom

    def _forget_if_idle(self, dom: _Domain) -> None:
        if dom.idle() and dom.lock_refs == 0 and self._domains.get(dom.uuid) is dom:
            del self._domains[dom.uuid]

    async def _wait(
        self,
        dom: _Domain,
        ready: Callable[[], bool],
        deadline: float,
        wanted: JobType | AsyncJob,
        timeout: float,
    ) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await dom.cond.wait_for(ready)
        except TimeoutError:
            raise self._busy_here(dom, wanted, timeout) from None

    async def _notify(self, dom: _Domain) -> None:
        async with dom.cond:
            dom.cond.notify_all()

    async def _hold_lock(
        self, dom: _Domain, deadline: float, wanted: JobType | AsyncJob, timeout: float
    ) -> None:
        # The flock is taken once per process and domain, by whichever job
        # needs it first, and shared (counted) by the jobs that follow: two
        # flocks of one process on two fds would exclude each other.
        try:
            async with asyncio.timeout_at(deadline):
                await dom.lock_mutex.acquire()
        except TimeoutError:
            raise self._busy_elsewhere(dom, wanted, timeout) from None
        try:
            if dom.lock_refs == 0 and not await dom.lock.acquire(deadline):
                raise self._busy_elsewhere(dom, wanted, timeout)
            dom.lock_refs += 1
        finally:
            dom.lock_mutex.release()

    def _drop_lock(self, dom: _Domain) -> None:
        dom.lock_refs -= 1
        if dom.lock_refs == 0:
            dom.lock.release()

    def _write_holder(self, dom: _Domain) -> None:
        main = dom.async_job or dom.sync
        if main is not None and dom.lock.held:
            dom.lock.write_holder(main.holder_info())

    def _changed(self, job: Job) -> None:
        dom = job._dom
        self._persist(dom)
        self._write_holder(dom)

    def _record(self, dom: _Domain, *, tracked_only: bool) -> JobRecord | None:
        aj = dom.async_job
        sj = dom.sync
        active: str | None = None
        if sj is not None and (not tracked_only or sj.type in TRACKED_SYNC_JOBS):
            active = str(sj.type)
        if aj is None and active is None:
            return None
        main = aj if aj is not None else sj
        assert main is not None
        return JobRecord(
            async_job=str(aj.type) if aj is not None else None,
            active=active,
            phase=aj.phase if aj is not None else None,
            flags=aj.flags if aj is not None else 0,
            owner=main.owner,
            owner_pid=main.pid,
            started=main.started,
            migration_id=aj.migration_id if aj is not None else None,
            saved_migration=aj.saved_migration if aj is not None else None,
            data=aj.data if aj is not None else {},
        )

    def _persist(self, dom: _Domain, *, create: bool = False) -> None:
        path = self.job_path(dom.uuid)
        record = self._record(dom, tracked_only=True)
        if record is None:
            try:
                path.unlink()
            except FileNotFoundError:
                return
            return
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, JobFile(name=dom.name, uuid=dom.uuid, job=record).dumps())

    def _blocker(self, dom: _Domain, wanted: JobType | AsyncJob) -> Job | None:
        """The job that keeps ``wanted`` from starting (for the JobBusy message)."""
        aj = _async_type(dom)
        if aj is not None and dom.async_job is not None:
            if isinstance(wanted, AsyncJob):
                return dom.async_job
            if wanted is not JobType.NESTED and not allowed_during(aj, wanted):
                return dom.async_job
        return dom.sync or dom.async_job

    def _busy_here(self, dom: _Domain, wanted: JobType | AsyncJob, timeout: float) -> JobBusy:
        blocker = self._blocker(dom, wanted)
        if blocker is None:  # freed at the very deadline; report as busy anyway
            return JobBusy(
                f"domain '{dom.name}' is busy: could not start job {wanted} within {timeout:g}s",
                domain=dom.name,
                wanted=str(wanted),
            )
        info = blocker.holder_info()
        return JobBusy(
            f"domain '{dom.name}' is busy: {blocker.describe()} held by "
            f"{blocker.owner} pid {blocker.pid} since {_clock(blocker.started)}",
            domain=dom.name,
            wanted=str(wanted),
            waited=timeout,
            holder=info,
        )

    def _busy_elsewhere(self, dom: _Domain, wanted: JobType | AsyncJob, timeout: float) -> JobBusy:
        info = read_holder(self.lock_path(dom.uuid))
        if not info:
            return JobBusy(
                f"domain '{dom.name}' is busy: held by another process "
                f"(lock {self.lock_path(dom.uuid)})",
                domain=dom.name,
                wanted=str(wanted),
                waited=timeout,
            )
        what = f"async job {info.get('job')}" if info.get("async") else f"job {info.get('job')}"
        notes = [f"phase {info['phase']}"] if info.get("phase") else []
        if info.get("migration_id"):
            notes.append(f"migration ID {info['migration_id']}")
        if notes:
            what += f" ({', '.join(notes)})"
        since = info.get("since")
        when = f" since {_clock(since)}" if isinstance(since, int | float) else ""
        return JobBusy(
            f"domain '{dom.name}' is busy: {what} held by {info.get('agent', '?')} "
            f"pid {info.get('pid', '?')}{when}",
            domain=dom.name,
            wanted=str(wanted),
            waited=timeout,
            holder=info,
        )
