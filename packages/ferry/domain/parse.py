"""Parse and validate domain XML into a :class:`~ferry.domain.model.Domain`.

Parsing happens in three steps, each of which can only raise
:class:`~ferry.errors.XMLError` (or its subclass
:class:`~ferry.errors.XMLUnsupported`):

1. **Load** (:func:`_load`): size limit, refusal of any DOCTYPE or entity
   declaration, then lxml with entity resolution, network access and DTD
   loading switched off.
2. **Schema walk** (:func:`_walk`): every element and attribute in document
   order is checked against :data:`_SCHEMA`, the list of what Ferry
   understands. The first element or attribute not in it is refused with
   ``XMLUnsupported`` naming its path (``domain/devices/hostdev``) and line,
   so nothing is ever silently dropped. ``<metadata>`` is opaque and skipped.
3. **Typed parse**: values are converted and checked (units, enumerations,
   paths, cross-references), defaults are filled in, and the model is built.
"""

from __future__ import annotations

import re
import secrets
import uuid as uuidlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from lxml import etree

from ferry.domain._checks import (
    Loc,
    check_host_path,
    check_listen,
    check_name,
    check_safe_text,
    fail,
    normalise_mac,
    normalise_uuid,
)
from ferry.domain.model import (
    OS,
    PM,
    Address,
    Audio,
    CharDev,
    Clock,
    Controller,
    Cpu,
    CpuFeature,
    CpuTopology,
    Disk,
    Domain,
    Features,
    Graphics,
    GraphicsOption,
    Input,
    Interface,
    Memballoon,
    Rng,
    Timer,
    Video,
)
from ferry.errors import XMLError, XMLUnsupported

__all__ = ["MAX_XML_BYTES", "parse_domain"]

#: Documents larger than this are refused before parsing (a real definition
#: is a few KiB; the limit bounds parser time and memory).
MAX_XML_BYTES = 1024 * 1024

# Upper bounds that keep numbers sane (and Python ints small).
_MAX_MEMORY_KIB = 1 << 40  # 1 PiB
_MAX_VCPUS = 1024

# --------------------------------------------------------------------------
# The schema: what Ferry understands, by element path.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    attrs: frozenset[str] = frozenset()
    text: bool = False  # may carry non-blank text
    opaque: bool = False  # content kept verbatim, not walked


def _s(*attrs: str, text: bool = False, opaque: bool = False) -> _Spec:
    return _Spec(frozenset(attrs), text, opaque)


_ADDRESS = _s("type", "domain", "bus", "slot", "function", "multifunction",
              "controller", "target", "unit", "port")

_SCHEMA: dict[str, _Spec] = {
    # `id` is the runtime domain id of libvirt's live XML: accepted, ignored.
    "domain": _s("type", "id"),
    "domain/name": _s(text=True),
    "domain/uuid": _s(text=True),
    "domain/title": _s(text=True),
    "domain/description": _s(text=True),
    "domain/metadata": _s(opaque=True),
    "domain/memory": _s("unit", text=True),
    "domain/currentMemory": _s("unit", text=True),
    "domain/memoryBacking": _s(),
    "domain/memoryBacking/allocation": _s("mode", "threads"),
    "domain/vcpu": _s("placement", "cpuset", text=True),
    "domain/os": _s(),
    "domain/os/type": _s("arch", "machine", text=True),
    "domain/os/kernel": _s(text=True),
    "domain/os/initrd": _s(text=True),
    "domain/os/cmdline": _s(text=True),
    "domain/os/boot": _s("dev"),
    "domain/os/bootmenu": _s("enable", "timeout"),
    "domain/cpu": _s("mode", "match", "check", "migratable"),
    "domain/cpu/model": _s("fallback", text=True),
    "domain/cpu/feature": _s("policy", "name"),
    "domain/cpu/topology": _s("sockets", "dies", "cores", "threads"),
    "domain/features": _s(),
    "domain/features/acpi": _s(),
    "domain/features/apic": _s("eoi"),
    "domain/features/pae": _s(),
    "domain/clock": _s("offset"),
    "domain/clock/timer": _s("name", "present", "tickpolicy", "track"),
    "domain/on_poweroff": _s(text=True),
    "domain/on_reboot": _s(text=True),
    "domain/on_crash": _s(text=True),
    "domain/pm": _s(),
    "domain/pm/suspend-to-mem": _s("enabled"),
    "domain/pm/suspend-to-disk": _s("enabled"),
    "domain/devices": _s(),
    "domain/devices/emulator": _s(text=True),
    "domain/devices/disk": _s("type", "device"),
    "domain/devices/disk/driver": _s("name", "type", "cache", "io", "discard", "error_policy",
                                     "rerror_policy", "event_idx"),
    "domain/devices/disk/source": _s("file", "dev"),
    "domain/devices/disk/target": _s("dev", "bus"),
    "domain/devices/disk/readonly": _s(),
    "domain/devices/disk/shareable": _s(),
    "domain/devices/disk/address": _ADDRESS,
    "domain/devices/controller": _s("type", "index", "model", "ports"),
    "domain/devices/controller/address": _ADDRESS,
    "domain/devices/interface": _s("type"),
    "domain/devices/interface/mac": _s("address"),
    "domain/devices/interface/source": _s("network", "bridge"),
    "domain/devices/interface/model": _s("type"),
    "domain/devices/interface/mtu": _s("size"),
    "domain/devices/interface/tune": _s(),
    "domain/devices/interface/tune/sndbuf": _s(text=True),
    "domain/devices/interface/address": _ADDRESS,
    "domain/devices/serial": _s("type"),
    "domain/devices/serial/source": _s("path", "mode", "append"),
    "domain/devices/serial/target": _s("type", "port"),
    "domain/devices/serial/target/model": _s("name"),
    "domain/devices/console": _s("type"),
    "domain/devices/console/source": _s("path", "mode", "append"),
    "domain/devices/console/target": _s("type", "port"),
    "domain/devices/console/address": _ADDRESS,
    "domain/devices/channel": _s("type"),
    "domain/devices/channel/source": _s("path", "mode", "append"),
    "domain/devices/channel/target": _s("type", "name"),
    "domain/devices/channel/address": _ADDRESS,
    "domain/devices/input": _s("type", "bus"),
    "domain/devices/input/address": _ADDRESS,
    "domain/devices/graphics": _s("type", "port", "autoport", "tlsPort", "websocket", "listen",
                                  "keymap", "sharePolicy", "defaultMode"),
    "domain/devices/graphics/listen": _s("type", "address"),
    "domain/devices/graphics/channel": _s("name", "mode"),
    "domain/devices/graphics/image": _s("compression"),
    "domain/devices/graphics/jpeg": _s("compression"),
    "domain/devices/graphics/zlib": _s("compression"),
    "domain/devices/graphics/playback": _s("compression"),
    "domain/devices/graphics/streaming": _s("mode"),
    "domain/devices/graphics/clipboard": _s("copypaste"),
    "domain/devices/graphics/filetransfer": _s("enable"),
    "domain/devices/graphics/mouse": _s("mode"),
    "domain/devices/video": _s(),
    "domain/devices/video/model": _s("type", "vram", "ram", "vgamem", "heads", "primary"),
    "domain/devices/video/address": _ADDRESS,
    "domain/devices/audio": _s("id", "type"),
    "domain/devices/memballoon": _s("model"),
    "domain/devices/memballoon/address": _ADDRESS,
    "domain/devices/rng": _s("model"),
    "domain/devices/rng/rate": _s("bytes", "period"),
    "domain/devices/rng/backend": _s("model", text=True),
    "domain/devices/rng/address": _ADDRESS,
}

