"""qemu control: launch and reconnect detached qemu, QMP, migration settings and stats.

- :mod:`ferry.qemu.process`: :func:`launch`, :func:`reconnect`, :class:`QemuProcess`
- :mod:`ferry.qemu.qmp`: :class:`QMP` (commands, events, ``query-status``)
- :mod:`ferry.qemu.migration`: capabilities/parameters (snapshot and restore),
  ``query-migrate`` statistics
"""

from ferry.qemu.migration import (
    MigrationStats,
    SampleFields,
    SavedMigrationSettings,
    query_caps,
    query_migrate,
    query_params,
    set_caps,
    set_params,
)
from ferry.qemu.process import QemuProcess, launch, read_cmdline, read_start_time, reconnect
from ferry.qemu.qmp import (
    DISCONNECTED,
    QMP,
    WATCHED_EVENTS,
    EventSubscription,
    QMPEvent,
    RunStatus,
)

__all__ = [
    "DISCONNECTED",
    "QMP",
    "WATCHED_EVENTS",
    "EventSubscription",
    "MigrationStats",
    "QMPEvent",
    "QemuProcess",
    "RunStatus",
    "SampleFields",
    "SavedMigrationSettings",
    "launch",
    "query_caps",
    "query_migrate",
    "query_params",
    "read_cmdline",
    "read_start_time",
    "reconnect",
    "set_caps",
    "set_params",
]
