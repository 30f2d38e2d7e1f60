"""The state of one outgoing migration, shared by its phases and the admin ops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ferry.domain import Domain
from ferry.errors import FerryError
from ferry.flags import MigrationFlags, MigrationParams
from ferry.jobs import Job
from ferry.journal import LogContext
from ferry.protocol.phases import SourcePhases
from ferry.qemu import QemuProcess
from ferry.rpc import Session
from ferry.steering import Steering
from ferry_source.tunnel import SourceTunnel

__all__ = ["Outgoing"]


@dataclass
class Outgoing:
    """One outgoing migration: set up by Begin, read by job_info and job_abort."""

    domain: Domain
    migration_id: str
    flags: MigrationFlags
    params: MigrationParams
    host: str
    port: int
    phases: SourcePhases = field(default_factory=SourcePhases)
    progress: dict[str, Any] = field(default_factory=dict)
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    abort_reason: str = "aborted on request"
    job: Job | None = None
    proc: QemuProcess | None = None
    was_running: bool = True
    set_downtime: Callable[[int], None] | None = None
    warned: bool = False
    lease_handover: bool = False
    leases_released: bool = False
    tunnel: SourceTunnel | None = None
    #: --tunnelled --copy-storage-*: where qemu's NBD clients connect (the
    #: disks' channels of the same tunnel).
    disk_tunnel: SourceTunnel | None = None
    #: What the disks' channels carried (kept when their tunnel closes).
    disk_tunnel_bytes: int = 0
    #: How the disks travel: "nbd-tls", "nbd-plain" or "tunnel".
    disk_transport: str = ""
    session: Session | None = None
    dest_name: str = ""
    #: p2p: the snapshot metadata may move (ferry_source.snapshot_move), so
    #: Begin does not refuse a domain that has some.
    carry_snapshots: bool = False
    #: True once qemu was told to migrate (the destination may hold the state).
    migrate_sent: bool = False
    #: Why the destination ended its side, when it did so on its own.
    peer_reason: str = ""
    #: The destination's host name (from Prepare's cookie; its address until then).
    peer_name: str = ""
    # Set (from a relay thread, through the loop) when the tunnel broke.
    failure: FerryError | None = None
    #: When the migrate request arrived: the controller's deadline counts from here.
    started_at: float = field(default_factory=time.monotonic)
    #: "" before any switch; "requested" once migrate-start-postcopy was sent
    #: (recorded first); "active" once qemu runs in post-copy.  From
    #: "requested" on the source never resumes.
    postcopy: str = ""
    #: The in-flight levers (post-copy requests, timeout, controller); see steer().
    steering: Steering | None = None
    #: The pre-flight verdict shown at the top and fed to the controller.
    preflight: Any = None
    #: Client-driven mode: the :class:`~ferry_source.client_driven.ClientLink`
    #: that ties the migration to its client's connection (None in p2p).
    client: Any = None
    #: --copy-storage-*: the disks Begin planned to copy (ferry.storage_copy.DiskCopy).
    storage: list[Any] = field(default_factory=list)
    #: The mirror jobs and NBD client nodes made in qemu (removed on any end).
    mirror_jobs: list[str] = field(default_factory=list)
    mirror_nodes: list[str] = field(default_factory=list)
    #: Bytes the disks' mirrors copied (shown with the memory's progress).
    disk_bytes: int = 0

    def steer(self) -> Steering:
        """The migration's :class:`~ferry.steering.Steering`, made on first use."""
        if self.steering is None:
            self.steering = Steering(self.flags, self.params, self.domain.memory_kib * 1024,
                                     preflight=self.preflight)  # fmt: skip
        return self.steering

    def log_context(self) -> LogContext:
        """The journal fields of everything logged for this migration."""
        return LogContext(domain=self.name, uuid=self.domain.uuid,
                          migration_id=self.migration_id, peer=self.host)  # fmt: skip

    def may_finish_after_failure(self) -> bool:
        """After a failed Perform: may the destination still finish?  Only when
        our qemu died after the stream started: its copy is the only one left."""
        return self.migrate_sent and self.proc is not None and not self.proc.alive()

    @property
    def name(self) -> str:
        """The domain's name on this host."""
        return self.domain.name

    @property
    def peer(self) -> str:
        """What to call the destination in messages: its host name once known."""
        return self.peer_name or self.host

    @property
    def peer_uri(self) -> str:
        """The destination agent, as a ``ferry://`` URI."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ferry://{host}:{self.port}"

    async def close_tunnels(self) -> None:
        """Stop the tunnel of the stream and of the disks, if any (an ending migration)."""
        for tunnel in (self.disk_tunnel, self.tunnel):
            if tunnel is not None:
                await tunnel.close(drain=False)

    async def end_tunnel(self, *, drain: bool) -> dict[str, Any]:
        """Close the stream's tunnel (``drain``: let it finish first); its figures for the
        result: bytes sent (the disks' channels included), channels, mode. Empty
        when the migration is not tunnelled."""
        if self.tunnel is None:
            return {}
        await self.tunnel.close(drain=drain)
        sent, _ = self.tunnel.bytes()
        figures: dict[str, Any] = {
            "tunnel_bytes": sent + self.disk_tunnel_bytes,
            "tunnel_channels": len(self.tunnel.set.opened),
            "tunnel_mode": self.tunnel.mode,
        }
        if self.disk_tunnel_bytes:
            figures["tunnel_disk_bytes"] = self.disk_tunnel_bytes
        return figures