# Spice children and the values each attribute may take.
_SPICE_OPTIONS: dict[str, dict[str, frozenset[str]]] = {
    "channel": {
        "name": frozenset({"main", "display", "inputs", "cursor", "playback", "record",
                           "smartcard", "usbredir"}),
        "mode": frozenset({"any", "secure", "insecure"}),
    },
    "image": {"compression": frozenset({"auto_glz", "auto_lz", "quic", "glz", "lz", "off"})},
    "jpeg": {"compression": frozenset({"auto", "never", "always"})},
    "zlib": {"compression": frozenset({"auto", "never", "always"})},
    "playback": {"compression": frozenset({"on", "off"})},
    "streaming": {"mode": frozenset({"filter", "all", "off"})},
    "clipboard": {"copypaste": frozenset({"yes", "no"})},
    "filetransfer": {"enable": frozenset({"yes", "no"})},
    "mouse": {"mode": frozenset({"server", "client"})},
}


# --------------------------------------------------------------------------
# Step 1: load the document safely.
# --------------------------------------------------------------------------

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


def _load(xml: object, where: str) -> etree._Element:
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
        ent_line = _line(ent)
        raise XMLError(f"{where}:{ent_line}: entity references are not allowed in domain XML",
                       where=where, line=ent_line, element=None)
    return root


# --------------------------------------------------------------------------
# Step 2: the schema walk.
# --------------------------------------------------------------------------


def _line(el: etree._Element) -> int | None:
    """The source line of ``el`` (None when libxml2 does not know it)."""
    line: object = el.sourceline
    return line if isinstance(line, int) else None


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


def _elements(el: etree._Element) -> Iterator[etree._Element]:
    # Comments and processing instructions carry no meaning outside <metadata>.
    for child in el:
        if isinstance(child.tag, str):
            yield child


def _walk(el: etree._Element, path: str, where: str) -> None:
    spec = _SCHEMA[path]
    loc = Loc(where, _line(el), path)
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
        if child_path not in _SCHEMA:
            raise fail(Loc(where, _line(child), child_path),
                       f"element <{name}> is not supported by Ferry", cls=XMLUnsupported)
        _walk(child, child_path, where)


# --------------------------------------------------------------------------
# Step 3: typed parsing helpers.
# --------------------------------------------------------------------------


class _Ctx:
    """Document name plus helpers that locate errors at an element."""

    def __init__(self, where: str) -> None:
        self.where = where

    def loc(self, el: etree._Element, path: str) -> Loc:
        return Loc(self.where, _line(el), path)


def _one(el: etree._Element, tag: str, loc: Loc) -> etree._Element | None:
    found = [c for c in _elements(el) if c.tag == tag]
    if len(found) > 1:
        raise fail(loc.child(tag, _line(found[1])), f"<{tag}> appears more than once")
    return found[0] if found else None


def _all(el: etree._Element, tag: str) -> list[etree._Element]:
    return [c for c in _elements(el) if c.tag == tag]


def _text(el: etree._Element) -> str:
    return el.text or ""


def _get(el: etree._Element, name: str) -> str | None:
    value = el.get(name)
    return None if value is None else str(value)


def _enum(
    el: etree._Element, name: str, loc: Loc, choices: Iterable[str],
    *, default: str | None = None, what: str | None = None,
) -> str | None:
    """Return attribute ``name`` if it is one of ``choices``.

    A value outside ``choices`` is refused with XMLUnsupported: either it is
    valid libvirt that Ferry does not implement, or it is nonsense; both
    must stop the definition, and the message lists what would work.
    """
    value = _get(el, name)
    if value is None:
        return default
    allowed = tuple(choices)
    if value not in allowed:
        label = what or f"{name}"
        raise fail(loc, f"{label} {value!r} is not supported (supported: {', '.join(allowed)})",
                   cls=XMLUnsupported, attribute=name, value=value)
    return value


def _uint(
    text: str, loc: Loc, what: str, *, lo: int = 0, hi: int = 1 << 63, hex_ok: bool = False
) -> int:
    s = text.strip()
    try:
        if hex_ok and s.lower().startswith("0x"):
            value = int(s[2:], 16) if s[2:] and all(c in "0123456789abcdefABCDEF" for c in s[2:]) \
                else None
        else:
            value = int(s) if s.isascii() and s.isdigit() else None
    except ValueError:
        value = None
    if value is None:
        raise fail(loc, f"{what} {text!r} is not a non-negative integer")
    if not lo <= value <= hi:
        raise fail(loc, f"{what} {value} is out of range {lo}..{hi}")
    return value


def _int_attr(
    el: etree._Element, name: str, loc: Loc, *, lo: int = 0, hi: int = 1 << 63,
    hex_ok: bool = False,
) -> int | None:
    value = _get(el, name)
    if value is None:
        return None
    return _uint(value, loc, f"{name}", lo=lo, hi=hi, hex_ok=hex_ok)


def _signed_port(el: etree._Element, name: str, loc: Loc, *, lo: int) -> int | None:
    """A graphics port: -1 (pick one) or lo..65535."""
    value = _get(el, name)
    if value is None:
        return None
    if value.strip() == "-1":
        return -1
    return _uint(value, loc, name, lo=lo, hi=65535)


def _bool(
    el: etree._Element, name: str, loc: Loc, *, yes: str = "yes", no: str = "no"
) -> bool | None:
    value = _enum(el, name, loc, (yes, no))
    return None if value is None else value == yes


# Memory units as libvirt's virScaleInteger reads them (case-insensitive).
_UNITS: dict[str, int] = {"b": 1, "byte": 1, "bytes": 1}
for _i, _p in enumerate("kmgtpe", start=1):
    _UNITS[_p] = 1024**_i
    _UNITS[f"{_p}ib"] = 1024**_i
    _UNITS[f"{_p}b"] = 1000**_i


