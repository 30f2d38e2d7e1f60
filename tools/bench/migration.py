"""Benchmark Ferry's migration against qemu's own migration time and a minimal QMP driver.

Question: how much time does Ferry's orchestration (ferryctl, the two agents,
TLS, msgpack frames, Begin/Prepare/Perform/Finish/Confirm) add to the time
qemu itself spends migrating?  The issue's target is under 150 ms
(libvirt measured 0.22-0.49 s on this kind of machine).

One run, on the two-host test bed (``tools/testbed/cluster.py``), with a
test guest of ``--mem-mib`` MiB whose RAM is all non-zero (the guest fills
every page with a pattern at boot) and a small working set::

    .venv/bin/python tools/bench/migration.py                    # 1 GiB, 5 reps, prealloc
    .venv/bin/python tools/bench/migration.py --reps 3 --no-prealloc
    .venv/bin/python tools/bench/migration.py --json > result.json
    .venv/bin/python tools/bench/migration.py --variants ferry,client-driven   # issue 13 ratio
    FERRY_KEEP_TESTBED=1 .venv/bin/python tools/bench/migration.py   # keep the tree (agent logs)

It measures, in this order:

1. **ferry**: the guest is defined and started on A, then migrated
   ``--reps`` times back and forth (A->B, B->A, ...), each time with
   ``ferryctl migrate NAME ferry://PEER:49160 --live --json``.  For every
   repetition: the wall time of the ferryctl process (measured here, around
   the subprocess), the agent's own ``wall_time_ms`` and qemu's
   ``total_time_ms`` / ``downtime_ms`` / ``setup_time_ms`` from the result,
   and the arrival time of every event ferryctl prints (the phases), which
   splits the wall time into Begin, Prepare, Perform, Finish and Confirm.
   Right before each migration the start-up of ``ferryctl --help`` (Python
   start-up and imports) and of ``ferryctl list`` (start-up, connect, one
   request) is measured too, under the same load.
2. **minimal**: the same guest XML, turned into the same qemu argv by
   ``ferry.domain.to_qemu_argv`` (plus ``-S`` and the second monitor, as
   ``ferry.host.Host.start`` adds) and launched by ``ferry.qemu.launch``
   in the hosts' network namespaces, migrated ``--reps`` times back and forth
   by a minimal driver in this process: launch the destination qemu
   (``-incoming defer``), ``migrate-incoming``, unlimited ``max-bandwidth``
   and ``migrate`` on the source, poll ``query-migrate`` every ``--poll-ms``
   until completed (source, then destination), ``cont`` on the destination,
   SIGKILL the source and wait for it to exit -- the same work Ferry does,
   without the agents.
3. **client-driven** (``--variants ferry,client-driven[,minimal]``):
   ``ferryctl migrate ... --client-driven`` (issue 13), run in the source's
   network namespace with an operator certificate, interleaved with ferry
   (p2p) on the same guest, rounds rotated (p2p, cd, cd, p2p, ...); same
   figures, plus the ratios client-driven / p2p of the wall times and of the
   overheads over qemu's ``total_time_ms``.  See ``client_driven.py`` for how
   ``ip netns exec`` is accounted for (``--p2p-launch``).

The guest is checked between repetitions (outside the timed part): it must
keep reporting on its serial port on the new host, without a reboot or a
bad page.

Figures (milliseconds unless said otherwise):

- ``overhead (CLI)`` = ferryctl wall time - qemu ``total_time_ms``; includes
  ferryctl's Python start-up (shown on its own as ``ferryctl --help``).
- ``overhead (agent)`` = the agent's ``wall_time_ms`` - qemu ``total_time_ms``:
  what the issue's 150 ms target is about.
- ``overhead (minimal)`` = the minimal driver's wall time - qemu
  ``total_time_ms``; both include launching the destination qemu (which,
  with ``--prealloc``, touches all guest RAM) and killing the source one.
- ratios: ferry / minimal driver, of the wall times and of the overheads.

``dest qemu launch`` is the lifetime of the destination agent's
``qemu -daemonize`` launcher process (it exits once qemu has initialised,
RAM preallocated), seen by scanning /proc every 5 ms during the migration;
``overhead excl. dest launch`` subtracts it (for the minimal driver: its
own ``launch`` + QMP connect), which leaves what the orchestration itself
costs.

Memory (``--memory``): on this test machine (a Firecracker VM with free
page reporting) RAM freed a few seconds ago has been handed back to the
hypervisor, and touching it again costs ~2-3 s per GiB, while RAM freed
just before is reused at memory speed.  Preallocating the destination's
guest RAM therefore costs ~0.2 s or ~3 s per GiB depending only on how long
ago some other process freed memory, which would decide the comparison by
chance.  ``warm`` (the default) touches and frees ``--mem-mib`` + 256 MiB
right before every migration in both modes, so the destination qemu
preallocates at memory speed, as on a host without such a hypervisor;
``cold`` waits ``--settle`` seconds (default 10) before every migration
instead; ``asis`` does neither.

qemu 7.2 quirk that the minimal driver works around: ``query-migrate`` may
answer ``completed`` a moment before it has filled in ``total-time`` and
``downtime`` (they read 0), and a query that waited for the big lock during
the stop-and-copy phase returns a ``total-time`` equal to the final one.
Migrations that fail, and ferry results without qemu's times, are listed
and retried (``--retries``), not silently dropped.

When ``--trace`` is on (the default), the agents log to a journal socket
this process serves (``FERRY_JOURNAL_SOCKET``), so their records get
millisecond receive times on the same clock as the ferryctl events; the
timeline of the median repetition is printed with them.  The records are
also written to ``<testbed>/bench-journal.jsonl`` (kept with
``FERRY_KEEP_TESTBED=1``); the agents' own ``<testbed>/<host>/*.log`` then
stay nearly empty (``--no-trace`` puts the records back there, with
one-second time stamps).

Clean-up: the test bed (agents, every qemu in the namespaces, the
namespaces, the temporary tree) and this process's own qemus are torn down
on success, failure, Ctrl-C and SIGTERM.

Not part of the test suite: it takes a few minutes (more when migrations
fail and the guest has to be restarted) and its numbers depend on the
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import mmap
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _sub in ("tools/testbed", "tools/guest"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

from client_driven import (  # noqa: E402
    CLIENT,
    FERRYCTL_VARIANTS,
    comparison,
    finite,
    migrate_argv,
    netns_probe_argv,
    parse_variants,
    print_comparison,
    schedule,
)

import testguest  # noqa: E402
from cluster import Cluster, HostEnv, guest_xml  # noqa: E402

MIB = 1024 * 1024
# libvirt's / Ferry's "unlimited" max-bandwidth (bytes/s).
UNLIMITED_BANDWIDTH = (2**63 - 1) // MIB * MIB
TARGET_OVERHEAD_MS = 150.0
BASELINE_PORT = 49350  # outside the agents' migration_ports (49200-49299)
PHASES = ("begin", "prepare", "perform", "finish", "confirm")


def log(msg: str) -> None:
    """Progress on stderr (stdout is for the table or the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def kvm_opens() -> bool:
    """True when /dev/kvm can be opened read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def ferryctl_bin() -> str:
    path = Path(sys.executable).parent / "ferryctl"
    return str(path) if path.exists() else "ferryctl"


# -- journal capture ----------------------------------------------------------


def _parse_native(data: bytes) -> dict[str, str]:
    """Decode one journald native-protocol datagram (``KEY=value\\n`` / binary form)."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.find(b"\n", i)
        if nl < 0:
            break
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode(errors="replace")] = value.decode(errors="replace")
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1 : nl + 9])
            value = data[nl + 9 : nl + 9 + size]
            fields[line.decode(errors="replace")] = value.decode(errors="replace")
            i = nl + 9 + size + 1
    return fields


