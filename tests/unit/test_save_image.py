"""The save image header, the compressor argv and the is_allowed check (sans-I/O)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from ferry import allowed
from ferry.config import load_config
from ferry.domain import parse_domain
from ferry.domain.model import Filesystem
from ferry.errors import ConfigError, SaveImageError, SaveImagePartial
from ferry.save_image import (
    ALIGN,
    HEADER_SIZE,
    MAGIC,
    SaveHeader,
    check_restorable,
    compressor_argv,
    decode_header,
    decompressor_argv,
    encode_header,
    mark_complete,
    read_header,
    rewrite_metadata,
    write_header,
)

XML = """<domain type='kvm'><name>g1</name><uuid>6c9c4e2a-5a43-4b8e-9f7e-7d3c2b1a0f11</uuid>
<memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"""


def _header(**kw: object) -> SaveHeader:
    base: dict[str, object] = {"xml": XML, "was_running": True, "compression": "zstd",
                               "name": "g1", "uuid": "u"}  # fmt: skip
    base.update(kw)
    return SaveHeader(**base)  # type: ignore[arg-type]


def test_header_round_trip_and_layout() -> None:
    data = encode_header(_header())
    assert data[:8] == MAGIC
    assert len(data) % ALIGN == 0 and len(data) >= HEADER_SIZE + len(XML) + 64 * 1024
    back = decode_header(data)
    assert (back.xml, back.was_running, back.compression, back.name) == (XML, True, "zstd", "g1")
    assert back.complete is False and back.data_offset == len(data)
    assert decode_header(encode_header(_header(complete=True))).complete is True


@pytest.mark.parametrize("data,words", [
    (b"", "not a Ferry save image"),
    (b"QEVM" + b"\0" * 60, "not a Ferry save image"),
    (MAGIC + (9).to_bytes(4, "big") + b"\0" * 20, "version 9"),
    (MAGIC + (1).to_bytes(4, "big") + b"\0" * 4 + (10).to_bytes(4, "big")
     + (4096).to_bytes(4, "big") + b"\0" * 8 + b"{not json", "truncated"),
    (MAGIC + (1).to_bytes(4, "big") + b"\0" * 4 + (3).to_bytes(4, "big")
     + (4096).to_bytes(4, "big") + b"\0" * 8 + b"[1]", "corrupt save image metadata"),
    (MAGIC + (1).to_bytes(4, "big") + b"\0" * 4 + (3).to_bytes(4, "big")
     + (100).to_bytes(4, "big") + b"\0" * 8 + b"{}\n", "corrupt save image header"),
])  # fmt: skip
def test_bad_headers_are_refused(data: bytes, words: str) -> None:
    with pytest.raises(SaveImageError, match=words):
        decode_header(data)


def test_partial_until_marked_complete(tmp_path: Path) -> None:
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        offset = write_header(fd, _header())
        assert os.lseek(fd, 0, os.SEEK_CUR) == offset
        os.write(fd, b"QEVM stream")
        header = read_header(fd)
        with pytest.raises(SaveImagePartial, match="partial save image"):
            check_restorable(header, "'img'")
        mark_complete(fd)
        header = read_header(fd)
        check_restorable(header, "'img'")
        # save-image-define rewrites the metadata in place; the stream stays.
        header.xml = XML.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><!-- edited -->")
        rewrite_metadata(fd, header)
        again = read_header(fd)
        assert "edited" in again.xml and again.complete is True
        assert os.pread(fd, 11, offset) == b"QEVM stream"
        header.xml = "x" * (offset + 1)
        with pytest.raises(SaveImageError, match="does not fit"):
            rewrite_metadata(fd, header)
    finally:
        os.close(fd)


def test_compressor_argv_and_missing_tools() -> None:
    def have(tool: str) -> str | None:
        return f"/usr/bin/{tool}"

    assert compressor_argv("raw", have) is None
    assert compressor_argv("zstd", have) == ["/usr/bin/zstd", "-q", "-c"]
    assert compressor_argv("gzip", have) == ["/usr/bin/gzip", "-c"]
    assert decompressor_argv("xz", have) == ["/usr/bin/xz", "-dc"]
    assert decompressor_argv("raw", have) is None
    with pytest.raises(ConfigError, match="the compressor 'lzop' is not installed"):
        compressor_argv("lzop", lambda tool: None)
    with pytest.raises(SaveImageError, match="'bzip2' is not installed on this host"):
        decompressor_argv("bzip2", lambda tool: None)
    with pytest.raises(ConfigError, match="not one of"):
        compressor_argv("rar", have)


def test_config_save_section(tmp_path: Path) -> None:
    def write(extra: str) -> Path:
        path = tmp_path / "agent.toml"
        path.write_text("[host]\nuuid = '5f0e7a52-9d8b-4c5e-8a1f-3b2c1d0e9f8a'\nname = 'a'\n"
                        + extra)  # fmt: skip
        return path

    assert load_config(write("")).save.image_format == "raw"
    assert load_config(write("[save]\nimage_format = 'xz'\n")).save.image_format == "xz"
    with pytest.raises(ConfigError, match=r"\[save\] image_format = 'rar'"):
        load_config(write("[save]\nimage_format = 'rar'\n"))


def test_is_allowed_local_and_remote() -> None:
    dom = parse_domain(XML)
    assert allowed.is_allowed(dom, True) == [] and allowed.is_allowed(dom, False) == []
    # Snapshots and an I/O error stop a move, not a local save.
    remote = allowed.is_allowed(dom, True, snapshots=["s1"], io_error=True, abort_on_error=True)
    assert [p.remote_only for p in remote] == [True, True]
    assert allowed.is_allowed(dom, False, snapshots=["s1"], io_error=True,
                              abort_on_error=True) == []  # fmt: skip
    # qemu cannot serialise a virtiofs share: refused both ways, worded for each.
    fs = Filesystem(source_dir="/srv/share", target_dir="share")
    with_fs = dataclasses.replace(dom, filesystems=(fs,))
    local = allowed.is_allowed(with_fs, False)
    assert len(local) == 1 and not local[0].remote_only
    assert allowed.refusal("g1", "save", local).startswith("cannot save domain 'g1': <filesystem>")
    assert allowed.refusal("g1", "migrate", allowed.is_allowed(with_fs, True)).startswith(
        "cannot migrate domain 'g1': <filesystem> /srv/share")
    # A memory-only dump does not serialise devices: allowed.
    assert allowed.is_allowed(with_fs, False, memory=False) == []
