"""Structured logging to the systemd journal, with a readable stderr fallback.

A migration involves four processes on two hosts. To follow one, every record
an agent logs carries structured fields that ``journalctl`` can match on, and
``ferryctl`` can merge the two hosts' journals by timestamp::

    journalctl -o json FERRY_MIGRATION_ID=6f1c…   # every record of one migration

Fields written on every record:

=====================  ==================================================
``MESSAGE``            the formatted message (plus traceback, if any)
``PRIORITY``           syslog level (3 error … 7 debug)
``SYSLOG_IDENTIFIER``  the agent (``ferry-source``/``ferry-destination``)
``CODE_FILE/LINE/FUNC`` where the record was logged
``LOGGER``             the Python logger name
``FERRY_HOST``         the host label from the agent config
``MESSAGE_ID``         a :class:`MessageID` for the records that mark events
``FERRY_*``            bound context and per-call fields (see below)
=====================  ==================================================

Context fields come from :class:`LogContext` (a ``contextvars`` binding, so
every record logged inside a migration task carries ``FERRY_MIGRATION_ID``
without passing it around) and from :func:`log_event`'s keyword arguments:
``domain`` → ``FERRY_DOMAIN``, ``uuid`` → ``FERRY_DOMAIN_UUID``,
``migration_id`` → ``FERRY_MIGRATION_ID``, ``phase`` → ``FERRY_PHASE``,
``job`` → ``FERRY_JOB``, ``peer`` → ``FERRY_PEER``, ``host`` → ``FERRY_HOST``;
any other keyword ``foo_bar`` → ``FERRY_FOO_BAR``.

Transport: when the default journal socket ``/run/systemd/journal/socket``
exists, records go through ``systemd.journal.send``. A journal *namespace*
(``systemd-journald NAMESPACE``, socket ``/run/systemd/journal.NAMESPACE/socket``)
or any other socket path is served by a small implementation of the same
native protocol (``systemd.journal.send`` can only talk to the default socket).
When there is no socket, records go to stderr as
``2026-11-25 19:00:01 ferry-source[123] INFO [dom=g1 mig=abcd phase=perform] message``.

Environment overrides (used by tests, and by operators who run agents in a
journal namespace):

* ``FERRY_JOURNAL_NAMESPACE=NS`` — log to and read from namespace ``NS``.
* ``FERRY_JOURNAL_SOCKET=PATH`` — log to that socket; an empty value or
  ``none`` means "no journal", forcing the stderr form.

:func:`notify`, :func:`watchdog_interval` and :func:`listen_fds` live in
:mod:`ferry.sdnotify` and are re-exported here, because this module is where
the design map points for "journald, sd_notify, listen fds".
"""

from __future__ import annotations

import array
import contextlib
import contextvars
import errno
import fcntl
import heapq
import logging
import os
import re
import socket
import stat
import struct
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar, TextIO

from ferry.sdnotify import listen_fds, notify, watchdog_interval

__all__ = [
    "DEFAULT_SOCKET",
    "JournalHandler",
    "LogContext",
    "MessageID",
    "StderrHandler",
    "bind_context",
    "current_context",
    "journal_socket_path",
    "listen_fds",
    "log_event",
    "merge_entries",
    "notify",
    "read_journal",
    "setup_logging",
    "watchdog_interval",
]

DEFAULT_SOCKET = Path("/run/systemd/journal/socket")
ENV_SOCKET = "FERRY_JOURNAL_SOCKET"
ENV_NAMESPACE = "FERRY_JOURNAL_NAMESPACE"


class MessageID:
    """Stable 128-bit MESSAGE_IDs of Ferry's event records.

    Generated once (``uuid4().hex``) and fixed forever: tools and operators
    match on them (``journalctl MESSAGE_ID=…``), so they must never change.
    """

    AGENT_READY: ClassVar[str] = "b54ac9a206be43f98d592b6deb39b0f6"
    DOMAIN_STARTED: ClassVar[str] = "74cb3705178946d4bdf3a9abc500c14f"
    DOMAIN_STOPPED: ClassVar[str] = "078a56cd03bb4e17a31ac8496ee2fcef"
    MIGRATION_STARTED: ClassVar[str] = "f493260092134c81ac77ce7204c35620"
    MIGRATION_PHASE: ClassVar[str] = "da1321ec512e4c64baccd49ecd5c4716"
    MIGRATION_COMPLETED: ClassVar[str] = "72b172e482e245d49b07672ac9d8b453"
    MIGRATION_FAILED: ClassVar[str] = "fab127a25ab94b868310fa03d6cae1b2"
    MIGRATION_ABORTED: ClassVar[str] = "bae181de37854f6ebdf2647dce9c02d1"
    MIGRATION_REFUSED: ClassVar[str] = "9fac4ac65f7a40809609f3c07a0515af"
    MIGRATION_SUMMARY: ClassVar[str] = "5a3ea072941b432b985dcdd9a67382a1"
    #: A lever moved in flight (controller, timeout action, post-copy switch), with its reason.
    MIGRATION_DECISION: ClassVar[str] = "320e9f70e9884754ac16c434402f4b33"

    @classmethod
    def names(cls) -> dict[str, str]:
        """Return ``{id: name}`` for every ID (for viewers that show names)."""
        return {
            value: key
            for key, value in vars(cls).items()
            if key.isupper() and isinstance(value, str)
        }


