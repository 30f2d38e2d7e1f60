"""ferryctl: the admin CLI (virsh-like verbs) for Ferry's agents.

ferryctl only speaks the wire protocol to the agents' admin sockets; it
never imports agent internals.  Every verb takes ``--json`` for scripts;
errors print ``error: <message> (<code>)`` on stderr and exit 1, usage
errors exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ferry.errors import FerryError, FlagError, FrameTooLarge, ProtocolError
from ferry.flags import MigrationFlags, MigrationParams, validate
from ferry.rpc import Session, connect_unix, make_hello

from . import progress

__all__ = ["main"]

CLIENT_UUID = "00000000-0000-0000-0000-000000000000"
DEFAULT_SOURCE_SOCKET = Path(os.environ.get("FERRY_SOURCE_SOCKET", "/run/ferry/source.sock"))
DEFAULT_DEST_SOCKET = Path(
    os.environ.get("FERRY_DESTINATION_SOCKET", "/run/ferry/destination.sock")
)

Command = Callable[[argparse.Namespace, Session], Coroutine[Any, Any, int]]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, sort_keys=True, default=str))


async def _open(args: argparse.Namespace) -> Session:
    hello = make_hello(CLIENT_UUID, socket.gethostname(), "client")
    path = Path(args.connect)
    try:
        return await connect_unix(path, hello)
    except FileNotFoundError:
        raise FerryError(
            f"cannot connect to {path}: no such socket (is the agent running?)"
        ) from None
    except PermissionError:
        raise FerryError(f"cannot connect to {path}: permission denied") from None
    except ConnectionRefusedError:
        raise FerryError(
            f"cannot connect to {path}: connection refused (agent not running?)"
        ) from None


# -- simple verbs ---------------------------------------------------------


def _simple(op: str, *fields: str, message: str | None = None) -> Command:
    """A verb that sends one request and prints a short confirmation."""

    async def run(args: argparse.Namespace, session: Session) -> int:
        request = {f: getattr(args, f) for f in fields}
        result = await session.request(op, request)
        if args.json:
            _print_json(result)
        elif message:
            print(message.format(**{**request, **result}))
        return 0

    return run


async def _define(args: argparse.Namespace, session: Session) -> int:
    from .xmlfile import read_domain_xml, too_large  # lxml only for the verbs that read XML

    xml = read_domain_xml(args.file)
    try:
        result = await session.request("define", {"xml": xml})
    except FrameTooLarge as exc:
        # Under the XML limit in bytes, but not with the request around it
        # (or more bytes once decoded to UTF-8).
        raise too_large(args.file, len(xml.encode()), int(exc.details.get("limit", 0)),
                        "of one request frame") from None  # fmt: skip
    if args.json:
        _print_json(result)
    else:
        print(f"Domain '{result['name']}' defined from {args.file}")
    return 0


async def _list(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("list", {"all": args.all})
    domains = result.get("domains", [])
    if args.json:
        _print_json(domains)
        return 0
    print(f" {'Id':<6} {'Name':<30} State")
    print("-" * 50)
    for dom in domains:
        ident = str(dom.get("id") or "-")
        print(f" {ident:<6} {dom['name']:<30} {dom['state']}")
    return 0


async def _dominfo(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("info", {"name": args.name})
    if args.json:
        _print_json(result)
        return 0
    labels = [
        ("Name", "name"),
        ("UUID", "uuid"),
        ("State", "state"),
        ("Reason", "reason"),
        ("Persistent", "persistent"),
        ("CPU(s)", "vcpus"),
        ("Max memory", "memory_kib"),
        ("Type", "type"),
        ("PID", "pid"),
        ("Job", "job"),
    ]
    for label, key in labels:
        value = result.get(key)
        if value is None:
            continue
        if key == "memory_kib":
            value = f"{value} KiB"
        if isinstance(value, bool):
            value = "yes" if value else "no"
        print(f"{label + ':':<16}{value}")
    return 0


async def _dumpxml(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("dumpxml", {"name": args.name, "inactive": args.inactive})
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(result["xml"])
        if not result["xml"].endswith("\n"):
            print()
    return 0


async def _jobinfo(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("job_info", {"name": args.name})
    if args.json:
        _print_json(result)
        return 0
    if not result.get("job"):
        print("Job type:       None")
        return 0
    for key, value in result.items():
        print(f"{key.replace('_', ' ').capitalize() + ':':<24}{value}")
    return 0


# -- migrate -------------------------------------------------------------


def _csv(text: str | None) -> list[str] | None:
    """A virsh list option (``--comp-methods a,b``, ``--migrate-disks vda,vdb``), or None."""
    if text is None:
        return None
    return [m.strip() for m in text.split(",") if m.strip()] or None


def _migration_request(args: argparse.Namespace) -> tuple[MigrationFlags, MigrationParams]:
    flags = MigrationFlags.PEER2PEER
    for option, flag in (
        ("live", MigrationFlags.LIVE),
        ("persistent", MigrationFlags.PERSIST_DEST),
        ("undefine_source", MigrationFlags.UNDEFINE_SOURCE),
        ("paused", MigrationFlags.PAUSED),
        ("offline", MigrationFlags.OFFLINE),
        ("auto_converge", MigrationFlags.AUTO_CONVERGE),
        ("abort_on_error", MigrationFlags.ABORT_ON_ERROR),
        ("unsafe", MigrationFlags.UNSAFE),
        ("tunnelled", MigrationFlags.TUNNELLED),
        ("parallel", MigrationFlags.PARALLEL),
        ("compressed", MigrationFlags.COMPRESSED),
        ("postcopy", MigrationFlags.POSTCOPY),
        ("postcopy_resume", MigrationFlags.POSTCOPY_RESUME),
        ("change_protection", MigrationFlags.CHANGE_PROTECTION),
        ("copy_storage_all", MigrationFlags.NON_SHARED_DISK),
        ("copy_storage_inc", MigrationFlags.NON_SHARED_INC),
        ("copy_storage_synchronous_writes", MigrationFlags.NON_SHARED_SYNCHRONOUS_WRITES),
    ):
        if getattr(args, option, False):
            flags |= flag
    dest_xml = None
    if args.xml:
        from .xmlfile import read_domain_xml  # lxml only for the verbs that read XML

        dest_xml = read_domain_xml(args.xml)
    params = MigrationParams(
        dest_name=args.dname,
        dest_xml=dest_xml,
        migrate_uri=args.migrate_uri,
        bandwidth_mib=args.bandwidth,
        max_downtime_ms=args.max_downtime,
        auto_converge_initial=args.auto_converge_initial,
        auto_converge_increment=args.auto_converge_increment,
        parallel_connections=args.parallel_connections,
        timeout_s=args.timeout,
        timeout_action=args.timeout_action,
        tunnel_plaintext=True if args.tunnel_plaintext else None,
        postcopy_after_precopy=True if args.postcopy_after_precopy else None,
        postcopy_bandwidth_mib=args.postcopy_bandwidth,
        compression_methods=_csv(args.comp_methods),
        compression_xbzrle_cache=args.comp_xbzrle_cache,
        compression_zlib_level=args.comp_zlib_level,
        compression_zstd_level=args.comp_zstd_level,
        deadline_s=args.deadline,
        max_throttle_pct=args.max_throttle,
        migrate_disks=_csv(args.migrate_disks),
        disks_port=args.disks_port,
        disks_uri=args.disks_uri,
    )
    return validate(flags, params), params


async def _migrate(args: argparse.Namespace, session: Session) -> int:
    flags, params = _migration_request(args)
    display = progress.make_display(json_lines=args.json, verbose=args.verbose)
    loop = asyncio.get_running_loop()
    aborting = False
    abort_tasks: list[asyncio.Task[None]] = []

    async def abort() -> None:
        with contextlib.suppress(FerryError):
            await session.request("job_abort", {"name": args.name}, timeout=30)

    def on_sigint() -> None:
        nonlocal aborting
        if aborting:
            return
        aborting = True
        display.note("interrupted: aborting the migration (the VM stays on the source)")
        abort_tasks.append(loop.create_task(abort()))

    migration_id: list[str] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "phase" and data.get("migration_id") and not migration_id:
            migration_id.append(str(data["migration_id"]))
        display.event(event, data)

    if args.pki is not None and not args.client_driven:
        raise FlagError("--pki is for --client-driven (ferryctl dials the destination itself)")
    # Ctrl-C aborts the migration through the source agent in either mode:
    # client-driven, Perform then fails and ferryctl cancels Finish and Confirm.
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        if args.client_driven:
            return await _migrate_client_driven(args, session, flags, params, display)
        with display:
            result = await session.request(
                "migrate",
                {
                    "name": args.name,
                    "dest_uri": args.dest_uri,
                    "flags": int(flags),
                    "params": params.to_wire(),
                },
                on_event=on_event,
            )
    except ProtocolError as exc:
        if not session.closed:
            raise
        ident = f" {migration_id[0]}" if migration_id else ""
        hint = (
            f"'ferryctl journal --migration {migration_id[0]}'" if migration_id
            else f"'ferryctl journal {args.name}'"
        )  # fmt: skip
        raise FerryError(
            f"lost the connection to ferry-source during migration{ident} ({exc}); the "
            f"migration may have gone on without us: see 'ferryctl dominfo {args.name}' "
            f"and {hint}"
        ) from None
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    display.finish(result)
    return 0


async def _migrate_client_driven(
    args: argparse.Namespace, session: Session, flags: MigrationFlags, params: MigrationParams,
    display: progress.Display,
) -> int:  # fmt: skip
    """``migrate --client-driven``: run the five phases from here."""
    from .client_driven import Driver, lost_source, operator_files

    driver = Driver(session, operator_files(args.pki), display.event)
    try:
        with display:
            result = await driver.migrate(args.name, args.dest_uri, flags, params)
    except ProtocolError as exc:
        if not session.closed:
            raise
        raise lost_source(args.name, driver.migration_id, exc) from None
    display.finish(result)
    return 0


#: ``migrate-check``'s exit status when the goal cannot be met (0: it can).
EXIT_INFEASIBLE = 3
MIB = 1 << 20


def _finite(value: Any) -> Any:
    """``value`` with infinite/NaN floats as None: ``--json`` prints valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _mib_s(bps: Any) -> str:
    return f"{bps / MIB:.1f} MiB/s" if isinstance(bps, int | float) else "unknown"