class JournalCapture:
    """A journald-like datagram socket; every record gets a monotonic receive time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MIB)
        self._sock.bind(str(path))
        os.chmod(path, 0o666)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="journal-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:
                return
            now = time.monotonic()
            if self._closed or not data:
                return
            with contextlib.suppress(Exception):
                fields = _parse_native(data)
                with self._lock:
                    self.records.append((now, fields))

    def between(self, start: float, end: float) -> list[tuple[float, dict[str, str]]]:
        with self._lock:
            return [(t, f) for t, f in self.records if start <= t <= end]

    def dump(self, path: Path) -> None:
        with self._lock, path.open("w") as fh:
            for t, f in self.records:
                fh.write(json.dumps({"t_monotonic": t, **f}) + "\n")

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(timeout=2)
        with contextlib.suppress(OSError):
            self.path.unlink()


# -- results ------------------------------------------------------------------


@dataclass
class FerryRep:
    """One ``ferryctl migrate``."""

    rep: int
    direction: str
    cli_wall_ms: float
    agent_wall_ms: float
    total_time_ms: float
    downtime_ms: float
    setup_time_ms: float
    transferred_mib: float
    total_mib: float
    passes: int
    help_ms: float  # ferryctl --help right before
    list_ms: float  # ferryctl list right before
    #: lifetime of the destination's qemu launcher process (qemu start-up incl.
    #: preallocation), seen from /proc; None if it was not caught
    launch_ms: float | None = None
    #: arrival of each event (phase name / "result" / "exit"), ms after the subprocess started
    marks: dict[str, float] = field(default_factory=dict)
    #: agent journal records during the run: (ms after start, agent, host, message)
    timeline: list[tuple[float, str, str, str]] = field(default_factory=list)
    variant: str = "ferry"  # or "client-driven"
    via_netns: bool = False  # ferryctl launched by ip netns exec SRC env ...
    netns_ms: float | None = None  # ip netns exec SRC env true, right before

    @property
    def cli_overhead_ms(self) -> float:
        return self.cli_wall_ms - self.total_time_ms

    @property
    def agent_overhead_excl_launch_ms(self) -> float | None:
        if self.launch_ms is None:
            return None
        return self.agent_overhead_ms - self.launch_ms

    @property
    def agent_overhead_ms(self) -> float:
        return self.agent_wall_ms - self.total_time_ms

    def phase_ms(self) -> dict[str, float]:
        """Durations between consecutive events, as seen by ferryctl."""
        m = self.marks
        order = ["start", *PHASES, "result", "exit"]
        names = {
            "start": "ferryctl start-up + connect",
            "begin": "Begin (+ TLS connect to peer)",
            "prepare": "Prepare (peer: qemu -incoming)",
            "perform": "Perform (migrate + follow)",
            "finish": "Finish (peer: wait + cont)",
            "confirm": "Confirm (kill source qemu)",
            "result": "ferryctl exit",
        }
        out: dict[str, float] = {}
        for a, b in itertools.pairwise(order):
            if a in m and b in m:
                out[names[a]] = m[b] - m[a]
        if "perform" in m and "finish" in m:
            out["Perform - qemu total_time"] = m["finish"] - m["perform"] - self.total_time_ms
        return out


@dataclass
class MinimalRep:
    """One migration driven directly over QMP by this process."""

    rep: int
    direction: str
    wall_ms: float
    total_time_ms: float
    downtime_ms: float
    setup_time_ms: float
    transferred_mib: float
    total_mib: float
    passes: int
    launch_ms: float  # destination qemu launch + QMP connect
    incoming_ms: float  # migrate-incoming + source params + migrate commands
    follow_ms: float  # migrate issued -> source completed seen
    dest_done_ms: float  # source completed -> destination completed seen
    cont_ms: float  # cont on the destination
    kill_ms: float  # SIGKILL source + wait for its exit

    @property
    def overhead_ms(self) -> float:
        return self.wall_ms - self.total_time_ms

    @property
    def overhead_excl_launch_ms(self) -> float:
        return self.overhead_ms - self.launch_ms


# -- memory -------------------------------------------------------------------

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14


def prewarm(mib: int) -> None:
    """Touch ``mib`` MiB of anonymous memory (huge pages where possible), then free it."""
    size = mib * MIB
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as area:
        with contextlib.suppress(OSError):
            area.madvise(MADV_HUGEPAGE)
        try:
            area.madvise(MADV_POPULATE_WRITE)
        except OSError:
            for offset in range(0, size, 4096):
                area[offset] = 1


def prepare_memory(args: argparse.Namespace) -> None:
    """Bring free memory into the state ``--memory`` asks for (see the docstring)."""
    if args.memory == "warm":
        prewarm(args.mem_mib + 256)
    elif args.memory == "cold":
        time.sleep(args.settle)


# -- ferry --------------------------------------------------------------------


class MigrateFailed(RuntimeError):
    """ferryctl migrate exited non-zero."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def timed_run(argv: Sequence[str]) -> float:
    """Run argv to completion, output discarded; wall time in ms."""
    t0 = time.monotonic()
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    wall = (time.monotonic() - t0) * 1000
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode(errors='replace')}")
    return wall


