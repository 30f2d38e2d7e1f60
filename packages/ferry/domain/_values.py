"""Typed reading of elements, attributes and values for the typed parse.

Each reader converts and checks one value and raises
:class:`~ferry.errors.XMLError` (:class:`~ferry.errors.XMLUnsupported` for
values Ferry does not implement) located at the element, with a hint that
says what would do; a caller that can go on without the value reads it
through :meth:`~ferry.domain._context.Ctx.guard`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from lxml import etree

from ferry.domain._checks import Loc, fail
from ferry.domain._context import Ctx, element_line
from ferry.errors import XMLUnsupported

__all__ = [
    "IDENT_RE",
    "MAX_MEMORY_KIB",
    "MAX_VCPUS",
    "all_of",
    "elements",
    "enum",
    "get",
    "ident",
    "int_attr",
    "memory",
    "one",
    "signed_port",
    "text",
    "uint",
    "yes_no",
]

# Upper bounds that keep numbers sane (and Python ints small).
MAX_MEMORY_KIB = 1 << 40  # 1 PiB
MAX_VCPUS = 1024

IDENT_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")


def elements(el: etree._Element) -> Iterator[etree._Element]:
    """The child elements of ``el``.

    Comments and processing instructions carry no meaning outside <metadata>.
    """
    for child in el:
        if isinstance(child.tag, str):
            yield child


def one(ctx: Ctx, el: etree._Element, tag: str, loc: Loc) -> etree._Element | None:
    """The child ``<tag>`` of ``el``, or None.

    A second one is a problem (recorded; the first is used).
    """
    found = [c for c in elements(el) if c.tag == tag]
    if len(found) > 1:
        ctx.report(loc.child(tag, element_line(found[1])), f"<{tag}> appears more than once",
                   hint=f"keep one <{tag}>")
    return found[0] if found else None


def all_of(el: etree._Element, tag: str) -> list[etree._Element]:
    """Every child ``<tag>`` of ``el``, in document order."""
    return [c for c in elements(el) if c.tag == tag]


def text(el: etree._Element) -> str:
    """The text of ``el`` ('' when it has none)."""
    return el.text or ""


def get(el: etree._Element, name: str) -> str | None:
    """Attribute ``name`` of ``el``, or None."""
    value = el.get(name)
    return None if value is None else str(value)


def enum(
    el: etree._Element, name: str, loc: Loc, choices: Iterable[str],
    *, default: str | None = None, what: str | None = None,
) -> str | None:
    """Return attribute ``name`` if it is one of ``choices``.

    A value outside ``choices`` is refused with XMLUnsupported: either it is
    valid libvirt that Ferry does not implement, or it is nonsense; both
    must stop the definition, and the message lists what would work.
    """
    value = get(el, name)
    if value is None:
        return default
    allowed = tuple(choices)
    if value not in allowed:
        label = what or f"{name}"
        hint = f"use one of: {', '.join(allowed)}" if allowed else f"remove {name!r}"
        raise fail(loc, f"{label} {value!r} is not supported (supported: {', '.join(allowed)})",
                   cls=XMLUnsupported, attribute=name, value=value, hint=hint)
    return value


def uint(
    value_text: str, loc: Loc, what: str, *, lo: int = 0, hi: int = 1 << 63,
    hex_ok: bool = False,
) -> int:
    """``value_text`` as an integer in ``lo..hi`` (``0x…`` too when ``hex_ok``)."""
    s = value_text.strip()
    try:
        if hex_ok and s.lower().startswith("0x"):
            value = int(s[2:], 16) if s[2:] and all(c in "0123456789abcdefABCDEF" for c in s[2:]) \
                else None
        else:
            value = int(s) if s.isascii() and s.isdigit() else None
    except ValueError:
        value = None
    hint = (f"use a whole number from {lo} to {hi}" if hi < 1 << 40
            else f"use a whole number of at least {lo}")
    if value is None:
        raise fail(loc, f"{what} {value_text!r} is not a non-negative integer", hint=hint)
    if not lo <= value <= hi:
        raise fail(loc, f"{what} {value} is out of range {lo}..{hi}", hint=hint)
    return value


def int_attr(
    el: etree._Element, name: str, loc: Loc, *, lo: int = 0, hi: int = 1 << 63,
    hex_ok: bool = False,
) -> int | None:
    """Attribute ``name`` as an integer in ``lo..hi``, or None when absent."""
    value = get(el, name)
    if value is None:
        return None
    return uint(value, loc, f"{name}", lo=lo, hi=hi, hex_ok=hex_ok)


def signed_port(el: etree._Element, name: str, loc: Loc, *, lo: int) -> int | None:
    """A graphics port: -1 (pick one) or lo..65535."""
    value = get(el, name)
    if value is None:
        return None
    if value.strip() == "-1":
        return -1
    return uint(value, loc, name, lo=lo, hi=65535)


def yes_no(
    el: etree._Element, name: str, loc: Loc, *, yes: str = "yes", no: str = "no"
) -> bool | None:
    """A boolean attribute spelt ``yes``/``no`` (or ``on``/``off``), or None."""
    value = enum(el, name, loc, (yes, no))
    return None if value is None else value == yes


# Memory units as libvirt's virScaleInteger reads them (case-insensitive).
_UNITS: dict[str, int] = {"b": 1, "byte": 1, "bytes": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _UNITS[_p] = 1024**_i
    _UNITS[f"{_p}ib"] = 1024**_i
    _UNITS[f"{_p}b"] = 1000**_i


def memory(el: etree._Element, loc: Loc, what: str) -> int:
    """A memory size element (text and ``unit``) in KiB, rounded up."""
    unit = (get(el, "unit") or "KiB").strip()
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise fail(loc, f"unknown memory unit {unit!r}", attribute="unit",
                   hint="use b, KiB, MiB, GiB or TiB (or KB, MB, GB, TB)")
    value = uint(text(el), loc, what, hi=MAX_MEMORY_KIB * 1024)
    # Round up to whole KiB the way libvirt does.
    kib = -(-value * scale // 1024)
    if kib <= 0:
        raise fail(loc, f"{what} must be greater than 0")
    if kib > MAX_MEMORY_KIB:
        raise fail(loc, f"{what} of {kib} KiB is larger than {MAX_MEMORY_KIB} KiB")
    return kib


def ident(value: str, loc: Loc, what: str, pattern: re.Pattern[str] = IDENT_RE) -> str:
    """``value`` stripped, if it matches ``pattern`` (a name or identifier)."""
    value = value.strip()
    if not pattern.fullmatch(value):
        raise fail(loc, f"invalid {what} {value!r}")
    return value
