"""Benchmark Ferry's storage copy (``--copy-storage-all``) against bare qemu doing the same.

Question (issue 15): how much longer than qemu's own NBD + ``blockdev-mirror``
does Ferry take to move a VM together with a local disk? Target: at most
1.10x the floor. One run, on the two-host test bed with local storage
(``HostEnv.enable_local_storage``: the same disk path names a different file
on each host), a raw disk of ``--disk-mib`` MiB (default 2 GiB) of random
content on A's local storage, attached as the IDE disk of the disk variant
of the test guest (``--mem-mib`` 256 MiB of RAM, so the disk dominates)::

    .venv/bin/python tools/bench/storage.py                       # 2 GiB, 3 rounds, both workloads
    .venv/bin/python tools/bench/storage.py --json > storage.json
    .venv/bin/python tools/bench/storage.py --disk-mib 64 --reps 1 --variants floor-tls --no-busy

Variants (``--variants`` for the idle guest, ``--busy-variants`` for the busy one):

- ``floor-tls`` / ``floor-plain``: ``storage_floor.FloorDriver``, bare qemu
  with Ferry's argv driven over QMP by this process with the QMP arguments
  of ``ferry.storage_copy`` (NBD with ``tls-creds-x509`` from the hosts'
  certificates on both ends, or without); ``floor-tls-sync``: the same with
  the mirror in ``write-blocking`` mode. See that module for the steps.
- ``ferry``: ``ferryctl migrate NAME ferry://B:49160 --live
  --copy-storage-all --json`` (NBD with TLS, Ferry's default).
- ``ferry-tunnelled``: the same with ``--tunnelled`` (NBD through the
  agents' tunnel).
- ``ferry-sync``: the same with ``--copy-storage-synchronous-writes``.
- ``ferry-plain``: ``[tls] allow_plaintext_nbd = true`` on both hosts (the
  agents are restarted with it, outside the timed part).

A variant this Ferry does not have (refused at once, a config key unknown)
is shown as ``refused: <error>`` and skipped for the rest of the run; the
others go on. A later failure is listed and the round goes on.

Each repetition starts from the same state, always A -> B ("destroy and
restart", not back and forth): the guest is booted on A (Ferry's with
``ferryctl start --force``, as it moved to B last time), on the source
image made once (the guest never writes outside its workload region, and
A's image is left as it was by every migration, so no per-rep copy is
needed), it is migrated to B with its disk, checked on B (no reboot, no bad
page, with the workload no bad disk block and no I/O error), then destroyed,
and B's copy deleted (Ferry refuses to write over a file; a failed Ferry
copy that left one is reported). All of that is outside the timed part; so
is ``--memory`` (see ``migration.py``).
Each round runs every variant once, in an order rotated per round
(``client_driven.schedule``), the guest booted for every repetition.

Figures: ``wall`` (ferryctl's process, or the floor's steps: destination
qemu launch to source killed), ``disk copy`` (the mirror's start to all disks
in sync: Ferry's largest ``elapsed_s`` of its ``storage`` events, the
floor's time to ``ready``), the disk throughput (disk size / disk copy),
``memory`` (qemu's ``total_time_ms`` of the memory migration that follows)
and qemu's downtime; median [min..max] over the rounds; the ratio of each
Ferry variant to its floor (``ferry``, ``ferry-tunnelled`` -> ``floor-tls``,
``ferry-plain`` -> ``floor-plain``, ``ferry-sync`` -> ``floor-tls-sync``):
ratio of the medians [min..max of the per-round ratios].

The second table (unless ``--no-busy``) is the same while the guest writes
``--guest-write-mib-s`` (20) MiB/s to its disk (the test guest's verified
``dwrite`` workload, which reads back every block it wrote): a migration
cut off at ``--timeout`` counts as "did not converge".

qemu 7.2 generates Diffie-Hellman parameters whenever a
``tls-creds-x509`` server object is added without a ``dh-params.pem`` in
its directory (0.2-1.6 s of CPU here); Ferry's directory has none, so the
floor's has none either, and its ``tls objects`` step shows that cost.

Clean-up: the test bed (agents, every qemu in the namespaces, the
namespaces, the temporary tree with the images) and this process's qemus
go on success, failure, Ctrl-C and SIGTERM (``FERRY_KEEP_TESTBED=1`` keeps
the tree). Not part of the test suite; its numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client_driven import finite, schedule
from migration import (
    REPO,
    FerryGuest,
    FerryRep,
    MigrateFailed,
    kvm_opens,
    log,
    prepare_memory,
    run_migrate,
    sigterm_as_interrupt,
)
from storage_floor import FloorDriver, check_disk_report, wait_workload
from storage_report import MIB, StorageRep, VariantStatus, build_report, print_report

import testguest
from cluster import LOCAL_STORAGE, Cluster, HostEnv, guest_xml

IMAGE = "bench-disk.raw"
FLOORS = ("floor-tls", "floor-plain", "floor-tls-sync")
FERRY_FLAGS: dict[str, tuple[str, ...]] = {
    "ferry": (),
    "ferry-tunnelled": ("--tunnelled",),
    "ferry-plain": (),
    "ferry-sync": ("--copy-storage-synchronous-writes",),
}
ALL_VARIANTS = (*FLOORS, *FERRY_FLAGS)
IDLE_DEFAULT = "floor-tls,floor-plain,ferry,ferry-tunnelled,ferry-plain"
BUSY_DEFAULT = "floor-tls,floor-tls-sync,ferry,ferry-sync,ferry-tunnelled"
PLAIN_KEY = "allow_plaintext_nbd"


def make_random_image(path: Path, mib: int) -> None:
    """``mib`` MiB of incompressible bytes (AES-CTR of zeros: ~1 GiB/s, 3x os.urandom)."""
    key = os.urandom(16).hex()
    cipher = [
        "openssl",
        "enc",
        "-aes-128-ctr",
        "-nosalt",
        "-pbkdf2",
        "-pass",
        f"pass:{key}",
        "-in",
        "/dev/zero",
    ]
    left = mib * MIB
    with subprocess.Popen(cipher, stdout=subprocess.PIPE) as proc, path.open("wb") as out:
        assert proc.stdout is not None
        while left:
            chunk = proc.stdout.read(min(left, 4 * MIB))
            if not chunk:
                raise RuntimeError("openssl enc stopped early")
            out.write(chunk)
            left -= len(chunk)
        proc.kill()
        out.flush()
        os.fsync(out.fileno())


def plain_nbd_supported() -> bool:
    """Does this Ferry's ``[tls]`` have ``allow_plaintext_nbd``?"""
    from ferry.config import TLSConfig

    return PLAIN_KEY in {f.name for f in dataclasses.fields(TLSConfig)}


