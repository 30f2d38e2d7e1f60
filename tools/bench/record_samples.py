"""Record qemu ``query-migrate`` sample streams for the convergence policy's tests.

Boots two bare qemus running the test guest (``tools/guest``), measures the
guest's dirty rate with ``calc-dirty-rate`` (1 s), migrates source to
destination over local TCP with the bandwidth capped, and polls
``query-migrate`` every ``--poll-ms`` into a JSONL file: the first line is a
header (scenario, guest, cap, measured dirty rate), every other line is
``{"t": seconds since migrate, "r": query-migrate's return}``, and the last
line a footer with how the run ended.  Both qemus are killed at the end, also
on failure.  Run from the repository root, with ``D=tests/data/converge``::

    .venv/bin/python tools/bench/record_samples.py precopy $D/precopy_256.jsonl
    .venv/bin/python tools/bench/record_samples.py postcopy $D/postcopy_256_at1s.jsonl
    .venv/bin/python tools/bench/record_samples.py slow $D/slow_16.jsonl
    .venv/bin/python tools/bench/record_samples.py controlled $D/controlled_256.jsonl

Scenarios: ``precopy`` (1 GiB guest rewriting 256 MiB flat out, plain
pre-copy for ``--seconds`` then cancel), ``postcopy`` (the same, switch to
post-copy at ``--switch-at`` s), ``slow`` (16 MiB/s over a 64 MiB working
set, to completion), ``controlled`` (the flat-out guest driven live by
``ferry.converge.Controller`` with the issue-12 goal: 10 s deadline, 500 ms
downtime, 50 % throttle, post-copy allowed; actions are recorded too).

The machine is small and shared: record once and keep the files.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "guest"))
sys.path.insert(0, str(REPO / "packages"))

import testguest  # noqa: E402

MIB = 1 << 20


class Qmp:
    """A minimal blocking QMP client: one command at a time, events skipped."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.connect(path)
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._file: TextIO = self._sock.makefile("rw")
        self._file.readline()  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run ``name`` and return its ``return`` value.

        Raises:
            RuntimeError: qemu answered with an error.
        """
        message: dict[str, Any] = {"execute": name}
        if args:
            message["arguments"] = args
        self._file.write(json.dumps(message) + "\n")
        self._file.flush()
        while True:
            reply = json.loads(self._file.readline())
            if "error" in reply:
                raise RuntimeError(f"{name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def two_qemus(
    workdir: Path, wss_mib: int, rate_mib_s: int
) -> Iterator[tuple[Qmp, Qmp, testguest.SerialReader]]:
    """Boot source and destination (``-incoming defer``); kill both on the way out."""
    elf = testguest.build()
    append = testguest.cmdline(wss_mib=wss_mib, rate_mib_s=rate_mib_s)
    procs: list[subprocess.Popen[bytes]] = []
    serial: testguest.SerialReader | None = None
    try:
        for name, extra in (("src", []), ("dst", ["-incoming", "defer"])):
            argv = testguest.qemu_argv(
                elf,
                serial_socket=workdir / f"{name}.ser",
                mem_mib=1024,
                append=append,
                extra=["-qmp", f"unix:{workdir / name}.qmp,server=on,wait=off", *extra],
            )
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL))
        src = Qmp(str(workdir / "src.qmp"))
        dst = Qmp(str(workdir / "dst.qmp"))
        serial = testguest.SerialReader(workdir / "src.ser")
        serial.wait_for_boot(timeout=30)
        # Reports start after the guest filled all its RAM; a few more make
        # sure the working-set loop runs at full speed.
        serial.wait_for(lambda r: r.counter > 5, timeout=90)
        yield src, dst, serial
    finally:
        if serial is not None:
            serial.close()
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def measure_dirty_rate(src: Qmp) -> float:
    """qemu's calc-dirty-rate over 1 s, in bytes/s (qemu reports MiB/s)."""
    src.cmd("calc-dirty-rate", {"calc-time": 1})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        info = src.cmd("query-dirty-rate")
        if info.get("status") == "measured":
            return float(info["dirty-rate"]) * MIB
    raise RuntimeError("calc-dirty-rate did not finish")


