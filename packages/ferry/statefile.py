"""Atomic state files: the live status of a domain and the job it runs.

A status file (``/run/ferry/domains/NAME.status``) is what lets a restarted
agent find its qemu again (pid, process start time, QMP socket) and learn which
job was in flight (type, phase, flags, saved migration settings). It is JSON,
written with :func:`atomic_write`, so a reader sees either the old or the new
file, never a torn one, even if the writer is killed -9 half-way.

Reading is forgiving where it can be and strict where it must be: unknown keys
(a newer agent's fields) are kept and written back unchanged, missing optional
keys take their defaults, but a file that is not JSON, or a field of the wrong
type, raises :class:`~ferry.errors.StateFileError` naming the file and field,
never a bare ``json`` traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ferry.errors import StateFileError

__all__ = [
    "FORMAT_VERSION",
    "DomainStatus",
    "JobFile",
    "JobRecord",
    "atomic_write",
]

#: Version of the status file layout; a file with a higher version is still
#: read (unknown keys are kept), so a downgrade does not lose a running VM.
FORMAT_VERSION = 1

_T = TypeVar("_T")


def atomic_write(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file.

    Writes a temporary file in the same directory (a rename is only atomic
    within one file system), fsyncs it, renames it over ``path`` and fsyncs
    the directory so the rename itself survives a power loss. If anything
    fails before the rename, the old file is left untouched and the
    temporary file is removed.

    :param path: the file to replace (its directory must exist).
    :param data: the complete new content.
    :param mode: permission bits of the new file (not subject to the umask).
    :raises OSError: the directory is missing or not writable, disk full, …
    """
    path = Path(path)
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            # mkstemp creates 0600; set the wanted mode explicitly (fchmod
            # ignores the umask, so the result does not depend on the caller).
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _field(
    data: dict[str, Any], key: str, kind: type[_T] | tuple[type, ...], default: Any, where: str
) -> Any:
    """Fetch ``data[key]`` checking its type; ``None`` is allowed when the default is None."""
    if key not in data:
        return default
    value = data[key]
    if value is None and default is None:
        return None
    # bool is an int subclass; a pid of ``true`` is corruption, not 1.
    if isinstance(value, bool) and kind is not bool and kind != (bool,):
        raise StateFileError(
            f"{where}: field {key!r} must be {_kind_name(kind)}, not a boolean",
            field=key,
        )
    if not isinstance(value, kind):
        raise StateFileError(
            f"{where}: field {key!r} must be {_kind_name(kind)}, not {type(value).__name__}",
            field=key,
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


@dataclass
class JobRecord:
    """The persisted form of a domain's job (libvirt's ``<job>`` status element).

    ``async_job`` is the long-running job (``"migration-out"``, …) with its
    ``phase``; ``active`` is a tracked synchronous job (only ``"destroy"`` is
    persisted, as in libvirt, because a restarted agent must finish it).
    ``owner``/``owner_pid`` name the agent that ran the job so that another
    process can say who holds the domain.
    """

    async_job: str | None = None
    active: str | None = None
    phase: str | None = None
    flags: int = 0
    owner: str | None = None
    owner_pid: int | None = None
    started: float | None = None
    migration_id: str | None = None
    saved_migration: dict[str, Any] | None = None
    #: What recovery needs beyond the phase (peer URI, whether the VM ran,
    #: the outcome once known…); set by the job's owner.
    data: dict[str, Any] = field(default_factory=dict)
    unknown: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping (unknown keys read earlier included)."""
        out: dict[str, Any] = dict(self.unknown)
        out.update(
            {
                "data": self.data,
                "async_job": self.async_job,
                "active": self.active,
                "phase": self.phase,
                "flags": self.flags,
                "owner": self.owner,
                "owner_pid": self.owner_pid,
                "started": self.started,
                "migration_id": self.migration_id,
                "saved_migration": self.saved_migration,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "job record") -> JobRecord:
        """Build a record from its mapping.

        :raises StateFileError: ``data`` is not a mapping or a field has the wrong type.
        """
        if not isinstance(data, dict):
            raise StateFileError(f"{where}: must be an object, not {type(data).__name__}")
        started = _field(data, "started", (int, float), None, where)
        known = {
            "async_job", "active", "phase", "flags", "owner", "owner_pid",
            "started", "migration_id", "saved_migration", "data",
        }  # fmt: skip
        return cls(
            async_job=_field(data, "async_job", str, None, where),
            active=_field(data, "active", str, None, where),
            phase=_field(data, "phase", str, None, where),
            flags=_field(data, "flags", int, 0, where),
            owner=_field(data, "owner", str, None, where),
            owner_pid=_field(data, "owner_pid", int, None, where),
            started=float(started) if started is not None else None,
            migration_id=_field(data, "migration_id", str, None, where),
            saved_migration=_field(data, "saved_migration", dict, None, where),
            data=_field(data, "data", dict, {}, where),
            unknown={k: v for k, v in data.items() if k not in known},
        )


_STATUS_KEYS = frozenset(
    {
        "format", "name", "uuid", "pid", "qmp_path", "start_time", "run_state",
        "cookie", "extra",
    }
)  # fmt: skip
# Keys of the first layout, when the job lived in the status file: dropped
# on read so a stale copy is never written back (jobs live in JOBS_DIR now).
_LEGACY_KEYS = frozenset({"job", "phase", "migration_id"})


@dataclass
class DomainStatus:
    """Live status of one domain, persisted in ``/run/ferry/domains/NAME.status``.

    ``start_time`` is field 22 of ``/proc/PID/stat`` (clock ticks after boot)
    of the qemu process: together with ``pid`` it identifies the process even
    if the pid is reused after qemu died.  The domain's job is *not* here: it
    has its own file (:class:`JobFile`, written only by :mod:`ferry.jobs`), so
    no writer of the status can drop a job record by forgetting to copy it.
    ``cookie`` holds migration cookie data to survive a restart, ``extra`` is
    free for the agents.
    """

    name: str
    uuid: str
    pid: int | None = None
    qmp_path: Path | None = None
    start_time: int | None = None
    run_state: str | None = None
    cookie: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    unknown: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping (unknown keys read earlier included)."""
        out: dict[str, Any] = dict(self.unknown)
        out.update(
            {
                "format": FORMAT_VERSION,
                "name": self.name,
                "uuid": self.uuid,
                "pid": self.pid,
                "qmp_path": str(self.qmp_path) if self.qmp_path is not None else None,
                "start_time": self.start_time,
                "run_state": self.run_state,
                "cookie": self.cookie,
                "extra": self.extra,
            }
        )
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "domain status") -> DomainStatus:
        """Build a status from its mapping; unknown keys are kept, not dropped.

        :raises StateFileError: not a mapping, ``name``/``uuid`` missing, or a
            field of the wrong type.
        """
        if not isinstance(data, dict):
            raise StateFileError(f"{where}: must be a JSON object, not {type(data).__name__}")
        for key in ("name", "uuid"):
            if key not in data:
                raise StateFileError(f"{where}: required field {key!r} is missing", field=key)
        qmp_path = _field(data, "qmp_path", str, None, where)
        return cls(
            name=_field(data, "name", str, "", where),
            uuid=_field(data, "uuid", str, "", where),
            pid=_field(data, "pid", int, None, where),
            qmp_path=Path(qmp_path) if qmp_path is not None else None,
            start_time=_field(data, "start_time", int, None, where),
            run_state=_field(data, "run_state", str, None, where),
            cookie=_field(data, "cookie", dict, {}, where),
            extra=_field(data, "extra", dict, {}, where),
            unknown={
                k: v for k, v in data.items() if k not in _STATUS_KEYS and k not in _LEGACY_KEYS
            },
        )

    def dumps(self) -> bytes:
        """Serialise to the bytes written on disk (sorted, indented: humans read these)."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    def save(self, path: Path) -> None:
        """Write the status atomically to ``path`` (see :func:`atomic_write`).

        :raises OSError: the file cannot be written.
        :raises TypeError: ``cookie``/``extra`` hold values JSON cannot encode.
        """
        atomic_write(Path(path), self.dumps())

    @classmethod
    def loads(cls, raw: bytes, where: str = "domain status") -> DomainStatus:
        """Parse the on-disk bytes.

        :raises StateFileError: empty, not UTF-8, not JSON, or invalid fields.
        """
        if not raw.strip():
            raise StateFileError(f"{where} is empty")
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise StateFileError(f"{where} is corrupt: not UTF-8 (byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            # ``from None``: the operator needs the file and position, not
            # the json module's internals.
            raise StateFileError(
                f"{where} is corrupt: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        return cls.from_dict(data, where)

    @classmethod
    def load(cls, path: Path) -> DomainStatus:
        """Read a status file.

        :raises FileNotFoundError: there is no such file (the domain is not running).
        :raises StateFileError: the file is corrupt (message names file and problem).
        :raises OSError: other read errors.
        """
        path = Path(path)
        raw = path.read_bytes()
        return cls.loads(raw, f"status file {path}")


@dataclass
class JobFile:
    """The job record of one domain, in ``JOBS_DIR/UUID.job``.

    Keyed by UUID (a migration with ``--dname`` renames the domain, never
    changes its UUID) and written only by :class:`ferry.jobs.JobManager`
    while it holds the domain's lock: one owner, one file.
    """

    name: str
    uuid: str
    job: JobRecord

    def dumps(self) -> bytes:
        """Bytes on disk."""
        data = {"format": FORMAT_VERSION, "name": self.name, "uuid": self.uuid,
                "job": self.job.to_dict()}  # fmt: skip
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def load(cls, path: Path) -> JobFile:
        """Read a job file.

        :raises FileNotFoundError: no job is recorded.
        :raises StateFileError: the file is corrupt.
        """
        where = f"job file {path}"
        raw = Path(path).read_bytes()
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StateFileError(f"{where} is corrupt (not UTF-8 JSON)") from None
        if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
            raise StateFileError(f"{where}: expected an object with a job")
        return cls(
            name=_field(data, "name", str, "", where),
            uuid=_field(data, "uuid", str, "", where),
            job=JobRecord.from_dict(data["job"], f"{where}: job"),
        )
