"""ferryctl.pki: CA and host certificates, file modes, chains, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from ferry.errors import ConfigError
from ferry.tls import TLSFiles, client_context, peer_identity, server_context
from ferryctl.pki import CAFiles, HostFiles, add_pki_commands, init_ca, issue_host


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """Modes must be exact whatever the umask: try a restrictive and a lax one."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def issued(tmp_path: Path) -> tuple[CAFiles, HostFiles]:
    ca = init_ca(tmp_path / "ca")
    host = issue_host(
        tmp_path / "ca",
        tmp_path / "hosts" / "host-a",
        "host-a",
        dns=["host-a.example.net"],
        ips=["192.0.2.10", "2001:db8::10"],
    )
    return ca, host


def test_files_and_modes(tmp_path: Path, strict_umask: None) -> None:
    ca = init_ca(tmp_path / "ca")
    assert ca.cert == tmp_path / "ca" / "ca.pem" and ca.key == tmp_path / "ca" / "ca-key.pem"
    assert _mode(ca.key) == 0o600
    assert _mode(ca.cert) == 0o644
    os.umask(0)  # a lax umask must not widen the key either
    host = issue_host(tmp_path / "ca", tmp_path / "out", "h1", dns=[], ips=["10.0.0.1"])
    assert host.cert == tmp_path / "out" / "h1.pem"
    assert host.key == tmp_path / "out" / "h1-key.pem"
    assert host.ca == tmp_path / "out" / "ca.pem"
    assert _mode(host.key) == 0o600
    assert _mode(host.cert) == 0o644
    assert _mode(host.ca) == 0o644
    assert host.ca.read_bytes() == ca.cert.read_bytes()
    # No temp files left behind.
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["ca.pem", "h1-key.pem", "h1.pem"]


def test_ca_certificate(issued: tuple[CAFiles, HostFiles]) -> None:
    ca, _ = issued
    cert = _cert(ca.cert)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert cert.subject.rfc4514_string() == "CN=Ferry CA"


def test_host_certificate_sans_and_ekus(issued: tuple[CAFiles, HostFiles]) -> None:
    _, host = issued
    cert = _cert(host.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a", "host-a.example.net"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::10"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.rfc4514_string() == "CN=host-a"


def test_chain_verifies_with_cryptography(issued: tuple[CAFiles, HostFiles]) -> None:
    ca, host = issued
    ca_cert, leaf = _cert(ca.cert), _cert(host.cert)
    leaf.verify_directly_issued_by(ca_cert)
    store = Store([ca_cert])
    # Full RFC 5280 path validation including SAN and EKU, as a server...
    chain = (
        PolicyBuilder()
        .store(store)
        .build_server_verifier(x509.DNSName("host-a.example.net"))
        .verify(leaf, [])
    )
    assert chain[-1] == ca_cert
    PolicyBuilder().store(store).build_server_verifier(
        x509.IPAddress(ipaddress.ip_address("192.0.2.10"))
    ).verify(leaf, [])
    # ... and as a client.
    PolicyBuilder().store(store).build_client_verifier().verify(leaf, [])


def test_other_ca_does_not_verify(tmp_path: Path, issued: tuple[CAFiles, HostFiles]) -> None:
    _, host = issued
    other = init_ca(tmp_path / "other")
    # Same subject "CN=Ferry CA", so only the signature tells them apart.
    with pytest.raises(InvalidSignature):
        _cert(host.cert).verify_directly_issued_by(_cert(other.cert))
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_cert(other.cert)])).build_client_verifier().verify(
            _cert(host.cert), []
        )


async def test_handshake_with_ferry_tls(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    a = issue_host(tmp_path / "ca", tmp_path / "a", "a", dns=["localhost"], ips=["127.0.0.1"])
    b = issue_host(tmp_path / "ca", tmp_path / "b", "b", dns=["localhost"], ips=["127.0.0.1"])
    seen: list[str | None] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object")).common_name)
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(TLSFiles(b.ca, b.cert, b.key))
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_context(TLSFiles(a.ca, a.cert, a.key)),
            server_hostname="127.0.0.1",
        )
        assert await reader.readline() == b"ok\n"
        assert peer_identity(writer.get_extra_info("ssl_object")).common_name == "b"
        writer.close()
    assert seen == ["a"]


def test_second_init_refused_without_force(tmp_path: Path) -> None:
    first = init_ca(tmp_path)
    before = first.key.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        init_ca(tmp_path)
    assert first.key.read_bytes() == before
    second = init_ca(tmp_path, force=True)
    assert second.key.read_bytes() != before
    assert _mode(second.key) == 0o600


def test_host_reissue_needs_force(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    issue_host(tmp_path / "ca", tmp_path / "h", "h", dns=["h.example"], ips=[])
    with pytest.raises(ConfigError, match="already exist"):
        issue_host(tmp_path / "ca", tmp_path / "h", "h", dns=["h.example"], ips=[])
    issue_host(tmp_path / "ca", tmp_path / "h", "h", dns=["h.example"], ips=[], force=True)


def test_host_into_ca_dir_keeps_ca(tmp_path: Path) -> None:
    ca = init_ca(tmp_path)
    before = ca.cert.read_bytes()
    host = issue_host(tmp_path, tmp_path, "h", dns=[], ips=["10.1.1.1"])
    assert host.ca == ca.cert and ca.cert.read_bytes() == before


@pytest.mark.parametrize(
    ("name", "dns", "ips", "match"),
    [
        ("h", ["bad name"], [], "not a valid DNS name"),
        ("h", [], ["300.1.1.1"], "not an IP address"),
        ("_x_", [], [], "needs at least one --dns or --ip"),
        ("../evil", ["a.example"], [], "not a usable host name"),
    ],
)
def test_host_input_errors(
    tmp_path: Path, name: str, dns: list[str], ips: list[str], match: str
) -> None:
    init_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match=match):
        issue_host(tmp_path / "ca", tmp_path / "out", name, dns=dns, ips=ips)


def test_missing_ca(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read CA certificate"):
        issue_host(tmp_path / "none", tmp_path / "out", "h", dns=["h"], ips=[])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferryctl")
    add_pki_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_init_and_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    args = parser.parse_args(["pki", "init", "--dir", str(tmp_path / "ca"), "--json"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ca"]["cert"] == str(tmp_path / "ca" / "ca.pem")

    args = parser.parse_args(["pki", "init", "--dir", str(tmp_path / "ca"), "--json"])
    assert args.func(args) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "config-invalid"

    args = parser.parse_args(
        [
            "pki",
            "host",
            "node1",
            "--ip",
            "10.0.0.1",
            "--ip",
            "10.0.0.2",
            "--dns",
            "node1.lan",
            "--ca-dir",
            str(tmp_path / "ca"),
            "--out",
            str(tmp_path / "node1"),
            "--json",
        ]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host"] == "node1"
    assert out["files"]["key"] == str(tmp_path / "node1" / "node1-key.pem")
    san = (
        _cert(tmp_path / "node1" / "node1.pem")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1", "10.0.0.2"]

    # Text output and errors on stderr without --json.
    args = parser.parse_args(["pki", "init", "--dir", str(tmp_path / "ca")])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    args = parser.parse_args(["pki", "init", "--dir", str(tmp_path / "ca"), "--force"])
    assert args.func(args) == 0
    assert "CA created" in capsys.readouterr().out


def test_cli_requires_subcommand() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["pki"])
