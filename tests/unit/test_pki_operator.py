"""Operator certificates: ``ferryctl pki client``, and what the agents make of them.

Issuing (files, modes, clientAuth only, the ``ferry:operator:NAME`` URI),
refusing bad input, the marker read back from PEM, DER and a live handshake,
and on a real peer port (the helpers of test_peer_listener): an operator is
refused unless ``[peers] operators`` lists it, needs an ``[[acl]]`` rule
naming it in ``operators`` for every op (control and tunnel), and host and
operator certificates never pass for each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from test_peer_listener import Pki, _config, _control, _data, peer_port, until

from ferry.acl import Subject, check_access, subject_from_identity
from ferry.config import parse_config
from ferry.daemon import admit_local, authorize_peer_ops
from ferry.errors import AccessDenied, AuthError, ConfigError
from ferry.tls import (
    OPERATOR_URI_PREFIX,
    PeerIdentity,
    TLSFiles,
    check_peer_allowed,
    client_context,
    identity_from_der,
    peer_identity,
    server_context,
)
from ferryctl.pki import add_pki_commands, init_ca, issue_client, issue_host

HOST = {"uuid": "00000000-0000-4000-8000-000000000001", "name": "b"}


def _cert(p: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def _der(p: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(p.read_text())


@dataclass(frozen=True)
class OpPki:
    hosts: Pki
    alice: TLSFiles
    #: A host certificate whose CN is "alice": must never pass as operator alice.
    host_alice: TLSFiles


@pytest.fixture(scope="module")
def opki(tmp_path_factory: pytest.TempPathFactory) -> OpPki:
    d = tmp_path_factory.mktemp("pki")
    init_ca(d / "ca")
    a = issue_host(d / "ca", d / "a", "a", dns=["a.test"], ips=["127.0.0.1"])
    b = issue_host(d / "ca", d / "b", "b", dns=["b.test"], ips=["127.0.0.1"])
    alice = issue_client(d / "ca", d / "alice", "alice")
    host_alice = issue_host(d / "ca", d / "host-alice", "alice", dns=[], ips=["127.0.0.1"])
    return OpPki(
        Pki(TLSFiles(a.ca, a.cert, a.key), TLSFiles(b.ca, b.cert, b.key)),
        TLSFiles(alice.ca, alice.cert, alice.key),
        TLSFiles(host_alice.ca, host_alice.cert, host_alice.key),
    )


# -- issuing --------------------------------------------------------------------


def test_issue_client_files_and_extensions(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    files = issue_client(tmp_path / "ca", tmp_path / "op", "alice", days=30)
    assert files.cert == tmp_path / "op" / "alice.pem"
    assert files.key == tmp_path / "op" / "alice-key.pem"
    assert files.ca.read_bytes() == (tmp_path / "ca" / "ca.pem").read_bytes()
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644
    cert = _cert(files.cert)
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    assert [a.value for a in cn] == ["alice"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # never serverAuth
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["ferry:operator:alice"]
    assert not san.get_values_for_type(x509.DNSName) and not san.get_values_for_type(x509.IPAddress)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 30 * 86400 <= lifetime.total_seconds() <= 30 * 86400 + 600
    # Signed by the CA.
    cert.verify_directly_issued_by(_cert(tmp_path / "ca" / "ca.pem"))


def test_issue_client_refuses_bad_input(tmp_path: Path) -> None:
    for bad in ("", "../x", "a/b", ".hidden", "-x", "a b", "ünï", "x" * 65, "a:b"):
        with pytest.raises(ConfigError, match="not a usable operator name"):
            issue_client(tmp_path / "ca", tmp_path / "op", bad)
    with pytest.raises(ConfigError, match="cannot read CA certificate"):
        issue_client(tmp_path / "nothing", tmp_path / "op", "alice")
    init_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="validity must be positive"):
        issue_client(tmp_path / "ca", tmp_path / "op", "alice", days=0)
    first = issue_client(tmp_path / "ca", tmp_path / "op", "alice")
    before = first.cert.read_bytes()
    with pytest.raises(ConfigError, match=r"already exist.*alice.pem, alice-key.pem.*--force"):
        issue_client(tmp_path / "ca", tmp_path / "op", "alice")
    assert first.cert.read_bytes() == before
    again = issue_client(tmp_path / "ca", tmp_path / "op", "alice", force=True)
    assert again.cert.read_bytes() != before


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferryctl")
    add_pki_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    ca = str(tmp_path / "ca")
    args = parser.parse_args(["pki", "client", "ops-1", "--ca-dir", ca])
    assert args.func(args) == 1
    assert "cannot read CA certificate" in capsys.readouterr().err
    init_ca(tmp_path / "ca")
    out = str(tmp_path / "out")
    argv = ["pki", "client", "ops-1", "--ca-dir", ca, "--out", out, "--days", "10", "--json"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["operator"] == "ops-1"
    assert result["files"]["cert"] == str(tmp_path / "out" / "ops-1.pem")
    args = parser.parse_args(argv)
    assert args.func(args) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "config-invalid"
    args = parser.parse_args([*argv[:-1], "--force"])
    assert args.func(args) == 0
    assert "operator ops-1: certificate" in capsys.readouterr().out
    args = parser.parse_args(["pki", "client", "bad/name", "--ca-dir", ca, "--out", out])
    assert args.func(args) == 1
    assert "not a usable operator name" in capsys.readouterr().err


# -- the marker -----------------------------------------------------------------


def test_marker_round_trip(opki: OpPki) -> None:
    assert OPERATOR_URI_PREFIX == "ferry:operator:"
    identity = identity_from_der(_der(opki.alice.cert))
    assert identity.operator == "alice" and identity.common_name == "alice"
    assert identity.describe() == "CN=alice URI=ferry:operator:alice"
    assert subject_from_identity(identity) == Subject(kind="operator", operator="alice")
    assert subject_from_identity(identity).describe() == "operator 'alice'"
    # A host certificate (even one whose CN is "alice") is a host.
    host = identity_from_der(_der(opki.host_alice.cert))
    assert host.operator is None
    assert subject_from_identity(host) == Subject(kind="peer", peer="alice", peer_names=("alice",))


def test_unusable_operator_uri_is_refused(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "x")])
    now = dt.datetime.now(dt.UTC)
    for uris in (["ferry:operator:"], ["ferry:operator:a", "ferry:operator:b"]):
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(u) for u in uris]), critical=False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        with pytest.raises(AuthError, match="unusable operator name"):
            identity_from_der(cert.public_bytes(Encoding.DER))


async def test_marker_over_a_handshake(opki: OpPki) -> None:
    """The agent's view (``getpeercert``) of an operator and of a host certificate."""
    seen: list[PeerIdentity] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0,
                                        ssl=server_context(opki.hosts.b))  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    try:
        for files in (opki.alice, opki.hosts.a):
            _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(files),
                                                  server_hostname="127.0.0.1")  # fmt: skip
            count = len(seen)
            await until(lambda: len(seen) > count, what="the server's view")  # noqa: B023
            w.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen[0] == PeerIdentity(common_name="alice", operator="alice")
    assert seen[1].operator is None and seen[1].common_name == "a"


