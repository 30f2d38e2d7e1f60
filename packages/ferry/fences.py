"""Fences: a domain that migrated away must not be run again here by mistake.

When a migration has handed a VM to another host (or may have: the outcome
is unknown) the source writes a fence for its UUID in the state directory.
``start`` and ``resume`` refuse a fenced domain with an error naming the
migration and the host, unless the operator passes ``--force`` after
checking; ``migrate-recover`` settles an unknown outcome and lifts or
confirms the fence; a migration that brings the VM back lifts it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.errors import DomainState
from ferry.statefile import atomic_write

__all__ = ["MIGRATED", "POSTCOPY", "UNKNOWN", "Fence", "FenceBook"]

MIGRATED = "migrated"
UNKNOWN = "unknown"
#: Switched to post-copy and not finished: the destination holds the CPU
#: state, this copy only serves pages.  It never runs here again;
#: ``ferryctl migrate --postcopy-resume`` completes the move.
POSTCOPY = "postcopy"


@dataclass(frozen=True)
class Fence:
    """Why a domain must not run here."""

    uuid: str
    name: str
    migration_id: str
    peer: str
    peer_uri: str
    outcome: str
    reason: str = ""
    since: float = 0.0
    #: What resuming needs to know (an UNKNOWN fence may end in a resume).
    was_running: bool = True
    leases_released: bool = False

    def describe(self) -> str:
        """One line for ``dominfo``/``list`` and for refusals."""
        if self.outcome == MIGRATED:
            return f"migration {self.migration_id} moved it to {self.peer}"
        if self.outcome == POSTCOPY:
            tail = f": {self.reason}" if self.reason else ""
            return (f"migration {self.migration_id} to {self.peer} is paused in post-copy"
                    f"{tail}")  # fmt: skip
        tail = f", {self.reason}" if self.reason else ""
        return f"migration {self.migration_id} to {self.peer}: outcome unknown{tail}"

    def refusal(self, verb: str) -> DomainState:
        """The error ``verb`` (start, resume) raises for a fenced domain."""
        if self.outcome == MIGRATED:
            why = "it runs there now; running it here too would make two copies"
        elif self.outcome == POSTCOPY:
            why = (
                "the CPU state is there and this copy lacks the pages written there; "
                f"finish the move with 'ferryctl migrate {self.name} {self.peer_uri} "
                "--postcopy --postcopy-resume'"
            )
        else:
            why = (
                "it may run there; settle it with 'ferryctl migrate-recover "
                f"{self.name}' once {self.peer} is reachable"
            )
        return DomainState(
            f"refusing to {verb} domain '{self.name}': {self.describe()} ({why}); "
            f"use --force only after checking {self.peer}",
            name=self.name, migration_id=self.migration_id, peer=self.peer,
        )  # fmt: skip


class FenceBook:
    """Fences in one directory, one fsync'd file per domain UUID."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, uuid: str) -> Path:
        return self.directory / f"{uuid}.json"

    def get(self, uuid: str) -> Fence | None:
        """The fence of ``uuid``, or None (a corrupt file counts as a fence of unknown outcome)."""
        try:
            data = json.loads(self._path(uuid).read_bytes())
            return Fence(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):
            # Refusing to run is the safe reading of a damaged fence.
            return Fence(uuid, "?", "?", "?", "", UNKNOWN, "the fence file is damaged")

    def put(self, fence: Fence) -> None:
        """Write ``fence`` durably."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stamped = fence if fence.since else Fence(**{**asdict(fence), "since": time.time()})
        atomic_write(self._path(fence.uuid), (json.dumps(asdict(stamped)) + "\n").encode())

    def all(self) -> list[Fence]:
        """Every fence on this host."""
        found = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            fence = self.get(path.stem)
            if fence is not None:
                found.append(fence)
        return found

    def clear(self, uuid: str) -> bool:
        """Lift the fence of ``uuid``; True if there was one."""
        with contextlib.suppress(FileNotFoundError):
            self._path(uuid).unlink()
            return True
        return False