# ----------------------------------------------------------------- fields

# Keyword → journal field for the fields every tool knows.
_KNOWN_FIELDS: dict[str, str] = {
    "domain": "FERRY_DOMAIN",
    "uuid": "FERRY_DOMAIN_UUID",
    "migration_id": "FERRY_MIGRATION_ID",
    "phase": "FERRY_PHASE",
    "job": "FERRY_JOB",
    "peer": "FERRY_PEER",
    "host": "FERRY_HOST",
}

# Short names in the stderr form, in display order. The host and domain UUID
# are left out: the host is the same on every line, the UUID is long and the
# name identifies the domain for a reader.
_STDERR_KEYS: tuple[tuple[str, str], ...] = (
    ("FERRY_DOMAIN", "dom"),
    ("FERRY_MIGRATION_ID", "mig"),
    ("FERRY_PHASE", "phase"),
    ("FERRY_JOB", "job"),
    ("FERRY_PEER", "peer"),
)

_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def _field_name(key: str) -> str:
    """Map a keyword to a journal field name: known names, else ``FERRY_KEY``.

    Journal field names may contain only ``A-Z0-9_``, must not start with a
    digit or ``_`` (those are trusted fields journald sets itself) and are at
    most 64 characters; anything else would make journald drop the field.
    """
    known = _KNOWN_FIELDS.get(key)
    if known is not None:
        return known
    name = _INVALID_FIELD_CHARS.sub("_", key.upper())
    if not name.startswith("FERRY_"):
        name = "FERRY_" + name.lstrip("_")
    return name[:64]


def _fields(values: Mapping[str, object]) -> dict[str, str]:
    """Normalise keyword → value pairs to journal fields, dropping None."""
    return {_field_name(k): str(v) for k, v in values.items() if v is not None}


# ----------------------------------------------------------------- context

# The default is an immutable empty mapping: every binding builds a new dict,
# nothing ever mutates the one in the variable.
_CONTEXT: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "ferry_log_context", default=MappingProxyType({})
)


def current_context() -> dict[str, str]:
    """Return the journal fields bound in the current context (a copy)."""
    return dict(_CONTEXT.get())


def bind_context(**fields: object) -> None:
    """Bind fields for the rest of the current context (e.g. an asyncio task).

    Each asyncio task runs in a copy of the context it was created in, so
    calling this at the top of a migration task tags that task's records
    (and those of tasks it creates) without affecting anyone else.
    """
    _CONTEXT.set({**_CONTEXT.get(), **_fields(fields)})


class LogContext:
    """Bind fields to every record logged inside a ``with`` block.

    ::

        with LogContext(domain="g1", migration_id=mig_id):
            log.info("starting")          # carries FERRY_DOMAIN, FERRY_MIGRATION_ID
            await run_phases()            # and so does everything it logs

    Nested blocks add to (and may override) the outer fields; leaving a block
    restores the outer set. Tasks created inside the block keep the fields.
    """

    def __init__(
        self,
        *,
        domain: str | None = None,
        uuid: object | None = None,
        migration_id: str | None = None,
        phase: str | None = None,
        job: str | None = None,
        peer: str | None = None,
        **extra_fields: object,
    ) -> None:
        self.fields = _fields(
            {
                "domain": domain,
                "uuid": uuid,
                "migration_id": migration_id,
                "phase": phase,
                "job": job,
                "peer": peer,
                **extra_fields,
            }
        )
        self._tokens: list[contextvars.Token[Mapping[str, str]]] = []

    def __enter__(self) -> LogContext:
        self._tokens.append(_CONTEXT.set({**_CONTEXT.get(), **self.fields}))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _CONTEXT.reset(self._tokens.pop())


