"""Src pre-flight: measure a guest and the path to a destination, and judge.

``ferryctl migrate-check NAME ferry://B`` asks, before anything starts,
whether plain pre-copy converges, in how long, what throttle it needs or
whether it needs post-copy.  Three figures decide (the verdict itself is
sans-I/O, in :mod:`ferry.converge`):

* **dirty rate**: qemu's ``calc-dirty-rate`` over one second.  Under KVM
  in ``dirty-bitmap`` mode (exact: every page written, counted once),
  falling back to ``page-sampling`` where qemu refuses that mode (KVM's
  dirty ring); without KVM always ``page-sampling`` (4096 pages per GiB
  hashed before and after): qemu 7.2 under TCG dies of SIGSEGV on
  ``dirty-bitmap`` (seen here), and a check must never harm the guest.
  qemu reports MiB/s (the QAPI text said "MB/s" until it was corrected;
  the code has always shifted by 20 bits).  A paused guest dirties nothing.
* **resident memory**: qemu's anonymous and shared resident pages, capped
  at the guest's RAM: what the first pass really sends (untouched pages
  are zero pages, which cost almost nothing).  qemu's own heap is counted
  too; it is tens of MiB, an upper bound we accept.
* **link**: a short probe through the agents: frames of random bytes to the
  destination's ``link_probe`` for ~0.5 s (at most 32 MiB), several in
  flight; the destination counts and discards.  The operator's
  ``--bandwidth`` caps the figure.

:func:`measure` is what ``migrate`` reuses (to print the numbers at the top
of a migration and seed the controller); :func:`migrate_check` is the op.
Nothing here takes the domain's job or changes the guest: a check may run
while nobody else may touch the domain, and leaves no trace.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.acl import check_access
from ferry.converge import Goal, Measurements, verdict
from ferry.errors import DomainState, MigrationRefused, QMPError, UnknownOp
from ferry.flags import MigrationFlags, MigrationParams, validate
from ferry.qemu import QMP
from ferry.rpc import RequestContext
from ferry_source.checks import parse_dest_uri
from ferry_source.context import SourceContext
from ferry_source.peer import close_session, connect_peer, request

__all__ = [
    "DEFAULT_MAX_DOWNTIME_MS",
    "LinkProbe",
    "Survey",
    "goal_from",
    "measure",
    "migrate_check",
    "parse_dirty_rate",
    "parse_resident_kib",
    "probe_link",
    "survey",
]

MIB = 1 << 20
#: qemu's ``dirty-rate`` unit (MiB/s, see the module docstring).
DIRTY_RATE_UNIT = MIB
DEFAULT_MAX_DOWNTIME_MS = 300
#: With ``--auto-converge`` and no ``--max-throttle``: qemu's own ceiling.
AUTO_CONVERGE_MAX_THROTTLE_PCT = 99
CALC_TIME_S = 1
#: page-sampling's sample density (qemu's default 512 is coarse for small guests).
SAMPLE_PAGES_PER_GIB = 4096
#: Polling ``query-dirty-rate`` after the calculation should have ended.
POLL_S = 0.05
PROBE_SECONDS = 0.5
PROBE_MAX_BYTES = 32 * MIB
#: Under the 1 MiB frame limit with room for the envelope.
PROBE_CHUNK = 512 * 1024
#: Requests in flight: one at a time would measure round trips, not the link.
PROBE_IN_FLIGHT = 4
PROBE_TIMEOUT_S = 10.0

# One dirty-rate calculation per domain at a time: qemu refuses a second
# while one runs, and two checks of one domain would then fail each other.
_measuring: dict[str, asyncio.Lock] = {}


# -- sans-I/O parts -------------------------------------------------------------


def parse_dirty_rate(reply: Any) -> float | None:
    """``query-dirty-rate``'s reply → bytes per second, or None while measuring.

    Raises:
        QMPError: a reply without a status, or ``measured`` without a rate.
    """
    if not isinstance(reply, Mapping) or not isinstance(reply.get("status"), str):
        raise QMPError(f"QMP command 'query-dirty-rate': unexpected reply {reply!r}")
    if reply["status"] != "measured":
        return None
    rate = reply.get("dirty-rate")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 0:
        raise QMPError(f"QMP command 'query-dirty-rate': measured without a rate: {reply!r}")
    return float(rate * DIRTY_RATE_UNIT)


def parse_resident_kib(status_text: str) -> int | None:
    """Guest-memory-like resident KiB from ``/proc/PID/status``, or None.

    RssAnon + RssShmem (guest RAM is anonymous memory, or shared memory
    with a memfd/shared backing); VmRSS where the kernel lacks the split.
    qemu's binary and libraries (RssFile) are not guest memory.
    """
    fields: dict[str, int] = {}
    for line in status_text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[key.strip()] = int(parts[0])
    if "RssAnon" in fields:
        return fields["RssAnon"] + fields.get("RssShmem", 0)
    return fields.get("VmRSS")


def goal_from(flags: MigrationFlags, params: MigrationParams) -> Goal:
    """The convergence goal a migration with these flags and params sets.

    The downtime defaults to 300 ms (libvirt's default); the throttle to
    none, or qemu's 99 % ceiling with ``--auto-converge``.
    """
    if params.max_throttle_pct is not None:
        throttle = params.max_throttle_pct
    elif flags & MigrationFlags.AUTO_CONVERGE:
        throttle = AUTO_CONVERGE_MAX_THROTTLE_PCT
    else:
        throttle = 0
    downtime = params.max_downtime_ms
    return Goal(
        deadline_s=params.deadline_s,
        max_downtime_ms=DEFAULT_MAX_DOWNTIME_MS if downtime is None else downtime,
        max_throttle_pct=throttle,
        postcopy_allowed=bool(flags & MigrationFlags.POSTCOPY),
    )


def json_safe(value: Any) -> Any:
    """``value`` with infinite and NaN floats as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class LinkProbe:
    """What the probe moved: bytes the destination acknowledged, in seconds."""

    bytes: int
    seconds: float
    in_flight: int

    @property
    def bps(self) -> float:
        """Bytes per second (0 when nothing moved)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Survey:
    """:class:`Measurements` and how they were taken (for the operator)."""

    measurements: Measurements
    run_state: str
    #: ``dirty-bitmap``, ``page-sampling`` or ``none`` (a paused guest).
    dirty_method: str
    probe: LinkProbe | None
    bandwidth_cap_bps: float | None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The ``measurements`` map of ``migrate_check``'s reply (bytes, bytes/s)."""
        m = self.measurements
        probe = None
        if self.probe is not None:
            probe = {"bytes": self.probe.bytes, "seconds": self.probe.seconds,
                     "bps": self.probe.bps, "in_flight": self.probe.in_flight}  # fmt: skip
        return {
            "ram_bytes": m.ram_bytes,
            "resident_bytes": m.resident_bytes,
            "dirty_rate_bps": m.dirty_rate_bps,
            "bandwidth_bps": m.bandwidth_bps,
            "run_state": self.run_state,
            "dirty_rate_method": self.dirty_method,
            "probe": probe,
            "bandwidth_cap_bps": self.bandwidth_cap_bps,
            "notes": list(self.notes),
        }


# -- measuring ------------------------------------------------------------------


def resident_bytes(pid: int, ram_bytes: int) -> int | None:
    """qemu's guest-like resident memory capped at RAM; None if unreadable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = parse_resident_kib(text)
    return None if kib is None else min(kib * 1024, ram_bytes)


async def _calc(qmp: QMP, mode: str, *, calc_time: int) -> float:
    args: dict[str, Any] = {"calc-time": calc_time, "mode": mode}
    if mode == "page-sampling":
        args["sample-pages"] = SAMPLE_PAGES_PER_GIB
    await qmp.execute("calc-dirty-rate", args, timeout=10)
    deadline = time.monotonic() + calc_time + 10
    await asyncio.sleep(calc_time)
    while True:
        rate = parse_dirty_rate(await qmp.execute("query-dirty-rate", timeout=10))
        if rate is not None:
            return rate
        if time.monotonic() > deadline:
            raise QMPError(
                f"qemu did not finish measuring the dirty rate within {calc_time + 10} s",
                command="query-dirty-rate",
            )
        await asyncio.sleep(POLL_S)


async def dirty_rate(qmp: QMP, name: str, *, calc_time: int = CALC_TIME_S) -> tuple[float, str]:
    """Measure the guest's dirty rate for ``calc_time`` s: (bytes/s, method).

    ``dirty-bitmap`` only under KVM (see the module docstring: TCG crashes)
    and while no migration runs (it would touch the migration's dirty log).

    Raises:
        QMPError: qemu could measure it in neither mode.
    """
    async with _measuring.setdefault(name, asyncio.Lock()):
        kvm = await qmp.execute("query-kvm", timeout=10)
        migration = await qmp.execute("query-migrate", timeout=10)
        status = migration.get("status") if isinstance(migration, Mapping) else None
        # dirty-bitmap starts and clears KVM's dirty log, which a running
        # migration relies on; page-sampling only reads pages.
        idle = status in (None, "none", "completed", "failed", "cancelled")
        if idle and isinstance(kvm, Mapping) and kvm.get("enabled") is True:
            try:
                return await _calc(qmp, "dirty-bitmap", calc_time=calc_time), "dirty-bitmap"
            except QMPError as exc:
                # Refused where KVM's dirty ring is on; sampling works everywhere.
                if exc.details.get("command") != "calc-dirty-rate":
                    raise
        return await _calc(qmp, "page-sampling", calc_time=calc_time), "page-sampling"


async def probe_link(
    ctx: SourceContext,
    host: str,
    port: int,
    *,
    seconds: float = PROBE_SECONDS,
    max_bytes: int = PROBE_MAX_BYTES,
    chunk: int = PROBE_CHUNK,
    in_flight: int = PROBE_IN_FLIGHT,
) -> LinkProbe:
    """Send ``link_probe`` frames to the destination for ``seconds`` (≤ ``max_bytes``).

    Raises:
        MigrationRefused, AuthError: the destination cannot be reached.
        UnknownOp: the destination's agent predates ``link_probe``.
        FerryError: the destination refused a probe (its ACL, a broken link).
    """
    session = await connect_peer(ctx.config, host, port)
    try:
        # Random bytes: nothing on the way may compress them into a flattering figure.
        payload = os.urandom(chunk)
        # One small request first: the session and the peer's handler are warm
        # before the clock starts.
        await request(session, "link_probe", {"data": payload[:4096]},
                      timeout=PROBE_TIMEOUT_S, peer=host)  # fmt: skip
        reserved = acked = 0
        start = time.monotonic()
        stop_at = start + seconds

        async def sender() -> None:
            nonlocal reserved, acked
            while time.monotonic() < stop_at and reserved + chunk <= max_bytes:
                reserved += chunk
                reply = await request(session, "link_probe", {"data": payload},
                                      timeout=PROBE_TIMEOUT_S, peer=host)  # fmt: skip
                acked += int(reply.get("bytes", 0))

        tasks = [asyncio.create_task(sender()) for _ in range(in_flight)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            # The first failure is the answer; the others would only repeat it.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        elapsed = time.monotonic() - start
    finally:
        await close_session(session)
    return LinkProbe(bytes=acked, seconds=elapsed, in_flight=in_flight)


async def survey(
    ctx: SourceContext,
    name: str,
    host: str,
    port: int,
    *,
    bandwidth_cap_mib: int | None,
    probe: bool = True,
) -> Survey:
    """Measure ``name`` and the path to ``host:port``, with how it was done.

    ``bandwidth_cap_mib`` (``--bandwidth``; None or 0: none) caps the link
    figure.  ``probe=False`` skips the probe and takes the cap as the link
    (a ``ValueError`` without one).

    Raises:
        NoDomain: no such domain here.
        DomainState: it is not running (no qemu).
        QMPError: qemu could not measure the dirty rate.
        MigrationRefused, AuthError, FerryError: the probe failed.
    """
    cap = float(bandwidth_cap_mib * MIB) if bandwidth_cap_mib else None
    if not probe and cap is None:
        raise ValueError("without a probe the link figure must come from a bandwidth cap")
    live = ctx.host.find(name)
    if live.status is None:
        raise DomainState(f"domain '{live.domain.name}' is not running; only a running "
                          "domain migrates live, so there is nothing to measure",
                          name=live.domain.name)  # fmt: skip
    proc = await ctx.host.process(live.domain.name)
    ram = live.domain.memory_kib * 1024
    notes: list[str] = []
    status = await proc.qmp.query_status()
    if status.running:
        rate, method = await dirty_rate(proc.qmp, live.domain.name)
    else:
        rate, method = 0.0, "none"
        notes.append(f"the guest is not running ({status.status}): it dirties no memory "
                     "now; the figures hold only while it stays so")  # fmt: skip
    resident = resident_bytes(proc.pid, ram)
    if resident is None:
        notes.append("qemu's resident memory is unreadable: the first pass is taken as all RAM")
    link: LinkProbe | None = None
    bandwidth = cap if cap is not None else 0.0
    if probe:
        try:
            link = await probe_link(ctx, host, port)
        except UnknownOp:
            if cap is None:
                raise MigrationRefused(
                    f"ferry-destination at {host}:{port} cannot be probed (it predates "
                    "link_probe); give the link's speed with --bandwidth MiB/s"
                ) from None
            notes.append(f"ferry-destination at {host} predates link_probe: the link is "
                         "taken to be the --bandwidth cap")  # fmt: skip
        if link is not None:
            bandwidth = link.bps if cap is None else min(link.bps, cap)
            if cap is not None and cap < link.bps:
                notes.append(f"the link moved {link.bps / MIB:.0f} MiB/s; --bandwidth caps "
                             f"it at {cap / MIB:.0f} MiB/s")  # fmt: skip
    measurements = Measurements(ram_bytes=ram, resident_bytes=resident,
                                dirty_rate_bps=rate, bandwidth_bps=bandwidth)  # fmt: skip
    return Survey(measurements=measurements, run_state=status.status, dirty_method=method,
                  probe=link, bandwidth_cap_bps=cap, notes=tuple(notes))  # fmt: skip


async def measure(
    ctx: SourceContext,
    name: str,
    host: str,
    port: int,
    *,
    bandwidth_cap_mib: int | None,
    probe: bool = True,
) -> Measurements:
    """The guest's dirty rate, resident memory and the link to ``host:port``.

    For the migration path: call it before qemu's migration starts (once
    one runs, the dirty rate falls back to page-sampling, which is coarser).
    Takes ~1.5 s: 1 s of dirty-rate measuring, up to 0.5 s of probe.
    See :func:`survey` for the arguments and errors.
    """
    found = await survey(ctx, name, host, port, bandwidth_cap_mib=bandwidth_cap_mib,
                         probe=probe)  # fmt: skip
    return found.measurements


# -- the op -----------------------------------------------------------------------


async def migrate_check(
    ctx: SourceContext, req: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """``migrate_check {name, dest_uri, flags, params}``: the pre-flight verdict.

    Flags and params are checked as ``migrate`` checks them; the check is
    always about a live migration.  Nothing of the domain changes.

    Raises:
        MessageInvalid, FlagError: bad params or flags.
        MigrationRefused: a bad destination URI, ``--offline``, an unreachable peer.
        NoDomain, DomainState, AccessDenied, QMPError: as :func:`survey`.
    """
    params = MigrationParams.from_wire(args["params"])
    raw = args["flags"]
    if isinstance(raw, int) and raw & MigrationFlags.OFFLINE:
        raise MigrationRefused("--offline moves no memory: there is nothing to pre-flight")
    flags = validate(raw | MigrationFlags.LIVE if isinstance(raw, int) else raw, params)
    flags |= MigrationFlags.PEER2PEER
    host, port = parse_dest_uri(args["dest_uri"])
    live = ctx.host.find(args["name"])
    check_access(ctx.config.acl, req.subject, "migrate_check", live.domain.name,
                 live.domain.uuid)  # fmt: skip
    goal = goal_from(flags, params)
    found = await survey(ctx, live.domain.name, host, port,
                         bandwidth_cap_mib=params.bandwidth_mib)  # fmt: skip
    judged = verdict(found.measurements, goal)
    result: dict[str, Any] = json_safe({
        "name": live.domain.name,
        "dest": host,
        "goal": {"deadline_s": goal.deadline_s, "max_downtime_ms": goal.max_downtime_ms,
                 "max_throttle_pct": goal.max_throttle_pct,
                 "postcopy_allowed": goal.postcopy_allowed},
        "measurements": found.to_json(),
        "verdict": judged.to_json(),
    })  # fmt: skip
    return result
