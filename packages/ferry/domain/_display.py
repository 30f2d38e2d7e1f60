"""Display and sound: ``<graphics>``, ``<video>`` and ``<audio>``."""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import check_listen, fail
from ferry.domain._context import Ctx, DeviceEnv
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
    path = "domain/devices/graphics"
    loc = ctx.loc(el, path)
    gtype = enum(el, "type", loc, ("vnc", "spice"), what="graphics type")
    if gtype is None:
        raise fail(loc, "<graphics> needs a type")
    vnc = gtype == "vnc"
    for attr in ("tlsPort", "defaultMode") if vnc else ("websocket", "sharePolicy"):
        if get(el, attr) is not None:
            raise fail(loc, f"attribute {attr!r} does not apply to {gtype} graphics",
                       cls=XMLUnsupported, attribute=attr)
    port = signed_port(el, "port", loc, lo=5900 if vnc else 1)
    tls_port = signed_port(el, "tlsPort", loc, lo=1)
    websocket = signed_port(el, "websocket", loc, lo=1)
    autoport_attr = yes_no(el, "autoport", loc)
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
    attr_listen = get(el, "listen")
    if attr_listen is not None:
        listen = check_listen(attr_listen, loc)
    for li in all_of(el, "listen"):
        lloc = ctx.loc(li, f"{path}/listen")
        enum(li, "type", lloc, ("address",), what="listen type")
        addr = get(li, "address")
        if addr is None:
            continue
        addr = check_listen(addr, lloc)
        if listen is not None and addr != listen:
            raise fail(lloc, f"listen address {addr!r} differs from the listen attribute "
                             f"{listen!r}")
        listen = addr
    keymap = get(el, "keymap")
    if keymap is not None:
        keymap = ident(keymap, loc, "keymap", KEYMAP_RE)
    share = enum(el, "sharePolicy", loc, ("allow-exclusive", "force-shared", "ignore"),
                 what="sharePolicy")
    default_mode = enum(el, "defaultMode", loc, ("any", "secure", "insecure"),
                        what="defaultMode")
    options: list[GraphicsOption] = []
    for child in elements(el):
        tag = str(child.tag)
        if tag == "listen":
            continue
        cloc = ctx.loc(child, f"{path}/{tag}")
        if vnc:
            raise fail(cloc, f"<{tag}> does not apply to vnc graphics", cls=XMLUnsupported)
        allowed = SPICE_OPTIONS[tag]
        attrs: list[tuple[str, str]] = []
        for key in allowed:  # the schema's order: name before mode
            value = enum(child, key, cloc, tuple(sorted(allowed[key])), what=f"{tag} {key}")
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


def parse_video(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Video:
    """A ``<video>`` device (only with graphics: see the cross-checks)."""
    path = "domain/devices/video"
    loc = ctx.loc(el, path)
    address = parse_address(ctx, el, loc, ("pci",))
    m = one(el, "model", loc)
    if m is None:
        return Video(address=address)
    mloc = ctx.loc(m, f"{path}/model")
    model = enum(m, "type", mloc, ("vga", "cirrus", "qxl", "virtio", "bochs", "none"),
                 default="vga", what="video model")
    sizes = {k: int_attr(m, k, mloc, lo=1, hi=1 << 22) for k in ("vram", "ram", "vgamem")}
    if sizes["ram"] is not None and model != "qxl":
        raise fail(mloc, "ram only applies to qxl video")
    if sizes["vgamem"] is not None and model != "qxl":
        raise fail(mloc, "vgamem only applies to qxl video")
    return Video(
        model=model or "vga", vram=sizes["vram"], ram=sizes["ram"], vgamem=sizes["vgamem"],
        heads=int_attr(m, "heads", mloc, lo=1, hi=16),
        primary=yes_no(m, "primary", mloc), address=address,
    )


_AUDIO_TYPES = ("none", "alsa", "coreaudio", "dbus", "file", "jack", "oss", "pipewire",
                "pulseaudio", "sdl", "spice")


def parse_audio(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Audio:
    """An ``<audio>`` backend."""
    loc = ctx.loc(el, "domain/devices/audio")
    aid = int_attr(el, "id", loc, lo=1, hi=1 << 16)
    atype = enum(el, "type", loc, _AUDIO_TYPES, what="audio type")
    if aid is None or atype is None:
        raise fail(loc, "<audio> needs id and type")
    return Audio(id=aid, type=atype)

