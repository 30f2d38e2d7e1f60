"""Dst Prepare: accept the domain and start qemu waiting for the stream.

The XML is parsed before anything else looks at the request, the ACL is
checked on what it declares, and the migration's outcome record
(``prepared``) is written before any qemu exists, so the source's question
"what became of migration X?" always finds it.

Prepare called by a client (an operator certificate, ferryctl driving a
client-driven migration) rather than by the source host's agent makes the
migration client-driven: its watchdog gives a closed client connection a
grace (:class:`~ferry_destination.incoming.Binding`), the reply is kept for
a client that takes it over (``adopt_incoming``), and its tunnel token is
for the source host named in the cookie, never for the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from ferry.acl import check_access
from ferry.cpu_probe import check_guest_cpu
from ferry.domain import Domain, check_abi_stability, format_domain, parse_domain
from ferry.errors import (
    CpuIncompatible,
    DomainExists,
    FerryError,
    HookRefused,
    MigrationRefused,
)
from ferry.flags import MigrationFlags, MigrationParams
from ferry.host import free_port
from ferry.jobs import AsyncJob
from ferry.journal import LogContext, MessageID, log_event
from ferry.netdev import host_networks
from ferry.outcomes import FAILED, PREPARED, valid_migration_id
from ferry.protocol.cookie import Cookie, Graphics, Identity, Nbd
from ferry.qemu import QemuProcess, set_caps, set_params
from ferry.qemu.settings import destination_settings
from ferry.rpc import RequestContext
from ferry.storage_copy import DiskCopy
from ferry.storage_policy import check_domain
from ferry.uri import split_authority
from ferry_destination.context import DestinationContext
from ferry_destination.incoming import Binding, Incoming, watchdog
from ferry_destination.nbd_export import (
    check_plan,
    create_images,
    record_created,
    remove_images,
    start_nbd,
    start_nbd_unix,
)
from ferry_destination.tunnel import IncomingTunnel, issue_token, redeemer_for

__all__ = ["listen_uri", "prepare", "unmapped"]

log = logging.getLogger("ferry.destination")

JOB_TIMEOUT = 30.0
HOOK_TIMEOUT = 30.0


async def prepare(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Prepare phase: accept the domain and start qemu waiting for the stream."""
    # The XML first, before anything else looks at the request (with the
    # networks this host maps: one it does not is refused with the setting).
    domain = parse_domain(args["xml"], where="prepare", networks=host_networks(dst.config))
    flags = MigrationFlags(args["flags"])
    params = MigrationParams.from_wire(args["params"])
    cookie = Cookie.decode(args["cookie"])
    identity = cookie.identity
    if identity is None:
        raise MigrationRefused("prepare: the source's cookie has no identity section")
    if not valid_migration_id(identity.migration_id):
        raise MigrationRefused(
            f"prepare: migration id {identity.migration_id!r} is not 1..64 hex digits"
        )
    if params.dest_name:
        domain = domain.renamed(params.dest_name)
    check_access(dst.config.acl, ctx.subject, "prepare", domain.name, domain.uuid)
    check_domain(domain, dst.config, where="prepare")  # name fits, paths within [storage]
    with LogContext(domain=domain.name, uuid=domain.uuid, migration_id=identity.migration_id,
                    phase="prepare", peer=identity.hostname):  # fmt: skip
        if identity.host_uuid == dst.config.host.uuid:
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
        if flags & MigrationFlags.OFFLINE:
            from ferry_destination.offline import prepare_offline  # it imports this module

            return await prepare_offline(dst, domain, identity)
        _check_free(dst, domain)
        domain = await _run_hook(dst, domain)
        # Before any job or qemu: can this host run the guest's CPU exactly?
        try:
            domain = await check_guest_cpu(domain, cookie.cpu, dst.config.qemu.binary)
        except CpuIncompatible as exc:
            # The operator of this host sees why it said no, not only the source's.
            log_event(log, MessageID.MIGRATION_REFUSED, f"prepare: refused {domain.name}: {exc}",
                      level=logging.WARNING, result=exc.code)  # fmt: skip
            raise
        # Anyone but the source host's agent is a client driving the migration.
        client_driven = ctx.subject.kind != "peer"
        peer_uri = None
        peername = ctx.session.writer.get_extra_info("peername")
        if not client_driven and isinstance(peername, tuple) and peername:
            # Every host runs both agents on the same port: this is where
            # the source host's journal can be asked for its side.
            addr = unmapped(str(peername[0]))
            addr = f"[{addr}]" if ":" in addr else addr
            peer_uri = f"ferry://{addr}:{dst.config.destination.listen[1]}"
        driver = f" (client-driven by {ctx.subject.describe()})" if client_driven else ""
        log_event(log, MessageID.MIGRATION_STARTED, f"prepare: receiving {domain.name} "
                  f"from {identity.hostname}{driver}", peer_uri=peer_uri)  # fmt: skip
        job = await dst.jobs.begin_async(
            domain.uuid, domain.name, AsyncJob.MIGRATION_IN, flags=int(flags),
            phase="prepare", migration_id=identity.migration_id, timeout=JOB_TIMEOUT,
        )  # fmt: skip
        try:
            # Durable before any qemu exists: the outcome question always
            # finds this migration, whatever happens next.
            dst.outcomes.record(identity.migration_id, PREPARED, domain=domain.name,
                                uuid=domain.uuid, source_host=identity.hostname)  # fmt: skip
            sockname = ctx.session.writer.get_extra_info("sockname")
            reached = unmapped(str(sockname[0])) if isinstance(sockname, tuple) else None
            tunnel = None
            if flags & MigrationFlags.TUNNELLED:
                channels = 1
                if flags & MigrationFlags.PARALLEL:
                    channels += params.parallel_connections or 2
                path = dst.config.paths.tunnel_dir / f"{identity.migration_id[:16]}.sock"
                tunnel = IncomingTunnel(domain.name, path, channels)
            # --copy-storage-*: the images exist (made here) before qemu opens them.
            copies = check_plan(domain, cookie.storage) if cookie.storage is not None else []
            created = await create_images(dst, domain, copies) if copies else []
            nbd: Nbd | None = None
            try:
                proc, uri = await _start_incoming(dst, domain, flags, params, reached, tunnel)
                if copies:
                    client = redeemer_for(ctx.subject, identity.hostname)
                    try:
                        if client is None:
                            raise MigrationRefused("prepare: no source host certificate name "
                                                   "to admit to the disks' NBD server")
                        if tunnel is not None:
                            nbd = await _export_disks_tunnelled(proc, domain, copies, tunnel)
                        else:
                            plaintext = bool(cookie.storage is not None
                                             and cookie.storage.plaintext_ok)
                            nbd = await _export_disks(dst, proc, domain, copies, client,
                                                      params, reached, plaintext)  # fmt: skip
                        record_created(dst, domain.name, created)
                    except BaseException:
                        await dst.host.kill(domain.name)
                        raise
            except BaseException:
                remove_images(created)
                raise
        except BaseException as exc:
            with contextlib.suppress(FerryError):
                dst.outcomes.record(identity.migration_id, FAILED, domain=domain.name,
                                    uuid=domain.uuid, reason=f"prepare failed: {exc}",
                                    source_host=identity.hostname)  # fmt: skip
            await dst.jobs.end_async(job)
            raise
        binding = Binding(ctx.session, client_driven=client_driven,
                          grace_s=dst.config.migration.client_grace_s)  # fmt: skip
        incoming = Incoming(domain, job, proc, identity.migration_id, flags,
                            source_host=identity.hostname, tunnel=tunnel,
                            binding=binding, created_images=created)  # fmt: skip
        incoming.phases.advance("prepare")
        dst.incoming[domain.name] = incoming
        dst.notify_status()
        incoming.watchdog = asyncio.create_task(watchdog(dst, incoming))
        reply = Cookie().with_identity(
            Identity(name=domain.name, uuid=domain.uuid, hostname=dst.config.host.name,
                     host_uuid=dst.config.host.uuid, migration_id=identity.migration_id)
        )  # fmt: skip
        graphics = await _graphics(dst, domain, proc, reached)
        if graphics is not None:
            reply = reply.with_graphics(graphics)
        if nbd is not None:
            reply = reply.with_section(Nbd.SECTION, nbd.to_wire())
        answer: dict[str, Any] = {"uri": uri, "cookie": reply.encode(), "name": domain.name}
        if client_driven:
            # Kept without the token (a credential): a client taking over
            # gets a fresh one if the old one is still unused.
            incoming.answer = dict(answer)
        if tunnel is not None:
            redeemer = redeemer_for(ctx.subject, identity.hostname)
            token = issue_token(dst, tunnel, redeemer)
            answer["tunnel"] = {"token": token, "channels": tunnel.channels}
        if dst.faults.hit("dst.prepare") == "drop-reply":
            ctx.session.writer.transport.abort()
        return answer


