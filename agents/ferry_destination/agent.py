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
import dataclasses
import functools
import logging
import socket
import ssl
import threading
from typing import Any

from ferry import sdnotify
from ferry.acl import check_access
from ferry.config import AgentConfig
from ferry.daemon import admit_local, authorize_peer_ops, open_admin_socket
from ferry.errors import ConfigError, FerryError
from ferry.faults import Faults, parse_faults
from ferry.fences import FenceBook
from ferry.host import Host
from ferry.jobs import JobManager
from ferry.journal import MessageID, log_event, read_journal
from ferry.outcomes import OutcomeBook
from ferry.rpc import RequestContext, Server, make_hello
from ferry.tls import TLSFiles, server_context
from ferry.tunnel import TokenBook
from ferry.tunnel.accept import PendingChannel
from ferry.tunnel.channel import make_endpoint, name_os_thread
from ferry_destination.adopt import adopt_incoming
from ferry_destination.context import DestinationContext
from ferry_destination.finish import finish
from ferry_destination.outcome import migration_outcome, migration_progress
from ferry_destination.postcopy import postcopy_recover
from ferry_destination.prepare import prepare
from ferry_destination.probe import link_probe
from ferry_destination.recovery import recover_incoming
from ferry_destination.snapshot_move import migration_snapshots
from ferry_destination.tunnel import IncomingTunnel, PeerListener

__all__ = ["DestinationAgent"]

log = logging.getLogger("ferry.destination")



class DestinationAgent:
    """The ferry-destination daemon's state and request handlers."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.host = Host(config, "destination")
        self.jobs = JobManager(
            config.paths.locks_dir, config.paths.jobs_dir, agent="ferry-destination"
        )
        self.hello = make_hello(config.host.uuid, config.host.name, "destination")
        if config.testing.without_features:
            self.hello = dataclasses.replace(self.hello, features=self.hello.features
                                             - frozenset(config.testing.without_features))
        self.tokens: TokenBook[IncomingTunnel] = TokenBook()
        self._endpoint: Any = None
        self._endpoint_lock = threading.Lock()
        self.ctx = DestinationContext(
            config=config, host=self.host, jobs=self.jobs,
            outcomes=OutcomeBook(config.paths.outcomes_dir, config.migration.outcome_retention_s),
            fences=FenceBook(config.paths.fences_dir), tokens=self.tokens,
            faults=Faults(parse_faults(config.testing.faults)),
            notify_status=self._notify_status,
        )  # fmt: skip
        # Shared with the phases: the migrations in flight.
        self.incoming = self.ctx.incoming
        self._background = self.ctx.background

    def handlers(self) -> dict[str, Any]:
        """Ops for peers and the admin socket."""
        return {
            "prepare": functools.partial(prepare, self.ctx),
            "finish": functools.partial(finish, self.ctx),
            "migration_outcome": functools.partial(migration_outcome, self.ctx),
            "migration_snapshots": functools.partial(migration_snapshots, self.ctx),
            "migration_progress": functools.partial(migration_progress, self.ctx),
            "postcopy_recover": functools.partial(postcopy_recover, self.ctx),
            "adopt_incoming": functools.partial(adopt_incoming, self.ctx),
            "link_probe": functools.partial(link_probe, self.ctx),
            "journal_query": self.op_journal_query,
            "list": self.op_list,
            "agent_state": self.op_agent_state,
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
        # Decided before we serve: a source asking for an outcome gets the
        # settled answer, never a half-recovered one.
        await recover_incoming(self.ctx)
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

    def _notify_status(self) -> None:
        sdnotify.status(self.status_text())

    def status_text(self) -> str:
        """STATUS= line: what the agent is doing."""
        tunnelled = sum(1 for inc in self.incoming.values() if inc.tunnel is not None)
        return f"{len(self.incoming)} migration(s) in ({tunnelled} tunnelled)"

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

    async def op_agent_state(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """What this agent holds: jobs, incoming migrations, live tokens (diagnostics)."""
        check_access(self.config.acl, ctx.subject, "agent_state", None)
        return {
            "agent": "ferry-destination",
            "host": self.config.host.name,
            "jobs": [{"name": f.name, "uuid": f.uuid, **f.job.to_dict()}
                     for f in self.jobs.recorded()],
            "incoming": [{"name": name, "migration_id": inc.migration_id,
                          "phase": inc.phases.current} for name, inc in self.incoming.items()],
            "tokens": len(self.tokens),
            "offline": self.ctx.offline.describe(),
            "outcomes": [vars(o) for o in self.ctx.outcomes.all()],
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
