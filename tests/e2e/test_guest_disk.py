"""The test guest's verified disk workload under plain qemu (no Ferry): the disk
variant writes self-describing 64 KiB blocks by IDE bus-master DMA at a set
rate and reads them back, counting any block that is not what it last wrote
in ``dbad``.  Checked here: the rate it sustains (raw and qcow2), that the
sweep really fails when a block is changed behind the guest's back (a flipped
bit, and a self-consistent block of the wrong generation, which only the
guest can tell), and that dbad stays 0 across a plain qemu-to-qemu live
migration on shared storage.

Rates are printed (run with -s).  QMP is a few lines of stdlib code.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "tools" / "guest") not in sys.path:
    sys.path.insert(0, str(REPO / "tools" / "guest"))

import testguest  # noqa: E402
from testguest import Report  # noqa: E402

pytestmark = pytest.mark.e2e

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")


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
DSIZE_MIB = 16
IMAGE_MIB = 32 + DSIZE_MIB  # the region starts at 32 MiB
RATE_KIB_S = 20 * 1024  # what issue 15's benchmark asks for


class Qmp:
    """Synchronous QMP over a unix socket; events are kept for wait_event."""

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
                time.sleep(0.05)  # qemu has not created its socket yet
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
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def wait_event(self, name: str, data: dict[str, Any], timeout: float) -> None:
        """Return once an event ``name`` whose data contains ``data`` arrived."""

        def seen() -> bool:
            return any(
                e["event"] == name and data.items() <= e.get("data", {}).items()
                for e in self.events
            )

        deadline = time.monotonic() + timeout
        while not seen():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no QMP event {name} {data} within {timeout:.0f}s")
            self._sock.settimeout(left)
            line = self._file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)

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


@dataclass
class Vm:
    proc: subprocess.Popen[bytes]
    serial: testguest.SerialReader
    qmp: Qmp
    stderr_path: Path

    def wait_for(
        self, predicate: Callable[[Report], bool], timeout: float, *, fresh: bool = False
    ) -> Report:
        try:
            return self.serial.wait_for(predicate, timeout, fresh=fresh)
        except TimeoutError as e:
            err = self.stderr_path.read_text(errors="replace").strip()
            raise TimeoutError(f"{e}\nqemu exit={self.proc.poll()} stderr:\n{err}") from e


@dataclass
class Lab:
    """qemus running the disk variant; everything is stopped by the fixture."""

    dir: Path
    elf: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    serials: list[testguest.SerialReader] = field(default_factory=list)
    qmps: list[Qmp] = field(default_factory=list)

    def image(self, fmt: str, name: str = "disk") -> Path:
        path = self.dir / f"{name}.{fmt}"
        if fmt == "raw":
            with path.open("wb") as f:
                f.truncate(IMAGE_MIB << 20)
        else:
            assert QEMU_IMG is not None
            subprocess.run(
                [QEMU_IMG, "create", "-q", "-f", fmt, str(path), f"{IMAGE_MIB}M"], check=True
            )
        return path

    def start(
        self,
        image: Path,
        fmt: str,
        append: str,
        *,
        role: str = "src",
        incoming: bool = False,
        paused: bool = False,
        second: tuple[Path, str] | None = None,
    ) -> Vm:
        extra = [
            "-no-reboot",
            "-qmp",
            f"unix:{self.dir / role}.qmp,server=on,wait=off",
            *testguest.ide_disk_args(image, fmt=fmt, cache="none"),
        ]
        if second is not None:
            extra += testguest.ide_disk_args(second[0], fmt=second[1], cache="none", disk=1)
        if incoming:
            extra += ["-incoming", "defer"]
        if paused:
            extra.append("-S")
        argv = testguest.qemu_argv(
            self.elf,
            serial_socket=self.dir / f"{role}.serial",
            mem_mib=64,
            append=append,
            accel=ACCEL,
            qemu=str(QEMU),
            extra=extra,
        )
        stderr_path = self.dir / f"{role}.stderr"
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        self.procs.append(proc)
        serial = testguest.SerialReader(self.dir / f"{role}.serial")
        self.serials.append(serial)
        qmp = Qmp(self.dir / f"{role}.qmp")
        self.qmps.append(qmp)
        return Vm(proc, serial, qmp, stderr_path)

    def close(self) -> None:
        for qmp in self.qmps:
            qmp.close()
        for proc in self.procs:
            proc.kill()
            proc.wait(timeout=30)
        for serial in self.serials:
            serial.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def lab() -> Iterator[Lab]:
    if QEMU is None or QEMU_IMG is None:
        pytest.skip("qemu-system-x86_64 / qemu-img not installed")
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU as/ld (binutils) not installed")
    # unix socket paths must stay short: not under pytest's tmp_path
    the_lab = Lab(Path(tempfile.mkdtemp(prefix="ferry-tgd-")), testguest.build(variant="disk"))
    try:
        yield the_lab
    finally:
        the_lab.close()


def _cmdline(dwrite: int, dverify: int | None = None, ddisks: int = 1) -> str:
    return testguest.cmdline(
        wss_mib=4,
        report_ms=250,
        dwrite_kib_s=dwrite,
        dsize_mib=DSIZE_MIB,
        dverify_kib_s=dverify,
        ddisks=ddisks,
    )


def _rates(vm: Vm, seconds: float) -> tuple[float, float, Report]:
    """(write, read-back) KiB/s over ``seconds`` of guest time from now."""
    first = vm.wait_for(lambda r: True, timeout=10, fresh=True)
    last = vm.wait_for(lambda r: r.guest_ms >= first.guest_ms + seconds * 1000, seconds + 30)
    w, v = testguest.disk_rates_kib_s(first, last)
    return w, v, last


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_dwrite_rate_and_clean_sweep(lab: Lab, fmt: str) -> None:
    image = lab.image(fmt)
    vm = lab.start(image, fmt, _cmdline(RATE_KIB_S))
    boot = vm.serial.wait_for_boot(timeout=60)
    assert boot.dbmide != 0 and boot.dwrite_kib_s == RATE_KIB_S, boot.raw
    assert boot.dverify_kib_s == RATE_KIB_S // 4 and boot.dsize_mib == DSIZE_MIB, boot.raw
    # every block written and verified at least once
    vm.wait_for(lambda r: r.dsweeps >= 2 and r.dwritten_kib > 2 * (DSIZE_MIB << 10), 60)
    write, verify, last = _rates(vm, 4.0)
    print(f"\n{fmt}: paced {RATE_KIB_S} KiB/s: writes {write:.0f} KiB/s, verify {verify:.0f} KiB/s")
    assert last.dbad == 0 and last.derrors == 0, last.raw
    assert write >= 0.75 * RATE_KIB_S, last.raw
    # each write reads back the block it overwrites, and the sweep reads more
    assert verify >= 0.75 * RATE_KIB_S, last.raw

    # the image, read from the host while the guest is paused, is consistent
    vm.qmp.cmd("stop")
    final = vm.wait_for(lambda r: True, timeout=10)
    check = testguest.verify_disk_image(image, dsize_mib=DSIZE_MIB, fmt=fmt, force_share=True)
    assert check.ok, check.bad
    assert check.written == check.blocks == DSIZE_MIB * 16
    assert check.max_generation * 64 >= final.dwritten_kib, (check.max_generation, final.raw)


def test_dwrite_flat_out_rates(lab: Lab) -> None:
    """What the DMA path can do here: writes flat out (each after reading
    back the block it overwrites), then the sweep flat out."""
    image = lab.image("raw")
    vm = lab.start(image, "raw", _cmdline(1 << 30, dverify=0))  # ~1 TiB/s: always due
    vm.serial.wait_for_boot(timeout=60)
    write, _, last = _rates(vm, 3.0)
    assert last.dbad == 0 and last.derrors == 0, last.raw
    vm.qmp.cmd("quit")
    vm.proc.wait(timeout=30)
    vm2 = lab.start(image, "raw", _cmdline(64, dverify=1 << 30), role="reads")
    vm2.wait_for(lambda r: r.dverified_kib > 0, timeout=60)
    _, verify, last = _rates(vm2, 3.0)
    print(f"\nflat out: writes {write:.0f} KiB/s (plus as many reads), sweep {verify:.0f} KiB/s")
    assert last.dbad == 0 and last.derrors == 0, last.raw
    # issue 15 needs 20 MiB/s of writes; reads only need to keep a sweep going
    assert write >= RATE_KIB_S and verify >= RATE_KIB_S / 2, (write, verify)


def _patch(image: Path, fmt: str, guest_offset: int, data: bytes) -> None:
    """Write ``data`` at guest byte ``guest_offset`` of the image, behind the
    back of the (paused) guest."""
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, data, _host_offset(image, fmt, guest_offset))
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_offset(image: Path, fmt: str, guest_offset: int) -> int:
    """Where guest byte ``guest_offset`` lives in the image file."""
    if fmt == "raw":
        return guest_offset
    assert QEMU_IMG is not None
    out = subprocess.run(
        [QEMU_IMG, "map", "-U", "--output=json", "-f", fmt, str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for ext in json.loads(out):
        if ext["start"] <= guest_offset < ext["start"] + ext["length"] and ext.get("data"):
            return int(ext["offset"]) + guest_offset - int(ext["start"])
    raise AssertionError(f"guest offset {guest_offset} not allocated in {image}: {out}")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("how", ["flipped-bit", "wrong-generation"])
def test_sweep_catches_a_block_changed_behind_its_back(lab: Lab, fmt: str, how: str) -> None:
    image = lab.image(fmt)
    # 4 blocks/s: a block is rewritten 64 s after its last write, while the
    # sweep (flat out) passes over every written block many times a second
    vm = lab.start(image, fmt, _cmdline(256, dverify=1 << 30))
    vm.serial.wait_for_boot(timeout=60)
    healthy = vm.wait_for(lambda r: r.dwritten_kib >= 8 * 64 and r.dsweeps >= 10, 60)
    assert healthy.dbad == 0 and healthy.derrors == 0, healthy.raw

    vm.qmp.cmd("stop")
    check = testguest.verify_disk_image(image, dsize_mib=DSIZE_MIB, fmt=fmt, force_share=True)
    assert check.ok and check.written >= 8, check
    block, gen = max(check.generations.items(), key=lambda kv: kv[1])  # the newest
    first_lba = testguest.DISK_REGION_LBA + block * testguest.DISK_BLOCK_SECTORS
    if how == "flipped-bit":
        sector = 5
        offset = (first_lba + sector) * 512 + 300
        with image.open("rb") as f:
            f.seek(_host_offset(image, fmt, offset))
            byte = f.read(1)
        patch = bytes([byte[0] ^ 0x10])
    else:  # a valid block, but not the generation the guest wrote there
        sector = 0
        offset = first_lba * 512
        patch = b"".join(
            testguest.sector_bytes(first_lba + i, gen + 1_000_000, 1)
            for i in range(testguest.DISK_BLOCK_SECTORS)
        )
    _patch(image, fmt, offset, patch)
    after = testguest.verify_disk_image(image, dsize_mib=DSIZE_MIB, fmt=fmt, force_share=True)
    # the host-side check sees a flipped bit; a self-consistent block only
    # the guest, which remembers what it wrote, can tell apart
    assert list(after.bad) == ([block] if how == "flipped-bit" else []), after.bad
    vm.qmp.cmd("cont")
    rep = vm.wait_for(lambda r: r.dbad > 0, timeout=30, fresh=True)
    assert rep.dlast_bad_lba == first_lba + sector, rep.raw
    assert rep.derrors == 0, rep.raw


@pytest.mark.parametrize("lose_a_write", [False, True], ids=["intact", "lost-write"])
def test_dbad_stays_0_across_plain_live_migration(lab: Lab, lose_a_write: bool) -> None:
    """Two qemus on one host sharing the image (shared storage), migrated over
    a unix socket while the guest writes 20 MiB/s.  The guest reads back
    every block before overwriting it, so once B has written the whole
    region, B has read back everything written before the move.

    ``lost-write``: the control.  B starts paused; before it runs, the
    newest block in the image is replaced by a valid block of another
    generation, as if the move had lost the last write; B must report it."""
    image = lab.image("qcow2")
    append = _cmdline(RATE_KIB_S)
    src = lab.start(image, "qcow2", append, role="src")
    dst = lab.start(image, "qcow2", append, role="dst", incoming=True, paused=lose_a_write)
    src.serial.wait_for_boot(timeout=60)
    before = src.wait_for(lambda r: r.dsweeps >= 2 and r.dwritten_kib > DSIZE_MIB << 10, 60)
    assert before.dbad == 0, before.raw

    uri = f"unix:{lab.dir / 'migration.sock'}"
    # MIGRATION events (the wait below) only with the "events" capability
    dst.qmp.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    dst.qmp.cmd("migrate-incoming", uri=uri)
    src.qmp.cmd("migrate", uri=uri)
    dst.qmp.wait_event("MIGRATION", {"status": "completed"}, timeout=120)
    assert src.qmp.cmd("query-migrate").get("status") == "completed"
    last_src = src.serial.latest()
    assert last_src is not None and last_src.dbad == 0, last_src

    if lose_a_write:
        check = testguest.verify_disk_image(
            image, dsize_mib=DSIZE_MIB, fmt="qcow2", force_share=True
        )
        assert check.ok, check.bad
        block, gen = max(check.generations.items(), key=lambda kv: kv[1])
        first_lba = testguest.DISK_REGION_LBA + block * testguest.DISK_BLOCK_SECTORS
        _patch(
            image,
            "qcow2",
            first_lba * 512,
            b"".join(
                testguest.sector_bytes(first_lba + i, gen + 1_000_000, 1)
                for i in range(testguest.DISK_BLOCK_SECTORS)
            ),
        )
        dst.qmp.cmd("cont")
        rep = dst.wait_for(lambda r: r.dbad > 0, timeout=30)
        assert rep.dlast_bad_lba == first_lba, rep.raw
        return

    # the destination carries on from where the source stopped (same counter
    # sequence) and goes round the whole region, reading back every block
    # before it overwrites it
    after = dst.wait_for(
        lambda r: (
            r.counter > last_src.counter
            and r.dwritten_kib >= last_src.dwritten_kib + (DSIZE_MIB << 10) + 64
        ),
        60,
    )
    assert dst.serial.boot_count == 0, "the destination must not boot the guest again"
    assert after.dbad == 0 and after.derrors == 0, after.raw
    write, verify, last = _rates(dst, 2.0)
    print(
        f"\nafter migration: writes {write:.0f} KiB/s, verify {verify:.0f} KiB/s, dbad={last.dbad}"
    )
    assert last.dbad == 0 and write >= 0.75 * RATE_KIB_S, last.raw
    dst.qmp.cmd("stop")
    check = testguest.verify_disk_image(image, dsize_mib=DSIZE_MIB, fmt="qcow2", force_share=True)
    assert check.ok, check.bad


def test_dwrite_without_a_drive_stops_and_says_so(lab: Lab) -> None:
    """No disk on the IDE channel: the first command finds no drive, the
    workload stops (it would only fail again) and the report says why."""
    argv = testguest.qemu_argv(
        lab.elf,
        serial_socket=lab.dir / "nodrive.serial",
        mem_mib=64,
        append=_cmdline(1024),
        accel=ACCEL,
        qemu=str(QEMU),
        extra=["-no-reboot"],
    )
    lab.procs.append(
        subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
    )
    serial = testguest.SerialReader(lab.dir / "nodrive.serial")
    lab.serials.append(serial)
    assert serial.wait_for_boot(timeout=60).dbmide != 0  # the controller is there
    rep = serial.wait_for(lambda r: r.derrors > 0, timeout=30)
    later = serial.wait_for(lambda r: r.counter >= rep.counter + 4, timeout=30)
    assert later.derrors == 1 and later.dlast_err == 0x10000, later.raw
    assert later.dwritten_kib == 0 and later.dbad == 0 and later.bad_pages == 0, later.raw


def test_two_disks(lab: Lab) -> None:
    """ddisks=2: the writes alternate between the masters of both IDE
    channels (raw and qcow2 here); both images are consistent, and a change
    on the second disk is caught and attributed to it."""
    first, second = lab.image("raw", "first"), lab.image("qcow2", "second")
    vm = lab.start(first, "raw", _cmdline(RATE_KIB_S, ddisks=2), second=(second, "qcow2"))
    boot = vm.serial.wait_for_boot(timeout=60)
    assert boot.ddisks == 2, boot.raw
    vm.wait_for(lambda r: r.dsweeps >= 2 and r.dwritten_kib > 2 * 2 * (DSIZE_MIB << 10), 60)
    write, verify, last = _rates(vm, 3.0)
    print(f"\ntwo disks: writes {write:.0f} KiB/s, verify {verify:.0f} KiB/s (totals)")
    assert last.dbad == 0 and last.derrors == 0, last.raw
    assert write >= 0.75 * RATE_KIB_S, last.raw

    vm.qmp.cmd("stop")
    checks = [
        testguest.verify_disk_image(path, dsize_mib=DSIZE_MIB, fmt=fmt, force_share=True)
        for path, fmt in ((first, "raw"), (second, "qcow2"))
    ]
    for i, check in enumerate(checks):
        assert check.ok and check.written == check.blocks, (i, check.bad, check.written)
        # generation g went to disk (g - 1) % 2
        assert {(g - 1) % 2 for g in check.generations.values()} == {i}, i
    block = 3
    lba = testguest.DISK_REGION_LBA + block * testguest.DISK_BLOCK_SECTORS
    _patch(second, "qcow2", lba * 512 + 64, b"\xa5" * 8)
    vm.qmp.cmd("cont")
    rep = vm.wait_for(lambda r: r.dbad > 0, timeout=30, fresh=True)
    assert (rep.dlast_bad_disk, rep.dlast_bad_lba) == (1, lba), rep.raw