def _check_free(dst: DestinationContext, domain: Domain) -> None:
    status = dst.host.load_status(domain.name)
    if status is not None:
        raise DomainExists(
            f"domain '{domain.name}' is already running on host {dst.config.host.name}",
            name=domain.name,
        )
    other = dst.host.find_uuid(domain.uuid)
    if other is not None and other.active:
        raise DomainExists(
            f"domain with uuid {domain.uuid} is already running here as '{other.domain.name}'"
        )
    persistent = dst.host.load_definition(domain.name)
    if persistent is not None and persistent.uuid != domain.uuid:
        raise DomainExists(
            f"domain '{domain.name}' is already defined here with uuid {persistent.uuid}"
        )


async def _run_hook(dst: DestinationContext, domain: Domain) -> Domain:
    """The operator's ``migrate`` hook: XML on stdin; output replaces it.

    Argument order follows libvirt's qemu hook (``NAME migrate begin -``).
    """
    hook = dst.config.migrate_hook
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


async def _export_disks_tunnelled(
    proc: QemuProcess, domain: Domain, copies: list[DiskCopy], tunnel: IncomingTunnel
) -> Nbd:
    """--tunnelled: the NBD server on a unix socket beside the tunnel's; disk ``i`` is
    the tunnel's channel ``tunnel.channels + i``."""
    path = tunnel.path.with_name(tunnel.path.stem + "-nbd.sock")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    tunnel.carry_disks(path, len(copies))
    return await start_nbd_unix(proc, domain, copies, str(path), tunnel.channels)