async def test_operator_certificate_cannot_serve(opki: OpPki) -> None:
    """clientAuth only: an agent dialling a server that shows it refuses the handshake."""

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0,
                                        ssl=server_context(opki.alice))  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    try:
        ctx = client_context(opki.hosts.a, server_hostname_check=False)
        with pytest.raises(ssl.SSLCertVerificationError, match="unsuitable certificate purpose"):
            await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="alice")
    finally:
        server.close()
        await server.wait_closed()


# -- admission and ACL, without sockets -------------------------------------------


def test_operators_config_and_admission() -> None:
    operator = Subject(kind="operator", operator="alice")
    # Default: no operator, even with every host allowed.
    config = parse_config({"host": HOST, "peers": {"allowed": ["*"]}})
    assert config.peers.operators == ()
    with pytest.raises(AuthError) as info:
        admit_local(config)(operator)
    text = str(info.value)
    assert text == ("host b refuses operator 'alice': not in its [peers] operators "
                    "(empty: no operator may connect)")  # fmt: skip
    assert info.value.details["setting"] == "[peers] operators"
    # Listed (patterns too): admitted.
    config = parse_config({"host": HOST, "peers": {"operators": ["bob", "al*"]}})
    admit_local(config)(operator)
    with pytest.raises(AuthError, match=r"'carol': not in its \[peers\] operators \(bob, al\*\)"):
        admit_local(config)(Subject(kind="operator", operator="carol"))
    # A host named like a listed operator is still judged by [peers] allowed.
    hosts_only = parse_config({"host": HOST, "peers": {"allowed": ["a"],
                                                       "operators": ["alice"]}})  # fmt: skip
    with pytest.raises(AuthError, match=r"refuses peer certificate CN=alice"):
        admit_local(hosts_only)(Subject(kind="peer", peer="alice"))
    # And an operator named like an allowed host is not let in by [peers] allowed.
    with pytest.raises(AuthError, match=r"refuses operator 'a'"):
        admit_local(hosts_only)(Subject(kind="operator", operator="a"))
    with pytest.raises(ConfigError, match="operators: names must not be empty"):
        parse_config({"host": HOST, "peers": {"operators": [""]}})
    identity = PeerIdentity(common_name="a", operator="a")
    with pytest.raises(AuthError, match="refuses operator 'a'"):
        check_peer_allowed(identity, ("a",), host="b")  # the host list never admits it


