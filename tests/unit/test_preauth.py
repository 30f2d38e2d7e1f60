"""Pre-authentication limits, the frame read deadline and the peer checks, without TLS sockets.

The admin socket is a real unix socket served by :func:`ferry.daemon.open_admin_socket`
and :class:`ferry.rpc.Server`; the clients are raw sockets that misbehave.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from ferry.acl import Subject
from ferry.config import LimitsConfig, parse_config
from ferry.daemon import admit_local, authorize_peer_ops, open_admin_socket
from ferry.errors import AccessDenied, AuthError, ConfigError
from ferry.preauth import AdmissionGate
from ferry.rpc import Server, connect_unix, make_hello
from ferry.tls import PeerIdentity, check_peer_allowed, identity_from_der
from ferryctl.pki import init_ca, issue_host

HOST = {"uuid": str(uuid.uuid4()), "name": "b"}


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Wait in the loop until ``predicate()`` is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- config -------------------------------------------------------------------


def test_limits_defaults_and_overrides() -> None:
    config = parse_config({"host": HOST})
    assert config.limits == LimitsConfig()
    assert config.limits.max_unauthenticated == 64
    assert config.limits.handshake_timeout_s == 5.0
    assert config.peers.allowed == ()
    config = parse_config({"host": HOST, "limits": {"max_frame": 65536, "max_unauthenticated": 8,
                           "handshake_timeout_s": 1, "frame_read_timeout_s": 2.5}})  # fmt: skip
    assert config.max_frame == 65536
    assert config.limits.max_unauthenticated == 8
    assert config.limits.frame_read_timeout_s == 2.5


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        ({"max_unauthenticated": 0}, "max_unauthenticated must be within"),
        ({"handshake_timeout_s": 0}, "handshake_timeout_s must be > 0"),
        ({"frame_read_timeout_s": -1}, "frame_read_timeout_s must be > 0"),
        ({"handshake_timeout_s": "5"}, "wrong type"),
        ({"max_unauthenticated": True}, "wrong type bool"),
        ({"handshake_timeout": 5}, "unknown key(s): handshake_timeout"),
    ],
)
def test_limits_are_validated(limits: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=r".*") as info:
        parse_config({"host": HOST, "limits": limits})
    assert needle in str(info.value)


def test_peers_section() -> None:
    config = parse_config({"host": HOST, "peers": {"allowed": ["a", "hv-*.example.org"]}})
    assert config.peers.allowed == ("a", "hv-*.example.org")
    with pytest.raises(ConfigError, match="every item must be a string"):
        parse_config({"host": HOST, "peers": {"allowed": [1]}})
    with pytest.raises(ConfigError, match="must not be empty"):
        parse_config({"host": HOST, "peers": {"allowed": [" "]}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config({"host": HOST, "peers": {"allow": ["a"]}})


# -- peer names -----------------------------------------------------------------


def test_allow_list_matches_common_name_or_dns_names() -> None:
    peer = PeerIdentity(common_name="a", dns_names=("a.example.org",), ips=("10.0.0.1",))
    check_peer_allowed(peer, (), host="b")  # empty: any host of the CA
    check_peer_allowed(peer, ("a",), host="b")
    check_peer_allowed(peer, ("A.Example.Org",), host="b")
    check_peer_allowed(peer, ("*.example.org",), host="b")
    with pytest.raises(AuthError) as info:
        check_peer_allowed(peer, ("c", "10.0.0.1"), host="b")
    err = info.value
    assert err.code == "auth-failed"
    assert "CN=a DNS=a.example.org" in str(err)
    assert "host b refuses peer" in str(err) and "[peers] allowed (c, 10.0.0.1)" in str(err)
    assert err.details["setting"] == "[peers] allowed"


def test_identity_from_der(tmp_path: Path) -> None:
    import ssl

    init_ca(tmp_path / "ca")
    files = issue_host(tmp_path / "ca", tmp_path / "h", "hv-a", dns=["hv-a.example.org"],
                       ips=["192.0.2.7"])  # fmt: skip
    der = ssl.PEM_cert_to_DER_cert(Path(files.cert).read_text())
    identity = identity_from_der(der)
    assert identity.common_name == "hv-a"
    assert "hv-a.example.org" in identity.dns_names
    assert identity.ips == ("192.0.2.7",)
    with pytest.raises(AuthError, match="unreadable"):
        identity_from_der(b"\x30\x03junk")


def test_admission_and_op_acl_for_peers() -> None:
    config = parse_config({
        "host": HOST, "peers": {"allowed": ["a"]},
        "acl": [{"peers": ["a"], "ops": ["prepare", "finish", "tunnel"]}],
    })  # fmt: skip
    admit = admit_local(config)
    admit(Subject(kind="peer", peer="a"))
    with pytest.raises(AuthError, match=r"CN=c: not in its \[peers\] allowed"):
        admit(Subject(kind="peer", peer="c"))
    authorize = authorize_peer_ops(config)
    authorize(Subject(kind="peer", peer="a"), "prepare")
    with pytest.raises(AccessDenied, match="may not run 'journal_query'"):
        authorize(Subject(kind="peer", peer="a"), "journal_query")
    authorize(Subject(kind="local", uid=0), "journal_query")  # local callers: handlers decide
    # No rule names peers: every peer of the CA may call every op (today's meaning).
    open_config = parse_config({"host": HOST})
    authorize_peer_ops(open_config)(Subject(kind="peer", peer="z"), "journal_query")
    admit_local(open_config)(Subject(kind="peer", peer="z"))


# -- gate -----------------------------------------------------------------------


async def test_gate_caps_and_logs_refusals_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = LimitsConfig(max_unauthenticated=2, refusal_log_interval_s=0.2)
    gate = AdmissionGate("test port", limits, logging.getLogger("test.gate"))
    caplog.set_level(logging.WARNING, logger="test.gate")
    tickets = [gate.admit(), gate.admit()]
    assert all(t is not None for t in tickets) and gate.pending == 2
    for _ in range(500):
        assert gate.admit() is None
    await until(lambda: gate.refusals.total == 500 and gate.refusals._count == 0, what="flush")
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    # The first refusal at once, the other 499 in one summary line.
    assert 1 <= len(lines) <= 2, lines
    assert sum(int(line.split("refused ")[1].split()[0]) for line in lines) == 500
    assert "cap of 2 unauthenticated connections reached" in lines[-1]
    for ticket in tickets:
        assert ticket is not None
        ticket.authenticated()
        ticket.release()  # idempotent
    assert gate.pending == 0
    assert gate.admit() is not None


# -- admin socket ---------------------------------------------------------------


def _server(**kwargs: Any) -> Server:
    async def ping(ctx: object, args: dict[str, object]) -> dict[str, object]:
        return {"domains": []}

    return Server(make_hello(str(uuid.uuid4()), "b", "source"), {"list": ping}, **kwargs)


@asynccontextmanager
async def admin_socket(path: Path, server: Server, limits: LimitsConfig) -> AsyncIterator[None]:
    listener = await open_admin_socket(path, None, server.handle_stream, limit=1 << 21,
                                       limits=limits)  # fmt: skip
    try:
        yield
    finally:
        listener.close()
        for session in list(server.sessions):
            await session.close()


async def _raw_unix(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, str(path))
    return sock


async def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True when the other end closed ``sock`` within ``timeout`` (reads until EOF)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


async def test_admin_socket_cap_and_hello_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferry.preauth")
    limits = LimitsConfig(max_unauthenticated=4, handshake_timeout_s=0.5,
                          refusal_log_interval_s=0.1)  # fmt: skip
    path = tmp_path / "admin.sock"
    async with admin_socket(path, _server(), limits):
        silent = [await _raw_unix(path) for _ in range(40)]
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = await asyncio.gather(*(_closed_by_peer(s, 5) for s in silent))
        # Over the cap: closed at once; within it: closed at the hello deadline.
        assert all(closed)
        assert loop.time() - started < 4
        for sock in silent:
            sock.close()
        await until(lambda: any("cap of 4" in r.getMessage() for r in caplog.records), 5,
                    "the refusal summary")  # fmt: skip
        assert any("did not authenticate within 0.5 s" in r.getMessage() for r in caplog.records)
        # Whoever sends a hello is served as before.
        session = await connect_unix(path, make_hello(str(uuid.uuid4()), "ctl", "client"))
        assert await session.request("list") == {"domains": []}
        await session.close()


async def test_stalled_frame_is_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ferry.rpc")
    limits = LimitsConfig(handshake_timeout_s=2, frame_read_timeout_s=0.5)
    path = tmp_path / "admin.sock"
    server = _server(frame_timeout=0.5)
    async with admin_socket(path, server, limits):
        session = await connect_unix(path, make_hello(str(uuid.uuid4()), "ctl", "client"))
        # Half of a 1 MiB frame, then nothing.
        session.writer.write(struct.pack(">I", 1 << 20) + b"\x00" * (512 << 10))
        await session.writer.drain()
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(5):
            await session.wait_closed()
        waited = asyncio.get_running_loop().time() - started
        assert 0.3 < waited < 4, waited
        await session.close()
    lines = [r.getMessage() for r in caplog.records if "frame incomplete" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    assert "524292 byte(s) of it arrived" in lines[0]  # header included
    assert "frame_read_timeout_s = 0.5" in lines[0]


async def test_dribbling_frame_is_dropped_too(tmp_path: Path) -> None:
    """The deadline runs from the frame's start: a byte now and then does not renew it."""
    path = tmp_path / "admin.sock"
    async with admin_socket(path, _server(frame_timeout=0.6), LimitsConfig()):
        session = await connect_unix(path, make_hello(str(uuid.uuid4()), "ctl", "client"))
        session.writer.write(struct.pack(">I", 4096))
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not session.closed and loop.time() - started < 5:
            session.writer.write(b"\x00")
            await asyncio.sleep(0.1)
        assert session.closed
        assert loop.time() - started < 3
        await session.close()
