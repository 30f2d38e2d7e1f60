"""ferry-destination's peer port on loopback: limits, allow-list and ACL before any thread.

A real :class:`~ferry_destination.tunnel.PeerListener` with a real
:class:`~ferry.rpc.Server`, TLS certificates from ferryctl.pki, control
connections through :func:`ferry.rpc.connect_tcp` and data connections
through :func:`ferry.tunnel.channel.open_channel` (run in a thread: it is
the source's blocking side).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from ferry.config import AgentConfig, parse_config
from ferry.daemon import admit_local, authorize_peer_ops
from ferry.errors import AccessDenied, AuthError
from ferry.rpc import Server, connect_tcp, make_hello
from ferry.tls import TLSFiles, client_context, server_context
from ferry.tunnel import PREAMBLE, TokenBook
from ferry.tunnel.accept import PendingChannel
from ferry.tunnel.channel import make_endpoint, open_channel
from ferry_destination.tunnel import PeerListener
from ferryctl.pki import init_ca, issue_host


@dataclass(frozen=True)
class Pki:
    a: TLSFiles
    b: TLSFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    a = issue_host(d / "ca", d / "a", "a", dns=["a.test"], ips=["127.0.0.1"])
    b = issue_host(d / "ca", d / "b", "b", dns=["b.test"], ips=["127.0.0.1"])
    return Pki(TLSFiles(a.ca, a.cert, a.key), TLSFiles(b.ca, b.cert, b.key))


def _config(**tables: Any) -> AgentConfig:
    limits = {"max_unauthenticated": 8, "handshake_timeout_s": 1.0,
              "refusal_log_interval_s": 0.2, **tables.pop("limits", {})}  # fmt: skip
    return parse_config({"host": {"uuid": str(uuid.uuid4()), "name": "b"},
                         "limits": limits, **tables})  # fmt: skip


@dataclass
class Port:
    """A running peer port."""

    port: int
    listener: PeerListener
    server: Server
    tokens: TokenBook[Any]
    delivered: list[PendingChannel]


@asynccontextmanager
async def peer_port(pki: Pki, config: AgentConfig) -> AsyncIterator[Port]:
    async def ping(ctx: object, args: dict[str, object]) -> dict[str, object]:
        return {"domains": []}

    server = Server(make_hello(str(uuid.uuid4()), "b", "destination"), {"list": ping},
                    admit=admit_local(config), authorize=authorize_peer_ops(config))  # fmt: skip
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    tokens: TokenBook[Any] = TokenBook()
    delivered: list[PendingChannel] = []
    endpoint = make_endpoint(pki.b, server=True)
    listener = PeerListener(sock, server_context(pki.b), config,
                            on_control=server.handle_stream, on_data=delivered.append,
                            endpoint=lambda: endpoint, tokens=tokens)  # fmt: skip
    listener.start()
    try:
        yield Port(sock.getsockname()[1], listener, server, tokens, delivered)
    finally:
        await listener.close()
        for session in list(server.sessions):
            await session.close()
        for pending in delivered:
            pending.close()


async def _control(port: int, files: TLSFiles) -> Any:
    return await connect_tcp("127.0.0.1", port, make_hello(str(uuid.uuid4()), "a", "source"),
                             ssl_context=client_context(files), server_hostname="127.0.0.1",
                             timeout=10)  # fmt: skip


async def _data(port: int, files: TLSFiles, token: str) -> Any:
    endpoint = make_endpoint(files, server=False)
    return await asyncio.to_thread(open_channel, endpoint, "127.0.0.1", port, token=token,
                                   index=0, mode="tls", timeout=5)  # fmt: skip


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_allowed_peer_is_served_and_others_refused_by_name(pki: Pki) -> None:
    async with peer_port(pki, _config(peers={"allowed": ["a.test"]})) as port:
        session = await _control(port.port, pki.a)
        assert await session.request("list") == {"domains": []}
        await session.close()
    async with peer_port(pki, _config(peers={"allowed": ["c", "*.other"]})) as port:
        with pytest.raises(AuthError) as info:
            await _control(port.port, pki.a)
        text = str(info.value)
        assert text.startswith("host b refuses peer certificate CN=a "), text
        assert "DNS=a.test" in text and "not in its [peers] allowed (c, *.other)" in text, text
        token = port.tokens.issue("g1", 1, 30, object())
        with pytest.raises(
            AuthError, match=r"refuses peer certificate CN=a .*not in its \[peers\] allowed"
        ):
            await _data(port.port, pki.a, token)
        assert not port.delivered


async def test_peer_ops_and_tunnel_follow_the_acl(pki: Pki) -> None:
    acl = [{"peers": ["someone-else"], "ops": ["*"]}]
    async with peer_port(pki, _config(acl=acl)) as port:
        session = await _control(port.port, pki.a)
        with pytest.raises(AccessDenied, match="peer 'a' may not run 'list'"):
            await session.request("list")
        await session.close()
        token = port.tokens.issue("g1", 1, 30, object())
        with pytest.raises(AccessDenied, match="may not run 'tunnel' on domain 'g1'"):
            await _data(port.port, pki.a, token)
    acl = [{"peers": ["a"], "ops": ["tunnel", "list"], "domains": ["g1"]}]
    async with peer_port(pki, _config(acl=acl)) as port:
        token = port.tokens.issue("g1", 1, 30, object())
        opened = asyncio.create_task(_data(port.port, pki.a, token))
        await until(lambda: port.delivered, what="the authenticated data connection")
        pending = port.delivered[0]
        assert pending.subject.peer == "a" and pending.grant.name == "g1"
        ours, qemus = socket.socketpair()
        channel, grant, local = await asyncio.to_thread(pending.complete, lambda g, i: ours)
        source_side = await opened
        assert channel.index == 0 and grant.name == "g1" and local is ours
        source_side.close()
        channel.close()
        ours.close()
        qemus.close()
        port.delivered.clear()


async def test_half_open_floods_cost_no_thread_and_are_bounded(pki: Pki) -> None:
    """200 half-open TLS and 200 half-open preambles: cap 8, no thread, all closed."""
    config = _config(limits={"max_unauthenticated": 8, "handshake_timeout_s": 0.5})
    threads = threading.active_count()
    loop = asyncio.get_running_loop()
    async with peer_port(pki, config) as port:
        socks = []
        for i in range(400):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port.port))
            await loop.sock_sendall(s, b"\x16\x03\x01" if i % 2 else PREAMBLE)
            socks.append(s)
        gate = port.listener.gate
        assert gate is not None
        await until(lambda: gate.refusals.total >= 400 - 8 * 2, 10, "refusals")
        assert gate.peak <= 8
        assert threading.active_count() == threads
        await until(lambda: gate.pending == 0, 5, "the held connections' deadline")
        for s in socks:
            s.close()
        # Still serving.
        session = await _control(port.port, pki.a)
        assert await session.request("list") == {"domains": []}
        await session.close()
        assert threading.active_count() == threads


async def test_garbage_and_truncated_handshakes(pki: Pki) -> None:
    loop = asyncio.get_running_loop()
    async with peer_port(pki, _config(limits={"handshake_timeout_s": 0.5})) as port:
        gate = port.listener.gate
        assert gate is not None
        for payload in (
            b"GET / HTTP/1.0\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc",
            PREAMBLE + b"\x16\x03\x03\x00\x05hello",
            PREAMBLE[:4],
            b"\x00" * 64,
        ):
            s = socket.socket()
            s.setblocking(False)
            await loop.sock_connect(s, ("127.0.0.1", port.port))
            await loop.sock_sendall(s, payload)
            # Closed by the agent (a reset when our bytes were left unread).
            with contextlib.suppress(ConnectionResetError):
                async with asyncio.timeout(5):
                    while await loop.sock_recv(s, 4096):
                        pass
            s.close()
        await until(lambda: gate.pending == 0, 5, "every connection released")
        session = await _control(port.port, pki.a)
        assert await session.request("list") == {"domains": []}
        await session.close()
        assert not port.delivered
