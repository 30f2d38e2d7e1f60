"""The job model: which operation may work on a domain, persisted for recovery.

Modelled on libvirt's qemuDomainJob rules: one sync job and one async job per
domain, async job masks, nested jobs for the async job's owner, a per-domain
flock shared by the host's agents, and every change of an async job written to
the domain's status file. See :mod:`ferry.jobs.manager` and
:mod:`ferry.jobs.model`.
"""

from ferry.jobs.lockfile import DomainLock, read_holder
from ferry.jobs.manager import Job, JobManager
from ferry.jobs.model import (
    ASYNC_JOB_MASKS,
    TRACKED_SYNC_JOBS,
    AsyncJob,
    JobType,
    allowed_during,
)
from ferry.statefile import JobRecord

__all__ = [
    "ASYNC_JOB_MASKS",
    "TRACKED_SYNC_JOBS",
    "AsyncJob",
    "DomainLock",
    "Job",
    "JobManager",
    "JobRecord",
    "JobType",
    "allowed_during",
    "read_holder",
]
