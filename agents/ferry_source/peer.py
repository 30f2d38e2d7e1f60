"""The source's conversation with a destination agent: connect, ask, ask again.

A request that ends without a reply (connection lost, timeout) is a
:class:`ReplyLost`: the source does not know whether the destination acted
on it, and for Finish that matters, so :func:`ask_outcome` asks the
destination what became of the migration, reconnecting with backoff until
it answers or a deadline passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from ferry.config import AgentConfig
from ferry.errors import AuthError, FerryError, MigrationRefused, ProtocolError, ReplyLost
from ferry.jobs.recovery import PeerOutcome
from ferry.rpc import Session, connect_tcp, keepalive, make_hello
from ferry.tls import TLSFiles, as_auth_error, client_context

__all__ = ["ask_outcome", "close_session", "connect_peer", "peer_request", "request"]

log = logging.getLogger("ferry.source.peer")

CONNECT_TIMEOUT = 10.0
async def connect_peer(
    config: AgentConfig, host: str, port: int, *, timeout: float = CONNECT_TIMEOUT
) -> Session:
    """A TLS session to the ferry-destination at ``host:port``.

    Raises:
        MigrationRefused: not configured for TLS, or the peer is unreachable.
        AuthError: either side refused the other's certificate.
    """
    if config.tls is None:
        raise MigrationRefused("[tls] is not configured: peers are only reached over TLS")
    files = TLSFiles(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
    hello = make_hello(config.host.uuid, config.host.name, "source")
    try:
        session = await connect_tcp(host, port, hello, ssl_context=client_context(files),
                                    server_hostname=host, max_frame=config.max_frame,
                                    timeout=timeout)  # fmt: skip
    except FerryError:
        raise
    except OSError as exc:
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            raise as_auth_error(exc, peer=host) from None
        if isinstance(exc, ConnectionResetError | BrokenPipeError):
            # TLS 1.3 checks the client certificate after the client
            # thinks the handshake is done: a refusal shows up as the
            # peer dropping the connection before it greets us.
            raise AuthError(
                f"ferry-destination at {host}:{port} dropped the TLS connection before "
                "greeting us: it did not accept this host's certificate "
                "(not signed by its CA?)",
                peer=host,
            ) from None
        raise MigrationRefused(f"cannot reach ferry-destination at {host}:{port}: {exc}") from None
    except TimeoutError:
        raise MigrationRefused(
            f"ferry-destination at {host}:{port} did not answer within {timeout:.0f}s"
        ) from None
    keepalive(session)
    return session


async def close_session(session: Session, *, timeout: float = 2.0) -> None:
    """Close a peer session without waiting on a dead link.

    A graceful TLS close waits for the peer; over a cut link that is the
    kernel's retransmission timeout, which the user would wait out.
    """
    try:
        await asyncio.wait_for(session.close(), timeout)
    except (TimeoutError, OSError):
        with contextlib.suppress(Exception):
            session.writer.transport.abort()


async def request(
    session: Session, op: str, args: dict[str, Any], *, timeout: float, peer: str
) -> dict[str, Any]:
    """One request; a reply that never comes is :class:`ReplyLost`.

    Raises:
        ReplyLost: timeout, or the connection ended first.
        FerryError: the error the peer answered with.
    """
    try:
        return await session.request(op, args, timeout=timeout)
    except TimeoutError:
        raise ReplyLost(f"{peer} did not answer {op} within {timeout:.0f}s") from None
    except ProtocolError as exc:
        if session.closed:
            raise ReplyLost(f"the connection to {peer} broke during {op}: {exc}") from None
        raise


async def peer_request(
    config: AgentConfig, host: str, port: int, op: str, args: dict[str, Any], *,
    timeout: float = 60.0, connect_timeout: float = CONNECT_TIMEOUT,
) -> dict[str, Any]:  # fmt: skip
    """Connect, send one request, close."""
    session = await connect_peer(config, host, port, timeout=connect_timeout)
    try:
        return await request(session, op, args, timeout=timeout, peer=host)
    finally:
        await close_session(session)


async def ask_outcome(
    config: AgentConfig,
    host: str,
    port: int,
    migration_id: str,
    *,
    deadline_s: float,
    on_attempt: Callable[[str], None] | None = None,
) -> tuple[PeerOutcome, dict[str, Any]]:
    """Ask the destination what became of ``migration_id`` until it knows.

    Returns ``(RUNNING | NOT_RUNNING, reply)`` as soon as the destination
    says so; ``(PENDING | UNREACHABLE, last reply or {"error": …})`` when
    ``deadline_s`` passes first.  Reconnects with backoff (0.2 s doubling
    to 2 s) in between.  Asking also fences the destination: a migration it
    still holds as prepared (no Finish yet) is discarded there before it
    answers ``not-running``, so a late Finish can no longer start it.
    """
    deadline = time.monotonic() + deadline_s
    delay = 0.2
    last: tuple[PeerOutcome, dict[str, Any]] = (PeerOutcome.UNREACHABLE, {"error": "not asked"})
    while True:
        bound = max(1.0, min(10.0, deadline - time.monotonic()))
        try:
            reply = await peer_request(config, host, port, "migration_outcome",
                                       {"migration_id": migration_id},
                                       timeout=bound, connect_timeout=bound)  # fmt: skip
            outcome = PeerOutcome(str(reply.get("outcome")))
            last = (outcome, reply)
            if outcome in (PeerOutcome.RUNNING, PeerOutcome.NOT_RUNNING,
                           PeerOutcome.POSTCOPY):  # fmt: skip
                return last
        except (FerryError, OSError, ValueError) as exc:
            last = (PeerOutcome.UNREACHABLE, {"error": str(exc)})
        if on_attempt is not None:
            on_attempt(f"{last[0].value}: {last[1].get('reason') or last[1].get('error') or ''}")
        if time.monotonic() + delay > deadline:
            return last
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)