class LaunchWatcher:
    """Time the destination agent's qemu launch from outside: scan /proc every 5 ms.

    ``ferry.qemu.launch`` runs ``qemu ... -daemonize``; the launcher process
    exits once qemu is initialised (RAM preallocated, QMP listening), so its
    lifetime is qemu's start-up.  The scan stops as soon as the launcher is
    gone, so it does not compete with the migration itself for the CPU.
    """

    def __init__(self) -> None:
        self.known = {int(p) for p in os.listdir("/proc") if p.isdigit()}
        self.seen: float | None = None
        self.gone: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="launch-watcher", daemon=True)

    def __enter__(self) -> LaunchWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    @property
    def launch_ms(self) -> float | None:
        if self.seen is None or self.gone is None:
            return None
        return (self.gone - self.seen) * 1000

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            return False
        return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")

    def _run(self) -> None:
        launcher: int | None = None
        while not self._stop.wait(0.005):
            now = time.monotonic()
            if launcher is None:
                for entry in os.listdir("/proc"):
                    if not entry.isdigit() or int(entry) in self.known:
                        continue
                    pid = int(entry)
                    try:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if b"qemu-system" in argv[0] and b"-incoming" in argv:
                        if launcher is None or pid < launcher:
                            launcher = pid
                    elif argv[0] and b"ferry-destination" not in b" ".join(argv):
                        # Neither qemu nor the agent (a child of the agent
                        # shows the agent's argv until it has exec'd qemu).
                        self.known.add(pid)
                if launcher is not None:
                    self.seen = now
            elif not self._alive(launcher):
                self.gone = now
                return


def run_migrate(
    argv: Sequence[str],
    timeout: float,
    events: list[tuple[float, dict[str, Any]]] | None = None,
) -> tuple[float, float, dict[str, float], dict[str, Any], float | None]:
    """ferryctl migrate --json; returns (t0, wall ms, event marks, result data, launch ms).

    ``events``, when given, receives every JSON event with its arrival (ms
    after the start), e.g. the ``storage`` progress of a storage copy.
    """
    marks: dict[str, float] = {"start": 0.0}
    result: dict[str, Any] | None = None
    with tempfile.TemporaryFile() as errfile, LaunchWatcher() as watcher:
        t0 = time.monotonic()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile
        )
        try:
            assert proc.stdout is not None
            deadline = t0 + timeout
            for raw in proc.stdout:
                now = (time.monotonic() - t0) * 1000
                if not raw.startswith(b"{"):
                    continue
                ev = json.loads(raw)
                kind = ev.get("event")
                if events is not None:
                    events.append((now, ev))
                if kind == "phase":
                    marks.setdefault(str(ev["data"]["phase"]), now)
                elif kind == "result":
                    marks["result"] = now
                    result = ev["data"]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ferryctl migrate took more than {timeout:.0f}s")
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            t1 = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # ferryctl aborts the migration cleanly
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    marks["exit"] = (t1 - t0) * 1000
    if rc != 0 or result is None:
        raise MigrateFailed(stderr.strip() or f"exit status {rc}")
    return t0, (t1 - t0) * 1000, marks, result, watcher.launch_ms


def wait_guest_on(
    serial: testguest.SerialReader, sock: Path, after: testguest.Report | None
) -> testguest.Report:
    """Point the serial reader at ``sock``; wait for fresh good reports, no reboot."""
    boots = serial.boot_count
    serial.reconnect(sock)
    base = after.counter if after is not None else 0
    rep = serial.wait_for(lambda r: r.counter >= base + 3, timeout=60)
    if serial.boot_count != boots:
        raise RuntimeError("the guest rebooted during the migration")
    if rep.bad_pages:
        raise RuntimeError(f"the guest reports {rep.bad_pages} bad page(s) after the migration")
    return rep


def journal_timeline(
    journal: JournalCapture | None, t0: float, t1: float
) -> list[tuple[float, str, str, str]]:
    if journal is None:
        return []
    time.sleep(0.05)  # let the last datagrams arrive
    out = []
    for t, f in journal.between(t0, t1 + 0.05):
        out.append(
            (
                round((t - t0) * 1000, 1),
                f.get("SYSLOG_IDENTIFIER", "?"),
                f.get("FERRY_HOST", "?"),
                f.get("MESSAGE", ""),
            )
        )
    return out


