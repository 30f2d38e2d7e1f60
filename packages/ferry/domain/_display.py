"""Display and sound: ``<graphics>``, ``<video>`` and ``<audio>``."""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, check_listen, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import (
    all_of,
    elements,
    enum,
    get,
    ident,
    int_attr,
    one,
    signed_port,
    yes_no,
)
from ferry.domain.model import Audio, Graphics, GraphicsOption, Video
from ferry.errors import XMLUnsupported

__all__ = ["SPICE_OPTIONS", "parse_audio", "parse_graphics", "parse_video"]

KEYMAP_RE = re.compile(r"^[A-Za-z][A-Za-z-]{0,15}$")
_GRAPHICS = "domain/devices/graphics"

# Spice children and the values each attribute may take.
SPICE_OPTIONS: dict[str, dict[str, frozenset[str]]] = {
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


def parse_graphics(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Graphics:
    """A vnc or spice ``<graphics>``."""
    loc = ctx.loc(el, _GRAPHICS)
    gtype = enum(el, "type", loc, ("vnc", "spice"), what="graphics type")
    if gtype is None:
        raise fail(loc, "<graphics> needs a type", hint="add type='vnc' or type='spice'")
    vnc = gtype == "vnc"
    mark = ctx.count
    for attr in ("tlsPort", "defaultMode") if vnc else ("websocket", "sharePolicy"):
        if get(el, attr) is not None:
            ctx.report(loc, f"attribute {attr!r} does not apply to {gtype} graphics",
                       cls=XMLUnsupported, kind="unsupported-attribute",
                       hint=f"remove {attr!r}", attribute=attr)
    ports = ctx.guard(_ports, el, loc, vnc)
    listen = ctx.guard(_listen, ctx, el, loc)
    # <listen type='address'/> without an address: the host's default
    # address, as with no listen at all; kept so that it round-trips.
    listen_element = listen is None and bool(all_of(el, "listen"))
    keymap = ctx.guard(_keymap, el, loc)
    share = ctx.guard(enum, el, "sharePolicy", loc,
                      ("allow-exclusive", "force-shared", "ignore"), what="sharePolicy")
    default_mode = ctx.guard(enum, el, "defaultMode", loc, ("any", "secure", "insecure"),
                             what="defaultMode")
    options: list[GraphicsOption] = []
    seen: set[str] = set()
    for child in elements(el):
        tag = str(child.tag)
        if tag == "listen":
            continue
        cloc = ctx.loc(child, f"{_GRAPHICS}/{tag}")
        if vnc:
            ctx.report(cloc, f"<{tag}> does not apply to vnc graphics", cls=XMLUnsupported,
                       hint=f"remove <{tag}> (it is a spice option)")
            continue
        option = ctx.guard(_option, child, tag, cloc)
        if tag != "channel" and tag in seen:
            ctx.report(cloc, f"<{tag}> appears more than once", hint=f"keep one <{tag}>")
        seen.add(tag)
        if option is not None:
            options.append(option)
    if ports is None or ctx.count != mark:
        raise Skip()
    port, autoport, tls_port, websocket = ports
    return Graphics(
        type=cast(Any, gtype), port=port, autoport=autoport, tls_port=tls_port,
        websocket=websocket, listen=listen, listen_element=listen_element, keymap=keymap,
        share_policy=share,
        default_mode=default_mode, options=tuple(options),
    )


def _ports(
    el: etree._Element, loc: Loc, vnc: bool
) -> tuple[int | None, bool, int | None, int | None]:
    """port, autoport, tlsPort and websocket, as libvirt reads them together."""
    port = signed_port(el, "port", loc, lo=5900 if vnc else 1)
    tls_port = signed_port(el, "tlsPort", loc, lo=1)
    websocket = signed_port(el, "websocket", loc, lo=1)
    autoport_attr = yes_no(el, "autoport", loc)
    # libvirt: port='-1' or no port at all means autoport.
    autoport = autoport_attr if autoport_attr is not None else port in (None, -1)
    if port == -1:
        autoport, port = True, None
    if not autoport and port is None:
        raise fail(loc, "autoport='no' needs a port", hint="add port='5900', or autoport='yes'")
    if tls_port == -1 and not autoport:
        raise fail(loc, "tlsPort='-1' needs autoport='yes'",
                   hint="give tlsPort a number, or use autoport='yes'")
    # With autoport, tlsPort='-1' (virt-install writes it) stays -1: a TLS
    # port is chosen at start when the host has spice TLS set up.
    return port, autoport, tls_port, websocket


def _listen(ctx: Ctx, el: etree._Element, loc: Loc) -> str | None:
    """The listen address: the attribute, or ``<listen type='address'>`` (which agree)."""
    listen = None
    attr_listen = get(el, "listen")
    if attr_listen is not None:
        listen = check_listen(attr_listen, loc)
    for li in all_of(el, "listen"):
        lloc = ctx.loc(li, f"{_GRAPHICS}/listen")
        if get(li, "type") == "network":
            raise fail(lloc, "listen type 'network' is not supported (it needs the address "
                             "of a libvirt virtual network)", cls=XMLUnsupported,
                       attribute="type", value="network",
                       hint="use <listen type='address' address='…'/> with the host's address")
        enum(li, "type", lloc, ("address",), what="listen type")
        if get(li, "network") is not None:
            raise fail(lloc, "attribute 'network' only applies to <listen type='network'>",
                       cls=XMLUnsupported, attribute="network", hint="remove 'network'")
        addr = get(li, "address")
        if addr is None:
            continue
        addr = check_listen(addr, lloc)
        if listen is not None and addr != listen:
            raise fail(lloc, f"listen address {addr!r} differs from the listen attribute "
                             f"{listen!r}", hint="give both the same address")
        listen = addr
    return listen


def _keymap(el: etree._Element, loc: Loc) -> str | None:
    keymap = get(el, "keymap")
    return ident(keymap, loc, "keymap", KEYMAP_RE) if keymap is not None else None


def _option(child: etree._Element, tag: str, cloc: Loc) -> GraphicsOption:
    """A spice option element (channel, image, ...), every attribute required."""
    allowed = SPICE_OPTIONS[tag]
    attrs: list[tuple[str, str]] = []
    for key in allowed:  # the schema's order: name before mode
        value = enum(child, key, cloc, tuple(sorted(allowed[key])), what=f"{tag} {key}")
        if value is None:
            raise fail(cloc, f"<{tag}> needs a {key} attribute",
                       hint=f"add {key}= one of {', '.join(sorted(allowed[key]))}")
        attrs.append((key, value))
    return GraphicsOption(tag, tuple(attrs))


def parse_video(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Video:
    """A ``<video>`` device (only with graphics: see the cross-checks)."""
    path = "domain/devices/video"
    loc = ctx.loc(el, path)
    mark = ctx.count
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    m = one(ctx, el, "model", loc)
    if m is None:
        if ctx.count != mark:
            raise Skip()
        return Video(address=address)
    mloc = ctx.loc(m, f"{path}/model")
    model = enum(m, "type", mloc, ("vga", "cirrus", "qxl", "virtio", "bochs", "none"),
                 default="vga", what="video model")
    sizes = {k: ctx.guard(int_attr, m, k, mloc, lo=1, hi=1 << 22)
             for k in ("vram", "ram", "vgamem")}
    for k in ("ram", "vgamem"):
        if sizes[k] is not None and model != "qxl":
            ctx.report(mloc, f"{k} only applies to qxl video", hint=f"remove {k}")
    heads = ctx.guard(int_attr, m, "heads", mloc, lo=1, hi=16)
    primary = ctx.guard(yes_no, m, "primary", mloc)
    if ctx.count != mark:
        raise Skip()
    return Video(
        model=model or "vga", vram=sizes["vram"], ram=sizes["ram"], vgamem=sizes["vgamem"],
        heads=heads, primary=primary, address=address,
    )


_AUDIO_TYPES = ("none", "alsa", "coreaudio", "dbus", "file", "jack", "oss", "pipewire",
                "pulseaudio", "sdl", "spice")


def parse_audio(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Audio:
    """An ``<audio>`` backend."""
    loc = ctx.loc(el, "domain/devices/audio")
    aid = int_attr(el, "id", loc, lo=1, hi=1 << 16)
    atype = enum(el, "type", loc, _AUDIO_TYPES, what="audio type")
    if aid is None or atype is None:
        raise fail(loc, "<audio> needs id and type", hint="add id='1' type='none' (or another)")
    return Audio(id=aid, type=atype)

