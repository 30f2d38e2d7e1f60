"""A thin QMP client over ``qemu.qmp`` with Ferry's errors and event fan-out.

Why a wrapper rather than ``qemu.qmp.QMPClient`` directly:

* Errors: every failure (connect, command error, connection lost mid-command,
  timeout) becomes :class:`~ferry.errors.QMPError` whose message names the
  command and carries qemu's own ``desc``; callers catch one class.
* Events: ``QMPClient`` registers a default listener that keeps *every* event
  in an unbounded history; an agent that follows a migration for hours cannot
  afford that. :class:`QMP` replaces the dispatch with bounded per-subscriber
  queues, and adds the one event qemu cannot send: ``"disconnected"``, delivered
  to every subscriber when the socket closes (qemu exited or crashed).

QEMU's QMP socket accepts one client at a time, so one :class:`QMP` per qemu per
process; the job model (:mod:`ferry.jobs`) makes sure only one agent talks to a
domain's qemu at a time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp.message import Message

from ferry.errors import QMPError

__all__ = [
    "DISCONNECTED",
    "QMP",
    "WATCHED_EVENTS",
    "EventSubscription",
    "QMPEvent",
    "RunStatus",
]

#: Name of the synthetic event delivered when the QMP connection closes.
DISCONNECTED = "disconnected"

#: The qemu events the agents act on (a subscription may ask for any names).
WATCHED_EVENTS = frozenset(
    {"STOP", "RESUME", "SHUTDOWN", "BLOCK_IO_ERROR", "MIGRATION", "MIGRATION_PASS"}
)

# query-status ``status`` → why the CPUs are not running (libvirt's
# qemuMonitorVMStatusToPausedReason, with qemu's own words where they exist).
_PAUSE_REASONS: dict[str, str] = {
    "debug": "debug",
    "inmigrate": "migration",
    "postmigrate": "migration",
    "finish-migrate": "migration",
    "internal-error": "internal-error",
    "io-error": "io-error",
    "paused": "user",
    "prelaunch": "prelaunch",
    "restore-vm": "snapshot",
    "save-vm": "save",
    "shutdown": "shutdown",
    "suspended": "suspended",
    "watchdog": "watchdog",
    "guest-panicked": "crashed",
    "colo": "colo",
}


@dataclass(frozen=True)
class RunStatus:
    """Result of ``query-status``.

    ``status`` is qemu's RunState (``running``, ``paused``, ``io-error``,
    ``postmigrate``, …); ``reason`` says why the CPUs are stopped (``None``
    while running): ``io-error`` for a disk error pause, ``migration``,
    ``user``, ``shutdown``…
    """

    running: bool
    status: str
    reason: str | None


@dataclass(frozen=True)
class QMPEvent:
    """One qemu event (or the synthetic ``"disconnected"``).

    ``timestamp`` is qemu's (seconds since the epoch) for real events and the
    local time of the disconnect for ``"disconnected"``.
    """

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


class EventSubscription:
    """A bounded queue of events for one consumer; async-iterable.

    Iteration yields events in order and ends after the ``"disconnected"``
    event. If the consumer falls behind by more than ``maxsize`` events the
    oldest are dropped (counted in :attr:`dropped`) so a stalled consumer
    cannot grow the agent's memory; ``"disconnected"`` is never dropped.
    Use as a context manager (``with qmp.subscribe(...) as sub:``) so the
    subscription is removed when done.
    """

    def __init__(self, owner: QMP, names: Iterable[str] | None, maxsize: int) -> None:
        self._owner = owner
        self.names: frozenset[str] | None = frozenset(names) if names is not None else None
        self._queue: collections.deque[QMPEvent] = collections.deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._final: QMPEvent | None = None
        self._final_delivered = False
        self.dropped = 0

    def accepts(self, name: str) -> bool:
        """Whether this subscription wants events called ``name``."""
        return name == DISCONNECTED or self.names is None or name in self.names

    def _push(self, event: QMPEvent) -> None:
        if event.name == DISCONNECTED:
            self._final = event
        else:
            if len(self._queue) >= self._maxsize:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(event)
        self._wakeup.set()

    async def get(self, timeout: float | None = None) -> QMPEvent:
        """Return the next event, waiting up to ``timeout`` seconds (None: forever).

        After the connection closed and all queued events were returned,
        every call returns the ``"disconnected"`` event at once.

        :raises QMPError: no event arrived within ``timeout``.
        """
        try:
            async with asyncio.timeout(timeout):
                while not self._queue and self._final is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except TimeoutError:
            raise QMPError(f"no qemu event within {timeout:g}s") from None
        if self._queue:
            return self._queue.popleft()
        assert self._final is not None
        self._final_delivered = True
        return self._final

    async def wait_for(
        self,
        name: str,
        timeout: float,
        *,
        match: Mapping[str, Any] | None = None,
    ) -> QMPEvent:
        """Wait for an event named ``name`` whose data contains ``match``.

        Events that arrive before it stay queued, in order, for later
        :meth:`get` calls: waiting for one event never hides another.

        :raises QMPError: the timeout expired, or the connection closed first
            (unless ``name`` is ``"disconnected"``).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        skipped: list[QMPEvent] = []
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QMPError(f"no {name} event from qemu within {timeout:g}s")
                if not self._queue and self._final is not None and name != DISCONNECTED:
                    raise QMPError(
                        f"QMP connection closed while waiting for {name}: "
                        f"{self._final.data.get('reason', 'closed')}"
                    )
                try:
                    event = await self.get(remaining)
                except QMPError:
                    raise QMPError(f"no {name} event from qemu within {timeout:g}s") from None
                if event.name == name and all(
                    event.data.get(k) == v for k, v in (match or {}).items()
                ):
                    return event
                if event.name != DISCONNECTED:
                    skipped.append(event)
        finally:
            # Put the skipped events back in front of anything newer.
            self._queue.extendleft(reversed(skipped))

    def pending(self) -> list[QMPEvent]:
        """Remove and return the events queued so far, without waiting."""
        events = list(self._queue)
        self._queue.clear()
        return events

    def close(self) -> None:
        """Stop receiving events (idempotent)."""
        self._owner._unsubscribe(self)

    def __enter__(self) -> EventSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[QMPEvent]:
        return self

    async def __anext__(self) -> QMPEvent:
        if self._final_delivered and not self._queue:
            raise StopAsyncIteration
        return await self.get()