class FerryGuest:
    """The benchmark's guest under Ferry: defined (same UUID) on both hosts, running on one."""

    def __init__(
        self,
        cluster: Cluster,
        kernel: Path,
        args: argparse.Namespace,
        *,
        name: str = "bench1",
        xml: str | None = None,
    ) -> None:
        """``xml``: the domain (named ``name``); default the plain test guest of ``args``."""
        self.cluster = cluster
        self.name = name
        if xml is None:
            xml = guest_xml(
                self.name,
                kernel,
                virt_type=args.virt,
                mem_mib=args.mem_mib,
                wss_mib=args.wss_mib,
                rate_mib_s=args.rate_mib_s,
                prealloc=args.prealloc,
                uuid=str(uuidlib.uuid4()),
            )
        path = cluster.tmp / f"{self.name}.xml"
        path.write_text(xml)
        # Defined on both hosts, so that after a failed migration it can be
        # started again wherever the repetition has to begin.
        for host in (cluster.a, cluster.b):
            host.ferryctl("define", str(path), check=True)
        self.serial: testguest.SerialReader | None = None
        self.last: testguest.Report | None = None

    def start(self, host: HostEnv, *, force: bool = False) -> None:
        """(Re)start the guest on ``host`` and wait until it has filled its RAM.

        ``force``: also when it migrated away from ``host`` (it was destroyed
        on the other host just before: ``ferryctl start --force``).
        """
        for other in (self.cluster.a, self.cluster.b):
            if other.qemu_pids():
                other.ferryctl("destroy", self.name, timeout=60)
        if self.serial is not None:
            self.serial.close()
        host.ferryctl("start", self.name, *(["--force"] if force else []), check=True)
        self.serial = testguest.SerialReader(host.serial_socket(self.name))
        self.serial.wait_for_boot(timeout=120)
        self.last = self.serial.wait_for(lambda r: r.counter >= 2, timeout=300)  # RAM filled

    def moved_to(self, host: HostEnv) -> None:
        """The guest must now report from ``host``: no reboot, no bad page."""
        assert self.serial is not None
        self.last = wait_guest_on(self.serial, host.serial_socket(self.name), self.last)

    def still_running(self, host: HostEnv) -> bool:
        """After a failed migration: does the guest still make progress on ``host``?"""
        assert self.serial is not None
        self.serial.reconnect(host.serial_socket(self.name))
        time.sleep(0.3)
        latest = self.serial.latest()
        before = latest.counter if latest is not None else 0
        try:
            self.last = self.serial.wait_for(
                lambda r: r.counter >= before + 3, timeout=5, fresh=True
            )
        except (TimeoutError, testguest.GuestError):
            return False
        return True

    def close(self) -> None:
        if self.serial is not None:
            self.serial.close()
        for host in (self.cluster.a, self.cluster.b):
            if host.qemu_pids():
                with contextlib.suppress(Exception):
                    host.ferryctl("destroy", self.name, timeout=60)


def ferry_phase(
    cluster: Cluster,
    kernel: Path,
    args: argparse.Namespace,
    journal: JournalCapture | None,
    failures: list[str],
    anomalies: list[str],
) -> list[FerryRep]:
    """``--reps`` measured migrations per ferryctl variant, back and forth, interleaved.

    The variants (``ferry``, ``client-driven``) take turns in the order
    ``client_driven.schedule`` gives.  A migration that fails is reported in
    ``failures`` and tried again in the same direction (after restarting the
    guest if the failure left it stopped); one that succeeds without qemu's
    times (``total_time_ms`` 0) is reported in ``anomalies`` and not counted
    (then the same variant is tried again, in the new direction).  At most
    ``--retries`` such extra attempts per repetition.
    """
    a, b = cluster.a, cluster.b
    guest = FerryGuest(cluster, kernel, args)
    name = guest.name
    reps: list[FerryRep] = []
    src, dst = a, b
    extra = 0
    plan = schedule([v for v in args.variants if v in FERRYCTL_VARIANTS], args.reps)
    try:
        guest.start(a)
        log(
            f"ferry: guest up on a ({args.mem_mib} MiB, wss {args.wss_mib} MiB, "
            f"rate {args.rate_mib_s or 'max'} MiB/s)"
        )
        while len(reps) < len(plan):
            i, variant = plan[len(reps)][0] + 1, plan[len(reps)][1]
            via_netns = variant == CLIENT or args.p2p_via_netns
            tag = "" if variant == "ferry" else f"{variant} "
            what = f"{variant:<6} {i}/{args.reps} {src.label}->{dst.label}"
            if extra > args.retries * len(plan):
                raise RuntimeError(f"giving up after {extra} failed or unusable migrations")
            prepare_memory(args)
            help_ms = timed_run([ferryctl_bin(), "--help"])
            list_ms = timed_run(
                [ferryctl_bin(), "--connect", str(src.source_socket), "list", "--json"]
            )
            netns_ms = timed_run(netns_probe_argv(cluster, src))
            argv = migrate_argv(cluster, src, dst, name, variant=variant, via_netns=via_netns)
            try:
                t0, wall, marks, result, launch_ms = run_migrate(argv, args.timeout)
            except MigrateFailed as exc:
                # A failed migration must leave the guest running on the
                # source (DESIGN.md); say whether it did, then start over.
                extra += 1
                time.sleep(0.5)
                running = guest.still_running(src)
                state = src.domain_state(name)
                after = (
                    f"guest {'still running' if running else 'NOT running'} on "
                    f"{src.label} (state {state}), {len(dst.qemu_pids())} qemu on "
                    f"{dst.label}"
                )
                failures.append(f"{tag}{src.label}->{dst.label}: {exc.message} -> {after}")
                log(f"{what} FAILED: {exc.message} -> {after}")
                if not running or dst.qemu_pids():
                    log(f"ferry: restarting the guest on {src.label}")
                    guest.start(src)
                continue
            if src.qemu_pids():
                raise RuntimeError(f"a qemu is still running on {src.label} after the migration")
            guest.moved_to(dst)
            stats = result["stats"]
            if not stats.get("total_time_ms"):
                extra += 1
                anomalies.append(
                    f"{tag}{src.label}->{dst.label}: migrated in {wall:.0f} ms but the "
                    f"result has total_time_ms={stats.get('total_time_ms')!r}, "
                    f"downtime_ms={stats.get('downtime_ms')!r}"
                )
                log(
                    f"{what}: migrated, but without qemu's times "
                    f"(total_time_ms={stats.get('total_time_ms')!r}); not counted"
                )
                src, dst = dst, src
                continue
            timeline = journal_timeline(journal, t0, t0 + wall / 1000)
            rep = FerryRep(
                rep=i,
                direction=f"{src.label}->{dst.label}",
                cli_wall_ms=wall,
                agent_wall_ms=float(stats["wall_time_ms"]),
                total_time_ms=float(stats["total_time_ms"]),
                downtime_ms=float(stats.get("downtime_ms") or 0),
                setup_time_ms=float(stats.get("setup_time_ms") or 0),
                transferred_mib=stats.get("transferred", 0) / MIB,
                total_mib=stats.get("total", 0) / MIB,
                passes=int(stats.get("passes") or 0),
                help_ms=help_ms,
                list_ms=list_ms,
                marks=marks,
                timeline=timeline,
                launch_ms=launch_ms,
                variant=variant,
                via_netns=via_netns,
                netns_ms=netns_ms,
            )
            reps.append(rep)
            log(
                f"{what}: cli {wall:.0f} ms, agent {rep.agent_wall_ms:.0f}, qemu total "
                f"{rep.total_time_ms:.0f}, downtime {rep.downtime_ms:.0f}, overhead agent "
                f"{rep.agent_overhead_ms:.0f} / cli {rep.cli_overhead_ms:.0f} (--help "
                f"{help_ms:.0f}, dest qemu launch "
                f"{'?' if launch_ms is None else round(launch_ms)})"
            )
            src, dst = dst, src
    finally:
        guest.close()
    return reps


