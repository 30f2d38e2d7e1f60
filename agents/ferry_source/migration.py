"""Outgoing migration: the peer-to-peer driver of migration v3.

ferry-source runs the whole protocol for ``ferryctl migrate``:

    Begin    (here)   checks, job MIGRATION_OUT, XML + cookie
    Prepare  (peer)   destination starts qemu -incoming, answers with the URI
    Perform  (here)   caps/params, ``migrate``, follow progress, abort/timeout
    Finish   (peer)   destination starts the CPUs, or kills its qemu
    Confirm  (here)   success: stop our qemu; failure: resume our CPUs

The job is held from Begin to Confirm.  At no point may the VM run on both
hosts: our CPUs stay paused after qemu's switchover until the destination
reports the outcome of Finish; only a failed Finish resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferry.domain import Domain, check_abi_stability, format_domain, parse_domain
from ferry.errors import (
    AuthError,
    DomainState,
    FerryError,
    JobAborted,
    JobError,
    MigrationFailed,
    MigrationRefused,
    MigrationTimeout,
)
from ferry.flags import MigrationFlags, MigrationParams, flag_names, validate
from ferry.jobs import AsyncJob, Job, JobType
from ferry.journal import LogContext, MessageID, log_event
from ferry.protocol.cookie import Cookie, Identity, LockState, Persistent
from ferry.protocol.phases import SourcePhases
from ferry.qemu import (
    EventSubscription,
    QemuProcess,
    QMPEvent,
    SavedMigrationSettings,
    query_migrate,
    set_caps,
    set_params,
)
from ferry.rpc import Handler, RequestContext, Session, connect_tcp, make_hello
from ferry.tls import TLSFiles, as_auth_error, client_context
from ferry.tunnel.channel import make_endpoint
from ferry_source.tunnel import SourceTunnel

if TYPE_CHECKING:
    from ferry_source.agent import SourceAgent

__all__ = ["MigrationDriver", "parse_dest_uri"]

log = logging.getLogger("ferry.source.migration")

DEFAULT_AGENT_PORT = 49160
JOB_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
NOT_CONVERGING = (
    "the migration is not converging: the guest dirties memory faster than it is copied"
)
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX: "unlimited", in bytes/s.  qemu's
# own 128 MiB/s default alone kept a dirtying guest from ever finishing.
UNLIMITED_BANDWIDTH = (2**63 - 1) // (1024 * 1024) * (1024 * 1024)
MIB = 1024 * 1024
# Cache modes that bypass the host page cache: safe when another host opens
# the same image (libvirt's qemuMigrationSrcIsSafe).
SAFE_CACHE = frozenset({"none", "directsync"})
# statfs f_type of cluster filesystems whose coherent caches make any mode safe.
CLUSTER_FS_MAGIC = {
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x00C36400: "ceph",
    0x47504653: "gpfs",
}


def parse_dest_uri(uri: str) -> tuple[str, int]:
    """``ferry://HOST[:PORT]`` → (host, port).

    Raises:
        MigrationRefused: for any other form.
    """
    prefix = "ferry://"
    if not uri.startswith(prefix):
        raise MigrationRefused(f"destination URI {uri!r} must look like ferry://HOST[:PORT]")
    rest = uri[len(prefix) :].rstrip("/")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    if not host:
        raise MigrationRefused(f"destination URI {uri!r} has no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MigrationRefused(f"destination URI {uri!r}: bad port {port_text!r}")
        return host, int(port_text)
    return host, DEFAULT_AGENT_PORT


def _fs_magic(path: str) -> int | None:
    """statfs(2) f_type of the filesystem holding ``path`` (None if unknown)."""
    import ctypes
    import ctypes.util

    class StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = StatFS()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def unsafe_disks(domain: Domain) -> list[str]:
    """Disks whose cache mode makes migration unsafe, each with the reason."""
    problems = []
    for disk in domain.disks:
        if disk.readonly or disk.shareable or disk.source is None or disk.device == "cdrom":
            continue
        cache = disk.cache or "default"
        if cache in SAFE_CACHE:
            continue
        magic = _fs_magic(disk.source)
        if magic in CLUSTER_FS_MAGIC:
            continue
        problems.append(
            f"disk {disk.target_dev} ({disk.source}) uses cache mode '{cache}': the source "
            "host may still hold unwritten data for it in its page cache; use cache "
            "'none' or 'directsync', or pass --unsafe"
        )
    return problems


@dataclass
class Outgoing:
    """State of one outgoing migration, shared with job_info and job_abort."""

    name: str
    migration_id: str
    flags: MigrationFlags
    params: MigrationParams
    phases: SourcePhases = field(default_factory=SourcePhases)
    progress: dict[str, Any] = field(default_factory=dict)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str = "aborted on request"
    proc: QemuProcess | None = None
    set_downtime: Callable[[int], None] | None = None
    warned: bool = False
    lease_handover: bool = False
    leases_released: bool = False
    tunnel: SourceTunnel | None = None
    # Set (from a relay thread, through the loop) when the tunnel broke.
    failure: FerryError | None = None


class MigrationDriver:
    """Begin / Perform / Confirm and the p2p conversation with the destination."""

    def __init__(self, agent: SourceAgent) -> None:
        self.agent = agent
        self.outgoing: dict[str, Outgoing] = {}

    def handlers(self) -> dict[str, Handler]:
        """Ops served by the migration driver."""
        return {
            "migrate": self.op_migrate,
            "job_abort": self.op_job_abort,
            "set_max_downtime": self.op_set_max_downtime,
            "set_max_bandwidth": self.op_set_max_bandwidth,
        }

    # -- ops ------------------------------------------------------------------

    async def op_migrate(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Migrate a running domain to another host (peer to peer)."""
        params = MigrationParams.from_wire(args["params"])
        flags = validate(args["flags"], params) | MigrationFlags.PEER2PEER
        live = self.agent.resolve(ctx, "migrate", args["name"])
        if flags & MigrationFlags.OFFLINE:
            raise MigrationRefused("offline migration is not supported yet (--offline)")
        if params.tunnel_plaintext and not (
            self.agent.config.tls is not None and self.agent.config.tls.allow_plaintext_tunnel
        ):
            raise MigrationRefused(
                "--tunnel-plaintext refused: this host's config does not allow plaintext "
                "tunnel data ([tls] allow_plaintext_tunnel = true)"
            )
        if live.status is None:
            raise DomainState(
                f"domain '{live.domain.name}' is not running; only a running domain migrates live"
            )
        host, port = parse_dest_uri(args["dest_uri"])
        migration_id = uuidlib.uuid4().hex
        out = Outgoing(live.domain.name, migration_id, flags, params)
        started = time.monotonic()
        with LogContext(domain=live.domain.name, uuid=live.domain.uuid,
                        migration_id=migration_id, peer=host):  # fmt: skip
            try:
                return await self._migrate(ctx, out, live.domain, host, port, started)
            except FerryError as exc:
                if isinstance(exc, JobAborted | MigrationTimeout):
                    kind = MessageID.MIGRATION_ABORTED
                elif out.phases.current in ("none", "begin"):
                    kind = MessageID.MIGRATION_REFUSED
                else:
                    kind = MessageID.MIGRATION_FAILED
                log_event(log, kind, f"migration of {out.name} to {host} ended: {exc}",
                          level=logging.WARNING, result=exc.code,
                          phase=out.phases.current)  # fmt: skip
                raise

    async def op_job_abort(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Abort the domain's async job (a migration is cancelled cleanly)."""
        live = self.agent.resolve(ctx, "job_abort", args["name"])
        out = self.outgoing.get(live.domain.name)
        if out is not None:
            out.abort_reason = "aborted on request (job_abort)"
            out.abort.set()
            return {"name": live.domain.name}
        if not self.agent.jobs.request_abort(live.domain.uuid):
            raise JobError(f"no job is running on domain '{live.domain.name}'")
        return {"name": live.domain.name}

    async def _tune(
        self, ctx: RequestContext, name: str, op: str, params: dict[str, Any]
    ) -> Outgoing:
        live = self.agent.resolve(ctx, op, name)
        out = self.outgoing.get(live.domain.name)
        if out is None or out.proc is None:
            raise JobError(f"no migration is running for domain '{live.domain.name}'")
        async with self.agent.jobs.sync_job(live.domain.uuid, live.domain.name,
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

    # -- the protocol ---------------------------------------------------------

    def _phase(self, ctx: RequestContext, out: Outgoing, job: Job | None, phase: str) -> None:
        if phase in ("begin", "perform", "confirm"):
            out.phases.advance(phase, cancelled=False)
        if job is not None:
            job.phase = phase
        ctx.emit("phase", {"phase": phase, "migration_id": out.migration_id})
        log_event(log, MessageID.MIGRATION_PHASE, f"{out.name}: entering {phase}", phase=phase)

    async def _migrate(
        self,
        ctx: RequestContext,
        out: Outgoing,
        domain: Domain,
        host: str,
        port: int,
        started: float,
    ) -> dict[str, Any]:
        agent = self.agent
        flags, params = out.flags, out.params
        # -- Begin ------------------------------------------------------------
        out.phases.advance("begin")
        ctx.emit("phase", {"phase": "begin", "migration_id": out.migration_id})
        self._is_allowed(domain, flags)
        xml_domain = domain
        if params.dest_xml:
            supplied = parse_domain(params.dest_xml, where="--xml")
            check_abi_stability(domain, supplied, allow_rename=bool(params.dest_name))
            xml_domain = supplied
        log_event(log, MessageID.MIGRATION_STARTED,
                  f"migrating {domain.name} to {host}:{port} "
                  f"(flags {', '.join(flag_names(flags))})",
                  phase="begin", flags=int(flags),
                  peer_uri=f"ferry://{host}:{port}")  # fmt: skip
        job = await agent.jobs.begin_async(
            domain.uuid, domain.name, AsyncJob.MIGRATION_OUT, flags=int(flags),
            phase="begin", migration_id=out.migration_id, timeout=JOB_TIMEOUT,
        )  # fmt: skip
        self.outgoing[domain.name] = out
        agent.progress[domain.name] = out.progress
        session: Session | None = None
        try:
            proc = await agent.host.process(domain.name)
            out.proc = proc
            was_running = (await proc.qmp.query_status()).running
            # libvirt's qemuMigrationSrcIsAllowed: refuse in Begin, before
            # the destination starts a qemu for nothing.
            await self.check_io_error(proc, domain.name, flags)
            if not was_running and not flags & MigrationFlags.PAUSED:
                # As libvirt's p2p driver: a domain paused when the migration
                # starts stays paused on the destination.
                flags |= MigrationFlags.PAUSED
                out.flags = flags
            cookie = Cookie().with_identity(
                Identity(name=domain.name, uuid=domain.uuid, hostname=agent.config.host.name,
                         host_uuid=agent.config.host.uuid, migration_id=out.migration_id)
            ).with_lockstate(LockState(driver="lease", leases=()))  # fmt: skip
            if flags & MigrationFlags.PERSIST_DEST:
                persistent = agent.host.load_definition(domain.name) or domain
                cookie = cookie.with_persistent(Persistent(xml=format_domain(persistent)))
            xml = format_domain(xml_domain, migratable=True)

            # -- Prepare (peer) ---------------------------------------------------
            session = await self._connect(host, port)
            self._phase(ctx, out, job, "prepare")
            prep = await self._remote(session, "prepare", {
                "xml": xml, "cookie": cookie.encode(), "flags": int(flags),
                "params": params.to_wire(),
            }, timeout=120)  # fmt: skip
            dest_name = str(prep.get("name") or domain.name)
            dest_cookie = Cookie.decode(prep["cookie"])
            uri = str(prep["uri"])
            if flags & MigrationFlags.TUNNELLED:
                out.tunnel = self._open_tunnel(out, host, port, prep)
                uri = out.tunnel.uri

            # -- Perform ----------------------------------------------------------
            self._phase(ctx, out, job, "perform")
            perform_error: FerryError | None = None
            stats: dict[str, Any] = {}
            try:
                stats = await self._perform(ctx, out, job, proc, uri, dest_cookie, was_running)
            except FerryError as exc:
                perform_error = exc
            except Exception as exc:
                # A bug here must still reach Finish(cancelled) and Confirm,
                # or the VM would stay paused on the source.
                log.exception("perform failed unexpectedly")
                perform_error = MigrationFailed(f"perform failed: {exc}")
            if out.tunnel is not None and perform_error is not None:
                # Nothing more may reach the destination's qemu.
                await out.tunnel.close(drain=False)

            # -- Finish (peer) ----------------------------------------------------
            self._phase(ctx, out, job, "finish")
            finish_error: FerryError | None = None
            dest_host = agent.config.host.name
            try:
                fin = await self._remote(session, "finish", {
                    "name": dest_name, "cookie": Cookie().encode(), "flags": int(flags),
                    "params": params.to_wire(), "cancelled": perform_error is not None,
                }, timeout=120)  # fmt: skip
                dest_host = str(fin.get("host") or host)
            except FerryError as exc:
                finish_error = exc
            if out.tunnel is not None:
                await out.tunnel.close(drain=finish_error is None)
                sent, _ = out.tunnel.bytes()
                stats["tunnel_bytes"] = sent
                stats["tunnel_channels"] = len(out.tunnel.set.opened)
                stats["tunnel_mode"] = out.tunnel.mode

            # -- Confirm ----------------------------------------------------------
            self._phase(ctx, out, job, "confirm")
            failure = perform_error or finish_error
            if failure is not None:
                await self._resume(proc, was_running, flags, out)
                raise failure
            await self._confirm_success(domain, flags)
            total_s = time.monotonic() - started
            summary = {
                **stats,
                "wall_time_ms": int(total_s * 1000),
                "result": "completed",
            }
            log_event(log, MessageID.MIGRATION_COMPLETED,
                      f"{domain.name} migrated to {dest_host} as {dest_name} in {total_s:.2f}s",
                      phase="confirm")  # fmt: skip
            summary_fields: dict[str, Any] = {
                f"summary_{k}": v for k, v in summary.items() if isinstance(v, int | float | str)
            }
            log_event(log, MessageID.MIGRATION_SUMMARY,
                      "summary: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.items())),
                      phase="confirm", **summary_fields)  # fmt: skip
            return {
                "name": domain.name,
                "dest_name": dest_name,
                "dest_host": dest_host,
                "migration_id": out.migration_id,
                "stats": summary,
            }
        finally:
            if out.tunnel is not None:
                await out.tunnel.close(drain=False)
            self.outgoing.pop(domain.name, None)
            agent.progress.pop(domain.name, None)
            if session is not None:
                await session.close()
            await agent.jobs.end_async(job)

    def _is_allowed(self, domain: Domain, flags: MigrationFlags) -> None:
        """libvirt's qemuMigrationSrcIsAllowed + IsSafe, for a remote migration."""
        snaps = self.agent._snapshots(domain.name)
        if snaps:
            raise MigrationRefused(
                f"cannot migrate domain '{domain.name}' with {len(snaps)} snapshot(s)",
                snapshots=[s["name"] for s in snaps],
            )
        if not flags & MigrationFlags.UNSAFE:
            problems = unsafe_disks(domain)
            if problems:
                raise MigrationRefused("unsafe migration: " + "; ".join(problems))
        status = self.agent.host.load_status(domain.name)
        if (
            status is not None
            and status.run_state == "io-error"
            and flags & MigrationFlags.ABORT_ON_ERROR
        ):
            raise MigrationRefused(
                f"cannot migrate domain '{domain.name}': it is paused after an I/O error "
                "and --abort-on-error was given"
            )

    async def check_io_error(self, proc: QemuProcess, domain: str, flags: MigrationFlags) -> None:
        """Refuse with ABORT_ON_ERROR when qemu says the guest is paused on an I/O error."""
        if not flags & MigrationFlags.ABORT_ON_ERROR:
            return
        run = await proc.qmp.query_status()
        if run.reason == "io-error" or run.status == "io-error":
            raise MigrationRefused(
                f"cannot migrate domain '{domain}': it is paused after an I/O error "
                "and --abort-on-error was given"
            )

    async def _connect(self, host: str, port: int) -> Session:
        config = self.agent.config
        if config.tls is None:
            raise MigrationRefused("[tls] is not configured: peers are only reached over TLS")
        files = TLSFiles(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
        hello = make_hello(config.host.uuid, config.host.name, "source")
        try:
            return await connect_tcp(host, port, hello, ssl_context=client_context(files),
                                     server_hostname=host, max_frame=config.max_frame)  # fmt: skip
        except FerryError:
            raise
        except OSError as exc:
            import ssl

            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise as_auth_error(exc, peer=host) from None
            if isinstance(exc, ConnectionResetError | BrokenPipeError):
                # TLS 1.3 checks the client certificate after the client
                # thinks the handshake is done: a refusal shows up as the
                # peer dropping the connection before it greets us.
                raise AuthError(
                    f"ferry-destination at {host}:{port} dropped the TLS connection before "
                    "greeting us: it did not accept this host's certificate "
                    "(not signed by its CA?)",
                    peer=host,
                ) from None
            raise MigrationRefused(
                f"cannot reach ferry-destination at {host}:{port}: {exc}"
            ) from None
        except TimeoutError:
            raise MigrationRefused(f"ferry-destination at {host}:{port} did not answer") from None

    async def peer_request(self, uri: str, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """One request to a peer host's ferry-destination (e.g. its journal)."""
        host, port = parse_dest_uri(uri)
        session = await self._connect(host, port)
        try:
            return await self._remote(session, op, args, timeout=60)
        finally:
            await session.close()

    async def _remote(
        self, session: Session, op: str, args: dict[str, Any], *, timeout: float
    ) -> dict[str, Any]:
        try:
            return await session.request(op, args, timeout=timeout)
        except TimeoutError:
            raise MigrationFailed(
                f"the destination did not answer {op} within {timeout:.0f}s"
            ) from None
        except AuthError:
            raise

    async def _perform(
        self,
        ctx: RequestContext,
        out: Outgoing,
        job: Job,
        proc: QemuProcess,
        uri: str,
        dest_cookie: Cookie,
        was_running: bool,
    ) -> dict[str, Any]:
        """Set caps/params, run ``migrate``, follow it to the end; restore settings."""
        from ferry_native import Sample, TransferAccount

        flags, params = out.flags, out.params
        await self.check_io_error(proc, out.name, flags)
        async with self.agent.jobs.nested(job):
            saved = await SavedMigrationSettings.snapshot(proc.qmp)
            job.saved_migration = saved.to_dict()
            caps = {"events": True, "auto-converge": bool(flags & MigrationFlags.AUTO_CONVERGE)}
            # With disk leases, qemu waits for us at switchover: its CPUs are
            # stopped, so we can hand the leases over before the device state
            # (and with it the right to write) moves.
            out.lease_handover = self._has_leases(out.name)
            caps["pause-before-switchover"] = out.lease_handover
            # Always set: a qemu that arrived here by a parallel migration
            # still has multifd on, and both ends must agree.
            caps["multifd"] = bool(flags & MigrationFlags.PARALLEL)
            await set_caps(proc.qmp, caps)
            tuning: dict[str, Any] = {
                "max-bandwidth": params.bandwidth_mib * MIB if params.bandwidth_mib
                else UNLIMITED_BANDWIDTH,
            }  # fmt: skip
            if params.max_downtime_ms is not None:
                tuning["downtime-limit"] = params.max_downtime_ms
            if params.auto_converge_initial is not None:
                tuning["cpu-throttle-initial"] = params.auto_converge_initial
            if params.auto_converge_increment is not None:
                tuning["cpu-throttle-increment"] = params.auto_converge_increment
            if flags & MigrationFlags.PARALLEL:
                tuning["multifd-channels"] = params.parallel_connections or 2
            await set_params(proc.qmp, tuning)
            graphics = dest_cookie.graphics
            if graphics is not None and graphics.type == "spice" and graphics.port:
                # Connected SPICE clients reconnect to the destination by
                # themselves at switchover; a failure here costs them only that.
                try:
                    await proc.qmp.execute("client_migrate_info", {
                        "protocol": "spice", "hostname": graphics.listen or "",
                        "port": graphics.port,
                        **({"tls-port": graphics.tls_port} if graphics.tls_port else {}),
                    })  # fmt: skip
                    log.info("spice clients told to follow to %s:%d", graphics.listen,
                             graphics.port)  # fmt: skip
                except FerryError as exc:
                    log.warning("spice clients cannot be told where to go: %s", exc)
            if not flags & MigrationFlags.LIVE and was_running:
                await proc.qmp.execute("stop")
        account = TransferAccount()
        downtime_limit_s = [
            (params.max_downtime_ms or saved.params.get("downtime-limit", 300)) / 1000
        ]

        def set_downtime(ms: int) -> None:
            downtime_limit_s[0] = ms / 1000

        out.set_downtime = set_downtime
        deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
        max_throttle = 0
        try:
            with proc.qmp.events({"MIGRATION", "BLOCK_IO_ERROR", "disconnected"}) as events:
                async with self.agent.jobs.nested(job):
                    await proc.qmp.execute("migrate", {"uri": uri})
                last_time = -1.0
                last_tunnel_t = 0.0
                tunnel_sent, tunnel_t = 0, 0.0
                received: list[QMPEvent] = []
                while True:
                    io_error = self._check_events(received)
                    if io_error is not None and flags & MigrationFlags.ABORT_ON_ERROR:
                        await self._cancel(proc)
                        raise MigrationFailed(
                            f"migration aborted: the guest hit an I/O error ({io_error}) "
                            "and --abort-on-error was given"
                        )
                    stats = await query_migrate(proc.qmp)
                    if stats.status == "pre-switchover":
                        await self.agent.host.release_leases(out.name)
                        out.leases_released = True
                        async with self.agent.jobs.nested(job):
                            await proc.qmp.execute("migrate-continue", {"state": "pre-switchover"})
                        received = []
                        continue
                    if stats.status == "completed" and not stats.total_time_ms:
                        # qemu 7.2 briefly reports completion before it
                        # fills in the times.
                        for _ in range(50):
                            await asyncio.sleep(0.002)
                            stats = await query_migrate(proc.qmp)
                            if stats.total_time_ms:
                                break
                    max_throttle = max(max_throttle, stats.cpu_throttle_percentage)
                    sample = stats.to_sample()
                    # A query held up by the switchover repeats the final
                    # time; the accounting wants strictly later samples.
                    if (
                        stats.ram_total
                        and stats.status == "active"
                        and sample["time_s"] > last_time
                    ):
                        last_time = sample["time_s"]
                        account.feed(Sample(**sample))
                        if out.tunnel is not None:
                            # The relay's own counter, beside qemu's: bytes
                            # that really crossed the tunnel, and its rate.
                            tunnel_sent, _ = out.tunnel.bytes()
                            tunnel_t = time.monotonic() - out.tunnel.set.started_at
                            if tunnel_t > last_tunnel_t:
                                account.feed_relay(tunnel_t, tunnel_sent)
                                last_tunnel_t = tunnel_t
                        snap: dict[str, Any] = dict(account.snapshot())
                        snap["predicted_downtime_s"] = account.predicted_downtime_s(
                            downtime_limit_s[0]
                        )
                        snap["status"] = stats.status
                        snap["expected_downtime_ms"] = stats.expected_downtime_ms
                        snap["elapsed_s"] = (stats.total_time_ms or 0) / 1000
                        if out.tunnel is not None:
                            snap["tunnel_bytes"] = tunnel_sent
                            snap["tunnel_bytes_per_s"] = tunnel_sent / max(tunnel_t, 1e-3)
                        out.progress.clear()
                        out.progress.update(snap)
                        ctx.emit("progress", dict(snap))
                    if stats.status == "completed":
                        return {
                            "total_time_ms": stats.total_time_ms,
                            "downtime_ms": stats.downtime_ms,
                            "setup_time_ms": stats.setup_time_ms,
                            "transferred": stats.ram_transferred,
                            "total": stats.ram_total,
                            "passes": stats.ram_dirty_sync_count,
                            "throttle_pct": max_throttle,
                            "mbps": stats.ram_mbps,
                        }  # fmt: skip
                    if stats.status in ("failed", "cancelled"):
                        if out.tunnel is not None and out.tunnel.set.error is not None:
                            raise out.tunnel.set.error
                        raise MigrationFailed(
                            f"qemu reports the migration {stats.status}: "
                            f"{stats.error_desc or 'no reason given'}"
                        )
                    if out.failure is not None:
                        await self._cancel(proc)
                        raise out.failure
                    if out.abort.is_set():
                        await self._cancel(proc)
                        raise JobAborted(f"migration of '{out.name}' {out.abort_reason}")
                    if deadline is not None and time.monotonic() > deadline:
                        await self._cancel(proc)
                        converging = account.converging
                        note = " (it was not converging)" if converging is False else ""
                        raise MigrationTimeout(
                            f"migration of '{out.name}' did not finish within "
                            f"{params.timeout_s:g}s{note}; cancelled"
                        )
                    if account.converging is False and account.samples >= 8 and not out.warned:
                        out.warned = True
                        ctx.emit("warning", {"message": NOT_CONVERGING})
                    received = await self._wait_events(events, out.abort, POLL_INTERVAL)
        except BaseException:
            # Only a failed transfer leaves the source running on: give it
            # back its settings.  After success the qemu is stopped anyway.
            with contextlib.suppress(FerryError):
                async with self.agent.jobs.nested(job):
                    await saved.restore(proc.qmp)
            raise
        finally:
            out.set_downtime = None

    @staticmethod
    async def _wait_events(
        events: EventSubscription, abort: asyncio.Event, timeout: float
    ) -> list[QMPEvent]:
        """Sleep until a qemu event, an abort request or ``timeout``.

        Waking on qemu's MIGRATION event (rather than only polling) notices
        completion within milliseconds, which is most of the orchestration
        overhead.
        """
        getter = asyncio.ensure_future(events.get())
        aborter = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({getter, aborter}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            aborter.cancel()
            if not getter.done():
                getter.cancel()
        received = [getter.result()] if getter.done() and not getter.cancelled() else []
        return received + events.pending()

    @staticmethod
    def _check_events(received: list[QMPEvent]) -> str | None:
        io_error = None
        for event in received:
            if event.name == "BLOCK_IO_ERROR":
                data = event.data or {}
                io_error = (
                    f"{data.get('device') or data.get('node-name')}: {data.get('reason', '')}"
                )
            elif event.name == "disconnected":
                raise MigrationFailed("the source qemu went away during the migration")
        return io_error

    async def _cancel(self, proc: QemuProcess) -> None:
        """migrate_cancel and wait until qemu has really stopped migrating."""
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("migrate_cancel")
        for _ in range(200):
            stats = await query_migrate(proc.qmp)
            if stats.status not in ("active", "cancelling", "setup", "pre-switchover", "device"):
                return
            await asyncio.sleep(0.05)

    def _open_tunnel(
        self, out: Outgoing, host: str, port: int, prep: dict[str, Any]
    ) -> SourceTunnel:
        """Listen where qemu will migrate to; its connections go to ``host:port``."""
        config = self.agent.config
        grant = prep.get("tunnel")
        if not isinstance(grant, dict) or not isinstance(grant.get("token"), str):
            raise MigrationFailed("the destination did not prepare a tunnel (no token)")
        assert config.tls is not None
        loop = asyncio.get_running_loop()

        def broken(error: FerryError) -> None:
            def record() -> None:
                if out.failure is None:
                    out.failure = error
                out.abort.set()

            loop.call_soon_threadsafe(record)

        tunnel = SourceTunnel(
            name=out.name,
            socket_path=config.paths.tunnel_dir / f"{out.migration_id[:16]}.sock",
            endpoint=make_endpoint(config.tls, server=False),
            host=host,
            port=port,
            token=grant["token"],
            channels=int(grant.get("channels", 1)),
            mode="plain" if out.params.tunnel_plaintext else "tls",
            on_error=broken,
        )
        tunnel.listen()
        return tunnel

    def _has_leases(self, name: str) -> bool:
        status = self.agent.host.load_status(name)
        return bool(status is not None and status.extra.get("leases"))

    async def _resume(
        self, proc: QemuProcess, was_running: bool, flags: MigrationFlags, out: Outgoing
    ) -> None:
        """Confirm after failure: take the leases back, then the CPUs if it had them."""
        if out.leases_released:
            live = self.agent.host.find(out.name)
            try:
                await self.agent.host.acquire_leases(live.domain, proc)
            except FerryError as exc:
                # Someone else holds a disk now: running would risk two
                # writers.  The VM stays paused; the operator decides.
                log.error("cannot take the disk leases back (%s); %s stays paused", exc, out.name)
                return
            out.leases_released = False
        if not was_running:
            return
        with contextlib.suppress(FerryError):
            run = await proc.qmp.query_status()
            # A guest paused on an I/O error stays paused (as libvirt):
            # resuming would only repeat the failing request.
            if not run.running and run.status != "io-error" and run.reason != "io-error":
                await proc.qmp.execute("cont")
                log.info("source CPUs resumed after the failed migration")

    async def _confirm_success(self, domain: Domain, flags: MigrationFlags) -> None:
        """Confirm after success: stop our qemu, undefine when asked."""
        host = self.agent.host
        await host.kill(domain.name)
        if flags & MigrationFlags.UNDEFINE_SOURCE:
            host.delete_definition(domain.name)
