"""ferry-source's migration ops: ``migrate``, ``migrate_recover`` and the job controls.

The phases live in their own modules (Begin, Perform, Confirm, the p2p
driver, settling a lost outcome); this module turns admin requests into
calls of them and keeps the table of migrations in flight.
"""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import Any

from ferry.errors import (
    DomainState,
    FerryError,
    JobAborted,
    JobBusy,
    JobError,
    MigrationRefused,
    MigrationTimeout,
)
from ferry.fences import UNKNOWN
from ferry.flags import MigrationFlags, MigrationParams, validate
from ferry.jobs import JobType
from ferry.journal import LogContext, MessageID, log_event
from ferry.qemu import set_params
from ferry.qemu.settings import MIB, UNLIMITED_BANDWIDTH
from ferry.rpc import Handler, RequestContext
from ferry_source.begin import JOB_TIMEOUT
from ferry_source.checks import parse_dest_uri
from ferry_source.client_driven import ClientDriven
from ferry_source.context import SourceContext
from ferry_source.offline import migrate_offline
from ferry_source.outgoing import Outgoing
from ferry_source.p2p import migrate_p2p
from ferry_source.peer import peer_request
from ferry_source.postcopy_resume import resume_postcopy
from ferry_source.settle import Subject, settle

__all__ = ["MigrationDriver", "parse_dest_uri"]

log = logging.getLogger("ferry.source.migration")


