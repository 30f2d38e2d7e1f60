"""The test guest across a plain qemu-to-qemu live migration (no Ferry involved):
the guest keeps running, its memory stays intact, and, flat out, it dirties
memory faster than a bandwidth-limited migration can copy it.

This checks the instrument before the e2e suite relies on it to judge Ferry.
Both qemus run on this host and talk over a unix socket; QMP is spoken with a
few lines of stdlib code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tools" / "guest") not in sys.path:
    sys.path.insert(0, str(REPO / "tools" / "guest"))

import testguest  # noqa: E402

pytestmark = pytest.mark.e2e

QEMU = shutil.which("qemu-system-x86_64")


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


# FERRY_TEST_VIRT (the e2e suite's switch): "kvm" or "qemu" (TCG)
_FORCED = os.environ.get("FERRY_TEST_VIRT")
ACCEL = {"kvm": "kvm", "qemu": "tcg"}.get(_FORCED or "", "kvm" if _kvm_usable() else "tcg")


class Qmp:
    """Synchronous QMP over a unix socket; events are kept, not returned."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        sock.settimeout(timeout)
        self._sock = sock
        self._file = sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self._reply()  # greeting
        self.cmd("qmp_capabilities")

    def _reply(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self._file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self._file.flush()
        reply = self._reply()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Pair:
    """A source qemu running the guest and a destination qemu waiting for it."""

    def __init__(self, elf: Path, append: str, accel: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ferry-tgm-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[testguest.SerialReader] = []
        self.qmps: list[Qmp] = []
        for role in ("src", "dst"):
            extra = ["-no-reboot", "-qmp", f"unix:{self.dir / role}.qmp,server=on,wait=off"]
            if role == "dst":
                extra += ["-incoming", "defer"]
            argv = testguest.qemu_argv(
                elf,
                serial_socket=self.dir / f"{role}.serial",
                mem_mib=128,
                append=append,
                accel=accel,
                qemu=str(QEMU),
                extra=extra,
            )
            with open(self.dir / f"{role}.stderr", "wb") as err:
                self.procs.append(
                    subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
                    )
                )
        self.src_serial = testguest.SerialReader(self.dir / "src.serial")
        self.dst_serial = testguest.SerialReader(self.dir / "dst.serial")
        self.readers += [self.src_serial, self.dst_serial]
        self.src = Qmp(self.dir / "src.qmp")
        self.qmps.append(self.src)
        self.dst = Qmp(self.dir / "dst.qmp")
        self.qmps.append(self.dst)

    def migrate(self, **params: Any) -> None:
        uri = f"unix:{self.dir / 'migration.sock'}"
        self.dst.cmd("migrate-incoming", uri=uri)
        if params:
            self.src.cmd("migrate-set-parameters", **params)
        self.src.cmd("migrate", uri=uri)

    def query(self) -> dict[str, Any]:
        result: dict[str, Any] = self.src.cmd("query-migrate")
        return result

    def close(self) -> None:
        for q in self.qmps:
            q.close()
        for p in self.procs:
            p.kill()
            p.wait(timeout=30)
        for r in self.readers:
            r.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pair_factory() -> Iterator[Callable[[str], Pair]]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (binutils) not installed")
    elf = testguest.build()
    pairs: list[Pair] = []

    def make(append: str) -> Pair:
        pairs.append(Pair(elf, append, ACCEL))
        return pairs[-1]

    try:
        yield make
    finally:
        for p in pairs:
            p.close()


def test_guest_survives_live_migration(pair_factory: Callable[[str], Pair]) -> None:
    pair = pair_factory(testguest.cmdline(wss_mib=16, rate_mib_s=50, report_ms=100))
    boot = pair.src_serial.wait_for_boot(timeout=60)
    before = pair.src_serial.wait_for(lambda r: r.counter >= 3 and r.sweeps >= 1, timeout=60)
    assert before.bad_pages == 0

    pair.migrate()
    done = wait_until(
        lambda: (q := pair.query()).get("status") in ("completed", "failed") and q,
        60,
        "the migration to finish",
    )
    assert done["status"] == "completed", done
    last_src = pair.src_serial.latest()
    assert last_src is not None

    # The destination carries on where the source stopped: no boot line, the
    # counter continues, every page verifies and the static checksum holds.
    after = pair.dst_serial.wait_for(
        lambda r: r.sweeps >= last_src.sweeps + 2 and r.counter >= last_src.counter + 3, timeout=60
    )
    first_dst = pair.dst_serial.reports()[0]
    assert pair.dst_serial.boot_count == 0, "the guest rebooted on the destination"
    assert first_dst.counter > last_src.counter and first_dst.guest_ms > last_src.guest_ms
    assert after.bad_pages == 0, after.raw
    assert after.generation > last_src.generation
    assert after.checksum == testguest.expected_static_sum(boot), after.raw
    print(
        f"\n[{ACCEL}] migrated in {done.get('total-time')} ms, downtime "
        f"{done.get('downtime')} ms; source counter {last_src.counter} -> "
        f"destination {first_dst.counter}, bad={after.bad_pages}"
    )


def test_flat_out_guest_outpaces_migration(pair_factory: Callable[[str], Pair]) -> None:
    """64 MiB rewritten as fast as possible against 64 MiB/s and 50 ms of
    allowed downtime: the migration cannot converge.  Cancelled, the source
    guest carries on intact."""
    pair = pair_factory(testguest.cmdline(wss_mib=64, rate_mib_s=0, report_ms=100))
    pair.src_serial.wait_for_boot(timeout=60)
    start = pair.src_serial.wait_for(lambda r: r.counter >= 2, timeout=60)
    pair.migrate(**{"max-bandwidth": 64 << 20, "downtime-limit": 50})

    state = wait_until(
        lambda: (q := pair.query()).get("ram", {}).get("dirty-sync-count", 0) >= 4 and q,
        60,
        "four dirty-bitmap syncs",
    )
    assert state["status"] == "active", state
    ram = state["ram"]
    assert ram["remaining"] > 0
    during = pair.src_serial.latest()
    assert during is not None and during.generation > start.generation
    print(
        f"\n[{ACCEL}] after {ram['dirty-sync-count']} syncs: status {state['status']}, "
        f"dirty-pages-rate {ram.get('dirty-pages-rate')} pages/s, remaining "
        f"{ram['remaining'] >> 20} MiB, guest dirtying "
        f"{testguest.dirty_rate_mib_s(start, during):.0f} MiB/s"
    )

    pair.src.cmd("migrate_cancel")
    wait_until(lambda: pair.query().get("status") == "cancelled", 30, "the cancel")
    after = pair.src_serial.wait_for(
        lambda r: r.counter > during.counter + 3, timeout=30, fresh=True
    )
    assert after.bad_pages == 0, after.raw
    assert pair.src_serial.boot_count == 1