async def _export_disks(
    dst: DestinationContext, proc: QemuProcess, domain: Domain, copies: list[DiskCopy],
    client: str, params: MigrationParams, reached: str | None, source_plaintext_ok: bool,
) -> Nbd:
    """Start the incoming qemu's NBD server for the copied disks (--disks-port, --disks-uri).

    TLS unless both hosts' configs allow plaintext NBD (the source says so
    in its plan; this host's ``[tls] allow_plaintext_nbd``).
    """
    tls_config = dst.config.tls
    plaintext = source_plaintext_ok and tls_config is not None and tls_config.allow_plaintext_nbd
    address = dst.config.destination.migration_address
    port: int | None = params.disks_port
    if params.disks_uri:
        address, port = _parse_tcp_uri(params.disks_uri, address, what="disks URI")
    if port is None:
        port = _pick_port(dst, address)
    advertised = _advertised(address, reached)
    return await start_nbd(dst, proc, domain, copies, client=client, address=address, port=port,
                           advertised=advertised, tls=not plaintext)  # fmt: skip


def _pick_port(dst: DestinationContext, address: str) -> int:
    first, last = dst.config.destination.migration_ports
    port = free_port(address, first, last)
    if port is None:
        raise MigrationRefused(f"no free migration port in {first}..{last} on {address}")
    return port


