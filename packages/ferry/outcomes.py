"""The destination's durable record of what became of each incoming migration.

The destination owns a migration's outcome: before it answers Finish it
records, fsync'd, each step for that migration ID (Finish received, CPUs
started, failed and killed).  A source that lost the reply asks
(``migration_outcome``) instead of guessing, and the answer comes from here.

States, in the order a migration passes them:

``prepared``   the incoming qemu exists; Finish has not arrived
``finishing``  Finish arrived; the CPUs may be about to start
``running``    the destination holds the VM (CPUs started, or kept paused
               as asked): the source must never resume its copy
``failed``     the incoming qemu was killed (or never ran): the source may resume

A record is kept for ``outcome_retention_s`` after its last change, so a
source that comes back late still gets an answer.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ferry.errors import StateFileError
from ferry.statefile import atomic_write

__all__ = [
    "FAILED",
    "FINISHING",
    "POSTCOPY",
    "PREPARED",
    "RUNNING",
    "OutcomeBook",
    "OutcomeRecord",
    "valid_migration_id",
]

PREPARED = "prepared"
FINISHING = "finishing"
RUNNING = "running"
FAILED = "failed"
#: Switched to post-copy, CPUs not started yet: the CPU state is here and
#: the source never resumes; only this host can run the VM now.
POSTCOPY = "postcopy"
STATES = frozenset({PREPARED, FINISHING, RUNNING, FAILED, POSTCOPY})


@dataclass(frozen=True)
class OutcomeRecord:
    """One incoming migration's recorded state."""

    migration_id: str
    domain: str
    uuid: str
    state: str
    reason: str = ""
    source_host: str = ""
    updated: float = 0.0

    def answer(self) -> dict[str, Any]:
        """The ``migration_outcome`` reply for this record.

        ``outcome`` is what the source acts on: ``running`` (confirm: stop
        the source copy), ``not-running`` (resume it), ``postcopy`` (the
        CPU state is here, not started: never resume; finish with
        ``--postcopy-resume``) or ``pending`` (ask again shortly).
        """
        outcome = {RUNNING: "running", FAILED: "not-running", POSTCOPY: "postcopy"}.get(
            self.state, "pending"
        )
        return {"migration_id": self.migration_id, "outcome": outcome, "state": self.state,
                "reason": self.reason, "domain": self.domain}  # fmt: skip


def valid_migration_id(migration_id: str) -> bool:
    """True for an ID that can name a record file: hex digits and dashes, 1..64."""
    # IDs become file names: hex (what sources generate) and nothing else.
    return 0 < len(migration_id) <= 64 and all(c in "0123456789abcdef-" for c in migration_id)


class OutcomeBook:
    """Outcome records in one directory, one fsync'd JSON file per migration."""

    def __init__(self, directory: Path, retention_s: float) -> None:
        self.directory = Path(directory)
        self.retention_s = retention_s

    def path(self, migration_id: str) -> Path:
        """File of one migration's record."""
        return self.directory / f"{migration_id}.json"

    def record(
        self, migration_id: str, state: str, *, domain: str, uuid: str, reason: str = "",
        source_host: str = "",
    ) -> OutcomeRecord:  # fmt: skip
        """Write (durably, before returning) that ``migration_id`` reached ``state``.

        Raises:
            StateFileError: an ID that cannot name a file, or an unknown state.
        """
        if not valid_migration_id(migration_id):
            raise StateFileError(f"migration id {migration_id!r} is not a valid id")
        if state not in STATES:
            raise StateFileError(f"unknown outcome state {state!r}")
        entry = OutcomeRecord(migration_id, domain, uuid, state, reason, source_host, time.time())
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path(migration_id), (json.dumps(asdict(entry)) + "\n").encode())
        self.prune()
        return entry

    def get(self, migration_id: str) -> OutcomeRecord | None:
        """The record of ``migration_id``; None when this host never prepared it."""
        if not valid_migration_id(migration_id):
            return None
        try:
            data = json.loads(self.path(migration_id).read_bytes())
            return OutcomeRecord(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            path = self.path(migration_id)
            raise StateFileError(f"outcome record {path} is corrupt: {exc}") from None

    def all(self) -> list[OutcomeRecord]:
        """Every record still kept (corrupt ones skipped)."""
        out = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            with contextlib.suppress(StateFileError):
                found = self.get(path.stem)
                if found is not None:
                    out.append(found)
        return out

    def prune(self, now: float | None = None) -> None:
        """Drop settled records older than the retention time."""
        limit = (now if now is not None else time.time()) - self.retention_s
        for entry in self.all():
            if entry.state in (RUNNING, FAILED) and entry.updated < limit:
                with contextlib.suppress(FileNotFoundError):
                    self.path(entry.migration_id).unlink()
