"""Job types and the rules for which jobs may run together (libvirt's job masks).

A domain has at most one *sync* job (a short operation that talks to qemu) and
at most one *async* job (a long operation such as a migration) at a time. While
an async job runs, a sync job may start only if the async job's mask allows
its type; the async job's own owner talks to qemu through a *nested* job.

The masks follow libvirt (``src/hypervisor/domain_job.h``,
``qemuMigrationJobStart``, ``virDomainObjSetAsyncJobMask``):

- every async job starts with ``VIR_JOB_DEFAULT_MASK`` = QUERY | DESTROY | ABORT;
- MIGRATION_OUT widens it with SUSPEND (pausing helps convergence) and
  MIGRATION_OP (change speed/downtime while migrating);
- MIGRATION_IN narrows it to nothing, and DESTROY is always added: while a
  domain is being received its qemu is not a usable VM yet (``-incoming``),
  so not even QUERY runs; only destroying it is allowed.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ASYNC_JOB_MASKS",
    "TRACKED_SYNC_JOBS",
    "AsyncJob",
    "JobType",
    "allowed_during",
]


class JobType(StrEnum):
    """Synchronous job types (libvirt's ``virDomainJob``)."""

    QUERY = "query"
    """Reads state only (info, stats, job progress)."""
    MODIFY = "modify"
    """Changes domain state or configuration."""
    DESTROY = "destroy"
    """Kills the domain; allowed during every async job."""
    SUSPEND = "suspend"
    """Pauses the CPUs."""
    ABORT = "abort"
    """Aborts the running async job (``migrate_cancel``)."""
    MIGRATION_OP = "migration-op"
    """Adjusts a running migration (speed, max downtime)."""
    NESTED = "async-nested"
    """Internal: the async job's owner talking to qemu (see ``JobManager.nested``)."""


class AsyncJob(StrEnum):
    """Asynchronous (long-running) job types (libvirt's ``virDomainAsyncJob``)."""

    MIGRATION_OUT = "migration-out"
    MIGRATION_IN = "migration-in"
    SAVE = "save"
    DUMP = "dump"
    SNAPSHOT = "snapshot"


_DEFAULT_MASK = frozenset({JobType.QUERY, JobType.DESTROY, JobType.ABORT})

#: Sync jobs allowed to start while each async job runs (DESTROY is always in).
ASYNC_JOB_MASKS: dict[AsyncJob, frozenset[JobType]] = {
    AsyncJob.MIGRATION_OUT: _DEFAULT_MASK | {JobType.SUSPEND, JobType.MIGRATION_OP},
    AsyncJob.MIGRATION_IN: frozenset({JobType.DESTROY}),
    AsyncJob.SAVE: _DEFAULT_MASK,
    AsyncJob.DUMP: _DEFAULT_MASK,
    AsyncJob.SNAPSHOT: _DEFAULT_MASK,
}

#: Sync jobs written to the status file (libvirt's ``VIR_DOMAIN_TRACK_JOBS``):
#: a restarted agent must finish a half-done destroy; a query it can forget.
TRACKED_SYNC_JOBS = frozenset({JobType.DESTROY})


def allowed_during(async_job: AsyncJob | None, job: JobType) -> bool:
    """Whether sync ``job`` may start while ``async_job`` runs (None: no async job).

    NESTED is never "allowed" by a mask: only the async job's owner may take it.
    """
    if async_job is None:
        return job is not JobType.NESTED
    return job in ASYNC_JOB_MASKS[async_job]
