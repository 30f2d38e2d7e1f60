"""What the destination's phases need from the agent, as one object.

Prepare (:mod:`~ferry_destination.prepare`), Finish
(:mod:`~ferry_destination.finish`), the outcome op and recovery take a
:class:`DestinationContext`; none imports the agent module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferry.config import AgentConfig
from ferry.faults import Faults
from ferry.fences import FenceBook
from ferry.host import Host
from ferry.jobs import JobManager
from ferry.offline import PendingBook
from ferry.outcomes import OutcomeBook
from ferry.tunnel import TokenBook

if TYPE_CHECKING:
    from ferry_destination.incoming import Incoming
    from ferry_destination.tunnel import IncomingTunnel

__all__ = ["DestinationContext"]


@dataclass
class DestinationContext:
    """The agent's state the incoming phases work with."""

    config: AgentConfig
    host: Host
    jobs: JobManager
    outcomes: OutcomeBook
    fences: FenceBook
    tokens: TokenBook[IncomingTunnel]
    faults: Faults
    #: Refreshes the agent's STATUS= line after a change.
    notify_status: Callable[[], None]
    incoming: dict[str, Incoming] = field(default_factory=dict)
    #: Offline migrations between their Prepare and Finish (nothing on disk).
    offline: PendingBook = field(default_factory=PendingBook)
    background: set[asyncio.Task[None]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; the agent waits for it at shutdown."""
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def find_migration(self, migration_id: str) -> Incoming | None:
        """The incoming migration with this ID, if one is in flight."""
        for incoming in self.incoming.values():
            if incoming.migration_id == migration_id:
                return incoming
        return None
