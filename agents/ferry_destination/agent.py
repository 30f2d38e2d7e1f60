"""ferry-destination: every incoming job (Prepare and Finish of migration v3).

Peers reach it over TCP with mutual TLS; operators over a local admin unix
socket.  Prepare parses the XML before anything else, checks the ACL on
what the XML declares, starts ``qemu -incoming defer`` and tells the source
where to send the stream; Finish waits for the stream to land, starts the
CPUs (or kills qemu so the source resumes), and persists when asked.

An incoming migration whose source vanishes (control connection closed,
or no Finish within ``incoming_timeout_s``) is killed and its job cleared,
so nothing is left half-done on this host.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ferry import sdnotify
from ferry.acl import check_access
from ferry.config import AgentConfig
from ferry.daemon import admit_local, authorize_peer_ops, open_admin_socket
from ferry.domain import Domain, check_abi_stability, format_domain, parse_domain
from ferry.errors import (
    ConfigError,
    DomainExists,
    FerryError,
    HookRefused,
    MigrationFailed,
    MigrationRefused,
    MigrationTimeout,
    PhaseError,
)
from ferry.flags import MigrationFlags, MigrationParams
from ferry.host import Host
from ferry.jobs import AsyncJob, Job, JobManager
from ferry.journal import LogContext, MessageID, log_event, read_journal
from ferry.protocol.cookie import Cookie, Graphics, Identity, Statistics
from ferry.protocol.phases import DestinationPhases
from ferry.qemu import QemuProcess, query_migrate, set_caps, set_params
from ferry.rpc import RequestContext, Server, Session, make_hello
from ferry.tls import TLSFiles, server_context
from ferry.tunnel import TokenBook
from ferry.tunnel.accept import PendingChannel
from ferry.tunnel.channel import make_endpoint, name_os_thread
from ferry_destination.tunnel import IncomingTunnel, PeerListener

__all__ = ["DestinationAgent"]

log = logging.getLogger("ferry.destination")

JOB_TIMEOUT = 30.0
HOOK_TIMEOUT = 30.0


@dataclass
class Incoming:
    """One prepared incoming migration."""

    domain: Domain
    job: Job
    proc: QemuProcess
    migration_id: str
    flags: MigrationFlags
    phases: DestinationPhases = field(default_factory=DestinationPhases)
    finishing: bool = False
    watchdog: asyncio.Task[None] | None = None
    tunnel: IncomingTunnel | None = None


class DestinationAgent:
    """The ferry-destination daemon's state and request handlers."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = Host(config, "destination")
        self.jobs = JobManager(
            config.paths.locks_dir, config.paths.status_dir, agent="ferry-destination"
        )
        self.hello = make_hello(config.host.uuid, config.host.name, "destination")
        self.incoming: dict[str, Incoming] = {}
        self.tokens: TokenBook[IncomingTunnel] = TokenBook()
        self._endpoint: Any = None
        self._endpoint_lock = threading.Lock()
        self._background: set[asyncio.Task[None]] = set()

    def handlers(self) -> dict[str, Any]:
        """Ops for peers and the admin socket."""
        return {
            "prepare": self.op_prepare,
            "finish": self.op_finish,
            "journal_query": self.op_journal_query,
            "list": self.op_list,
        }

    # -- life cycle -----------------------------------------------------------

    def _listen_socket(self) -> socket.socket:
        activated = sdnotify.listen_fds()
        if activated:
            log.info("listening on the socket systemd passed (socket activation)")
            return activated[0]
        host, port = self.config.destination.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets
        # whose proto says TCP, and Nagle cost ~40 ms per handshake.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        return sock

    def _tls(self) -> ssl.SSLContext:
        if self.config.tls is None:
            raise ConfigError("[tls] is required: peers are only accepted over mutual TLS")
        tls = self.config.tls
        return server_context(TLSFiles(ca=tls.ca, cert=tls.cert, key=tls.key))

    async def run(self, stop: asyncio.Event) -> None:
        """Start-up, serve until ``stop``, shutdown."""
        self.host.ensure_dirs()
        await self.recover()
        server = Server(self.hello, self.handlers(), max_frame=self.config.max_frame,
                        admit=admit_local(self.config),
                        authorize=authorize_peer_ops(self.config))  # fmt: skip
        ssl_ctx = self._tls()
        tcp = PeerListener(self._listen_socket(), ssl_ctx, self.config,
                           on_control=server.handle_stream, on_data=self._serve_data,
                           endpoint=self._tunnel_endpoint, tokens=self.tokens)  # fmt: skip
        tcp.start()
        admin = await open_admin_socket(
            self.config.destination.admin_socket, self.config.admin_group,
            server.handle_stream, limit=self.config.max_frame * 2,
        )  # fmt: skip
        log_event(log, MessageID.AGENT_READY, "ferry-destination ready")
        sdnotify.ready(self.status_text())
        try:
            await stop.wait()
        finally:
            sdnotify.stopping("ferry-destination stopping")
            await tcp.close()
            admin.close()
            for incoming in list(self.incoming.values()):
                if incoming.tunnel is not None:
                    incoming.tunnel.stop()
            if self._background:
                await asyncio.wait(self._background, timeout=15)
            for session in list(server.sessions):
                await session.close()
            await self.host.close()

    def status_text(self) -> str:
        """STATUS= line: what the agent is doing."""
        tunnelled = sum(1 for inc in self.incoming.values() if inc.tunnel is not None)
        return f"{len(self.incoming)} migration(s) in ({tunnelled} tunnelled)"

    async def recover(self) -> None:
        """After a restart: finish or roll back incoming jobs found in status files.

        A domain still receiving (phase prepare) cannot be resumed (its source
        gave up when our connection broke): kill it.  One whose CPUs already
        run (Finish got that far) is kept; only the job record is cleared.
        """
        for name in self.host.running_names():
            status = self.host.load_status(name)
            if status is None or status.job is None:
                continue
            if status.job.async_job != AsyncJob.MIGRATION_IN:
                continue
            record = status.job
            job = await self.jobs.adopt(status.uuid, name, record)
            try:
                keep = False
                if record.phase == "finish":
                    with contextlib.suppress(FerryError):
                        proc = await self.host.process(name)
                        keep = (await proc.qmp.query_status()).running
                if keep:
                    log.info("incoming %s had finished before the restart; keeping it", name)
                    await self.host.release(name)
                else:
                    log.warning("incoming %s interrupted by a restart: killing it", name)
                    await self.host.kill(name)
            finally:
                await self.jobs.end_async(job)

    # -- prepare --------------------------------------------------------------

    async def op_prepare(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Prepare phase: accept the domain and start qemu waiting for the stream."""
        # The XML first, before anything else looks at the request.
        domain = parse_domain(args["xml"], where="prepare")
        flags = MigrationFlags(args["flags"])
        params = MigrationParams.from_wire(args["params"])
        cookie = Cookie.decode(args["cookie"])
        identity = cookie.identity
        if identity is None:
            raise MigrationRefused("prepare: the source's cookie has no identity section")
        if params.dest_name:
            domain = domain.renamed(params.dest_name)
        check_access(self.config.acl, ctx.subject, "prepare", domain.name, domain.uuid)
        with LogContext(domain=domain.name, uuid=domain.uuid, migration_id=identity.migration_id,
                        phase="prepare", peer=identity.hostname):  # fmt: skip
            if identity.host_uuid == self.config.host.uuid:
                raise MigrationRefused(
                    f"source and destination are the same host (host UUID {identity.host_uuid})",
                    host_uuid=identity.host_uuid,
                )
            if identity.name != domain.name and not params.dest_name:
                raise MigrationRefused(
                    f"domain XML names '{domain.name}' but the cookie names '{identity.name}'"
                )
            if identity.uuid != domain.uuid:
                raise MigrationRefused(
                    f"domain XML has uuid {domain.uuid} but the cookie has {identity.uuid}"
                )
            self._check_free(domain)
            domain = await self._run_hook(domain)
            peer_uri = None
            peername = ctx.session.writer.get_extra_info("peername")
            if isinstance(peername, tuple) and peername:
                # Every host runs both agents on the same port: this is where
                # the source host's journal can be asked for its side.
                addr = _unmapped(str(peername[0]))
                addr = f"[{addr}]" if ":" in addr else addr
                peer_uri = f"ferry://{addr}:{self.config.destination.listen[1]}"
            log_event(log, MessageID.MIGRATION_STARTED, f"prepare: receiving {domain.name} "
                      f"from {identity.hostname}", peer_uri=peer_uri)  # fmt: skip
            job = await self.jobs.begin_async(
                domain.uuid, domain.name, AsyncJob.MIGRATION_IN, flags=int(flags),
                phase="prepare", migration_id=identity.migration_id, timeout=JOB_TIMEOUT,
            )  # fmt: skip
            try:
                sockname = ctx.session.writer.get_extra_info("sockname")
                reached = _unmapped(str(sockname[0])) if isinstance(sockname, tuple) else None
                tunnel = None
                if flags & MigrationFlags.TUNNELLED:
                    channels = 1
                    if flags & MigrationFlags.PARALLEL:
                        channels += params.parallel_connections or 2
                    path = self.config.paths.tunnel_dir / f"{identity.migration_id[:16]}.sock"
                    tunnel = IncomingTunnel(domain.name, path, channels)
                proc, uri = await self._start_incoming(domain, flags, params, reached, tunnel)
            except BaseException:
                await self.jobs.end_async(job)
                raise
            incoming = Incoming(domain, job, proc, identity.migration_id, flags, tunnel=tunnel)
            incoming.phases.advance("prepare")
            self.incoming[domain.name] = incoming
            sdnotify.status(self.status_text())
            incoming.watchdog = asyncio.create_task(self._watchdog(incoming, ctx.session))
            reply = Cookie().with_identity(
                Identity(name=domain.name, uuid=domain.uuid, hostname=self.config.host.name,
                         host_uuid=self.config.host.uuid, migration_id=identity.migration_id)
            )  # fmt: skip
            graphics = await self._graphics(domain, proc, reached)
            if graphics is not None:
                reply = reply.with_graphics(graphics)
            answer: dict[str, Any] = {"uri": uri, "cookie": reply.encode(), "name": domain.name}
            if tunnel is not None:
                token = self.tokens.issue(
                    domain.name, tunnel.channels, self.config.destination.incoming_timeout_s,
                    tunnel, allow_plaintext=self.config.tls is not None
                    and self.config.tls.allow_plaintext_tunnel,
                )  # fmt: skip
                answer["tunnel"] = {"token": token, "channels": tunnel.channels}
            return answer

    def _check_free(self, domain: Domain) -> None:
        status = self.host.load_status(domain.name)
        if status is not None:
            raise DomainExists(
                f"domain '{domain.name}' is already running on host {self.config.host.name}",
                name=domain.name,
            )
        other = self.host.find_uuid(domain.uuid)
        if other is not None and other.active:
            raise DomainExists(
                f"domain with uuid {domain.uuid} is already running here as '{other.domain.name}'"
            )
        persistent = self.host.load_definition(domain.name)
        if persistent is not None and persistent.uuid != domain.uuid:
            raise DomainExists(
                f"domain '{domain.name}' is already defined here with uuid {persistent.uuid}"
            )

    async def _run_hook(self, domain: Domain) -> Domain:
        """The operator's ``migrate`` hook: XML on stdin; output replaces it.

        Argument order follows libvirt's qemu hook (``NAME migrate begin -``).
        """
        hook = self.config.migrate_hook
        if hook is None or not hook.exists():
            return domain
        xml = format_domain(domain)
        proc = await asyncio.create_subprocess_exec(
            str(hook), domain.name, "migrate", "begin", "-",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(xml.encode()), HOOK_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise HookRefused(
                f"migrate hook {hook} did not answer within {HOOK_TIMEOUT:.0f}s"
            ) from None
        if proc.returncode != 0:
            reason = err.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise HookRefused(f"migrate hook {hook} refused the migration: {reason}")
        if not out.strip():
            return domain
        replaced = parse_domain(out, where=f"migrate hook {hook} output")
        check_abi_stability(domain, replaced)
        return replaced

    def _pick_port(self, address: str) -> int:
        first, last = self.config.destination.migration_ports
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in range(first, last + 1):
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address, port))
                except OSError:
                    continue
                return port
        raise MigrationRefused(f"no free migration port in {first}..{last} on {address}")

    async def _start_incoming(
        self,
        domain: Domain,
        flags: MigrationFlags,
        params: MigrationParams,
        reached: str | None = None,
        tunnel: IncomingTunnel | None = None,
    ) -> tuple[QemuProcess, str]:
        """Start the incoming qemu and return it with the URI the source must use.

        ``reached`` is the local address the source's control connection
        arrived on: when qemu listens on a wildcard address, that is the
        address the source can certainly reach, so it goes into the URI.
        """
        address = self.config.destination.migration_address
        port: int | None = None
        if tunnel is None:
            if params.migrate_uri:
                address, port = _parse_tcp_uri(params.migrate_uri, address)
            if port is None:
                port = self._pick_port(address)
        proc = await self.host.start(domain, incoming=True)
        try:
            caps = {"events": True, "multifd": bool(flags & MigrationFlags.PARALLEL)}
            await set_caps(proc.qmp, caps)
            if flags & MigrationFlags.PARALLEL:
                await set_params(proc.qmp, {"multifd-channels": params.parallel_connections or 2})
            if tunnel is not None:
                # Only ferry-destination can reach this socket; the source
                # agent gets a token instead of a URI.
                tunnel.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with contextlib.suppress(FileNotFoundError):
                    tunnel.path.unlink()
                await proc.qmp.execute("migrate-incoming", {"uri": tunnel.uri})
                return proc, "tunnel"
            host = f"[{address}]" if ":" in address else address
            await proc.qmp.execute("migrate-incoming", {"uri": f"tcp:{host}:{port}"})
            advertised = _advertised(address, reached)
            advertised = f"[{advertised}]" if ":" in advertised else advertised
            uri = f"tcp:{advertised}:{port}"
        except BaseException:
            await self.host.kill(domain.name)
            raise
        return proc, uri

    async def _graphics(
        self, domain: Domain, proc: QemuProcess, reached: str | None = None
    ) -> Graphics | None:
        """The graphics port and address clients must use here (for the cookie).

        A wildcard listen address is no address a client can connect to:
        like libvirt, advertise the address the source reached us on.
        """
        if not domain.graphics:
            return None
        g = domain.graphics[0]
        port = g.port if g.port and g.port > 0 else None
        if g.type == "vnc":
            with contextlib.suppress(FerryError):
                info = await proc.qmp.execute("query-vnc")
                if isinstance(info, dict) and info.get("service"):
                    port = int(info["service"])
        listen = _advertised(g.listen or self.config.destination.migration_address, reached)
        return Graphics(type=g.type, port=port or 0, tls_port=g.tls_port, listen=listen)

    async def _watchdog(self, incoming: Incoming, session: Session) -> None:
        """Kill an incoming qemu whose source went away or never finished."""
        name = incoming.domain.name
        timeout = self.config.destination.incoming_timeout_s
        closed = asyncio.create_task(session.wait_closed())
        try:
            done, _ = await asyncio.wait({closed}, timeout=timeout)
            if incoming.finishing:
                return
            reason = (
                "the source's connection closed before Finish"
                if done
                else f"no Finish within {timeout:.0f}s"
            )
            log_event(log, MessageID.MIGRATION_ABORTED,
                      f"incoming {name}: {reason}; killing the incoming qemu",
                      domain=name, migration_id=incoming.migration_id,
                      level=logging.WARNING)  # fmt: skip
            await self._discard(incoming)
        finally:
            closed.cancel()

    async def _discard(self, incoming: Incoming) -> None:
        name = incoming.domain.name
        if self.incoming.get(name) is not incoming:
            return
        self.incoming.pop(name, None)
        sdnotify.status(self.status_text())
        with contextlib.suppress(FerryError, PhaseError):
            incoming.phases.abort()
        try:
            await self.host.kill(name)
        finally:
            await self._end_tunnel(incoming, drain=False)
            await self.jobs.end_async(incoming.job)

    # -- finish ---------------------------------------------------------------

    async def op_finish(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Finish phase: wait for the stream, start the CPUs or give up."""
        name = args["name"]
        incoming = self.incoming.get(name)
        if incoming is None:
            phases = DestinationPhases()
            phases.advance("finish")  # raises PhaseError naming both phases
            raise PhaseError(f"no prepared incoming migration for domain '{name}'")
        check_access(self.config.acl, ctx.subject, "finish", name, incoming.domain.uuid)
        incoming.phases.advance("finish", cancelled=args["cancelled"])
        incoming.finishing = True
        if incoming.watchdog is not None:
            incoming.watchdog.cancel()
        flags = MigrationFlags(args["flags"])
        params = MigrationParams.from_wire(args["params"])
        with LogContext(domain=name, uuid=incoming.domain.uuid,
                        migration_id=incoming.migration_id, phase="finish"):  # fmt: skip
            incoming.job.phase = "finish"
            if args["cancelled"]:
                log_event(log, MessageID.MIGRATION_ABORTED,
                          f"finish: source cancelled; discarding incoming {name}")  # fmt: skip
                await self._discard(incoming)
                return {"name": name, "cookie": Cookie().encode()}
            try:
                stats = await self._wait_incoming(incoming)
                # The source released its leases at switchover; we take them
                # before any CPU of ours can write.
                await self.host.acquire_leases(incoming.domain, incoming.proc)
                await self._start_cpus(incoming, flags)
                if flags & MigrationFlags.PERSIST_DEST:
                    persist = incoming.domain
                    if params.persist_xml:
                        persist = parse_domain(params.persist_xml, where="persist_xml")
                        if params.dest_name:
                            persist = persist.renamed(params.dest_name)
                    self.host.save_definition(persist)
            except BaseException as exc:
                log_event(log, MessageID.MIGRATION_FAILED,
                          f"finish failed for {name}: {exc}; killing the incoming qemu",
                          level=logging.ERROR)  # fmt: skip
                await self._discard(incoming)
                if isinstance(exc, FerryError):
                    raise MigrationFailed(f"destination could not finish: {exc}") from exc
                raise
            status = self.host.load_status(name)
            if status is not None:
                status.run_state = "paused" if flags & MigrationFlags.PAUSED else "running"
                self.host.save_status(status)
            self.incoming.pop(name, None)
            sdnotify.status(self.status_text())
            await self.jobs.end_async(incoming.job)
            if incoming.tunnel is not None:
                # The relays end by themselves once both qemus closed the
                # stream; Finish need not wait for that.
                task = asyncio.create_task(self._end_tunnel(incoming, drain=True))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            # ferry-source of this host manages the domain from now on.
            await self.host.release(name)
            log_event(log, MessageID.MIGRATION_COMPLETED,
                      f"finish: {name} now runs here on {self.config.host.name}")  # fmt: skip
            reply = Cookie().with_statistics(Statistics(values=stats))
            return {"name": name, "cookie": reply.encode(), "host": self.config.host.name}

    async def _end_tunnel(self, incoming: Incoming, *, drain: bool) -> None:
        tunnel = incoming.tunnel
        if tunnel is None:
            return
        self.tokens.revoke(incoming.domain.name)
        await tunnel.close(drain=drain)

    def _tunnel_endpoint(self) -> Any:
        """The TLS endpoint of data connections, made on first use (certificates read once)."""
        with self._endpoint_lock:
            if self._endpoint is None:
                assert self.config.tls is not None
                self._endpoint = make_endpoint(self.config.tls, server=True)
            return self._endpoint

    def _serve_data(self, pending: PendingChannel) -> None:
        """Thread: an authenticated tunnel data connection: connect it to qemu, relay."""
        name_os_thread()
        try:
            channel, grant, local = pending.complete(
                lambda grant, index: grant.sink.connect_qemu(index)
            )
        except FerryError as exc:
            log.warning("tunnel data connection refused: %s", exc)
            return
        tunnel = grant.sink
        tunnel.set.adopt_current_thread()
        tunnel.set.carry(channel, local)

    async def _wait_incoming(self, incoming: Incoming) -> dict[str, int | float]:
        """Wait until qemu has received the whole stream."""
        deadline = time.monotonic() + self.config.destination.incoming_timeout_s
        proc = incoming.proc
        while True:
            stats = await query_migrate(proc.qmp)
            if stats.status == "completed":
                break
            if stats.status in ("failed", "cancelled"):
                raise MigrationFailed(
                    f"incoming migration {stats.status}: {stats.error_desc or 'no reason given'}"
                )
            run = await proc.qmp.query_status()
            if run.status not in ("inmigrate", "prelaunch") and stats.status == "none":
                # Some qemu versions forget the incoming state once done.
                break
            if time.monotonic() > deadline:
                raise MigrationTimeout("the incoming migration did not complete in time")
            await asyncio.sleep(0.005)
        return {"received_ms": int(time.time() * 1000)}

    async def _start_cpus(self, incoming: Incoming, flags: MigrationFlags) -> None:
        if flags & MigrationFlags.PAUSED:
            return
        if self.config.testing.fail_cpu_start:
            raise MigrationFailed(
                "starting the CPUs failed (fault injected: [testing] fail_cpu_start)"
            )
        await incoming.proc.qmp.execute("cont")

    # -- admin ----------------------------------------------------------------

    async def op_list(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """Incoming migrations in progress."""
        return {
            "domains": [
                {"name": name, "state": "incoming", "phase": inc.phases.current, "id": inc.proc.pid,
                 "uuid": inc.domain.uuid, "persistent": False}
                for name, inc in self.incoming.items()
            ]
        }  # fmt: skip

    async def op_journal_query(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """This host's journal entries of one migration or domain."""
        check_access(self.config.acl, ctx.subject, "journal_query", args.get("domain"))
        entries = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: read_journal(
                migration_id=args["migration_id"], domain=args["domain"], since=args["since"]
            ),
        )
        return {"entries": entries, "host": self.config.host.name}


def _parse_tcp_uri(uri: str, default_host: str) -> tuple[str, int | None]:
    """``tcp:HOST[:PORT]`` or ``tcp://HOST[:PORT]`` → (host, port)."""
    rest = uri
    for prefix in ("tcp://", "tcp:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    else:
        raise MigrationRefused(f"migrate URI {uri!r}: only tcp:HOST[:PORT] is supported")
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    host = host or default_host
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MigrationRefused(f"migrate URI {uri!r}: bad port {port_text!r}")
        return host, int(port_text)
    return host, None


def _advertised(address: str, reached: str | None) -> str:
    """The address to give a peer for something listening on ``address`` here.

    A wildcard (or empty) address is nothing a peer can connect to; the
    address the source's control connection ``reached`` certainly is.
    """
    if address.strip("[]") in ("", "0.0.0.0", "::") and reached:
        return reached
    return address


def _unmapped(address: str) -> str:
    """``::ffff:a.b.c.d`` (an IPv4 peer on a dual-stack socket) as ``a.b.c.d``.

    Certificates name the IPv4 address, so a URI built from the mapped form
    would fail the peer's name check.
    """
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return address
