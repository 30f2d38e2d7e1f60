"""Reading a domain XML file for ``define`` and ``migrate --xml``.

The file is read as bytes and decoded the way XML says it must be: by its
byte-order mark or encoding declaration, as lxml (libxml2) detects them, so
a UTF-16 or latin-1 file with a proper declaration works. A file that cannot
be decoded, or that is larger than a domain XML may be, gets a clear error
here, before anything is sent; never a traceback.
"""

from __future__ import annotations

import codecs
from pathlib import Path

from lxml import etree

from ferry.domain import MAX_XML_BYTES
from ferry.errors import FerryError, XMLError

__all__ = ["decode_xml", "read_domain_xml", "too_large"]


def too_large(where: str, size: int, limit: int, what: str) -> XMLError:
    """The error for a domain XML of ``size`` bytes over ``limit``."""
    return XMLError(
        f"{where}: the domain XML is too large: {size} bytes, more than the {limit}-byte "
        f"limit {what}; nothing was sent",
        where=where, size=size, limit=limit,
    )  # fmt: skip


def read_domain_xml(path: str | Path, *, limit: int = MAX_XML_BYTES) -> str:
    """The text of the domain XML file ``path``.

    :raises FerryError: the file cannot be read.
    :raises XMLError: it is over ``limit`` bytes, or cannot be decoded.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FerryError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise too_large(str(path), len(data), limit, "for a domain XML")
    return decode_xml(data, str(path))


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _first_bad_utf8(data: bytes) -> str:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"byte 0x{data[exc.start]:02x} at offset {exc.start} is not UTF-8"
    return ""


def decode_xml(data: bytes, where: str) -> str:
    """Decode an XML document by its byte-order mark or encoding declaration.

    A document lxml cannot parse at all is passed on as UTF-8 when it is
    UTF-8 (the agent then reports what is wrong with it, with the line);
    otherwise it cannot be decoded, and the error says so and how to fix it.

    :raises XMLError: the document's encoding is unknown or its bytes do
        not match it.
    """
    # Only the encoding is wanted here: no entities, no DTD, no network.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)  # fmt: skip
    try:
        root = etree.fromstring(data, parser)
    except (etree.LxmlError, ValueError) as exc:
        if "unsupported encoding" in str(exc).lower():
            raise XMLError(f"{where}: cannot decode the domain XML: {exc}", where=where) from None
        bad = _first_bad_utf8(data)
        if not bad:
            return data.decode("utf-8").removeprefix("\ufeff")
        raise XMLError(
            f"{where}: cannot decode the domain XML: {bad}, and it declares no encoding "
            "that fits its bytes (declare it, e.g. <?xml version='1.0' "
            f"encoding='ISO-8859-1'?>, or convert the file to UTF-8); the parser said: {exc}",
            where=where,
        ) from None
    # lxml reports a byte-order mark's encoding only when it is declared too.
    bom = next((name for mark, name in _BOMS if data.startswith(mark)), None)
    encoding = bom or root.getroottree().docinfo.encoding or "utf-8"
    try:
        codecs.lookup(encoding)
        text = data.decode(encoding)
    except (LookupError, UnicodeDecodeError) as exc:
        raise XMLError(
            f"{where}: cannot decode the domain XML as its declared encoding {encoding!r}: "
            f"{exc}", where=where,
        ) from None  # fmt: skip
    return text.removeprefix("\ufeff")
