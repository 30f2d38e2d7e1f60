"""Save and restore times per ``[save] image_format``, against ``cp`` of the raw image.

On the two-namespace test bed (host A only), with the test guest of
``--mem-mib`` MiB (default 1024; all its RAM is written by the guest, with
``--zip`` in a compressible pattern), for raw and every compressor installed
(or ``--formats``):

1. ``ferryctl save g1 FILE --json`` ``--reps`` times (the agent restarted with
   ``[save] image_format = FMT`` first): wall time around ferryctl, the
   agent's own ``seconds``, the image size;
2. ``ferryctl restore FILE --json`` after each save, wall time; the guest's
   serial reports are checked after every restore (counter goes on,
   bad_pages 0, no reboot), so a fast but broken run is not counted;
3. the floor: ``cp`` of the raw image to a new file plus an fsync of the copy
   (a save fsyncs its image too), ``--reps`` times, and ``cat`` of it to
   /dev/null as the read floor of a restore.

Prints median/min/max of each figure, the compression ratio (raw bytes /
image bytes) and the ratio of each median to the cp floor; ``--json`` prints
one JSON object instead. Not part of the test suite; run as root from the
repository root with the project's virtualenv::

    .venv/bin/python tools/bench/save.py                      # 1 GiB, 3 reps
    .venv/bin/python tools/bench/save.py --mem-mib 128 --reps 1 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
for _sub in ("tools/testbed", "tools/guest"):
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

import testguest  # noqa: E402
from cluster import Cluster, HostEnv, guest_xml  # noqa: E402

__all__ = ["main", "summary"]

ALL_FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd")


def log(text: str) -> None:
    """Progress on stderr (stdout is for the result)."""
    print(text, file=sys.stderr, flush=True)


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """median/min/max of ``values`` (None when empty)."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return elapsed, result