def _memory(el: etree._Element, loc: Loc, what: str) -> int:
    unit = (_get(el, "unit") or "KiB").strip()
    scale = _UNITS.get(unit.lower())
    if scale is None:
        raise fail(loc, f"unknown memory unit {unit!r}", attribute="unit")
    value = _uint(_text(el), loc, what, hi=_MAX_MEMORY_KIB * 1024)
    # Round up to whole KiB the way libvirt does.
    kib = -(-value * scale // 1024)
    if kib <= 0:
        raise fail(loc, f"{what} must be greater than 0")
    if kib > _MAX_MEMORY_KIB:
        raise fail(loc, f"{what} of {kib} KiB is larger than {_MAX_MEMORY_KIB} KiB")
    return kib


_CPUSET_RE = re.compile(r"^\^?[0-9]+(-[0-9]+)?(,\^?[0-9]+(-[0-9]+)?)*$")
_MACHINE_RE = re.compile(r"^(pc|q35|pc-i440fx-[0-9.]+|pc-q35-[0-9.]+)$")
_IDENT_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
_TARGET_DEV_RE = re.compile(r"^(hd|sd|vd)[a-z]{1,3}$")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")
_CHANNEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_KEYMAP_RE = re.compile(r"^[A-Za-z][A-Za-z-]{0,15}$")


def _ident(value: str, loc: Loc, what: str, pattern: re.Pattern[str] = _IDENT_RE) -> str:
    value = value.strip()
    if not pattern.fullmatch(value):
        raise fail(loc, f"invalid {what} {value!r}")
    return value


# --------------------------------------------------------------------------
# Step 3: the typed parse.
# --------------------------------------------------------------------------


def parse_domain(xml: str | bytes, *, where: str = "<xml>") -> Domain:
    """Parse and validate a libvirt domain XML document.

    ``where`` names the document in error messages (a file name, "migration
    cookie", ...). Defaults are filled in as libvirt fills them on define:
    a random UUID and MAC addresses when absent, ``currentMemory`` equal to
    ``memory``, a boot from ``hd`` when there is neither kernel nor boot
    device, a virtio memory balloon, a VGA video device for graphics without
    video, and so on (see :mod:`ferry.domain`).

    :raises XMLUnsupported: an element, attribute or value Ferry does not
        implement; the message names the element path and line.
    :raises XMLError: malformed or hostile XML (DOCTYPE, entities, over
        :data:`MAX_XML_BYTES`), or an invalid value (bad UUID, memory 0,
        relative or unsafe path, ...), again with element and line.
    """
    if not isinstance(where, str):
        where = str(where)
    root = _load(xml, where)
    ctx = _Ctx(where)
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise fail(ctx.loc(root, tag), f"root element is <{tag}>, expected <domain>")
    _walk(root, "domain", where)
    try:
        return _domain(ctx, root)
    except XMLError:
        raise
    except (ValueError, TypeError, KeyError, OverflowError) as exc:  # pragma: no cover
        # A bug of ours must still not leak as a non-XMLError to callers that
        # feed untrusted XML; keep the cause for the log.
        raise XMLError(f"{where}: cannot interpret domain XML: {exc!r}", where=where) from exc


def _domain(ctx: _Ctx, root: etree._Element) -> Domain:
    loc = ctx.loc(root, "domain")
    virt_type = cast(Literal["kvm", "qemu"], _enum(root, "type", loc, ("kvm", "qemu"),
                                                   what="domain type"))
    if virt_type is None:
        raise fail(loc, "the domain type attribute (kvm or qemu) is required")

    el = _one(root, "name", loc)
    if el is None:
        raise fail(loc, "<name> is required")
    name = check_name(_text(el), ctx.loc(el, "domain/name"))

    el = _one(root, "uuid", loc)
    uuid = (normalise_uuid(_text(el), ctx.loc(el, "domain/uuid")) if el is not None
            else str(uuidlib.uuid4()))

    title = None
    el = _one(root, "title", loc)
    if el is not None:
        title = check_safe_text(_text(el), ctx.loc(el, "domain/title"), "title")
    description = None
    el = _one(root, "description", loc)
    if el is not None:
        description = check_safe_text(_text(el), ctx.loc(el, "domain/description"),
                                      "description", newlines=True)

    metadata = None
    el = _one(root, "metadata", loc)
    if el is not None:
        metadata = _metadata(el)

    el = _one(root, "memory", loc)
    if el is None:
        raise fail(loc, "<memory> is required")
    memory_kib = _memory(el, ctx.loc(el, "domain/memory"), "memory")
    current_kib = memory_kib
    el = _one(root, "currentMemory", loc)
    if el is not None:
        cloc = ctx.loc(el, "domain/currentMemory")
        current_kib = _memory(el, cloc, "currentMemory")
        if current_kib > memory_kib:
            raise fail(cloc, f"currentMemory {current_kib} KiB is larger than "
                             f"memory {memory_kib} KiB")

    allocation: Literal["immediate", "ondemand"] | None = None
    prealloc_threads = None
    mb = _one(root, "memoryBacking", loc)
    if mb is not None:
        mbloc = ctx.loc(mb, "domain/memoryBacking")
        al = _one(mb, "allocation", mbloc)
        if al is not None:
            aloc = ctx.loc(al, "domain/memoryBacking/allocation")
            allocation = cast(Literal["immediate", "ondemand"] | None,
                              _enum(al, "mode", aloc, ("immediate", "ondemand")))
            prealloc_threads = _int_attr(al, "threads", aloc, lo=1, hi=1024)

    el = _one(root, "vcpu", loc)
    vcpus = 1
    placement = cpuset = None
    if el is not None:
        vloc = ctx.loc(el, "domain/vcpu")
        vcpus = _uint(_text(el), vloc, "vcpu count", lo=1, hi=_MAX_VCPUS)
        placement = _enum(el, "placement", vloc, ("static", "auto"))
        cpuset = _get(el, "cpuset")
        if cpuset is not None and not _CPUSET_RE.fullmatch(cpuset):
            raise fail(vloc, f"invalid cpuset {cpuset!r}", attribute="cpuset")

    os_ = _os(ctx, root, loc)
    cpu = None
    el = _one(root, "cpu", loc)
    if el is not None:
        cpu = _cpu(ctx, el, vcpus)
    features = Features()
    el = _one(root, "features", loc)
    if el is not None:
        features = _features(ctx, el)
    clock = Clock()
    el = _one(root, "clock", loc)
    if el is not None:
        clock = _clock(ctx, el)
    pm = PM()
    el = _one(root, "pm", loc)
    if el is not None:
        pm = _pm(ctx, el)

    lifecycle = {}
    for tag, default, choices in (
        ("on_poweroff", "destroy", ("destroy", "restart", "preserve", "rename-restart")),
        ("on_reboot", "restart", ("destroy", "restart", "preserve", "rename-restart")),
        ("on_crash", "destroy", ("destroy", "restart", "preserve", "rename-restart",
                                 "coredump-destroy", "coredump-restart")),
    ):
        el = _one(root, tag, loc)
        value = default
        if el is not None:
            value = _text(el).strip()
            if value not in choices:
                raise fail(ctx.loc(el, f"domain/{tag}"),
                           f"{tag} action {value!r} is not supported (supported: "
                           f"{', '.join(choices)})", cls=XMLUnsupported)
        lifecycle[tag] = value

    devices = _one(root, "devices", loc)
    dev = _devices(ctx, devices, os_) if devices is not None else _Devices()

    return Domain(
        virt_type=virt_type,
        name=name,
        uuid=uuid,
        memory_kib=memory_kib,
        current_memory_kib=current_kib,
        vcpus=vcpus,
        os=os_,
        title=title,
        description=description,
        metadata=metadata,
        memory_allocation=allocation,
        prealloc_threads=prealloc_threads,
        vcpu_placement=placement,
        vcpu_cpuset=cpuset,
        cpu=cpu,
        features=features,
        clock=clock,
        pm=pm,
        on_poweroff=lifecycle["on_poweroff"],
        on_reboot=lifecycle["on_reboot"],
        on_crash=lifecycle["on_crash"],
        emulator=dev.emulator,
        disks=tuple(dev.disks),
        controllers=tuple(dev.controllers),
        interfaces=tuple(dev.interfaces),
        serials=tuple(dev.serials),
        consoles=tuple(dev.consoles),
        channels=tuple(dev.channels),
        inputs=tuple(dev.inputs),
        graphics=tuple(dev.graphics),
        audios=tuple(dev.audios),
        videos=tuple(dev.videos),
        memballoon=dev.memballoon,
        rngs=tuple(dev.rngs),
    )


def _metadata(el: etree._Element) -> str:
    """The content of <metadata> serialised verbatim (namespaces declared in place)."""
    parts = [el.text or ""]
    for child in el:
        parts.append(etree.tostring(child, encoding="unicode", with_tail=True))
    return "".join(parts)


def _os(ctx: _Ctx, root: etree._Element, dloc: Loc) -> OS:
    el = _one(root, "os", dloc)
    if el is None:
        raise fail(dloc, "<os> is required")
    loc = ctx.loc(el, "domain/os")
    t = _one(el, "type", loc)
    if t is None:
        raise fail(loc, "<os><type> is required")
    tloc = ctx.loc(t, "domain/os/type")
    ostype = _text(t).strip()
    if ostype != "hvm":
        raise fail(tloc, f"os type {ostype!r} is not supported (supported: hvm)",
                   cls=XMLUnsupported)
    arch = _enum(t, "arch", tloc, ("x86_64", "i686"), default="x86_64", what="architecture")
    machine = _get(t, "machine") or "pc"
    if not _MACHINE_RE.fullmatch(machine):
        raise fail(tloc, f"machine type {machine!r} is not supported (supported: pc, q35, "
                         "pc-i440fx-*, pc-q35-*)", cls=XMLUnsupported)

    def path_of(tag: str) -> str | None:
        k = _one(el, tag, loc)
        if k is None:
            return None
        return check_host_path(_text(k).strip(), ctx.loc(k, f"domain/os/{tag}"), tag)

    kernel = path_of("kernel")
    initrd = path_of("initrd")
    cmdline = None
    c = _one(el, "cmdline", loc)
    if c is not None:
        cmdline = check_safe_text(_text(c), ctx.loc(c, "domain/os/cmdline"), "cmdline")
    if (initrd or cmdline) and not kernel:
        raise fail(loc, "<initrd> and <cmdline> need a <kernel>")

    boot_devs: list[str] = []
    for b in _all(el, "boot"):
        bloc = ctx.loc(b, "domain/os/boot")
        dev = _enum(b, "dev", bloc, ("hd", "cdrom", "network"), what="boot device")
        if dev is None:
            raise fail(bloc, "<boot> needs a dev attribute")
        if dev in boot_devs:
            raise fail(bloc, f"boot device {dev!r} is listed twice")
        boot_devs.append(dev)
    if not boot_devs and kernel is None:
        boot_devs.append("hd")  # libvirt's default when nothing says how to boot
    bootmenu = timeout = None
    bm = _one(el, "bootmenu", loc)
    if bm is not None:
        bmloc = ctx.loc(bm, "domain/os/bootmenu")
        bootmenu = _bool(bm, "enable", bmloc)
        timeout = _int_attr(bm, "timeout", bmloc, hi=65535)
    return OS(
        type="hvm",
        arch=arch or "x86_64",
        machine=machine,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        boot_devs=tuple(boot_devs),
        bootmenu=bootmenu,
        bootmenu_timeout=timeout,
    )


def _cpu(ctx: _Ctx, el: etree._Element, vcpus: int) -> Cpu:
    loc = ctx.loc(el, "domain/cpu")
    mode = _enum(el, "mode", loc, ("custom", "host-model", "host-passthrough", "maximum"),
                 default="custom", what="cpu mode")
    match = _enum(el, "match", loc, ("minimum", "exact", "strict"))
    check = _enum(el, "check", loc, ("none", "partial", "full"))
    migratable = _bool(el, "migratable", loc, yes="on", no="off")
    if migratable is not None and mode not in ("host-passthrough", "maximum"):
        raise fail(loc, "migratable is only valid for host-passthrough and maximum")
    model = fallback = None
    m = _one(el, "model", loc)
    if m is not None:
        mloc = ctx.loc(m, "domain/cpu/model")
        fallback = _enum(m, "fallback", mloc, ("allow", "forbid"))
        text = _text(m).strip()
        if text:
            model = _ident(text, mloc, "CPU model")
    features: list[CpuFeature] = []
    seen: set[str] = set()
    for f in _all(el, "feature"):
        floc = ctx.loc(f, "domain/cpu/feature")
        fname = _get(f, "name")
        if fname is None:
            raise fail(floc, "<feature> needs a name")
        fname = _ident(fname, floc, "CPU feature name")
        if fname in seen:
            raise fail(floc, f"CPU feature {fname!r} is listed twice")
        seen.add(fname)
        policy = _enum(f, "policy", floc, ("force", "require", "optional", "disable", "forbid"),
                       default="require", what="feature policy")
        features.append(CpuFeature(fname, cast(Any, policy)))
    topology = None
    t = _one(el, "topology", loc)
    if t is not None:
        tloc = ctx.loc(t, "domain/cpu/topology")
        vals = {k: _int_attr(t, k, tloc, lo=1, hi=_MAX_VCPUS) for k in
                ("sockets", "dies", "cores", "threads")}
        topology = CpuTopology(
            sockets=vals["sockets"] or 1, dies=vals["dies"] or 1,
            cores=vals["cores"] or 1, threads=vals["threads"] or 1,
        )
        product = topology.sockets * topology.dies * topology.cores * topology.threads
        if product != vcpus:
            raise fail(tloc, f"topology gives {product} vCPUs but <vcpu> says {vcpus}")
    return Cpu(
        mode=cast(Any, mode), match=match, check=check, migratable=migratable,
        model=model, fallback=fallback, features=tuple(features), topology=topology,
    )


def _features(ctx: _Ctx, el: etree._Element) -> Features:
    loc = ctx.loc(el, "domain/features")
    apic = _one(el, "apic", loc)
    eoi = None
    if apic is not None:
        eoi = _bool(apic, "eoi", ctx.loc(apic, "domain/features/apic"), yes="on", no="off")
    return Features(
        acpi=_one(el, "acpi", loc) is not None,
        apic=apic is not None,
        apic_eoi=eoi,
        pae=_one(el, "pae", loc) is not None,
    )


def _clock(ctx: _Ctx, el: etree._Element) -> Clock:
    loc = ctx.loc(el, "domain/clock")
    offset = _enum(el, "offset", loc, ("utc", "localtime"), default="utc", what="clock offset")
    timers: list[Timer] = []
    seen: set[str] = set()
    for t in _all(el, "timer"):
        tloc = ctx.loc(t, "domain/clock/timer")
        name = _enum(t, "name", tloc, ("rtc", "pit", "hpet", "kvmclock"), what="timer")
        if name is None:
            raise fail(tloc, "<timer> needs a name")
        if name in seen:
            raise fail(tloc, f"timer {name!r} is listed twice")
        seen.add(name)
        present = _bool(t, "present", tloc)
        # kvm-pit knows only delay and discard as lost tick policies.
        policies = {"rtc": ("catchup", "delay"), "pit": ("delay", "discard"),
                    "hpet": (), "kvmclock": ()}[name]
        tickpolicy = _enum(t, "tickpolicy", tloc, policies, what=f"{name} tickpolicy")
        track = _enum(t, "track", tloc, ("guest", "wall", "realtime") if name == "rtc" else (),
                      what=f"{name} track")
        timers.append(Timer(name, present, tickpolicy, track))
    return Clock(offset=cast(Any, offset), timers=tuple(timers))


def _pm(ctx: _Ctx, el: etree._Element) -> PM:
    loc = ctx.loc(el, "domain/pm")
    values: dict[str, bool | None] = {}
    for tag in ("suspend-to-mem", "suspend-to-disk"):
        s = _one(el, tag, loc)
        values[tag] = None if s is None else _bool(s, "enabled", ctx.loc(s, f"domain/pm/{tag}"))
    return PM(suspend_to_mem=values["suspend-to-mem"], suspend_to_disk=values["suspend-to-disk"])


# -- devices ---------------------------------------------------------------


@dataclass
class _Devices:
    emulator: str | None = None
    disks: list[Disk] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=list)
    interfaces: list[Interface] = field(default_factory=list)
    serials: list[CharDev] = field(default_factory=list)
    consoles: list[CharDev] = field(default_factory=list)
    channels: list[CharDev] = field(default_factory=list)
    inputs: list[Input] = field(default_factory=list)
    graphics: list[Graphics] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    memballoon: Memballoon = field(default_factory=Memballoon)
    rngs: list[Rng] = field(default_factory=list)


