"""ferry.tls: real TLS 1.3 handshakes over loopback with certificates from ferryctl.pki."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.errors import AuthError, ConfigError
from ferry.tls import (
    PeerIdentity,
    TLSFiles,
    as_auth_error,
    check_peer_name,
    client_context,
    peer_identity,
    server_context,
)
from ferryctl.pki import HostFiles, init_ca, issue_host


@dataclass(frozen=True)
class Pki:
    src: TLSFiles
    dst: TLSFiles
    rogue: TLSFiles  # trusts our CA but holds a cert from another CA
    other_server: TLSFiles  # a whole server from another CA


def _tls(h: HostFiles, ca: Path | None = None) -> TLSFiles:
    return TLSFiles(ca=ca or h.ca, cert=h.cert, key=h.key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    init_ca(d / "other-ca", common_name="Someone else's CA")
    src = issue_host(d / "ca", d / "src", "src", dns=["localhost"], ips=["127.0.0.1"])
    dst = issue_host(d / "ca", d / "dst", "dst", dns=["localhost"], ips=["127.0.0.1", "::1"])
    rogue = issue_host(d / "other-ca", d / "rogue", "rogue", dns=["localhost"], ips=["127.0.0.1"])
    return Pki(
        src=_tls(src),
        dst=_tls(dst),
        rogue=_tls(rogue, ca=dst.ca),
        other_server=_tls(rogue),
    )


@dataclass
class ServerResult:
    identities: list[PeerIdentity]
    errors: list[BaseException]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(ctx: ssl.SSLContext) -> tuple[asyncio.Server, int, ServerResult]:
    """A server that upgrades to TLS itself (start_tls) so the test sees its errors.

    With ``start_server(ssl=ctx)`` asyncio swallows server-side handshake
    failures into its exception handler; an agent that wants to log *why* a
    peer was refused does the handshake like this.
    """
    result = ServerResult([], [])

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(ctx)
        except (ssl.SSLError, OSError) as exc:
            result.errors.append(exc)
            writer.close()
            return
        ident = peer_identity(writer.get_extra_info("ssl_object"))
        result.identities.append(ident)
        writer.write(f"hello {ident.common_name}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, result


async def _wait(cond: Callable[[], bool]) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)


async def test_mutual_tls_success(pki: Pki) -> None:
    server, port, res = await _serve(server_context(pki.dst))
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki.src), server_hostname="127.0.0.1"
        )
        assert await reader.readline() == b"hello src\n"
        server_ident = peer_identity(writer.get_extra_info("ssl_object"))
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        writer.close()
    assert server_ident.common_name == "dst"
    assert server_ident.ips == ("127.0.0.1", "::1")
    assert "localhost" in server_ident.dns_names
    check_peer_name(server_ident, "dst")
    check_peer_name(server_ident, "LOCALHOST")
    check_peer_name(server_ident, "0:0::1")  # IP compared canonically
    [client_ident] = res.identities
    assert client_ident.common_name == "src"
    check_peer_name(client_ident, "127.0.0.1")


async def test_client_cert_from_another_ca_refused(pki: Pki) -> None:
    server, port, res = await _serve(server_context(pki.dst))
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(pki.rogue), server_hostname="localhost"
        )
        # TLS 1.3: the client finishes first, the server's refusal arrives as
        # an alert on the client's first read (or the connection just ends).
        try:
            data = await reader.read()
        except (ssl.SSLError, ConnectionError):
            data = b""
        assert data == b""
        writer.close()
        await _wait(lambda: bool(res.errors))
    assert res.identities == []
    [exc] = res.errors
    err = as_auth_error(exc, peer="127.0.0.1")
    assert isinstance(err, AuthError)
    assert err.code == "auth-failed"
    assert "unable to get local issuer certificate" in str(err)
    assert err.details["peer"] == "127.0.0.1"


async def test_no_client_cert_refused(pki: Pki) -> None:
    server, port, res = await _serve(server_context(pki.dst))
    async with server:
        # A client that trusts our CA but has no certificate of its own.
        plain = ssl.create_default_context(cafile=str(pki.dst.ca))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=plain, server_hostname="localhost"
        )
        try:
            data = await reader.read()
        except (ssl.SSLError, ConnectionError):
            data = b""
        assert data == b""
        writer.close()
        await _wait(lambda: bool(res.errors))
    assert res.identities == []
    [exc] = res.errors
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(as_auth_error(exc))


async def test_wrong_hostname_refused(pki: Pki) -> None:
    server, port, res = await _serve(server_context(pki.dst))
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(pki.src), server_hostname="wrong.example"
            )
        err = as_auth_error(info.value)
        assert "Hostname mismatch" in str(err)
        assert "wrong.example" in str(err)
        await _wait(lambda: bool(res.errors))
    assert res.identities == []


async def test_server_from_another_ca_refused(pki: Pki) -> None:
    server, port, _ = await _serve(server_context(pki.other_server))
    async with server:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(pki.src), server_hostname="localhost"
            )
    assert "self-signed certificate in certificate chain" in str(as_auth_error(info.value))


async def test_hostname_check_off_then_check_peer_name(pki: Pki) -> None:
    server, port, _ = await _serve(server_context(pki.dst))
    async with server:
        ctx = client_context(pki.src, server_hostname_check=False)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="wrong.example"
        )
        ident = peer_identity(writer.get_extra_info("ssl_object"))
        await reader.read()
        writer.close()
    # The chain was still verified; the name is now the caller's job.
    with pytest.raises(AuthError) as info:
        check_peer_name(ident, "wrong.example")
    msg = str(info.value)
    assert "expected 'wrong.example'" in msg and "CN=dst" in msg
    assert info.value.details["expected"] == "wrong.example"
    with pytest.raises(AuthError):
        check_peer_name(ident, "10.9.9.9")


async def test_tls12_client_refused(pki: Pki) -> None:
    server, port, res = await _serve(server_context(pki.dst))
    async with server:
        ctx = client_context(pki.src)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        await _wait(lambda: bool(res.errors))
    assert res.identities == []


def test_contexts_settings(pki: Pki) -> None:
    for ctx in (server_context(pki.dst), client_context(pki.src)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert client_context(pki.src).check_hostname is True
    assert client_context(pki.src, server_hostname_check=False).check_hostname is False


def test_missing_file_names_it(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    with pytest.raises(ConfigError) as info:
        server_context(TLSFiles(ca=pki.dst.ca, cert=missing, key=pki.dst.key))
    assert str(missing) in str(info.value)
    assert "certificate" in str(info.value)
    with pytest.raises(ConfigError) as info:
        client_context(TLSFiles(ca=tmp_path, cert=pki.src.cert, key=pki.src.key))
    assert "is a directory" in str(info.value)
    below_file = pki.src.cert / "key.pem"  # ENOTDIR: unreadable even for root
    with pytest.raises(ConfigError) as info:
        client_context(TLSFiles(ca=pki.src.ca, cert=pki.src.cert, key=below_file))
    assert f"private key file {below_file} is not readable" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_key(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(pki.src.key.read_bytes())
    key.chmod(0)
    with pytest.raises(ConfigError, match="not readable"):
        client_context(TLSFiles(ca=pki.src.ca, cert=pki.src.cert, key=key))


def test_mismatched_key_names_both_files(pki: Pki) -> None:
    with pytest.raises(ConfigError) as info:
        server_context(TLSFiles(ca=pki.dst.ca, cert=pki.dst.cert, key=pki.src.key))
    msg = str(info.value)
    assert str(pki.src.key) in msg and str(pki.dst.cert) in msg
    assert "does not belong" in msg


def test_garbage_ca_names_it(pki: Pki, tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        client_context(TLSFiles(ca=ca, cert=pki.src.cert, key=pki.src.key))
    assert str(ca) in str(info.value)


def test_peer_identity_without_cert() -> None:
    class NoCert:
        def getpeercert(self, binary_form: bool = False) -> dict[str, object]:
            return {}

    with pytest.raises(AuthError, match="no certificate"):
        peer_identity(NoCert())