def _secs(value: Any) -> str:
    if not isinstance(value, int | float):
        return "?"
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def format_check(result: dict[str, Any]) -> list[str]:
    """The lines ``migrate-check`` prints: the figures, the verdict, the plan."""
    m, v = result.get("measurements", {}), result.get("verdict", {})
    rate, link = m.get("dirty_rate_bps"), m.get("bandwidth_bps")
    method = m.get("dirty_rate_method")
    how = f"{method} over 1 s" if method != "none" else f"guest {m.get('run_state')}"
    lines = [f"Pre-flight of {result.get('name')} to {result.get('dest')}:",
             f"  dirty rate  {_mib_s(rate)} ({how})"]  # fmt: skip
    ram, resident = m.get("ram_bytes") or 0, m.get("resident_bytes")
    if isinstance(resident, int):
        lines.append(f"  resident    {resident // MIB} MiB of {ram // MIB} MiB RAM")
    else:
        lines.append(f"  resident    unknown (taken as all {ram // MIB} MiB of RAM)")
    probe, cap = m.get("probe"), m.get("bandwidth_cap_bps")
    text = _mib_s(link)
    if isinstance(probe, dict):
        text += f" (probe: {probe.get('bytes', 0) / MIB:.0f} MiB in {probe.get('seconds', 0):.2f} s"
        text += f", capped by --bandwidth {_mib_s(cap)})" if cap and cap < probe["bps"] else ")"
    lines.append(f"  link        {text}")
    throttle = v.get("throttle_needed_pct")
    if v.get("converges"):
        verdict = f"plain pre-copy converges in ~{_secs(v.get('precopy_s'))}"
        if throttle:
            verdict += f"; a throttle of {throttle}% makes it meet the deadline"
    else:
        verdict = (f"pre-copy cannot converge: the guest dirties {_mib_s(rate)}, "
                   f"the link moves {_mib_s(link)}")  # fmt: skip
        if throttle:
            verdict += f"; a throttle of {throttle}% would make it converge"
        elif throttle is None:
            verdict += "; no throttle up to 99% makes it converge in time"
    if v.get("postcopy_s") is not None:
        need = "needs post-copy" if v.get("plan") == "post-copy" else "post-copy would take"
        verdict += f"; {need}: ~{_secs(v['postcopy_s'])}"
    lines.append(f"  verdict     {verdict}")
    plan = str(v.get("plan"))
    if isinstance(v.get("downtime_ms"), int) and v.get("feasible"):
        plan += f" (downtime limit {v['downtime_ms']} ms)"
    lines.append(f"  plan        {plan}")
    if v.get("feasible"):
        lines.append("  goal        feasible")
    else:
        lines.append("  goal        NOT feasible with these limits")
    lines += [f"    - {reason}" for reason in v.get("reasons", [])]
    lines += [f"  note: {note}" for note in m.get("notes", [])]
    return lines


