"""ferryctl verbs for save, restore, managed save and core dumps (virsh's names).

The files are opened by ferry-source, not by ferryctl: paths are sent
absolute (relative to ferryctl's working directory) and the agent checks
them against its ``[storage] allowed``. XML files (``--xml``,
``save-image-define``) are read here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from ferry.rpc import Session

__all__ = ["add_save_commands"]

Command = Callable[[argparse.Namespace, Session], Coroutine[Any, Any, int]]
Verb = Callable[[str, Command | None, str], argparse.ArgumentParser]

#: A save or dump of a big guest through a slow compressor takes a while.
LONG_TIMEOUT = None


def _abs(path: str) -> str:
    return os.path.abspath(path)


def _xml(path: str | None) -> str | None:
    if path is None:
        return None
    from .xmlfile import read_domain_xml  # lxml only for the verbs that read XML

    return read_domain_xml(path)


def _out(args: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    if args.json:
        print(json.dumps(result, sort_keys=True, default=str))
    else:
        print(text)
    return 0


async def _save(args: argparse.Namespace, session: Session) -> int:
    path = _abs(args.file)
    result = await session.request("save", {
        "name": args.name, "path": path, "running": args.running, "paused": args.paused,
        "xml": _xml(args.xml), "bypass_cache": args.bypass_cache}, timeout=LONG_TIMEOUT)
    return _out(args, result, f"Domain '{result['name']}' saved to {path}")


async def _restore(args: argparse.Namespace, session: Session) -> int:
    path = _abs(args.file)
    result = await session.request("restore", {
        "path": path, "running": args.running, "paused": args.paused,
        "xml": _xml(args.xml)}, timeout=LONG_TIMEOUT)
    return _out(args, result, f"Domain '{result['name']}' restored from {path}")


async def _dumpxml(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("save_image_dumpxml", {"path": _abs(args.file)})
    if args.json:
        return _out(args, result, "")
    sys.stdout.write(result["xml"])
    if not result["xml"].endswith("\n"):
        print()
    return 0


async def _define(args: argparse.Namespace, session: Session) -> int:
    path = _abs(args.file)
    result = await session.request("save_image_define", {
        "path": path, "xml": _xml(args.xml), "running": args.running,
        "paused": args.paused})
    return _out(args, result, f"State file {path} updated.")


async def _managedsave(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("managedsave", {
        "name": args.name, "running": args.running, "paused": args.paused,
        "bypass_cache": args.bypass_cache}, timeout=LONG_TIMEOUT)
    return _out(args, result, f"Domain '{result['name']}' state saved by ferry")


async def _managedsave_remove(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("managedsave_remove", {"name": args.name})
    return _out(args, result, f"Removed managedsave image for domain '{result['name']}'")


async def _dump(args: argparse.Namespace, session: Session) -> int:
    path = _abs(args.file)
    result = await session.request("dump", {
        "name": args.name, "path": path, "memory_only": args.memory_only,
        "format": args.format, "live": args.live, "crash": args.crash, "reset": args.reset,
        "bypass_cache": args.bypass_cache}, timeout=LONG_TIMEOUT)
    return _out(args, result, f"Domain '{result['name']}' dumped to {path}")


def _state_flags(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--running", action="store_true",
                   help=f"{what} running, whatever the state at save time")
    g.add_argument("--paused", action="store_true",
                   help=f"{what} paused, whatever the state at save time")


def add_save_commands(verb: Verb) -> None:
    """Add save, restore, save-image-dumpxml, save-image-define, managedsave,
    managedsave-remove and dump (``verb`` is main.build_parser's helper)."""
    p = verb("save", _save,
             "save a running domain's state (memory and devices) to FILE and stop it; "
             "the image is compressed as [save] image_format says and is marked complete "
             "only once the whole state is on disk")
    p.add_argument("name")
    p.add_argument("file", help="the image to write (opened by ferry-source, within "
                   "[storage] allowed)")
    _state_flags(p, "restore it")
    p.add_argument("--xml", metavar="FILE",
                   help="domain XML to record instead of the live one (same guest ABI)")
    p.add_argument("--bypass-cache", action="store_true",
                   help="do not leave the image in this host's page cache")

    p = verb("restore", _restore,
             "start a domain from a save image written by 'save' (refused if that save "
             "never finished)")
    p.add_argument("file")
    _state_flags(p, "start it")
    p.add_argument("--xml", metavar="FILE",
                   help="domain XML to start with instead of the image's (same guest ABI)")

    p = verb("save-image-dumpxml", _dumpxml, "print the domain XML a save image records")
    p.add_argument("file")

    p = verb("save-image-define", _define,
             "replace the domain XML a save image records (the guest ABI must not change)")
    p.add_argument("file")
    p.add_argument("xml", help="the new domain XML file")
    _state_flags(p, "restore it")

    p = verb("managedsave", _managedsave,
             "save a persistent domain to its own image and stop it; 'start' resumes it")
    p.add_argument("name")
    _state_flags(p, "start it")
    p.add_argument("--bypass-cache", action="store_true",
                   help="do not leave the image in this host's page cache")

    p = verb("managedsave-remove", _managedsave_remove,
             "remove a domain's managed save image (the next start boots afresh)")
    p.add_argument("name")

    p = verb("dump", _dump,
             "core dump of a running domain: the whole state (a save image), or with "
             "--memory-only the guest RAM as ELF or kdump for crash-style tools")
    p.add_argument("name")
    p.add_argument("file")
    p.add_argument("--memory-only", action="store_true",
                   help="guest memory only, through qemu's dump-guest-memory")
    p.add_argument("--format", choices=("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy"),
                   help="memory-only dump format (default elf)")
    p.add_argument("--live", action="store_true", help="do not pause the guest while dumping")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--crash", action="store_true", help="stop the domain after the dump")
    g.add_argument("--reset", action="store_true", help="reset the domain after the dump")
    p.add_argument("--bypass-cache", action="store_true",
                   help="do not leave the dump in this host's page cache")
