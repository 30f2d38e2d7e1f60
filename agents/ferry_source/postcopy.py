"""Post-copy on the source: the switch, the wait for the end, and a pause on a dead link.

The rule changes at the switch.  Before it the source's copy is the VM and
a failure resumes it; from ``migrate-start-postcopy`` on the destination
holds the only copy that may ever run (its CPUs start at Finish), and the
source's qemu is only a page server.  So the switch is recorded durably
*before* the command is sent, and from then on nothing here cancels the
migration or resumes the CPUs: a broken link pauses both qemus
(``postcopy-paused``) and ``ferryctl migrate --postcopy-resume`` reconnects
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from ferry.errors import FerryError
from ferry.jobs import Job
from ferry.journal import MessageID, log_event
from ferry.qemu import MigrationStats, QemuProcess, query_migrate
from ferry_source.context import Emit

__all__ = [
    "PAUSED",
    "POSTCOPY_STATES",
    "PostcopyEnd",
    "pause_postcopy",
    "start_postcopy",
    "wait_postcopy_end",
]

log = logging.getLogger("ferry.source.migration")

#: query-migrate states once qemu is in post-copy.
POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
PAUSED = "postcopy-paused"
POLL_INTERVAL = 0.1


async def start_postcopy(job: Job, proc: QemuProcess, reason: str, emit: Emit) -> None:
    """Record the switch durably, then tell qemu to switch.

    If the agent dies between the two, recovery finds ``postcopy`` in the
    job record and never resumes the source: the switch may have happened.
    """
    job.record(postcopy="requested")
    log_event(log, MessageID.MIGRATION_DECISION, f"switching to post-copy: {reason}",
              phase="perform", decision="postcopy")  # fmt: skip
    emit("postcopy", {"reason": reason})
    await proc.qmp.execute("migrate-start-postcopy")


async def pause_postcopy(proc: QemuProcess) -> None:
    """``migrate-pause``: drop the stream so both qemus wait for a resume.

    A silently dead link (packets dropped, no reset) would otherwise leave
    qemu blocked in a send for minutes; pausing makes the state explicit
    and recoverable.
    """
    with contextlib.suppress(FerryError):
        await proc.qmp.execute("migrate-pause")


class PostcopyEnd:
    """How a post-copy migration ended on the source."""

    COMPLETED = "completed"
    PAUSED = "paused"
    FAILED = "failed"


async def wait_postcopy_end(
    proc: QemuProcess,
    *,
    stall_s: float,
    on_progress: Callable[[MigrationStats], None] | None = None,
) -> tuple[str, str]:
    """Follow the source qemu in post-copy until it completed, paused or failed.

    A stream that moves no byte for ``stall_s`` is paused (``migrate-pause``)
    rather than left hanging.  Returns (one of :class:`PostcopyEnd`, detail).
    """
    last, moved_at = -1, time.monotonic()
    while True:
        try:
            stats = await query_migrate(proc.qmp)
        except FerryError as exc:
            return PostcopyEnd.FAILED, f"the source qemu went away in post-copy ({exc})"
        if stats.status == "completed":
            return PostcopyEnd.COMPLETED, ""
        if stats.status == PAUSED:
            return PostcopyEnd.PAUSED, "the migration stream broke in post-copy"
        if stats.status in ("failed", "cancelled"):
            return PostcopyEnd.FAILED, stats.error_desc or f"qemu reports {stats.status}"
        if on_progress is not None:
            on_progress(stats)
        if stats.ram_transferred != last:
            last, moved_at = stats.ram_transferred, time.monotonic()
        elif time.monotonic() - moved_at > stall_s and stats.status == "postcopy-active":
            log.warning("post-copy moved nothing for %.0fs: pausing it", stall_s)
            await pause_postcopy(proc)
        await asyncio.sleep(POLL_INTERVAL)
