#!/usr/bin/env python3
"""Reproduce qemu 7.2's lost pages in a multi-pass TCG migration, without Ferry.

Two qemus on loopback, started from the same argv Ferry uses, the test guest
rewriting 64 MiB at 8 MiB/s, ``max-bandwidth`` capped so the migration needs
several dirty-sync passes, driven over QMP directly.  Under KVM the guest on
the destination verifies every page; under TCG (Debian 12's qemu 7.2) it
finds tens of thousands of stale pages, although the source saw none:

    .venv/bin/python tools/guest/tcg_dirty_repro.py qemu 32   # dst bad > 0
    .venv/bin/python tools/guest/tcg_dirty_repro.py kvm 32    # dst bad 0

Ferry's e2e tests that need several passes therefore expect this failure
under TCG (see tests/e2e/test_migration.py, ``multipass_guest_checks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tools/testbed"), str(REPO / "tools/guest")]

import testguest  # noqa: E402
from cluster import guest_xml  # noqa: E402
from ferry.domain import RuntimePaths, parse_domain, to_qemu_argv  # noqa: E402
from ferry.qemu import launch, query_migrate  # noqa: E402

PORT = 49999


async def main(virt: str, cap_mib: int) -> int:
    kernel = testguest.build()
    xml = guest_xml("t", kernel, virt_type=virt, mem_mib=256, wss_mib=64, rate_mib_s=8)
    domain = parse_domain(xml, where="repro")
    root = Path(tempfile.mkdtemp(prefix="tcg-repro-"))
    procs = []

    async def start(tag: str, incoming: bool) -> tuple[object, Path]:
        run = root / tag
        run.mkdir()
        paths = RuntimePaths(run_dir=run, qmp_socket=run / "qmp.sock", pidfile=run / "pid",
                             log_file=None)  # fmt: skip
        argv = to_qemu_argv(domain, paths=paths, incoming=incoming)
        qemu = await launch(argv, pidfile=paths.pidfile, qmp_socket=paths.qmp_socket, timeout=60)
        procs.append(qemu)
        return qemu, run / "serial0.sock"

    try:
        src, src_serial = await start("src", False)
        await src.qmp.execute("cont")  # type: ignore[attr-defined]
        serial = testguest.SerialReader(src_serial)
        serial.wait_for_boot(60)
        serial.wait_for(lambda r: r.counter >= 3, 60)
        dst, dst_serial = await start("dst", True)
        uri = f"tcp:127.0.0.1:{PORT}"
        await dst.qmp.execute("migrate-incoming", {"uri": uri})  # type: ignore[attr-defined]
        await src.qmp.execute("migrate-set-parameters",  # type: ignore[attr-defined]
                              {"max-bandwidth": cap_mib << 20})  # fmt: skip
        await src.qmp.execute("migrate", {"uri": uri})  # type: ignore[attr-defined]
        while (stats := await query_migrate(src.qmp)).status not in (  # type: ignore[attr-defined]
            "completed", "failed", "cancelled"
        ):
            await asyncio.sleep(0.05)
        last = serial.latest()
        assert last is not None
        print(f"{virt}: {stats.status} after {stats.ram_dirty_sync_count} passes; "
              f"source reported {last.bad_pages} bad pages")  # fmt: skip
        while (await query_migrate(dst.qmp)).status != "completed":  # type: ignore[attr-defined]
            await asyncio.sleep(0.02)
        await dst.qmp.execute("cont")  # type: ignore[attr-defined]
        serial.reconnect(dst_serial)
        report = serial.wait_for(lambda r: r.counter > last.counter + 8, 60)
        print(f"{virt}: destination reports {report.bad_pages} bad pages")
        serial.close()
        return 1 if report.bad_pages else 0
    finally:
        for qemu in procs:
            with contextlib.suppress(Exception):
                await qemu.kill()  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "qemu",
                              int(sys.argv[2]) if len(sys.argv) > 2 else 32)))  # fmt: skip