async def _migrate_check(args: argparse.Namespace, session: Session) -> int:
    if args.offline:
        # Said here: the flag check would only say that --offline and --live conflict.
        raise FlagError("--offline moves no memory: there is nothing to pre-flight")
    if args.client_driven or args.pki is not None:
        raise FlagError("migrate-check measures from the source agent; --client-driven and "
                        "--pki are for migrate")
    flags, params = _migration_request(args)
    result = await session.request(
        "migrate_check",
        {"name": args.name, "dest_uri": args.dest_uri, "flags": int(flags),
         "params": params.to_wire()},
    )  # fmt: skip
    if args.json:
        print(json.dumps(_finite(result), sort_keys=True, allow_nan=False, default=str))
    else:
        print("\n".join(format_check(result)))
    return 0 if result.get("verdict", {}).get("feasible") else EXIT_INFEASIBLE


async def _migrate_recover(args: argparse.Namespace, session: Session) -> int:
    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "warning" and not args.json:
            print(f"  {data.get('message', '')}", file=sys.stderr)

    adopted = await session.request("adopt_outgoing", {"name": args.name})
    if adopted.get("found"):
        # A client-driven migration whose client went away: take it over
        # and drive it to its end.
        from .client_driven import Driver, operator_files

        display = progress.make_display(json_lines=args.json)
        driver = Driver(session, operator_files(args.pki), display.event)
        with display:
            done = await driver.take_over(adopted)
        display.finish(done)
        return 0
    result = await session.request("migrate_recover", {"name": args.name}, on_event=on_event)
    if args.json:
        _print_json(result)
    else:
        print(f"Migration {result['migration_id']} of '{result['name']}' to {result['peer']}: "
              f"{result['result']} — {result['message']}")  # fmt: skip
    return 0 if result["result"] != "unknown" else 2


