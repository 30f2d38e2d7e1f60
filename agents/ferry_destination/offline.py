"""Offline migration, destination side: Prepare and Finish of ``--offline``.

:func:`~ferry_destination.prepare.prepare` hands an offline migration here
once it has parsed the XML and checked the cookie's identity, the ACL,
the storage policy and that the domain does not run here.  Prepare then
runs this host's ``migrate`` hook (the same as for a live migration),
checks its output like a definition, and *defines nothing* (libvirt's
rule): it keeps the result in memory, for Finish.  Finish defines the
domain, inactive (no qemu starts), or updates the inactive definition of
the same name and UUID.  A Prepare whose Finish never comes is forgotten
after :data:`ferry.offline.PENDING_TTL_S`: nothing existed for it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ferry.acl import check_access
from ferry.domain import Domain, parse_domain
from ferry.domain._filesystem import start_refusal as fs_start_refusal
from ferry.errors import PhaseError, XMLUnsupported
from ferry.flags import MigrationFlags, MigrationParams
from ferry.jobs import JobType
from ferry.journal import LogContext, MessageID, log_event
from ferry.netdev import host_networks
from ferry.offline import Pending, define_decision
from ferry.protocol.cookie import Cookie, Identity
from ferry.rpc import RequestContext
from ferry.storage_policy import check_domain
from ferry_destination.context import DestinationContext
from ferry_destination.prepare import JOB_TIMEOUT, _run_hook

__all__ = ["finish_offline", "prepare_offline"]

log = logging.getLogger("ferry.destination")


def _check_definable(dst: DestinationContext, domain: Domain) -> bool:
    """The facts of this host for :func:`ferry.offline.define_decision`; True: an update."""
    host = dst.host
    defined = host.load_definition(domain.name)
    status = host.load_status(domain.name)
    running_uuid = status.uuid if status is not None and status.pid is not None else None
    other = host.find_uuid(domain.uuid)
    return define_decision(
        domain.name, domain.uuid, dst.config.host.name,
        defined_uuid=defined.uuid if defined is not None else None,
        running_uuid=running_uuid,
        uuid_defined_as=other.domain.name if other is not None and not other.active else None,
        uuid_running_as=other.domain.name if other is not None and other.active else None,
    )  # fmt: skip


def _check_definition(dst: DestinationContext, domain: Domain, where: str) -> None:
    """What ``ferryctl define`` checks: paths within the storage policy, a startable share."""
    check_domain(domain, dst.config, where=where)
    why = fs_start_refusal(domain)
    if why is not None:
        raise XMLUnsupported(f"{where}: {why}", where=where, element="domain/devices/filesystem")


async def prepare_offline(
    dst: DestinationContext, domain: Domain, identity: Identity
) -> dict[str, Any]:
    """Prepare(offline): run the migrate hook, check, keep the definition for Finish.

    Called by :func:`~ferry_destination.prepare.prepare` inside its log
    context, after its checks.

    Raises:
        HookRefused: the hook said no.  DomainExists: the name or UUID is
        taken here.  XMLUnsupported, StoragePolicyError: the hook's output
        cannot be defined here.  MigrationRefused: another offline migration
        of the domain waits for its Finish.
    """
    _check_definable(dst, domain)
    hooked = await _run_hook(dst, domain)
    if hooked is not domain:
        _check_definition(dst, hooked, "migrate hook output")
        _check_definable(dst, hooked)
    dst.offline.add(Pending(identity.migration_id, hooked.name, hooked, identity.hostname,
                            time.monotonic()), time.monotonic())  # fmt: skip
    log_event(log, MessageID.MIGRATION_STARTED,
              f"prepare: receiving the definition of {hooked.name} from {identity.hostname} "
              "(offline: it is defined at Finish, inactive)")  # fmt: skip
    reply = Cookie().with_identity(
        Identity(name=hooked.name, uuid=hooked.uuid, hostname=dst.config.host.name,
                 host_uuid=dst.config.host.uuid, migration_id=identity.migration_id)
    )  # fmt: skip
    return {"uri": "", "cookie": reply.encode(), "name": hooked.name}


async def finish_offline(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Finish(offline): define the prepared domain, inactive (or forget it when cancelled).

    Raises:
        PhaseError: no offline Prepare of that domain waits (never prepared,
            expired, or this agent restarted).
        DomainExists: the name or UUID was taken here since Prepare.
    """
    name = str(args["name"])
    wanted = args.get("migration_id")
    pending = dst.offline.take(name, str(wanted) if wanted else None, time.monotonic())
    if pending is None:
        raise PhaseError(f"no prepared offline migration for domain '{name}' here (never "
                         "prepared, or its Prepare expired)")  # fmt: skip
    domain: Domain = pending.domain
    check_access(dst.config.acl, ctx.subject, "finish", name, domain.uuid)
    params = MigrationParams.from_wire(args["params"])
    flags = MigrationFlags(args["flags"])
    with LogContext(domain=name, uuid=domain.uuid, migration_id=pending.migration_id,
                    phase="finish", peer=pending.source_host):  # fmt: skip
        if args["cancelled"]:
            log_event(log, MessageID.MIGRATION_ABORTED,
                      f"finish: the source cancelled; {name} is not defined here")  # fmt: skip
            return {"name": name, "cookie": Cookie().encode()}
        if flags & MigrationFlags.PERSIST_DEST and params.persist_xml:
            persist = parse_domain(params.persist_xml, where="persist_xml",
                                   networks=host_networks(dst.config))  # fmt: skip
            if params.dest_name:
                persist = persist.renamed(params.dest_name)
            if persist.name != name or persist.uuid != domain.uuid:
                raise PhaseError(f"persist_xml names '{persist.name}' ({persist.uuid}), not "
                                 f"the migrated '{name}' ({domain.uuid})")  # fmt: skip
            _check_definition(dst, persist, "persist_xml")
            domain = persist
        async with dst.jobs.sync_job(domain.uuid, name, JobType.MODIFY, timeout=JOB_TIMEOUT):
            # Again under the job: a start or define may have come since Prepare.
            updated = _check_definable(dst, domain)
            dst.host.save_definition(domain)
        how = "updated its inactive definition" if updated else "defined it, inactive"
        log_event(log, MessageID.MIGRATION_COMPLETED,
                  f"finish: {name} from {pending.source_host}: {how} on "
                  f"{dst.config.host.name}")  # fmt: skip
        return {"name": name, "cookie": Cookie().encode(), "host": dst.config.host.name,
                "updated": updated}  # fmt: skip
