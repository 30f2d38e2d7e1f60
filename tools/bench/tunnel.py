#!/usr/bin/env python3
"""Tunnelled migration throughput: Ferry's tunnel against qemu's native paths and socat.

In one run, on the two-namespace test bed, the same 1 GiB guest whose RAM
is all non-zero (the test guest fills it at boot) is migrated back and
forth ``--reps`` times in each of these ways, interleaved so that a slow
moment of the machine hits every variant alike:

=================  ============================================================
qemu native        qemu → qemu over plain TCP (a minimal QMP driver, no agents)
qemu tls           the same with qemu's own TLS (``tls-creds-x509`` objects,
                   the hosts' Ferry certificates)
socat plain        qemu → unix socket → socat → TCP → socat → qemu
socat openssl      the same with socat's OPENSSL addresses (mutual certificates)
ferry native       ``ferryctl migrate --live`` (qemu → qemu TCP, agents steer)
ferry tunnel plain ``--tunnelled --tunnel-plaintext``: TLS-authenticated data
                   connection, then ``ferry_native.Relay`` on plain TCP
ferry tunnel tls   ``--tunnelled``: ``ferry_native.TlsStream.pump`` both ends
ferry tunnel tls xN ``--tunnelled --parallel --parallel-connections N`` (N=2, 4)
=================  ============================================================

The figure compared is qemu's own ``total-time`` of the migration (from
``migrate`` to completion, as the source qemu reports it): the part of a
migration a tunnel can slow down.  Ferry's wall time is shown beside it.
Ratios are against "qemu native" of the same run.

``--prealloc both`` (the default) runs the whole matrix twice on a fresh
test bed: with the guest's RAM preallocated (``<allocation
mode='immediate'/>``: the destination's memory is touched before the
stream arrives) and without (the destination faults in fresh pages while
receiving, which bounds the rate at ~0.4 GiB/s here).

Every migration is checked: the guest must report from the destination
with no bad page.  Clean-up of agents, qemus, socats and namespaces is the
test bed's, on success, failure and Ctrl-C.

    .venv/bin/python tools/bench/tunnel.py                 # 3 reps, both prealloc modes
    .venv/bin/python tools/bench/tunnel.py --reps 5 --prealloc on --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import migration as mig
from migration import (
    MIB,
    UNLIMITED_BANDWIDTH,
    Cluster,
    FerryGuest,
    HostEnv,
    MinimalDriver,
    ferryctl_bin,
    kvm_opens,
    log,
    prepare_memory,
    testguest,
    wait_guest_on,
)

FERRY_VARIANTS: dict[str, list[str]] = {
    "ferry native": [],
    "ferry tunnel plain": ["--tunnelled", "--tunnel-plaintext"],
    "ferry tunnel tls": ["--tunnelled"],
    "ferry tunnel tls x2": ["--tunnelled", "--parallel", "--parallel-connections", "2"],
    "ferry tunnel tls x4": ["--tunnelled", "--parallel", "--parallel-connections", "4"],
}
RAW_VARIANTS = ("qemu native", "qemu tls", "socat plain", "socat openssl")
BASE_PORT = 49400


# -- ferry --------------------------------------------------------------------


def ferry_once(src: HostEnv, dst: HostEnv, name: str, extra: list[str]) -> dict[str, Any]:
    """One ``ferryctl migrate``; qemu's stats plus the wall time."""
    argv = [ferryctl_bin(), "--connect", str(src.source_socket), "migrate", name, dst.uri,
            "--live", "--json", *extra]  # fmt: skip
    t0 = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    wall = (time.monotonic() - t0) * 1000
    result = None
    for line in run.stdout.splitlines():
        if line.startswith("{"):
            ev = json.loads(line)
            if ev.get("event") == "result":
                result = ev["data"]
    if run.returncode != 0 or result is None:
        raise RuntimeError(f"ferryctl migrate {' '.join(extra)}: {run.stderr.strip()}")
    stats = result["stats"]
    return {
        "total_ms": float(stats["total_time_ms"]),
        "downtime_ms": float(stats["downtime_ms"]),
        "wall_ms": wall,
        "mib": stats["transferred"] / MIB,
        "tunnel_mib": stats.get("tunnel_bytes", 0) / MIB,
    }


