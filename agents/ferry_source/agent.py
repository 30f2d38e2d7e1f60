"""ferry-source: owns the domains of its host and every outgoing job.

Lifecycle ops (define, start, destroy, …) are served here; the outgoing
migration driver lives in :mod:`ferry_source.migration`.  Every op that
names a domain resolves it first and checks the ACL on the resolved name
and UUID (for ``define``, on what the parsed XML declares).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ferry import sdnotify
from ferry.acl import check_access
from ferry.config import AgentConfig
from ferry.daemon import admit_local, open_admin_socket
from ferry.domain import Domain, format_domain, parse_domain
from ferry.domain._filesystem import start_refusal as fs_start_refusal
from ferry.errors import (
    DomainExists,
    DomainState,
    FerryError,
    JobError,
    NoDomain,
    QMPError,
    SnapshotError,
    XMLUnsupported,
)
from ferry.faults import Faults, parse_faults
from ferry.fences import FenceBook
from ferry.host import Host, LiveDomain
from ferry.jobs import JobManager, JobType
from ferry.journal import MessageID, log_event, merge_entries, read_journal
from ferry.netdev import host_networks
from ferry.qemu import DISCONNECTED, QemuProcess
from ferry.rpc import RequestContext, Server, make_hello
from ferry.storage_policy import check_domain
from ferry_source.context import SourceContext
from ferry_source.migration import MigrationDriver
from ferry_source.preflight import migrate_check
from ferry_source.recovery import OutgoingRecovery
from ferry_source.save import SaveDriver
from ferry_source.snapshots import SnapshotOps

__all__ = ["SourceAgent"]

log = logging.getLogger("ferry.source")

JOB_TIMEOUT = 30.0
Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[dict[str, Any]]]


class SourceAgent:
    """The ferry-source daemon's state and request handlers."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = Host(config, "source")
        self.jobs = JobManager(
            config.paths.locks_dir, config.paths.jobs_dir, agent="ferry-source"
        )
        self.hello = make_hello(config.host.uuid, config.host.name, "source")
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.fences = FenceBook(config.paths.fences_dir)
        self.ctx = SourceContext(
            config=config, host=self.host, jobs=self.jobs, fences=self.fences,
            faults=Faults(parse_faults(config.testing.faults)), snapshots=self._snapshots,
        )  # fmt: skip
        # Live progress of outgoing migrations, for job_info.
        self.progress = self.ctx.progress
        self.migration = MigrationDriver(self.ctx, self.resolve)
        self.recovery = OutgoingRecovery(self.ctx)
        self.snapshot_ops = SnapshotOps(self)
        self.saves = SaveDriver(self)

    # -- plumbing -------------------------------------------------------------

    def handlers(self) -> dict[str, Handler]:
        """The op table served on the admin socket."""
        table: dict[str, Handler] = {
            "define": self.op_define,
            "undefine": self.op_undefine,
            "start": self.op_start,
            "shutdown": self.op_shutdown,
            "destroy": self.op_destroy,
            "suspend": self.op_suspend,
            "resume": self.op_resume,
            "list": self.op_list,
            "info": self.op_info,
            "dumpxml": self.op_dumpxml,
            "job_info": self.op_job_info,
            "journal_query": self.op_journal_query,
            "agent_state": self.op_agent_state,
            "migrate_check": functools.partial(migrate_check, self.ctx),
        }
        table.update(self.migration.handlers())
        table.update(self.snapshot_ops.handlers())
        table.update(self.saves.handlers())
        return table

    def check(self, ctx: RequestContext, op: str, domain: Domain | LiveDomain) -> None:
        """ACL check on a resolved domain."""
        dom = domain.domain if isinstance(domain, LiveDomain) else domain
        check_access(self.config.acl, ctx.subject, op, dom.name, dom.uuid)

    def resolve(self, ctx: RequestContext, op: str, name: str) -> LiveDomain:
        """Find a domain and check the caller may run ``op`` on it."""
        live = self.host.find(name)
        self.check(ctx, op, live)
        return live

    async def run(self, stop: asyncio.Event) -> None:
        """Start-up, serve until ``stop``, shutdown."""
        self.host.ensure_dirs()
        # Outgoing jobs of a previous run are adopted before anything else
        # can touch their domains; settling them may need the peer, so
        # that goes on in the background while we serve.
        await self.recovery.adopt_all()
        found = await self.host.reconnect_all()
        # A save or dump a killed agent left: cancelled, the guest resumed.
        await self.saves.recover_all()
        for name in found:
            self.watch(name)
        self.recovery.start()
        server = Server(
            self.hello,
            self.handlers(),
            max_frame=self.config.max_frame,
            admit=admit_local(self.config),
        )
        admin = await open_admin_socket(
            self.config.source_admin_socket,
            self.config.admin_group,
            server.handle_stream,
            limit=self.config.max_frame * 2,
        )
        rescan = asyncio.create_task(self._rescan_loop())
        log_event(
            log,
            MessageID.AGENT_READY,
            f"ferry-source ready: {len(found)} running domain(s) reconnected",
        )
        sdnotify.ready(self.status_text())
        try:
            await stop.wait()
        finally:
            sdnotify.stopping("ferry-source stopping; domains keep running")
            rescan.cancel()
            await self.recovery.stop()
            admin.close()
            for session in list(server.sessions):
                await session.close()
            for task in self._watchers.values():
                task.cancel()
            await self.host.close()

    def status_text(self) -> str:
        """STATUS= line: what the agent is doing."""
        running = len(self.host.running_names())
        out = sum(1 for p in self.progress.values() if p)
        return f"{running} domain(s) running, {out} migration(s) out"

    async def _rescan_loop(self) -> None:
        """Adopt domains started by the other agent (migrated in) and refresh STATUS."""
        while True:
            await asyncio.sleep(1.0)
            for name in self.host.running_names():
                if name in self._watchers:
                    continue
                status = self.host.load_status(name)
                if status is None or status.pid is None or status.run_state == "incoming":
                    continue
                with contextlib.suppress(FerryError):
                    record = self.jobs.recover(status.uuid)
                    if record is not None and record.async_job is not None:
                        continue  # the other agent is working on it
                with contextlib.suppress(FerryError, OSError):
                    await self.host.process(name)
                    self.watch(name)
            sdnotify.status(self.status_text())

    def watch(self, name: str) -> None:
        """Follow a running qemu: record its run state, clean up when it exits."""
        old = self._watchers.get(name)
        if old is not None and not old.done():
            return
        proc = self.host.cached(name)
        if proc is None:
            return
        self._watchers[name] = asyncio.create_task(self._watch(name, proc))

    async def _watch(self, name: str, proc: QemuProcess) -> None:
        try:
            with proc.qmp.events({"STOP", "RESUME", "SHUTDOWN", "WATCHDOG",
                                  DISCONNECTED}) as events:  # fmt: skip
                async for event in events:
                    if event.name == DISCONNECTED:
                        break
                    if event.name == "WATCHDOG":
                        self.saves.on_watchdog(name, event.data)
                        continue
                    status = self.host.load_status(name)
                    if status is None or status.pid != proc.pid:
                        continue
                    if event.name in ("STOP", "RESUME"):
                        status.run_state = "running" if event.name == "RESUME" else "paused"
                        self.host.save_status(status)
            if await proc.wait_exit(timeout=5.0):
                status = self.host.load_status(name)
                if status is not None and status.pid == proc.pid:
                    self.host.cleanup(name)
                    log_event(
                        log,
                        MessageID.DOMAIN_STOPPED,
                        f"domain {name} stopped (qemu exited)",
                        domain=name,
                        uuid=status.uuid,
                    )
            else:
                # The monitor went away but qemu lives (e.g. we released it).
                await self.host.release(name)
        finally:
            self._watchers.pop(name, None)

    async def state_of(self, live: LiveDomain) -> tuple[str, str | None]:
        """(state, reason) in virsh's words."""
        fence = self.fences.get(live.domain.uuid)
        if live.status is None:
            if fence is None and self.saves.has_managed(live.domain.name):
                return "shut off", "saved"  # virsh's reason: start resumes it
            return "shut off", fence.describe() if fence is not None else None
        if live.status.run_state == "incoming":
            return "paused", "migrating in"
        try:
            proc = await self.host.process(live.domain.name, timeout=2.0)
            run = await proc.qmp.query_status()
        except (NoDomain, QMPError):
            return live.status.run_state or "unknown", None
        if run.running:
            return "running", None
        if fence is not None:
            return "paused", fence.describe()
        held = live.status.extra.get("postcopy")
        if isinstance(held, dict) and held.get("held"):
            # The destination half of a post-copy migration whose stream
            # broke: only the source's --postcopy-resume finishes it.
            return "paused", (f"held in post-copy (migration {held.get('migration_id')}): "
                              "waiting for the source's --postcopy-resume")  # fmt: skip
        return "paused", run.reason

    # -- lifecycle ops --------------------------------------------------------

    async def op_define(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Define (or update) a persistent domain from XML."""
        # With this host's networks: an unmapped one is a problem like the others.
        domain = parse_domain(args["xml"], where="define", networks=host_networks(self.config))
        self.check(ctx, "define", domain)
        check_domain(domain, self.config, where="define")
        # A virtiofs share without shared guest RAM can never start: say so now
        # (not in the parser: a definition saved before must still load).
        why = fs_start_refusal(domain)
        if why is not None:
            raise XMLUnsupported(f"define: {why}", where="define",
                                 element="domain/devices/filesystem")
        existing = self.host.load_definition(domain.name)
        if existing is not None and existing.uuid != domain.uuid:
            raise DomainExists(
                f"domain '{domain.name}' already exists with uuid {existing.uuid}",
                name=domain.name,
            )
        other = self.host.find_uuid(domain.uuid)
        if other is not None and other.domain.name != domain.name:
            raise DomainExists(
                f"domain with uuid {domain.uuid} already exists as '{other.domain.name}'",
                uuid=domain.uuid,
            )
        status = self.host.load_status(domain.name)
        if status is not None and status.uuid != domain.uuid:
            raise DomainExists(
                f"domain '{domain.name}' is already running with uuid {status.uuid}",
                name=domain.name,
            )
        async with self.jobs.sync_job(
            domain.uuid, domain.name, JobType.MODIFY, timeout=JOB_TIMEOUT
        ):
            self.host.save_definition(domain)
        log.info("domain %s defined", domain.name, extra={})
        return {"name": domain.name, "uuid": domain.uuid, "updated": existing is not None}

    async def op_undefine(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Remove a persistent definition (a running domain becomes transient)."""
        live = self.resolve(ctx, "undefine", args["name"])
        if not live.persistent:
            raise DomainState(f"domain '{args['name']}' is transient: nothing to undefine")
        snaps = self._snapshots(live.domain.name)
        if snaps:
            raise SnapshotError(
                f"cannot undefine domain '{live.domain.name}' with {len(snaps)} snapshot(s); "
                "delete them first"
            )
        async with self.jobs.sync_job(
            live.domain.uuid, live.domain.name, JobType.MODIFY, timeout=JOB_TIMEOUT
        ):
            self.host.delete_definition(live.domain.name)
        return {"name": live.domain.name}

    async def op_start(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Start a defined domain."""
        live = self.resolve(ctx, "start", args["name"])
        dom = live.domain
        if live.status is None and self.saves.has_managed(dom.name):
            # libvirt's rule: a managed save image is resumed, not booted over.
            self._check_fence(dom, "start", force=args["force"])
            return await self.saves.start_managed(ctx, dom, paused=args["paused"])
        async with self.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY, timeout=JOB_TIMEOUT):
            if self.host.load_status(dom.name) is not None:
                raise DomainState(f"domain '{dom.name}' is already running", name=dom.name)
            self._check_fence(dom, "start", force=args["force"])
            definition = self.host.load_definition(dom.name) or dom
            check_domain(definition, self.config, where="start")
            proc = await self.host.start(definition)
            try:
                await self.host.acquire_leases(definition, proc)
                if not args["paused"]:
                    await proc.qmp.execute("cont")
            except BaseException:
                await self.host.kill(dom.name)
                raise
            status = self.host.load_status(dom.name)
            if status is not None:
                status.run_state = "paused" if args["paused"] else "running"
                self.host.save_status(status)
        self.watch(dom.name)
        log_event(
            log,
            MessageID.DOMAIN_STARTED,
            f"domain {dom.name} started (pid {proc.pid})",
            domain=dom.name,
            uuid=dom.uuid,
        )
        return {"name": dom.name, "pid": proc.pid}

    async def _running(
        self, ctx: RequestContext, op: str, name: str
    ) -> tuple[LiveDomain, QemuProcess]:
        live = self.resolve(ctx, op, name)
        if live.status is None:
            raise DomainState(f"domain '{name}' is not running", name=name)
        if live.status.run_state == "incoming":
            raise DomainState(f"domain '{name}' is being migrated in", name=name)
        return live, await self.host.process(name)

    async def op_destroy(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Stop a domain at once."""
        live = self.resolve(ctx, "destroy", args["name"])
        if live.status is None:
            raise DomainState(f"domain '{args['name']}' is not running", name=args["name"])
        dom = live.domain
        async with self.jobs.sync_job(dom.uuid, dom.name, JobType.DESTROY, timeout=JOB_TIMEOUT):
            await self.host.kill(dom.name)
        log_event(
            log,
            MessageID.DOMAIN_STOPPED,
            f"domain {dom.name} destroyed",
            domain=dom.name,
            uuid=dom.uuid,
        )
        return {"name": dom.name}

    async def op_shutdown(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Graceful shutdown (ACPI), then a hard stop after the timeout."""
        live, proc = await self._running(ctx, "shutdown", args["name"])
        dom = live.domain
        async with self.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY, timeout=JOB_TIMEOUT):
            await proc.shutdown(timeout=args["timeout"])
            self.host.cleanup(dom.name)
        log_event(
            log,
            MessageID.DOMAIN_STOPPED,
            f"domain {dom.name} shut down",
            domain=dom.name,
            uuid=dom.uuid,
        )
        return {"name": dom.name}

    async def op_suspend(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Pause the CPUs."""
        live, proc = await self._running(ctx, "suspend", args["name"])
        dom = live.domain
        async with self.jobs.sync_job(dom.uuid, dom.name, JobType.SUSPEND, timeout=JOB_TIMEOUT):
            await proc.qmp.execute("stop")
            self._set_run_state(dom.name, "paused")
        return {"name": dom.name}

    async def op_resume(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Resume the CPUs."""
        live, proc = await self._running(ctx, "resume", args["name"])
        dom = live.domain
        async with self.jobs.sync_job(dom.uuid, dom.name, JobType.MODIFY, timeout=JOB_TIMEOUT):
            run = await proc.qmp.query_status()
            if run.running:
                raise DomainState(f"domain '{dom.name}' is not paused", name=dom.name)
            self._check_fence(dom, "resume", force=args["force"])
            status = self.host.load_status(dom.name)
            if self.host.writable_disks(dom) and not (status and status.extra.get("leases")):
                # As Finish does: the disks are ours again before a CPU
                # can write to them (a migration handed them over).
                await self.host.acquire_leases(dom, proc)
            await proc.qmp.execute("cont")
            self._set_run_state(dom.name, "running")
        return {"name": dom.name}

    def _check_fence(self, dom: Domain, verb: str, *, force: bool) -> None:
        """Refuse to run a copy that migrated away (or may have), unless forced."""
        fence = self.fences.get(dom.uuid)
        if fence is None:
            return
        if not force:
            raise fence.refusal(verb)
        log_event(log, MessageID.DOMAIN_STARTED,
                  f"{verb} --force on {dom.name} despite: {fence.describe()}",
                  level=logging.WARNING, domain=dom.name, uuid=dom.uuid)  # fmt: skip
        self.fences.clear(dom.uuid)

    def _set_run_state(self, name: str, state: str) -> None:
        status = self.host.load_status(name)
        if status is not None:
            status.run_state = state
            self.host.save_status(status)

    async def op_list(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Running domains, and defined ones with ``all``; filtered by the ACL."""
        out = []
        for live in self.host.all_domains():
            if live.status is None and not args["all"]:
                continue
            try:
                self.check(ctx, "list", live)
            except FerryError:
                continue
            state, _reason = await self.state_of(live)
            out.append(
                {
                    "name": live.domain.name,
                    "uuid": live.domain.uuid,
                    "state": state,
                    "reason": _reason,
                    "id": live.status.pid if live.status else None,
                    "persistent": live.persistent,
                }
            )
        return {"domains": out}

    async def op_info(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """virsh dominfo."""
        live = self.resolve(ctx, "info", args["name"])
        dom = live.domain
        state, reason = await self.state_of(live)
        record = self.jobs.current(dom.uuid)
        return {
            "name": dom.name,
            "uuid": dom.uuid,
            "state": state,
            "reason": reason,
            "persistent": live.persistent,
            "vcpus": dom.vcpus,
            "memory_kib": dom.memory_kib,
            "type": dom.virt_type,
            "pid": live.status.pid if live.status else None,
            "job": record.async_job if record else None,
            "snapshots": len(self._snapshots(dom.name)),
            "managed_save": self.saves.has_managed(dom.name),
            "host": self.config.host.name,
        }

    async def op_dumpxml(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """The live XML (or the persistent one with ``inactive``)."""
        live = self.resolve(ctx, "dumpxml", args["name"])
        dom = live.domain
        if args["inactive"]:
            persistent = self.host.load_definition(dom.name)
            if persistent is None:
                raise DomainState(f"domain '{dom.name}' is transient: it has no inactive XML")
            dom = persistent
        return {"xml": format_domain(dom)}

    # -- snapshots (ferry_source.snapshots) --------------------------------------

    def _snapshots(self, name: str) -> list[dict[str, Any]]:
        return self.snapshot_ops.summaries(name)

    # -- jobs ------------------------------------------------------------------

    async def op_job_info(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """The domain's job and, for a migration, its latest progress."""
        live = self.resolve(ctx, "job_info", args["name"])
        record = self.jobs.current(live.domain.uuid)
        if record is None or record.async_job is None:
            return {"job": None}
        out: dict[str, Any] = {
            "job": record.async_job,
            "phase": record.phase,
            "migration_id": record.migration_id,
            "started": record.started,
            "elapsed_s": time.time() - record.started if record.started else None,
        }
        out.update(self.progress.get(live.domain.name, {}))
        return out

    async def op_agent_state(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """What this agent holds: recorded jobs, migrations in flight, fences (diagnostics)."""
        check_access(self.config.acl, ctx.subject, "agent_state", None)
        return {
            "agent": "ferry-source",
            "host": self.config.host.name,
            "jobs": [{"name": f.name, "uuid": f.uuid, **f.job.to_dict()}
                     for f in self.jobs.recorded()],
            "outgoing": [{"name": o.name, "migration_id": o.migration_id,
                          "phase": o.phases.current} for o in self.migration.outgoing.values()],
            "fences": [vars(f) for f in self.fences.all()],
            "recovering": self.recovery.pending(),
        }  # fmt: skip

    async def op_journal_query(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Journal entries of one domain or one migration.

        For a migration, the peer host's side is fetched too (from its
        ferry-destination, over TLS; the op is ACL-checked there) and both
        are merged by time, each entry labelled with its host.
        """
        check_access(self.config.acl, ctx.subject, "journal_query", args.get("domain"))
        entries = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: read_journal(
                migration_id=args["migration_id"], domain=args["domain"], since=args["since"]
            ),
        )
        hosts = [self.config.host.name]
        warnings: list[str] = []
        if args["migration_id"]:
            peers = {
                str(e["FERRY_PEER_URI"])
                for e in entries
                if e.get("FERRY_PEER_URI") and e.get("host") == self.config.host.name
            }
            for uri in sorted(peers):
                try:
                    remote = await self.migration.peer_request(
                        uri, "journal_query",
                        {"migration_id": args["migration_id"], "domain": None, "since": None},
                    )  # fmt: skip
                except FerryError as exc:
                    warnings.append(f"could not read the journal of {uri}: {exc}")
                    continue
                hosts.append(str(remote.get("host")))
                entries = merge_entries(entries, remote.get("entries", []))
        return {"entries": entries, "host": self.config.host.name, "hosts": hosts,
                "warnings": warnings}  # fmt: skip


def not_implemented(op: str) -> Handler:
    """A handler for ops later issues fill in; answers clearly instead of hanging."""

    async def handler(ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        raise JobError(f"{op} is not supported by this ferry-source yet")

    return handler