def _address(ctx: _Ctx, parent: etree._Element, ploc: Loc, allowed: tuple[str, ...],
             ) -> Address | None:
    el = _one(parent, "address", ploc)
    if el is None:
        return None
    loc = ctx.loc(el, f"{ploc.element}/address")
    atype = _enum(el, "type", loc, allowed, what="address type")
    if atype is None:
        raise fail(loc, "<address> needs a type")
    fields: dict[str, tuple[str, ...]] = {
        "pci": ("type", "domain", "bus", "slot", "function", "multifunction"),
        "drive": ("type", "controller", "bus", "target", "unit"),
        "virtio-serial": ("type", "controller", "bus", "port"),
        "usb": ("type", "bus", "port"),
    }
    for name in el.attrib:
        if str(name) not in fields[atype]:
            raise fail(loc, f"attribute {name!r} is not valid for a {atype} address",
                       cls=XMLUnsupported, attribute=str(name))
    if atype == "pci":
        domain = _int_attr(el, "domain", loc, hi=0xFFFF, hex_ok=True) or 0
        bus = _int_attr(el, "bus", loc, hi=0xFF, hex_ok=True) or 0
        slot = _int_attr(el, "slot", loc, hi=0x1F, hex_ok=True)
        function = _int_attr(el, "function", loc, hi=7, hex_ok=True) or 0
        if slot is None:
            raise fail(loc, "a pci address needs a slot")
        if domain != 0 or bus != 0:
            # Only the root bus exists: Ferry adds no PCI bridges.
            raise fail(loc, "pci addresses off the root bus (domain 0, bus 0) are not supported",
                       cls=XMLUnsupported)
        multi = _bool(el, "multifunction", loc, yes="on", no="off")
        return Address("pci", domain=domain, bus=bus, slot=slot, function=function,
                       multifunction=multi)
    if atype == "drive":
        return Address(
            "drive",
            controller=_int_attr(el, "controller", loc, hi=31, hex_ok=True) or 0,
            bus=_int_attr(el, "bus", loc, hi=31, hex_ok=True) or 0,
            target=_int_attr(el, "target", loc, hi=255, hex_ok=True) or 0,
            unit=_int_attr(el, "unit", loc, hi=16383, hex_ok=True) or 0,
        )
    if atype == "virtio-serial":
        return Address(
            "virtio-serial",
            controller=_int_attr(el, "controller", loc, hi=31, hex_ok=True) or 0,
            bus=_int_attr(el, "bus", loc, hi=0, hex_ok=True) or 0,
            port=_int_attr(el, "port", loc, lo=1, hi=31, hex_ok=True),
        )
    return Address(
        "usb",
        bus=_int_attr(el, "bus", loc, hi=31, hex_ok=True) or 0,
        port=_int_attr(el, "port", loc, lo=1, hi=127),
    )


