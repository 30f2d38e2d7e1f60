"""Which qemu migration capabilities and parameters a migration's flags ask for.

Sans-I/O: flags and params in, two dicts out (``migrate-set-capabilities``
and ``migrate-set-parameters`` arguments, qemu 7.2 names).  Both ends call
it: the destination's qemu must agree with the source's on ``multifd``,
``postcopy-ram`` and the multifd compression method before the stream
starts, because qemu 7.2 cannot change any capability mid-migration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ferry.flags import MULTIFD_COMPRESSION, MigrationFlags, MigrationParams, compression_methods

__all__ = ["MIB", "UNLIMITED_BANDWIDTH", "QemuSettings", "destination_settings", "source_settings"]

MIB = 1024 * 1024
# libvirt's QEMU_DOMAIN_MIG_BANDWIDTH_MAX: "unlimited", in bytes/s.  qemu's
# own 128 MiB/s default alone kept a dirtying guest from ever finishing.
UNLIMITED_BANDWIDTH = (2**63 - 1) // MIB * MIB


@dataclass(frozen=True)
class QemuSettings:
    """Capabilities and parameters to set on one qemu before the stream starts."""

    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def _common(flags: MigrationFlags, params: MigrationParams) -> QemuSettings:
    """What both ends must agree on."""
    methods = compression_methods(flags, params)
    parallel = bool(flags & MigrationFlags.PARALLEL)
    # Always set: a qemu that arrived by a parallel or post-copy migration
    # still has those on, and both ends must agree.
    caps = {
        "events": True,
        "multifd": parallel,
        "postcopy-ram": bool(flags & MigrationFlags.POSTCOPY),
        "xbzrle": "xbzrle" in methods,
    }
    out: dict[str, Any] = {}
    if parallel:
        out["multifd-channels"] = params.parallel_connections or 2
        multifd = [m for m in methods if m in MULTIFD_COMPRESSION]
        out["multifd-compression"] = multifd[0] if multifd else "none"
        if params.compression_zlib_level is not None:
            out["multifd-zlib-level"] = params.compression_zlib_level
        if params.compression_zstd_level is not None:
            out["multifd-zstd-level"] = params.compression_zstd_level
    return QemuSettings(caps=caps, params=out)


def destination_settings(flags: MigrationFlags, params: MigrationParams) -> QemuSettings:
    """The incoming qemu's settings (before ``migrate-incoming``)."""
    return _common(flags, params)


def source_settings(
    flags: MigrationFlags, params: MigrationParams, *, pause_before_switchover: bool = False
) -> QemuSettings:
    """The outgoing qemu's settings (before ``migrate``).

    ``pause_before_switchover`` holds qemu at switchover so the agent can
    hand disk leases over before the device state moves.
    """
    common = _common(flags, params)
    caps = {
        **common.caps,
        "auto-converge": bool(flags & MigrationFlags.AUTO_CONVERGE),
        "pause-before-switchover": pause_before_switchover,
    }
    tuning: dict[str, Any] = {
        **common.params,
        "max-bandwidth": params.bandwidth_mib * MIB if params.bandwidth_mib
        else UNLIMITED_BANDWIDTH,
    }  # fmt: skip
    if params.max_downtime_ms is not None:
        tuning["downtime-limit"] = params.max_downtime_ms
    if params.auto_converge_initial is not None:
        tuning["cpu-throttle-initial"] = params.auto_converge_initial
    if params.auto_converge_increment is not None:
        tuning["cpu-throttle-increment"] = params.auto_converge_increment
    if flags & MigrationFlags.AUTO_CONVERGE and params.max_throttle_pct:
        tuning["max-cpu-throttle"] = params.max_throttle_pct
        if params.auto_converge_initial is None:
            tuning["cpu-throttle-initial"] = min(20, params.max_throttle_pct)
    if flags & MigrationFlags.POSTCOPY:
        # 0 is qemu's "no limit" for post-copy.
        tuning["max-postcopy-bandwidth"] = (params.postcopy_bandwidth_mib or 0) * MIB
    if params.compression_xbzrle_cache is not None:
        tuning["xbzrle-cache-size"] = params.compression_xbzrle_cache
    return QemuSettings(caps=caps, params=tuning)
