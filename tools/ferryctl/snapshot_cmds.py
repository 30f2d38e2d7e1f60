"""ferryctl's snapshot verbs, with virsh's names and flags.

snapshot-create-as, snapshot-create (--redefine from an XML file),
snapshot-list [--tree|--parent|--current], snapshot-current, snapshot-revert,
snapshot-dumpxml, snapshot-info, snapshot-parent,
snapshot-delete [--children|--children-only] [--metadata].
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ferry.errors import FerryError
from ferry.rpc import Session

__all__ = ["add_snapshot_verbs"]

Command = Callable[[argparse.Namespace, Session], Coroutine[Any, Any, int]]
Verb = Callable[[str, Command | None, str], argparse.ArgumentParser]

#: The most a --redefine XML file may hold (it travels in one request frame).
MAX_XML_BYTES = 1 << 20


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


def _read_xml(path: str) -> str:
    try:
        data = Path(path).read_bytes() if path != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        raise FerryError(f"cannot read snapshot XML {path}: {exc.strerror}") from None
    if len(data) > MAX_XML_BYTES:
        raise FerryError(f"snapshot XML {path} is {len(data)} bytes: more than "
                         f"{MAX_XML_BYTES}")  # fmt: skip
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise FerryError(f"snapshot XML {path} is not UTF-8") from None


async def _create(args: argparse.Namespace, session: Session) -> int:
    xml = _read_xml(args.xmlfile) if getattr(args, "xmlfile", None) else None
    if getattr(args, "redefine", False) and xml is None:
        raise FerryError("--redefine needs the snapshot's XML file")
    result = await session.request("snapshot_create", {
        "name": args.name, "snapshot": getattr(args, "snapshot", None),
        "description": getattr(args, "description", "") or "",
        "xml": xml, "redefine": bool(getattr(args, "redefine", False)),
        "current": bool(getattr(args, "current", False)),
        "disk_only": bool(getattr(args, "disk_only", False)),
    })  # fmt: skip
    if args.json:
        _print_json(result)
    elif result.get("redefined"):
        print(f"Domain snapshot {result['snapshot']} redefined")
    else:
        print(f"Domain snapshot {result['snapshot']} created")
    return 0


def _when(seconds: Any) -> str:
    try:
        return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%d %H:%M:%S +0000")
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


async def _list(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("snapshot_list", {"name": args.name})
    snaps: list[dict[str, Any]] = result.get("snapshots", [])
    if args.current_only:
        snaps = [s for s in snaps if s.get("current")]
    if args.roots:
        snaps = [s for s in snaps if s.get("parent") is None]
    if args.json:
        _print_json({"snapshots": snaps, "current": result.get("current")})
        return 0
    if args.tree:
        for line in result.get("tree", []):
            print(line)
        return 0
    head = f" {'Name':<20} {'Creation Time':<27} {'State':<14}"
    if args.parent:
        head += " Parent"
    print(head)
    print("-" * (len(head) + 8))
    for snap in snaps:
        line = f" {snap['name']:<20} {_when(snap.get('created')):<27} {snap.get('state', ''):<14}"
        if args.parent:
            line += f" {snap.get('parent') or ''}"
        print(line.rstrip())
    return 0


async def _current(args: argparse.Namespace, session: Session) -> int:
    result = await session.request(
        "snapshot_current", {"name": args.name, "snapshot": args.snapshot}
    )
    if args.json:
        _print_json(result)
    elif args.snapshot is not None:
        print(f"Snapshot {result['snapshot']} set as current")
    elif args.name_only:
        print(result["snapshot"])
    else:
        sys.stdout.write(result["xml"])
    return 0


async def _revert(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("snapshot_revert", {
        "name": args.name, "snapshot": args.snapshot, "running": args.running,
        "paused": args.paused,
    })  # fmt: skip
    if args.json:
        _print_json(result)
    else:
        print(f"Domain '{args.name}' reverted to snapshot {args.snapshot} ({result['state']})")
    return 0


async def _dumpxml(args: argparse.Namespace, session: Session) -> int:
    result = await session.request(
        "snapshot_dumpxml", {"name": args.name, "snapshot": args.snapshot}
    )
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(result["xml"])
    return 0


async def _pick(args: argparse.Namespace, session: Session) -> tuple[dict[str, Any],
                                                                   list[dict[str, Any]]]:
    """The snapshot ``args`` names (or the current one) and every snapshot."""
    result = await session.request("snapshot_list", {"name": args.name})
    snaps: list[dict[str, Any]] = result.get("snapshots", [])
    wanted = args.snapshot if args.snapshot and not args.current else result.get("current")
    if wanted is None:
        raise FerryError(f"domain '{args.name}' has no current snapshot")
    for snap in snaps:
        if snap["name"] == wanted:
            return snap, snaps
    raise FerryError(f"domain '{args.name}' has no snapshot named '{wanted}'")


def _descendants(name: str, snaps: list[dict[str, Any]]) -> int:
    kids = [s["name"] for s in snaps if s.get("parent") == name]
    return len(kids) + sum(_descendants(k, snaps) for k in kids)


async def _info(args: argparse.Namespace, session: Session) -> int:
    snap, snaps = await _pick(args, session)
    info = {
        "name": snap["name"], "domain": args.name, "current": bool(snap.get("current")),
        "state": snap.get("state"), "kind": snap.get("kind"), "parent": snap.get("parent"),
        "children": sum(1 for s in snaps if s.get("parent") == snap["name"]),
        "descendants": _descendants(snap["name"], snaps),
        "location": {"internal": "internal", "external": "external"}.get(
            str(snap.get("kind")), "metadata only"),
    }  # fmt: skip
    if args.json:
        _print_json(info)
        return 0
    for label, key in (("Name", "name"), ("Domain", "domain"), ("Current", "current"),
                       ("State", "state"), ("Location", "location"), ("Parent", "parent"),
                       ("Children", "children"), ("Descendants", "descendants")):  # fmt: skip
        value = info[key]
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"{label + ':':<16}{'-' if value is None else value}")
    return 0


async def _parent(args: argparse.Namespace, session: Session) -> int:
    snap, _ = await _pick(args, session)
    if snap.get("parent") is None:
        raise FerryError(f"snapshot '{snap['name']}' has no parent")
    if args.json:
        _print_json({"snapshot": snap["name"], "parent": snap["parent"]})
    else:
        print(snap["parent"])
    return 0


async def _delete(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("snapshot_delete", {
        "name": args.name, "snapshot": args.snapshot, "children": args.children,
        "children_only": args.children_only, "metadata": args.metadata,
    })  # fmt: skip
    if args.json:
        _print_json(result)
    elif args.children_only:
        print(f"Domain snapshot {args.snapshot} children deleted")
    else:
        print(f"Domain snapshot {args.snapshot} deleted")
    return 0


def add_snapshot_verbs(verb: Verb) -> None:
    """Register the snapshot verbs with ferryctl's ``verb`` helper."""
    p = verb("snapshot-create-as", _create,
             "take a snapshot of a domain named SNAPSHOT; it becomes the current snapshot "
             "and a child of the previous current one.  A running domain whose writable "
             "disks are qcow2 gets an internal snapshot with its memory (qemu's "
             "snapshot-save: the guest pauses while its RAM is written into the first "
             "disk); a domain without writable disks gets a metadata-only one")  # fmt: skip
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot", nargs="?", default=None,
                   help="the snapshot's name (default: the time in seconds)")  # fmt: skip
    p.add_argument("--description", default="", help="free text kept with the snapshot")
    p.add_argument("--disk-only", action="store_true",
                   help="an external snapshot of the disks only: each writable disk goes on "
                   "a new qcow2 overlay next to its image (IMAGE-without-suffix.SNAPSHOT), "
                   "which the domain's definition then names; the old image becomes its "
                   "backing file")
    p = verb("snapshot-create", _create,
             "create a snapshot from an XML file; with --redefine, put back the metadata of "
             "a snapshot (its parent must exist already), as virsh snapshot-create "
             "--redefine")  # fmt: skip
    p.add_argument("name", help="the domain")
    p.add_argument("xmlfile", nargs="?", default=None,
                   help="<domainsnapshot> XML file ('-': standard input)")  # fmt: skip
    p.add_argument("--redefine", action="store_true",
                   help="redefine the metadata of a snapshot (as snapshot-dumpxml printed it)")
    p.add_argument("--current", action="store_true",
                   help="with --redefine: make it the current snapshot")  # fmt: skip
    p = verb("snapshot-list", _list,
             "list a domain's snapshots (parents first); --tree draws the hierarchy")
    p.add_argument("name", help="the domain")
    p.add_argument("--tree", action="store_true", help="draw the parent/child hierarchy")
    p.add_argument("--parent", action="store_true", help="add each snapshot's parent")
    p.add_argument("--roots", action="store_true", help="only snapshots without a parent")
    p.add_argument("--current", dest="current_only", action="store_true",
                   help="only the current snapshot")  # fmt: skip
    p = verb("snapshot-current", _current,
             "print the current snapshot's XML (--name: its name); with SNAPSHOT, make that "
             "snapshot current")  # fmt: skip
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot", nargs="?", default=None, help="the snapshot to make current")
    p.add_argument("--name", dest="name_only", action="store_true",
                   help="print only the current snapshot's name")  # fmt: skip
    p = verb("snapshot-revert", _revert,
             "put a running domain's memory and disks back as they were at an internal "
             "snapshot; it runs (or stays paused) as it was then, unless --running or "
             "--paused; the snapshot becomes current")  # fmt: skip
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--running", action="store_true", help="run after the revert")
    mode.add_argument("--paused", action="store_true", help="stay paused after the revert")
    p = verb("snapshot-dumpxml", _dumpxml, "print a snapshot's XML")
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot")
    p = verb("snapshot-delete", _delete,
             "delete a snapshot; its children move up to its parent (with --children, "
             "delete them too; --children-only: only them)")  # fmt: skip
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--children", action="store_true", help="also delete its descendants")
    group.add_argument("--children-only", action="store_true",
                       help="delete only its descendants")  # fmt: skip
    p.add_argument("--metadata", action="store_true",
                   help="forget the metadata only: an internal snapshot's state stays in the "
                   "images")  # fmt: skip
    p = verb("snapshot-info", _info,
             "show a snapshot: its state, kind, parent, children and whether it is current")
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot", nargs="?", default=None, help="default: the current snapshot")
    p.add_argument("--current", action="store_true", help="the current snapshot")
    p = verb("snapshot-parent", _parent, "print the name of a snapshot's parent")
    p.add_argument("name", help="the domain")
    p.add_argument("snapshot", nargs="?", default=None, help="default: the current snapshot")
    p.add_argument("--current", action="store_true", help="the current snapshot")
