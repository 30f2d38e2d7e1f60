"""What the source's phases need from the agent, as one object.

The phases (:mod:`ferry_source.begin`, :mod:`ferry_source.perform`,
:mod:`ferry_source.confirm`), the p2p driver, recovery and the admin ops all
take a :class:`SourceContext`; none imports the agent module, so there is
no import circle and a phase can be driven by whoever holds the context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.config import AgentConfig
from ferry.faults import Faults
from ferry.fences import FenceBook
from ferry.host import Host
from ferry.jobs import JobManager

__all__ = ["Emit", "SourceContext", "no_events"]

#: Where a phase reports progress (``ctx.emit`` of the client's request).
Emit = Callable[[str, dict[str, Any]], None]


def no_events(event: str, data: dict[str, Any]) -> None:
    """An :data:`Emit` for work nobody watches (recovery at start-up)."""


@dataclass
class SourceContext:
    """The agent's state the phases work with."""

    config: AgentConfig
    host: Host
    jobs: JobManager
    fences: FenceBook
    faults: Faults
    #: Snapshot metadata of a domain (a snapshot blocks migration).
    snapshots: Callable[[str], list[dict[str, Any]]]
    #: Live progress of outgoing migrations, for job_info.
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