async def _agent_state(args: argparse.Namespace, session: Session) -> int:
    result = await session.request("agent_state", {})
    if args.json:
        _print_json(result)
        return 0
    print(f"{result.get('agent')} on {result.get('host')}")
    for key in ("jobs", "outgoing", "incoming", "fences", "outcomes"):
        items = result.get(key)
        if items is None:
            continue
        print(f"  {key}: {len(items)}")
        for item in items:
            print(f"    {json.dumps(item, sort_keys=True, default=str)}")
    if "tokens" in result:
        print(f"  tunnel tokens: {result['tokens']}")
    return 0


async def _journal(args: argparse.Namespace, session: Session) -> int:
    if not args.name and not args.migration:
        raise FerryError("journal: give a domain NAME or --migration ID")
    since: float | None = None
    seen: set[str] = set()
    while True:
        result = await session.request(
            "journal_query",
            {"migration_id": args.migration, "domain": args.name, "since": since},
        )
        for warning in result.get("warnings", []):
            print(f"warning: {warning}", file=sys.stderr)
        entries = [e for e in result.get("entries", []) if e.get("cursor") not in seen]
        seen.update(str(e.get("cursor")) for e in entries)
        if args.json:
            for entry in entries:
                _print_json(entry)
        else:
            progress.print_journal(entries)
        if not args.follow:
            return 0
        if entries:
            since = max(float(e.get("timestamp", 0)) for e in entries)
        await asyncio.sleep(1.0)


