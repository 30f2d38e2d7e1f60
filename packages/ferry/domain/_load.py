"""Step 1 of parsing: load a domain XML document safely.

The document is refused before parsing when it is larger than
:data:`MAX_XML_BYTES` or holds a DOCTYPE or ENTITY declaration; lxml then
runs with entity resolution, network access and DTD loading switched off.
"""

from __future__ import annotations

import re
from typing import Any

from lxml import etree

from ferry.domain._context import element_line
from ferry.errors import XMLError

__all__ = ["MAX_XML_BYTES", "load"]

#: Documents larger than this are refused before parsing (a real definition
#: is a few KiB; the limit bounds parser time and memory).
MAX_XML_BYTES = 1024 * 1024

_DECL_RE = re.compile(rb"<!(DOCTYPE|ENTITY)")


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _to_bytes(xml: object, where: str) -> tuple[bytes, bool]:
    if isinstance(xml, str):
        try:
            return xml.encode("utf-8"), True
        except UnicodeEncodeError as exc:
            raise XMLError(f"{where}: XML text is not valid Unicode: {exc.reason}",
                           where=where) from None
    if isinstance(xml, bytes | bytearray | memoryview):
        return bytes(xml), False
    raise XMLError(f"{where}: domain XML must be str or bytes, not {type(xml).__name__}",
                   where=where)


def load(xml: object, where: str) -> etree._Element:
    """Parse ``xml`` with every dangerous libxml2 feature off; return the root.

    :raises XMLError: too large, DOCTYPE or entity declaration, malformed.
    """
    data, was_text = _to_bytes(xml, where)
    if len(data) > MAX_XML_BYTES:
        raise XMLError(
            f"{where}: domain XML is {len(data)} bytes, more than the {MAX_XML_BYTES} byte limit",
            where=where, size=len(data), limit=MAX_XML_BYTES,
        )
    # Refuse declarations outright instead of trusting the parser flags
    # alone: a domain definition never needs a DTD, and refusing is the only
    # defence that does not depend on the libxml2 version (billion laughs,
    # external entities such as file:///etc/passwd).
    found = _DECL_RE.search(data)
    if found:
        line = _line_of(data, found.start())
        kind = found.group(1).decode()
        raise XMLError(
            f"{where}:{line}: <!{kind}> declarations are not allowed in domain XML "
            "(no DTDs, no entities)",
            where=where, line=line, element=None,
        )
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=False,  # comments inside <metadata> are kept verbatim
        remove_pis=False,
        # str input was encoded to UTF-8 above, whatever its declaration says.
        encoding="utf-8" if was_text else None,
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        lineno: object = getattr(exc, "lineno", None)
        err_line = lineno if isinstance(lineno, int) else None
        raw_msg: object = getattr(exc, "msg", None)
        msg = raw_msg if isinstance(raw_msg, str) else str(exc)
        prefix = f"{where}:{err_line}" if err_line else where
        raise XMLError(f"{prefix}: malformed XML: {msg}", where=where, line=err_line,
                       element=None) from None
    except (etree.LxmlError, ValueError) as exc:
        raise XMLError(f"{where}: malformed XML: {exc}", where=where) from None
    if root is None:
        raise XMLError(f"{where}: empty document", where=where)
    # Belt and braces for encodings the byte scan cannot see (UTF-16, ...).
    docinfo: Any = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise XMLError(f"{where}: DOCTYPE declarations are not allowed in domain XML",
                       where=where, line=1, element=None)
    for ent in root.iter(etree.Entity):
        ent_line = element_line(ent)
        raise XMLError(f"{where}:{ent_line}: entity references are not allowed in domain XML",
                       where=where, line=ent_line, element=None)
    return root