# -- minimal QMP driver -------------------------------------------------------


class MinimalDriver:
    """Launch qemus with Ferry's argv in the namespaces; migrate them over QMP directly."""

    def __init__(
        self,
        cluster: Cluster,
        kernel: Path,
        args: argparse.Namespace,
        *,
        xml: str | None = None,
        root: str = "minimal",
    ) -> None:
        """``xml``: the domain; default the plain test guest of ``args``."""
        from ferry.domain import parse_domain

        self.cluster = cluster
        self.args = args
        self.root = cluster.tmp / root
        self.root.mkdir(exist_ok=True)
        if xml is None:
            xml = guest_xml(
                "bench2",
                kernel,
                virt_type=args.virt,
                mem_mib=args.mem_mib,
                wss_mib=args.wss_mib,
                rate_mib_s=args.rate_mib_s,
                prealloc=args.prealloc,
            )
        self.domain = parse_domain(xml, where="bench")
        self.procs: list[Any] = []  # every QemuProcess we launched and did not kill yet
        self.seq = 0

    async def launch(self, host: HostEnv, *, incoming: bool) -> tuple[Any, Path]:
        """Start qemu in ``host``'s namespace exactly as ferry.host.Host.start would."""
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
        argv = to_qemu_argv(self.domain, paths=paths, incoming=incoming)
        argv.append("-S")
        argv += [
            "-chardev",
            f"socket,id=monitor-dst,path={run_dir / 'qmp2.sock'},server=on,wait=off",
            "-mon",
            "chardev=monitor-dst,mode=control",
        ]
        if host.local_storage:  # the host's own disks, as its agents see them
            argv = host.local_view(argv)
        argv = ["nsenter", f"--net=/run/netns/{host.ns.name}", *argv]
        proc = await launch(argv, pidfile=paths.pidfile, qmp_socket=paths.qmp_socket, timeout=120)
        self.procs.append(proc)
        return proc, run_dir / "serial0.sock"

    async def kill(self, proc: Any) -> None:
        await proc.kill()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    async def close(self) -> None:
        for proc in list(self.procs):
            with contextlib.suppress(Exception):
                await self.kill(proc)

    async def run(self) -> list[MinimalRep]:
        from ferry.qemu import query_migrate

        args = self.args
        a, b = self.cluster.a, self.cluster.b
        poll = args.poll_ms / 1000
        src, serial_path = await self.launch(a, incoming=False)
        await src.qmp.execute("cont")
        serial = testguest.SerialReader(serial_path)
        reps: list[MinimalRep] = []
        try:
            await asyncio.to_thread(serial.wait_for_boot, 120)
            last = await asyncio.to_thread(serial.wait_for, lambda r: r.counter >= 2, 300)
            log("minimal: guest up on a")
            for i in range(args.reps):
                sh, dh = (a, b) if i % 2 == 0 else (b, a)
                uri = f"tcp:{dh.ns.address}:{BASELINE_PORT + i}"
                await asyncio.to_thread(prepare_memory, args)
                t0 = time.monotonic()
                dst, dst_serial = await self.launch(dh, incoming=True)
                t_launch = time.monotonic()
                await dst.qmp.execute("migrate-incoming", {"uri": uri})
                await src.qmp.execute(
                    "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH}
                )
                await src.qmp.execute("migrate", {"uri": uri})
                t_migrate = time.monotonic()
                deadline = t_migrate + args.timeout
                while True:
                    stats = await query_migrate(src.qmp)
                    if stats.status == "completed":
                        break
                    if stats.status in ("failed", "cancelled") or time.monotonic() > deadline:
                        raise RuntimeError(f"minimal migration {stats.status}: {stats.error_desc}")
                    await asyncio.sleep(poll)
                t_src_done = time.monotonic()
                # qemu 7.2 sets the state to completed a moment before it fills
                # in total-time and downtime: a query in between reads 0.
                for _ in range(500):
                    if stats.total_time_ms:
                        break
                    await asyncio.sleep(0.002)
                    stats = await query_migrate(src.qmp)
                while True:
                    dstats = await query_migrate(dst.qmp)
                    if dstats.status == "completed":
                        break
                    if dstats.status in ("failed", "cancelled") or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"incoming migration {dstats.status}: {dstats.error_desc}"
                        )
                    await asyncio.sleep(poll)
                t_dst_done = time.monotonic()
                await dst.qmp.execute("cont")
                t_cont = time.monotonic()
                await self.kill(src)
                t_end = time.monotonic()
                src = dst
                rep = MinimalRep(
                    rep=i + 1,
                    direction=f"{sh.label}->{dh.label}",
                    wall_ms=(t_end - t0) * 1000,
                    total_time_ms=float(stats.total_time_ms or 0),
                    downtime_ms=float(stats.downtime_ms or 0),
                    setup_time_ms=float(stats.setup_time_ms or 0),
                    transferred_mib=stats.ram_transferred / MIB,
                    total_mib=stats.ram_total / MIB,
                    passes=stats.ram_dirty_sync_count,
                    launch_ms=(t_launch - t0) * 1000,
                    incoming_ms=(t_migrate - t_launch) * 1000,
                    follow_ms=(t_src_done - t_migrate) * 1000,
                    dest_done_ms=(t_dst_done - t_src_done) * 1000,
                    cont_ms=(t_cont - t_dst_done) * 1000,
                    kill_ms=(t_end - t_cont) * 1000,
                )
                reps.append(rep)
                log(
                    f"minimal {rep.rep}/{args.reps} {rep.direction}: wall {rep.wall_ms:.0f} ms, "
                    f"qemu total {rep.total_time_ms:.0f}, downtime {rep.downtime_ms:.0f}, overhead "
                    f"{rep.overhead_ms:.0f} (launch {rep.launch_ms:.0f}, kill {rep.kill_ms:.0f})"
                )
                last = await asyncio.to_thread(wait_guest_on, serial, dst_serial, last)
        finally:
            serial.close()
            await self.close()
        return reps