def _devices(ctx: _Ctx, el: etree._Element, os_: OS) -> _Devices:
    dloc = ctx.loc(el, "domain/devices")
    out = _Devices()
    em = _one(el, "emulator", dloc)
    if em is not None:
        out.emulator = check_host_path(_text(em).strip(), ctx.loc(em, "domain/devices/emulator"),
                                       "emulator")
    handlers: dict[str, Callable[[etree._Element], None]] = {
        "disk": lambda e: out.disks.append(_disk(ctx, e)),
        "controller": lambda e: out.controllers.append(_controller(ctx, e, os_)),
        "interface": lambda e: out.interfaces.append(_interface(ctx, e)),
        "serial": lambda e: out.serials.append(_chardev(ctx, e, "serial", len(out.serials))),
        "console": lambda e: out.consoles.append(_chardev(ctx, e, "console", len(out.consoles))),
        "channel": lambda e: out.channels.append(_chardev(ctx, e, "channel", 0)),
        "input": lambda e: out.inputs.append(_input(ctx, e)),
        "graphics": lambda e: out.graphics.append(_graphics(ctx, e)),
        "audio": lambda e: out.audios.append(_audio(ctx, e)),
        "video": lambda e: out.videos.append(_video(ctx, e)),
        "rng": lambda e: out.rngs.append(_rng(ctx, e)),
    }
    balloons = 0
    for child in _elements(el):
        tag = str(child.tag)
        if tag == "emulator":
            continue
        if tag == "memballoon":
            balloons += 1
            if balloons > 1:
                raise fail(ctx.loc(child, "domain/devices/memballoon"),
                           "<memballoon> appears more than once")
            out.memballoon = _memballoon(ctx, child)
            continue
        handlers[tag](child)
    _cross_checks(ctx, el, out, os_)
    return out


def _disk(ctx: _Ctx, el: etree._Element) -> Disk:
    path = "domain/devices/disk"
    loc = ctx.loc(el, path)
    dtype = _enum(el, "type", loc, ("file", "block"), default="file", what="disk type")
    device = _enum(el, "device", loc, ("disk", "cdrom"), default="disk", what="disk device")
    tgt = _one(el, "target", loc)
    if tgt is None:
        raise fail(loc, "<disk> needs a <target>")
    tloc = ctx.loc(tgt, f"{path}/target")
    dev = _get(tgt, "dev")
    if dev is None:
        raise fail(tloc, "<target> needs a dev attribute")
    dev = _ident(dev, tloc, "disk target", _TARGET_DEV_RE)
    bus = _enum(tgt, "bus", tloc, ("virtio", "ide", "scsi", "sata", "usb"), what="disk bus")
    if bus is None:
        bus = {"hd": "ide", "sd": "scsi", "vd": "virtio"}[dev[:2]]
    if device == "cdrom" and bus == "virtio":
        raise fail(tloc, "a cdrom on the virtio bus is not supported", cls=XMLUnsupported)

    source = None
    src = _one(el, "source", loc)
    if src is not None:
        sloc = ctx.loc(src, f"{path}/source")
        want, other = ("file", "dev") if dtype == "file" else ("dev", "file")
        if _get(src, other) is not None:
            raise fail(sloc, f"a disk of type {dtype!r} takes <source {want}=…>, not {other}")
        value = _get(src, want)
        if value is not None:
            source = check_host_path(value, sloc, "disk source", allow_dev=dtype == "block")
    if source is None and device == "disk":
        raise fail(loc, f"disk {dev} has no source (only a cdrom may be empty)")

    fmt = cache = io = discard = error_policy = rerror_policy = name = None
    event_idx = None
    drv = _one(el, "driver", loc)
    if drv is not None:
        drloc = ctx.loc(drv, f"{path}/driver")
        name = _enum(drv, "name", drloc, ("qemu",), what="disk driver")
        fmt = _enum(drv, "type", drloc, ("raw", "qcow2"), what="disk format")
        cache = _enum(drv, "cache", drloc,
                      ("none", "writeback", "writethrough", "directsync", "unsafe"),
                      what="cache mode")
        io = _enum(drv, "io", drloc, ("native", "threads", "io_uring"), what="io mode")
        discard = _enum(drv, "discard", drloc, ("unmap", "ignore"), what="discard")
        error_policy = _enum(drv, "error_policy", drloc, ("stop", "report", "ignore", "enospace"),
                             what="error_policy")
        rerror_policy = _enum(drv, "rerror_policy", drloc, ("stop", "report", "ignore"),
                              what="rerror_policy")
        event_idx = _bool(drv, "event_idx", drloc, yes="on", no="off")
        if io == "native" and cache not in ("none", "directsync"):
            # qemu refuses aio=native without O_DIRECT; say so at define time.
            raise fail(drloc, "io='native' needs cache='none' or cache='directsync'")
        if event_idx is not None and bus != "virtio":
            raise fail(drloc, "event_idx only applies to virtio disks")
    address = _address(ctx, el, loc, ("pci", "drive", "usb"))
    if address is not None:
        expected = {"virtio": "pci", "usb": "usb"}.get(bus, "drive")
        if address.type != expected:
            raise fail(loc, f"a {bus} disk takes a {expected} address, not {address.type}")
    return Disk(
        type=cast(Any, dtype), device=cast(Any, device), target_dev=dev,
        target_bus=cast(Any, bus), source=source, driver_name=name, format=fmt,
        cache=cache, io=io, discard=discard, error_policy=error_policy,
        rerror_policy=rerror_policy, event_idx=event_idx,
        # libvirt makes every cdrom read-only; so does Ferry (and says so in the XML).
        readonly=device == "cdrom" or _one(el, "readonly", loc) is not None,
        shareable=_one(el, "shareable", loc) is not None,
        address=address,
    )


