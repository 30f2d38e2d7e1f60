"""Migration capabilities, parameters and statistics over QMP (qemu 7.2 QAPI names).

Capabilities (``migrate-set-capabilities``: ``auto-converge``, ``events``,
``xbzrle``, ``postcopy-ram``, …) are booleans; parameters
(``migrate-set-parameters``: ``max-bandwidth`` in bytes/s, ``downtime-limit``
in ms, ``cpu-throttle-initial``, …) are typed values. Both are global to the
qemu process and survive a migration, so like libvirt we snapshot them before a
migration (:class:`SavedMigrationSettings`) and put them back afterwards; the
snapshot is JSON-able so the job record can persist it across an agent restart.

Note: qemu only emits the ``MIGRATION`` and ``MIGRATION_PASS`` events when the
``events`` capability is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from ferry.errors import QMPError
from ferry.qemu.qmp import QMP

__all__ = [
    "MigrationStats",
    "SampleFields",
    "SavedMigrationSettings",
    "query_caps",
    "query_migrate",
    "query_params",
    "set_caps",
    "set_params",
]


async def query_caps(qmp: QMP) -> dict[str, bool]:
    """Return every migration capability qemu knows with its current state.

    :raises QMPError: the command failed or the reply is malformed.
    """
    reply = await qmp.execute("query-migrate-capabilities")
    if not isinstance(reply, list):
        raise QMPError(f"query-migrate-capabilities: unexpected reply {reply!r}")
    caps: dict[str, bool] = {}
    for item in reply:
        if not isinstance(item, dict) or not isinstance(item.get("capability"), str):
            raise QMPError(f"query-migrate-capabilities: unexpected entry {item!r}")
        caps[item["capability"]] = bool(item.get("state"))
    return caps


async def set_caps(qmp: QMP, caps: Mapping[str, bool]) -> None:
    """Set migration capabilities in one command (qemu checks them as a set).

    Capabilities not named keep their state. Setting none is a no-op.

    :raises QMPError: unknown capability, invalid combination, or a
        migration is in progress (qemu refuses changes then).
    """
    if not caps:
        return
    await qmp.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": bool(v)} for k, v in caps.items()]},
    )


async def query_params(qmp: QMP) -> dict[str, Any]:
    """Return the current migration parameters (QAPI ``MigrationParameters``).

    :raises QMPError: the command failed or the reply is malformed.
    """
    reply = await qmp.execute("query-migrate-parameters")
    if not isinstance(reply, dict):
        raise QMPError(f"query-migrate-parameters: unexpected reply {reply!r}")
    return dict(reply)


async def set_params(qmp: QMP, params: Mapping[str, Any]) -> None:
    """Set migration parameters; those not named keep their value. Empty is a no-op.

    :raises QMPError: unknown parameter or value out of range.
    """
    if not params:
        return
    await qmp.execute("migrate-set-parameters", dict(params))


@dataclass(frozen=True)
class SavedMigrationSettings:
    """Migration capabilities and parameters as they were before a migration."""

    caps: dict[str, bool]
    params: dict[str, Any]

    @classmethod
    async def snapshot(cls, qmp: QMP) -> SavedMigrationSettings:
        """Read the current capabilities and parameters.

        :raises QMPError: a query failed.
        """
        return cls(caps=await query_caps(qmp), params=await query_params(qmp))

    async def restore(self, qmp: QMP) -> None:
        """Put back every capability and parameter that changed since the snapshot.

        Only changed values are sent: re-sending all of them would also touch
        unstable parameters (``x-checkpoint-delay``) that a qemu run with
        ``-compat unstable-input=reject`` refuses, and keeps the log short.
        Parameters that did not exist in the snapshot are left alone (qemu
        cannot unset them).

        :raises QMPError: a query or set failed (e.g. a migration is still
            active: restore after it has ended).
        """
        now_params = await query_params(qmp)
        params = {k: v for k, v in self.params.items() if k in now_params and now_params[k] != v}
        await set_params(qmp, params)
        now_caps = await query_caps(qmp)
        caps = {k: v for k, v in self.caps.items() if k in now_caps and now_caps[k] != v}
        await set_caps(qmp, caps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for the job record in the status file."""
        return {"caps": dict(self.caps), "params": dict(self.params)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SavedMigrationSettings:
        """Inverse of :meth:`to_dict`.

        :raises ValueError: ``data`` lacks ``caps``/``params`` mappings.
        """
        caps, params = data.get("caps"), data.get("params")
        if not isinstance(caps, Mapping) or not isinstance(params, Mapping):
            raise ValueError("saved migration settings need 'caps' and 'params' mappings")
        return cls(caps={str(k): bool(v) for k, v in caps.items()}, params=dict(params))


# x86 target page size; qemu omits page-size until RAM migration starts.
_DEFAULT_PAGE_SIZE = 4096


class SampleFields(TypedDict):
    """Keyword arguments of ``ferry_native.accounting.Sample``."""

    time_s: float
    transferred: int
    remaining: int
    total: int
    dirty_pages_rate: float
    page_size: int
    iteration: int
    throttle_pct: int


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class MigrationStats:
    """``query-migrate`` (QAPI ``MigrationInfo``) in plain fields.

    Times are milliseconds (None when qemu did not report them for this
    status), RAM amounts bytes, ``ram_dirty_pages_rate`` pages/s. An idle
    qemu answers ``{}``: status ``"none"`` and zeros. ``raw`` keeps the whole
    reply for fields not mapped here.
    """

    status: str = "none"
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    expected_downtime_ms: int | None = None
    setup_time_ms: int | None = None
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_total: int = 0
    ram_duplicate: int = 0
    ram_normal: int = 0
    ram_normal_bytes: int = 0
    ram_dirty_pages_rate: int = 0
    ram_page_size: int = 0
    ram_dirty_sync_count: int = 0
    ram_mbps: float = 0.0
    cpu_throttle_percentage: int = 0
    error_desc: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_qmp(cls, reply: Mapping[str, Any]) -> MigrationStats:
        """Build from a ``query-migrate`` reply; absent fields take their defaults."""
        ram = reply.get("ram")
        ram = ram if isinstance(ram, Mapping) else {}
        status = reply.get("status")
        error = reply.get("error-desc")
        mbps = ram.get("mbps")
        return cls(
            status=status if isinstance(status, str) else "none",
            total_time_ms=_opt_int(reply, "total-time"),
            downtime_ms=_opt_int(reply, "downtime"),
            expected_downtime_ms=_opt_int(reply, "expected-downtime"),
            setup_time_ms=_opt_int(reply, "setup-time"),
            ram_transferred=_int(ram, "transferred"),
            ram_remaining=_int(ram, "remaining"),
            ram_total=_int(ram, "total"),
            ram_duplicate=_int(ram, "duplicate"),
            ram_normal=_int(ram, "normal"),
            ram_normal_bytes=_int(ram, "normal-bytes"),
            ram_dirty_pages_rate=_int(ram, "dirty-pages-rate"),
            ram_page_size=_int(ram, "page-size"),
            ram_dirty_sync_count=_int(ram, "dirty-sync-count"),
            ram_mbps=float(mbps) if isinstance(mbps, int | float) else 0.0,
            cpu_throttle_percentage=_int(reply, "cpu-throttle-percentage"),
            error_desc=error if isinstance(error, str) else None,
            raw=dict(reply),
        )

    @property
    def finished(self) -> bool:
        """True once the migration reached a final state (completed, failed, cancelled)."""
        return self.status in ("completed", "failed", "cancelled")

    def to_sample(self) -> SampleFields:
        """The fields ``ferry_native.accounting.Sample`` takes: ``Sample(**stats.to_sample())``.

        ``iteration`` is qemu's dirty-sync count (the number of passes over
        guest memory so far); ``time_s`` is the migration's elapsed time.
        Before qemu reports RAM figures (status ``none``/``setup``) the page
        size is taken as 4096, since ``Sample`` refuses a page size of 0.
        """
        return SampleFields(
            time_s=(self.total_time_ms or 0) / 1000.0,
            transferred=self.ram_transferred,
            remaining=self.ram_remaining,
            total=self.ram_total,
            dirty_pages_rate=float(self.ram_dirty_pages_rate),
            page_size=self.ram_page_size or _DEFAULT_PAGE_SIZE,
            iteration=self.ram_dirty_sync_count,
            throttle_pct=min(100, self.cpu_throttle_percentage),
        )


async def query_migrate(qmp: QMP, *, timeout: float | None = None) -> MigrationStats:
    """Run ``query-migrate`` and parse it.

    :raises QMPError: the command failed, no reply within ``timeout`` (details
        ``timeout=True``), or the reply is not an object.
    """
    reply = await qmp.execute("query-migrate", timeout=timeout)
    if not isinstance(reply, dict):
        raise QMPError(f"query-migrate: unexpected reply {reply!r}")
    return MigrationStats.from_qmp(reply)
