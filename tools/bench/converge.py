"""Convergence benchmark (issue 12): a guest that dirties memory faster than the link.

Question: when a guest rewrites its working set faster than the link can
carry it, how do qemu's own answers (nothing, auto-converge, a large
downtime limit) compare with Ferry's (post-copy after the first pass, the
deadline controller), in total time, in the downtime the guest really sees,
in how hard the guest is throttled and in bytes sent?  And is the
controller's ETA right?

One run, on the two-host test bed (``tools/testbed/cluster.py``), the
workload: a ``--mem-mib`` (1024) MiB test guest, ``--wss-mib`` (256) MiB
working set rewritten flat out (``rate=0``), serial report every
``--report-ms`` (50) ms, and ``--bandwidth`` (128) MiB/s for every variant
(it stands for the link, so it is held fixed, post-copy included)::

    .venv/bin/python tools/bench/converge.py                        # every variant, 3 reps
    .venv/bin/python tools/bench/converge.py --variants qemu-plain,ferry-ctl --reps 5
    .venv/bin/python tools/bench/converge.py --quick --reps 1 --variants qemu-plain
    .venv/bin/python tools/bench/converge.py --json > converge.json
    FERRY_KEEP_TESTBED=1 .venv/bin/python tools/bench/converge.py   # keep the tree (agent logs)

Variants (``--variants``, comma-separated; ``--help`` lists them), run
interleaved: each repetition runs every selected variant once, the order
rotated by one per repetition so that drift on the host spreads evenly:

- ``qemu-plain``, ``qemu-ac`` (auto-converge, qemu's defaults: 20 % then
  +10 % per pass up to 99 %), ``qemu-dt3000`` (downtime limit 3000 ms):
  the baselines, two bare qemus driven by a minimal QMP driver in this
  process (the qemu argv Ferry would use, ``ferry.domain.to_qemu_argv`` +
  ``ferry.qemu.launch``, in the hosts' namespaces, as
  ``tools/bench/migration.py`` does), cancelled with ``migrate_cancel``
  after ``--cutoff`` (60) s and then reported as "did not finish";
- ``ferry-postcopy``: ``ferryctl migrate --live --postcopy
  --postcopy-after-precopy``;
- ``ferry-ctl``: ``ferryctl migrate --live --deadline 10 --max-downtime 500
  --max-throttle 50 --postcopy`` (the controller may switch to post-copy);
- ``zip-*``: the same on a guest whose pages compress well (``zip=1``, see
  tools/guest/guest.S "zip mode"; a rewrite changes 16 bytes of a page),
  the Ferry variants with ``--compressed`` (xbzrle), plus ``zip-qemu-xbzrle``,
  bare qemu with xbzrle, as their like-for-like baseline.  Both xbzrle
  variants get an xbzrle cache of ``--xbzrle-cache-mib`` (512: qemu's
  default 64 MiB cannot hold a 256 MiB working set, and a cache miss sends
  the whole page); 0 leaves qemu's default.

Every Ferry variant also gets ``--bandwidth`` and, with post-copy,
``--postcopy-bandwidth`` (qemu's post-copy default is unlimited); a Ferry
variant that is not finished after ``--cutoff`` s gets SIGINT (ferryctl
aborts the migration) and is reported as "did not finish" too.

Every trial starts from a freshly booted guest on host a that has filled its
RAM and completed one verification sweep (so its ``sum`` is known), and
migrates it to host b.  Before the migration starts, free host memory is
warmed as in migration.py (``--memory``), because the destination qemu
preallocates guest RAM inside the measured time.  Figures per trial:

- ``total``: wall time from the start of the migration (ferryctl started;
  for the baselines: destination qemu launched) to the VM running on b
  (ferryctl's result event; ``cont`` done on the destination);
- ``qemu down``: qemu's own ``downtime`` (ms);
- ``guest gap``: the downtime the guest saw: the largest interval between
  consecutive serial reports (by counter, read from both qemus' serial
  sockets at once, host clock) from the start of the migration until 2 s
  after its end.  A report period is included: an undisturbed guest shows
  ``--report-ms``.  Throttling and post-copy page faults show here too;
- ``guest speed``: the guest's rewrite rate during the migration (start to
  end, host clock) in % of its rate in the 2 s before: throttling and
  post-copy page faults slow a guest without necessarily leaving a gap;
- ``throttle``: the highest CPU throttle qemu applied (baselines: polled
  ``cpu-throttle-percentage``; Ferry: progress events and the result);
- ``MiB sent``: qemu's ``ram.transferred`` (compressed bytes with xbzrle);
- ``bad``: the guest's bad-page count once it has completed two more
  verification sweeps after the migration (on b, or on a after a cancelled
  one), which must be 0, with its ``sum`` checked against the expectation;
- ``ETA err``: Ferry variants only: the ``eta_s`` of the last progress event
  received before one third of the trial's total time, as a predicted end
  (receive time + ``eta_s``) minus the real end (the result event), in
  seconds (positive: predicted too late) and in % of the total; n/a for the
  baselines, for trials that did not finish and when no progress event
  carried ``eta_s`` by then.

The table gives median/min/max over the reps that finished (with how many
did), and the ratios of the medians of ``total`` and ``guest gap`` against
each qemu baseline on the same guest ("<" when the baseline did not finish:
the ratio is then an upper bound, taken with the cutoff as its time).  A
trial that fails (any error: a refused flag, a feature not there yet, a
guest that stops) is printed with its error and counted as failed; the run
goes on.  ``--json`` prints every trial and the summary as one object.

Clean-up: the test bed (agents, every qemu in the namespaces, the
namespaces, the temporary tree) and this process's own qemus are torn down
on success, failure, Ctrl-C and SIGTERM.

Not part of the test suite: a full run takes roughly 30-40 minutes on two
CPUs; ``--quick`` (256 MiB guest, 64 MiB working set, 15 s cut-off) is a
smoke run of a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _sub in ("tools/testbed", "tools/guest", "tools/bench"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

# The conventions (logging on stderr, warm memory, SIGTERM unwinding) are
# migration.py's; share them rather than keep two copies in step.
from migration import (  # noqa: E402
    MIB,
    ferryctl_bin,
    kvm_opens,
    log,
    prepare_memory,
    sigterm_as_interrupt,
)

import testguest  # noqa: E402
from cluster import Cluster, HostEnv, guest_xml  # noqa: E402

BASELINE_PORT = 49350  # outside the agents' migration_ports (49200-49299)
SHAPE_HEADROOM = 1.05  # the shaper sits above qemu's limit: TCP/IP headers, qemu binds first
POLL_S = 0.05  # the minimal driver's query-migrate interval
AFTER_END_S = 2.0  # the guest-gap window reaches this far past the end


@dataclass(frozen=True)
class Variant:
    """One way of migrating the benchmark's guest."""

    name: str
    driver: str  # "qemu" (minimal QMP driver) or "ferry" (ferryctl)
    zip: bool  # guest with compressible pages (zip=1)
    title: str
    baseline: bool = False  # a qemu variant the others are compared with
    # qemu driver
    caps: tuple[str, ...] = ()
    downtime_ms: int | None = None
    # ferry driver
    mode: str = ""  # "postcopy", "ctl", or a compression method (pre-copy)


