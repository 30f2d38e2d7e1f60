#!/usr/bin/env python3
"""``make demo``: two hosts, a VM that dirties memory, a live migration, its journal.

Run as root on Debian 12 (``make demo`` installs what it needs first).  The
demo

1. starts a private journald namespace and makes two "hosts" (network
   namespaces joined by a veth pair) with a fresh CA and host certificates,
   and starts ferry-source and ferry-destination on each, logging to that
   journal;
2. builds the test guest and starts it on host A, rewriting part of its
   memory all the time;
3. shows the guest's own status line (from its serial port);
4. migrates it live to host B with ``ferryctl migrate`` (a live panel on a
   terminal, plain progress lines on a pipe);
5. shows that it now runs on B and not on A, that it kept counting without a
   reboot and that not one page of its memory changed in transit;
6. prints the migration's story from the journal, both hosts merged;
7. tears everything down: agents, qemu, namespaces, certificates, journald
   and its files, also after an error or Ctrl-C.

Exit status 0 on success; 1 with an ``error:`` line on failure; 130 when
interrupted.  ``FERRY_TEST_VIRT=qemu`` forces TCG (the default is KVM where
/dev/kvm works).  ``FERRY_KEEP_TESTBED=1`` keeps the temporary tree (configs,
agent logs) for a look afterwards; everything else is always removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _sub in ("tools/testbed", "tools/guest"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

import testguest  # noqa: E402
from cluster import Cluster, HostEnv, guest_xml, wait_until  # noqa: E402

JOURNALD = Path("/lib/systemd/systemd-journald")
JOURNALCTL = shutil.which("journalctl") or "/usr/bin/journalctl"
VENV_BIN = Path(sys.executable).parent
# MESSAGE_IDs of ferry.journal.MessageID (fixed forever; copied so the demo
# does not need the agents' package to read its journal).
MSG_MIGRATION_STARTED = "f493260092134c81ac77ce7204c35620"
MSG_MIGRATION_SUMMARY = "5a3ea072941b432b985dcdd9a67382a1"

# The guest and the migration settings, picked by trying several (about 7 s
# for `ferryctl migrate`, 5 s of it copying, a progress line every 2 s on a
# pipe, 0 warnings, in repeated runs under KVM): the first pass copies 512 MiB
# at the 128 MiB/s cap in about 4 s; meanwhile the guest has rewritten its
# whole 64 MiB working set, which later passes resend while it keeps
# dirtying 96 MiB/s, less than the cap, so each pass is shorter than the one
# before until the rest fits into the tolerated downtime.  --auto-converge is
# the safety net for a slower host: should the copy fall behind the guest,
# qemu throttles the guest's vCPU until it catches up.
GUEST = "g1"
MEM_MIB = 512
WSS_MIB = 64
RATE_MIB_S = 96
BANDWIDTH_MIB_S = 128
MAX_DOWNTIME_MS = 300
MIGRATE_TIMEOUT_S = 60


class DemoError(Exception):
    """A step failed; the message says which and why."""


# --------------------------------------------------------------------------
# output


class Out:
    """Section headers and notes; bold on a terminal, plain on a pipe."""

    def __init__(self) -> None:
        self.tty = sys.stdout.isatty()
        self.t0 = time.monotonic()
        self.step = 0

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.tty else text

    def section(self, title: str, step: int | None = None) -> None:
        self.step = step if step is not None else self.step + 1
        head = f"== [{self.step}/7] {title} "
        stamp = f" t+{time.monotonic() - self.t0:5.1f}s =="
        line = head + "=" * max(3, 78 - len(head) - len(stamp)) + stamp
        print("\n" + self._style(line, "1;36"), flush=True)

    def info(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def ok(self, text: str) -> None:
        print(f"  {self._style('ok', '1;32')}  {text}", flush=True)

    def warn(self, text: str) -> None:
        print(f"  {self._style('note', '1;33')} {text}", flush=True)

    def command(self, argv: list[str]) -> None:
        shown = " ".join(_short(a) for a in argv)
        print(self._style(f"  $ {shown}", "2"), flush=True)

    def block(self, text: str, indent: str = "    ") -> None:
        for line in text.rstrip("\n").splitlines():
            print(indent + line)
        sys.stdout.flush()


def _short(arg: str) -> str:
    """argv element as shown: venv paths shortened, spaces quoted."""
    if arg.startswith(str(VENV_BIN) + "/"):
        arg = arg[len(str(VENV_BIN)) + 1 :]
    return f"'{arg}'" if " " in arg else arg


# --------------------------------------------------------------------------
# a private journald (the minimal part of tests/journald_fixture.py)


@dataclass
class Journal:
    """A ``systemd-journald NAMESPACE`` this demo started and will remove."""

    namespace: str
    proc: subprocess.Popen[bytes] | None = None
    cleanup: list[Path] = field(default_factory=list)
    made_dirs: list[Path] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return Path(f"/run/systemd/journal.{self.namespace}/socket")

    def journalctl(self, *args: str) -> list[str]:
        return [JOURNALCTL, "--no-pager", f"--namespace={self.namespace}", *args]

    def start(self) -> None:
        if not JOURNALD.exists():
            raise DemoError(f"{JOURNALD} not found (Debian package 'systemd')")
        # journald expects /run/systemd/journal to exist (a fresh container may
        # not have it); made here only if missing, removed again at the end.
        for d in (Path("/run/systemd"), Path("/run/systemd/journal")):
            if not d.exists():
                d.mkdir(mode=0o755)
                self.made_dirs.append(d)
        # Without /var/log/journal journald keeps its files under /run/log/journal,
        # creating it: remove those directories again if they were not there.
        run_log = (Path("/run/log"), Path("/run/log/journal"))
        self.made_dirs += [d for d in run_log if not d.exists()]
        mid = ""
        with contextlib.suppress(OSError):
            mid = Path("/etc/machine-id").read_text().strip()
        self.cleanup = [self.socket.parent]
        if mid:
            self.cleanup += [
                Path(f"/var/log/journal/{mid}.{self.namespace}"),
                Path(f"/run/log/journal/{mid}.{self.namespace}"),
            ]
        self.proc = subprocess.Popen(
            [str(JOURNALD), self.namespace],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C is ours to handle, not journald's
        )
        deadline = time.monotonic() + 10
        while not self.socket.is_socket():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DemoError(
                    f"systemd-journald {self.namespace} did not start "
                    f"(exit status {self.proc.poll()}); is /etc/machine-id set?"
                )
            time.sleep(0.05)

    def sync(self) -> None:
        subprocess.run(self.journalctl("--sync"), capture_output=True, timeout=10, check=False)

    def query(self, *matches: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            self.journalctl("-o", "json", *matches),
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for d in self.cleanup:
            shutil.rmtree(d, ignore_errors=True)
        for d in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty


# --------------------------------------------------------------------------
# helpers


def run_ctl(out: Out, host: HostEnv, *args: str, show: bool = True) -> str:
    """Run ferryctl against ``host``'s source agent, echo the command and its output."""
    if show:
        out.command(["ferryctl", "-c", f"${host.label.upper()}", *args])
    result = host.ferryctl(*args, timeout=60)
    if result.returncode != 0:
        raise DemoError(
            f"ferryctl {' '.join(args)} on host {host.label} failed ({result.returncode}): "
            f"{result.stderr.strip() or result.stdout.strip()}"
        )
    if show:
        out.block(result.stdout)
    return str(result.stdout)