def record(args: argparse.Namespace) -> None:
    """Run one scenario and write its JSONL file."""
    wss, rate = (64, 16) if args.scenario == "slow" else (256, 0)
    cap = args.bandwidth_mib * MIB
    postcopy = args.scenario in ("postcopy", "controlled")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ferry-rec-") as tmp, two_qemus(
        Path(tmp), wss, rate
    ) as (src, dst, _serial):
        dirty = measure_dirty_rate(src)
        caps = [{"capability": "events", "state": True}]
        if postcopy:
            caps.append({"capability": "postcopy-ram", "state": True})
        controller = None
        if args.scenario == "controlled":
            from ferry.converge import Controller, Goal, Measurements, verdict

            goal = Goal(deadline_s=10.0, max_downtime_ms=500, max_throttle_pct=50,
                        postcopy_allowed=True)
            pre = verdict(Measurements(1024 * MIB, None, dirty, float(cap)), goal)
            controller = Controller(goal, ram_bytes=1024 * MIB, bandwidth_cap_bps=cap,
                                    preflight=pre)
            setup = controller.setup()
            if setup.auto_converge:
                caps.append({"capability": "auto-converge", "state": True})
        for qmp in (src, dst):
            qmp.cmd("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {"max-bandwidth": cap, "max-postcopy-bandwidth": cap}
        if controller is not None:
            params["downtime-limit"] = setup.downtime_ms
            if setup.auto_converge:
                params["max-cpu-throttle"] = setup.max_cpu_throttle
                params["cpu-throttle-initial"] = setup.cpu_throttle_initial
                params["cpu-throttle-increment"] = setup.cpu_throttle_increment
        src.cmd("migrate-set-parameters", params)
        port = free_port()
        dst.cmd("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        header = {
            "scenario": args.scenario, "ram_bytes": 1024 * MIB, "wss_mib": wss,
            "rate_mib_s": rate, "bandwidth_bps": cap, "dirty_rate_bps": dirty,
            "poll_ms": args.poll_ms, "qemu": src.cmd("query-version")["qemu"],
        }
        if controller is not None:
            header["setup"] = dataclasses.asdict(setup)
            header["verdict"] = pre.to_json()
        lines: list[dict[str, Any]] = [header]
        end = "running"
        switched = False
        t0 = time.monotonic()
        src.cmd("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        try:
            while True:
                t = time.monotonic() - t0
                info = src.cmd("query-migrate")
                line: dict[str, Any] = {"t": round(t, 4), "r": info}
                status = info.get("status", "")
                if controller is not None and "ram" in info:
                    ram = info["ram"]
                    from ferry.converge import SetDowntime, SetThrottle, StartPostcopy, Tick

                    tick = Tick(
                        elapsed_s=t, status=status, transferred=ram["transferred"],
                        remaining=ram["remaining"], total=ram["total"],
                        dirty_rate_bps=float(ram.get("dirty-pages-rate", 0))
                        * ram.get("page-size", 4096),
                        passes=ram.get("dirty-sync-count", 0),
                        throttle_pct=info.get("cpu-throttle-percentage", 0),
                    )
                    actions = controller.feed(tick)
                    line["eta"] = controller.eta_s()
                    line["actions"] = [
                        {"kind": type(a).__name__, **vars(a)} for a in actions
                    ]
                    for action in actions:
                        if isinstance(action, SetDowntime):
                            src.cmd("migrate-set-parameters", {"downtime-limit": action.ms})
                        elif isinstance(action, SetThrottle):
                            src.cmd("migrate-set-parameters", {
                                "max-cpu-throttle": action.max_pct,
                                "cpu-throttle-initial": action.initial_pct})
                        elif isinstance(action, StartPostcopy):
                            src.cmd("migrate-start-postcopy")
                lines.append(line)
                if status in ("completed", "failed", "cancelled"):
                    end = status
                    break
                if args.scenario == "postcopy" and not switched and t >= args.switch_at:
                    src.cmd("migrate-start-postcopy")
                    line["switch"] = True
                    switched = True
                if args.scenario == "precopy" and t >= args.seconds:
                    src.cmd("migrate_cancel")
                    end = "cancelled by the recorder"
                    break
                if t > 120:
                    end = "gave up after 120 s"
                    src.cmd("migrate_cancel")
                    break
                time.sleep(max(0.0, args.poll_ms / 1000 - (time.monotonic() - t0 - t)))
        finally:
            lines.append({"end": end, "wall_s": round(time.monotonic() - t0, 3)})
            with out.open("w") as f:
                for item in lines:
                    f.write(json.dumps(item, separators=(",", ":")) + "\n")
    print(f"{out}: {len(lines)} lines, {end}, dirty {dirty / MIB:.0f} MiB/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and record one scenario."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("scenario", choices=["precopy", "postcopy", "slow", "controlled"])
    parser.add_argument("out")
    parser.add_argument("--bandwidth-mib", type=int, default=128)
    parser.add_argument("--poll-ms", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="precopy: cancel after")
    parser.add_argument("--switch-at", type=float, default=1.0, help="postcopy: switch at")
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("needs /dev/kvm", file=sys.stderr)
        return 1
    record(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