def _variants() -> dict[str, Variant]:
    """Every variant, by name: on the default guest, then on the zip guest."""
    out: dict[str, Variant] = {}
    for zip_ in (False, True):
        p = "zip-" if zip_ else ""
        guest = " (zip guest)" if zip_ else ""
        comp = " --compressed" if zip_ else ""
        rows = [
            Variant(f"{p}qemu-plain", "qemu", zip_, f"qemu plain{guest}", baseline=True),
            Variant(f"{p}qemu-ac", "qemu", zip_, f"qemu auto-converge{guest}", baseline=True,
                    caps=("auto-converge",)),
            Variant(f"{p}qemu-dt3000", "qemu", zip_, f"qemu downtime 3000 ms{guest}",
                    baseline=True, downtime_ms=3000),
        ]  # fmt: skip
        if zip_:
            rows.append(Variant("zip-qemu-xbzrle", "qemu", True, "qemu xbzrle (zip guest)",
                                baseline=True, caps=("xbzrle",)))  # fmt: skip
        rows += [
            Variant(f"{p}ferry-postcopy", "ferry", zip_, f"ferry post-copy after pre-copy{comp}",
                    mode="postcopy"),
            Variant(f"{p}ferry-ctl", "ferry", zip_, f"ferry controller + post-copy{comp}",
                    mode="ctl"),
            # Pre-copy with one compression method and nothing else: what
            # each does for this guest (zstd/zlib compress multifd channels).
            Variant(f"{p}ferry-xbzrle", "ferry", zip_, f"ferry pre-copy, xbzrle{guest}",
                    mode="xbzrle"),
            Variant(f"{p}ferry-zstd", "ferry", zip_, f"ferry pre-copy, zstd x2{guest}",
                    mode="zstd"),
            Variant(f"{p}ferry-zlib", "ferry", zip_, f"ferry pre-copy, zlib x2{guest}",
                    mode="zlib"),
        ]  # fmt: skip
        out.update((v.name, v) for v in rows)
    return out


VARIANTS = _variants()


@dataclass
class Trial:
    """One migration of one variant."""

    variant: str
    rep: int
    finished: bool = False  # the VM runs on the destination
    error: str | None = None  # the trial failed (not: did not finish in time)
    total_ms: float | None = None
    qemu_total_ms: float | None = None
    qemu_downtime_ms: float | None = None
    guest_gap_ms: float | None = None
    guest_speed_pct: float | None = None  # rewrite rate during / before the migration
    peak_throttle_pct: int | None = None
    sent_mib: float | None = None
    bad_pages: int | None = None
    sum_ok: bool | None = None
    eta_error_s: float | None = None
    eta_error_pct: float | None = None
    eta_note: str | None = None  # why there is no ETA error
    postcopy: bool | None = None  # Ferry: progress status said post-copy at some point
    progress_events: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        if self.error is not None:
            return "FAILED"
        return "ok" if self.finished else "did not finish"