_CONTROLLER_MODELS: dict[str, tuple[str, ...]] = {
    "usb": ("piix3-uhci", "qemu-xhci", "nec-xhci", "ich9-ehci1", "none"),
    "ide": (),
    "sata": (),
    "scsi": ("lsilogic", "virtio-scsi"),
    "virtio-serial": (),
    "pci": ("pci-root", "pcie-root"),
}


def _controller(ctx: _Ctx, el: etree._Element, os_: OS) -> Controller:
    loc = ctx.loc(el, "domain/devices/controller")
    ctype = _enum(el, "type", loc, tuple(_CONTROLLER_MODELS), what="controller type")
    if ctype is None:
        raise fail(loc, "<controller> needs a type")
    index = _int_attr(el, "index", loc, hi=31) or 0
    model = _enum(el, "model", loc, _CONTROLLER_MODELS[ctype], what=f"{ctype} controller model")
    if ctype == "pci":
        want = "pcie-root" if os_.is_q35 else "pci-root"
        if model != want or index != 0:
            raise fail(loc, f"only the {want} controller with index 0 is supported on machine "
                            f"{os_.machine!r} (no PCI bridges)", cls=XMLUnsupported)
    ports = _int_attr(el, "ports", loc, lo=1, hi=31 if ctype == "virtio-serial" else 15)
    if ports is not None and not (ctype == "virtio-serial"
                                  or (ctype == "usb" and model in ("qemu-xhci", "nec-xhci"))):
        raise fail(loc, "ports is only valid for virtio-serial and xhci USB controllers")
    if ctype in ("ide", "sata", "usb", "scsi") and index != 0:
        raise fail(loc, f"only one {ctype} controller (index 0) is supported",
                   cls=XMLUnsupported)
    if ctype == "ide" and os_.is_q35:
        raise fail(loc, "the q35 machine has no IDE controller (use sata)", cls=XMLUnsupported)
    address = _address(ctx, el, loc, ("pci",))
    return Controller(type=ctype, index=index, model=model, ports=ports, address=address)


def _random_mac() -> str:
    # libvirt's prefix for generated addresses (QEMU's OUI).
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _interface(ctx: _Ctx, el: etree._Element) -> Interface:
    path = "domain/devices/interface"
    loc = ctx.loc(el, path)
    itype = _enum(el, "type", loc, ("user", "bridge", "network"), what="interface type")
    if itype is None:
        raise fail(loc, "<interface> needs a type")
    mac_el = _one(el, "mac", loc)
    if mac_el is not None:
        mloc = ctx.loc(mac_el, f"{path}/mac")
        raw = _get(mac_el, "address")
        if raw is None:
            raise fail(mloc, "<mac> needs an address")
        mac = normalise_mac(raw, mloc)
    else:
        mac = _random_mac()
    model = None
    m = _one(el, "model", loc)
    if m is not None:
        model = _enum(m, "type", ctx.loc(m, f"{path}/model"),
                      ("virtio", "rtl8139", "e1000", "e1000e"), what="NIC model")
    source = None
    s = _one(el, "source", loc)
    if s is not None:
        sloc = ctx.loc(s, f"{path}/source")
        net, br = _get(s, "network"), _get(s, "bridge")
        if itype == "network" and net is not None and br is None:
            source = check_safe_text(net, sloc, "network name")
            if not source:
                raise fail(sloc, "empty network name")
        elif itype == "bridge" and br is not None and net is None:
            source = _ident(br, sloc, "bridge name", _BRIDGE_RE)
        elif itype == "user" and net is None and br is None:
            pass
        else:
            raise fail(sloc, f"<source> does not fit an interface of type {itype!r}")
    if itype in ("bridge", "network") and source is None:
        raise fail(loc, f"an interface of type {itype!r} needs <source {itype}=…>")
    mtu = None
    mt = _one(el, "mtu", loc)
    if mt is not None:
        mtu = _int_attr(mt, "size", ctx.loc(mt, f"{path}/mtu"), lo=68, hi=65535)
        if mtu is None:
            raise fail(ctx.loc(mt, f"{path}/mtu"), "<mtu> needs a size")
    sndbuf = None
    tune = _one(el, "tune", loc)
    if tune is not None:
        sb = _one(tune, "sndbuf", ctx.loc(tune, f"{path}/tune"))
        if sb is not None:
            sndbuf = _uint(_text(sb), ctx.loc(sb, f"{path}/tune/sndbuf"), "sndbuf")
    return Interface(type=cast(Any, itype), mac=mac, model=model, source=source, mtu=mtu,
                     sndbuf=sndbuf, address=_address(ctx, el, loc, ("pci",)))


def _chardev(ctx: _Ctx, el: etree._Element, kind: str, index: int) -> CharDev:
    path = f"domain/devices/{kind}"
    loc = ctx.loc(el, path)
    ctype = _enum(el, "type", loc, ("pty", "file", "unix", "null"), default="pty",
                  what=f"{kind} type")
    src = _one(el, "source", loc)
    spath = mode = None
    append = None
    if src is not None:
        sloc = ctx.loc(src, f"{path}/source")
        raw = _get(src, "path")
        if ctype in ("pty", "null"):
            # libvirt's live XML shows the allocated pty as <source path='/dev/pts/N'/>;
            # it is runtime state, not configuration, so it is dropped.
            if _get(src, "mode") is not None or _get(src, "append") is not None:
                raise fail(sloc, f"mode/append do not apply to a {ctype} {kind}")
        else:
            if raw is not None:
                spath = check_host_path(raw, sloc, f"{kind} path", unix_socket=ctype == "unix")
            if ctype == "unix":
                mode = _enum(src, "mode", sloc, ("bind", "connect"), what="socket mode")
            elif _get(src, "mode") is not None:
                raise fail(sloc, "mode only applies to unix sockets")
            if ctype == "file":
                append = _bool(src, "append", sloc, yes="on", no="off")
            elif _get(src, "append") is not None:
                raise fail(sloc, "append only applies to files")
    if ctype == "unix" and mode is None:
        mode = "bind"
    if ctype == "file" and spath is None:
        raise fail(loc, f"a file {kind} needs <source path=…>")
    # A unix serial/console/channel in bind mode may leave its path to the
    # agent (RuntimePaths.run_dir): a per-host path lets a migrated domain
    # bind the same socket name on the destination host.
    if ctype == "unix" and spath is None and mode == "connect":
        raise fail(loc, f"a unix {kind} in connect mode needs <source path=…>")

    tgt = _one(el, "target", loc)
    tloc = ctx.loc(tgt, f"{path}/target") if tgt is not None else loc
    target_port = target_name = target_model = None
    address = None
    if kind == "serial":
        ttype = "isa-serial"
        if tgt is not None:
            ttype = _enum(tgt, "type", tloc, ("isa-serial",), default="isa-serial",
                          what="serial target type") or ttype
            target_port = _int_attr(tgt, "port", tloc, hi=3)
            mdl = _one(tgt, "model", tloc)
            if mdl is not None:
                target_model = _enum(mdl, "name", ctx.loc(mdl, f"{path}/target/model"),
                                     ("isa-serial",), what="serial model")
        if target_port is None:
            target_port = index
    elif kind == "console":
        ttype = "serial"
        if tgt is not None:
            ttype = _enum(tgt, "type", tloc, ("serial", "virtio"), default="serial",
                          what="console target type") or ttype
            target_port = _int_attr(tgt, "port", tloc, hi=31)
        if target_port is None:
            target_port = index
        address = _address(ctx, el, loc, ("virtio-serial",))
        if address is not None and ttype != "virtio":
            raise fail(loc, "only a virtio console takes an address")
    else:
        if tgt is None:
            raise fail(loc, "<channel> needs a <target type='virtio'>")
        ttype = _enum(tgt, "type", tloc, ("virtio",), what="channel target type") or ""
        if not ttype:
            raise fail(tloc, "<target> needs type='virtio'")
        name = _get(tgt, "name")
        if name is not None:
            target_name = _ident(name, tloc, "channel name", _CHANNEL_NAME_RE)
        address = _address(ctx, el, loc, ("virtio-serial",))
    return CharDev(
        type=cast(Any, ctype), target_type=ttype, source_path=spath,
        source_mode=cast(Any, mode), append=append, target_port=target_port,
        target_name=target_name, target_model=target_model, address=address,
    )