def test_acl_rules_apply_to_operators() -> None:
    alice = Subject(kind="operator", operator="alice")
    # No rule at all: a host peer may do everything, an operator nothing.
    open_config = parse_config({"host": HOST, "peers": {"operators": ["alice"]}})
    authorize_peer_ops(open_config)(Subject(kind="peer", peer="a"), "prepare")
    for op in ("prepare", "finish", "list", "journal_query"):
        with pytest.raises(AccessDenied) as info:
            authorize_peer_ops(open_config)(alice, op)
        assert str(info.value) == (f"access denied: operator 'alice' may not run {op!r} "
                                   "(no [[acl]] rule names it in operators)")  # fmt: skip
    # A rule for every peer ("*") is not a rule for operators.
    config = parse_config({"host": HOST, "peers": {"operators": ["alice"]},
                           "acl": [{"peers": ["*"], "ops": ["*"]}]})  # fmt: skip
    with pytest.raises(AccessDenied, match="operator 'alice' may not run 'prepare'"):
        authorize_peer_ops(config)(alice, "prepare")
    # A rule naming operators: ops and domains as for any subject.
    config = parse_config({"host": HOST, "peers": {"operators": ["alice"]},
                           "acl": [{"operators": ["al*"], "ops": ["prepare", "finish"],
                                    "domains": ["web-*"]}]})  # fmt: skip
    authorize = authorize_peer_ops(config)
    authorize(alice, "prepare")  # domain checked by the handler
    check_access(config.acl, alice, "prepare", "web-1")
    with pytest.raises(AccessDenied) as info:
        check_access(config.acl, alice, "prepare", "db")
    assert str(info.value) == "access denied: operator 'alice' may not run 'prepare' on domain 'db'"
    with pytest.raises(AccessDenied, match="may not run 'journal_query'"):
        authorize(alice, "journal_query")
    with pytest.raises(AccessDenied, match="may not run 'tunnel'"):
        check_access(config.acl, alice, "tunnel", "web-1")
    with pytest.raises(AccessDenied, match=r"operator 'bob'.*no \[\[acl\]\] rule"):
        authorize(Subject(kind="operator", operator="bob"), "prepare")
    # That rule names no peers: host peers keep today's meaning (all allowed).
    authorize(Subject(kind="peer", peer="alice"), "journal_query")
    check_access(config.acl, Subject(kind="peer", peer="alice"), "tunnel", "db")
    # And a rule naming peers "alice" never lets operator alice in.
    config = parse_config({"host": HOST, "acl": [{"peers": ["alice"], "ops": ["*"]}]})
    with pytest.raises(AccessDenied, match="operator 'alice'"):
        check_access(config.acl, alice, "list")


