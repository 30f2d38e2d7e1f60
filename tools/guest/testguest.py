"""Ferry test guest: build it, boot it, read what it says.

The guest (``guest.S``) is a tiny multiboot kernel that fills all guest RAM
above itself with self-describing pages, keeps rewriting a working set of
``wss`` MiB at ``rate`` MiB/s and verifies every page in between.  Every
``report`` ms it prints one line on COM1::

    FERRY-GUEST counter=12 gen=3020288 dirtied_mib=11798 verified=377536 bad=0
        sum=4c651776645279bc mem_mib=128 ms=2949 sweeps=11 last_bad=0

``counter`` only ever increases (a reset means the guest rebooted), ``bad``
must stay 0 across a migration.  See guest.S for the page format.

By default every rewrite changes every quadword of a page, so no compression
helps a migration.  ``cmdline(..., zip=True)`` (``zip=1``) keeps the same
per-page header (pfn, generation, seed, check word) and the same guarantees
(whole-page verification, stale pages caught, the same ``sum``) but gives
every page the same 64-byte-periodic body: a rewrite changes 16 bytes
(xbzrle), and pages compress on their own and against each other
(zlib/zstd).  ``page_words(..., zip=True)`` is that format.

Standard library only.  Tests and the demo use it by putting this directory
on ``sys.path``::

    sys.path.insert(0, str(REPO / "tools" / "guest"))
    import testguest

    elf = testguest.build()
    argv = testguest.qemu_argv(elf, serial_socket=sock, mem_mib=128,
                               append=testguest.cmdline(wss_mib=16))
    ...
    with testguest.SerialReader(sock) as serial:
        serial.wait_for_boot(timeout=30)
        serial.wait_for(lambda r: r.counter > 3 and r.bad_pages == 0, timeout=30)

A second image, ``build(variant="disk")``, also writes a sector to its IDE
disk after every ``disk=N``-th report (see guest.S): the way to make a real
disk I/O error happen in the guest, e.g. with the image on a full file
system and ``error_policy='stop'``.  Its reports carry ``disk_writes`` and
``disk_errors``; everything else is the same as the default image, which
does not contain any of it.

The disk variant also runs a *verified write workload* when given
``dwrite=<KiB/s>`` (``cmdline(..., dwrite_kib_s=..., dsize_mib=...)``): it
writes 64 KiB blocks of self-describing sectors (LBA, generation, seed,
check word) by IDE bus-master DMA to a region of ``dsize`` MiB from LBA 65536
(32 MiB) at that rate, remembers in its RAM the generation it last wrote to
every block, and reads back every block just before overwriting it (so every
generation written is read back once, as late as possible) and in a sweep
paced by ``dverify``, counting every block that is not exactly what it last
wrote in ``dbad`` (must stay 0, e.g. across a migration with the storage
copied).  Once the writes have gone round the whole region after a
migration (``dwritten_kib`` grew by ``dsize`` MiB per disk), everything
written before it has been read back after it.  ``ide_disk_args()``
attaches an image as the IDE disk it uses, ``verify_disk_image()`` checks an image's region
from the host (every block never written or valid), ``disk_rates_kib_s()``
gives the write and read-back rates between two reports.  With
``ddisks=2`` it alternates between two disks (both IDE channels).

Run ``python3 tools/guest/testguest.py --help`` for a small CLI (build, run).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "DISK_BLOCK_SECTORS",
    "DISK_REGION_LBA",
    "LINE_PREFIX",
    "SOURCE_DIR",
    "BootInfo",
    "DiskImageCheck",
    "GdbStub",
    "GuestBuildError",
    "GuestError",
    "GuestFault",
    "Report",
    "SerialReader",
    "build",
    "cmdline",
    "dirty_rate_mib_s",
    "disk_rates_kib_s",
    "expected_static_sum",
    "ide_disk_args",
    "page_words",
    "parse_line",
    "qemu_argv",
    "sector_bytes",
    "sector_words",
    "verify_disk_image",
    "zip_body",
]

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("guest.S", "guest.ld")
# Image variants: extra assembler symbols (guest.S tests them with .ifdef).
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "disk": ("--defsym", "FERRY_DISK=1"),
}
LINE_PREFIX = "FERRY-GUEST "
PAGE_SIZE = 4096

# Must match guest.S.
_PAGE_MAGIC = 0x4741505952524546
_K_STEP = 0x9E3779B97F4A7C15
_MIX_A = 0x9E3779B97F4A7C15
_MIX_B = 0xC2B2AE3D27D4EB4F
_MIX_C = 0x165667B19E3779F9
_MIX_M1 = 0xBF58476D1CE4E5B9
_MIX_M2 = 0x94D049BB133111EB
_M64 = (1 << 64) - 1
_DISK_MAGIC = 0x4B53445952524546  # "FERRYDSK"
SECTOR_SIZE = 512
DISK_REGION_LBA = 65536  # the dwrite region starts here (32 MiB)
DISK_BLOCK_SECTORS = 128  # 64 KiB per block (one DMA command)
DISK_BLOCK_SIZE = DISK_BLOCK_SECTORS * SECTOR_SIZE
DSIZE_MAX_MIB = 4096


class GuestError(RuntimeError):
    """Base class of the errors raised here."""


class GuestBuildError(GuestError):
    """The guest could not be assembled or linked."""


class GuestFault(GuestError):
    """The guest printed a fault line (CPU exception or no usable memory)."""


# --------------------------------------------------------------------------
# build


def _source_digest(variant: str = "default") -> str:
    h = hashlib.sha256()
    if variant != "default":
        h.update(f"variant={variant}".encode() + b"\0")
    for name in SOURCES:
        h.update(name.encode() + b"\0")
        h.update((SOURCE_DIR / name).read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(
            f"GNU {name!r} not found on PATH: the test guest is built with GNU as and ld "
            "(Debian/Ubuntu package 'binutils')"
        )
    return path


def build(out_dir: Path | None = None, *, variant: str = "default") -> Path:
    """Assemble and link the guest; return the path of ``guest.elf``.

    ``variant`` picks the image (see ``VARIANTS``): ``"disk"`` adds the IDE
    sector writes of the ``disk=`` option; other variants get their own
    default directory.

    The default output directory is ``/tmp/ferry-guest-<hash of the sources>``
    (under ``tempfile.gettempdir()``), so a build happens once per source
    version and concurrent callers are safe: each links into a private
    temporary file and renames it into place.  An existing image in the output
    directory is reused only if it was built from the same sources.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown guest variant {variant!r} (known: {', '.join(VARIANTS)})")
    digest = _source_digest(variant)
    if out_dir is None:
        suffix = "" if variant == "default" else f"-{variant}"
        out_dir = Path(tempfile.gettempdir()) / f"ferry-guest-{digest}{suffix}"
    out_dir = Path(out_dir)
    elf = out_dir / "guest.elf"
    stamp = out_dir / "guest.elf.sources"
    with contextlib.suppress(OSError):
        if elf.is_file() and stamp.read_text().strip() == digest:
            return elf

    as_path, ld_path = _tool("as"), _tool("ld")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        obj = Path(tmp) / "guest.o"
        tmp_elf = Path(tmp) / "guest.elf"
        steps: list[list[str]] = [
            [as_path, "--64", *VARIANTS[variant], "-o", str(obj), str(SOURCE_DIR / "guest.S")],
            [
                ld_path,
                "-m",
                "elf_x86_64",
                "-T",
                str(SOURCE_DIR / "guest.ld"),
                "-z",
                "max-page-size=0x1000",
                "--build-id=none",
                "-o",
                str(tmp_elf),
                str(obj),
            ],
        ]
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise GuestBuildError(
                    f"{' '.join(argv)} failed (exit {proc.returncode}):\n"
                    f"{proc.stderr.strip() or proc.stdout.strip()}"
                )
        _check_image(tmp_elf.read_bytes())
        os.replace(tmp_elf, elf)
    stamp_tmp = out_dir / f".sources.{os.getpid()}.{threading.get_ident()}"
    stamp_tmp.write_text(digest + "\n")
    os.replace(stamp_tmp, stamp)
    return elf


