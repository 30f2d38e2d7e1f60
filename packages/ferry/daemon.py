"""Plumbing both agents share: start-up checks, admin socket, life cycle.

The life cycle follows uvicorn's: start-up (config, native module, state
directories, reconnect to running domains, open listeners, READY=1), the
main loop until SIGTERM/SIGINT sets an event, then shutdown (STOPPING=1,
close listeners, disconnect from qemu — never kill it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import logging
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from ferry import sdnotify
from ferry.acl import Subject, check_access
from ferry.config import AgentConfig, LimitsConfig, load_config
from ferry.errors import AccessDenied, FerryError, NativeError
from ferry.journal import setup_logging
from ferry.preauth import AdmissionGate, TicketedHandler, set_process_limits
from ferry.tls import PeerIdentity, check_operator_allowed, check_peer_allowed

__all__ = [
    "admit_local",
    "agent_main",
    "authorize_peer_ops",
    "open_admin_socket",
    "require_native",
    "watchdog_loop",
]

log = logging.getLogger("ferry.daemon")


def require_native() -> str:
    """Import the compiled ``ferry_native``; agents refuse to run without it.

    Returns the backend name for the start-up log line.

    Raises:
        NativeError: the extension is missing or not the compiled one.
    """
    try:
        import ferry_native
    except ImportError as exc:
        raise NativeError(f"the compiled ferry_native module is required: {exc}") from None
    backend = getattr(ferry_native, "BACKEND", "unknown")
    if backend != "native":
        raise NativeError(f"ferry_native backend is {backend!r}, the compiled one is required")
    return str(backend)


def admit_local(config: AgentConfig) -> Callable[[Subject], None]:
    """Connection admission: on the admin sockets root and members of the admin
    group only; on the peer port, hosts in ``[peers] allowed`` (all hosts of
    the CA when the list is empty) and operators in ``[peers] operators``
    (none when it is empty).
    """

    def admit(subject: Subject) -> None:
        if subject.kind == "operator":
            check_operator_allowed(subject.operator or "", config.peers.operators,
                                   host=config.host.name)  # fmt: skip
            return
        if subject.kind == "peer":
            identity = PeerIdentity(common_name=subject.peer, dns_names=subject.peer_names)
            check_peer_allowed(identity, config.peers.allowed, host=config.host.name)
            return
        if subject.is_root:
            return
        if config.admin_group and config.admin_group in subject.groups:
            return
        raise AccessDenied(
            f"access denied: {subject.describe()} is neither root nor in group "
            f"{config.admin_group!r}, which may use this socket"
        )

    return admit


#: Peer ops whose handlers run check_access on the parsed domain themselves.
DOMAIN_CHECKED_PEER_OPS = frozenset(
    {"prepare", "finish", "migration_outcome", "migration_progress", "postcopy_recover",
     "migration_snapshots"}
)


def authorize_peer_ops(config: AgentConfig) -> Callable[[Subject, str], None]:
    """Op-level ACL for peers (``ferry.rpc.Server(authorize=...)``).

    Every op a peer or an operator calls (prepare, finish, journal_query,
    ...) is checked against ``[[acl]]`` as the admin ops are; the handlers
    check the domain again once they know it.  Local callers pass: their
    ops check the ACL in the handlers, as before.
    """

    def authorize(subject: Subject, op: str) -> None:
        # Ops that name a domain check the ACL in their handler, once the
        # request (the XML, for Prepare) is parsed: their refusal names the
        # domain, which this early check could not.
        # An operator needs a rule for the op (on any domain) before its
        # request is even parsed; those handlers then check the domain too.
        if subject.kind == "operator" or (
            subject.kind == "peer" and op not in DOMAIN_CHECKED_PEER_OPS
        ):
            check_access(config.acl, subject, op)

    return authorize


async def open_admin_socket(
    path: Path,
    group: str | None,
    handler: TicketedHandler,
    *,
    limit: int,
    limits: LimitsConfig | None = None,
) -> asyncio.Server:
    """Listen on a unix socket with mode 0660 owned by ``root:group``.

    The file mode is only the first gate: every connection's peer
    credentials are checked again (:func:`admit_local`).  Connections
    that have not sent their hello count against ``limits``
    (``[limits]`` of the process when not given): at most
    ``max_unauthenticated`` at once, each until ``handshake_timeout_s``.
    """
    gate = AdmissionGate(f"admin socket {path}", limits)

    async def admitted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ticket = gate.admit()
        if ticket is None:
            writer.transport.abort()
            return
        try:
            await handler(reader, writer, ticket=ticket)
        finally:
            ticket.release()

    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    old_umask = os.umask(0o117)
    try:
        server = await asyncio.start_unix_server(admitted, path=str(path), limit=limit)
    finally:
        os.umask(old_umask)
    gid = -1
    if group:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(group).gr_gid
    with contextlib.suppress(PermissionError):
        os.chown(path, 0 if os.geteuid() == 0 else -1, gid)
    os.chmod(path, 0o660)
    return server


async def watchdog_loop() -> None:
    """Send WATCHDOG=1 from the event loop at half the interval systemd asks.

    Sent from the loop itself, so a hung loop stops the pings and systemd
    restarts the service.
    """
    interval = sdnotify.watchdog_interval()
    if not interval:
        return
    while True:
        sdnotify.watchdog_ping()
        await asyncio.sleep(interval / 2)


def agent_main(
    name: str,
    description: str,
    run: Callable[[AgentConfig, asyncio.Event], Awaitable[None]],
    argv: list[str] | None = None,
) -> int:
    """Parse ``--config``, set up logging, check the native module, run.

    ``run`` is the agent's coroutine; it returns when ``stop`` is set.
    Returns the process exit status (``sys.exit`` only in ``main``).
    """
    parser = argparse.ArgumentParser(prog=name, description=description)
    parser.add_argument(
        "--config",
        type=Path,
        default=Path("/etc/ferry/agent.toml"),
        help="agent configuration file (default: %(default)s)",
    )
    parser.add_argument("--debug", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except FerryError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    setup_logging(name, level=logging.DEBUG if args.debug else logging.INFO, host=config.host.name)
    set_process_limits(config.limits)
    # qemu.qmp logs every message at DEBUG and expected reconnect failures at
    # ERROR: keep our own debug output readable.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        backend = require_native()
    except NativeError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s starting on host %s (ferry_native backend: %s)", name, config.host.name, backend)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watchdog = asyncio.create_task(watchdog_loop())
        try:
            await run(config, stop)
        finally:
            watchdog.cancel()

    try:
        asyncio.run(main())
    except FerryError as exc:
        log.error("%s failed: %s", name, exc)
        return 1
    except OSError as exc:
        log.error("%s failed: %s", name, exc)
        return 1
    return 0
