"""Migration flags and parameters, and the rules on how they combine.

:class:`MigrationFlags` uses libvirt's ``virDomainMigrateFlags`` bit values, so
a flags integer means the same thing to someone who knows ``virsh migrate``.
:class:`MigrationParams` is the typed form of libvirt's migration typed
parameters. :func:`validate` refuses combinations that make no sense (the
checks libvirt spreads over virsh, ``virDomainMigrate*`` and the QEMU driver),
naming the options involved as ``virsh migrate`` spells them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ferry.errors import FlagError, MessageInvalid
from ferry.protocol.fields import FieldSpec, check_fields, check_value

__all__ = [
    "ALL_FLAGS",
    "COMPRESSION_METHODS",
    "TIMEOUT_ACTIONS",
    "MigrationFlags",
    "MigrationParams",
    "compression_methods",
    "flag_names",
    "validate",
]


class MigrationFlags(enum.IntFlag):
    """Migration flags, bit-compatible with libvirt's ``virDomainMigrateFlags``.

    Bits Ferry does not implement are left out, so setting one is an
    unknown-bit error rather than a silently ignored request.
    """

    LIVE = 1 << 0
    PEER2PEER = 1 << 1
    TUNNELLED = 1 << 2
    PERSIST_DEST = 1 << 3
    UNDEFINE_SOURCE = 1 << 4
    PAUSED = 1 << 5
    NON_SHARED_DISK = 1 << 6
    NON_SHARED_INC = 1 << 7
    CHANGE_PROTECTION = 1 << 8
    UNSAFE = 1 << 9
    OFFLINE = 1 << 10
    COMPRESSED = 1 << 11
    ABORT_ON_ERROR = 1 << 12
    AUTO_CONVERGE = 1 << 13
    POSTCOPY = 1 << 15
    PARALLEL = 1 << 17
    NON_SHARED_SYNCHRONOUS_WRITES = 1 << 18
    POSTCOPY_RESUME = 1 << 19


ALL_FLAGS = MigrationFlags(0)
for _member in MigrationFlags:
    ALL_FLAGS |= _member
del _member

# How virsh spells each flag, for messages a user can act on.
_OPTION: dict[MigrationFlags, str] = {
    MigrationFlags.LIVE: "--live",
    MigrationFlags.PEER2PEER: "--p2p",
    MigrationFlags.TUNNELLED: "--tunnelled",
    MigrationFlags.PERSIST_DEST: "--persistent",
    MigrationFlags.UNDEFINE_SOURCE: "--undefinesource",
    MigrationFlags.PAUSED: "--suspend",
    MigrationFlags.NON_SHARED_DISK: "--copy-storage-all",
    MigrationFlags.NON_SHARED_INC: "--copy-storage-inc",
    MigrationFlags.NON_SHARED_SYNCHRONOUS_WRITES: "--copy-storage-synchronous-writes",
    MigrationFlags.CHANGE_PROTECTION: "--change-protection",
    MigrationFlags.UNSAFE: "--unsafe",
    MigrationFlags.OFFLINE: "--offline",
    MigrationFlags.COMPRESSED: "--compressed",
    MigrationFlags.ABORT_ON_ERROR: "--abort-on-error",
    MigrationFlags.AUTO_CONVERGE: "--auto-converge",
    MigrationFlags.POSTCOPY: "--postcopy",
    MigrationFlags.PARALLEL: "--parallel",
    MigrationFlags.POSTCOPY_RESUME: "--postcopy-resume",
}

_PARAM_OPTION: dict[str, str] = {
    "dest_name": "--dname",
    "dest_xml": "--xml",
    "migrate_uri": "--migrateuri",
    "bandwidth_mib": "--bandwidth",
    "max_downtime_ms": "--max-downtime",
    "auto_converge_initial": "--auto-converge-initial",
    "auto_converge_increment": "--auto-converge-increment",
    "parallel_connections": "--parallel-connections",
    "timeout_s": "--timeout",
    "listen_address": "--listen-address",
    "persist_xml": "--persistent-xml",
    "tunnel_plaintext": "--tunnel-plaintext",
    "timeout_action": "--timeout-suspend/--timeout-postcopy/--timeout-abort",
    "postcopy_after_precopy": "--postcopy-after-precopy",
    "postcopy_bandwidth_mib": "--postcopy-bandwidth",
    "compression_methods": "--comp-methods",
    "compression_xbzrle_cache": "--comp-xbzrle-cache",
    "compression_zlib_level": "--comp-zlib-level",
    "compression_zstd_level": "--comp-zstd-level",
    "deadline_s": "--deadline",
    "max_throttle_pct": "--max-throttle",
    "migrate_disks": "--migrate-disks",
    "disks_port": "--disks-port",
    "disks_uri": "--disks-uri",
}

#: What ``--timeout`` does when it fires (virsh: suspend unless --timeout-postcopy).
TIMEOUT_ACTIONS = frozenset({"suspend", "postcopy", "abort"})
#: ``--comp-methods``: xbzrle rides the main stream, zlib/zstd are multifd's.
COMPRESSION_METHODS = ("xbzrle", "zlib", "zstd")
MULTIFD_COMPRESSION = frozenset({"zlib", "zstd"})


def _flag(flag: MigrationFlags) -> str:
    return f"{_OPTION[flag]} ({flag.name})"


def _param(name: str) -> str:
    return f"{_PARAM_OPTION[name]} ({name})"


def flag_names(flags: MigrationFlags | int) -> list[str]:
    """Return the names of the set flags in bit order; unknown bits as one hex string."""
    value = int(flags)
    names = [m.name for m in MigrationFlags if value & m.value and m.name is not None]
    unknown = value & ~ALL_FLAGS.value
    if unknown:
        names.append(f"{unknown:#x}")
    return names


_PARAM_SPECS: Mapping[str, FieldSpec] = {
    "dest_name": FieldSpec(str, nullable=True, min_len=1, max_len=200),
    "dest_xml": FieldSpec(str, nullable=True, min_len=1),
    "migrate_uri": FieldSpec(str, nullable=True, min_len=1, max_len=4096),
    "bandwidth_mib": FieldSpec(int, nullable=True, ge=0, le=2**53),
    "max_downtime_ms": FieldSpec(int, nullable=True, ge=0, le=2**53),
    "auto_converge_initial": FieldSpec(int, nullable=True, ge=0, le=100),
    "auto_converge_increment": FieldSpec(int, nullable=True, ge=1, le=100),
    "parallel_connections": FieldSpec(int, nullable=True, ge=1, le=255),
    "timeout_s": FieldSpec(float, nullable=True, gt=0),
    "listen_address": FieldSpec(str, nullable=True, min_len=1, max_len=255),
    "persist_xml": FieldSpec(str, nullable=True, min_len=1),
    "tunnel_plaintext": FieldSpec(bool, nullable=True),
    "timeout_action": FieldSpec(str, nullable=True, choices=TIMEOUT_ACTIONS),
    "postcopy_after_precopy": FieldSpec(bool, nullable=True),
    "postcopy_bandwidth_mib": FieldSpec(int, nullable=True, ge=0, le=2**53),
    "compression_methods": FieldSpec(
        list, nullable=True, min_len=1, max_len=len(COMPRESSION_METHODS),
        items=FieldSpec(str, choices=frozenset(COMPRESSION_METHODS)),
    ),
    # qemu wants the xbzrle cache a power of two of at least one page.
    "compression_xbzrle_cache": FieldSpec(int, nullable=True, ge=4096, le=2**53),
    "compression_zlib_level": FieldSpec(int, nullable=True, ge=0, le=9),
    "compression_zstd_level": FieldSpec(int, nullable=True, ge=0, le=20),
    "deadline_s": FieldSpec(float, nullable=True, gt=0, le=86400 * 7),
    "max_throttle_pct": FieldSpec(int, nullable=True, ge=0, le=99),
    "migrate_disks": FieldSpec(list, nullable=True, min_len=1, max_len=64,
                               items=FieldSpec(str, min_len=1, max_len=32)),
    "disks_port": FieldSpec(int, nullable=True, ge=1, le=65535),
    "disks_uri": FieldSpec(str, nullable=True, min_len=1, max_len=4096),
}

# The same fields with types only: from_wire reports a wrong type as a broken
# message and leaves out-of-range values to the constructor's FlagError.
_PARAM_TYPES: Mapping[str, FieldSpec] = {
    name: dataclasses.replace(
        spec, ge=None, gt=None, le=None, min_len=None, max_len=None, choices=None,
        items=FieldSpec(str) if spec.items is not None else None,
    )
    for name, spec in _PARAM_SPECS.items()
}


@dataclass(frozen=True)
class MigrationParams:
    """Optional migration parameters (libvirt's ``VIR_MIGRATE_PARAM_*``); None means unset."""

    dest_name: str | None = None
    dest_xml: str | None = None
    migrate_uri: str | None = None
    bandwidth_mib: int | None = None
    max_downtime_ms: int | None = None
    auto_converge_initial: int | None = None
    auto_converge_increment: int | None = None
    parallel_connections: int | None = None
    timeout_s: float | None = None
    listen_address: str | None = None
    persist_xml: str | None = None
    # Tunnel data unencrypted after TLS authenticated it (both hosts' configs
    # must allow it: [tls] allow_plaintext_tunnel).
    tunnel_plaintext: bool | None = None
    #: What --timeout does: "suspend" (virsh's default), "postcopy" or "abort".
    timeout_action: str | None = None
    #: Switch to post-copy by itself once the first full pass is done.
    postcopy_after_precopy: bool | None = None
    postcopy_bandwidth_mib: int | None = None
    compression_methods: list[str] | None = None
    compression_xbzrle_cache: int | None = None
    compression_zlib_level: int | None = None
    compression_zstd_level: int | None = None
    #: The convergence controller's goal: done within this many seconds.
    deadline_s: float | None = None
    #: The most the guest's CPUs may be throttled (the controller's and auto-converge's cap).
    max_throttle_pct: int | None = None
    #: --copy-storage-*: the disks to copy (target names); None: every copyable one.
    migrate_disks: list[str] | None = None
    #: Where the destination's NBD server listens for the disks (port, or tcp://HOST[:PORT]).
    disks_port: int | None = None
    disks_uri: str | None = None

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.FlagError` naming a field of wrong type or range."""
        for name, spec in _PARAM_SPECS.items():
            value = check_value("params", name, spec, getattr(self, name), FlagError)
            object.__setattr__(self, name, value)

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> MigrationParams:
        """Build from a request's ``params`` map.

        Raises :class:`~ferry.errors.MessageInvalid` for a non-map, an unknown
        field or a wrong type (naming the field; unknown fields are refused,
        as libvirt refuses unknown typed parameters, because a parameter the
        agent would silently ignore could make a migration unsafe), and
        :class:`~ferry.errors.FlagError` for a value out of range.
        """
        if not isinstance(d, Mapping):
            raise MessageInvalid("params must be a map", field="params")
        fields = check_fields("params", _PARAM_TYPES, d, MessageInvalid, unknown="refuse")
        return cls(**fields)

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map, leaving out unset (None) fields."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


def validate(flags: MigrationFlags | int, params: MigrationParams) -> MigrationFlags:
    """Check that ``flags`` and ``params`` make sense together; return the flags.

    Raises :class:`~ferry.errors.FlagError` for flags that are not a
    non-negative int, unknown bits, or any nonsensical combination; the
    message lists every problem found, each naming the options involved
    (``details["problems"]`` holds them one by one).
    """
    if isinstance(flags, bool) or not isinstance(flags, int):
        raise FlagError(f"flags must be an int, not {type(flags).__name__}")
    if flags < 0:
        raise FlagError(f"flags must be >= 0, got {flags}")
    unknown = flags & ~ALL_FLAGS.value
    if unknown:
        raise FlagError(f"unknown migration flag bits {unknown:#x}", unknown=unknown)
    f = MigrationFlags(flags)
    M = MigrationFlags
    problems: list[str] = []

    def conflict(a: MigrationFlags, b: MigrationFlags, why: str) -> None:
        if a in f and b in f:
            problems.append(f"{_flag(a)} cannot be combined with {_flag(b)}: {why}")

    def needs(a: MigrationFlags, b: MigrationFlags, why: str) -> None:
        if a in f and b not in f:
            problems.append(f"{_flag(a)} requires {_flag(b)}: {why}")

    def param_needs(name: str, b: MigrationFlags) -> None:
        if getattr(params, name) is not None and b not in f:
            problems.append(f"{_param(name)} requires {_flag(b)}")

    conflict(M.OFFLINE, M.LIVE, "an offline migration moves no running state")
    needs(M.OFFLINE, M.PERSIST_DEST, "an offline migration only moves the definition")
    conflict(M.OFFLINE, M.TUNNELLED, "an offline migration has no data to tunnel")
    conflict(M.POSTCOPY, M.OFFLINE, "an offline migration has no memory to copy")
    # libvirt ties TUNNELLED to PEER2PEER (its tunnel runs over the daemons'
    # own connection); Ferry's tunnel is the agents' data connections with a
    # token from Prepare, so a client-driven migration can use it too.
    if params.migrate_uri is not None and M.TUNNELLED in f:
        problems.append(
            f"{_param('migrate_uri')} cannot be used with {_flag(M.TUNNELLED)}: "
            "tunnelled data goes through the agents' connection"
        )
    needs(M.POSTCOPY, M.LIVE, "post-copy switches a running guest to the destination")
    conflict(M.POSTCOPY, M.PAUSED, "post-copy needs the guest running on the destination")
    param_needs("auto_converge_initial", M.AUTO_CONVERGE)
    param_needs("auto_converge_increment", M.AUTO_CONVERGE)
    param_needs("parallel_connections", M.PARALLEL)
    param_needs("persist_xml", M.PERSIST_DEST)
    param_needs("tunnel_plaintext", M.TUNNELLED)
    _check_postcopy(f, params, problems)
    _check_compression(f, params, problems)
    _check_storage_copy(f, params, problems)
    if problems:
        raise FlagError("; ".join(problems), problems=problems, flags=flag_names(f))
    return f


def _check_postcopy(f: MigrationFlags, params: MigrationParams, problems: list[str]) -> None:
    M = MigrationFlags
    for name in ("postcopy_after_precopy", "postcopy_bandwidth_mib"):
        if getattr(params, name) is not None and M.POSTCOPY not in f:
            problems.append(f"{_param(name)} requires {_flag(M.POSTCOPY)}")
    if params.timeout_action is not None and params.timeout_s is None:
        problems.append(f"{_PARAM_OPTION['timeout_action']} requires {_param('timeout_s')}")
    if params.timeout_action == "postcopy" and M.POSTCOPY not in f:
        problems.append(f"--timeout-postcopy requires {_flag(M.POSTCOPY)}")
    if M.POSTCOPY in f and M.PARALLEL in f:
        problems.append(
            f"{_flag(M.POSTCOPY)} cannot be combined with {_flag(M.PARALLEL)}: "
            "qemu 7.2 cannot switch a multifd migration to post-copy"
        )
    if M.POSTCOPY_RESUME in f:
        if M.POSTCOPY not in f:
            problems.append(f"{_flag(M.POSTCOPY_RESUME)} requires {_flag(M.POSTCOPY)}")
        for other in (M.OFFLINE, M.PAUSED):
            if other in f:
                problems.append(
                    f"{_flag(M.POSTCOPY_RESUME)} cannot be combined with {_flag(other)}: "
                    "it only reconnects a paused post-copy migration"
                )
    if params.max_throttle_pct is not None and params.deadline_s is None \
            and M.AUTO_CONVERGE not in f:
        problems.append(
            f"{_param('max_throttle_pct')} needs {_param('deadline_s')} (the controller) "
            f"or {_flag(M.AUTO_CONVERGE)}"
        )


def _check_storage_copy(f: MigrationFlags, params: MigrationParams, problems: list[str]) -> None:
    M = MigrationFlags
    copy = f & (M.NON_SHARED_DISK | M.NON_SHARED_INC)
    if M.NON_SHARED_DISK in f and M.NON_SHARED_INC in f:
        problems.append(f"{_flag(M.NON_SHARED_DISK)} and {_flag(M.NON_SHARED_INC)} cannot be "
                        "combined: copy whole images or only their top layer")
    for name in ("migrate_disks", "disks_port", "disks_uri"):
        if getattr(params, name) is not None and not copy:
            problems.append(f"{_param(name)} requires {_flag(M.NON_SHARED_DISK)} or "
                            f"{_flag(M.NON_SHARED_INC)}")
    if M.NON_SHARED_SYNCHRONOUS_WRITES in f and not copy:
        problems.append(f"{_flag(M.NON_SHARED_SYNCHRONOUS_WRITES)} requires "
                        f"{_flag(M.NON_SHARED_DISK)} or {_flag(M.NON_SHARED_INC)}")
    if params.disks_port is not None and params.disks_uri is not None:
        problems.append(f"{_param('disks_port')} cannot be combined with {_param('disks_uri')}: "
                        "the URI names the port")
    if not copy:
        return
    if M.OFFLINE in f:
        problems.append(f"{_flag(M.OFFLINE)} cannot copy storage: it moves only the definition")
    if M.TUNNELLED in f:
        for name in ("disks_port", "disks_uri"):
            if getattr(params, name) is not None:
                problems.append(f"{_param(name)} cannot be combined with {_flag(M.TUNNELLED)}: "
                                "the disks travel through the tunnel, not to a port of their own")


def compression_methods(f: MigrationFlags, params: MigrationParams) -> list[str]:
    """The compression methods in force: as given, else xbzrle (zstd with --parallel)."""
    if MigrationFlags.COMPRESSED not in f:
        return []
    if params.compression_methods:
        return list(dict.fromkeys(params.compression_methods))
    return ["zstd"] if MigrationFlags.PARALLEL in f else ["xbzrle"]


def _check_compression(f: MigrationFlags, params: MigrationParams, problems: list[str]) -> None:
    M = MigrationFlags
    for name in ("compression_methods", "compression_xbzrle_cache",
                 "compression_zlib_level", "compression_zstd_level"):  # fmt: skip
        if getattr(params, name) is not None and M.COMPRESSED not in f:
            problems.append(f"{_param(name)} requires {_flag(M.COMPRESSED)}")
    if M.COMPRESSED not in f:
        return
    methods = compression_methods(f, params)
    multifd = [m for m in methods if m in MULTIFD_COMPRESSION]
    if len(multifd) > 1:
        problems.append(
            f"{_param('compression_methods')}: zlib and zstd cannot be used together "
            "(qemu compresses multifd pages with one method)"
        )
    if multifd and M.PARALLEL not in f:
        problems.append(
            f"{_param('compression_methods')} {multifd[0]} requires {_flag(M.PARALLEL)}: "
            "qemu only compresses multifd channels with it"
        )
    if "xbzrle" in methods and M.PARALLEL in f:
        problems.append(
            f"{_param('compression_methods')} xbzrle cannot be combined with "
            f"{_flag(M.PARALLEL)}: qemu applies xbzrle only to the single main stream"
        )
    cache = params.compression_xbzrle_cache
    if cache is not None:
        if "xbzrle" not in methods:
            problems.append(f"{_param('compression_xbzrle_cache')} requires the xbzrle method")
        elif cache & (cache - 1):
            problems.append(f"{_param('compression_xbzrle_cache')} must be a power of two "
                            f"(got {cache})")  # fmt: skip
    if params.compression_zlib_level is not None and "zlib" not in methods:
        problems.append(f"{_param('compression_zlib_level')} requires the zlib method")
    if params.compression_zstd_level is not None and "zstd" not in methods:
        problems.append(f"{_param('compression_zstd_level')} requires the zstd method")