def _check_image(data: bytes) -> None:
    if data[:5] != b"\x7fELF\x01":
        raise GuestBuildError("linker did not produce a 32-bit ELF (qemu's multiboot needs one)")
    head = data[:8192]
    for off in range(0, len(head) - 12, 4):
        magic, flags, check = (
            int.from_bytes(head[off + i : off + i + 4], "little") for i in (0, 4, 8)
        )
        if magic == 0x1BADB002 and (magic + flags + check) & 0xFFFFFFFF == 0:
            return
    raise GuestBuildError("no multiboot header in the first 8 KiB of the image")


def cmdline(
    *,
    wss_mib: int,
    rate_mib_s: int = 0,
    report_ms: int = 200,
    seed: int = 1,
    zip: bool = False,
    disk_every: int = 0,
    dwrite_kib_s: int = 0,
    dsize_mib: int = 16,
    dverify_kib_s: int | None = None,
    ddisks: int = 1,
) -> str:
    """The ``-append`` string: working set (MiB), rewrite rate (MiB/s, 0 = as
    fast as possible), report period (ms), pattern seed and, with ``zip``,
    compressible pages (``zip=1``; left out when off so that the default
    command line is the one the guest has always had).

    Disk variant only (the default image ignores them): ``disk_every``, a
    sector write after every n-th report (``disk=``); ``dwrite_kib_s``, the
    verified write workload's rate (``dwrite=``, 0 = off), ``dsize_mib`` its
    region (``dsize=``, 1 .. 4096; the disk needs 32 + dsize MiB) and
    ``dverify_kib_s`` the rate of the verify sweep (``dverify=``, None = a
    quarter of the write rate, 0 = no sweep; every block is also read back
    just before it is overwritten), all totals over ``ddisks`` disks
    (``ddisks=``: 1, or 2 = the masters of both IDE channels, written
    alternately; see ``ide_disk_args``).  Each is left out at its default."""
    for name, value in (
        ("wss_mib", wss_mib),
        ("rate_mib_s", rate_mib_s),
        ("report_ms", report_ms),
        ("seed", seed),
        ("disk_every", disk_every),
        ("dwrite_kib_s", dwrite_kib_s),
        ("dsize_mib", dsize_mib),
        ("dverify_kib_s", 0 if dverify_kib_s is None else dverify_kib_s),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, not {value!r}")
    if report_ms < 10:
        raise ValueError("report_ms must be at least 10")
    if not isinstance(zip, bool):
        raise ValueError(f"zip must be a bool, not {zip!r}")
    if not 1 <= dsize_mib <= DSIZE_MAX_MIB:
        raise ValueError(f"dsize_mib must be 1 .. {DSIZE_MAX_MIB}, not {dsize_mib}")
    tail = " zip=1" if zip else ""
    if disk_every:
        tail += f" disk={disk_every}"
    if dwrite_kib_s:
        tail += f" dwrite={dwrite_kib_s}"
    if dsize_mib != 16:
        tail += f" dsize={dsize_mib}"
    if dverify_kib_s is not None:
        tail += f" dverify={dverify_kib_s}"
    if ddisks not in (1, 2):
        raise ValueError(f"ddisks must be 1 or 2, not {ddisks!r}")
    if ddisks != 1:
        tail += f" ddisks={ddisks}"
    return f"wss={wss_mib} rate={rate_mib_s} report={report_ms} seed={seed}{tail}"


def ide_disk_args(
    image: str | os.PathLike[str], *, fmt: str = "raw", cache: str = "none", disk: int = 0
) -> list[str]:
    """qemu arguments attaching ``image`` as disk ``disk`` of the disk
    variant: 0 is the master on the primary IDE channel of the ``pc``
    machine (the one ``disk=`` and ``dwrite=`` use), 1 the master on the
    secondary channel (``ddisks=2``); the machine's PIIX IDE does the
    bus-master DMA.  ``cache=none`` (O_DIRECT) makes the guest's reads come
    from the file, so a change made from the host is seen."""
    if disk not in (0, 1):
        raise ValueError(f"disk must be 0 or 1, not {disk!r}")
    return [
        "-drive",
        f"file={os.fspath(image)},format={fmt},if=none,id=ferry-d{disk},cache={cache}",
        "-device",
        f"ide-hd,drive=ferry-d{disk},bus=ide.{disk},unit=0",
    ]


def qemu_argv(
    kernel: Path,
    *,
    serial_socket: str | os.PathLike[str],
    mem_mib: int = 128,
    append: str | None = None,
    accel: str = "kvm",
    qemu: str = "qemu-system-x86_64",
    extra: Sequence[str] = (),
) -> list[str]:
    """A qemu argv running the guest with COM1 on a unix socket (qemu is the
    server and does not wait for a client)."""
    return [
        qemu,
        "-accel",
        accel,
        "-m",
        str(mem_mib),
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-kernel",
        str(kernel),
        "-append",
        append if append is not None else cmdline(wss_mib=16),
        "-chardev",
        f"socket,id=serial0,path={os.fspath(serial_socket)},server=on,wait=off",
        "-serial",
        "chardev:serial0",
        *extra,
    ]


# --------------------------------------------------------------------------
# page format and checksums (mirrors guest.S)


def _mix(pfn: int, gen: int, seed: int) -> int:
    z = (pfn * _MIX_A + gen * _MIX_B + seed * _MIX_C) & _M64
    z ^= z >> 30
    z = (z * _MIX_M1) & _M64
    z ^= z >> 27
    z = (z * _MIX_M2) & _M64
    z ^= z >> 31
    return z


def zip_body(seed: int) -> list[int]:
    """Zip mode: the 8 quadwords Z[0..7] whose repetition is every page's
    body (``q[i] = Z[i & 7]`` for i >= 4).  Generation 2**64 - 1, never
    written, keeps them apart from any page's check word."""
    return [_mix(k, _M64, seed) for k in range(8)]


def page_words(pfn: int, generation: int, seed: int, *, zip: bool = False) -> list[int]:
    """The 512 quadwords of page ``pfn`` at ``generation``, as the guest
    writes them (in zip mode if ``zip``: same header, constant body)."""
    c = _mix(pfn, generation, seed)
    head = [pfn, generation, _PAGE_MAGIC ^ seed, c]
    if zip:
        body = zip_body(seed)
        return head + [body[i & 7] for i in range(4, 512)]
    return head + [(c + i * _K_STEP) & _M64 for i in range(4, 512)]


def page_bytes(pfn: int, generation: int, seed: int, *, zip: bool = False) -> bytes:
    """``page_words`` as the 4096 bytes in guest memory."""
    return b"".join(w.to_bytes(8, "little") for w in page_words(pfn, generation, seed, zip=zip))


def expected_static_sum(boot: BootInfo) -> int:
    """The ``sum`` a healthy guest reports once a sweep has completed: XOR of
    the check word of every page outside the working set (generation 0).
    The same in zip mode: the header is."""
    acc = 0
    start = boot.first_pfn + boot.wss_pages
    for pfn in range(start, boot.first_pfn + boot.pages):
        acc ^= _mix(pfn, 0, boot.seed)
    return acc


# --------------------------------------------------------------------------
# serial lines


@dataclass(frozen=True)
class Report:
    """One periodic status line."""

    counter: int  # reports since boot; never resets unless the guest reboots
    generation: int  # page rewrites since boot ("gen")
    dirtied_mib: int  # generation * 4 KiB, in MiB
    verified_pages: int  # page verifications since boot
    bad_pages: int  # failed page verifications since boot (must stay 0)
    checksum: int  # "sum": XOR of check words of the static pages, last full sweep
    raw: str
    mem_mib: int = 0  # guest RAM as the guest sees it
    guest_ms: int = 0  # guest time (TSC) since ring-3 entry
    sweeps: int = 0  # completed verification sweeps over all pages
    last_bad: int = 0  # pfn of the last bad page, 0 if none
    host_time: float = 0.0  # time.monotonic() when the line was read
    disk_writes: int = 0  # disk variant: sectors written successfully
    disk_errors: int = 0  # disk variant: writes that failed (ERR/DF or no drive)
    disk_last_err: int = 0  # disk variant: ATA status of the last failed write (256: no drive)
    # disk variant, dwrite workload (all 0 when off):
    dwritten_kib: int = 0  # KiB written by completed WRITE DMA commands
    dverified_kib: int = 0  # KiB read back and checked (before overwrites and by the sweep)
    dbad: int = 0  # bad blocks found by the verify sweep (must stay 0)
    dlast_bad_lba: int = 0  # first bad sector of the last bad block
    dlast_bad_disk: int = 0  # and its disk (0 primary, 1 secondary master)
    dsweeps: int = 0  # wraps of the verify sweep over the region
    derrors: int = 0  # failed DMA commands
    dlast_err: int = 0  # ATA status | BMIDE status << 8; 65536 no drive, 131072 no controller


@dataclass(frozen=True)
class BootInfo:
    """The boot line."""

    mem_mib: int
    wss_mib: int
    rate_mib_s: int
    report_ms: int
    seed: int
    tsc_khz: int
    tsc_source: str  # "pit", "cpuid" or "default" (calibration failed)
    first_pfn: int  # first page of the test region
    pages: int  # pages in the test region
    wss_pages: int  # pages in the working set
    raw: str
    tsc_err_ppm: int = 0  # calibration uncertainty, parts per million
    host_time: float = 0.0
    disk_every: int = 0  # disk variant: a sector write every this many reports
    zip: bool = False  # zip mode: compressible pages (guests before it print no zip=)
    dwrite_kib_s: int = 0  # disk variant: write rate of the dwrite workload (0: off)
    dverify_kib_s: int = 0  # disk variant: verify sweep rate (0: no sweep)
    dsize_mib: int = 0  # disk variant: size of the dwrite region
    ddisks: int = 0  # disk variant: disks the dwrite workload uses (1 or 2)
    dbmide: int = 0  # disk variant: bus-master I/O port found (0: no IDE controller)
    dlba: int = 0  # disk variant: first LBA of the dwrite region


_KV = re.compile(r"(\w+)=(\S+)")


def _fields(text: str) -> dict[str, str]:
    return dict(_KV.findall(text))


def parse_line(line: str, host_time: float = 0.0) -> Report | BootInfo | str | None:
    """Parse one serial line: a Report, a BootInfo, the text of a fault line
    (a ``str``), or None for anything else (including partial lines)."""
    line = line.strip().replace("\x00", "")
    if not line.startswith(LINE_PREFIX):
        return None
    rest = line[len(LINE_PREFIX) :]
    try:
        if rest.startswith("fault"):
            return line
        f = _fields(rest)
        if rest.startswith("boot "):
            return BootInfo(
                mem_mib=int(f["mem_mib"]),
                wss_mib=int(f["wss"]),
                rate_mib_s=int(f["rate"]),
                report_ms=int(f["report"]),
                seed=int(f["seed"]),
                tsc_khz=int(f["tsc_khz"]),
                tsc_source=f["tsc_src"],
                first_pfn=int(f["first_pfn"]),
                pages=int(f["pages"]),
                wss_pages=int(f["wss_pages"]),
                raw=line,
                tsc_err_ppm=int(f.get("tsc_err_ppm", "0")),
                host_time=host_time,
                disk_every=int(f.get("disk", "0")),
                zip=int(f.get("zip", "0")) != 0,
                dwrite_kib_s=int(f.get("dwrite", "0")),
                dverify_kib_s=int(f.get("dverify", "0")),
                dsize_mib=int(f.get("dsize", "0")),
                ddisks=int(f.get("ddisks", "0")),
                dbmide=int(f.get("dbmide", "0")),
                dlba=int(f.get("dlba", "0")),
            )
        if rest.startswith("counter="):
            return Report(
                counter=int(f["counter"]),
                generation=int(f["gen"]),
                dirtied_mib=int(f["dirtied_mib"]),
                verified_pages=int(f["verified"]),
                bad_pages=int(f["bad"]),
                checksum=int(f["sum"], 16),
                raw=line,
                mem_mib=int(f.get("mem_mib", "0")),
                guest_ms=int(f.get("ms", "0")),
                sweeps=int(f.get("sweeps", "0")),
                last_bad=int(f.get("last_bad", "0")),
                host_time=host_time,
                disk_writes=int(f.get("disk_writes", "0")),
                disk_errors=int(f.get("disk_errors", "0")),
                disk_last_err=int(f.get("disk_last_err", "0")),
                dwritten_kib=int(f.get("dwritten_kib", "0")),
                dverified_kib=int(f.get("dverified_kib", "0")),
                dbad=int(f.get("dbad", "0")),
                dlast_bad_lba=int(f.get("dlast_bad_lba", "0")),
                dlast_bad_disk=int(f.get("dlast_bad_disk", "0")),
                dsweeps=int(f.get("dsweeps", "0")),
                derrors=int(f.get("derrors", "0")),
                dlast_err=int(f.get("dlast_err", "0")),
            )
    except (KeyError, ValueError):
        return None  # truncated or garbled line
    return None


def dirty_rate_mib_s(first: Report, last: Report) -> float:
    """Rewrite rate between two reports, by the guest's clock (MiB/s)."""
    ms = last.guest_ms - first.guest_ms
    if ms <= 0:
        raise ValueError("reports must be in order and at least 1 ms apart")
    return (last.generation - first.generation) * PAGE_SIZE / (1 << 20) / (ms / 1000.0)


def disk_rates_kib_s(first: Report, last: Report) -> tuple[float, float]:
    """Disk variant: (write, read-back) rates of the dwrite workload between
    two reports, by the guest's clock (KiB/s)."""
    ms = last.guest_ms - first.guest_ms
    if ms <= 0:
        raise ValueError("reports must be in order and at least 1 ms apart")
    s = ms / 1000.0
    return (
        (last.dwritten_kib - first.dwritten_kib) / s,
        (last.dverified_kib - first.dverified_kib) / s,
    )


# --------------------------------------------------------------------------
# disk sector format (mirrors guest.S, disk variant)


def sector_words(lba: int, generation: int, seed: int) -> list[int]:
    """The 64 quadwords of sector ``lba`` written with ``generation``."""
    c = _mix(lba, generation, seed)
    return [lba, generation, _DISK_MAGIC ^ seed, c] + [
        (c + i * _K_STEP) & _M64 for i in range(4, 64)
    ]


def sector_bytes(lba: int, generation: int, seed: int) -> bytes:
    """``sector_words`` as the 512 bytes on the disk."""
    return struct.pack("<64Q", *sector_words(lba, generation, seed))


@dataclass(frozen=True)
class DiskImageCheck:
    """What ``verify_disk_image`` found in the dwrite region of an image."""

    blocks: int  # blocks in the region
    generations: dict[int, int]  # block -> generation, for every valid written block
    unwritten: int  # blocks that are all zeros (never written)
    bad: dict[int, str]  # block -> why it is not valid

    @property
    def ok(self) -> bool:
        """No bad block."""
        return not self.bad

    @property
    def written(self) -> int:
        return len(self.generations)

    @property
    def max_generation(self) -> int:
        """The newest generation on the disk (the number of writes the guest
        had completed when it was written, if nothing is missing)."""
        return max(self.generations.values(), default=0)


def _check_block(data: bytes, first_lba: int, seed: int) -> tuple[int, str]:
    """(generation, "") for a valid block, (0, "") for an all-zero one, else
    (0, reason)."""
    if not any(data):
        return 0, ""
    gen = struct.unpack_from("<Q", data, 8)[0]
    if gen == 0:
        return 0, f"sector {first_lba}: generation 0 (never written) in a non-zero block"
    for i in range(DISK_BLOCK_SECTORS):
        lba = first_lba + i
        got = data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]
        want = sector_bytes(lba, gen, seed)
        if got != want:
            head = struct.unpack_from("<4Q", got)
            if head[:2] != (lba, gen):
                return 0, (
                    f"sector {lba}: expected lba={lba} gen={gen} (the block's first sector), "
                    f"found lba={head[0]} gen={head[1]}"
                )
            at = next(i for i in range(SECTOR_SIZE) if got[i] != want[i])
            return 0, f"sector {lba} (gen={gen}): byte {at} differs (corrupted)"
    return gen, ""