def bench_xml(name: str, kernel: Path, args: argparse.Namespace, busy: bool) -> str:
    """The test guest (disk variant) with the bench image as its IDE disk (A's local storage)."""
    disk = (
        f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/>"
        f"<source file='{LOCAL_STORAGE / IMAGE}'/><target dev='hda' bus='ide'/></disk>"
    )
    extra = ""
    if busy:  # the workload's region starts at 32 MiB of the disk
        dsize = max(1, min(1024, args.disk_mib - 32))
        extra = f"dwrite={args.guest_write_mib_s * 1024} dsize={dsize}"
    return guest_xml(
        name,
        kernel,
        virt_type=args.virt,
        mem_mib=args.mem_mib,
        wss_mib=args.wss_mib,
        rate_mib_s=args.rate_mib_s,
        prealloc=args.prealloc,
        uuid=str(uuidlib.uuid4()),
        extra_devices=disk,
        cmdline_extra=extra,
    )


class Bench:
    """The test bed, the guests of both drivers and what every variant did."""

    def __init__(
        self, cluster: Cluster, runner: asyncio.Runner, kernel: Path, args: argparse.Namespace
    ) -> None:
        self.cluster, self.runner, self.kernel, self.args = cluster, runner, kernel, args
        self.a, self.b = cluster.a, cluster.b
        self.reps: list[StorageRep] = []
        self.status: dict[str, dict[str, VariantStatus]] = {}
        self.plain = False  # the agents run with allow_plaintext_nbd
        self.guests: dict[str, FerryGuest] = {}
        self.floors: dict[str, FloorDriver] = {}

    def b_image(self) -> Path:
        return self.b.local_dir / IMAGE

    def setup_agents(self, plain: bool) -> None:
        """(Re)start the agents, with ``[tls] allow_plaintext_nbd`` as asked."""
        if self.plain == plain and all(h.procs for h in (self.a, self.b)):
            return
        for host in (self.a, self.b):
            for agent in list(host.procs):
                host.stop_agent(agent)
            host.write_config(**({f"tls.{PLAIN_KEY}": True} if plain else {}))
        self.cluster.start()
        self.plain = plain

    def guest(self, workload: str) -> FerryGuest:
        if workload not in self.guests:
            name = f"sb-{workload}"
            xml = bench_xml(name, self.kernel, self.args, workload == "busy")
            self.guests[workload] = FerryGuest(
                self.cluster, self.kernel, self.args, name=name, xml=xml
            )
        return self.guests[workload]

    def floor(self, workload: str) -> FloorDriver:
        if workload not in self.floors:
            xml = bench_xml(f"fl-{workload}", self.kernel, self.args, workload == "busy")
            self.floors[workload] = FloorDriver(
                self.cluster,
                self.kernel,
                self.args,
                xml=xml,
                workload=workload,
                image=str(LOCAL_STORAGE / IMAGE),
                disk_bytes=self.args.disk_mib * MIB,
            )
        return self.floors[workload]

    def after_rep(self) -> str | None:
        """Nothing of the repetition left: qemus gone, B's copy deleted. What B kept, if
        anything should not have been there (a failed Ferry copy must delete it)."""
        for driver in self.floors.values():
            self.runner.run(driver.shutdown())
        for guest in self.guests.values():
            guest.close()
        kept = None
        with contextlib.suppress(FileNotFoundError):
            kept = f"{self.b_image()} ({self.b_image().stat().st_size} bytes)"
            self.b_image().unlink()
        os.sync()  # the deleted copy's blocks are freed before the next timed run
        return kept

    def ferry_rep(self, variant: str, workload: str, rnd: int) -> StorageRep:
        """One Ferry migration A -> B of the guest (booted here) with its disk."""
        a, b, args = self.a, self.b, self.args
        self.setup_agents(variant == "ferry-plain")
        guest = self.guest(workload)
        # It moved to B last time (destroyed there since): A must be told to run it again.
        guest.start(a, force=True)
        assert guest.serial is not None
        guest.last = wait_workload(guest.serial, workload == "busy")  # booted: the writes
        prepare_memory(args)
        argv = a.ferryctl_argv(
            "migrate",
            guest.name,
            b.uri,
            "--live",
            "--copy-storage-all",
            "--json",
            *FERRY_FLAGS[variant],
        )
        events: list[tuple[float, dict[str, Any]]] = []
        try:
            _, wall, marks, result, _ = run_migrate(argv, args.timeout, events)
        except MigrateFailed as exc:
            started = any(e.get("data", {}).get("phase") == "perform" for _, e in events)
            raise (exc if started else Refused(exc.message)) from None
        if a.qemu_pids():
            raise RuntimeError("a qemu is still running on a after the migration")
        guest.moved_to(b)
        assert guest.last is not None
        check_disk_report(guest.last, b.label)
        s = result["stats"]
        storage = [e["data"] for _, e in events if e.get("event") == "storage"]
        fr = FerryRep(
            rep=rnd,
            direction="a->b",
            cli_wall_ms=wall,
            agent_wall_ms=float(s.get("wall_time_ms") or 0),
            total_time_ms=float(s.get("total_time_ms") or 0),
            downtime_ms=float(s.get("downtime_ms") or 0),
            setup_time_ms=0.0,
            transferred_mib=0.0,
            total_mib=0.0,
            passes=0,
            help_ms=0.0,
            list_ms=0.0,
            marks=marks,
        )
        rep = StorageRep(
            variant=variant,
            workload=workload,
            round=rnd,
            wall_ms=round(wall, 1),
            disk_ms=max(d.get("elapsed_s") or 0 for d in storage) * 1000 if storage else None,
            memory_ms=fr.total_time_ms or None,
            downtime_ms=fr.downtime_ms or None,
            disk_bytes=int(storage[-1].get("disk_total") or 0) if storage else 0,
            steps={k: round(v, 1) for k, v in fr.phase_ms().items()},
            agent_ms=fr.agent_wall_ms or None,
        )
        disks = storage[-1].get("disks", {}).values() if storage else []
        log(
            f"{variant} {rnd} a->b: wall {wall:.0f} ms, disk {rep.disk_ms} ms, "
            f"memory {rep.memory_ms} ms ({len(storage)} storage events, the last with "
            f"every disk ready: {bool(storage) and all(d.get('ready') for d in disks)})"
        )
        return rep

    def floor_rep(self, variant: str, workload: str, rnd: int) -> StorageRep:
        """One floor migration A -> B of its own guest (booted here) with its disk."""
        driver = self.floor(workload)
        self.runner.run(driver.boot(self.a))
        prepare_memory(self.args)
        return self.runner.run(
            driver.migrate(
                self.a,
                self.b,
                tls=variant != "floor-plain",
                sync=variant.endswith("-sync"),
                variant=variant,
                rnd=rnd,
            )
        )

    def run(self, workload: str, variants: Sequence[str]) -> None:
        """``--reps`` rounds of ``variants`` (rotated) with the guest ``workload``."""
        status = self.status.setdefault(workload, {v: VariantStatus() for v in variants})
        for rnd, variant in schedule(list(variants), self.args.reps):
            st = status[variant]
            if st.refused is not None:
                continue
            st.attempts += 1
            what = f"{workload} {variant} round {rnd + 1}"
            log(f"-- {what}")
            ok = False
            try:
                if variant == "ferry-plain" and not plain_nbd_supported():
                    raise Refused(f"this Ferry has no [tls] {PLAIN_KEY} setting")
                if variant in FLOORS:
                    rep = self.floor_rep(variant, workload, rnd + 1)
                else:
                    rep = self.ferry_rep(variant, workload, rnd + 1)
                self.reps.append(rep)
                ok = True
            except Refused as exc:
                st.refused = exc.message
                log(f"{what}: refused: {exc.message}")
            except TimeoutError as exc:
                st.not_converged += 1
                st.failures.append(f"round {rnd + 1}: cut off: {exc}")
                log(f"{what}: cut off: {exc}")
            except Exception as exc:  # reported; the round goes on
                text = exc.message if isinstance(exc, MigrateFailed) else f"{exc!r}"
                st.failures.append(f"round {rnd + 1}: {text}")
                log(f"{what} FAILED: {text}")
            kept = self.after_rep()
            if kept is not None and not ok and variant not in FLOORS:
                # A failed or refused Ferry copy must not leave B an image.
                st.failures.append(f"round {rnd + 1}: B kept the image of a failed copy: {kept}")
                log(f"{what}: B kept the image of a failed copy: {kept}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.after_rep()


class Refused(Exception):
    """The variant cannot run here (the first migration refused before Perform)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_variants(text: str, what: str) -> list[str]:
    """``a,b`` -> known variant names, in the order given.

    Raises:
        ValueError: an unknown or no name.
    """
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALL_VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"{what}: unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_VARIANTS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ferry --copy-storage-all (TLS, tunnelled, plain) against bare qemu NBD + "
        "blockdev-mirror (the floor), idle and while the guest writes its disk; see the "
        "module docstring.",
    )
    p.add_argument("--disk-mib", type=int, default=2048, help="disk size (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="rounds (default %(default)s)")
    p.add_argument("--mem-mib", type=int, default=256, help="guest RAM (default %(default)s)")
    p.add_argument("--wss-mib", type=int, default=8, help="guest RAM working set (default 8)")
    p.add_argument(
        "--rate-mib-s",
        type=int,
        default=16,
        help="guest RAM rewrite rate, 0 = flat out (default %(default)s)",
    )
    p.add_argument(
        "--guest-write-mib-s",
        type=int,
        default=20,
        help="disk write rate of the busy workload (default %(default)s)",
    )
    p.add_argument("--no-busy", action="store_true", help="skip the busy-guest table")
    p.add_argument("--no-idle", action="store_true", help="skip the idle-guest table")
    p.add_argument(
        "--variants",
        default=IDLE_DEFAULT,
        help=f"idle table (default {IDLE_DEFAULT}); all: {', '.join(ALL_VARIANTS)}",
    )
    p.add_argument(
        "--busy-variants", default=BUSY_DEFAULT, help=f"busy table (default {BUSY_DEFAULT})"
    )
    p.add_argument(
        "--virt",
        choices=("kvm", "qemu"),
        default=None,
        help="domain type; default kvm if /dev/kvm opens",
    )
    p.add_argument(
        "--prealloc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="preallocate guest RAM (default on)",
    )
    p.add_argument(
        "--memory",
        choices=("warm", "cold", "asis"),
        default="warm",
        help="free host memory before every migration (see migration.py; default %(default)s)",
    )
    p.add_argument("--settle", type=float, default=10.0, help="with --memory cold: seconds")
    p.add_argument(
        "--poll-ms",
        type=float,
        default=10.0,
        help="the floor's query interval (default %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="per migration, seconds; beyond: 'did not converge' (default 300)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of the tables")
    args = p.parse_args(argv)
    if args.virt is None:
        args.virt = "kvm" if kvm_opens() else "qemu"
    if args.reps < 1 or args.disk_mib < 33 or args.mem_mib < 64:
        p.error("--reps must be >= 1, --disk-mib >= 33, --mem-mib >= 64")
    try:
        args.variants = parse_variants(args.variants, "--variants")
        args.busy_variants = parse_variants(args.busy_variants, "--busy-variants")
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("error: needs root (network and mount namespaces)")
        return 2
    kernel = testguest.build(variant="disk")
    workloads = {
        w: v
        for w, v, skip in (
            ("idle", args.variants, args.no_idle),
            ("busy", args.busy_variants, args.no_busy),
        )
        if not skip
    }
    cluster: Cluster | None = None
    bench: Bench | None = None
    with sigterm_as_interrupt(), asyncio.Runner() as runner:
        try:
            cluster = Cluster()
            hosts: tuple[HostEnv, ...] = (cluster.a, cluster.b)
            for host in hosts:
                host.enable_local_storage()
            log(f"test bed in {cluster.tmp}; making the {args.disk_mib} MiB random image")
            make_random_image(cluster.a.local_dir / IMAGE, args.disk_mib)
            bench = Bench(cluster, runner, kernel, args)
            bench.setup_agents(False)
            for workload, variants in workloads.items():
                bench.run(workload, variants)
        except BaseException as exc:
            if cluster is not None and not isinstance(exc, KeyboardInterrupt):
                log(cluster.logs())
            raise
        finally:
            if bench is not None:
                bench.close()
            if cluster is not None:
                if os.environ.get("FERRY_KEEP_TESTBED"):
                    log(f"keeping the test bed tree {cluster.tmp}")
                cluster.close()
    config = {
        "disk_mib": args.disk_mib,
        "mem_mib": args.mem_mib,
        "wss_mib": args.wss_mib,
        "rate_mib_s": args.rate_mib_s,
        "guest_write_mib_s": args.guest_write_mib_s,
        "reps": args.reps,
        "virt": args.virt,
        "prealloc": args.prealloc,
        "memory": args.memory,
        "cpus": os.cpu_count(),
        "repo": str(REPO),
        "plain_nbd_supported": plain_nbd_supported(),
    }
    report = build_report(
        config, bench.reps if bench else [], bench.status if bench else {}, workloads
    )
    if args.json:
        print(json.dumps(finite(report), indent=1, allow_nan=False))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything was cleaned up")
        sys.exit(130)
