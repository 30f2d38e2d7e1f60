"""Client-driven migration, source side: Begin, Perform and Confirm as separate ops.

``ferryctl migrate --client-driven`` calls ``begin``, ``perform`` and
``confirm`` here and Prepare and Finish on the destination itself, carrying
the cookies (libvirt's non-p2p v3 protocol).  The phases are the same units
the p2p driver calls (:mod:`~ferry_source.begin`, :mod:`~ferry_source.perform`,
:mod:`~ferry_source.confirm`); what is new is that the migration outlives
each request: the MIGRATION_OUT job is held from Begin to Confirm, and the
migration is bound to the client's connection.

When that connection closes, the migration waits ``[migration]
client_grace_s`` for a client to take it over (``adopt_outgoing``, from
``ferryctl migrate-recover``); then :func:`ferry.jobs.orphans.decide_orphan`
says what the source does alone: drop the job, resume the VM, or ask the
destination (the outcome rule: once the stream may be complete, our copy
never resumes on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferry.errors import (
    FerryError,
    JobBusy,
    MigrationFailed,
    MigrationRefused,
    PhaseError,
)
from ferry.flags import MigrationFlags, MigrationParams, validate
from ferry.jobs.orphans import ClientStage, OrphanAction, decide_orphan
from ferry.journal import MessageID, log_event
from ferry.protocol.cookie import Cookie
from ferry.rpc import Handler, RequestContext, Session
from ferry_source.begin import begin
from ferry_source.confirm import resume_source, stop_source
from ferry_source.offline import client_confirm
from ferry_source.outgoing import Outgoing
from ferry_source.p2p import enter_phase, open_tunnel, subject_of
from ferry_source.perform import perform
from ferry_source.settle import settle
from ferry_source.summary import summary

if TYPE_CHECKING:
    from ferry_source.migration import MigrationDriver

__all__ = ["ClientDriven", "ClientLink"]

log = logging.getLogger("ferry.source.migration")

#: What p2p offers and this mode does not (yet): refused by name in Begin.
UNSUPPORTED = (
    (MigrationFlags.POSTCOPY, "--postcopy"),
    (MigrationFlags.POSTCOPY_RESUME, "--postcopy-resume"),
)


@dataclass(eq=False)
class ClientLink:
    """A client-driven migration's tie to the client that drives it."""

    session: Session
    stage: ClientStage = ClientStage.BEGUN
    #: Begin's answer, kept for a client that takes over before Prepare.
    begun: dict[str, Any] = field(default_factory=dict)
    #: Where Perform's events go: the request that runs (or re-attached to) it.
    emit_to: Any = None
    perform_task: asyncio.Task[dict[str, Any]] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    perform_error: FerryError | None = None
    #: Set by a take-over, so the watcher follows the new connection.
    rebound: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None
    #: The source ended it (orphaned, or confirmed): no op may touch it again.
    ended: str = ""
    started: float = field(default_factory=time.monotonic)

    def bind(self, session: Session, emit: Any) -> None:
        """The migration follows ``session`` from now on."""
        if session is not self.session:
            self.session = session
            self.rebound.set()
        self.emit_to = emit

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Send a Perform event to whichever client follows it now."""
        if self.emit_to is not None and not self.session.closed:
            with contextlib.suppress(Exception):
                self.emit_to(event, data)


class ClientDriven:
    """ferry-source's client-driven ops: begin, perform, confirm, adopt_outgoing."""

    def __init__(self, driver: MigrationDriver) -> None:
        self.driver = driver
        self.ctx = driver.ctx

    def handlers(self) -> dict[str, Handler]:
        """The ops of this mode."""
        return {
            "begin": self.op_begin,
            "perform": self.op_perform,
            "confirm": self.op_confirm,
            "adopt_outgoing": self.op_adopt_outgoing,
        }

    # -- Begin ----------------------------------------------------------------

    async def op_begin(self, req: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Begin: check, take the job, and give the client the XML and cookie for Prepare."""
        params = MigrationParams.from_wire(args["params"])
        flags = validate(args["flags"], params)
        if flags & MigrationFlags.PEER2PEER:
            raise MigrationRefused(
                "begin is the first phase of a client-driven migration; a peer-to-peer "
                "migration is one 'migrate' request"
            )
        for flag, option in UNSUPPORTED:
            if flags & flag:
                raise MigrationRefused(
                    f"{option} is not supported in client-driven mode: the switch to "
                    "post-copy and its recovery need the source to reach the destination "
                    "itself; migrate peer to peer (without --client-driven)"
                )
        if params.deadline_s is not None:
            raise MigrationRefused(
                "--deadline is not supported in client-driven mode: its pre-flight probes "
                "the link from the source agent to the destination; migrate peer to peer "
                "(without --client-driven)"
            )
        out = self.driver.new_outgoing(req, "migrate", args, flags, params)
        link = ClientLink(session=req.session, emit_to=req.emit)
        out.client = link
        with out.log_context():
            try:
                cookie, xml = await begin(self.ctx, out, req.emit)
            except FerryError as exc:
                self.driver.outgoing.pop(out.name, None)
                self.driver.log_end(out, exc)
                raise
            except BaseException:
                self.driver.outgoing.pop(out.name, None)
                raise
            assert out.job is not None
            out.job.record(client_driven=True)
            self.ctx.progress[out.name] = out.progress
            link.begun = {"xml": xml, "cookie": cookie.encode()}
            link.watcher = asyncio.create_task(self._watch(out, link))
        return {"name": out.name, "migration_id": out.migration_id, "flags": int(out.flags),
                **link.begun}  # fmt: skip

    # -- Perform --------------------------------------------------------------

    async def op_perform(self, req: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Perform: migrate to where Prepare said; the statistics.

        A second call for the same migration (a client that took it over)
        follows the Perform already running, or gets its result.

        Raises:
            FerryError: Perform failed; ``details["finish_cancelled"]`` tells
                the client how to call Finish (False only when our qemu died
                after the stream started: the destination's copy is the only
                one left and may finish).
        """
        out, link = self._find(req, args, "perform")
        link.bind(req.session, req.emit)
        with out.log_context():
            if link.stage is ClientStage.BEGUN:
                self._start_perform(out, link, args)
            elif link.perform_task is None:
                raise PhaseError(f"migration {out.migration_id} of '{out.name}' is past "
                                 f"Perform ({link.stage})", stage=str(link.stage))  # fmt: skip
            assert link.perform_task is not None
            with contextlib.suppress(Exception):
                # A client that died must not cancel Perform: it ends on its own.
                await asyncio.shield(link.perform_task)
            if link.perform_error is not None:
                raise link.perform_error
            return {"name": out.name, "migration_id": out.migration_id, "stats": link.stats}

    def _start_perform(self, out: Outgoing, link: ClientLink, args: dict[str, Any]) -> None:
        job = out.job
        assert job is not None
        dest_cookie = Cookie.decode(args["cookie"])
        out.dest_name = str(args.get("dest_name") or out.name)
        job.record(dest_name=out.dest_name)
        if dest_cookie.identity is not None and dest_cookie.identity.hostname:
            out.peer_name = dest_cookie.identity.hostname
            job.record(peer=out.peer_name)
        uri = str(args["uri"])
        if out.flags & MigrationFlags.TUNNELLED:
            out.tunnel = open_tunnel(self.ctx, out, {"tunnel": args.get("tunnel")})
            uri = out.tunnel.uri
        enter_phase(out, link.emit, "perform")
        link.stage = ClientStage.PERFORMING
        link.perform_task = asyncio.create_task(self._perform(out, link, uri, dest_cookie))

    async def _perform(
        self, out: Outgoing, link: ClientLink, uri: str, dest_cookie: Cookie
    ) -> dict[str, Any]:
        assert out.proc is not None and out.job is not None
        try:
            link.stats = await perform(self.ctx, out, uri, dest_cookie, link.emit)
        except BaseException as exc:
            error = exc if isinstance(exc, FerryError) else MigrationFailed(
                f"perform failed: {exc}")  # fmt: skip
            if not isinstance(exc, FerryError | asyncio.CancelledError):
                log.exception("perform failed unexpectedly")
            if out.tunnel is not None:
                await out.tunnel.close(drain=False)
            cancelled = not out.may_finish_after_failure()
            if not cancelled:
                # The client sends a real Finish next: see below.
                out.job.phase = "finish"
            error.details["finish_cancelled"] = cancelled
            link.perform_error = error
            link.stage = ClientStage.PERFORM_FAILED if cancelled else ClientStage.PERFORMED
            if isinstance(exc, asyncio.CancelledError):
                raise
            return {}
        # Durable before the client can hear of it: from here the client may
        # send Finish, so a restarted agent must ask the destination (the
        # recovery table's finish row), never read "perform" as "Finish was
        # never sent" and resume.
        out.job.phase = "finish"
        link.stage = ClientStage.PERFORMED
        return link.stats

    # -- Confirm --------------------------------------------------------------

    async def op_confirm(self, req: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Confirm: stop our copy after Finish succeeded, or resume it after a failure.

        ``unknown``: the client does not know what Finish did (its reply was
        lost); the source asks the destination itself, as p2p does.
        """
        out, link = self._find(req, args, "confirm")
        link.bind(req.session, req.emit)
        if link.stage is ClientStage.PERFORMING:
            raise PhaseError(f"migration {out.migration_id} of '{out.name}' is still in "
                             "Perform", stage=str(link.stage))  # fmt: skip
        cancelled, unknown = bool(args["cancelled"]), bool(args["unknown"])
        offline = bool(out.flags & MigrationFlags.OFFLINE)  # no Perform: Begin → Confirm
        if link.stage is ClientStage.BEGUN and not cancelled and not offline:
            raise PhaseError(f"migration {out.migration_id} of '{out.name}' never ran "
                             "Perform: only a cancelled Confirm may follow Begin")  # fmt: skip
        if link.stage is ClientStage.PERFORMED and link.perform_error is not None:
            # Our qemu died after the stream started: nothing here to resume
            # whatever Finish said; the destination's answer is the outcome.
            unknown = unknown or not cancelled
        with out.log_context():
            link.ended = "confirm"
            try:
                return await self._confirm(out, link, req, cancelled=cancelled,
                                           unknown=unknown, dest_host=args.get("dest_host"))
            except FerryError as exc:
                self.driver.log_end(out, exc)
                raise
            finally:
                await self._end(out, link)

    async def _confirm(
        self, out: Outgoing, link: ClientLink, req: RequestContext, *, cancelled: bool,
        unknown: bool, dest_host: str | None,
    ) -> dict[str, Any]:  # fmt: skip
        job = out.job
        assert job is not None
        if out.flags & MigrationFlags.OFFLINE:
            return client_confirm(self.ctx, out, req.emit, cancelled=cancelled, unknown=unknown,
                                  dest_host=dest_host or out.peer, started=link.started)
        enter_phase(out, req.emit, "confirm")
        if unknown and link.stage is not ClientStage.BEGUN:
            settled = await settle(self.ctx, subject_of(out), job=job, emit=req.emit,
                                   deadline_s=self.ctx.config.migration.outcome_timeout_s)
            if settled.result != "completed":
                raise MigrationFailed(f"the outcome of Finish was not known to the client; "
                                      f"{settled.message}", result=settled.result)  # fmt: skip
            return summary(out, link.stats, out.peer, link.started)
        if cancelled:
            job.record(result="failed")
            what = await resume_source(self.ctx, out.name, was_running=out.was_running,
                                       leases_released=out.leases_released,
                                       saved=job.saved_migration)  # fmt: skip
            log_event(log, MessageID.MIGRATION_ABORTED,
                      f"migration of {out.name} to {out.peer} cancelled by its client; "
                      f"the VM was {what}", phase="confirm")  # fmt: skip
            return {"name": out.name, "migration_id": out.migration_id, "result": "cancelled",
                    "source": what}  # fmt: skip
        job.record(result="completed")
        link.stats.update(await out.end_tunnel(drain=True))
        host = dest_host or out.peer
        await stop_source(self.ctx, out.name, out.domain.uuid, migration_id=out.migration_id,
                          peer=host, peer_uri=out.peer_uri,
                          undefine=bool(out.flags & MigrationFlags.UNDEFINE_SOURCE))  # fmt: skip
        return summary(out, link.stats, host, link.started)

    # -- take-over ------------------------------------------------------------

    async def op_adopt_outgoing(self, req: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """A client takes over a client-driven migration whose client went away.

        ``found`` is false when the domain has none waiting (nothing to take
        over); a migration whose client is still connected is refused.
        """
        live = self.driver.resolve(req, "migrate", args["name"])
        out = self.driver.outgoing.get(live.domain.name)
        link = out.client if out is not None else None
        if out is None or not isinstance(link, ClientLink) or link.ended:
            return {"found": False, "name": live.domain.name}
        if not link.session.closed:
            raise JobBusy(
                f"domain '{out.name}' is busy: migration {out.migration_id} is driven by a "
                "client that is still connected", domain=out.name,
                migration_id=out.migration_id,
            )  # fmt: skip
        link.bind(req.session, req.emit)
        with out.log_context():
            log_event(log, MessageID.MIGRATION_PHASE,
                      f"a client took over migration {out.migration_id} of {out.name} "
                      f"({link.stage})", phase=out.phases.current)  # fmt: skip
        return {
            "found": True, "name": out.name, "migration_id": out.migration_id,
            "stage": str(link.stage), "dest_uri": out.peer_uri, "flags": int(out.flags),
            "params": out.params.to_wire(), "dest_name": out.dest_name or None,
            **link.begun,
        }  # fmt: skip

    # -- the close callback ---------------------------------------------------

    async def _watch(self, out: Outgoing, link: ClientLink) -> None:
        """Wait for the client's connection to close; after the grace, end the orphan."""
        grace = self.ctx.config.migration.client_grace_s
        while not link.ended:
            closed = asyncio.ensure_future(link.session.wait_closed())
            rebound = asyncio.ensure_future(link.rebound.wait())
            try:
                await asyncio.wait({closed, rebound}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                rebound.cancel()
            if link.rebound.is_set():
                link.rebound.clear()
                continue
            if link.ended:
                return
            with out.log_context():
                log_event(log, MessageID.MIGRATION_PHASE,
                          f"the client of migration {out.migration_id} went away after "
                          f"{link.stage}; waiting {grace:g}s for a client to take it over "
                          f"(ferryctl migrate-recover {out.name})", level=logging.WARNING,
                          phase=out.phases.current)  # fmt: skip
            try:
                await asyncio.wait_for(link.rebound.wait(), grace)
            except TimeoutError:
                break
            link.rebound.clear()
        if link.ended:
            return
        with out.log_context():
            await self._end_orphan(out, link, grace)

    async def _end_orphan(self, out: Outgoing, link: ClientLink, grace: float) -> None:
        link.ended = "orphaned"
        try:
            decision = decide_orphan(link.stage)
            if decision.action is OrphanAction.WAIT_PERFORM:
                assert link.perform_task is not None
                with contextlib.suppress(BaseException):
                    await asyncio.shield(link.perform_task)
                decision = decide_orphan(link.stage, source_alive=bool(
                    out.proc is not None and out.proc.alive()))  # fmt: skip
            log_event(log, MessageID.MIGRATION_ABORTED,
                      f"no client took over migration {out.migration_id} of {out.name} within "
                      f"{grace:g}s: {decision.reason}; {decision.action}",
                      level=logging.WARNING, phase=out.phases.current)  # fmt: skip
            job = out.job
            if decision.action is OrphanAction.RESUME and job is not None:
                job.record(result="failed")
                what = await resume_source(self.ctx, out.name, was_running=out.was_running,
                                           leases_released=out.leases_released,
                                           saved=job.saved_migration)  # fmt: skip
                log.info("migration %s discarded; the VM was %s", out.migration_id, what)
            elif decision.action is OrphanAction.SETTLE:
                await settle(self.ctx, subject_of(out), job=job,
                             deadline_s=self.ctx.config.migration.outcome_timeout_s)
        except Exception:
            log.exception("ending the orphaned migration %s failed", out.migration_id)
        finally:
            await self._end(out, link)

    # -- helpers --------------------------------------------------------------

    def _find(self, req: RequestContext, args: dict[str, Any], op: str) -> tuple[
            Outgoing, ClientLink]:  # fmt: skip
        live = self.driver.resolve(req, "migrate", args["name"])
        out = self.driver.outgoing.get(live.domain.name)
        link = out.client if out is not None else None
        if out is None or not isinstance(link, ClientLink) or out.migration_id != args[
                "migration_id"]:  # fmt: skip
            raise PhaseError(
                f"{op}: no client-driven migration {args['migration_id']} of "
                f"'{live.domain.name}' here (never begun, already confirmed, or discarded "
                "after its client went away)", migration_id=args["migration_id"],
            )  # fmt: skip
        if link.ended:
            raise PhaseError(f"{op}: migration {out.migration_id} of '{out.name}' has ended "
                             f"({link.ended})", migration_id=out.migration_id)  # fmt: skip
        return out, link

    async def _end(self, out: Outgoing, link: ClientLink) -> None:
        """Release everything the migration held on this host."""
        await out.close_tunnels()
        self.ctx.progress.pop(out.name, None)
        if self.driver.outgoing.get(out.name) is out:
            self.driver.outgoing.pop(out.name, None)
        if out.job is not None:
            await self.ctx.jobs.end_async(out.job)
        if link.watcher is not None and link.watcher is not asyncio.current_task():
            link.watcher.cancel()