# -- report -------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ferryctl_rows(
    add: Callable[[str, Sequence[float]], None], prefix: str, reps: Sequence[FerryRep]
) -> None:
    """The rows of one ferryctl variant (``ferry``: the labels of earlier runs)."""
    add(f"{prefix}: ferryctl migrate wall", [r.cli_wall_ms for r in reps])
    add(f"{prefix}: agent wall_time_ms", [r.agent_wall_ms for r in reps])
    add(f"{prefix}: qemu total_time_ms", [r.total_time_ms for r in reps])
    add(f"{prefix}: qemu downtime_ms", [r.downtime_ms for r in reps])
    add(f"{prefix}: qemu setup_time_ms", [r.setup_time_ms for r in reps])
    add(f"{prefix}: overhead (CLI wall - qemu total)", [r.cli_overhead_ms for r in reps])
    add(f"{prefix}: overhead (agent wall - qemu total)", [r.agent_overhead_ms for r in reps])
    add(f"{prefix}: CLI wall - agent wall", [r.cli_wall_ms - r.agent_wall_ms for r in reps])
    add(
        f"{prefix}: dest qemu launch (in Prepare)",
        [r.launch_ms for r in reps if r.launch_ms is not None],
    )
    add(
        f"{prefix}: agent overhead excl. dest launch",
        [v for r in reps if (v := r.agent_overhead_excl_launch_ms) is not None],
    )
    phase_names: list[str] = []
    for r in reps:
        phase_names += [k for k in r.phase_ms() if k not in phase_names]
    what = "  phase" if prefix == "ferry" else f"  {prefix} phase"
    for k in phase_names:
        add(f"{what}: {k}", [r.phase_ms()[k] for r in reps if k in r.phase_ms()])


def rep_json(r: FerryRep) -> dict[str, Any]:
    return {
        **asdict(r),
        "cli_overhead_ms": r.cli_overhead_ms,
        "agent_overhead_ms": r.agent_overhead_ms,
        "agent_overhead_excl_launch_ms": r.agent_overhead_excl_launch_ms,
        "phases_ms": r.phase_ms(),
    }


