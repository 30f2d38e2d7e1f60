"""The test guest's verified disk workload, host side (tools/guest/testguest.py):
the command line, the report and boot fields, the sector format and
verify_disk_image on images built here (raw and qcow2), including every way a
block can be wrong.  The guest itself is exercised in
tests/e2e/test_guest_disk.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "guest"))

import testguest  # noqa: E402
from testguest import BootInfo, Report  # noqa: E402

BLOCK = testguest.DISK_BLOCK_SECTORS * 512
REGION = testguest.DISK_REGION_LBA * 512


def test_cmdline_disk_options() -> None:
    plain = testguest.cmdline(wss_mib=16)
    assert plain == "wss=16 rate=0 report=200 seed=1"  # unchanged by the new options
    assert testguest.cmdline(wss_mib=4, disk_every=2) == "wss=4 rate=0 report=200 seed=1 disk=2"
    assert (
        testguest.cmdline(wss_mib=4, dwrite_kib_s=20480, dsize_mib=64, dverify_kib_s=0)
        == "wss=4 rate=0 report=200 seed=1 dwrite=20480 dsize=64 dverify=0"
    )
    assert testguest.cmdline(wss_mib=4, dwrite_kib_s=1024).endswith(" dwrite=1024")
    assert testguest.cmdline(wss_mib=4, dwrite_kib_s=1024, ddisks=2).endswith(" ddisks=2")
    for bad in (
        {"dwrite_kib_s": -1},
        {"dsize_mib": 0},
        {"dsize_mib": 4097},
        {"disk_every": True},
        {"ddisks": 3},
    ):
        with pytest.raises(ValueError):
            testguest.cmdline(wss_mib=4, **bad)


def test_ide_disk_args() -> None:
    assert testguest.ide_disk_args("/i/a.img") == [
        "-drive",
        "file=/i/a.img,format=raw,if=none,id=ferry-d0,cache=none",
        "-device",
        "ide-hd,drive=ferry-d0,bus=ide.0,unit=0",
    ]
    second = testguest.ide_disk_args(Path("/i/b.qcow2"), fmt="qcow2", cache="writeback", disk=1)
    assert second[1] == "file=/i/b.qcow2,format=qcow2,if=none,id=ferry-d1,cache=writeback"
    assert second[3] == "ide-hd,drive=ferry-d1,bus=ide.1,unit=0"
    with pytest.raises(ValueError):
        testguest.ide_disk_args("/i/c.img", disk=2)


BOOT = (
    "FERRY-GUEST boot mem_mib=64 wss=4 rate=0 report=500 seed=1 tsc_khz=2099967 tsc_src=pit "
    "tsc_err_ppm=193 first_pfn=306 pages=16046 wss_pages=1024 zip=0 disk=0 dwrite=20480 "
    "dverify=5120 dsize=16 ddisks=2 dbmide=49152 dlba=65536"
)
REPORT = (
    "FERRY-GUEST counter=5 gen=1 dirtied_mib=0 verified=9 bad=0 sum=019333046a87b697 "
    "mem_mib=64 ms=5685 sweeps=46 last_bad=0 disk_writes=0 disk_errors=0 disk_last_err=0 "
    "dwritten_kib=110528 dverified_kib=82304 dbad=2 dlast_bad_lba=65664 dlast_bad_disk=1 "
    "dsweeps=5 derrors=1 "
    "dlast_err=81"
)


def test_parse_disk_fields() -> None:
    boot = testguest.parse_line(BOOT)
    assert isinstance(boot, BootInfo)
    assert (boot.dwrite_kib_s, boot.dverify_kib_s, boot.dsize_mib) == (20480, 5120, 16)
    assert boot.ddisks == 2
    assert (boot.dbmide, boot.dlba) == (0xC000, testguest.DISK_REGION_LBA)
    rep = testguest.parse_line(REPORT)
    assert isinstance(rep, Report)
    assert (rep.dwritten_kib, rep.dverified_kib, rep.dbad, rep.dlast_bad_lba) == (
        110528,
        82304,
        2,
        65664,
    )
    assert (rep.dlast_bad_disk, rep.dsweeps, rep.derrors, rep.dlast_err) == (1, 5, 1, 81)
    # lines without the fields (default image, older guests) read as zeros
    old = testguest.parse_line(REPORT.split(" disk_writes=")[0])
    assert isinstance(old, Report) and (old.dwritten_kib, old.dbad) == (0, 0)


def test_disk_rates() -> None:
    a = testguest.parse_line(REPORT)
    assert isinstance(a, Report)
    b = testguest.parse_line(
        REPORT.replace("ms=5685", "ms=7685")
        .replace("dwritten_kib=110528", "dwritten_kib=151488")
        .replace("dverified_kib=82304", "dverified_kib=92544")
    )
    assert isinstance(b, Report)
    assert testguest.disk_rates_kib_s(a, b) == pytest.approx((20480.0, 5120.0))
    with pytest.raises(ValueError):
        testguest.disk_rates_kib_s(b, a)


def test_sector_format() -> None:
    words = testguest.sector_words(65536 + 7, 42, 3)
    assert len(words) == 64 and words[:3] == [65543, 42, 0x4B53445952524546 ^ 3]
    c = words[3]
    assert all(words[i] == (c + i * 0x9E3779B97F4A7C15) % 2**64 for i in range(4, 64))
    data = testguest.sector_bytes(65543, 42, 3)
    assert len(data) == 512 and struct.unpack_from("<Q", data, 24)[0] == c
    # the check word depends on LBA, generation and seed
    assert c not in (
        testguest.sector_words(65544, 42, 3)[3],
        testguest.sector_words(65543, 43, 3)[3],
        testguest.sector_words(65543, 42, 4)[3],
    )


def _block(block: int, gen: int, seed: int = 1) -> bytes:
    first = testguest.DISK_REGION_LBA + block * testguest.DISK_BLOCK_SECTORS
    return b"".join(
        testguest.sector_bytes(first + i, gen, seed) for i in range(testguest.DISK_BLOCK_SECTORS)
    )


def _image(path: Path, blocks: dict[int, bytes], dsize_mib: int = 1) -> Path:
    with path.open("wb") as f:
        f.truncate(REGION + dsize_mib * (1 << 20))
        for b, data in blocks.items():
            f.seek(REGION + b * BLOCK)
            f.write(data)
    return path


def test_verify_disk_image_accepts_a_consistent_region(tmp_path: Path) -> None:
    img = _image(tmp_path / "ok.img", {0: _block(0, 5), 1: _block(1, 6), 15: _block(15, 3)})
    check = testguest.verify_disk_image(img, dsize_mib=1)
    assert check.ok and check.blocks == 16 and check.written == 3 and check.unwritten == 13
    assert check.generations == {0: 5, 1: 6, 15: 3} and check.max_generation == 6
    # a wrong seed makes every written block bad: the check can fail
    wrong = testguest.verify_disk_image(img, dsize_mib=1, seed=2)
    assert sorted(wrong.bad) == [0, 1, 15]
    # an image shorter than the region: the missing part was never written
    short = tmp_path / "short.img"
    short.write_bytes(img.read_bytes()[: REGION + 2 * BLOCK])
    assert testguest.verify_disk_image(short, dsize_mib=1).generations == {0: 5, 1: 6}


@pytest.mark.parametrize(
    "name, blocks, bad_block, why",
    [
        (
            "flipped bit",
            {2: _block(2, 9)[:1000] + bytes([_block(2, 9)[1000] ^ 4]) + _block(2, 9)[1001:]},
            2,
            "sector 65793",
        ),
        (
            "torn (two generations)",
            {3: _block(3, 7)[: BLOCK // 2] + _block(3, 8)[BLOCK // 2 :]},
            3,
            "found lba=65984 gen=8",
        ),
        ("misplaced (another block's data)", {4: _block(5, 11)}, 4, "found lba=66176"),
        ("duplicate generation", {0: _block(0, 4), 6: _block(6, 4)}, 6, "also in block 0"),
        ("zeroed sector", {7: _block(7, 2)[:512] + bytes(512) + _block(7, 2)[1024:]}, 7, "66433"),
        ("generation 0", {8: _block(8, 0)}, 8, "generation 0"),
    ],
)
def test_verify_disk_image_finds_bad_blocks(
    tmp_path: Path, name: str, blocks: dict[int, bytes], bad_block: int, why: str
) -> None:
    check = testguest.verify_disk_image(_image(tmp_path / "bad.img", blocks), dsize_mib=1)
    assert not check.ok and list(check.bad) == [bad_block], (name, check.bad)
    assert why in check.bad[bad_block], check.bad


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_verify_disk_image_reads_qcow2(tmp_path: Path) -> None:
    raw = _image(tmp_path / "r.img", {1: _block(1, 3), 9: _block(9, 4)})
    qcow = tmp_path / "q.qcow2"
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True
    )
    check = testguest.verify_disk_image(qcow, dsize_mib=1, fmt="qcow2")
    assert check.ok and check.generations == {1: 3, 9: 4}
    with pytest.raises(testguest.GuestError, match="qemu-img"):
        testguest.verify_disk_image(tmp_path / "absent.qcow2", fmt="qcow2")


def test_verify_disk_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = _image(tmp_path / "cli.img", {0: _block(0, 1), 1: _block(1, 2)})
    assert testguest._main(["verify-disk", str(img), "--dsize", "1"]) == 0
    assert "16 blocks: 2 written (newest generation 2), 14 never written, 0 bad" in (
        capsys.readouterr().out
    )
    with img.open("r+b") as f:
        f.seek(REGION + BLOCK + 512 + 100)
        f.write(b"\xff")
    assert testguest._main(["verify-disk", str(img), "--dsize", "1"]) == 1
    assert "block 1: sector 65665 (gen=2): byte 100 differs" in capsys.readouterr().out
