"""Outgoing migration driver (peer to peer, v3 phases): filled in by the migration issue."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ferry.errors import JobError
from ferry.rpc import Handler, RequestContext

if TYPE_CHECKING:
    from ferry_source.agent import SourceAgent

__all__ = ["MigrationDriver"]


class MigrationDriver:
    """Begin / Perform / Confirm and the p2p conversation with the destination."""

    def __init__(self, agent: SourceAgent) -> None:
        self.agent = agent

    def handlers(self) -> dict[str, Handler]:
        """Ops served by the migration driver."""
        return {"migrate": self.op_migrate, "job_abort": self.op_job_abort}

    async def op_migrate(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Migrate a domain to another host."""
        raise JobError("migration is not implemented yet")

    async def op_job_abort(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Abort the domain's async job."""
        live = self.agent.resolve(ctx, "job_abort", args["name"])
        if not self.agent.jobs.request_abort(live.domain.uuid):
            raise JobError(f"no job is running on domain '{live.domain.name}'")
        return {"name": live.domain.name}