def log_event(
    logger: logging.Logger,
    message_id: str,
    message: str,
    *,
    domain: str | None = None,
    uuid: object | None = None,
    migration_id: str | None = None,
    phase: str | None = None,
    job: str | None = None,
    peer: str | None = None,
    level: int = logging.INFO,
    exc_info: bool | BaseException | None = None,
    **extra_fields: object,
) -> None:
    """Log an event record with a ``MESSAGE_ID`` and structured fields.

    The keyword fields are added to (and override) the bound
    :class:`LogContext` for this record only. Extra keywords become
    ``FERRY_<NAME>`` fields, e.g. ``downtime_ms=12`` → ``FERRY_DOWNTIME_MS=12``.
    ``CODE_*`` point at the caller, not at this helper.
    """
    fields = _fields(
        {
            "domain": domain,
            "uuid": uuid,
            "migration_id": migration_id,
            "phase": phase,
            "job": job,
            "peer": peer,
            **extra_fields,
        }
    )
    logger.log(
        level,
        message,
        exc_info=exc_info,
        stacklevel=2,
        extra={"ferry_fields": fields, "ferry_message_id": message_id},
    )


# ----------------------------------------------------------------- records → fields

# logging level → syslog priority. There is no logging level for NOTICE (5).
_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def _priority(levelno: int) -> int:
    for threshold, prio in _PRIORITY:
        if levelno >= threshold:
            return prio
    return 7


def _record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The context and per-record FERRY_* fields of ``record``.

    The context is captured when the record is created (``LogRecord`` is
    built in the logging thread/task), see :class:`_ContextFilter`.
    """
    captured = getattr(record, "ferry_context", None)
    merged: dict[str, str] = dict(_CONTEXT.get() if captured is None else captured)
    own = getattr(record, "ferry_fields", None)
    if isinstance(own, Mapping):
        merged.update({str(k): str(v) for k, v in own.items()})
    return merged


def _message_text(record: logging.LogRecord) -> str:
    """The message, with the traceback appended when the record has one."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[0] is not None:
        text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    elif record.exc_text:
        text += "\n" + record.exc_text
    if record.stack_info:
        text += "\n" + record.stack_info
    return text


class _ContextFilter(logging.Filter):
    """Snapshot the bound context onto the record when it is created.

    Handlers may run later (a QueueHandler, another thread); the fields must
    be those of the task that logged, not of whoever emits.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "ferry_context"):
            record.ferry_context = dict(_CONTEXT.get())
        return True


# ----------------------------------------------------------------- native protocol


def _encode_native(fields: Mapping[str, str]) -> bytes:
    """Encode fields in journald's native protocol (systemd.journal-fields(7)).

    ``KEY=value\\n`` for single-line values; multi-line (or binary) values use
    ``KEY\\n`` + 64-bit little-endian length + value + ``\\n``.
    """
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class _NativeSender:
    """Send entries to a journald socket given by path (e.g. a namespace's).

    Large entries that do not fit a datagram are passed as a sealed memfd,
    exactly as libsystemd's sd_journal_sendv() does.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Ask for a large send buffer like libsystemd does (8 MiB; the kernel
        # caps it at wmem_max for unprivileged callers) to avoid the memfd path.
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)

    def send(self, fields: Mapping[str, str]) -> None:
        """Send one entry; raises OSError when journald is not reachable."""
        payload = _encode_native(fields)
        try:
            self._sock.sendto(payload, str(self.path))
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        fd = os.memfd_create("ferry-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, payload)
            # journald accepts a memfd only if it is sealed against change.
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            self._sock.sendmsg(
                [],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))],
                0,
                str(self.path),
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the datagram socket."""
        self._sock.close()


class _SystemdSender:
    """Send entries with ``systemd.journal.send`` (default socket only)."""

    def __init__(self) -> None:
        import systemd.journal  # lazily: stderr-only runs never need it

        self._send = systemd.journal.send

    def send(self, fields: Mapping[str, str]) -> None:
        """Send one entry; raises OSError when journald is not reachable."""
        args: dict[str, object] = dict(fields)
        # journal.send formats CODE_LINE with "{:d}": it must be an int.
        if "CODE_LINE" in args:
            args["CODE_LINE"] = int(fields["CODE_LINE"])
        self._send(**args)

    def close(self) -> None:
        """Nothing to close: libsystemd keeps its own socket."""


# ----------------------------------------------------------------- handlers


def _format_stderr(record: logging.LogRecord, agent: str, fields: Mapping[str, str]) -> str:
    """``2026-11-25 19:00:01 ferry-source[123] INFO [dom=g1 mig=abcd] message``."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
    ctx = " ".join(f"{short}={fields[key]}" for key, short in _STDERR_KEYS if key in fields)
    ctx_part = f" [{ctx}]" if ctx else ""
    return f"{stamp} {agent}[{record.process}] {record.levelname}{ctx_part} {_message_text(record)}"