# -- argument parsing ----------------------------------------------------


def _add_migration_options(p: argparse.ArgumentParser) -> None:
    """The flags and limits of ``migrate``, shared with ``migrate-check``."""
    p.add_argument("--live", action="store_true", help="keep the VM running during the transfer")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--p2p", action="store_true",
        help="peer to peer: the source agent drives the migration (the default)",
    )  # fmt: skip
    mode.add_argument(
        "--client-driven", action="store_true",
        help="ferryctl drives the five phases itself: Begin/Perform/Confirm on the source's "
        "admin socket, Prepare/Finish on the destination over TLS with an operator "
        "certificate (--pki); the source host needs no rights on the destination",
    )  # fmt: skip
    p.add_argument(
        "--pki", type=Path, metavar="DIR",
        help="with --client-driven: the operator certificate directory ('ferryctl pki client "
        "NAME' output: ca.pem, NAME.pem, NAME-key.pem); default $FERRY_OPERATOR_PKI",
    )  # fmt: skip
    p.add_argument(
        "--persistent", action="store_true", help="persist the definition on the destination"
    )
    p.add_argument(
        "--undefine-source", action="store_true", help="undefine on the source after success"
    )
    p.add_argument("--paused", action="store_true", help="leave the VM paused on the destination")
    p.add_argument(
        "--offline", action="store_true",
        help="move only the persistent definition (needs --persistent; not with --live or "
        "storage copy): the destination runs its migrate hook and defines it inactive; the "
        "domain stays as it is here (running or not) unless --undefine-source",
    )  # fmt: skip
    p.add_argument(
        "--auto-converge", action="store_true", help="throttle the guest's CPUs until it converges"
    )
    p.add_argument(
        "--auto-converge-initial", type=int, metavar="PCT", help="initial throttle percentage"
    )
    p.add_argument(
        "--auto-converge-increment", type=int, metavar="PCT", help="throttle increment per pass"
    )
    p.add_argument(
        "--abort-on-error", action="store_true", help="abort when the guest hits a disk I/O error"
    )
    p.add_argument("--unsafe", action="store_true", help="allow disks with unsafe cache modes")
    p.add_argument(
        "--copy-storage-all", action="store_true",
        help="copy the disks with the VM (local storage): the destination creates each image "
        "at the same path and the source mirrors it there over NBD with TLS before memory moves",
    )
    p.add_argument(
        "--copy-storage-inc", action="store_true",
        help="as --copy-storage-all, copying only the top layer of each image; its backing "
        "file must already be on the destination",
    )
    p.add_argument(
        "--migrate-disks", metavar="LIST",
        help="with --copy-storage-*: copy only these disks (e.g. vda,vdb); default every "
        "writable, non-shareable disk",
    )
    p.add_argument(
        "--disks-port", type=int, metavar="PORT",
        help="with --copy-storage-*: the destination's NBD server port (default: a free "
        "migration port)",
    )
    p.add_argument(
        "--disks-uri", metavar="URI",
        help="with --copy-storage-*: where the destination's NBD server listens "
        "(tcp://HOST[:PORT])",
    )
    p.add_argument(
        "--copy-storage-synchronous-writes", action="store_true",
        help="with --copy-storage-*: a guest write completes only once both copies have it, "
        "so a disk-busy guest cannot outrun the copy",
    )
    p.add_argument(
        "--tunnelled",
        action="store_true",
        help="carry the stream through the agents (TLS on their port)",
    )
    p.add_argument(
        "--tunnel-plaintext",
        action="store_true",
        help="with --tunnelled: authenticate the data connections with TLS but send the "
        "stream unencrypted (both hosts' [tls] allow_plaintext_tunnel must be true)",
    )
    p.add_argument(
        "--parallel", action="store_true", help="use several migration connections (qemu multifd)"
    )
    p.add_argument(
        "--parallel-connections", type=int, metavar="N", help="multifd channels (default 2)"
    )
    p.add_argument(
        "--compressed", action="store_true",
        help="compress the stream (xbzrle by default; zstd with --parallel)",
    )
    p.add_argument(
        "--comp-methods", metavar="LIST",
        help="comma-separated: xbzrle (main stream, repeated pages as deltas), "
        "zstd or zlib (multifd channels; need --parallel)",
    )
    p.add_argument(
        "--comp-xbzrle-cache", type=int, metavar="BYTES",
        help="xbzrle page cache size in bytes (a power of two; qemu's default 64 MiB)",
    )
    p.add_argument("--comp-zlib-level", type=int, metavar="0-9", help="zlib compression level")
    p.add_argument("--comp-zstd-level", type=int, metavar="0-20", help="zstd compression level")
    p.add_argument(
        "--postcopy", action="store_true",
        help="allow switching to post-copy (by 'ferryctl migrate-postcopy', "
        "--postcopy-after-precopy, --timeout-postcopy or the --deadline controller)",
    )
    p.add_argument(
        "--postcopy-after-precopy", action="store_true",
        help="switch to post-copy by itself once the first full pass is done",
    )
    p.add_argument(
        "--postcopy-bandwidth", type=int, metavar="MiB/s",
        help="bandwidth cap once in post-copy (default: unlimited)",
    )
    p.add_argument(
        "--postcopy-resume", action="store_true",
        help="reconnect a post-copy migration that paused when the link broke",
    )
    p.add_argument(
        "--deadline", type=float, metavar="S",
        help="let the convergence controller finish within S seconds, choosing the "
        "downtime (up to --max-downtime), a throttle (up to --max-throttle) and, with "
        "--postcopy, the switch; refused up front when the pre-flight says it cannot",
    )
    p.add_argument(
        "--max-throttle", type=int, metavar="PCT",
        help="the most the guest's CPUs may be slowed (controller and --auto-converge)",
    )
    p.add_argument(
        "--change-protection", action="store_true", help="refuse domain changes during migration"
    )
    p.add_argument("--dname", metavar="NEW", help="rename the domain on the destination")
    p.add_argument("--xml", metavar="FILE", help="domain XML for the destination (ABI-checked)")
    p.add_argument(
        "--migrate-uri", metavar="URI", help="send the data over this address (tcp:HOST[:PORT])"
    )
    p.add_argument("--max-downtime", type=int, metavar="MS", help="tolerated downtime in ms")
    p.add_argument("--bandwidth", type=int, metavar="MiB/s", help="bandwidth cap in MiB/s")
    p.add_argument(
        "--timeout", type=float, metavar="S",
        help="when not done after S seconds: suspend the guest so the copy finishes "
        "(default, as virsh), switch to post-copy, or abort",
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--timeout-suspend", dest="timeout_action", action="store_const", const="suspend",
        help="on --timeout, pause the guest and finish the copy (the default)",
    )
    action.add_argument(
        "--timeout-postcopy", dest="timeout_action", action="store_const", const="postcopy",
        help="on --timeout, switch to post-copy (needs --postcopy)",
    )
    action.add_argument(
        "--timeout-abort", dest="timeout_action", action="store_const", const="abort",
        help="on --timeout, cancel the migration; the VM keeps running here",
    )


