"""Tunnel tokens tied to the host that may redeem them (issue 13).

A token from Prepare names its redeemer: in p2p the source agent's own
certificate (its CN), in a client-driven migration the source host named in
the cookie, never the client's operator certificate.  Checked as data, then
on a real peer port (the helpers of test_peer_listener).
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from test_peer_listener import Pki, _config, _data, peer_port, until

from ferry.acl import Subject
from ferry.errors import AuthError
from ferry.tls import TLSFiles
from ferry.tunnel import TokenBook, TunnelGrant
from ferry_destination.tunnel import redeemer_for
from ferryctl.pki import init_ca, issue_client, issue_host

HOST_A = Subject(kind="peer", peer="a", peer_names=("a.test",))
HOST_C = Subject(kind="peer", peer="c", peer_names=("c.test",))
ALICE = Subject(kind="operator", operator="alice")


def _grant(redeemer: str | None) -> TunnelGrant[None]:
    book: TokenBook[None] = TokenBook()
    token = book.issue("g1", 2, 60, None, redeemer=redeemer)
    return book.redeem(token, 0, "tls")


def test_the_named_host_redeems_by_common_name_or_dns_name() -> None:
    _grant("a").check_redeemer(HOST_A)
    _grant("a.test").check_redeemer(HOST_A)
    _grant("A.Test").check_redeemer(HOST_A)  # host names are case-insensitive
    _grant("A").check_redeemer(HOST_A)


def test_another_host_is_refused_naming_both() -> None:
    with pytest.raises(AuthError) as info:
        _grant("a").check_redeemer(HOST_C)
    assert str(info.value) == "tunnel token of 'g1' is for host a; refused for CN=c DNS=c.test"
    nameless = Subject(kind="peer", peer=None)
    with pytest.raises(AuthError, match=r"is for host a; refused for CN=<none>$"):
        _grant("a").check_redeemer(nameless)


def test_an_operator_certificate_never_redeems_a_host_token() -> None:
    with pytest.raises(AuthError) as info:
        _grant("a").check_redeemer(ALICE)
    text = str(info.value)
    assert text.startswith("tunnel token of 'g1' is for host a; refused for operator "
                           "certificate 'alice'"), text  # fmt: skip
    # Nor an operator whose name is the host's.
    with pytest.raises(AuthError, match="operator certificate 'a'"):
        _grant("a").check_redeemer(Subject(kind="operator", operator="a"))
    with pytest.raises(AuthError, match="refused for user 'root'"):
        _grant("a").check_redeemer(Subject(kind="local", uid=0, user="root"))


def test_without_a_redeemer_any_certificate_passes_as_before() -> None:
    grant = _grant(None)
    assert grant.redeemer is None
    for subject in (HOST_A, HOST_C, ALICE):
        grant.check_redeemer(subject)


def test_issue_keeps_the_redeemer_and_counts_spent_channels() -> None:
    book: TokenBook[str] = TokenBook()
    token = book.issue("g1", 3, 60, "sink", redeemer="a")
    assert book.spent("g1") == 0 and book.spent("other") == 0
    grant = book.redeem(token, 1, "tls")
    assert grant.redeemer == "a" and grant.sink == "sink"
    assert book.spent("g1") == 1
    book.redeem(token, 0, "tls")
    assert book.spent("g1") == 2
    # A fresh token replaces the old one: nothing of it spent yet.
    book.issue("g1", 3, 60, "sink", redeemer="a")
    assert book.spent("g1") == 0
    book.revoke("g1")
    assert book.spent("g1") == 0
    with pytest.raises(ValueError, match="redeemer"):
        book.issue("g1", 1, 60, "sink", redeemer="")


def test_redeemer_for_p2p_is_the_caller_and_for_a_client_the_source_host() -> None:
    # p2p: the source agent asked; its own certificate carries the stream.
    assert redeemer_for(HOST_A, "a-configured-name") == "a"
    assert redeemer_for(Subject(kind="peer", peer=None, peer_names=("x.test",)), "a") == "x.test"
    assert redeemer_for(Subject(kind="peer", peer=None), "a") is None
    # A client passes the token on: only the cookie's source host may use it.
    assert redeemer_for(ALICE, "a") == "a"
    assert redeemer_for(Subject(kind="local", uid=0), "a") == "a"
    assert redeemer_for(ALICE, "") is None


# -- on a real peer port ------------------------------------------------------------


@pytest.fixture(scope="module")
def pki_op(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, TLSFiles]:
    d: Path = tmp_path_factory.mktemp("pki-redeemer")
    init_ca(d / "ca")
    a = issue_host(d / "ca", d / "a", "a", dns=["a.test"], ips=["127.0.0.1"])
    b = issue_host(d / "ca", d / "b", "b", dns=["b.test"], ips=["127.0.0.1"])
    alice = issue_client(d / "ca", d / "alice", "alice")
    hosts = Pki(TLSFiles(a.ca, a.cert, a.key), TLSFiles(b.ca, b.cert, b.key))
    return hosts, TLSFiles(alice.ca, alice.cert, alice.key)


async def _admitted(port: Any, files: TLSFiles, token: str) -> None:
    opened = asyncio.create_task(_data(port.port, files, token))
    await until(lambda: port.delivered, what="the data connection")
    pending = port.delivered.pop()
    ours, qemus = socket.socketpair()
    channel, grant, _local = await asyncio.to_thread(pending.complete, lambda g, i: ours)
    (await opened).close()
    assert grant.name == "g1"
    channel.close()
    ours.close()
    qemus.close()
    pending.close()


async def test_peer_port_admits_only_the_tokens_host(pki_op: tuple[Pki, TLSFiles]) -> None:
    hosts, alice = pki_op
    peers = {"operators": ["alice"]}
    acl = [{"operators": ["alice"], "ops": ["tunnel"]}]
    async with peer_port(hosts, _config(peers=peers, acl=acl)) as port:
        # Host a presents a token for host a (by CN, by DNS name): admitted.
        await _admitted(port, hosts.a, port.tokens.issue("g1", 1, 30, object(), redeemer="a"))
        await _admitted(port, hosts.a,
                        port.tokens.issue("g1", 1, 30, object(), redeemer="a.test"))  # fmt: skip
        # A token for host c: host a is refused, and told why.
        token = port.tokens.issue("g1", 1, 30, object(), redeemer="c")
        with pytest.raises(AuthError,
                           match=r"tunnel token of 'g1' is for host c; refused for CN=a "
                                 r"DNS=a DNS=a\.test$"):  # fmt: skip
            await _data(port.port, hosts.a, token)
        # The client's operator certificate, although the ACL grants it
        # 'tunnel', never redeems a token meant for the source host.
        token = port.tokens.issue("g1", 1, 30, object(), redeemer="a")
        with pytest.raises(AuthError, match="is for host a; refused for operator certificate "
                                            "'alice'"):  # fmt: skip
            await _data(port.port, alice, token)
        assert not port.delivered
        # No redeemer: the ACL alone decides, as before.
        await _admitted(port, alice, port.tokens.issue("g1", 1, 30, object()))
