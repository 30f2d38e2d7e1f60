"""The test guest (tools/guest): build, boot under TCG and KVM, dirty rates,
and proof that the verifier catches corrupted and stale pages.

Each qemu is started from an argv list and killed in a fixture finaliser.
Waits are conditions with timeouts (SerialReader.wait_for), never sleeps.
Measured figures are printed (run with -s to see them) and attached as
junit properties.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "guest"))

import testguest  # noqa: E402
from testguest import BootInfo, Report  # noqa: E402

QEMU = shutil.which("qemu-system-x86_64")
HAVE_BINUTILS = shutil.which("as") is not None and shutil.which("ld") is not None


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


# FERRY_TEST_VIRT=qemu (the e2e suite's switch) runs everything under TCG
KVM = _kvm_usable() and os.environ.get("FERRY_TEST_VIRT", "kvm") != "qemu"

needs_binutils = pytest.mark.skipif(not HAVE_BINUTILS, reason="GNU as/ld (binutils) not installed")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
needs_kvm = pytest.mark.skipif(not KVM, reason="no usable /dev/kvm (or FERRY_TEST_VIRT=qemu)")
ACCELS = ["tcg", pytest.param("kvm", marks=needs_kvm)]
FAST_ACCEL = "kvm" if KVM else "tcg"  # for tests that need time to pass in the guest

BOOT_TIMEOUT = 40.0  # KVM here: SeaBIOS alone takes ~3 s


# ---------------------------------------------------------------------------
# pure unit tests


def test_cmdline() -> None:
    assert testguest.cmdline(wss_mib=16) == "wss=16 rate=0 report=200 seed=1"
    assert (
        testguest.cmdline(wss_mib=64, rate_mib_s=50, report_ms=100, seed=7)
        == "wss=64 rate=50 report=100 seed=7"
    )
    with pytest.raises(ValueError):
        testguest.cmdline(wss_mib=-1)
    with pytest.raises(ValueError):
        testguest.cmdline(wss_mib=1, report_ms=5)
    assert testguest.cmdline(wss_mib=16, zip=True) == "wss=16 rate=0 report=200 seed=1 zip=1"
    assert testguest.cmdline(wss_mib=16, zip=False) == testguest.cmdline(wss_mib=16)
    with pytest.raises(ValueError):
        testguest.cmdline(wss_mib=1, zip=1)  # type: ignore[arg-type]


def test_parse_lines() -> None:
    boot = testguest.parse_line(
        "FERRY-GUEST boot mem_mib=128 wss=16 rate=0 report=200 seed=1 tsc_khz=2597804 "
        "tsc_src=pit first_pfn=272 pages=32464 wss_pages=4096\r",
        1.5,
    )
    assert isinstance(boot, BootInfo)
    assert (boot.mem_mib, boot.wss_pages, boot.tsc_source) == (128, 4096, "pit")
    assert boot.host_time == 1.5
    assert boot.zip is False  # a guest from before zip mode prints no zip=
    for text, want in (("zip=0", False), ("zip=1", True)):
        zboot = testguest.parse_line(
            "FERRY-GUEST boot mem_mib=128 wss=16 rate=0 report=200 seed=1 tsc_khz=2597804 "
            f"tsc_src=pit tsc_err_ppm=190 first_pfn=272 pages=32464 wss_pages=4096 {text}"
        )
        assert isinstance(zboot, BootInfo) and zboot.zip is want
    rep = testguest.parse_line(
        "FERRY-GUEST counter=2 gen=475904 dirtied_mib=1859 verified=59488 bad=0 "
        "sum=4c651776645279bc mem_mib=128 ms=496 sweeps=1 last_bad=0"
    )
    assert isinstance(rep, Report)
    assert (
        rep.counter,
        rep.generation,
        rep.dirtied_mib,
        rep.verified_pages,
        rep.bad_pages,
        rep.checksum,
        rep.guest_ms,
        rep.sweeps,
    ) == (2, 475904, 1859, 59488, 0, 0x4C651776645279BC, 496, 1)
    fault = testguest.parse_line("FERRY-GUEST fault vec=6 err=0 rip=100abc")
    assert isinstance(fault, str) and "vec=6" in fault
    # partial lines (connected mid-line) and noise are ignored
    assert testguest.parse_line("ed=59488 bad=0 sum=4c65") is None
    assert testguest.parse_line("FERRY-GUEST counter=2 gen=47") is None
    assert testguest.parse_line("SeaBIOS (version 1.16.2)") is None


def test_parse_disk_variant_fields() -> None:
    boot = testguest.parse_line(
        "FERRY-GUEST boot mem_mib=64 wss=4 rate=0 report=100 seed=1 tsc_khz=2596169 "
        "tsc_src=pit tsc_err_ppm=193 first_pfn=272 pages=16080 wss_pages=1024 disk=1"
    )
    assert isinstance(boot, BootInfo) and boot.disk_every == 1
    rep = testguest.parse_line(
        "FERRY-GUEST counter=5 gen=2822656 dirtied_mib=11026 verified=352832 bad=0 "
        "sum=237195d0f1cefbc3 mem_mib=64 ms=665 sweeps=21 last_bad=0 disk_writes=4 "
        "disk_errors=1 disk_last_err=81"
    )
    assert isinstance(rep, Report)
    assert (rep.disk_writes, rep.disk_errors, rep.disk_last_err) == (4, 1, 81)
    # the default image's lines have no such fields
    plain = testguest.parse_line(
        "FERRY-GUEST counter=2 gen=1 dirtied_mib=0 verified=1 bad=0 sum=0 mem_mib=128"
    )
    assert isinstance(plain, Report) and (plain.disk_writes, plain.disk_errors) == (0, 0)


def test_page_format_and_static_sum() -> None:
    words = testguest.page_words(300, 5, 9)
    assert len(words) == 512 and words[:2] == [300, 5]
    assert testguest.page_words(300, 6, 9)[4:] != words[4:]  # a rewrite changes every word
    assert all(a != b for a, b in zip(testguest.page_words(300, 6, 9)[3:], words[3:], strict=True))
    boot = BootInfo(
        mem_mib=1,
        wss_mib=0,
        rate_mib_s=0,
        report_ms=200,
        seed=9,
        tsc_khz=1,
        tsc_source="pit",
        first_pfn=300,
        pages=3,
        wss_pages=1,
        raw="",
    )
    assert testguest.expected_static_sum(boot) == (
        testguest.page_words(301, 0, 9)[3] ^ testguest.page_words(302, 0, 9)[3]
    )


def test_zip_page_format() -> None:
    """zip=1: the same header and check word, a body shared by every page and
    generation, so a rewrite changes q[1] and q[3] only and pages compress."""
    seed = 9
    plain, page = testguest.page_words(300, 5, seed), testguest.page_words(300, 5, seed, zip=True)
    assert page[:4] == plain[:4]  # header, hence stale-page detection and the sum, unchanged
    body = testguest.zip_body(seed)
    assert len(body) == 8 and len(set(body)) == 8 and 0 not in body
    assert page[4:] == [body[i % 8] for i in range(4, 512)]
    assert not set(body) & {w for w in plain[:4]}  # body words are no page's header
    # a rewrite (and another page) differs in the header only
    later = testguest.page_words(300, 6, seed, zip=True)
    assert [i for i in range(512) if later[i] != page[i]] == [1, 3]
    assert testguest.page_words(301, 5, seed, zip=True)[4:] == page[4:]
    assert testguest.page_words(300, 5, seed + 1, zip=True)[4:] != page[4:]
    # xbzrle's view: bytes that changed between two versions of the page
    a = testguest.page_bytes(300, 5, seed, zip=True)
    b = testguest.page_bytes(300, 6, seed, zip=True)
    assert sum(x != y for x, y in zip(a, b, strict=True)) <= 16
    # on its own a page deflates ~30x; the default format not at all
    assert len(zlib.compress(a)) < 200
    assert len(zlib.compress(testguest.page_bytes(300, 5, seed))) > 4000
    # different pages one after another (a stream compressor's window)
    stream = b"".join(testguest.page_bytes(pfn, 0, seed, zip=True) for pfn in range(300, 332))
    assert len(zlib.compress(stream)) < len(stream) // 100


def test_dirty_rate() -> None:
    def rep(gen: int, ms: int) -> Report:
        return Report(
            counter=1,
            generation=gen,
            dirtied_mib=gen // 256,
            verified_pages=0,
            bad_pages=0,
            checksum=0,
            raw="",
            guest_ms=ms,
        )

    assert testguest.dirty_rate_mib_s(rep(0, 1000), rep(256 * 100, 3000)) == pytest.approx(50.0)
    with pytest.raises(ValueError):
        testguest.dirty_rate_mib_s(rep(0, 1000), rep(10, 1000))


def test_build_reports_missing_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(testguest.GuestBuildError, match="binutils"):
        testguest.build(tmp_path)


# ---------------------------------------------------------------------------
# build


@pytest.fixture(scope="module")
def guest_elf() -> Path:
    if not HAVE_BINUTILS:
        pytest.skip("GNU as/ld (binutils) not installed")
    elf: Path = testguest.build()
    return elf


@needs_binutils
def test_build_is_cached_and_multiboot(guest_elf: Path, tmp_path: Path) -> None:
    assert guest_elf.name == "guest.elf" and guest_elf.parent.name.startswith("ferry-guest-")
    assert testguest.build() == guest_elf
    first = testguest.build(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert testguest.build(tmp_path) == first and first.stat().st_mtime_ns == mtime
    data = first.read_bytes()
    assert data[:5] == b"\x7fELF\x01"  # ELF32: qemu's multiboot loader refuses ELF64
    off = data.find((0x1BADB002).to_bytes(4, "little"))
    assert 0 <= off < 8192 and off % 4 == 0
    assert data == guest_elf.read_bytes()  # reproducible


@needs_binutils
def test_disk_variant_is_a_separate_image(guest_elf: Path, tmp_path: Path) -> None:
    disk_elf = testguest.build(variant="disk")
    assert disk_elf.parent.name.endswith("-disk") and disk_elf != guest_elf
    assert testguest.build(variant="disk") == disk_elf
    assert b" disk_writes=" in disk_elf.read_bytes()
    # the default image contains none of it
    assert b"disk" not in guest_elf.read_bytes()
    with pytest.raises(ValueError, match="unknown guest variant"):
        testguest.build(tmp_path, variant="nope")


# ---------------------------------------------------------------------------
# qemu


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    serial: testguest.SerialReader
    workdir: Path
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)
    gdb_socket: Path | None = None

    def stderr(self) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace").strip()
        return ""

    def wait_for(self, predicate: Callable[[Report], bool], timeout: float) -> Report:
        try:
            return self.serial.wait_for(predicate, timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nqemu exit={self.proc.poll()} stderr:\n{self.stderr()}") from e

    def wait_for_boot(self, timeout: float = BOOT_TIMEOUT) -> BootInfo:
        try:
            return self.serial.wait_for_boot(timeout)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nqemu exit={self.proc.poll()} stderr:\n{self.stderr()}") from e


StartGuest = Callable[..., Guest]


@pytest.fixture
def start_guest(guest_elf: Path) -> Iterator[StartGuest]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 not installed")
    procs: list[subprocess.Popen[bytes]] = []
    readers: list[testguest.SerialReader] = []
    workdirs: list[Path] = []

    def start(
        *,
        accel: str,
        append: str,
        mem_mib: int = 128,
        gdb: bool = False,
        variant: str = "default",
        qemu_extra: tuple[str, ...] = (),
    ) -> Guest:
        # unix socket paths must stay short: not under pytest's tmp_path
        workdir = Path(tempfile.mkdtemp(prefix="ferry-tg-"))
        workdirs.append(workdir)
        serial_sock = workdir / "serial.sock"
        extra = ["-no-reboot", *qemu_extra]
        gdb_sock = None
        if gdb:
            gdb_sock = workdir / "gdb.sock"
            extra += [
                "-chardev",
                f"socket,id=gdb0,path={gdb_sock},server=on,wait=off",
                "-gdb",
                "chardev:gdb0",
            ]
        kernel = guest_elf if variant == "default" else testguest.build(variant=variant)
        argv = testguest.qemu_argv(
            kernel,
            serial_socket=serial_sock,
            mem_mib=mem_mib,
            append=append,
            accel=accel,
            qemu=str(QEMU),
            extra=extra,
        )
        stderr_path = workdir / "qemu.stderr"
        started = time.monotonic()
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        procs.append(proc)
        reader = testguest.SerialReader(serial_sock)
        readers.append(reader)
        return Guest(
            proc=proc,
            serial=reader,
            workdir=workdir,
            stderr_path=stderr_path,
            started=started,
            gdb_socket=gdb_sock,
        )

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
        for reader in readers:
            reader.close()
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)


def _assert_healthy_run(guest: Guest, boot: BootInfo) -> Report:
    """Counter past 3 with bad=0, then a completed sweep with the right sum."""
    rep = guest.wait_for(lambda r: r.counter > 3, timeout=30)
    assert rep.bad_pages == 0, rep.raw
    rep = guest.wait_for(lambda r: r.sweeps >= 1 and r.counter > 3, timeout=60)
    assert rep.bad_pages == 0, rep.raw
    assert rep.checksum == testguest.expected_static_sum(boot), rep.raw
    reports = guest.serial.reports()
    counters = [r.counter for r in reports]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    assert guest.serial.boot_count == 1 and guest.serial.fault is None
    return rep


@needs_qemu
@pytest.mark.parametrize("accel", ACCELS)
def test_boot_and_dirty_flat_out(
    accel: str, start_guest: StartGuest, record_property: Callable[[str, object], None]
) -> None:
    guest = start_guest(
        accel=accel, append=testguest.cmdline(wss_mib=16, rate_mib_s=0, report_ms=100)
    )
    boot = guest.wait_for_boot()
    assert boot.mem_mib == 128
    assert (boot.wss_mib, boot.rate_mib_s, boot.report_ms, boot.seed) == (16, 0, 100, 1)
    assert boot.wss_pages == 16 * 256 and boot.pages > 120 * 256
    assert boot.tsc_source in ("pit", "cpuid") and boot.tsc_khz > 10_000
    assert boot.tsc_err_ppm < 10_000, boot.raw  # calibrated to better than 1 %

    guest.wait_for(lambda r: True, timeout=30)
    first_report = guest.serial.reports()[0]
    first = guest.wait_for(lambda r: r.counter >= 2, timeout=30)
    _assert_healthy_run(guest, boot)
    last = guest.wait_for(lambda r: r.guest_ms >= first.guest_ms + 1000, timeout=30)
    rate = testguest.dirty_rate_mib_s(first, last)
    print(
        f"\n[{accel}] dirty rate {rate:.0f} MiB/s flat out (wss=16 MiB); boot line "
        f"{boot.host_time - guest.started:.2f}s, first report "
        f"{first_report.host_time - guest.started:.2f}s after qemu start; "
        f"TSC {boot.tsc_khz} kHz ({boot.tsc_source}, ±{boot.tsc_err_ppm} ppm)"
    )
    record_property(f"dirty_rate_mib_s_{accel}", round(rate))
    assert last.bad_pages == 0, last.raw
    if accel == "kvm":
        assert rate >= 500, f"only {rate:.0f} MiB/s under KVM"
    else:
        assert rate > 0


@needs_qemu
def test_rate_limited(
    start_guest: StartGuest, record_property: Callable[[str, object], None]
) -> None:
    guest = start_guest(
        accel=FAST_ACCEL, append=testguest.cmdline(wss_mib=16, rate_mib_s=50, report_ms=100)
    )
    boot = guest.wait_for_boot()
    assert boot.rate_mib_s == 50
    first = guest.wait_for(lambda r: r.counter >= 2, timeout=30)
    last = guest.wait_for(lambda r: r.guest_ms >= first.guest_ms + 2000, timeout=30)
    rate = testguest.dirty_rate_mib_s(first, last)
    # the guest's clock (TSC calibrated against the PIT) against the host's
    clock_ratio = (last.guest_ms - first.guest_ms) / 1000 / (last.host_time - first.host_time)
    print(f"\n[{FAST_ACCEL}] rate=50 -> {rate:.1f} MiB/s; guest/host clock {clock_ratio:.3f}")
    record_property("rate_limited_mib_s", round(rate, 1))
    assert 35 <= rate <= 65, last.raw
    assert 0.8 <= clock_ratio <= 1.2
    assert last.bad_pages == 0, last.raw


@needs_qemu
def test_zip_mode_runs_healthy_with_compressible_pages(
    start_guest: StartGuest, record_property: Callable[[str, object], None]
) -> None:
    """zip=1 under the fast accelerator: bad=0, the same sum as the default
    format, and guest memory holds exactly ``page_words(..., zip=True)``."""
    guest = start_guest(
        accel=FAST_ACCEL,
        gdb=True,
        append=testguest.cmdline(wss_mib=16, rate_mib_s=0, report_ms=100, zip=True),
    )
    boot = guest.wait_for_boot()
    assert boot.zip is True and "zip=1" in boot.raw
    first = guest.wait_for(lambda r: r.counter >= 2, timeout=30)
    rep = _assert_healthy_run(guest, boot)
    rate = testguest.dirty_rate_mib_s(first, rep)
    print(f"\n[{FAST_ACCEL}] zip=1 dirty rate {rate:.0f} MiB/s flat out (wss=16 MiB)")
    record_property("zip_dirty_rate_mib_s", round(rate))
    assert guest.gdb_socket is not None
    with testguest.GdbStub(guest.gdb_socket) as gdb:  # connecting pauses the guest
        for pfn in (boot.first_pfn + 3, boot.first_pfn + boot.wss_pages + 5):
            data = gdb.read(pfn * 4096, 4096)
            gen = int.from_bytes(data[8:16], "little")
            assert data == testguest.page_bytes(pfn, gen, boot.seed, zip=True)
        gdb.detach()
    assert guest.wait_for(lambda r: r.counter > rep.counter + 2, timeout=30).bad_pages == 0


@needs_qemu
def test_fault_is_reported(start_guest: StartGuest) -> None:
    guest = start_guest(accel="tcg", append="wss=1 crash=1")
    guest.wait_for_boot()
    with pytest.raises(testguest.GuestFault, match="vec=6"):  # ud2: #UD
        guest.wait_for(lambda r: True, timeout=20)


@needs_qemu
@pytest.mark.parametrize("zip_mode", [False, True], ids=["plain", "zip"])
def test_detects_stale_and_corrupted_pages(start_guest: StartGuest, zip_mode: bool) -> None:
    """Write guest memory through qemu's gdbstub (qemu 7.2 has no QMP/HMP
    command that writes guest memory): a working-set page put back to an
    older generation (what a lost dirty page looks like after a migration)
    and a flipped byte in a static page must both be reported as bad.  In
    zip mode the stale page differs in its header only and the flipped byte
    is in the shared body: both must be caught all the same."""
    # slow rewriting (1 MiB at 1 MiB/s: each page rewritten once a second)
    # so the verifier sees the stale page before the guest rewrites it
    guest = start_guest(
        accel=FAST_ACCEL,
        gdb=True,
        append=testguest.cmdline(wss_mib=1, rate_mib_s=1, report_ms=50, zip=zip_mode),
    )
    boot = guest.wait_for_boot()
    assert guest.gdb_socket is not None
    start = guest.wait_for(lambda r: r.counter >= 2 and r.sweeps >= 1, timeout=30)
    assert start.bad_pages == 0, start.raw

    stale_pfn = boot.first_pfn + 7
    with testguest.GdbStub(guest.gdb_socket) as gdb:  # connecting pauses the guest
        old = gdb.read(stale_pfn * 4096, 4096)
        gen = int.from_bytes(old[8:16], "little")
        assert old == testguest.page_bytes(stale_pfn, gen, boot.seed, zip=zip_mode)
        gdb.detach()
    # one full cycle over the working set later, the page has a newer generation
    guest.wait_for(lambda r: r.generation >= start.generation + boot.wss_pages + 16, timeout=30)
    assert guest.serial.latest() is not None and guest.serial.latest().bad_pages == 0  # type: ignore[union-attr]
    with testguest.GdbStub(guest.gdb_socket) as gdb:
        gdb.write(stale_pfn * 4096, old)
        gdb.detach()
    rep = guest.wait_for(lambda r: r.bad_pages > 0, timeout=20)
    assert rep.last_bad == stale_pfn, rep.raw

    static_pfn = boot.first_pfn + boot.wss_pages + 1000
    with testguest.GdbStub(guest.gdb_socket) as gdb:
        byte = gdb.read(static_pfn * 4096 + 0x800, 1)
        gdb.write(static_pfn * 4096 + 0x800, bytes([byte[0] ^ 0x01]))
        gdb.detach()
    rep = guest.wait_for(lambda r: r.last_bad == static_pfn, timeout=20)
    assert rep.bad_pages > 0
    assert guest.serial.boot_count == 1


@needs_qemu
@pytest.mark.parametrize("accel", ACCELS)
def test_disk_variant_writes_sectors(accel: str, start_guest: StartGuest, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)  # the guest's 65536-sector cycle
    guest = start_guest(
        accel=accel,
        append=testguest.cmdline(wss_mib=4, report_ms=50) + " disk=1",
        mem_mib=64,
        variant="disk",
        qemu_extra=(
            "-drive",
            f"file={image},format=raw,if=none,id=d0",
            "-device",
            "ide-hd,drive=d0,bus=ide.0,unit=0",
        ),
    )
    assert guest.wait_for_boot().disk_every == 1
    rep = guest.wait_for(lambda r: r.disk_writes >= 3, timeout=30)
    assert rep.disk_errors == 0 and rep.bad_pages == 0, rep.raw
    # write k (after report k + 1) went to LBA 8 k: counter, LBA, page magic
    data = image.read_bytes()
    for k in range(3):
        counter, lba, magic = struct.unpack_from("<QQQ", data, 8 * k * 512)
        assert (counter, lba, magic) == (k + 1, 8 * k, 0x4741505952524546)


@needs_qemu
def test_disk_variant_without_a_drive_counts_errors(start_guest: StartGuest) -> None:
    guest = start_guest(
        accel=FAST_ACCEL,
        append=testguest.cmdline(wss_mib=4, report_ms=50) + " disk=1",
        mem_mib=64,
        variant="disk",
    )
    guest.wait_for_boot()
    rep = guest.wait_for(lambda r: r.disk_errors >= 3, timeout=30)
    assert rep.disk_writes == 0 and rep.bad_pages == 0, rep.raw
    assert rep.disk_last_err == 256, rep.raw  # "no drive"
