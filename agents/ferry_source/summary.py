"""The end of a successful migration: its summary in the journal and the op's result."""

from __future__ import annotations

import logging
import time
from typing import Any

from ferry.journal import MessageID, log_event
from ferry_source.outgoing import Outgoing

__all__ = ["summary"]

log = logging.getLogger("ferry.source.migration")


def summary(
    out: Outgoing, stats: dict[str, Any], dest_host: str, started: float
) -> dict[str, Any]:
    """Log the migration's summary to the journal; the migrate op's result."""
    total_s = time.monotonic() - started
    figures = {**stats, "wall_time_ms": int(total_s * 1000), "result": "completed"}
    if out.storage:
        # What the disks' mirrors covered, and how they travelled.
        figures.update(disk_bytes=out.disk_bytes, disk_transport=out.disk_transport)
    log_event(log, MessageID.MIGRATION_COMPLETED,
              f"{out.name} migrated to {dest_host} as {out.dest_name} in {total_s:.2f}s",
              phase="confirm")  # fmt: skip
    summary_fields: dict[str, Any] = {
        f"summary_{k}": v for k, v in figures.items() if isinstance(v, int | float | str)
    }
    log_event(log, MessageID.MIGRATION_SUMMARY,
              "summary: " + ", ".join(f"{k}={v}" for k, v in sorted(figures.items())),
              phase="confirm", **summary_fields)  # fmt: skip
    return {"name": out.name, "dest_name": out.dest_name, "dest_host": dest_host,
            "migration_id": out.migration_id, "stats": figures}  # fmt: skip