async def _start_incoming(
    dst: DestinationContext,
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
    address = dst.config.destination.migration_address
    port: int | None = None
    if tunnel is None:
        if params.migrate_uri:
            address, port = _parse_tcp_uri(params.migrate_uri, address)
        if port is None:
            port = _pick_port(dst, address)
    proc = await dst.host.start(domain, incoming=True)
    try:
        settings = destination_settings(flags, params)
        await set_caps(proc.qmp, settings.caps)
        await set_params(proc.qmp, settings.params)
        if tunnel is not None:
            # Only ferry-destination can reach this socket; the source
            # agent gets a token instead of a URI.
            tunnel.make_room()
            await proc.qmp.execute("migrate-incoming", {"uri": tunnel.uri})
            return proc, "tunnel"
        assert port is not None
        listen, uri = _tcp_uris(address, port, reached)
        await proc.qmp.execute("migrate-incoming", {"uri": listen})
    except BaseException:
        await dst.host.kill(domain.name)
        raise
    return proc, uri


def _tcp_uris(address: str, port: int, reached: str | None) -> tuple[str, str]:
    """(what qemu listens on, what the source is told to connect to)."""
    host = f"[{address}]" if ":" in address else address
    advertised = _advertised(address, reached)
    advertised = f"[{advertised}]" if ":" in advertised else advertised
    return f"tcp:{host}:{port}", f"tcp:{advertised}:{port}"


def listen_uri(dst: DestinationContext, ctx: RequestContext) -> tuple[str, str]:
    """A fresh migration port for a resumed post-copy stream: (listen URI, URI for the source)."""
    address = dst.config.destination.migration_address
    sockname = ctx.session.writer.get_extra_info("sockname")
    reached = unmapped(str(sockname[0])) if isinstance(sockname, tuple) else None
    return _tcp_uris(address, _pick_port(dst, address), reached)


async def _graphics(
    dst: DestinationContext, domain: Domain, proc: QemuProcess, reached: str | None = None
) -> Graphics | None:
    """The graphics ports and address clients must use here (for the cookie).

    The ports are those the host chose at start (autoport) or the XML's.
    A wildcard listen address is no address a client can connect to:
    like libvirt, advertise the address the source reached us on.
    """
    if not domain.graphics:
        return None
    g = domain.graphics[0]
    recorded = dst.host.graphics(domain.name)
    first = recorded[0] if recorded else {}
    recorded_port, recorded_tls = first.get("port"), first.get("tls_port")
    port = recorded_port if isinstance(recorded_port, int) else None
    tls_port = recorded_tls if isinstance(recorded_tls, int) else None
    if port is None and g.port and g.port > 0:
        port = g.port
    if tls_port is None and g.tls_port and g.tls_port > 0:
        tls_port = g.tls_port
    if g.type == "vnc" and port is None:
        with contextlib.suppress(FerryError):
            info = await proc.qmp.execute("query-vnc")
            if isinstance(info, dict) and info.get("service"):
                port = int(info["service"])
    address = first.get("listen")
    if not isinstance(address, str):
        address = g.listen or dst.config.graphics.listen
    listen = _advertised(address, reached)
    return Graphics(type=g.type, port=port or 0, tls_port=tls_port, listen=listen)


def _parse_tcp_uri(
    uri: str, default_host: str, *, what: str = "migrate URI"
) -> tuple[str, int | None]:
    """``tcp:HOST[:PORT]`` or ``tcp://HOST[:PORT]`` → (host, port)."""
    rest = uri
    for prefix in ("tcp://", "tcp:"):
        if rest.startswith(prefix):
            rest = rest[len(prefix) :]
            break
    else:
        raise MigrationRefused(f"{what} {uri!r}: only tcp:HOST[:PORT] is supported")
    host, port_text = split_authority(rest)
    host = host or default_host
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MigrationRefused(f"{what} {uri!r}: bad port {port_text!r}")
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


def unmapped(address: str) -> str:
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
