"""The save image: a header, then qemu's migration stream (raw or compressed).

Layout (all integers big-endian)::

    0   8  magic        b"FERRYSAV"
    8   4  version      1
    12  4  flags        bit 0: COMPLETE
    16  4  meta_len     bytes of the JSON metadata at offset 32
    20  4  data_offset  where qemu's stream starts (a multiple of 4096)
    24  8  reserved     zero
    32  …  metadata     JSON: xml, was_running, compression, kind, name, uuid, created
    …      padding      zeros up to data_offset (room for save-image-define)

The header is written with COMPLETE clear and set only once qemu *and* the
compressor both finished and the data is on disk (fsync), so a save that
dies half-way (qemu killed, the agent killed, the host lost) leaves an image
that :func:`read_header` reports as partial and restore refuses.

The compressor is a child process from an argv list (:func:`compressor_argv`),
never a shell; a format whose tool is missing is refused naming the tool.
Everything here but :func:`read_header`, :func:`write_header` and
:func:`mark_complete` (which take a file descriptor) is pure.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ferry.errors import ConfigError, SaveImageError, SaveImagePartial

__all__ = [
    "FORMATS",
    "HEADER_SIZE",
    "MAGIC",
    "SaveHeader",
    "SaveImageError",
    "SaveImagePartial",
    "check_restorable",
    "compressor_argv",
    "decode_header",
    "decompressor_argv",
    "encode_header",
    "mark_complete",
    "read_header",
    "rewrite_metadata",
    "write_header",
]

MAGIC = b"FERRYSAV"
VERSION = 1
FLAG_COMPLETE = 1
_FIXED = struct.Struct(">8sIIII8x")
HEADER_SIZE = _FIXED.size  # 32
#: Room left after the metadata so save-image-define can grow the XML in place.
SLACK = 64 * 1024
ALIGN = 4096
#: A header bigger than this is not ours (or is hostile): refused before reading it.
MAX_META = 16 << 20

Format = Literal["raw", "gzip", "bzip2", "xz", "lzop", "zstd"]
FORMATS: tuple[str, ...] = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd")
# (compress argv, decompress argv); the tool is argv[0], found in PATH.
_TOOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gzip": (("gzip", "-c"), ("gzip", "-dc")),
    "bzip2": (("bzip2", "-c"), ("bzip2", "-dc")),
    "xz": (("xz", "-c"), ("xz", "-dc")),
    "lzop": (("lzop", "-c"), ("lzop", "-dc")),
    "zstd": (("zstd", "-q", "-c"), ("zstd", "-q", "-dc")),
}


@dataclass
class SaveHeader:
    """What the header says about the image."""

    xml: str
    was_running: bool
    compression: str = "raw"
    kind: str = "save"
    name: str = ""
    uuid: str = ""
    created: float = field(default_factory=time.time)
    complete: bool = False
    version: int = VERSION
    data_offset: int = 0

    def meta(self) -> dict[str, Any]:
        """The JSON metadata block."""
        return {"xml": self.xml, "was_running": self.was_running,
                "compression": self.compression, "kind": self.kind, "name": self.name,
                "uuid": self.uuid, "created": self.created}  # fmt: skip


def _which(tool: str, which: Callable[[str], str | None]) -> str:
    found = which(tool)
    if found is None:
        raise ConfigError(
            f"[save] image_format = '{tool}': the compressor '{tool}' is not installed "
            "(not found in PATH); install it or choose another format",
            tool=tool,
        )
    return found


def compressor_argv(fmt: str, which: Callable[[str], str | None] = shutil.which
                    ) -> list[str] | None:  # fmt: skip
    """The compressor's argv for ``fmt`` (stdin → stdout); None for raw.

    :raises ConfigError: an unknown format, or its tool is not installed.
    """
    if fmt == "raw":
        return None
    if fmt not in _TOOLS:
        raise ConfigError(f"[save] image_format = {fmt!r}: not one of {', '.join(FORMATS)}")
    argv = list(_TOOLS[fmt][0])
    argv[0] = _which(argv[0], which)
    return argv


def decompressor_argv(fmt: str, which: Callable[[str], str | None] = shutil.which
                      ) -> list[str] | None:  # fmt: skip
    """The decompressor's argv for an image compressed with ``fmt``; None for raw.

    :raises SaveImageError: an unknown format, or its tool is not installed.
    """
    if fmt == "raw":
        return None
    if fmt not in _TOOLS:
        raise SaveImageError(f"the image is compressed with {fmt!r}, which Ferry does not know")
    argv = list(_TOOLS[fmt][1])
    found = which(argv[0])
    if found is None:
        raise SaveImageError(
            f"the image is compressed with {fmt}, but '{argv[0]}' is not installed on this host",
            tool=argv[0],
        )
    argv[0] = found
    return argv


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode_header(header: SaveHeader, *, data_offset: int | None = None) -> bytes:
    """The header bytes up to the stream (``data_offset`` long, zero padded)."""
    meta = json.dumps(header.meta(), sort_keys=True).encode()
    need = HEADER_SIZE + len(meta)
    offset = data_offset if data_offset is not None else _round_up(need + SLACK)
    if need > offset:
        raise SaveImageError(
            f"the new metadata ({len(meta)} bytes) does not fit in the image's header "
            f"({offset - HEADER_SIZE} bytes)"
        )
    flags = FLAG_COMPLETE if header.complete else 0
    fixed = _FIXED.pack(MAGIC, header.version, flags, len(meta), offset)
    return fixed + meta + b"\0" * (offset - need)


def decode_fixed(data: bytes, what: str = "the file") -> tuple[int, int, int, int]:
    """(version, flags, meta_len, data_offset) of a header's first 32 bytes."""
    if len(data) < HEADER_SIZE or data[:8] != MAGIC:
        raise SaveImageError(f"{what} is not a Ferry save image (no FERRYSAV header)")
    _magic, version, flags, meta_len, offset = _FIXED.unpack(data[:HEADER_SIZE])
    if version != VERSION:
        raise SaveImageError(f"{what} is a save image of version {version}; this Ferry "
                             f"reads version {VERSION}")  # fmt: skip
    if meta_len > MAX_META or offset < HEADER_SIZE + meta_len or offset % ALIGN:
        raise SaveImageError(f"{what} has a corrupt save image header")
    return version, flags, meta_len, offset