# -- on a real peer port ------------------------------------------------------------


async def test_operator_refused_by_default_on_the_peer_port(opki: OpPki) -> None:
    async with peer_port(opki.hosts, _config()) as port:
        with pytest.raises(AuthError) as info:
            await _control(port.port, opki.alice)
        text = str(info.value)
        assert "host b refuses operator 'alice'" in text, text
        assert "[peers] operators (empty: no operator may connect)" in text, text
        token = port.tokens.issue("g1", 1, 30, object())
        with pytest.raises(AuthError, match=r"refuses operator 'alice'.*\[peers\] operators"):
            await _data(port.port, opki.alice, token)
        assert not port.delivered
        # Hosts unchanged.
        session = await _control(port.port, opki.hosts.a)
        assert await session.request("list") == {"domains": []}
        await session.close()


async def test_listed_operator_is_served_per_acl(opki: OpPki) -> None:
    peers = {"operators": ["alice"]}
    async with peer_port(opki.hosts, _config(peers=peers)) as port:
        session = await _control(port.port, opki.alice)  # admitted
        with pytest.raises(AccessDenied, match="operator 'alice' may not run 'list'"):
            await session.request("list")
        await session.close()
        token = port.tokens.issue("g1", 1, 30, object())
        with pytest.raises(AccessDenied, match="operator 'alice' may not run 'tunnel'"):
            await _data(port.port, opki.alice, token)
        assert not port.delivered
    acl = [{"operators": ["alice"], "ops": ["list"]}]
    async with peer_port(opki.hosts, _config(peers=peers, acl=acl)) as port:
        session = await _control(port.port, opki.alice)
        assert await session.request("list") == {"domains": []}
        await session.close()
        # The host certificate with CN "alice" is not operator alice: a host,
        # let in by the empty [peers] allowed and trusted (no rule names peers).
        session = await _control(port.port, opki.host_alice)
        assert await session.request("list") == {"domains": []}
        await session.close()
    # Only when the ACL grants 'tunnel' may an operator open a data connection.
    acl = [{"operators": ["alice"], "ops": ["tunnel"], "domains": ["g1"]}]
    async with peer_port(opki.hosts, _config(peers=peers, acl=acl)) as port:
        token = port.tokens.issue("g1", 1, 30, object())
        opened = asyncio.create_task(_data(port.port, opki.alice, token))
        await until(lambda: port.delivered, what="the operator's data connection")
        pending = port.delivered[0]
        assert pending.subject == Subject(kind="operator", operator="alice")
        ours, qemus = socket.socketpair()
        channel, grant, _local = await asyncio.to_thread(pending.complete, lambda g, i: ours)
        (await opened).close()
        assert grant.name == "g1"
        channel.close()
        ours.close()
        qemus.close()
        port.delivered.clear()


async def test_host_peer_allow_list_does_not_admit_an_operator(opki: OpPki) -> None:
    """``[peers] allowed = ["alice"]`` lets host 'alice' in, never operator 'alice'."""
    async with peer_port(opki.hosts, _config(peers={"allowed": ["alice"]})) as port:
        with pytest.raises(AuthError, match="refuses operator 'alice'"):
            await _control(port.port, opki.alice)
        session = await _control(port.port, opki.host_alice)
        assert await session.request("list") == {"domains": []}
        await session.close()