def _input(ctx: _Ctx, el: etree._Element) -> Input:
    loc = ctx.loc(el, "domain/devices/input")
    itype = _enum(el, "type", loc, ("mouse", "keyboard", "tablet"), what="input type")
    if itype is None:
        raise fail(loc, "<input> needs a type")
    bus = _enum(el, "bus", loc, ("ps2", "usb", "virtio"), what="input bus",
                default="usb" if itype == "tablet" else "ps2")
    if itype == "tablet" and bus == "ps2":
        raise fail(loc, "a tablet cannot be on the ps2 bus")
    address = _address(ctx, el, loc, ("usb", "pci"))
    if address is not None and address.type != {"usb": "usb", "virtio": "pci"}.get(bus or ""):
        raise fail(loc, f"a {bus} input does not take a {address.type} address")
    return Input(type=cast(Any, itype), bus=cast(Any, bus), address=address)


def _graphics(ctx: _Ctx, el: etree._Element) -> Graphics:
    path = "domain/devices/graphics"
    loc = ctx.loc(el, path)
    gtype = _enum(el, "type", loc, ("vnc", "spice"), what="graphics type")
    if gtype is None:
        raise fail(loc, "<graphics> needs a type")
    vnc = gtype == "vnc"
    for attr in ("tlsPort", "defaultMode") if vnc else ("websocket", "sharePolicy"):
        if _get(el, attr) is not None:
            raise fail(loc, f"attribute {attr!r} does not apply to {gtype} graphics",
                       cls=XMLUnsupported, attribute=attr)
    port = _signed_port(el, "port", loc, lo=5900 if vnc else 1)
    tls_port = _signed_port(el, "tlsPort", loc, lo=1)
    websocket = _signed_port(el, "websocket", loc, lo=1)
    autoport_attr = _bool(el, "autoport", loc)
    # libvirt: port='-1' or no port at all means autoport.
    autoport = autoport_attr if autoport_attr is not None else port in (None, -1)
    if port == -1:
        autoport, port = True, None
    if not autoport and port is None:
        raise fail(loc, "autoport='no' needs a port")
    if tls_port == -1:
        tls_port = None if autoport else -1
        if tls_port == -1:
            raise fail(loc, "tlsPort='-1' needs autoport='yes'")
    listen = None
    attr_listen = _get(el, "listen")
    if attr_listen is not None:
        listen = check_listen(attr_listen, loc)
    for li in _all(el, "listen"):
        lloc = ctx.loc(li, f"{path}/listen")
        _enum(li, "type", lloc, ("address",), what="listen type")
        addr = _get(li, "address")
        if addr is None:
            continue
        addr = check_listen(addr, lloc)
        if listen is not None and addr != listen:
            raise fail(lloc, f"listen address {addr!r} differs from the listen attribute "
                             f"{listen!r}")
        listen = addr
    keymap = _get(el, "keymap")
    if keymap is not None:
        keymap = _ident(keymap, loc, "keymap", _KEYMAP_RE)
    share = _enum(el, "sharePolicy", loc, ("allow-exclusive", "force-shared", "ignore"),
                  what="sharePolicy")
    default_mode = _enum(el, "defaultMode", loc, ("any", "secure", "insecure"),
                         what="defaultMode")
    options: list[GraphicsOption] = []
    for child in _elements(el):
        tag = str(child.tag)
        if tag == "listen":
            continue
        cloc = ctx.loc(child, f"{path}/{tag}")
        if vnc:
            raise fail(cloc, f"<{tag}> does not apply to vnc graphics", cls=XMLUnsupported)
        allowed = _SPICE_OPTIONS[tag]
        attrs: list[tuple[str, str]] = []
        for key in allowed:  # the schema's order: name before mode
            value = _enum(child, key, cloc, tuple(sorted(allowed[key])), what=f"{tag} {key}")
            if value is None:
                raise fail(cloc, f"<{tag}> needs a {key} attribute")
            attrs.append((key, value))
        if tag != "channel" and any(o.element == tag for o in options):
            raise fail(cloc, f"<{tag}> appears more than once")
        options.append(GraphicsOption(tag, tuple(attrs)))
    return Graphics(
        type=cast(Any, gtype), port=port, autoport=autoport, tls_port=tls_port,
        websocket=websocket, listen=listen, keymap=keymap, share_policy=share,
        default_mode=default_mode, options=tuple(options),
    )


def _video(ctx: _Ctx, el: etree._Element) -> Video:
    path = "domain/devices/video"
    loc = ctx.loc(el, path)
    address = _address(ctx, el, loc, ("pci",))
    m = _one(el, "model", loc)
    if m is None:
        return Video(address=address)
    mloc = ctx.loc(m, f"{path}/model")
    model = _enum(m, "type", mloc, ("vga", "cirrus", "qxl", "virtio", "bochs", "none"),
                  default="vga", what="video model")
    sizes = {k: _int_attr(m, k, mloc, lo=1, hi=1 << 22) for k in ("vram", "ram", "vgamem")}
    if sizes["ram"] is not None and model != "qxl":
        raise fail(mloc, "ram only applies to qxl video")
    if sizes["vgamem"] is not None and model != "qxl":
        raise fail(mloc, "vgamem only applies to qxl video")
    return Video(
        model=model or "vga", vram=sizes["vram"], ram=sizes["ram"], vgamem=sizes["vgamem"],
        heads=_int_attr(m, "heads", mloc, lo=1, hi=16),
        primary=_bool(m, "primary", mloc), address=address,
    )


_AUDIO_TYPES = ("none", "alsa", "coreaudio", "dbus", "file", "jack", "oss", "pipewire",
                "pulseaudio", "sdl", "spice")


def _audio(ctx: _Ctx, el: etree._Element) -> Audio:
    loc = ctx.loc(el, "domain/devices/audio")
    aid = _int_attr(el, "id", loc, lo=1, hi=1 << 16)
    atype = _enum(el, "type", loc, _AUDIO_TYPES, what="audio type")
    if aid is None or atype is None:
        raise fail(loc, "<audio> needs id and type")
    return Audio(id=aid, type=atype)