def _cp_floor(raw: Path, reps: int) -> tuple[list[float], list[float]]:
    writes, reads = [], []
    copy = raw.with_suffix(".cp")
    for _ in range(reps):
        t0 = time.monotonic()
        subprocess.run(["cp", "--", str(raw), str(copy)], check=True)
        fd = os.open(copy, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        writes.append(time.monotonic() - t0)
        t0 = time.monotonic()
        subprocess.run(["cat", "--", str(copy)], stdout=subprocess.DEVNULL, check=True)
        reads.append(time.monotonic() - t0)
        copy.unlink()
    return writes, reads


def _check_guest(serial: testguest.SerialReader, host: HostEnv, before: int) -> None:
    serial.reconnect(host.serial_socket("g1"))
    after = serial.wait_for(lambda r: r.counter > before + 2, timeout=120)
    if after.bad_pages or serial.boot_count != 1:
        raise RuntimeError(f"the guest came back damaged: bad_pages={after.bad_pages}, "
                           f"boots={serial.boot_count}")  # fmt: skip


def run_format(host: HostEnv, fmt: str, reps: int, serial: testguest.SerialReader
               ) -> dict[str, Any]:  # fmt: skip
    """``reps`` save+restore cycles of g1 with ``fmt``; returns the raw figures."""
    host.stop_agent("source")
    host.write_config(**{"save.image_format": fmt})
    host.start_agent("source")
    image = host.root / f"g1.{fmt}.save"
    out: dict[str, Any] = {"save_wall_s": [], "save_agent_s": [], "restore_wall_s": [],
                           "bytes": []}  # fmt: skip
    for rep in range(reps):
        last = serial.latest()
        before = last.counter if last else 0
        wall, result = _timed(host.ferryctl_argv("save", "g1", str(image), "--json"))
        data = json.loads(result.stdout)
        out["save_wall_s"].append(wall)
        out["save_agent_s"].append(float(data["seconds"]))
        out["bytes"].append(int(data["bytes"]))
        wall, _ = _timed(host.ferryctl_argv("restore", str(image), "--json"))
        out["restore_wall_s"].append(wall)
        _check_guest(serial, host, before)
        log(f"{fmt} rep {rep + 1}/{reps}: save {out['save_wall_s'][-1]:.2f}s, "
            f"restore {wall:.2f}s, {data['bytes']} bytes")  # fmt: skip
        if not (fmt == "raw" and rep == reps - 1):
            image.unlink()
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mem-mib", type=int, default=1024, help="guest RAM (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="cycles per format (default %(default)s)")
    p.add_argument("--formats", default=",".join(ALL_FORMATS),
                   help="comma-separated; those not installed are skipped (default all)")
    p.add_argument("--zip", action="store_true", help="compressible guest pages")
    p.add_argument("--virt", default="kvm" if os.access("/dev/kvm", os.W_OK) else "qemu",
                   help="domain type (default kvm when /dev/kvm is usable)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    unknown = [f for f in args.formats if f not in ALL_FORMATS]
    if unknown or args.reps < 1 or args.mem_mib < 16:
        p.error(f"bad --formats {unknown}" if unknown else "--reps >= 1, --mem-mib >= 16")
    if "raw" not in args.formats:
        args.formats.insert(0, "raw")  # the floor and the ratios need the raw image
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 on success."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("error: needs root (network namespaces)")
        return 2
    kernel = testguest.build()
    formats = [f for f in args.formats if f == "raw" or shutil.which(f)]
    skipped = [f for f in args.formats if f not in formats]
    results: dict[str, Any] = {}
    with Cluster() as cluster:
        a = cluster.a
        a.write_config()
        a.start_agent("source")
        xml = cluster.tmp / "g1.xml"
        xml.write_text(guest_xml("g1", kernel, virt_type=args.virt, mem_mib=args.mem_mib,
                                 wss_mib=8, zip=args.zip))  # fmt: skip
        a.ferryctl("define", str(xml), check=True)
        a.ferryctl("start", "g1", check=True)
        serial = testguest.SerialReader(a.serial_socket("g1"))
        try:
            serial.wait_for_boot(timeout=300)
            serial.wait_for(lambda r: r.counter >= 3, timeout=300)
            for fmt in formats:
                results[fmt] = run_format(a, fmt, args.reps, serial)
            raw_image = a.root / "g1.raw.save"
            cp_w, cp_r = _cp_floor(raw_image, args.reps)
            raw_image.unlink()
            a.ferryctl("destroy", "g1", check=True)
        finally:
            serial.close()
    raw_bytes = statistics.median(results["raw"]["bytes"])
    floor_w, floor_r = statistics.median(cp_w), statistics.median(cp_r)
    report: dict[str, Any] = {
        "mem_mib": args.mem_mib, "reps": args.reps, "zip": args.zip, "virt": args.virt,
        "skipped": skipped, "floor": {"cp_fsync_s": summary(cp_w), "cat_s": summary(cp_r),
                                      "bytes": raw_bytes},
        "formats": {},
    }  # fmt: skip
    for fmt, r in results.items():
        size = statistics.median(r["bytes"])
        save_s = summary(r["save_wall_s"])
        restore_s = summary(r["restore_wall_s"])
        assert save_s is not None and restore_s is not None
        report["formats"][fmt] = {
            "save_s": save_s, "save_agent_s": summary(r["save_agent_s"]),
            "restore_s": restore_s, "bytes": size,
            "compression_ratio": raw_bytes / size if size else None,
            "save_vs_cp": save_s["median"] / floor_w if floor_w else None,
            "restore_vs_cat": restore_s["median"] / floor_r if floor_r else None,
        }  # fmt: skip
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print_table(report)
    return 0


def print_table(report: dict[str, Any]) -> None:
    """The human-readable result."""
    floor = report["floor"]
    print(f"guest {report['mem_mib']} MiB ({report['virt']}, zip={report['zip']}), "
          f"{report['reps']} rep(s); raw image {floor['bytes'] / 2**20:.1f} MiB")  # fmt: skip
    print(f"floor: cp+fsync {floor['cp_fsync_s']['median']:.3f}s, "
          f"cat {floor['cat_s']['median']:.3f}s (median)")  # fmt: skip
    print(f"{'format':<7} {'save s (med/min/max)':<24} {'restore s (med/min/max)':<25} "
          f"{'MiB':>8} {'ratio':>6} {'save/cp':>8} {'rest/cat':>8}")  # fmt: skip
    for fmt, r in report["formats"].items():
        s, t = r["save_s"], r["restore_s"]
        print(f"{fmt:<7} {s['median']:6.2f}/{s['min']:6.2f}/{s['max']:6.2f}      "
              f"{t['median']:6.2f}/{t['min']:6.2f}/{t['max']:6.2f}       "
              f"{r['bytes'] / 2**20:8.1f} {r['compression_ratio']:6.1f} "
              f"{r['save_vs_cp']:8.1f} {r['restore_vs_cat']:8.1f}")  # fmt: skip
    if report["skipped"]:
        print(f"not installed: {', '.join(report['skipped'])}")


if __name__ == "__main__":
    sys.exit(main())