def shape_link(cluster: Cluster, mib_s: float) -> str:
    """Limit both directions of the a-b veth pair to ``mib_s`` MiB/s (tc tbf).

    qemu's ``max-bandwidth`` does not apply to the stop-and-copy phase (the
    remaining RAM goes out as fast as the socket takes it while the VM is
    stopped), so without a real limit on the link every downtime would be
    that of a loopback-speed link.  The namespaces, and these qdiscs with
    them, go away with the test bed.
    """
    rate_bit = int(mib_s * MIB * 8)
    for ns, dev in ((cluster.hosts.a, f"fa{cluster.hosts.tag}"),
                    (cluster.hosts.b, f"fb{cluster.hosts.tag}")):  # fmt: skip
        # burst: veth hands over GSO packets of up to 64 KiB; a smaller
        # bucket would drop them.  1 MiB is 8 ms at 128 MiB/s.
        subprocess.run(
            ["tc", "-n", ns.name, "qdisc", "replace", "dev", dev, "root", "tbf",
             "rate", f"{rate_bit}bit", "burst", "1mb", "latency", "100ms"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    return f"tbf {mib_s:.0f} MiB/s on {cluster.hosts.a.name} and {cluster.hosts.b.name}"


# -- guest --------------------------------------------------------------------

_SUMS: dict[tuple[int, int, int, int], int] = {}


def expected_sum(boot: testguest.BootInfo) -> int:
    """expected_static_sum, cached: 1 GiB is a quarter million mixes in Python."""
    key = (boot.first_pfn, boot.pages, boot.wss_pages, boot.seed)
    if key not in _SUMS:
        _SUMS[key] = testguest.expected_static_sum(boot)
    return _SUMS[key]


def guest_ready(serial: testguest.SerialReader, timeout: float) -> tuple[testguest.BootInfo, Any]:
    """Wait for the boot line and a completed sweep with a good sum (RAM filled,
    working set being rewritten); returns the boot line and that report."""
    boot = serial.wait_for_boot(timeout=timeout)
    rep = serial.wait_for(lambda r: r.sweeps >= 1 and r.counter >= 3, timeout=timeout)
    if rep.bad_pages:
        raise RuntimeError(f"guest reports {rep.bad_pages} bad page(s) before migrating")
    if rep.checksum != expected_sum(boot):
        raise RuntimeError(f"guest sum {rep.checksum:016x} wrong before migrating")
    return boot, rep


def check_guest(
    serial: testguest.SerialReader, boot: testguest.BootInfo, after_sweeps: int, timeout: float
) -> tuple[int, bool]:
    """Two more complete sweeps on ``serial``'s guest: (bad pages, sum ok)."""
    rep = serial.wait_for(lambda r: r.sweeps >= after_sweeps + 2, timeout=timeout)
    return rep.bad_pages, rep.checksum == expected_sum(boot)


def guest_gap_ms(readers: Sequence[testguest.SerialReader], start: float, end: float) -> float:
    """Largest interval between consecutive reports (by counter) in [start, end],
    whichever qemu's serial socket they came from.  Waits until ``end`` has
    passed: the window's end is an edge too, and must not lie in the future."""
    time.sleep(max(0.0, end - time.monotonic()) + 0.1)
    seen: dict[int, float] = {}
    for reader in readers:
        for r in reader.reports():
            if start <= r.host_time <= end:
                t = seen.get(r.counter)
                seen[r.counter] = r.host_time if t is None else min(t, r.host_time)
    times = [seen[c] for c in sorted(seen)]
    # The edges count too: a guest silent from the start (or until the end)
    # of the window was not running then.
    return max(b - a for a, b in itertools.pairwise([start, *times, end])) * 1000


def guest_speed_pct(
    readers: Sequence[testguest.SerialReader], start: float, end: float
) -> float | None:
    """The guest's rewrite rate from ``start`` to ``end`` in % of its rate in
    the 2 s before ``start`` (host clock): what throttling, post-copy page
    faults and the downtime left of it.  None without enough reports."""
    seen: dict[int, testguest.Report] = {}
    for reader in readers:
        for r in reader.reports():
            seen.setdefault(r.counter, r)
    reps = [seen[c] for c in sorted(seen)]

    def rate(lo: float, hi: float) -> float | None:
        inside = [r for r in reps if lo <= r.host_time <= hi]
        if len(inside) < 2 or inside[-1].host_time <= inside[0].host_time:
            return None
        first, last = inside[0], inside[-1]
        return (last.generation - first.generation) / (last.host_time - first.host_time)

    before, during = rate(start - 2.0, start), rate(start, end)
    if not before or during is None:
        return None
    return during / before * 100


# -- the baselines: bare qemus over QMP ---------------------------------------


class QemuDriver:
    """Launch qemus with Ferry's argv in the namespaces; migrate them over QMP directly."""

    def __init__(self, cluster: Cluster, kernel: Path, args: argparse.Namespace) -> None:
        from ferry.domain import parse_domain

        self.cluster = cluster
        self.args = args
        self.root = cluster.tmp / "qemu"
        self.root.mkdir(exist_ok=True)
        self.domains = {
            zip_: parse_domain(
                guest_xml(
                    "convq",
                    kernel,
                    virt_type=args.virt,
                    mem_mib=args.mem_mib,
                    wss_mib=args.wss_mib,
                    rate_mib_s=0,
                    report_ms=args.report_ms,
                    prealloc=True,
                    zip=zip_,
                ),
                where="bench",
            )
            for zip_ in (False, True)
        }
        self.seq = 0

    async def launch(self, host: HostEnv, *, zip_: bool, incoming: bool) -> tuple[Any, Path]:
        """Start qemu in ``host``'s namespace as ferry.host.Host.start would (paused)."""
        from ferry.domain import RuntimePaths, to_qemu_argv
        from ferry.qemu import launch

        self.seq += 1
        run_dir = self.root / f"{host.label}{self.seq}"
        run_dir.mkdir(mode=0o750)
        paths = RuntimePaths(
            run_dir=run_dir,
            qmp_socket=run_dir / "qmp.sock",
            pidfile=run_dir / "qemu.pid",
            log_file=None,
        )
        argv = [*to_qemu_argv(self.domains[zip_], paths=paths, incoming=incoming), "-S"]
        argv = ["nsenter", f"--net=/run/netns/{host.ns.name}", *argv]
        proc = await launch(argv, pidfile=paths.pidfile, qmp_socket=paths.qmp_socket, timeout=120)
        return proc, run_dir / "serial0.sock"

    async def trial(self, variant: Variant, trial: Trial) -> None:
        """Boot a guest on a, migrate it to b the variant's way; fill in ``trial``."""
        from ferry.qemu import query_migrate

        args = self.args
        a, b = self.cluster.a, self.cluster.b
        procs: list[Any] = []
        readers: list[testguest.SerialReader] = []
        try:
            src, src_serial = await self.launch(a, zip_=variant.zip, incoming=False)
            procs.append(src)
            await src.qmp.execute("cont")
            sread = testguest.SerialReader(src_serial)
            readers.append(sread)
            boot, _ = await asyncio.to_thread(guest_ready, sread, args.boot_timeout)
            await asyncio.to_thread(prepare_memory, args)

            uri = f"tcp:{b.ns.address}:{BASELINE_PORT + self.seq % 50}"
            caps = [{"capability": c, "state": True} for c in variant.caps]
            params: dict[str, Any] = {"max-bandwidth": args.bandwidth * MIB}
            if variant.downtime_ms is not None:
                params["downtime-limit"] = variant.downtime_ms
            if "xbzrle" in variant.caps and args.xbzrle_cache_mib:
                params["xbzrle-cache-size"] = args.xbzrle_cache_mib * MIB
            trial.flags = [f"caps={','.join(variant.caps) or '-'}", json.dumps(params)]

            t0 = time.monotonic()
            dst, dst_serial = await self.launch(b, zip_=variant.zip, incoming=True)
            procs.append(dst)
            dread = testguest.SerialReader(dst_serial)
            readers.append(dread)
            if caps:
                await dst.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
                await src.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
            await dst.qmp.execute("migrate-incoming", {"uri": uri})
            await src.qmp.execute("migrate-set-parameters", params)
            await src.qmp.execute("migrate", {"uri": uri})
            t_migrate = time.monotonic()
            throttle = sent = 0
            cancelled = False
            while True:
                stats = await query_migrate(src.qmp)
                throttle = max(throttle, stats.cpu_throttle_percentage)
                # A cancelled migration's query has no RAM figures left.
                sent = max(sent, stats.ram_transferred)
                if stats.status == "completed":
                    break
                if stats.status in ("failed", "cancelled"):
                    if cancelled:
                        break
                    raise RuntimeError(f"migration {stats.status}: {stats.error_desc}")
                if not cancelled and time.monotonic() - t_migrate > args.cutoff:
                    await src.qmp.execute("migrate_cancel")
                    cancelled = True
                await asyncio.sleep(POLL_S)
            trial.peak_throttle_pct = throttle
            if stats.status != "completed":
                # Did not finish: the guest keeps running on a, and must be intact there.
                t_end = time.monotonic()
                trial.total_ms = (t_end - t0) * 1000
                trial.sent_mib = sent / MIB
                trial.guest_gap_ms = await asyncio.to_thread(
                    guest_gap_ms, readers, t_migrate, t_end + AFTER_END_S
                )
                trial.guest_speed_pct = guest_speed_pct(readers, t_migrate, t_end)
                last = sread.latest()
                trial.bad_pages, trial.sum_ok = await asyncio.to_thread(
                    check_guest, sread, boot, last.sweeps if last else 0, args.check_timeout
                )
                return
            # qemu 7.2 says completed a moment before it fills in the times.
            for _ in range(500):
                if stats.total_time_ms:
                    break
                await asyncio.sleep(0.002)
                stats = await query_migrate(src.qmp)
            while (dstats := await query_migrate(dst.qmp)).status != "completed":
                if dstats.status in ("failed", "cancelled"):
                    raise RuntimeError(f"incoming migration {dstats.status}: {dstats.error_desc}")
                await asyncio.sleep(0.005)
            await dst.qmp.execute("cont")
            t_end = time.monotonic()
            trial.finished = True
            trial.total_ms = (t_end - t0) * 1000
            trial.qemu_total_ms = float(stats.total_time_ms or 0)
            trial.qemu_downtime_ms = float(stats.downtime_ms or 0)
            trial.sent_mib = stats.ram_transferred / MIB
            last = sread.latest()
            await src.kill()
            procs.remove(src)
            trial.bad_pages, trial.sum_ok = await asyncio.to_thread(
                check_guest, dread, boot, last.sweeps if last else 0, args.check_timeout
            )
            trial.guest_gap_ms = await asyncio.to_thread(
                guest_gap_ms, readers, t_migrate, t_end + AFTER_END_S
            )
            trial.guest_speed_pct = guest_speed_pct(readers, t_migrate, t_end)
        finally:
            for reader in readers:
                reader.close()
            for proc in procs:
                with contextlib.suppress(Exception):
                    await proc.kill()


# -- Ferry --------------------------------------------------------------------


class FerryDriver:
    """The benchmark's guests under Ferry, defined on both hosts, started on a per trial."""

    def __init__(self, cluster: Cluster, kernel: Path, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.names = {False: "conv", True: "convz"}
        for zip_, name in self.names.items():
            xml = guest_xml(
                name,
                kernel,
                virt_type=args.virt,
                mem_mib=args.mem_mib,
                wss_mib=args.wss_mib,
                rate_mib_s=0,
                report_ms=args.report_ms,
                prealloc=True,
                uuid=str(uuidlib.uuid4()),
                zip=zip_,
            )
            path = cluster.tmp / f"{name}.xml"
            path.write_text(xml)
            for host in (cluster.a, cluster.b):
                host.ferryctl("define", str(path), check=True)

    def flags(self, variant: Variant) -> list[str]:
        """ferryctl migrate options of ``variant``."""
        args = self.args
        bw = str(args.bandwidth)
        out = ["--live", "--bandwidth", bw]
        if variant.mode == "postcopy":
            out += ["--postcopy", "--postcopy-after-precopy", "--postcopy-bandwidth", bw]
        elif variant.mode == "ctl":
            out += [
                "--deadline", str(args.deadline),
                "--max-downtime", str(args.max_downtime),
                "--max-throttle", str(args.max_throttle),
                "--postcopy", "--postcopy-bandwidth", bw,
            ]  # fmt: skip
        if variant.mode in ("xbzrle", "zstd", "zlib"):
            if variant.mode != "xbzrle":
                out += ["--parallel"]
            out += ["--compressed", "--comp-methods", variant.mode]
            if variant.mode == "xbzrle" and args.xbzrle_cache_mib:
                out += ["--comp-xbzrle-cache", str(args.xbzrle_cache_mib * MIB)]
            return out
        if variant.zip:
            out.append("--compressed")
            if args.xbzrle_cache_mib:
                out += ["--comp-xbzrle-cache", str(args.xbzrle_cache_mib * MIB)]
        return out

    def clean(self, name: str) -> None:
        """No qemu of the benchmark left on either host."""
        for host in (self.cluster.a, self.cluster.b):
            if host.qemu_pids():
                host.ferryctl("destroy", name, timeout=60)
            if host.qemu_pids():
                raise RuntimeError(f"a qemu is still running on {host.label} after destroy")

    def trial(self, variant: Variant, trial: Trial) -> None:
        """Start the guest on a, ``ferryctl migrate`` it to b; fill in ``trial``."""
        args = self.args
        a, b = self.cluster.a, self.cluster.b
        name = self.names[variant.zip]
        readers: list[testguest.SerialReader] = []
        try:
            self.clean(name)
            # The last trial moved the guest to b and clean() destroyed it
            # there: a's fence (it runs on b) is stale, and we checked.
            a.ferryctl("start", name, "--force", check=True)
            sread = testguest.SerialReader(a.serial_socket(name))
            readers.append(sread)
            boot, _ = guest_ready(sread, args.boot_timeout)
            # Connects as soon as b's qemu has made its socket (in Prepare),
            # long before the guest runs there.
            dread = testguest.SerialReader(b.serial_socket(name))
            readers.append(dread)
            prepare_memory(args)
            flags = self.flags(variant)
            trial.flags = flags
            events, rc, stderr, t0, t_end, cut = run_ferryctl(
                [ferryctl_bin(), "--connect", str(a.source_socket), "migrate", name, b.uri,
                 *flags, "--json"],
                args.cutoff,
            )  # fmt: skip
            self._digest(trial, events, t0, t_end)
            if rc != 0 or cut:
                if not cut:
                    raise RuntimeError(f"ferryctl exit {rc}: {stderr.strip()[-800:]}")
                # Did not finish: aborted by SIGINT; the guest must be intact
                # wherever it runs now.
                trial.total_ms = (t_end - t0) * 1000
                trial.guest_gap_ms = guest_gap_ms(readers, t0, t_end + AFTER_END_S)
                trial.guest_speed_pct = guest_speed_pct(readers, t0, t_end)
                where = dread if b.qemu_pids() and not a.qemu_pids() else sread
                last = where.latest()
                trial.bad_pages, trial.sum_ok = check_guest(
                    where, boot, last.sweeps if last else 0, args.check_timeout
                )
                return
            trial.finished = True
            trial.total_ms = (t_end - t0) * 1000
            if a.qemu_pids():
                raise RuntimeError("a qemu is still running on a after the migration")
            last = sread.latest()
            trial.bad_pages, trial.sum_ok = check_guest(
                dread, boot, last.sweeps if last else 0, args.check_timeout
            )
            trial.guest_gap_ms = guest_gap_ms(readers, t0, t_end + AFTER_END_S)
            trial.guest_speed_pct = guest_speed_pct(readers, t0, t_end)
        finally:
            for reader in readers:
                reader.close()
            with contextlib.suppress(Exception):
                self.clean(name)

    @staticmethod
    def _digest(
        trial: Trial, events: list[tuple[float, dict[str, Any]]], t0: float, t_end: float
    ) -> None:
        """Throttle, bytes, times, post-copy and the ETA error from ferryctl's events."""
        throttle = 0
        progress = [(t, ev["data"]) for t, ev in events if ev.get("event") == "progress"]
        trial.progress_events = len(progress)
        for _, data in progress:
            throttle = max(throttle, int(data.get("throttle_pct") or 0))
            if str(data.get("status", "")).startswith("postcopy"):
                trial.postcopy = True
        result = next(
            (ev["data"] for _, ev in reversed(events) if ev.get("event") == "result"), None
        )
        if result is not None:
            stats = result.get("stats") or {}
            throttle = max(throttle, int(stats.get("throttle_pct") or 0))
            if stats.get("total_time_ms") is not None:
                trial.qemu_total_ms = float(stats["total_time_ms"])
            if stats.get("downtime_ms") is not None:
                trial.qemu_downtime_ms = float(stats["downtime_ms"])
            if stats.get("transferred") is not None:
                trial.sent_mib = stats["transferred"] / MIB
            if stats.get("postcopy") is not None:
                trial.postcopy = bool(stats["postcopy"])
        trial.peak_throttle_pct = throttle
        if trial.postcopy is None and progress:
            trial.postcopy = False
        if result is None:
            trial.eta_note = "no result"
            return
        third = t0 + (t_end - t0) / 3
        with_eta = [
            (t, d["eta_s"]) for t, d in progress if t <= third and d.get("eta_s") is not None
        ]
        if not with_eta:
            trial.eta_note = "no eta_s in progress by 1/3" if progress else "no progress events"
            return
        t, eta = with_eta[-1]
        trial.eta_error_s = t + float(eta) - t_end
        trial.eta_error_pct = trial.eta_error_s / (t_end - t0) * 100


def run_ferryctl(
    argv: list[str], cutoff: float
) -> tuple[list[tuple[float, dict[str, Any]]], int, str, float, float, bool]:
    """Run ferryctl with --json, stamping every event with its receive time.

    SIGINT (ferryctl aborts the migration) after ``cutoff`` s, SIGKILL a
    minute later.  Returns (events, exit status, stderr, start, end, cut),
    where end is the result event's receive time if there was one.
    """
    events: list[tuple[float, dict[str, Any]]] = []
    cut = threading.Event()
    with tempfile.TemporaryFile() as errfile:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile
        )

        def interrupt() -> None:
            if proc.poll() is None:
                cut.set()
                proc.send_signal(signal.SIGINT)

        timers = [threading.Timer(cutoff, interrupt), threading.Timer(cutoff + 60, proc.kill)]
        for timer in timers:
            timer.daemon = True
            timer.start()
        t_end: float | None = None
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                now = time.monotonic()
                if not raw.startswith(b"{"):
                    continue
                with contextlib.suppress(ValueError):
                    ev = json.loads(raw)
                    if isinstance(ev, dict):
                        events.append((now, ev))
                        if ev.get("event") == "result":
                            t_end = now
            rc = proc.wait()
        finally:
            for timer in timers:
                timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        t_exit = time.monotonic()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    return events, rc, stderr, t0, t_end if t_end is not None else t_exit, cut.is_set()


# -- report -------------------------------------------------------------------

FIGURES = (
    ("total_ms", "total s", 1000.0, "{:.1f}"),
    ("qemu_downtime_ms", "qemu down ms", 1.0, "{:.0f}"),
    ("guest_gap_ms", "guest gap ms", 1.0, "{:.0f}"),
    ("guest_speed_pct", "guest speed %", 1.0, "{:.0f}"),
    ("peak_throttle_pct", "throttle %", 1.0, "{:.0f}"),
    ("sent_mib", "MiB sent", 1.0, "{:.0f}"),
    ("eta_error_s", "ETA err s", 1.0, "{:+.1f}"),
)


def summarize(
    trials: Sequence[Trial], variants: Sequence[Variant], args: argparse.Namespace
) -> dict[str, Any]:
    """Per variant: outcomes, median/min/max of every figure over finished
    trials, bad pages over all, ratios against the baselines."""
    out: dict[str, Any] = {}
    for v in variants:
        mine = [t for t in trials if t.variant == v.name]
        done = [t for t in mine if t.finished and t.error is None]
        figures: dict[str, dict[str, float] | None] = {}
        for key, _, _, _ in FIGURES:
            values = [float(getattr(t, key)) for t in done if getattr(t, key) is not None]
            figures[key] = (
                {"median": statistics.median(values), "min": min(values), "max": max(values)}
                if values
                else None
            )
        out[v.name] = {
            "title": v.title,
            "driver": v.driver,
            "zip": v.zip,
            "reps": len(mine),
            "finished": len(done),
            "did_not_finish": sum(1 for t in mine if t.error is None and not t.finished),
            "failed": sum(1 for t in mine if t.error is not None),
            "bad_pages": sum(t.bad_pages or 0 for t in mine),
            "sum_wrong": sum(1 for t in mine if t.sum_ok is False),
            "postcopy_trials": sum(1 for t in mine if t.postcopy),
            "figures": figures,
            "ratios": {},
        }
    for v in variants:
        row = out[v.name]
        for base in variants:
            if not base.baseline or base.zip != v.zip or base.name == v.name:
                continue
            brow = out[base.name]
            ratios: dict[str, Any] = {}
            for key in ("total_ms", "guest_gap_ms"):
                mine_f, base_f = row["figures"][key], brow["figures"][key]
                if mine_f is None:
                    continue
                if base_f is not None and brow["finished"] * 2 > brow["reps"]:
                    ratios[key] = {"ratio": mine_f["median"] / base_f["median"], "bound": "="}
                elif key == "total_ms" and brow["did_not_finish"]:
                    # The baseline ran into the cut-off: its time is at least that.
                    ratios[key] = {"ratio": mine_f["median"] / (args.cutoff * 1000), "bound": "<"}
            if ratios:
                row["ratios"][base.name] = ratios
    return out


def print_table(report: dict[str, Any]) -> None:
    cfg = report["config"]
    shaped = (
        f"link shaped to {cfg['shape_mib_s']:.0f} MiB/s"
        if cfg["shape_mib_s"]
        else "link not shaped"
    )
    print(
        f"convergence benchmark: {cfg['mem_mib']} MiB guest, wss {cfg['wss_mib']} MiB "
        f"rewritten flat out, --bandwidth {cfg['bandwidth_mib_s']} MiB/s for every variant "
        f"({shaped}), report every {cfg['report_ms']} ms, cut-off {cfg['cutoff_s']:.0f} s, "
        f"{cfg['reps']} reps, virt {cfg['virt']}, {cfg['cpus']} CPUs"
    )
    print(
        "cells: median [min..max] over the trials that finished (ok); dnf: cancelled at the "
        "cut-off; fail: error (see below); bad: bad pages over all trials\n"
    )
    summary = report["summary"]
    width = max(len(n) for n in summary) + 2
    head = f"{'variant':<{width}}{'ok':>3}{'dnf':>4}{'fail':>5}"
    for _, label, _, _ in FIGURES:
        head += f"{label:>19}"
    head += f"{'bad':>5}"
    print(head)
    print("-" * len(head))
    for name, row in summary.items():
        line = f"{name:<{width}}{row['finished']:>3}{row['did_not_finish']:>4}{row['failed']:>5}"
        for key, _, scale, fmt in FIGURES:
            f = row["figures"][key]
            if f is None:
                cell = "n/a"
            else:
                med, lo, hi = (fmt.format(f[k] / scale) for k in ("median", "min", "max"))
                cell = med if lo == hi else f"{med} [{lo}..{hi}]"
            line += f"{cell:>19}"
        line += f"{row['bad_pages']:>5}"
        print(line)
    print(
        "\nratios of medians against the qemu baselines on the same guest (total / guest gap;"
        "\n'<': the baseline did not finish, its total taken as the cut-off):"
    )
    for name, row in summary.items():
        if not row["ratios"]:
            continue
        parts = []
        for base, r in row["ratios"].items():
            cells = []
            for key in ("total_ms", "guest_gap_ms"):
                if key in r:
                    bound = "<" if r[key]["bound"] == "<" else ""
                    cells.append(f"{bound}{r[key]['ratio']:.2f}x")
                else:
                    cells.append("n/a")
            parts.append(f"{base}: {' / '.join(cells)}")
        print(f"  {name:<{width}}{'; '.join(parts)}")
    print("\nper trial:")
    for t in report["trials"]:
        extra = ""
        if t["eta_error_s"] is not None:
            extra += f", ETA err {t['eta_error_s']:+.1f} s ({t['eta_error_pct']:+.0f} %)"
        elif t["eta_note"]:
            extra += f", ETA n/a ({t['eta_note']})"
        if t["postcopy"]:
            extra += ", post-copy"

        def show(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        print(
            f"  rep {t['rep']} {t['variant']:<20} {t['outcome']:<15} "
            f"total {show(t['total_ms'] and t['total_ms'] / 1000, '.1f')} s, "
            f"qemu down {show(t['qemu_downtime_ms'], '.0f')} ms, "
            f"gap {show(t['guest_gap_ms'], '.0f')} ms, "
            f"speed {show(t['guest_speed_pct'], '.0f')} %, "
            f"throttle {show(t['peak_throttle_pct'], 'd')} %, "
            f"sent {show(t['sent_mib'], '.0f')} MiB, bad {show(t['bad_pages'], 'd')}"
            f"{'' if t['sum_ok'] is not False else ' SUM WRONG'}{extra}"
        )
        if t["error"]:
            print(f"      error: {t['error']}")
    bad = [n for n, r in summary.items() if r["bad_pages"] or r["sum_wrong"]]
    if bad:
        print(f"\nBAD PAGES OR WRONG SUM in: {', '.join(bad)}")


# -- main ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = ", ".join(VARIANTS)
    p = argparse.ArgumentParser(
        description="Convergence of a guest that dirties memory faster than the link: "
        "bare qemu (plain, auto-converge, 3 s downtime) against Ferry (post-copy, "
        "the deadline controller).  See the module docstring.",
    )
    p.add_argument("--reps", type=int, default=3, help="trials per variant (default %(default)s)")
    p.add_argument("--variants", default="all", help=f"comma-separated, or 'all': {names}")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 256 MiB guest, 64 MiB working set, 15 s cut-off (unless given)",
    )
    p.add_argument("--mem-mib", type=int, help="guest RAM (default 1024; quick 256)")
    p.add_argument("--wss-mib", type=int, help="working set (default 256; quick 64)")
    p.add_argument("--cutoff", type=float, help="seconds before a migration is cancelled "
                   "and reported as not finished (default 60; quick 15)")  # fmt: skip
    p.add_argument(
        "--bandwidth", type=int, default=128, help="MiB/s, every variant (default %(default)s)"
    )
    p.add_argument(
        "--report-ms", type=int, default=50, help="guest report period (default %(default)s)"
    )
    p.add_argument(
        "--deadline", type=float, default=10, help="ferry-ctl --deadline (default %(default)s)"
    )
    p.add_argument(
        "--max-downtime",
        type=int,
        default=500,
        help="ferry-ctl --max-downtime ms (default %(default)s)",
    )
    p.add_argument(
        "--max-throttle",
        type=int,
        default=50,
        help="ferry-ctl --max-throttle %% (default %(default)s)",
    )
    p.add_argument(
        "--xbzrle-cache-mib",
        type=int,
        default=512,
        help="xbzrle cache for zip-qemu-xbzrle and the zip-ferry variants, MiB, a power of two; "
        "0 = qemu's default 64 MiB (default %(default)s)",
    )
    p.add_argument(
        "--shape",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also limit the a-b link itself (tc tbf, --bandwidth + 5 %%) so that the "
        "stop-and-copy phase, which qemu does not rate-limit, runs at link speed too "
        "(default on)",
    )
    p.add_argument(
        "--memory",
        choices=("warm", "cold", "asis"),
        default="warm",
        help="free host memory before every migration, as in migration.py (default %(default)s)",
    )
    p.add_argument("--settle", type=float, default=10.0, help="with --memory cold: seconds")
    p.add_argument(
        "--virt",
        choices=("kvm", "qemu"),
        default=None,
        help="domain type: kvm or qemu (TCG); default kvm if /dev/kvm opens",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.virt is None:
        args.virt = "kvm" if kvm_opens() else "qemu"
    if args.reps < 1:
        p.error("--reps must be at least 1")
    quick = args.quick
    args.mem_mib = args.mem_mib or (256 if quick else 1024)
    args.wss_mib = args.wss_mib or (64 if quick else 256)
    args.cutoff = args.cutoff or (15.0 if quick else 60.0)
    if args.xbzrle_cache_mib & (args.xbzrle_cache_mib - 1):
        p.error("--xbzrle-cache-mib must be a power of two (or 0)")
    if args.variants == "all":
        args.variant_list = list(VARIANTS.values())
    else:
        wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in VARIANTS]
        if unknown or not wanted:
            p.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; known: {names}")
        args.variant_list = [VARIANTS[n] for n in dict.fromkeys(wanted)]
    # Booting (filling RAM) and a verification sweep take longer with more RAM.
    args.boot_timeout = 120 + args.mem_mib / 1024 * 60
    args.check_timeout = 60 + args.mem_mib / 1024 * 60
    return args


def run_trial(
    variant: Variant, rep: int, qemu: QemuDriver, ferry: FerryDriver | None, ferry_error: str | None
) -> Trial:
    """One trial; any error is recorded in it, never raised (Ctrl-C excepted)."""
    trial = Trial(variant=variant.name, rep=rep)
    try:
        if variant.driver == "qemu":
            asyncio.run(qemu.trial(variant, trial))
        elif ferry is None:
            raise RuntimeError(f"no Ferry test bed: {ferry_error}")
        else:
            ferry.trial(variant, trial)
    except Exception as exc:  # a failing variant must not stop the run
        trial.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
    return trial


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("error: needs root (network namespaces)")
        return 2
    kernel = testguest.build()
    variants: list[Variant] = args.variant_list
    trials: list[Trial] = []
    cluster: Cluster | None = None
    with sigterm_as_interrupt():
        try:
            cluster = Cluster()
            log(f"test bed in {cluster.tmp} (virt {args.virt}); variants: "
                f"{', '.join(v.name for v in variants)}")  # fmt: skip
            if args.shape:
                log(f"link: {shape_link(cluster, args.bandwidth * SHAPE_HEADROOM)}")
            ferry: FerryDriver | None = None
            ferry_error: str | None = None
            if any(v.driver == "ferry" for v in variants):
                try:
                    cluster.start()
                    ferry = FerryDriver(cluster, kernel, args)
                except Exception as exc:  # the baselines can still run
                    ferry_error = f"{type(exc).__name__}: {exc}"
                    log(f"Ferry test bed failed: {ferry_error}\n{cluster.logs()}")
            qemu = QemuDriver(cluster, kernel, args)
            for rep in range(1, args.reps + 1):
                k = (rep - 1) % len(variants)
                for variant in variants[k:] + variants[:k]:
                    log(f"rep {rep}/{args.reps} {variant.name} ...")
                    trial = run_trial(variant, rep, qemu, ferry, ferry_error)
                    trials.append(trial)
                    log(
                        f"rep {rep}/{args.reps} {variant.name}: {trial.outcome}"
                        + (f" ({trial.error})" if trial.error else "")
                        + (f", total {trial.total_ms / 1000:.1f} s" if trial.total_ms else "")
                        + (f", gap {trial.guest_gap_ms:.0f} ms" if trial.guest_gap_ms else "")
                        + (f", bad {trial.bad_pages}" if trial.bad_pages is not None else "")
                    )
        finally:
            if cluster is not None:
                if os.environ.get("FERRY_KEEP_TESTBED"):
                    log(f"keeping the test bed tree {cluster.tmp}")
                cluster.close()
    report = {
        "config": {
            "mem_mib": args.mem_mib,
            "wss_mib": args.wss_mib,
            "bandwidth_mib_s": args.bandwidth,
            "report_ms": args.report_ms,
            "cutoff_s": args.cutoff,
            "reps": args.reps,
            "variants": [v.name for v in variants],
            "deadline_s": args.deadline,
            "max_downtime_ms": args.max_downtime,
            "max_throttle_pct": args.max_throttle,
            "xbzrle_cache_mib": args.xbzrle_cache_mib,
            "shape_mib_s": args.bandwidth * SHAPE_HEADROOM if args.shape else None,
            "memory": args.memory,
            "virt": args.virt,
            "cpus": os.cpu_count(),
        },
        "summary": summarize(trials, variants, args),
        "trials": [{**asdict(t), "outcome": t.outcome} for t in trials],
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was cleaned up")
        sys.exit(130)