# -- qemu directly -------------------------------------------------------------


def qemu_tls_dir(cluster: Cluster, host: HostEnv) -> Path:
    """The layout qemu's tls-creds-x509 wants, from the host's Ferry files."""
    from ferry.host import write_dh_params

    out = cluster.tmp / "qemu-tls" / host.label
    if not out.exists():
        out.mkdir(parents=True)
        pki = cluster.pki
        shutil.copy(pki / "ca.pem", out / "ca-cert.pem")
        for role in ("server", "client"):
            shutil.copy(pki / f"{host.label}.pem", out / f"{role}-cert.pem")
            shutil.copy(pki / f"{host.label}-key.pem", out / f"{role}-key.pem")
        # As Ferry's own layout (ferry.host.Host.qemu_tls_dir): without it
        # qemu 7.2 generates DH parameters at every server object.
        write_dh_params(out)
    return out


class RawDriver(MinimalDriver):
    """qemu migrated by QMP directly, over TCP, qemu's TLS, or a pair of socats."""

    def __init__(self, cluster: Cluster, kernel: Path, args: argparse.Namespace) -> None:
        super().__init__(cluster, kernel, args)
        self.port = BASE_PORT
        self.objects = 0
        self.socats: list[subprocess.Popen[bytes]] = []

    def _next_port(self) -> int:
        self.port += 1
        return self.port

    async def _tls_object(self, proc: Any, host: HostEnv, endpoint: str) -> str:
        self.objects += 1
        oid = f"tls{self.objects}"
        from ferry.storage_copy import tls_creds_args

        await proc.qmp.execute("object-add", tls_creds_args(oid, endpoint,
                                                            str(qemu_tls_dir(self.cluster, host))))
        return oid

    def _socat(self, host: HostEnv, *addresses: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(host.ns.exec_argv(["socat", *addresses]),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)  # fmt: skip
        self.socats.append(proc)
        return proc

    @staticmethod
    async def _wait_path(path: Path, proc: subprocess.Popen[bytes]) -> None:
        for _ in range(500):
            if path.exists():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"socat exited: {proc.stderr.read() if proc.stderr else ''!r}")
            await asyncio.sleep(0.01)
        raise RuntimeError(f"socat did not create {path}")

    async def _wait_port(self, host: HostEnv, port: int, proc: subprocess.Popen[bytes]) -> None:
        probe = ["sh", "-c", f"ss -Hltn 'sport = :{port}' | grep -q LISTEN"]
        for _ in range(500):
            if subprocess.run(host.ns.exec_argv(probe), check=False).returncode == 0:
                return
            if proc.poll() is not None:
                raise RuntimeError(f"socat exited: {proc.stderr.read() if proc.stderr else ''!r}")
            await asyncio.sleep(0.01)
        raise RuntimeError(f"socat did not listen on {port}")

    async def once(
        self, variant: str, src: Any, sh: HostEnv, dh: HostEnv
    ) -> tuple[Any, Path, dict[str, Any]]:
        """Migrate ``src`` (running on ``sh``) to a fresh qemu on ``dh``."""
        from ferry.qemu import query_migrate

        pki = self.cluster.pki
        dst, dst_serial = await self.launch(dh, incoming=True)
        port = self._next_port()
        run_dir = Path(dst_serial).parent
        src_tls = ""
        if variant == "qemu tls":
            server = await self._tls_object(dst, dh, "server")
            await dst.qmp.execute("migrate-set-parameters", {"tls-creds": server})
            src_tls = await self._tls_object(src, sh, "client")
        if variant in ("qemu native", "qemu tls"):
            uri = f"tcp:{dh.ns.address}:{port}"
            await dst.qmp.execute("migrate-incoming", {"uri": uri})
        else:
            incoming = run_dir / "in.sock"
            await dst.qmp.execute("migrate-incoming", {"uri": f"unix:{incoming}"})
            out = run_dir / "out.sock"
            if variant == "socat plain":
                far = self._socat(dh, f"TCP-LISTEN:{port},bind={dh.ns.address},reuseaddr",
                                  f"UNIX-CONNECT:{incoming}")  # fmt: skip
                await self._wait_port(dh, port, far)
                near = self._socat(sh, f"UNIX-LISTEN:{out}", f"TCP:{dh.ns.address}:{port}")
            else:
                far = self._socat(
                    dh,
                    f"OPENSSL-LISTEN:{port},bind={dh.ns.address},reuseaddr,"
                    f"cert={pki / (dh.label + '.pem')},key={pki / (dh.label + '-key.pem')},"
                    f"cafile={pki / 'ca.pem'},verify=1",
                    f"UNIX-CONNECT:{incoming}",
                )
                await self._wait_port(dh, port, far)
                near = self._socat(
                    sh,
                    f"UNIX-LISTEN:{out}",
                    f"OPENSSL:{dh.ns.address}:{port},cert={pki / (sh.label + '.pem')},"
                    f"key={pki / (sh.label + '-key.pem')},cafile={pki / 'ca.pem'},"
                    f"commonname={dh.label},verify=1",
                )
            await self._wait_path(out, near)
            uri = f"unix:{out}"
        params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH, "tls-creds": src_tls}
        if src_tls:
            params["tls-hostname"] = dh.ns.address
        await src.qmp.execute("migrate-set-parameters", params)
        await src.qmp.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + self.args.timeout
        while True:
            stats = await query_migrate(src.qmp)
            if stats.status == "completed" and stats.total_time_ms:
                break
            if stats.status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: migration {stats.status}: {stats.error_desc}")
            await asyncio.sleep(0.01)
        while (await query_migrate(dst.qmp)).status != "completed":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the destination never completed")
            await asyncio.sleep(0.01)
        await dst.qmp.execute("cont")
        await self.kill(src)
        for proc in self.socats:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            proc.wait(10)
        self.socats.clear()
        return dst, dst_serial, {
            "total_ms": float(stats.total_time_ms or 0),
            "downtime_ms": float(stats.downtime_ms or 0),
            "mib": stats.ram_transferred / MIB,
        }

    async def run_matrix(self, reps: int) -> dict[str, list[dict[str, Any]]]:
        """Every raw variant ``reps`` times, interleaved."""
        a, b = self.cluster.a, self.cluster.b
        src, serial_path = await self.launch(a, incoming=False)
        await src.qmp.execute("cont")
        serial = testguest.SerialReader(serial_path)
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in RAW_VARIANTS}
        here = a
        try:
            await asyncio.to_thread(serial.wait_for_boot, 120)
            last = await asyncio.to_thread(serial.wait_for, lambda r: r.counter >= 2, 300)
            for i in range(reps):
                for variant in RAW_VARIANTS:
                    there = b if here is a else a
                    await asyncio.to_thread(prepare_memory, self.args)
                    src, dst_serial, figures = await self.once(variant, src, here, there)
                    last = await asyncio.to_thread(wait_guest_on, serial, dst_serial, last)
                    results[variant].append(figures)
                    log(f"{variant:20} {i + 1}/{reps} {here.label}->{there.label}: "
                        f"qemu total {figures['total_ms']:.0f} ms")  # fmt: skip
                    here = there
        finally:
            serial.close()
            for proc in self.socats:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await self.close()
        return results