class MigrationDriver:
    """The migration ops of ferry-source and the migrations in flight."""

    def __init__(self, ctx: SourceContext, resolve: Any) -> None:
        self.ctx = ctx
        #: ``resolve(request, op, name) -> LiveDomain`` with the ACL check.
        self.resolve = resolve
        self.outgoing: dict[str, Outgoing] = {}
        self.client_driven = ClientDriven(self)

    def handlers(self) -> dict[str, Handler]:
        """Ops served by the migration driver."""
        return {
            "migrate": self.op_migrate,
            "migrate_recover": self.op_migrate_recover,
            "migrate_postcopy": self.op_migrate_postcopy,
            "job_abort": self.op_job_abort,
            "set_max_downtime": self.op_set_max_downtime,
            "set_max_bandwidth": self.op_set_max_bandwidth,
            **self.client_driven.handlers(),
        }

    def new_outgoing(
        self, ctx: RequestContext, op: str, args: dict[str, Any], flags: MigrationFlags,
        params: MigrationParams,
    ) -> Outgoing:  # fmt: skip
        """The checks every migration request passes, in either mode; the
        new :class:`Outgoing`, registered as in flight.

        Raises:
            MigrationRefused, DomainState: the request cannot be a migration.
            JobBusy: the domain is migrating already (naming that migration).
        """
        live = self.resolve(ctx, op, args["name"])
        config = self.ctx.config
        if params.tunnel_plaintext and not (
            config.tls is not None and config.tls.allow_plaintext_tunnel
        ):
            raise MigrationRefused(
                "--tunnel-plaintext refused: this host's config does not allow plaintext "
                "tunnel data ([tls] allow_plaintext_tunnel = true)"
            )
        if live.status is None and not flags & MigrationFlags.OFFLINE:
            raise DomainState(
                f"domain '{live.domain.name}' is not running; only a running domain migrates live "
                "(--offline --persistent moves its definition)"
            )
        host, port = parse_dest_uri(args["dest_uri"])
        busy = self.outgoing.get(live.domain.name)
        if busy is not None:
            raise JobBusy(
                f"domain '{live.domain.name}' is busy: migration {busy.migration_id} to "
                f"{busy.peer} is in phase {busy.phases.current}",
                domain=live.domain.name, migration_id=busy.migration_id,
            )  # fmt: skip
        out = Outgoing(live.domain, uuidlib.uuid4().hex, flags, params, host, port)
        self.outgoing[out.name] = out
        return out

    def log_end(self, out: Outgoing, exc: FerryError) -> None:
        """Journal how a migration that raised ``exc`` ended (refused, aborted or failed)."""
        if isinstance(exc, JobAborted | MigrationTimeout):
            kind = MessageID.MIGRATION_ABORTED
        elif out.phases.current in ("none", "begin"):
            kind = MessageID.MIGRATION_REFUSED
        else:
            kind = MessageID.MIGRATION_FAILED
        log_event(log, kind, f"migration of {out.name} to {out.host} ended: {exc}",
                  level=logging.WARNING, result=exc.code, phase=out.phases.current)  # fmt: skip

    async def op_migrate(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Migrate a running domain to another host (peer to peer)."""
        params = MigrationParams.from_wire(args["params"])
        flags = validate(args["flags"], params) | MigrationFlags.PEER2PEER
        out = self.new_outgoing(ctx, "migrate", args, flags, params)
        resuming = bool(flags & MigrationFlags.POSTCOPY_RESUME)
        if resuming:
            fence = self.ctx.fences.get(out.domain.uuid)
            if fence is not None:
                out.migration_id = fence.migration_id
        with out.log_context():
            try:
                if resuming:
                    return await resume_postcopy(self.ctx, out, ctx)
                if flags & MigrationFlags.OFFLINE:
                    return await migrate_offline(self.ctx, out, ctx)
                return await migrate_p2p(self.ctx, out, ctx)
            except FerryError as exc:
                self.log_end(out, exc)
                raise
            finally:
                self.outgoing.pop(out.name, None)

    async def op_migrate_recover(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Ask the destination again about a migration whose outcome is unknown, and settle it."""
        live = self.resolve(ctx, "migrate_recover", args["name"])
        dom = live.domain
        fence = self.ctx.fences.get(dom.uuid)
        if fence is None or fence.outcome != UNKNOWN:
            state = "it has no migration with an unknown outcome"
            if fence is not None:
                state = fence.describe()
            raise DomainState(f"nothing to recover for domain '{dom.name}': {state}")
        async with self.ctx.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY,
                                          timeout=JOB_TIMEOUT):  # fmt: skip
            with LogContext(domain=dom.name, uuid=dom.uuid, migration_id=fence.migration_id,
                            peer=fence.peer):  # fmt: skip
                settled = await settle(self.ctx, Subject(
                    name=dom.name, uuid=dom.uuid, migration_id=fence.migration_id,
                    peer=fence.peer, peer_uri=fence.peer_uri, was_running=fence.was_running,
                    leases_released=fence.leases_released,
                ), deadline_s=min(self.ctx.config.migration.outcome_timeout_s, 30.0),
                    emit=ctx.emit)  # fmt: skip
        return {"name": dom.name, "migration_id": fence.migration_id, "peer": fence.peer,
                "result": settled.result, "message": settled.message}  # fmt: skip

    async def op_job_abort(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Abort the domain's async job (a migration is cancelled cleanly)."""
        live = self.resolve(ctx, "job_abort", args["name"])
        out = self.outgoing.get(live.domain.name)
        if out is not None and out.postcopy:
            raise JobError(
                f"the migration of '{live.domain.name}' switched to post-copy: the VM's state "
                "is on the destination now, so it cannot be aborted; it completes there"
            )
        if out is not None:
            out.abort_reason = "aborted on request (job_abort)"
            out.abort.set()
            return {"name": live.domain.name}
        if not self.ctx.jobs.request_abort(live.domain.uuid):
            raise JobError(f"no job is running on domain '{live.domain.name}'")
        return {"name": live.domain.name}

    async def op_migrate_postcopy(
        self, ctx: RequestContext, args: dict[str, Any]
    ) -> dict[str, Any]:
        """Switch a running migration to post-copy (virsh ``migrate-postcopy``)."""
        live = self.resolve(ctx, "migrate_postcopy", args["name"])
        name = live.domain.name
        out = self.outgoing.get(name)
        if out is None or out.job is None or not out.migrate_sent:
            raise JobError(f"no migration is running for domain '{name}'")
        if not out.flags & MigrationFlags.POSTCOPY:
            raise MigrationRefused(
                f"the migration of '{name}' was started without --postcopy: qemu cannot "
                "switch it (both ends must have post-copy enabled before the stream starts)"
            )
        if out.postcopy:
            raise JobError(f"the migration of '{name}' is already in post-copy")
        out.steer().request_postcopy("the operator asked (ferryctl migrate-postcopy)")
        return {"name": name, "migration_id": out.migration_id}

    async def _tune(
        self, ctx: RequestContext, name: str, op: str, params: dict[str, Any]
    ) -> Outgoing:
        live = self.resolve(ctx, op, name)
        out = self.outgoing.get(live.domain.name)
        if out is None or out.proc is None or out.job is None:
            raise JobError(f"no migration is running for domain '{live.domain.name}'")
        async with self.ctx.jobs.sync_job(live.domain.uuid, live.domain.name,
                                          JobType.MIGRATION_OP, timeout=JOB_TIMEOUT):  # fmt: skip
            await set_params(out.proc.qmp, params)
        return out

    async def op_set_max_downtime(
        self, ctx: RequestContext, args: dict[str, Any]
    ) -> dict[str, Any]:
        """Change the tolerated downtime of a running migration."""
        out = await self._tune(ctx, args["name"], "set_max_downtime",
                               {"downtime-limit": args["ms"]})  # fmt: skip
        if out.set_downtime is not None:
            out.set_downtime(args["ms"])
        return {"name": args["name"], "ms": args["ms"]}

    async def op_set_max_bandwidth(
        self, ctx: RequestContext, args: dict[str, Any]
    ) -> dict[str, Any]:
        """Change the bandwidth cap of a running migration (0 = unlimited)."""
        value = args["mib_per_s"] * MIB if args["mib_per_s"] else UNLIMITED_BANDWIDTH
        await self._tune(ctx, args["name"], "set_max_bandwidth", {"max-bandwidth": value})
        return {"name": args["name"], "mib_per_s": args["mib_per_s"]}

    async def peer_request(self, uri: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One request to a peer host's ferry-destination (e.g. its journal)."""
        host, port = parse_dest_uri(uri)
        return await peer_request(self.ctx.config, host, port, op, args)