class StderrHandler(logging.Handler):
    """Write records in the readable one-line form (see the module docstring)."""

    def __init__(self, agent: str, *, stream: TextIO | None = None) -> None:
        super().__init__()
        self.agent = agent
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record; stderr is looked up per record so tests can capture it."""
        try:
            stream = self._stream or sys.stderr
            stream.write(_format_stderr(record, self.agent, _record_fields(record)) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class JournalHandler(logging.Handler):
    """Send records to journald with Ferry's structured fields.

    If a send fails (journald restarting, socket gone) the record is written
    to stderr in the readable form instead of being lost; under systemd,
    stderr goes to the journal as well once it is back.
    """

    def __init__(
        self,
        agent: str,
        *,
        host: str | None = None,
        socket_path: Path | None = None,
    ) -> None:
        super().__init__()
        self.agent = agent
        self.host = host
        self.socket_path = socket_path or DEFAULT_SOCKET
        self._sender: _NativeSender | _SystemdSender
        if self.socket_path == DEFAULT_SOCKET:
            self._sender = _SystemdSender()
        else:
            self._sender = _NativeSender(self.socket_path)
        self._fallback = StderrHandler(agent)

    def journal_fields(self, record: logging.LogRecord) -> dict[str, str]:
        """Return every field that would be sent for ``record``."""
        fields: dict[str, str] = {
            "MESSAGE": _message_text(record),
            "PRIORITY": str(_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.agent,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "LOGGER": record.name,
        }
        if self.host:
            fields["FERRY_HOST"] = self.host
        fields.update(_record_fields(record))
        message_id = getattr(record, "ferry_message_id", None)
        if message_id:
            fields["MESSAGE_ID"] = str(message_id)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        """Send one record; on failure write it to stderr instead."""
        try:
            fields = self.journal_fields(record)
        except Exception:
            self.handleError(record)
            return
        try:
            self._sender.send(fields)
        except OSError:
            self._fallback.emit(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        """Close the transport."""
        self._sender.close()
        super().close()


def journal_socket_path(
    *, namespace: str | None = None, journal_socket: Path | str | None = None
) -> Path | None:
    """Return the journal socket to log to, or None for "no journal".

    Precedence: ``journal_socket``, then ``namespace``, then
    ``$FERRY_JOURNAL_SOCKET`` (empty or ``none`` → None), then
    ``$FERRY_JOURNAL_NAMESPACE``, then the default socket. The path is
    returned whether or not it exists; :func:`setup_logging` checks.
    """
    if journal_socket is not None:
        return Path(journal_socket)
    if namespace:
        return Path(f"/run/systemd/journal.{namespace}/socket")
    env = os.environ.get(ENV_SOCKET)
    if env is not None:
        return None if env.strip().lower() in ("", "none") else Path(env)
    env_ns = os.environ.get(ENV_NAMESPACE)
    if env_ns:
        return Path(f"/run/systemd/journal.{env_ns}/socket")
    return DEFAULT_SOCKET


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False


def setup_logging(
    agent: str,
    *,
    level: int = logging.INFO,
    stderr: bool | None = None,
    host: str | None = None,
    namespace: str | None = None,
    journal_socket: Path | str | None = None,
) -> None:
    """Route the root logger to the journal (or stderr) for agent ``agent``.

    ``agent`` becomes ``SYSLOG_IDENTIFIER``; ``host`` (the host label from
    the config) becomes ``FERRY_HOST`` on every record. ``stderr=None`` picks
    the journal if its socket exists and stderr otherwise; ``True`` forces
    stderr, ``False`` forces the journal (records that cannot be sent then
    still fall back to stderr one by one). ``namespace``/``journal_socket``
    select a journal other than the default (see :func:`journal_socket_path`).

    Calling it again replaces the handlers it installed before, so tests and
    a config reload can switch targets.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, JournalHandler | StderrHandler):
            root.removeHandler(old)
            old.close()
    path = journal_socket_path(namespace=namespace, journal_socket=journal_socket)
    # stderr=None: the journal if its socket is there; True/False force a side.
    use_journal = (path is not None and _is_socket(path)) if stderr is None else not stderr
    handler: logging.Handler
    if use_journal:
        handler = JournalHandler(agent, host=host, socket_path=path or DEFAULT_SOCKET)
    else:
        handler = StderrHandler(agent)
    handler.addFilter(_ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)


# ----------------------------------------------------------------- reading