def verify_disk_image(
    path: str | os.PathLike[str],
    *,
    seed: int = 1,
    dsize_mib: int = 16,
    fmt: str = "raw",
    force_share: bool = False,
) -> DiskImageCheck:
    """Check the dwrite region of a disk image on its own: every 64 KiB block
    must be all zeros (never written) or 128 valid sectors (LBA, magic, check
    word, body) of one generation, and no two blocks may hold the same
    generation (each write has a new one).  ``fmt`` other than ``raw`` is
    read through ``qemu-img convert`` (``force_share``: ``-U``, to read an
    image a running qemu has open).  Says nothing about *which* generation a
    block should hold: that is what the guest's own sweep (``dbad``) checks."""
    if not 1 <= dsize_mib <= DSIZE_MAX_MIB:
        raise ValueError(f"dsize_mib must be 1 .. {DSIZE_MAX_MIB}, not {dsize_mib}")
    nblocks = dsize_mib * 16
    start = DISK_REGION_LBA * SECTOR_SIZE
    with contextlib.ExitStack() as stack:
        raw = Path(path)
        if fmt != "raw":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ferry-disk-")))
            raw = tmp / "image.raw"
            argv = [_qemu_img(), "convert", "-f", fmt, "-O", "raw"]
            if force_share:
                argv.append("-U")
            proc = subprocess.run(
                [*argv, os.fspath(path), str(raw)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise GuestError(f"{' '.join(argv)} {path} failed: {proc.stderr.strip()}")
        with raw.open("rb") as f:
            f.seek(start)
            region = f.read(nblocks * DISK_BLOCK_SIZE)
    region = region.ljust(nblocks * DISK_BLOCK_SIZE, b"\0")  # past the end: never written
    generations: dict[int, int] = {}
    owner: dict[int, int] = {}
    bad: dict[int, str] = {}
    unwritten = 0
    for b in range(nblocks):
        data = region[b * DISK_BLOCK_SIZE : (b + 1) * DISK_BLOCK_SIZE]
        gen, why = _check_block(data, DISK_REGION_LBA + b * DISK_BLOCK_SECTORS, seed)
        if why:
            bad[b] = why
        elif gen == 0:
            unwritten += 1
        elif gen in owner:
            bad[b] = f"generation {gen} also in block {owner[gen]} (each write has its own)"
        else:
            owner[gen] = b
            generations[b] = gen
    return DiskImageCheck(blocks=nblocks, generations=generations, unwritten=unwritten, bad=bad)


def _qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise GuestError("qemu-img not found on PATH (Debian package 'qemu-utils')")
    return path


class SerialReader:
    """Reads the guest's COM1 from qemu's unix socket in a background thread.

    qemu must run the socket as server without waiting
    (``-chardev socket,id=serial0,path=P,server=on,wait=off -serial chardev:serial0``).
    The reader connects when the socket appears, reconnects if the connection
    drops, and can be pointed at another socket (``reconnect(path)``), e.g.
    the destination qemu after a migration.  Reading continuously also keeps
    qemu's socket drained, so the guest never waits for the host.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, history: int = 100_000, keep_lines: int = 2000
    ) -> None:
        self._path = os.fspath(path)
        self._cond = threading.Condition()
        self._reports: collections.deque[tuple[int, Report]] = collections.deque(maxlen=history)
        self._lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self._seq = 0
        self._boots: list[BootInfo] = []
        self._faults: list[str] = []
        self._faulted = False  # a fault line since the last boot line
        self._closed = False
        self._connected = False
        self._connects = 0
        self._last_error: str | None = None
        self._sock: socket.socket | None = None
        self._switch = False
        self._thread = threading.Thread(target=self._run, name=f"serial:{self._path}", daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def boot(self) -> BootInfo | None:
        """The most recent boot line."""
        with self._cond:
            return self._boots[-1] if self._boots else None

    @property
    def boot_count(self) -> int:
        """Boot lines seen; more than one means the guest rebooted."""
        with self._cond:
            return len(self._boots)

    @property
    def fault(self) -> str | None:
        with self._cond:
            return self._faults[-1] if self._faults else None

    def latest(self) -> Report | None:
        with self._cond:
            return self._reports[-1][1] if self._reports else None

    def reports(self) -> list[Report]:
        with self._cond:
            return [r for _, r in self._reports]

    def lines(self) -> list[str]:
        """The last raw lines read (for diagnostics)."""
        with self._cond:
            return list(self._lines)

    def wait_for_boot(self, timeout: float) -> BootInfo:
        """Wait for a boot line (returns at once if one was seen already)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._boots:
                self._check_waitable()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._timeout_message("the boot line", timeout))
                self._cond.wait(min(left, 0.5))
            return self._boots[-1]

    def wait_for(
        self, predicate: Callable[[Report], bool], timeout: float, *, fresh: bool = False
    ) -> Report:
        """Return the first report, from the latest one on (or only reports
        arriving after this call if ``fresh``), for which ``predicate`` holds.
        Raises TimeoutError, or GuestFault once the guest has printed a fault
        line since its last boot line (it will not report again)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            next_seq = self._seq + 1 if fresh or not self._reports else self._reports[-1][0]
            while True:
                if self._reports:
                    # sequence numbers are contiguous within the deque
                    start = max(0, next_seq - self._reports[0][0])
                    for i in range(start, len(self._reports)):
                        seq, report = self._reports[i]
                        next_seq = seq + 1
                        if predicate(report):
                            return report
                if self._faulted:
                    raise GuestFault(self._faults[-1])
                self._check_waitable()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._timeout_message("matching report", timeout))
                self._cond.wait(min(left, 0.5))

    def reconnect(self, path: str | os.PathLike[str] | None = None) -> None:
        """Drop the current connection and connect again, to ``path`` if given."""
        with self._cond:
            if path is not None:
                self._path = os.fspath(path)
            self._switch = True
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            sock = self._sock
            self._cond.notify_all()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def __enter__(self) -> SerialReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -----------------------------------------------------------

    def _check_waitable(self) -> None:
        if self._closed:
            raise GuestError("SerialReader is closed")

    def _timeout_message(self, what: str, timeout: float) -> str:
        state = "connected" if self._connected else f"not connected ({self._last_error})"
        tail = "\n".join(list(self._lines)[-5:]) or "(nothing read)"
        return f"no {what} within {timeout:.1f}s on {self._path} [{state}]; last lines:\n{tail}"

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                path = self._path
                self._switch = False
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)
                sock.connect(path)
            except OSError as e:
                sock.close()
                with self._cond:
                    self._last_error = f"{type(e).__name__}: {e}"
                    self._cond.wait(0.05)
                continue
            with self._cond:
                self._sock = sock
                self._connected = True
                self._connects += 1
                self._cond.notify_all()
            try:
                self._read(sock)
            finally:
                with self._cond:
                    self._sock = None
                    self._connected = False
                    self._cond.notify_all()
                sock.close()

    def _read(self, sock: socket.socket) -> None:
        buf = b""
        sock.settimeout(0.2)
        while True:
            with self._cond:
                if self._closed or self._switch:
                    return
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as e:
                with self._cond:
                    self._last_error = f"{type(e).__name__}: {e}"
                return
            if not chunk:
                with self._cond:
                    self._last_error = "connection closed by qemu"
                return
            buf += chunk
            *complete, buf = buf.split(b"\n")
            if len(buf) > 65536:  # no newline for far too long: not our guest
                buf = b""
            if complete:
                now = time.monotonic()
                self._handle([c.decode("ascii", "replace") for c in complete], now)

    def _handle(self, lines: list[str], now: float) -> None:
        with self._cond:
            for text in lines:
                text = text.rstrip("\r")
                self._lines.append(text)
                item = parse_line(text, now)
                if isinstance(item, Report):
                    self._seq += 1
                    self._reports.append((self._seq, item))
                elif isinstance(item, BootInfo):
                    self._boots.append(item)
                    self._faulted = False
                elif isinstance(item, str):
                    self._faults.append(item)
                    self._faulted = True
            self._cond.notify_all()


# --------------------------------------------------------------------------
# fault injection through qemu's gdbstub


class GdbStub:
    """A minimal GDB remote-protocol client for qemu's gdbstub, enough to
    pause the guest and read or write its memory (fault injection: qemu 7.2
    has no QMP/HMP command that writes guest memory).

    qemu: ``-chardev socket,id=gdb0,path=P,server=on,wait=off -gdb chardev:gdb0``.
    qemu stops the VM when the debugger connects; ``detach()`` resumes it.
    Addresses are guest-virtual; the test guest maps memory 1:1.
    """

    _CHUNK = 1024  # bytes per m/M packet (qemu's packet buffer is 4 KiB)

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(os.fspath(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise
                time.sleep(0.05)
        self._buf = b""
        self.halt_reason = self._command("?")

    def read(self, addr: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            n = min(length, self._CHUNK)
            reply = self._command(f"m{addr:x},{n:x}")
            if reply.startswith("E") or len(reply) != 2 * n:
                raise GuestError(f"gdbstub could not read {n} bytes at {addr:#x}: {reply!r}")
            out += bytes.fromhex(reply)
            addr += n
            length -= n
        return bytes(out)

    def write(self, addr: int, data: bytes) -> None:
        for off in range(0, len(data), self._CHUNK):
            part = data[off : off + self._CHUNK]
            reply = self._command(f"M{addr + off:x},{len(part):x}:{part.hex()}")
            if reply != "OK":
                raise GuestError(f"gdbstub could not write at {addr + off:#x}: {reply!r}")

    def detach(self) -> None:
        """Detach; qemu resumes the guest."""
        with contextlib.suppress(GuestError, OSError):
            self._command("D")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _command(self, payload: str) -> str:
        data = payload.encode()
        packet = b"$" + data + b"#" + f"{sum(data) & 0xFF:02x}".encode()
        for _ in range(3):
            self._sock.sendall(packet)
            ack = self._recv_byte_skipping_noise()
            if ack == b"+":
                break
        else:
            raise GuestError(f"gdbstub did not acknowledge {payload[:20]!r}")
        reply = self._recv_packet()
        self._sock.sendall(b"+")
        return reply

    def _recv_byte_skipping_noise(self) -> bytes:
        while True:
            b = self._take(1)
            if b in (b"+", b"-"):
                return b

    def _recv_packet(self) -> str:
        while self._take(1) != b"$":
            pass
        body = bytearray()
        while True:
            b = self._take(1)
            if b == b"#":
                break
            body += b
        self._take(2)  # checksum; the transport is reliable
        return body.decode("ascii", "replace")

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise GuestError("gdbstub closed the connection")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


# --------------------------------------------------------------------------
# CLI


@contextlib.contextmanager
def _running_qemu(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _newer_than(counter: int) -> Callable[[Report], bool]:
    return lambda r: r.counter > counter


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="testguest", description=(__doc__ or "").split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest and print the path of guest.elf")
    b.add_argument("--out-dir", type=Path)
    r = sub.add_parser("run", help="boot the guest under qemu and print its serial lines")
    r.add_argument("--accel", default="kvm", choices=["kvm", "tcg"])
    r.add_argument("--mem", type=int, default=128, help="guest RAM, MiB")
    r.add_argument("--wss", type=int, default=16)
    r.add_argument("--rate", type=int, default=0)
    r.add_argument("--report", type=int, default=200)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--seconds", type=float, default=5.0)
    r.add_argument(
        "--zip", action="store_true", help="compressible pages (zip=1: constant page bodies)"
    )
    r.add_argument(
        "--disk",
        type=Path,
        help="disk image on the primary IDE master (boots the disk variant; needs "
        "32 + dsize MiB for --dwrite)",
    )
    r.add_argument("--disk-format", default="raw")
    r.add_argument("--dwrite", type=int, default=0, help="verified disk writes, KiB/s (0: off)")
    r.add_argument("--dsize", type=int, default=16, help="dwrite region, MiB")
    r.add_argument(
        "--dverify", type=int, help="verify sweep rate, KiB/s (default: --dwrite / 4; 0: none)"
    )
    v = sub.add_parser(
        "verify-disk", help="check the dwrite region of a disk image (exit 1 if a block is bad)"
    )
    v.add_argument("image", type=Path)
    v.add_argument("--format", default="raw")
    v.add_argument("--dsize", type=int, default=16)
    v.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    if args.cmd == "verify-disk":
        check = verify_disk_image(
            args.image, seed=args.seed, dsize_mib=args.dsize, fmt=args.format, force_share=True
        )
        print(
            f"{check.blocks} blocks: {check.written} written (newest generation "
            f"{check.max_generation}), {check.unwritten} never written, {len(check.bad)} bad"
        )
        for block, why in sorted(check.bad.items()):
            print(f"  block {block}: {why}")
        return 0 if check.ok else 1
    variant = "disk" if args.cmd == "run" and args.disk is not None else "default"
    elf = build(args.out_dir if args.cmd == "build" else None, variant=variant)
    if args.cmd == "build":
        print(elf)
        return 0
    with tempfile.TemporaryDirectory(prefix="ferry-guest-run-") as tmp:
        sock = Path(tmp) / "serial.sock"
        qargv = qemu_argv(
            elf,
            serial_socket=sock,
            mem_mib=args.mem,
            accel=args.accel,
            append=cmdline(
                wss_mib=args.wss,
                rate_mib_s=args.rate,
                report_ms=args.report,
                seed=args.seed,
                zip=args.zip,
                dwrite_kib_s=args.dwrite,
                dsize_mib=args.dsize,
                dverify_kib_s=args.dverify,
            ),
            extra=[
                "-no-reboot",
                *(ide_disk_args(args.disk, fmt=args.disk_format) if args.disk else []),
            ],
        )
        t0 = time.monotonic()
        with _running_qemu(qargv) as proc, SerialReader(sock) as serial:
            boot = serial.wait_for_boot(timeout=60)
            print(f"[{boot.host_time - t0:6.2f}s] {boot.raw}")
            first: Report | None = None
            seen = 0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end and proc.poll() is None:
                try:
                    rep = serial.wait_for(_newer_than(seen), timeout=end - time.monotonic())
                except TimeoutError:
                    break
                seen = rep.counter
                first = first or rep
                print(f"[{rep.host_time - t0:6.2f}s] {rep.raw}")
            last = serial.latest()
            if first is not None and last is not None and last.guest_ms > first.guest_ms:
                print(
                    f"dirty rate {dirty_rate_mib_s(first, last):.0f} MiB/s "
                    f"(guest clock), first report {first.host_time - t0:.2f}s after start"
                )
                if args.dwrite:
                    w, rb = disk_rates_kib_s(first, last)
                    print(
                        f"disk writes {w:.0f} KiB/s, read-back {rb:.0f} KiB/s, "
                        f"dbad={last.dbad} derrors={last.derrors}"
                    )
            if last is not None and last.sweeps >= 1:
                want = expected_static_sum(boot)
                verdict = "ok" if last.checksum == want else f"WRONG (expected {want:016x})"
                print(f"bad={last.bad_pages} sum={last.checksum:016x} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
