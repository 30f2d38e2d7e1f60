"""ferry.rpc client handshake: how a refusal after the TLS handshake is reported.

Under TLS 1.3 the client's handshake is complete before the server has
checked the client certificate, so a server that refuses it is seen by the
client only while waiting for the welcome frame: as a TLS alert, as a reset,
or as a plain end of stream, depending on timing.  Every one of these must
come out as the same AuthError ("auth-failed"), never as a ProtocolError.
Real TLS over loopback, certificates from ferryctl.pki.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.errors import AccessDenied, AuthError, ProtocolError
from ferry.rpc import Server, connect_tcp, connect_unix, make_hello, refused_during_authentication
from ferry.tls import TLSFiles, client_context, server_context
from ferryctl.pki import init_ca, issue_host

REFUSED = "closed the connection during authentication, before greeting us"

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(frozen=True)
class Pki:
    src: TLSFiles
    dst: TLSFiles
    rogue: TLSFiles  # a certificate from another CA (trusts our CA for the server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    init_ca(d / "other-ca", common_name="Someone else's CA")
    src = issue_host(d / "ca", d / "src", "src", dns=["localhost"], ips=["127.0.0.1"])
    dst = issue_host(d / "ca", d / "dst", "dst", dns=["localhost"], ips=["127.0.0.1"])
    rogue = issue_host(d / "other-ca", d / "rogue", "rogue", dns=["localhost"], ips=["127.0.0.1"])
    return Pki(
        src=TLSFiles(ca=src.ca, cert=src.cert, key=src.key),
        dst=TLSFiles(ca=dst.ca, cert=dst.cert, key=dst.key),
        rogue=TLSFiles(ca=dst.ca, cert=rogue.cert, key=rogue.key),
    )


@asynccontextmanager
async def _listening(handler: StreamHandler, ctx: ssl.SSLContext | None) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def _connect(port: int, files: TLSFiles) -> object:
    return await connect_tcp(
        "127.0.0.1",
        port,
        make_hello(str(uuid.uuid4()), "src", "source"),
        ssl_context=client_context(files),
        server_hostname="127.0.0.1",
        timeout=10,
    )


def _agent_server() -> Server:
    async def ping(ctx: object, args: dict[str, object]) -> dict[str, object]:
        return {"pong": True}

    return Server(make_hello(str(uuid.uuid4()), "dst", "destination"), {"list": ping})


def _assert_refused(exc: AuthError) -> None:
    assert exc.code == "auth-failed"
    assert REFUSED in str(exc), str(exc)
    assert "refused this host's TLS certificate" in str(exc)
    assert exc.details["peer"] == "127.0.0.1"
    assert exc.details["reason"]


async def test_trusted_client_is_welcomed(pki: Pki) -> None:
    server = _agent_server()
    async with _listening(server.handle_stream, server_context(pki.dst)) as port:
        session = await connect_tcp(
            "127.0.0.1",
            port,
            make_hello(str(uuid.uuid4()), "src", "source"),
            ssl_context=client_context(pki.src),
            server_hostname="127.0.0.1",
        )
        assert session.conn.negotiated is not None
        await session.close()


async def test_untrusted_client_certificate_is_an_auth_error_every_time(pki: Pki) -> None:
    """The real agent server refusing a certificate from another CA: however
    the refusal races, the client reports the same AuthError."""
    server = _agent_server()
    async with _listening(server.handle_stream, server_context(pki.dst)) as port:
        reasons = set()
        for _ in range(30):
            with pytest.raises(AuthError) as info:
                await _connect(port, pki.rogue)
            _assert_refused(info.value)
            reasons.add(info.value.details["reason"])
        print("ways the refusal arrived:", sorted(reasons))


async def test_end_of_stream_before_welcome(pki: Pki) -> None:
    """A TLS peer that accepts the handshake and then just closes."""

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async with _listening(close_at_once, server_context(pki.dst)) as port:
        with pytest.raises(AuthError) as info:
            await _connect(port, pki.src)
    _assert_refused(info.value)
    assert info.value.details["reason"] == "connection closed before the welcome"


async def test_reset_before_welcome(pki: Pki) -> None:
    """A TLS peer that resets the connection once it has our hello."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock: socket.socket = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with _listening(reset, server_context(pki.dst)) as port:
        with pytest.raises(AuthError) as info:
            await _connect(port, pki.src)
    _assert_refused(info.value)


async def test_error_reply_before_welcome_is_kept(pki: Pki) -> None:
    """A server that refuses us with an error frame: its reason, not a guess."""
    server = _agent_server()

    def deny(subject: object) -> None:
        raise AccessDenied("peer 'src' may not connect here")

    server.admit = deny
    async with _listening(server.handle_stream, server_context(pki.dst)) as port:
        with pytest.raises(ProtocolError, match="may not connect here") as info:
            await _connect(port, pki.src)
    assert not isinstance(info.value, AuthError)


async def test_plain_end_of_stream_stays_a_protocol_error(tmp_path: Path) -> None:
    """Without TLS there is no certificate to blame: the old ProtocolError."""

    async def close_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.close()

    path = tmp_path / "s.sock"
    server = await asyncio.start_unix_server(close_after_hello, str(path))
    try:
        with pytest.raises(ProtocolError) as info:
            await connect_unix(path, make_hello(str(uuid.uuid4()), "ctl", "client"))
        assert info.value.code == "protocol"
        assert "closed the connection during the handshake" in str(info.value)
    finally:
        server.close()
        await server.wait_closed()


def test_non_alert_tls_error_is_named() -> None:
    exc = ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed")
    exc.reason = "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"
    err = refused_during_authentication("10.0.0.2", 49160, exc)
    assert err.code == "auth-failed"
    assert "DECRYPTION_FAILED_OR_BAD_RECORD_MAC" in str(err)
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    err = refused_during_authentication("10.0.0.2", 49160, alert)
    assert "refused this host's TLS certificate" in str(err)
    assert err.details["reason"] == "TLSV1_ALERT_UNKNOWN_CA"