def _memballoon(ctx: _Ctx, el: etree._Element) -> Memballoon:
    loc = ctx.loc(el, "domain/devices/memballoon")
    model = _enum(el, "model", loc, ("virtio", "none"), what="memballoon model")
    if model is None:
        raise fail(loc, "<memballoon> needs a model")
    address = _address(ctx, el, loc, ("pci",))
    if address is not None and model == "none":
        raise fail(loc, "memballoon model 'none' takes no address")
    return Memballoon(model=cast(Any, model), address=address)


# Host entropy sources a guest may read; anything else under /dev is refused.
_RNG_SOURCES = ("/dev/urandom", "/dev/random", "/dev/hwrng")


def _rng(ctx: _Ctx, el: etree._Element) -> Rng:
    path = "domain/devices/rng"
    loc = ctx.loc(el, path)
    _enum(el, "model", loc, ("virtio",), what="rng model")
    be = _one(el, "backend", loc)
    if be is None:
        raise fail(loc, "<rng> needs a <backend>")
    bloc = ctx.loc(be, f"{path}/backend")
    bmodel = _enum(be, "model", bloc, ("random", "builtin"), what="rng backend")
    if bmodel is None:
        raise fail(bloc, "<backend> needs a model")
    bpath = None
    text = _text(be).strip()
    if bmodel == "random":
        bpath = text or "/dev/urandom"
        if bpath not in _RNG_SOURCES:
            raise fail(bloc, f"rng source {bpath!r} is not allowed (allowed: "
                             f"{', '.join(_RNG_SOURCES)})")
    elif text:
        raise fail(bloc, "the builtin backend takes no path")
    rate_bytes = rate_period = None
    rate = _one(el, "rate", loc)
    if rate is not None:
        rloc = ctx.loc(rate, f"{path}/rate")
        rate_bytes = _int_attr(rate, "bytes", rloc, lo=1, hi=1 << 31)
        rate_period = _int_attr(rate, "period", rloc, lo=1, hi=1 << 31)
        if rate_bytes is None:
            raise fail(rloc, "<rate> needs bytes")
    return Rng(backend_model=cast(Any, bmodel), backend_path=bpath, rate_bytes=rate_bytes,
               rate_period=rate_period, address=_address(ctx, el, loc, ("pci",)))


def _cross_checks(ctx: _Ctx, el: etree._Element, out: _Devices, os_: OS) -> None:
    """Checks that span devices: unique targets and addresses, video needs graphics."""
    dloc = ctx.loc(el, "domain/devices")

    def dev_loc(tag: str, n: int) -> Loc:
        found = _all(el, tag)
        return ctx.loc(found[n], f"domain/devices/{tag}") if n < len(found) else dloc

    seen: dict[str, int] = {}
    for i, d in enumerate(out.disks):
        if d.target_dev in seen:
            raise fail(dev_loc("disk", i), f"disk target {d.target_dev!r} is used twice")
        seen[d.target_dev] = i
        if d.target_bus == "ide" and os_.is_q35:
            raise fail(dev_loc("disk", i), "the q35 machine has no IDE bus (use sata)",
                       cls=XMLUnsupported)

    if out.videos and not out.graphics:
        raise fail(dev_loc("video", 0), "<video> without <graphics> is not supported "
                                        "(Ferry guests are headless unless they have graphics)",
                   cls=XMLUnsupported)
    for kind in ("vnc", "spice"):
        if sum(g.type == kind for g in out.graphics) > 1:
            raise fail(dloc, f"more than one {kind} <graphics> is not supported",
                       cls=XMLUnsupported)
    if out.graphics and not out.videos:
        out.videos.append(Video())  # libvirt adds a default video device too
    for i, v in enumerate(out.videos):
        if v.model == "none" and len(out.videos) > 1:
            raise fail(dev_loc("video", i), "video model 'none' must be the only video")
        if i > 0 and v.primary:
            raise fail(dev_loc("video", i), "only the first <video> may be primary",
                       cls=XMLUnsupported)
        if i > 0 and v.model not in ("qxl", "virtio"):
            raise fail(dev_loc("video", i), f"a secondary video must be qxl or virtio, "
                                            f"not {v.model!r}", cls=XMLUnsupported)

    ports: set[int] = set()
    for i, s in enumerate(out.serials):
        assert s.target_port is not None
        if s.target_port in ports:
            raise fail(dev_loc("serial", i), f"serial port {s.target_port} is used twice")
        ports.add(s.target_port)
    cports: set[int] = set()
    for i, c in enumerate(out.consoles):
        if c.target_type == "serial":
            assert c.target_port is not None
            if c.target_port in cports:
                raise fail(dev_loc("console", i), f"console port {c.target_port} is used twice")
            cports.add(c.target_port)
            if c.target_port > 3:
                raise fail(dev_loc("console", i), "a serial console port must be 0..3")
    names: set[str] = set()
    for i, c in enumerate(out.channels):
        if c.target_name is not None:
            if c.target_name in names:
                raise fail(dev_loc("channel", i), f"channel name {c.target_name!r} is used twice")
            names.add(c.target_name)
    ctrls: set[tuple[str, int]] = set()
    for i, ct in enumerate(out.controllers):
        if (ct.type, ct.index) in ctrls:
            raise fail(dev_loc("controller", i),
                       f"{ct.type} controller index {ct.index} is defined twice")
        ctrls.add((ct.type, ct.index))
    ids: set[int] = set()
    for i, a in enumerate(out.audios):
        if a.id in ids:
            raise fail(dev_loc("audio", i), f"audio id {a.id} is used twice")
        ids.add(a.id)

    # A PCI slot/function or a drive position can hold only one device.
    pci: dict[tuple[int, int], str] = {}
    drive: dict[tuple[str, int, int, int, int], str] = {}
    vser: dict[tuple[int, int], str] = {}
    for what, addr in _addressed(out):
        if addr.type == "pci":
            key = (addr.slot or 0, addr.function or 0)
            if key in pci:
                raise fail(dloc, f"pci address slot {key[0]:#04x} function {key[1]} is used by "
                                 f"both {pci[key]} and {what}")
            pci[key] = what
        elif addr.type == "drive":
            bus = what.split()[0]
            dkey = (bus, addr.controller or 0, addr.bus or 0, addr.target or 0, addr.unit or 0)
            if dkey in drive:
                raise fail(dloc, f"drive address {dkey[1:]} is used by both {drive[dkey]} "
                                 f"and {what}")
            drive[dkey] = what
        elif addr.type == "virtio-serial" and addr.port is not None:
            vkey = (addr.controller or 0, addr.port)
            if vkey in vser:
                raise fail(dloc, f"virtio-serial port {vkey} is used by both {vser[vkey]} "
                                 f"and {what}")
            vser[vkey] = what


def _addressed(out: _Devices) -> Iterator[tuple[str, Address]]:
    for d in out.disks:
        if d.address:
            yield f"{d.target_bus} disk {d.target_dev}", d.address
    for c in out.controllers:
        if c.address:
            yield f"{c.type} controller {c.index}", c.address
    for n in out.interfaces:
        if n.address:
            yield f"interface {n.mac}", n.address
    for i, ch in enumerate(out.consoles):
        if ch.address:
            yield f"console {i}", ch.address
    for i, ch in enumerate(out.channels):
        if ch.address:
            yield f"channel {i}", ch.address
    for i, inp in enumerate(out.inputs):
        if inp.address:
            yield f"input {i}", inp.address
    for i, v in enumerate(out.videos):
        if v.address:
            yield f"video {i}", v.address
    if out.memballoon.address:
        yield "memballoon", out.memballoon.address
    for i, r in enumerate(out.rngs):
        if r.address:
            yield f"rng {i}", r.address
