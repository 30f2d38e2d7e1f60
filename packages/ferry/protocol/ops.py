"""Argument schemas for every request op.

Each op has an :class:`OpSpec`: a map of argument name to
:class:`~ferry.protocol.fields.FieldSpec`. :func:`validate_args` checks a
request's args against it and fills defaults. Unknown args are dropped (the
wire's forward-compatible rule); migration ``params`` are further checked by
:meth:`ferry.flags.MigrationParams.from_wire` and ``flags`` by
:func:`ferry.flags.validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ferry.errors import MessageInvalid, UnknownOp

from .fields import FieldSpec, check_fields, short_repr

__all__ = ["OPS", "FieldSpec", "OpSpec", "register_op", "validate_args"]


@dataclass(frozen=True)
class OpSpec:
    """The arguments of one op: ``fields`` maps each name to its spec."""

    fields: Mapping[str, FieldSpec]
    doc: str = ""


_NAME = FieldSpec(str, required=True, min_len=1, max_len=200)
_SNAPSHOT = FieldSpec(str, required=True, min_len=1, max_len=200)
_PATH = FieldSpec(str, required=True, min_len=1, max_len=4096)
_XML = FieldSpec(str, required=True, min_len=1)
_COOKIE = FieldSpec(bytes, required=True)
_FLAGS = FieldSpec(int, required=True, ge=0)
_PARAMS = FieldSpec(dict, default={})
_CANCELLED = FieldSpec(bool, default=False)
_MIGRATION_ID = FieldSpec(str, required=True, min_len=1, max_len=64)
_MIGRATION_ID_OPT = FieldSpec(str, nullable=True, default=None, min_len=1, max_len=64)
_FORCE = FieldSpec(bool, default=False)


def _spec(doc: str, **fields: FieldSpec) -> OpSpec:
    return OpSpec(fields=MappingProxyType(dict(fields)), doc=doc)


_REGISTRY: dict[str, OpSpec] = {
    # lifecycle
    "define": _spec("define a persistent domain from XML", xml=_XML),
    "undefine": _spec("remove a domain's persistent definition", name=_NAME),
    "start": _spec(
        "start a defined domain",
        name=_NAME,
        paused=FieldSpec(bool, default=False),
        force=_FORCE,
    ),
    "shutdown": _spec(
        "ask the guest to power off, then wait",
        name=_NAME,
        timeout=FieldSpec(float, default=60.0, gt=0),
    ),
    "destroy": _spec("kill the domain's qemu", name=_NAME),
    "suspend": _spec("pause the domain's vCPUs", name=_NAME),
    "resume": _spec("resume the domain's vCPUs", name=_NAME, force=_FORCE),
    "list": _spec("list domains (running only unless all)", all=FieldSpec(bool, default=False)),
    "info": _spec("state, memory and vCPUs of a domain", name=_NAME),
    "dumpxml": _spec("a domain's XML", name=_NAME, inactive=FieldSpec(bool, default=False)),
    # snapshots (ferry_source.snapshots)
    "snapshot_create": _spec(
        "take a snapshot (metadata), or redefine one from its XML",
        name=_NAME,
        snapshot=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=200),
        description=FieldSpec(str, default="", max_len=65536),
        xml=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=1 << 20),
        redefine=FieldSpec(bool, default=False),
        current=FieldSpec(bool, default=False),
        disk_only=FieldSpec(bool, default=False),
    ),
    "snapshot_list": _spec("list snapshots, parents first, with the current one", name=_NAME),
    "snapshot_delete": _spec(
        "delete a snapshot (its children move up) or its subtree",
        name=_NAME,
        snapshot=_SNAPSHOT,
        children=FieldSpec(bool, default=False),
        children_only=FieldSpec(bool, default=False),
        metadata=FieldSpec(bool, default=False),
    ),
    "snapshot_current": _spec(
        "the current snapshot; with snapshot, make it current",
        name=_NAME,
        snapshot=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=200),
    ),
    "snapshot_dumpxml": _spec("one snapshot's XML", name=_NAME, snapshot=_SNAPSHOT),
    "snapshot_revert": _spec("revert the domain to a snapshot", name=_NAME, snapshot=_SNAPSHOT,
                             running=FieldSpec(bool, default=False),
                             paused=FieldSpec(bool, default=False)),
    # source -> destination during a migration (after Prepare, before Perform)
    "migration_snapshots": _spec(
        "one frame of the migrating domain's snapshot hierarchy",
        migration_id=_MIGRATION_ID,
        seq=FieldSpec(int, required=True, ge=0, le=100_000),
        snapshots=FieldSpec(list, default=[], max_len=100_000,
                            items=FieldSpec(str, min_len=1)),
        last=FieldSpec(bool, default=False),
        current=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=200),
    ),
    # state files (save/restore/dump: agents/ferry_source/save.py)
    "save": _spec(
        "save a domain's state to a file and stop it",
        name=_NAME, path=_PATH, running=FieldSpec(bool, default=False),
        paused=FieldSpec(bool, default=False), xml=FieldSpec(str, nullable=True, default=None),
        bypass_cache=FieldSpec(bool, default=False),
    ),
    "restore": _spec(
        "start a domain from a saved state file",
        path=_PATH, running=FieldSpec(bool, default=False),
        paused=FieldSpec(bool, default=False), xml=FieldSpec(str, nullable=True, default=None),
    ),
    "save_image_dumpxml": _spec("the domain XML a save image records", path=_PATH),
    "save_image_define": _spec(
        "replace the domain XML a save image records (ABI-checked)",
        path=_PATH, xml=_XML, running=FieldSpec(bool, default=False),
        paused=FieldSpec(bool, default=False),
    ),
    "managedsave": _spec(
        "save a domain to its managed image; start resumes from it",
        name=_NAME, running=FieldSpec(bool, default=False),
        paused=FieldSpec(bool, default=False), bypass_cache=FieldSpec(bool, default=False),
    ),
    "managedsave_remove": _spec("remove a domain's managed save image", name=_NAME),
    "dump": _spec(
        "write a domain's memory (or whole state) to a file",
        name=_NAME, path=_PATH, memory_only=FieldSpec(bool, default=False),
        format=FieldSpec(str, nullable=True, default=None, max_len=32),
        live=FieldSpec(bool, default=False), crash=FieldSpec(bool, default=False),
        reset=FieldSpec(bool, default=False), bypass_cache=FieldSpec(bool, default=False),
    ),
    # jobs
    "job_info": _spec("progress of the domain's job", name=_NAME),
    "job_abort": _spec("abort the domain's job", name=_NAME),
    "set_max_downtime": _spec(
        "set the migration's maximum downtime", name=_NAME, ms=FieldSpec(int, required=True, ge=0)
    ),
    "set_max_bandwidth": _spec(
        "set the migration's bandwidth limit (0: unlimited)",
        name=_NAME,
        mib_per_s=FieldSpec(int, required=True, ge=0),
    ),
    # client -> source
    "migrate": _spec(
        "migrate a domain to another host (peer-to-peer)",
        name=_NAME,
        dest_uri=FieldSpec(str, required=True, min_len=1, max_len=4096),
        flags=_FLAGS,
        params=_PARAMS,
    ),
    # the five phases
    "begin": _spec(
        "source (client-driven): check, take the job; the XML and cookie for Prepare",
        name=_NAME,
        dest_uri=FieldSpec(str, required=True, min_len=1, max_len=4096),
        flags=_FLAGS,
        params=_PARAMS,
    ),
    "prepare": _spec(
        "destination: set up an incoming qemu",
        xml=_XML,
        cookie=_COOKIE,
        flags=_FLAGS,
        params=_PARAMS,
    ),
    "perform": _spec(
        "source (client-driven): send the state to where Prepare said",
        name=_NAME,
        migration_id=_MIGRATION_ID,
        uri=FieldSpec(str, required=True, min_len=1, max_len=4096),
        cookie=_COOKIE,
        dest_name=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=200),
        tunnel=FieldSpec(dict, nullable=True, default=None),
    ),
    "finish": _spec(
        "destination: start or kill the incoming domain",
        name=_NAME,
        cookie=_COOKIE,
        flags=_FLAGS,
        params=_PARAMS,
        cancelled=_CANCELLED,
        migration_id=_MIGRATION_ID_OPT,
    ),
    "migration_outcome": _spec(
        "destination: what became of an incoming migration (fences one still prepared)",
        migration_id=_MIGRATION_ID,
    ),
    "migration_progress": _spec(
        "source → destination: the stream still moves (bytes so far)",
        migration_id=_MIGRATION_ID,
        transferred=FieldSpec(int, required=True, ge=0),
    ),
    "migrate_check": _spec(
        "source: pre-flight verdict for a live migration (measures, changes nothing)",
        name=_NAME,
        dest_uri=FieldSpec(str, required=True, min_len=1, max_len=4096),
        flags=_FLAGS,
        params=_PARAMS,
    ),
    "link_probe": _spec(
        "source → destination: bytes to count and drop (the pre-flight link probe)",
        data=FieldSpec(bytes, required=True),
    ),
    "migrate_recover": _spec(
        "source: ask the destination again and settle an unknown outcome", name=_NAME
    ),
    "migrate_postcopy": _spec(
        "source: switch a running migration (started with --postcopy) to post-copy",
        name=_NAME,
    ),
    "postcopy_recover": _spec(
        "source → destination: listen again for a post-copy stream that broke",
        migration_id=_MIGRATION_ID,
        tunnelled=FieldSpec(bool, default=False),
    ),
    "agent_state": _spec("jobs, migrations and tokens this agent holds (diagnostics)"),
    "confirm": _spec(
        "source (client-driven): clean up after Finish, or resume after a failure",
        name=_NAME,
        migration_id=_MIGRATION_ID,
        cookie=FieldSpec(bytes, default=b""),
        cancelled=_CANCELLED,
        unknown=FieldSpec(bool, default=False),
        dest_host=FieldSpec(str, nullable=True, default=None, min_len=1, max_len=255),
    ),
    "adopt_outgoing": _spec(
        "source: a client takes over a client-driven migration whose client went away",
        name=_NAME,
    ),
    "adopt_incoming": _spec(
        "destination: a client takes over a client-driven incoming migration whose "
        "client went away",
        migration_id=_MIGRATION_ID,
    ),
    "journal_query": _spec(
        "query the migration journal",
        migration_id=FieldSpec(str, nullable=True, min_len=1, max_len=200),
        domain=FieldSpec(str, nullable=True, min_len=1, max_len=200),
        since=FieldSpec(float, nullable=True, ge=0),
    ),
}

OPS: Mapping[str, OpSpec] = MappingProxyType(_REGISTRY)
"""Every known op, read-only; add ops with :func:`register_op`."""


def register_op(name: str, spec: OpSpec) -> None:
    """Add an op to :data:`OPS`.

    Raises ``ValueError`` if ``name`` is already registered or is not a
    1..64 character string (the length a request's ``op`` may have).
    """
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ValueError("op name must be a string of 1..64 characters")
    if name in _REGISTRY:
        raise ValueError(f"op {name!r} is already registered")
    _REGISTRY[name] = spec


def validate_args(op: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Check a request's args for ``op``; return them with defaults filled.

    Unknown args are dropped. Raises :class:`~ferry.errors.UnknownOp` naming
    the op, or :class:`~ferry.errors.MessageInvalid` naming the op and the
    field ("start: field 'paused' must be a bool"); both carry ``op`` in
    their details.
    """
    spec = _REGISTRY.get(op) if isinstance(op, str) else None
    if spec is None:
        raise UnknownOp(f"unknown op {short_repr(op)}", op=str(op)[:64])
    if not isinstance(args, Mapping):
        raise MessageInvalid(f"{op}: args must be a map", op=op, field="args")
    return check_fields(op, spec.fields, args, MessageInvalid, details={"op": op})
