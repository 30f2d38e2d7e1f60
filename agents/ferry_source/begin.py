"""Src Begin: checks, the MIGRATION_OUT job, the XML and cookie for Prepare."""

from __future__ import annotations

import logging

from ferry.cpu_probe import source_cpu
from ferry.domain import Domain, check_abi_stability, format_domain, parse_domain
from ferry.domain.argv import unplaced_sockets
from ferry.errors import DomainState
from ferry.fences import POSTCOPY
from ferry.flags import MigrationFlags, MigrationParams, flag_names
from ferry.jobs import AsyncJob
from ferry.journal import MessageID, log_event
from ferry.protocol.cookie import Cookie, Identity, LockState, Persistent, StorageCopy
from ferry_source.checks import check_io_error, is_allowed
from ferry_source.context import Emit, SourceContext
from ferry_source.mirror import copied_targets, copy_mode, plan_storage
from ferry_source.outgoing import Outgoing

__all__ = ["JOB_TIMEOUT", "begin", "destination_xml"]

log = logging.getLogger("ferry.source.migration")

JOB_TIMEOUT = 30.0


def destination_xml(domain: Domain, params: MigrationParams) -> Domain:
    """The definition the destination gets: ``domain``, or ``--xml`` once it is
    checked to present the same virtual hardware (a rename only with ``--dname``)."""
    if not params.dest_xml:
        return domain
    supplied = parse_domain(params.dest_xml, where="--xml")
    check_abi_stability(domain, supplied, allow_rename=bool(params.dest_name))
    return supplied


async def begin(ctx: SourceContext, out: Outgoing, emit: Emit) -> tuple[Cookie, str]:
    """Check the migration, take the job, and return (cookie, XML) for Prepare.

    On return ``out.job`` is held; the caller ends it (Confirm, or on error).
    Nothing of the domain has changed yet.

    Raises:
        MigrationRefused, DomainState, ABIError, JobBusy: the migration is refused.
    """
    if out.flags & MigrationFlags.OFFLINE:
        from ferry_source.offline import begin_offline  # it imports this module

        return await begin_offline(ctx, out, emit)
    domain, flags, params = out.domain, out.flags, out.params
    out.phases.advance("begin")
    emit("phase", {"phase": "begin", "migration_id": out.migration_id})
    fence = ctx.fences.get(domain.uuid)
    if fence is not None:
        how = f"ferryctl migrate-recover {domain.name}"
        if fence.outcome == POSTCOPY:
            how = f"ferryctl migrate {domain.name} {fence.peer_uri} --postcopy --postcopy-resume"
        raise DomainState(
            f"cannot migrate domain '{domain.name}': {fence.describe()}; settle it first "
            f"({how})",
            name=domain.name,
        )
    status = ctx.host.load_status(domain.name)
    snapshots = [] if out.carry_snapshots else [s["name"] for s in ctx.snapshots(domain.name)]
    # --copy-storage-*: which disks, read from their images (refused here,
    # before the destination creates anything, when one cannot be copied).
    out.storage = await plan_storage(domain, flags, params)
    is_allowed(domain, flags, snapshots, status.run_state if status else None,
               copied_targets(out.storage))  # fmt: skip
    xml_domain = destination_xml(domain, params)
    log_event(log, MessageID.MIGRATION_STARTED,
              f"migrating {domain.name} to {out.host}:{out.port} "
              f"(flags {', '.join(flag_names(flags))})",
              phase="begin", flags=int(flags), peer_uri=out.peer_uri)  # fmt: skip
    job = await ctx.jobs.begin_async(
        domain.uuid, domain.name, AsyncJob.MIGRATION_OUT, flags=int(flags),
        phase="begin", migration_id=out.migration_id, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    out.job = job
    try:
        proc = await ctx.host.process(domain.name)
        out.proc = proc
        out.was_running = (await proc.qmp.query_status()).running
        # libvirt's qemuMigrationSrcIsAllowed: refuse in Begin, before the
        # destination starts a qemu for nothing.
        await check_io_error(proc, domain.name, flags)
        if not out.was_running and not flags & MigrationFlags.PAUSED:
            # As libvirt's p2p driver: a domain paused when the migration
            # starts stays paused on the destination.
            out.flags = flags = flags | MigrationFlags.PAUSED
        # Recovery needs to know where the VM went and whether it ran.
        job.record(peer_uri=out.peer_uri, peer=out.host, was_running=out.was_running,
                   flags=int(flags))  # fmt: skip
        cookie = Cookie().with_identity(
            Identity(name=domain.name, uuid=domain.uuid, hostname=ctx.config.host.name,
                     host_uuid=ctx.config.host.uuid, migration_id=out.migration_id)
        ).with_lockstate(LockState(driver="lease", leases=()))  # fmt: skip
        mode = copy_mode(flags)
        if mode is not None:
            # Mandatory: a destination that cannot copy storage must refuse,
            # not start the VM on images it does not have.
            tls = ctx.config.tls
            plan = StorageCopy(mode=mode, disks=tuple(c.to_wire() for c in out.storage),
                               plaintext_ok=tls is not None and tls.allow_plaintext_nbd)
            cookie = cookie.with_section(StorageCopy.SECTION, plan.to_wire(), mandatory=True)
        # What the destination must check its CPU against (host-model: the
        # CPU this qemu runs). Mandatory: a destination that ignored it
        # would start a different CPU under the running guest.
        cpu = await source_cpu(domain, proc.qmp, ctx.config.qemu.binary)
        if cpu is not None:
            cookie = cookie.with_cpu(cpu, mandatory=True)
        if flags & MigrationFlags.PERSIST_DEST:
            persistent = ctx.host.load_definition(domain.name) or domain
            cookie = cookie.with_persistent(Persistent(xml=format_domain(persistent)))
        # The sockets Ferry placed here are this host's: the destination places its own.
        xml = format_domain(unplaced_sockets(xml_domain, ctx.host.chardev_dir(domain.name)),
                            migratable=True)
    except BaseException:
        out.job = None
        await ctx.jobs.end_async(job)
        raise
    return cookie, xml