def median_timeline(reps: Sequence[FerryRep]) -> dict[str, Any] | None:
    """The timeline of the repetition with the median agent wall time."""
    if not reps:
        return None
    r = sorted(reps, key=lambda r: r.agent_wall_ms)[len(reps) // 2]
    return {"rep": r.rep, "variant": r.variant, "marks": r.marks, "journal": r.timeline}


def build_report(
    args: argparse.Namespace,
    ferry: list[FerryRep],
    minimal: list[MinimalRep],
    failures: Sequence[str] = (),
    anomalies: Sequence[str] = (),
    client: Sequence[FerryRep] = (),
) -> dict[str, Any]:
    rows: dict[str, dict[str, float]] = {}

    def add(label: str, values: Sequence[float]) -> None:
        if values:
            rows[label] = summary(values)

    add("ferryctl --help (Python start-up)", [r.help_ms for r in ferry])
    add("ferryctl list (start-up+connect+1 req)", [r.list_ms for r in ferry])
    add("ip netns exec SRC env true", [r.netns_ms for r in (*ferry, *client) if r.netns_ms])
    for prefix, reps in (("ferry", ferry), ("client-driven", client)):
        ferryctl_rows(add, prefix, reps)
    add("minimal: driver wall", [r.wall_ms for r in minimal])
    add("minimal: qemu total_time_ms", [r.total_time_ms for r in minimal])
    add("minimal: qemu downtime_ms", [r.downtime_ms for r in minimal])
    add("minimal: qemu setup_time_ms", [r.setup_time_ms for r in minimal])
    add("minimal: overhead (wall - qemu total)", [r.overhead_ms for r in minimal])
    add("minimal: overhead excl. dest launch", [r.overhead_excl_launch_ms for r in minimal])
    add("  step: launch dest qemu + QMP connect", [r.launch_ms for r in minimal])
    add("  step: migrate-incoming/params/migrate", [r.incoming_ms for r in minimal])
    add("  step: migrate -> source completed", [r.follow_ms for r in minimal])
    add("  step: source -> dest completed", [r.dest_done_ms for r in minimal])
    add("  step: cont", [r.cont_ms for r in minimal])
    add("  step: kill source qemu", [r.kill_ms for r in minimal])

    ratios: dict[str, float] = {}
    if ferry and minimal:
        mw = statistics.median(r.wall_ms for r in minimal)
        mo = statistics.median(r.overhead_ms for r in minimal)
        ratios["ferryctl wall / minimal wall"] = (
            statistics.median(r.cli_wall_ms for r in ferry) / mw
        )
        ratios["agent wall / minimal wall"] = statistics.median(r.agent_wall_ms for r in ferry) / mw
        if mo > 0:
            ratios["CLI overhead / minimal overhead"] = (
                statistics.median(r.cli_overhead_ms for r in ferry) / mo
            )
            ratios["agent overhead / minimal overhead"] = (
                statistics.median(r.agent_overhead_ms for r in ferry) / mo
            )
        ratios["agent overhead - minimal overhead (ms)"] = (
            statistics.median(r.agent_overhead_ms for r in ferry) - mo
        )
        excl = [v for r in ferry if (v := r.agent_overhead_excl_launch_ms) is not None]
        mx = statistics.median(r.overhead_excl_launch_ms for r in minimal)
        if excl and mx > 0:
            ratios["agent overhead / minimal, both excl. launch"] = statistics.median(excl) / mx
        if excl:
            ratios["agent - minimal overhead, excl. launch (ms)"] = statistics.median(excl) - mx
        ratios["CLI overhead - --help - minimal overhead (ms)"] = (
            statistics.median(r.cli_overhead_ms for r in ferry)
            - statistics.median(r.help_ms for r in ferry)
            - mo
        )
    verdict = None
    if ferry:
        med = statistics.median(r.agent_overhead_ms for r in ferry)
        excl_l = [v for r in ferry if (v := r.agent_overhead_excl_launch_ms) is not None]
        verdict = {
            "agent_overhead_median_ms": med,
            "target_ms": TARGET_OVERHEAD_MS,
            "met": med < TARGET_OVERHEAD_MS,
            "agent_overhead_excl_launch_median_ms": statistics.median(excl_l) if excl_l else None,
        }
    return {
        "config": {
            "mem_mib": args.mem_mib,
            "reps": args.reps,
            "virt": args.virt,
            "prealloc": args.prealloc,
            "wss_mib": args.wss_mib,
            "rate_mib_s": args.rate_mib_s,
            "poll_ms": args.poll_ms,
            "memory": args.memory,
            "settle_s": args.settle,
            "cpus": os.cpu_count(),
            "variants": list(getattr(args, "variants", ["ferry", "minimal"])),
            "p2p_via_netns": bool(getattr(args, "p2p_via_netns", False)),
        },
        "rows": rows,
        "ratios": ratios,
        "verdict": verdict,
        "ferry_failures": list(failures),
        "ferry_anomalies": list(anomalies),
        "client_driven_vs_p2p": (
            comparison(ferry, client, bool(getattr(args, "p2p_via_netns", False)))
            if ferry and client
            else None
        ),
        "ferry": [rep_json(r) for r in ferry],
        "client_driven": [rep_json(r) for r in client],
        "minimal": [
            {
                **asdict(r),
                "overhead_ms": r.overhead_ms,
                "overhead_excl_launch_ms": r.overhead_excl_launch_ms,
            }
            for r in minimal
        ],
        "median_rep_timeline": median_timeline(ferry),
        "median_rep_timeline_client_driven": median_timeline(client),
    }


def print_table(report: dict[str, Any]) -> None:
    cfg = report["config"]
    print(
        f"migration benchmark: {cfg['mem_mib']} MiB guest (all pages non-zero), wss "
        f"{cfg['wss_mib']} MiB, rate {cfg['rate_mib_s'] or 'max'} MiB/s, virt {cfg['virt']}, "
        f"{'prealloc' if cfg['prealloc'] else 'no prealloc'}, {cfg['reps']} reps each, "
        f"memory {cfg['memory']}, {cfg['cpus']} CPUs"
    )
    width = max(len(k) for k in report["rows"]) + 2
    print(f"\n{'figure (ms)':<{width}}{'median':>9}{'min':>9}{'max':>9}")
    print("-" * (width + 27))
    for label, s in report["rows"].items():
        print(f"{label:<{width}}{s['median']:>9.0f}{s['min']:>9.0f}{s['max']:>9.0f}")
    if report["ratios"]:
        print()
        for label, value in report["ratios"].items():
            fmt = f"{value:.0f}" if "(ms)" in label else f"{value:.2f}x"
            print(f"{label:<{width}}{fmt:>9}")
    if report["client_driven_vs_p2p"] is not None:
        print_comparison(report["client_driven_vs_p2p"], width)
    v = report["verdict"]
    if v is not None:
        print(
            f"\norchestration overhead (agent wall - qemu total, median): "
            f"{v['agent_overhead_median_ms']:.0f} ms; target < {v['target_ms']:.0f} ms: "
            f"{'MET' if v['met'] else 'NOT MET'}"
        )
        if v["agent_overhead_excl_launch_median_ms"] is not None:
            print(
                f"the same without launching the destination qemu (median): "
                f"{v['agent_overhead_excl_launch_median_ms']:.0f} ms"
            )
    if report["ferry_failures"]:
        n_fail = len(report["ferry_failures"])
        n_all = n_fail + len(report["ferry"]) + len(report["client_driven"])
        n_all += len(report["ferry_anomalies"])
        print(f"\nferry migrations that FAILED (then retried): {n_fail} of {n_all} attempts")
        for text in report["ferry_failures"]:
            print(f"  {text}")
    if report["ferry_anomalies"]:
        print(
            f"\nferry migrations that succeeded WITHOUT qemu's times (not counted): "
            f"{len(report['ferry_anomalies'])}"
        )
        for text in report["ferry_anomalies"]:
            print(f"  {text}")
    print("\nper repetition (ms):")
    for variant, key in (("ferry", "ferry"), ("client-driven", "client_driven")):
        if not report[key] and variant != "ferry":
            continue
        print(
            f"  {variant:<14}{'dir':<6}{'cli':>7}{'agent':>7}{'total':>7}{'down':>6}{'ovh':>6}"
            f"{'MiB sent':>10}{'passes':>7}"
        )
        for r in report[key]:
            print(
                f"  {r['rep']:<14}{r['direction']:<6}{r['cli_wall_ms']:>7.0f}"
                f"{r['agent_wall_ms']:>7.0f}{r['total_time_ms']:>7.0f}{r['downtime_ms']:>6.0f}"
                f"{r['agent_overhead_ms']:>6.0f}{r['transferred_mib']:>10.0f}{r['passes']:>7}"
            )
    print(
        f"  {'minimal':<14}{'dir':<6}{'wall':>7}{'':>7}{'total':>7}{'down':>6}{'ovh':>6}"
        f"{'MiB sent':>10}{'passes':>7}"
    )
    for r in report["minimal"]:
        print(
            f"  {r['rep']:<14}{r['direction']:<6}{r['wall_ms']:>7.0f}{'':>7}"
            f"{r['total_time_ms']:>7.0f}{r['downtime_ms']:>6.0f}{r['overhead_ms']:>6.0f}"
            f"{r['transferred_mib']:>10.0f}{r['passes']:>7}"
        )
    for tl in (report["median_rep_timeline"], report["median_rep_timeline_client_driven"]):
        if tl is not None:
            print_timeline(tl)


def print_timeline(tl: dict[str, Any]) -> None:
    print(
        f"\ntimeline of {tl['variant']} rep {tl['rep']} (ms after ferryctl started; ferryctl "
        "events and agent journal records):"
    )
    items: list[tuple[float, str]] = [
        (t, f"{'ferryctl':<18} event {name}") for name, t in tl["marks"].items()
    ]
    for t, agent, host, msg in tl["journal"]:
        items.append((t, f"{agent + '@' + host:<18} {msg[:110]}"))
    for t, text in sorted(items, key=lambda x: x[0]):
        print(f"  {t:>8.1f}  {text}")


# -- main ---------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ferry migration wall time vs qemu's own time vs a minimal QMP driver.",
    )
    p.add_argument("--mem-mib", type=int, default=1024, help="guest RAM (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="migrations per mode (default %(default)s)")
    p.add_argument(
        "--virt",
        choices=("kvm", "qemu"),
        default=None,
        help="domain type: kvm or qemu (TCG); default kvm if /dev/kvm opens",
    )
    p.add_argument(
        "--prealloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="preallocate guest RAM (<allocation mode='immediate'/>; default on)",
    )
    p.add_argument("--wss-mib", type=int, default=8, help="guest working set (default %(default)s)")
    p.add_argument(
        "--rate-mib-s",
        type=int,
        default=0,
        help="guest rewrite rate, 0 = as fast as it can (default %(default)s)",
    )
    p.add_argument(
        "--poll-ms",
        type=float,
        default=10.0,
        help="the minimal driver's query-migrate interval (default %(default)s)",
    )
    p.add_argument(
        "--memory",
        choices=("warm", "cold", "asis"),
        default="warm",
        help="state of free host memory before every migration, in both modes "
        "(default %(default)s); see 'Memory' in the module docstring",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="with --memory cold: seconds to wait before every migration (default %(default)s)",
    )
    p.add_argument(
        "--variants",
        help="comma-separated: ferry (p2p), client-driven, minimal (default ferry,minimal); "
        "ferry and client-driven run interleaved on one guest, minimal after them",
    )
    p.add_argument("--only", choices=("ferry", "client-driven", "minimal"), help="= --variants X")
    p.add_argument(
        "--p2p-launch",
        choices=("auto", "direct", "netns"),
        default="auto",
        help="how the p2p ferryctl is started: directly, or like the client-driven one via "
        "'ip netns exec SRC env ...'; auto: netns when client-driven runs too",
    )
    p.add_argument(
        "--trace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture the agents' journal records with ms timestamps (default on)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="per migration, seconds")
    p.add_argument(
        "--retries",
        type=int,
        default=6,
        help="failed or unusable ferry migrations allowed, per repetition on "
        "average (default %(default)s); every one is reported",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.virt is None:
        args.virt = "kvm" if kvm_opens() else "qemu"
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.only and args.variants:
        p.error("--only and --variants exclude each other")
    try:
        args.variants = parse_variants(args.variants or args.only or "ferry,minimal")
    except ValueError as exc:
        p.error(str(exc))
    args.p2p_via_netns = args.p2p_launch == "netns" or (
        args.p2p_launch == "auto" and CLIENT in args.variants
    )
    return args


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally (clean-up) runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("error: needs root (network namespaces)")
        return 2
    kernel = testguest.build()
    journal: JournalCapture | None = None
    cluster: Cluster | None = None
    ferry: list[FerryRep] = []  # every ferryctl variant
    minimal: list[MinimalRep] = []
    failures: list[str] = []
    anomalies: list[str] = []
    with sigterm_as_interrupt():
        try:
            if args.trace:
                jdir = Path(tempfile.mkdtemp(prefix="fy-journal-"))
                journal = JournalCapture(jdir / "journal.sock")
                os.environ["FERRY_JOURNAL_SOCKET"] = str(journal.path)
            cluster = Cluster()
            log(
                f"test bed in {cluster.tmp} (virt {args.virt}, "
                f"{'prealloc' if args.prealloc else 'no prealloc'})"
            )
            if any(v in FERRYCTL_VARIANTS for v in args.variants):
                if CLIENT in args.variants:  # admit the operator certificate on both hosts
                    for host in (cluster.a, cluster.b):
                        host.write_config(**cluster.operator_config())
                cluster.start()
                ferry = ferry_phase(cluster, kernel, args, journal, failures, anomalies)
                for host in (cluster.a, cluster.b):  # free the CPU for the next mode
                    for agent in list(host.procs):
                        host.stop_agent(agent)
            if "minimal" in args.variants:
                driver = MinimalDriver(cluster, kernel, args)
                minimal = asyncio.run(driver.run())
        except BaseException as exc:
            if cluster is not None and not isinstance(exc, KeyboardInterrupt):
                log(cluster.logs())
                if journal is not None:
                    log("----- agent journal records (last 80) -----")
                    for t, f in journal.records[-80:]:
                        log(
                            f"{t:.3f} {f.get('SYSLOG_IDENTIFIER', '?')}@{f.get('FERRY_HOST', '?')} "
                            f"{f.get('PRIORITY', '')} {f.get('MESSAGE', '')}"
                        )
            raise
        finally:
            if journal is not None:
                if cluster is not None:
                    with contextlib.suppress(OSError):
                        journal.dump(cluster.tmp / "bench-journal.jsonl")
                journal.close()
                with contextlib.suppress(OSError):
                    journal.path.parent.rmdir()
                os.environ.pop("FERRY_JOURNAL_SOCKET", None)
            if cluster is not None:
                if os.environ.get("FERRY_KEEP_TESTBED"):
                    log(f"keeping the test bed tree {cluster.tmp}")
                cluster.close()
    client = [r for r in ferry if r.variant == CLIENT]
    ferry = [r for r in ferry if r.variant != CLIENT]
    report = build_report(args, ferry, minimal, failures, anomalies, client)
    if args.json:
        print(json.dumps(finite(report), indent=1, allow_nan=False))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was cleaned up")
        sys.exit(130)