# Keep raw values: the default converters turn timestamps into naive-local
# datetimes and MESSAGE_ID into uuid.UUID, neither of which is JSON-safe.
_CONVERTERS: dict[str, Any] = {
    "MESSAGE_ID": bytes.decode,
    "_SOURCE_REALTIME_TIMESTAMP": int,
    "__REALTIME_TIMESTAMP": int,
    "_BOOT_ID": bytes.decode,
    "_MACHINE_ID": bytes.decode,
    "__MONOTONIC_TIMESTAMP": lambda m: m,
}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        # A field logged twice in one entry: keep the last value.
        return _text(value[-1]) if value else ""
    return str(value)


def _entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Turn one Reader entry into the JSON-safe dict :func:`read_journal` returns."""
    usec = raw.get("_SOURCE_REALTIME_TIMESTAMP") or raw.get("__REALTIME_TIMESTAMP") or 0
    try:
        stamp = int(usec) / 1_000_000
    except (TypeError, ValueError):
        stamp = 0.0
    try:
        priority: int | None = int(raw["PRIORITY"])
    except (KeyError, TypeError, ValueError):
        priority = None
    entry: dict[str, Any] = {
        "timestamp": stamp,
        "host": _text(raw.get("FERRY_HOST") or raw.get("_HOSTNAME") or ""),
        "agent": _text(raw.get("SYSLOG_IDENTIFIER") or raw.get("_COMM") or ""),
        "pid": int(raw["_PID"]) if isinstance(raw.get("_PID"), int) else None,
        "message": _text(raw.get("MESSAGE", "")),
        "priority": priority,
        "message_id": _text(raw["MESSAGE_ID"]) if "MESSAGE_ID" in raw else None,
        "cursor": _text(raw.get("__CURSOR", "")),
    }
    for key, value in raw.items():
        if key.startswith("FERRY_"):
            entry[key] = _text(value)
    return entry


def read_journal(
    *,
    migration_id: str | None = None,
    domain: str | None = None,
    since: float | None = None,
    directory: Path | None = None,
    namespace: str | None = None,
) -> list[dict[str, Any]]:
    """Return Ferry's journal entries, oldest first, as JSON-safe dicts.

    Filters: ``migration_id`` (``FERRY_MIGRATION_ID``), ``domain``
    (``FERRY_DOMAIN``) — both must match when both are given — and
    ``since`` (Unix time, seconds). Source: ``directory`` (journal files,
    e.g. copied from another host), else ``namespace`` (or
    ``$FERRY_JOURNAL_NAMESPACE``), else the local system journal.

    Each entry: ``timestamp`` (float seconds), ``host`` (``FERRY_HOST``, or
    the kernel host name), ``agent``, ``pid``, ``message``, ``priority``,
    ``message_id``, ``cursor`` and every ``FERRY_*`` field under its journal
    name.
    """
    import systemd.journal  # lazily: only readers need libsystemd

    if directory is not None:
        reader = systemd.journal.Reader(path=str(directory), converters=_CONVERTERS)
    else:
        ns = namespace or os.environ.get(ENV_NAMESPACE) or None
        reader = systemd.journal.Reader(namespace=ns, converters=_CONVERTERS)
    try:
        if migration_id is not None:
            reader.add_match(FERRY_MIGRATION_ID=migration_id)
        if domain is not None:
            reader.add_match(FERRY_DOMAIN=domain)
        if migration_id is None and domain is None:
            # Only Ferry's own records: those carry a FERRY_HOST or a
            # Ferry agent identifier.
            reader.add_match(SYSLOG_IDENTIFIER="ferry-source")
            reader.add_disjunction()
            reader.add_match(SYSLOG_IDENTIFIER="ferry-destination")
        if since is not None:
            reader.seek_realtime(float(since))
        entries = [_entry(raw) for raw in reader]
    finally:
        reader.close()
    if since is not None:
        entries = [e for e in entries if e["timestamp"] >= since]
    entries.sort(key=lambda e: e["timestamp"])
    return entries


def merge_entries(*lists: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge entry lists (e.g. both hosts' :func:`read_journal`) by timestamp.

    The merge is stable: entries with equal timestamps keep the order of the
    lists they came from. An entry that appears in more than one list (same
    host and cursor) is kept once.
    """
    merged = heapq.merge(
        *(sorted(lst, key=lambda e: e["timestamp"]) for lst in lists), key=lambda e: e["timestamp"]
    )
    seen: set[tuple[str, str]] = set()
    out: list[dict[str, Any]] = []
    for entry in merged:
        cursor = entry.get("cursor")
        if cursor:
            key = (str(entry.get("host", "")), str(cursor))
            if key in seen:
                continue
            seen.add(key)
        out.append(entry)
    return out