def report_line(rep: testguest.Report) -> str:
    return (
        f"counter={rep.counter}  dirtied={rep.dirtied_mib} MiB  "
        f"bad pages={rep.bad_pages}  checksum={rep.checksum:016x}  "
        f"verify sweeps={rep.sweeps}"
    )


def qemu_processes(host: HostEnv) -> list[str]:
    """``pid  qemu -name guest=…`` for each qemu in the host's namespace."""
    lines = []
    for pid in host.qemu_pids():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            words = [a.decode(errors="replace") for a in argv if a]
            name = next((w for w in words if w.startswith("guest=")), "?")
            lines.append(f"pid {pid}  {Path(words[0]).name} -name {name.split(',')[0]}")
    return lines


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def preflight() -> None:
    if os.geteuid() != 0:
        raise DemoError("the demo needs root (network namespaces, journald); run: sudo make demo")
    for tool in ("ip", "qemu-system-x86_64", "as", "ld", "journalctl"):
        if shutil.which(tool) is None:
            raise DemoError(f"{tool} is not installed (make deps installs it)")
    if not (VENV_BIN / "ferryctl").exists():
        raise DemoError(f"{VENV_BIN / 'ferryctl'} is missing: run 'make build' first")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt, so the teardown still runs."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C too, even if started with SIGINT ignored (a background job).
    old[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------
# the demo


@dataclass
class Result:
    migration_id: str | None = None
    summary: dict[str, str] = field(default_factory=dict)
    migrate_s: float = 0.0


def demo(out: Out, journal: Journal, state: dict[str, Any]) -> Result:
    result = Result()

    # -- 1 ---------------------------------------------------------------------
    out.section("Two hosts, fresh certificates, both agents on each")
    journal.start()
    out.ok(f"journald namespace '{journal.namespace}' (socket {journal.socket})")
    cluster = Cluster(agent_env={"FERRY_JOURNAL_NAMESPACE": journal.namespace})
    state["cluster"] = cluster
    a, b = cluster.a, cluster.b
    out.ok(f"host A: namespace {a.ns.name}  address {a.ns.address}")
    out.ok(f"host B: namespace {b.ns.name}  address {b.ns.address}")
    out.ok(f"CA and host certificates (EC P-256, mutual TLS) in {cluster.pki}")
    out.info(f"test bed directory: {cluster.tmp}")
    out.info(f"admin sockets of ferry-source: A={a.source_socket}")
    out.info(f"                               B={b.source_socket}")
    cluster.start()
    for host in (a, b):
        pids = ", ".join(f"ferry-{n} pid {p.pid}" for n, p in host.procs.items())
        out.ok(f"host {host.label.upper()}: {pids}  (peer port {host.uri})")

    # -- 2 ---------------------------------------------------------------------
    out.section(f"Test guest '{GUEST}' on host A, dirtying memory")
    kernel = testguest.build()
    virt = os.environ.get("FERRY_TEST_VIRT") or ("kvm" if kvm_usable() else "qemu")
    out.ok(f"guest kernel built: {kernel}")
    if virt != "kvm":
        out.warn("/dev/kvm is not usable: the guest runs under TCG (slower)")
    xml_path = cluster.tmp / f"{GUEST}.xml"
    xml_path.write_text(
        guest_xml(GUEST, kernel, virt_type=virt, mem_mib=MEM_MIB, wss_mib=WSS_MIB,
                  rate_mib_s=RATE_MIB_S, report_ms=200)
    )  # fmt: skip
    out.info(
        f"{MEM_MIB} MiB RAM ({virt}), rewrites a {WSS_MIB} MiB working set at "
        f"{RATE_MIB_S} MiB/s and verifies the rest of its memory continuously"
    )
    run_ctl(out, a, "define", str(xml_path))
    run_ctl(out, a, "start", GUEST)
    serial = testguest.SerialReader(a.serial_socket(GUEST))
    state["serial"] = serial
    serial.wait_for_boot(timeout=60)
    serial.wait_for(lambda r: r.counter >= 5 and r.sweeps >= 1, timeout=60)

    # -- 3 ---------------------------------------------------------------------
    out.section("Before: the guest's own status (serial port on host A)")
    run_ctl(out, a, "list")
    before = serial.latest()
    assert before is not None
    out.info(f"guest says: {report_line(before)}")
    out.info(f"qemu on A: {', '.join(qemu_processes(a)) or 'none'}")
    out.info(f"qemu on B: {', '.join(qemu_processes(b)) or 'none'}")

    # -- 4 ---------------------------------------------------------------------
    out.section(f"Live migration A -> B ({b.uri})")
    argv = [
        str(VENV_BIN / "ferryctl"), "--connect", str(a.source_socket),
        "migrate", GUEST, b.uri, "--live", "--auto-converge",
        "--bandwidth", str(BANDWIDTH_MIB_S), "--max-downtime", str(MAX_DOWNTIME_MS),
        "--timeout", str(MIGRATE_TIMEOUT_S),
    ]  # fmt: skip
    out.command(["ferryctl", "-c", "$A", *argv[3:]])
    out.info(
        f"(copy capped at {BANDWIDTH_MIB_S} MiB/s so it takes a few seconds; the guest keeps "
        f"dirtying {RATE_MIB_S} MiB/s meanwhile; auto-converge would throttle it if needed)"
    )
    sys.stdout.flush()
    t_mig = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)  # our stdout: live panel on a tty
    state["ferryctl"] = proc
    try:
        rc = proc.wait(MIGRATE_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise DemoError("ferryctl migrate did not return") from None
    result.migrate_s = time.monotonic() - t_mig
    state.pop("ferryctl", None)
    if rc != 0:
        raise DemoError(f"ferryctl migrate failed with exit status {rc} (see above)")

    # -- 5 ---------------------------------------------------------------------
    out.section("After: the guest runs on B, not on A, and never noticed")
    wait_until(lambda: not a.qemu_pids(), 10, "qemu on A to exit")
    out.info("host A:")
    run_ctl(out, a, "list", "--all")
    out.info("host B:")
    run_ctl(out, b, "list")
    qa, qb = qemu_processes(a), qemu_processes(b)
    out.info(f"qemu processes in {a.ns.name} (A): {', '.join(qa) or 'none'}")
    out.info(f"qemu processes in {b.ns.name} (B): {', '.join(qb) or 'none'}")
    if qa or len(qb) != 1:
        raise DemoError(f"expected one qemu on B and none on A, found A={qa} B={qb}")
    last_on_a = serial.latest()
    assert last_on_a is not None
    serial.reconnect(b.serial_socket(GUEST))
    after = serial.wait_for(lambda r: r.counter >= last_on_a.counter + 5, timeout=30)
    out.info(f"guest said on A: {report_line(last_on_a)}")
    out.info(f"guest says on B: {report_line(after)}")
    if serial.boot_count != 1:
        raise DemoError(f"the guest rebooted ({serial.boot_count} boots seen)")
    if after.bad_pages != 0:
        raise DemoError(f"the guest found {after.bad_pages} bad page(s) after the migration")
    if after.checksum != before.checksum:
        raise DemoError(
            f"checksum of the static pages changed: {before.checksum:016x} -> {after.checksum:016x}"
        )
    out.ok(
        f"counter kept climbing ({before.counter} -> {after.counter}) with no reboot (1 boot seen)"
    )
    out.ok("bad pages 0: every page verified by the guest is intact")
    out.ok(f"checksum of the static pages unchanged ({after.checksum:016x})")

    # -- 6 ---------------------------------------------------------------------
    out.section("The migration's journal (both hosts, one journald namespace)")
    journal.sync()
    started = journal.query(f"FERRY_DOMAIN={GUEST}", f"MESSAGE_ID={MSG_MIGRATION_STARTED}")
    ids = [e["FERRY_MIGRATION_ID"] for e in started if e.get("FERRY_MIGRATION_ID")]
    if not ids:
        raise DemoError(f"no migration of {GUEST} found in journal namespace {journal.namespace}")
    mig = result.migration_id = ids[-1]
    out.info(f"migration id {mig} (journalctl FERRY_DOMAIN={GUEST} MESSAGE_ID=<started>)")
    jargv = journal.journalctl(f"FERRY_MIGRATION_ID={mig}", "-o", "short-precise")
    out.command(["journalctl", *[w for w in jargv[1:] if w != "--no-pager"]])
    jout = subprocess.run(jargv, capture_output=True, text=True, timeout=20, check=False)
    out.block(jout.stdout or jout.stderr)
    for entry in journal.query(f"FERRY_MIGRATION_ID={mig}", f"MESSAGE_ID={MSG_MIGRATION_SUMMARY}"):
        result.summary = {
            k.removeprefix("FERRY_SUMMARY_").lower(): v
            for k, v in entry.items()
            if k.startswith("FERRY_SUMMARY_")
        }
    out.command(["ferryctl", "-c", "$A", "journal", "--migration", mig])
    ctl = a.ferryctl("journal", "--migration", mig, timeout=30)
    if ctl.returncode == 0 and ctl.stdout.strip():
        out.block(ctl.stdout)
    else:
        why = (ctl.stderr or ctl.stdout).strip().splitlines()
        out.warn(
            "ferryctl journal --migration is not available yet"
            + (f": {why[-1]}" if why else " (no entries)")
            + "; journalctl above shows the same records"
        )

    # -- 7: the caller tears down and prints the summary -------------------------
    return result


def teardown(out: Out, journal: Journal, state: dict[str, Any]) -> list[str]:
    """Stop everything this demo started; return what could not be removed."""
    left: list[str] = []
    proc = state.pop("ferryctl", None)
    if proc is not None and proc.poll() is None:
        # Interrupted mid-migration: ferryctl asks the source to abort on
        # SIGINT (it got one already on a Ctrl-C; a second is ignored); give
        # it a moment before the hosts disappear.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    serial = state.pop("serial", None)
    if serial is not None:
        serial.close()
    cluster: Cluster | None = state.pop("cluster", None)
    names: list[str] = []
    if cluster is not None:
        names = [cluster.a.ns.name, cluster.b.ns.name]
        with contextlib.suppress(Exception):
            # Stop the agents politely first so their last records reach the journal.
            for host in (cluster.a, cluster.b):
                for agent in list(host.procs):
                    host.stop_agent(agent, signal.SIGTERM, timeout=5)
        cluster.close()
        out.ok("agents and qemu killed, namespaces deleted: " + ", ".join(names))
        if not os.environ.get("FERRY_KEEP_TESTBED"):
            out.ok(f"test bed directory removed (certificates, configs): {cluster.tmp}")
        else:
            out.warn(f"FERRY_KEEP_TESTBED set: kept {cluster.tmp}")
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left += [f"namespace {n}" for n in names if n in netns]
    journal.stop()
    if journal.proc is not None:
        out.ok(f"journald '{journal.namespace}' stopped, its files removed")
    left += [f"journal {p}" for p in journal.cleanup if p.exists()]
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    out = Out()
    journal = Journal(namespace=f"ferrydemo-{os.getpid()}")
    state: dict[str, Any] = {}
    status = 1
    result: Result | None = None
    error: str | None = None
    print(out._style("Ferry demo: live migration of a running VM between two hosts", "1"))
    try:
        preflight()
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    left: list[str] = []
    try:
        with sigterm_as_interrupt():
            try:
                result = demo(out, journal, state)
                status = 0
            except KeyboardInterrupt:
                error = "interrupted"
                status = 130
            except DemoError as exc:
                error = str(exc)
            except (TimeoutError, testguest.GuestError, subprocess.SubprocessError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a bug in the demo or the test bed: show it
                import traceback

                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"
            finally:
                cluster = state.get("cluster")
                if error is not None and status != 130 and cluster is not None:
                    logs = cluster.logs()
                    if logs:
                        print("\n---- agent logs (tail) ----", file=sys.stderr)
                        print(logs[-8000:], file=sys.stderr)
                out.section("Teardown", step=7)
                left = teardown(out, journal, state)
    except KeyboardInterrupt:
        # A second Ctrl-C during the teardown: finish it anyway.
        left = teardown(out, journal, state)
        status = 130
    total = time.monotonic() - out.t0
    if left:
        out.warn("could not remove: " + ", ".join(left))
        status = status or 1
    print()
    if status == 0 and result is not None:
        s = result.summary

        def num(key: str, unit: str, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
            try:
                return fmt.format(float(s[key]) / scale) + unit
            except (KeyError, ValueError):
                return "-"

        print(out._style("Summary", "1"))
        print(f"  migration id   {result.migration_id}")
        print(f"  migration      {num('total_time_ms', ' ms')} in qemu, "
              f"{result.migrate_s:.1f} s for ferryctl migrate (all five phases)")  # fmt: skip
        print(f"  downtime       {num('downtime_ms', ' ms')}")
        print(f"  transferred    {num('transferred', ' MiB', 1024 * 1024, '{:.1f}')} "
              f"of {num('total', ' MiB', 1024 * 1024)} RAM, "
              f"{num('passes', ' passes')}")  # fmt: skip
        print(f"  throttle       {num('throttle_pct', ' %')} (auto-converge)")
        print(f"  demo total     {total:.1f} s")
        print(out._style("Demo completed successfully.", "1;32"))
    else:
        print(f"error: {error or 'teardown incomplete'}", file=sys.stderr)
        what = "interrupted" if status == 130 else "FAILED"
        gone = "some of what it started is left (see above)" if left else "nothing of it is left"
        print(f"Demo {what} after {total:.1f} s; {gone}.", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