def decode_header(data: bytes, what: str = "the file") -> SaveHeader:
    """Parse the header (the first ``HEADER_SIZE + meta_len`` bytes at least).

    :raises SaveImageError: not a save image, another version, corrupt.
    """
    version, flags, meta_len, offset = decode_fixed(data, what)
    raw = data[HEADER_SIZE:HEADER_SIZE + meta_len]
    if len(raw) != meta_len:
        raise SaveImageError(f"{what} is truncated inside its save image header")
    try:
        meta = json.loads(raw)
        header = SaveHeader(
            xml=str(meta["xml"]), was_running=bool(meta["was_running"]),
            compression=str(meta["compression"]), kind=str(meta.get("kind", "save")),
            name=str(meta.get("name", "")), uuid=str(meta.get("uuid", "")),
            created=float(meta.get("created", 0.0)),
            complete=bool(flags & FLAG_COMPLETE), version=version, data_offset=offset,
        )  # fmt: skip
    except (ValueError, KeyError, TypeError) as exc:
        raise SaveImageError(f"{what} has corrupt save image metadata: {exc}") from None
    if header.compression not in FORMATS:
        raise SaveImageError(f"{what} is compressed with unknown format {header.compression!r}")
    return header


def read_header(fd: int, what: str = "the file") -> SaveHeader:
    """Read and parse the header of the image open at ``fd`` (position unchanged)."""
    fixed = os.pread(fd, HEADER_SIZE, 0)
    _v, _f, meta_len, _o = decode_fixed(fixed, what)
    return decode_header(fixed + os.pread(fd, meta_len, HEADER_SIZE), what)


def write_header(fd: int, header: SaveHeader) -> int:
    """Write ``header`` (marked partial) at the start of ``fd``; return the data offset.

    The file position is left at the data offset, where qemu's stream goes.
    """
    header.complete = False
    data = encode_header(header)
    os.pwrite(fd, data, 0)
    os.lseek(fd, len(data), os.SEEK_SET)
    header.data_offset = len(data)
    return len(data)


def mark_complete(fd: int) -> None:
    """Flush the stream to disk, then set COMPLETE (and flush that too)."""
    os.fsync(fd)
    fixed = os.pread(fd, HEADER_SIZE, 0)
    version, flags, meta_len, offset = decode_fixed(fixed)
    os.pwrite(fd, _FIXED.pack(MAGIC, version, flags | FLAG_COMPLETE, meta_len, offset), 0)
    os.fsync(fd)


def rewrite_metadata(fd: int, header: SaveHeader) -> None:
    """Replace the metadata in place (save-image-define); the stream is untouched."""
    data = encode_header(header, data_offset=header.data_offset)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def check_restorable(header: SaveHeader, what: str) -> None:
    """Refuse an image whose save never finished.

    :raises SaveImagePartial: the COMPLETE flag is clear.
    """
    if not header.complete:
        raise SaveImagePartial(
            f"{what} is a partial save image: the save that wrote it did not finish "
            "(qemu, the compressor or the agent stopped before the image was complete); "
            "it cannot be restored", complete=False,
        )  # fmt: skip
