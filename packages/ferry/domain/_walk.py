"""Step 2 of parsing: walk the document against the schema.

Every element and attribute, in document order, is checked against
:data:`~ferry.domain._schema.SCHEMA`. Whatever is not in it is refused with
:class:`~ferry.errors.XMLUnsupported` naming its path
(``domain/devices/hostdev``) and line, so nothing is ever silently dropped.
``<metadata>`` is opaque and skipped.
"""

from __future__ import annotations

from lxml import etree

from ferry.domain._checks import Loc, fail
from ferry.domain._context import element_line
from ferry.domain._schema import SCHEMA
from ferry.errors import XMLUnsupported

__all__ = ["walk"]


def _qname(el: etree._Element) -> str:
    tag = str(el.tag)
    if tag.startswith("{"):
        local = etree.QName(tag).localname
        return f"{el.prefix}:{local}" if el.prefix else f"{{{etree.QName(tag).namespace}}}{local}"
    return tag


def _attr_name(el: etree._Element, name: str) -> str:
    if name.startswith("{"):
        q = etree.QName(name)
        for prefix, uri in el.nsmap.items():
            if uri == q.namespace and prefix:
                return f"{prefix}:{q.localname}"
        if q.namespace == "http://www.w3.org/XML/1998/namespace":
            return f"xml:{q.localname}"
        return name
    return name


def walk(el: etree._Element, path: str, where: str) -> None:
    """Check ``el`` (at element path ``path``) and its subtree against the schema.

    :raises XMLUnsupported: an element or attribute the schema does not list.
    :raises XMLError: text where the schema allows none.
    """
    spec = SCHEMA[path]
    loc = Loc(where, element_line(el), path)
    for name in el.attrib:
        sname = str(name)
        if sname not in spec.attrs:
            raise fail(loc, f"attribute {_attr_name(el, sname)!r} is not supported by Ferry",
                       cls=XMLUnsupported, attribute=_attr_name(el, sname))
    if spec.opaque:
        return
    if not spec.text and (el.text or "").strip():
        raise fail(loc, f"unexpected text {(el.text or '').strip()[:40]!r}")
    for child in el:
        if (child.tail or "").strip():
            raise fail(loc, f"unexpected text {(child.tail or '').strip()[:40]!r}")
        if not isinstance(child.tag, str):
            continue
        name = _qname(child)
        child_path = f"{path}/{name}"
        if child_path not in SCHEMA:
            raise fail(Loc(where, element_line(child), child_path),
                       f"element <{name}> is not supported by Ferry", cls=XMLUnsupported)
        walk(child, child_path, where)
