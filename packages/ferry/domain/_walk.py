"""Step 2 of parsing: walk the document against the schema.

Every element and attribute, in document order, is checked against
:data:`~ferry.domain._schema.SCHEMA`. Whatever is not in it is a problem
(:class:`~ferry.errors.XMLUnsupported`, naming its path
``domain/devices/hostdev`` and line), so nothing is ever silently dropped;
all of them are recorded, and removed from the tree so that the typed parse
goes on with the rest. ``<metadata>`` is opaque and skipped.
"""

from __future__ import annotations

from lxml import etree

from ferry.domain._context import Ctx
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


def walk(ctx: Ctx, el: etree._Element, path: str) -> None:
    """Check ``el`` (at element path ``path``) and its subtree against the schema.

    Records every element and attribute the schema does not list (as
    XMLUnsupported) and text where it allows none, and removes those
    elements and attributes from the tree, so that the typed parse sees only
    what Ferry understands. An unknown element is not descended into.
    """
    spec = SCHEMA[path]
    loc = ctx.loc(el, path)
    for name in list(el.attrib):
        sname = str(name)
        if sname not in spec.attrs:
            shown = _attr_name(el, sname)
            ctx.report(loc, f"attribute {shown!r} is not supported by Ferry",
                       cls=XMLUnsupported, kind="unsupported-attribute",
                       hint=f"remove the attribute {shown!r}", attribute=shown)
            del el.attrib[name]
    if spec.opaque:
        return
    if not spec.text and (el.text or "").strip():
        ctx.report(loc, f"unexpected text {(el.text or '').strip()[:40]!r}",
                   hint="remove the text: this element holds none")
    unknown: list[etree._Element] = []
    for child in el:
        if (child.tail or "").strip():
            ctx.report(loc, f"unexpected text {(child.tail or '').strip()[:40]!r}",
                       hint="remove the text: this element holds none")
        if not isinstance(child.tag, str):
            continue
        name = _qname(child)
        child_path = f"{path}/{name}"
        if child_path not in SCHEMA:
            ctx.report(ctx.loc(child, child_path), f"element <{name}> is not supported by Ferry",
                       cls=XMLUnsupported, kind="unsupported-element",
                       hint=f"remove <{name}> and what it contains")
            unknown.append(child)
            continue
        walk(ctx, child, child_path)
    for child in unknown:
        el.remove(child)
