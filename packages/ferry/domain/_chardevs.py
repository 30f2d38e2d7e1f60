"""Character devices: ``<serial>``, ``<console>`` and ``<channel>``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import Loc, check_host_path, check_listen, fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, ident, int_attr, one, yes_no
from ferry.domain.model import CharDev

__all__ = ["parse_channel", "parse_console", "parse_serial"]

CHANNEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def parse_serial(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> CharDev:
    """A ``<serial>`` port (isa-serial); its port defaults to its position."""
    return _chardev(ctx, el, "serial", env.index)


def parse_console(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> CharDev:
    """A ``<console>`` (serial or virtio); its port defaults to its position."""
    return _chardev(ctx, el, "console", env.index)


def parse_channel(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> CharDev:
    """A virtio ``<channel>``; ``spicevmc`` is the spice agent's (``com.redhat.spice.0``).

    ``<target state=…>`` (whether the guest agent is connected, in libvirt's
    live XML) is runtime state: accepted and ignored.
    """
    return _chardev(ctx, el, "channel", 0)


@dataclass(frozen=True)
class _Source:
    path: str | None = None
    mode: str | None = None
    append: bool | None = None
    host: str | None = None
    service: int | None = None
    protocol: str | None = None


@dataclass(frozen=True)
class _Target:
    type: str
    port: int | None = None
    name: str | None = None
    model: str | None = None


def _chardev(ctx: Ctx, el: etree._Element, kind: str, index: int) -> CharDev:
    path = f"domain/devices/{kind}"
    loc = ctx.loc(el, path)
    types = ("pty", "file", "unix", "null", "spicevmc") if kind == "channel" else \
        ("pty", "file", "unix", "null", "tcp")
    ctype = enum(el, "type", loc, types, default="pty", what=f"{kind} type")
    mark = ctx.count
    source = ctx.guard(_source, ctx, el, loc, kind, ctype or "pty")
    tgt = one(ctx, el, "target", loc)
    tloc = ctx.loc(tgt, f"{path}/target") if tgt is not None else loc
    address = None
    target: _Target | None
    if kind == "serial":
        target = ctx.guard(_serial_target, ctx, tgt, tloc, index)
    elif kind == "console":
        target = ctx.guard(_console_target, tgt, tloc, index)
        address = ctx.guard(parse_address, ctx, el, loc, ("virtio-serial",))
        if address is not None and target is not None and target.type != "virtio":
            ctx.report(loc, "only a virtio console takes an address", kind="conflict",
                       hint="remove the address, or use <target type='virtio'/>")
    else:
        target = ctx.guard(_channel_target, tgt, loc, tloc, ctype)
        address = ctx.guard(parse_address, ctx, el, loc, ("virtio-serial",))
    if source is None or target is None or ctx.count != mark:
        raise Skip()
    return CharDev(
        type=cast(Any, ctype), target_type=target.type, source_path=source.path,
        source_mode=cast(Any, source.mode), append=source.append, target_port=target.port,
        target_name=target.name, target_model=target.model, address=address,
        host=source.host, service=source.service, protocol=cast(Any, source.protocol),
    )


def _source(ctx: Ctx, el: etree._Element, loc: Loc, kind: str, ctype: str) -> _Source:
    proto = one(ctx, el, "protocol", loc)
    if ctype == "tcp":
        return _tcp_source(ctx, el, loc, kind, proto)
    if proto is not None:
        raise fail(ctx.loc(proto, f"{loc.element}/protocol"),
                   f"<protocol> only applies to a tcp {kind}", hint="remove <protocol>")
    src = one(ctx, el, "source", loc)
    spath = mode = None
    append = None
    if src is not None:
        sloc = ctx.loc(src, f"{loc.element}/source")
        raw = get(src, "path")
        if ctype == "spicevmc":
            raise fail(sloc, "a spicevmc channel has no <source>", hint="remove <source>")
        if ctype in ("pty", "null"):
            # libvirt's live XML shows the allocated pty as <source path='/dev/pts/N'/>;
            # it is runtime state, not configuration, so it is dropped.
            if get(src, "mode") is not None or get(src, "append") is not None:
                raise fail(sloc, f"mode/append do not apply to a {ctype} {kind}",
                           hint="remove mode and append")
        else:
            if raw is not None:
                spath = check_host_path(raw, sloc, f"{kind} path", unix_socket=ctype == "unix")
            for attr in ("host", "service"):
                if get(src, attr) is not None:
                    raise fail(sloc, f"{attr} only applies to a tcp {kind}",
                               hint=f"remove {attr}")
            if ctype == "unix":
                mode = enum(src, "mode", sloc, ("bind", "connect"), what="socket mode")
            elif get(src, "mode") is not None:
                raise fail(sloc, "mode only applies to unix sockets", hint="remove mode")
            if ctype == "file":
                append = yes_no(src, "append", sloc, yes="on", no="off")
            elif get(src, "append") is not None:
                raise fail(sloc, "append only applies to files", hint="remove append")
    if ctype == "unix" and mode is None:
        mode = "bind"
    if ctype == "file" and spath is None:
        raise fail(loc, f"a file {kind} needs <source path=…>",
                   hint="add <source path='/var/log/…'/>")
    # A unix serial/console/channel in bind mode may leave its path to the
    # agent (RuntimePaths.run_dir): a per-host path lets a migrated domain
    # bind the same socket name on the destination host.
    if ctype == "unix" and spath is None and mode == "connect":
        raise fail(loc, f"a unix {kind} in connect mode needs <source path=…>",
                   hint="add path='/run/…' to <source>, or use mode='bind'")
    return _Source(spath, mode, append)


def _tcp_source(ctx: Ctx, el: etree._Element, loc: Loc, kind: str,
                proto: etree._Element | None) -> _Source:  # fmt: skip
    """``<source mode host service/>`` and ``<protocol type/>`` of a tcp serial or console."""
    src = one(ctx, el, "source", loc)
    if src is None:
        raise fail(loc, f"a tcp {kind} needs <source host=… service=…>",
                   hint="add <source mode='bind' host='127.0.0.1' service='4555'/>")
    sloc = ctx.loc(src, f"{loc.element}/source")
    mark = ctx.count
    mode = ctx.guard(enum, src, "mode", sloc, ("bind", "connect"), default="connect",
                     what="socket mode")
    for attr in ("path", "append"):
        if get(src, attr) is not None:
            ctx.report(sloc, f"{attr} does not apply to a tcp {kind}", hint=f"remove {attr}")
    host = service = None
    if get(src, "host") is None or get(src, "service") is None:
        ctx.report(sloc, "<source> needs host and service",
                   hint="add host='127.0.0.1' service='4555'")
    else:
        host = ctx.guard(check_listen, get(src, "host") or "", sloc)
        service = ctx.guard(int_attr, src, "service", sloc, lo=1, hi=65535)
    protocol: str | None = "raw"
    if proto is not None:
        protocol = ctx.guard(enum, proto, "type", ctx.loc(proto, f"{loc.element}/protocol"),
                             ("raw", "telnet"), default="raw", what=f"{kind} protocol")
    if ctx.count != mark:
        raise Skip()
    return _Source(mode=mode, host=host, service=service, protocol=protocol)


def _serial_target(ctx: Ctx, tgt: etree._Element | None, tloc: Loc, index: int) -> _Target:
    ttype = "isa-serial"
    target_port = target_model = None
    if tgt is not None:
        ttype = enum(tgt, "type", tloc, ("isa-serial",), default="isa-serial",
                     what="serial target type") or ttype
        target_port = int_attr(tgt, "port", tloc, hi=3)
        mdl = one(ctx, tgt, "model", tloc)
        if mdl is not None:
            target_model = enum(mdl, "name", ctx.loc(mdl, f"{tloc.element}/model"),
                                ("isa-serial",), what="serial model")
    if target_port is None:
        target_port = index
    return _Target(ttype, port=target_port, model=target_model)


def _console_target(tgt: etree._Element | None, tloc: Loc, index: int) -> _Target:
    ttype = "serial"
    target_port = None
    if tgt is not None:
        ttype = enum(tgt, "type", tloc, ("serial", "virtio"), default="serial",
                     what="console target type") or ttype
        target_port = int_attr(tgt, "port", tloc, hi=31)
    if target_port is None:
        target_port = index
    return _Target(ttype, port=target_port)


#: The guest name of the spice agent's channel (libvirt's default for spicevmc).
SPICE_CHANNEL = "com.redhat.spice.0"


def _channel_target(tgt: etree._Element | None, loc: Loc, tloc: Loc, ctype: str | None
                    ) -> _Target:  # fmt: skip
    if tgt is None:
        raise fail(loc, "<channel> needs a <target type='virtio'>",
                   hint="add <target type='virtio' name='org.qemu.guest_agent.0'/>")
    ttype = enum(tgt, "type", tloc, ("virtio",), what="channel target type") or ""
    if not ttype:
        raise fail(tloc, "<target> needs type='virtio'", hint="add type='virtio'")
    target_name = None
    name = get(tgt, "name")
    if name is not None:
        target_name = ident(name, tloc, "channel name", CHANNEL_NAME_RE)
    if ctype == "spicevmc":
        if target_name is None:
            target_name = SPICE_CHANNEL
        elif target_name != SPICE_CHANNEL:
            raise fail(tloc, f"a spicevmc channel is named {SPICE_CHANNEL!r}, not {target_name!r}",
                       hint=f"use name='{SPICE_CHANNEL}'")
    return _Target(ttype, name=target_name)