def build_parser(*, with_pki: bool = True) -> argparse.ArgumentParser:
    """The whole CLI: global options and one sub-command per verb.

    ``with_pki=False`` leaves out the ``pki`` verbs, whose ``cryptography``
    import costs ~35 ms of every other command's start-up.
    """
    parser = argparse.ArgumentParser(
        prog="ferryctl",
        description="Manage Ferry's agents: define and run domains, migrate them live "
        "between hosts.",
    )
    parser.add_argument(
        "-c",
        "--connect",
        default=str(DEFAULT_SOURCE_SOCKET),
        help="agent admin socket (default: %(default)s; env FERRY_SOURCE_SOCKET)",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, func: Command | None, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable JSON output")
        if func is not None:
            p.set_defaults(func=func)
        return p

    p = verb("define", _define, "define (or redefine) a persistent domain from an XML file")
    p.add_argument("file")
    p = verb(
        "undefine",
        _simple("undefine", "name", message="Domain '{name}' has been undefined"),
        "remove a domain's persistent definition",
    )
    p.add_argument("name")
    p = verb(
        "start",
        _simple("start", "name", "paused", "force", message="Domain '{name}' started"),
        "start a defined domain",
    )
    p.add_argument("name")
    p.add_argument("--paused", action="store_true", help="leave the CPUs paused")
    p.add_argument(
        "--force",
        action="store_true",
        help="start even though the domain migrated away (or may have): only after checking "
        "that it does not run on the other host",
    )
    p = verb(
        "shutdown",
        _simple("shutdown", "name", "timeout", message="Domain '{name}' is shut down"),
        "shut a domain down gracefully (ACPI), killing it after a timeout",
    )
    p.add_argument("name")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before qemu is stopped hard"
    )
    for name, op, msg, text in (
        (
            "destroy",
            "destroy",
            "Domain '{name}' destroyed",
            "stop a domain immediately (power cut)",
        ),
        ("suspend", "suspend", "Domain '{name}' suspended", "pause a running domain's CPUs"),
        ("jobabort", "job_abort", "Job on '{name}' aborted", "abort the domain's running job"),
    ):
        p = verb(name, _simple(op, "name", message=msg), text)
        p.add_argument("name")
    p = verb(
        "resume",
        _simple("resume", "name", "force", message="Domain '{name}' resumed"),
        "resume a paused domain (refused for a copy that migrated away, unless --force)",
    )
    p.add_argument("name")
    p.add_argument(
        "--force",
        action="store_true",
        help="resume even though a migration moved the domain away (or its outcome is "
        "unknown): only after checking that it does not run on the other host",
    )
    p = verb(
        "migrate-recover",
        _migrate_recover,
        "settle a migration whose outcome is unknown: ask the destination again, then stop "
        "the copy here (it runs there) or resume it (it does not); or take over a "
        "client-driven migration whose client went away, within the agents' grace period, "
        "and drive it to its end (needs the operator certificate, --pki)",
    )
    p.add_argument("name")
    p.add_argument(
        "--pki", type=Path, metavar="DIR",
        help="to take over a client-driven migration: the operator certificate directory "
        "(default $FERRY_OPERATOR_PKI)",
    )  # fmt: skip
    verb(
        "agent-state",
        _agent_state,
        "what the agent holds: recorded jobs, migrations in flight, fences or outcome "
        "records, tunnel tokens (diagnostics)",
    )
    p = verb("list", _list, "list domains (running ones; --all for defined too)")
    p.add_argument("--all", action="store_true", help="include inactive domains")
    p = verb("dominfo", _dominfo, "show a domain's state and resources")
    p.add_argument("name")
    p = verb("dumpxml", _dumpxml, "print a domain's XML")
    p.add_argument("name")
    p.add_argument(
        "--inactive", action="store_true", help="the persistent definition, not the live one"
    )
    from .snapshot_cmds import add_snapshot_verbs

    add_snapshot_verbs(verb)
    p = verb("jobinfo", _jobinfo, "show the domain's running job and its progress")
    p.add_argument("name")
    p = verb(
        "migrate-setmaxdowntime",
        _simple(
            "set_max_downtime", "name", "ms", message="Maximum downtime of '{name}' set to {ms} ms"
        ),
        "set the tolerated downtime of a running migration",
    )
    p.add_argument("name")
    p.add_argument("ms", type=int)
    p = verb(
        "migrate-setspeed",
        _simple(
            "set_max_bandwidth",
            "name",
            "mib_per_s",
            message="Migration bandwidth of '{name}' set to {mib_per_s} MiB/s",
        ),
        "cap the bandwidth of a running migration (0 = unlimited)",
    )
    p.add_argument("name")
    p.add_argument("mib_per_s", type=int)
    p = verb(
        "migrate-postcopy",
        _simple(
            "migrate_postcopy", "name",
            message="Migration of '{name}' switched to post-copy: it now runs on the "
            "destination",
        ),
        "switch a running migration (started with --postcopy) to post-copy",
    )
    p.add_argument("name")

    p = verb("migrate", _migrate, "migrate a domain to another host (peer to peer, or "
             "--client-driven)")
    p.add_argument("name")
    p.add_argument("dest_uri", help="the destination agent, ferry://HOST[:PORT]")
    _add_migration_options(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print every progress event")

    p = verb(
        "migrate-check",
        _migrate_check,
        "pre-flight: measure the guest's dirty rate and the link to the destination and "
        "say whether (and how) a live migration with these limits converges; changes nothing",
    )
    p.epilog = (
        "Exit status: 0 when the goal is feasible, 3 when it is not, 1 on an error. "
        "Takes the options of 'migrate' (always a live migration)."
    )
    p.add_argument("name")
    p.add_argument("dest_uri", help="the destination agent, ferry://HOST[:PORT]")
    _add_migration_options(p)
    p.set_defaults(live=True)

    from ferryctl.save_cmds import add_save_commands

    add_save_commands(verb)

    p = verb("journal", _journal, "show a domain's or a migration's story from the journal")
    p.add_argument("name", nargs="?")
    p.add_argument("--migration", metavar="ID", help="one migration, both hosts merged")
    p.add_argument("--follow", action="store_true", help="keep printing new entries")

    if with_pki:
        from ferryctl.pki import add_pki_commands

        add_pki_commands(sub)
    return parser


async def _run(args: argparse.Namespace) -> int:
    session = await _open(args)
    try:
        result: int = await args.func(args, session)
        return result
    finally:
        await session.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferryctl`` console script."""
    words = list(sys.argv[1:] if argv is None else argv)
    wants_pki = "pki" in words or not words or any(w in ("-h", "--help") for w in words[:1])
    parser = build_parser(with_pki=wants_pki)
    args = parser.parse_args(words)
    try:
        if args.verb == "pki":
            return int(args.func(args))
        return asyncio.run(_run(args))
    except FlagError as exc:
        print(f"error: {exc} ({exc.code})", file=sys.stderr)
        return 1
    except FerryError as exc:
        print(f"error: {exc} ({exc.code})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """Console-script entry: :func:`main`, then exit without interpreter teardown.

    Everything ferryctl owns is closed by then; skipping the finalisation of
    the modules it imported takes ~15 ms off every command (the migration
    benchmark counts the CLI's whole wall time).
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # e.g. `ferryctl ... | head` closed the pipe
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