class _Client(QMPClient):
    """QMPClient whose events go to :class:`QMP`'s subscriptions only.

    Overriding the dispatch bypasses the library's default listener, whose
    unbounded history would grow for as long as the agent runs.
    """

    def __init__(self, name: str, owner: QMP) -> None:
        super().__init__(name)
        self._ferry_owner = owner

    async def _event_dispatch(self, msg: Message) -> None:
        self._ferry_owner._dispatch(msg)


class QMP:
    """One QMP connection to one qemu.

    ``connect`` → ``execute``/``subscribe`` → ``close``. The connection may
    also end on its own (qemu exited); :attr:`connected` turns False, every
    subscription gets ``"disconnected"`` and :meth:`wait_disconnected` returns.
    """

    def __init__(self, name: str = "ferry") -> None:
        self.name = name
        self._client: _Client | None = None
        self._subs: list[EventSubscription] = []
        self._watcher: asyncio.Task[None] | None = None
        self._closed: asyncio.Event | None = None
        self._dc_lock: asyncio.Lock | None = None
        self._closing = False
        self.disconnect_reason: str | None = None

    # -- connection -------------------------------------------------------

    async def connect(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        """Connect to qemu's QMP unix socket and negotiate capabilities.

        The timeout matters: qemu serves one QMP client at a time, and a second
        client's connect is accepted by the kernel but never greeted.

        :raises QMPError: already connected, socket missing/refused, no
            greeting within ``timeout``, or negotiation failed.
        """
        if self._client is not None and not (self._closed is not None and self._closed.is_set()):
            raise QMPError(f"QMP {self.name}: already connected")
        self._closed = asyncio.Event()
        self._dc_lock = asyncio.Lock()
        self._closing = False
        self.disconnect_reason = None
        client = _Client(self.name, self)
        try:
            async with asyncio.timeout(timeout):
                await client.connect(os.fspath(path))
        except TimeoutError:
            raise QMPError(
                f"QMP {os.fspath(path)}: no greeting within {timeout:g}s "
                "(is another client connected?)",
                path=os.fspath(path),
            ) from None
        except ConnectError as exc:
            raise QMPError(
                f"QMP {os.fspath(path)}: cannot connect: {_describe(exc.exc)}",
                path=os.fspath(path),
            ) from exc
        except (_LibQMPError, OSError) as exc:
            raise QMPError(
                f"QMP {os.fspath(path)}: cannot connect: {_describe(exc)}", path=os.fspath(path)
            ) from exc
        self._client = client
        self._watcher = asyncio.create_task(self._watch(client), name=f"qmp-watch-{self.name}")

    @property
    def connected(self) -> bool:
        """True while the session is up (False before connect and after any disconnect)."""
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def close(self) -> None:
        """Disconnect (idempotent). qemu keeps running; subscribers get ``"disconnected"``."""
        client = self._client
        if client is None:
            return
        self._closing = True
        await self._disconnect_client(client)
        if self._watcher is not None:
            await self._watcher

    async def wait_disconnected(self, timeout: float | None = None) -> bool:
        """Wait until the connection has closed; return False on timeout.

        Never raises for a timeout: the caller decides what a live connection
        means. Returns True at once if never connected or already closed.
        """
        if self._closed is None or self._client is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True

    async def _watch(self, client: _Client) -> None:
        # The library moves to DISCONNECTING by itself when qemu hangs up, but
        # only returns to IDLE (and tells the reason) when someone calls
        # disconnect(); this task is that someone.
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        reason = await self._disconnect_client(client)
        if self.disconnect_reason is None:
            self.disconnect_reason = reason or (
                "closed by ferry" if self._closing else "qemu closed the connection"
            )
        event = QMPEvent(DISCONNECTED, {"reason": self.disconnect_reason}, time.time())
        for sub in list(self._subs):
            sub._push(event)
        if self._closed is not None:
            self._closed.set()

    async def _disconnect_client(self, client: _Client) -> str | None:
        # One caller at a time: qemu.qmp asserts if disconnect() runs twice.
        assert self._dc_lock is not None
        async with self._dc_lock:
            if client.runstate == Runstate.IDLE:
                return None
            try:
                await client.disconnect()
            except EOFError:
                return "qemu closed the connection"
            except Exception as exc:  # the bottom half's failure, re-raised here
                return f"connection lost: {_describe(exc)}"
            return None

    # -- commands ---------------------------------------------------------

    async def execute(
        self, cmd: str, args: Mapping[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        :raises QMPError: not connected; qemu answered with an error (message
            has the command, qemu's ``desc`` and error class); the connection
            closed before the reply; or no reply within ``timeout``.
        """
        client = self._client
        if client is None or client.runstate != Runstate.RUNNING:
            reason = self.disconnect_reason or "not connected"
            raise QMPError(f"QMP command {cmd!r}: {reason}", command=cmd)
        try:
            async with asyncio.timeout(timeout):
                return await client.execute(cmd, dict(args) if args is not None else None)
        except ExecuteError as exc:
            raise QMPError(
                f"QMP command {cmd!r} failed: {exc.error.error.desc} ({exc.error.error.class_})",
                command=cmd,
                error_class=exc.error.error.class_,
                desc=exc.error.error.desc,
            ) from None
        except ExecInterruptedError:
            raise QMPError(
                f"QMP command {cmd!r}: connection to qemu lost before the reply", command=cmd
            ) from None
        except TimeoutError:
            raise QMPError(
                f"QMP command {cmd!r}: no reply within {timeout:g}s", command=cmd, timeout=True
            ) from None
        except _LibQMPError as exc:
            raise QMPError(f"QMP command {cmd!r}: {_describe(exc)}", command=cmd) from exc

    async def query_status(self) -> RunStatus:
        """``query-status`` with the pause reason decoded.

        :raises QMPError: as :meth:`execute`, or the reply is malformed.
        """
        reply = await self.execute("query-status")
        if not isinstance(reply, dict) or not isinstance(reply.get("status"), str):
            raise QMPError(f"QMP command 'query-status': unexpected reply {reply!r}")
        running = bool(reply.get("running"))
        status = reply["status"]
        reason = None if running else _PAUSE_REASONS.get(status, status)
        return RunStatus(running=running, status=status, reason=reason)

    # -- events -----------------------------------------------------------

    def subscribe(
        self, names: Iterable[str] | None = WATCHED_EVENTS, *, maxsize: int = 1024
    ) -> EventSubscription:
        """Start receiving events named in ``names`` (None: every event).

        Subscribe *before* issuing the command whose event you wait for, or
        it may arrive first. ``"disconnected"`` is always delivered. If the
        connection is already closed, the subscription yields
        ``"disconnected"`` at once.
        """
        sub = EventSubscription(self, names, maxsize)
        self._subs.append(sub)
        if self._closed is not None and self._closed.is_set():
            sub._push(QMPEvent(DISCONNECTED, {"reason": self.disconnect_reason}, time.time()))
        return sub

    def events(self, names: Iterable[str] | None = WATCHED_EVENTS) -> EventSubscription:
        """Alias of :meth:`subscribe`: ``async for ev in qmp.events(): …``."""
        return self.subscribe(names)

    def _unsubscribe(self, sub: EventSubscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def _dispatch(self, msg: Message) -> None:
        name = msg.get("event")
        if not isinstance(name, str):
            return
        data = msg.get("data")
        stamp = msg.get("timestamp")
        ts = time.time()
        if isinstance(stamp, dict):
            secs, usecs = stamp.get("seconds"), stamp.get("microseconds")
            if isinstance(secs, int) and isinstance(usecs, int):
                ts = secs + usecs / 1e6
        event = QMPEvent(name, dict(data) if isinstance(data, dict) else {}, ts)
        for sub in list(self._subs):
            if sub.accepts(name):
                sub._push(event)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