# -- the run -------------------------------------------------------------------


def run_mode(kernel: Path, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The whole matrix on a fresh test bed with ``args.prealloc``."""
    results: dict[str, list[dict[str, Any]]] = {}
    cluster = Cluster()
    try:
        for host in (cluster.a, cluster.b):
            host.extra_config["tls.allow_plaintext_tunnel"] = True
            host.write_config()
        log(f"test bed {cluster.tmp}: prealloc {'on' if args.prealloc else 'off'}")
        cluster.start()
        guest = FerryGuest(cluster, kernel, args)
        try:
            guest.start(cluster.a)
            here = cluster.a
            for name in FERRY_VARIANTS:
                results[name] = []
            for i in range(args.reps):
                for name, extra in FERRY_VARIANTS.items():
                    there = cluster.b if here is cluster.a else cluster.a
                    prepare_memory(args)
                    figures = ferry_once(here, there, guest.name, extra)
                    guest.moved_to(there)
                    results[name].append(figures)
                    log(f"{name:20} {i + 1}/{args.reps} {here.label}->{there.label}: "
                        f"qemu total {figures['total_ms']:.0f} ms, "
                        f"wall {figures['wall_ms']:.0f} ms")  # fmt: skip
                    here = there
        finally:
            guest.close()
        for host in (cluster.a, cluster.b):  # free the CPU for the raw variants
            for agent in list(host.procs):
                host.stop_agent(agent)
        driver = RawDriver(cluster, kernel, args)
        results.update(asyncio.run(driver.run_matrix(args.reps)))
    finally:
        cluster.close()
    return results


def table(mode: str, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians and ratios against qemu native."""
    base = statistics.median(r["total_ms"] for r in results["qemu native"])
    rows = {}
    for name in (*RAW_VARIANTS, *FERRY_VARIANTS):
        runs = results.get(name) or []
        if not runs:
            continue
        total = statistics.median(r["total_ms"] for r in runs)
        row = {
            "total_ms": total,
            "min_ms": min(r["total_ms"] for r in runs),
            "max_ms": max(r["total_ms"] for r in runs),
            "downtime_ms": statistics.median(r["downtime_ms"] for r in runs),
            "ratio": total / base,
            "gib_per_s": statistics.median(r["mib"] for r in runs) / 1024 / (total / 1000),
        }
        if "wall_ms" in runs[0]:
            row["wall_ms"] = statistics.median(r["wall_ms"] for r in runs)
        rows[name] = row
    return {"mode": mode, "rows": rows}


def print_table(report: dict[str, Any]) -> None:
    print(f"\n== prealloc {report['mode']} ==  (median of qemu total-time; ratio vs qemu native)")
    print(f"{'variant':22}{'total ms':>10}{'min':>8}{'max':>8}{'ratio':>8}{'GiB/s':>8}"
          f"{'downtime':>10}{'ferry wall':>12}")  # fmt: skip
    for name, row in report["rows"].items():
        wall = f"{row['wall_ms']:.0f}" if "wall_ms" in row else "-"
        print(f"{name:22}{row['total_ms']:>10.0f}{row['min_ms']:>8.0f}{row['max_ms']:>8.0f}"
              f"{row['ratio']:>8.2f}{row['gib_per_s']:>8.2f}{row['downtime_ms']:>10.0f}"
              f"{wall:>12}")  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=3, help="migrations per variant (default 3)")
    p.add_argument("--mem-mib", type=int, default=1024, help="guest RAM (default 1024)")
    p.add_argument("--prealloc", choices=("both", "on", "off"), default="both")
    p.add_argument("--virt", choices=("kvm", "qemu"), default=None)
    p.add_argument("--memory", choices=("warm", "cold", "asis"), default="warm",
                   help="free-memory state before each migration (see migration.py)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    args.virt = args.virt or ("kvm" if kvm_opens() else "qemu")
    # What FerryGuest / MinimalDriver read.
    args.wss_mib, args.rate_mib_s, args.poll_ms, args.settle = 8, 0, 10.0, 10.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("error: needs root (network namespaces)")
        return 2
    os.environ.setdefault("FERRY_JOURNAL_SOCKET", "/nonexistent")
    kernel = testguest.build()
    reports = []
    with mig.sigterm_as_interrupt():
        for mode in ("on", "off") if args.prealloc == "both" else (args.prealloc,):
            args.prealloc = mode == "on"
            reports.append(table(mode, run_mode(kernel, args)))
            if not args.json:
                print_table(reports[-1])
                sys.stdout.flush()
            args.prealloc = "both"
    if args.json:
        print(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was cleaned up")
        sys.exit(130)
