"""Tunnel data connections on loopback: open, authenticate, relay, refuse, stop.

Real sockets, real TLS (ferry_native), real tokens; the "qemu" ends are
socket pairs the test reads and writes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ferry.errors import AuthError, FerryError, TunnelError
from ferry.tls import TLSFiles
from ferry.tunnel import PREAMBLE, TokenBook, TunnelGrant
from ferry.tunnel.channel import (
    ChannelSet,
    DataChannel,
    accept_channel,
    make_endpoint,
    open_channel,
)
from ferryctl.pki import init_ca, issue_host


@dataclass
class Pki:
    source: TLSFiles
    destination: TLSFiles
    stranger: TLSFiles


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    src = issue_host(root / "ca", root / "a", "a", dns=["a"], ips=["127.0.0.1"])
    dst = issue_host(root / "ca", root / "b", "b", dns=["b"], ips=["127.0.0.1"])
    init_ca(root / "other-ca")
    odd = issue_host(root / "other-ca", root / "x", "x", dns=["x"], ips=["127.0.0.1"])

    def files(h: Any) -> TLSFiles:
        return TLSFiles(ca=Path(h.ca), cert=Path(h.cert), key=Path(h.key))

    return Pki(files(src), files(dst), files(odd))


class Destination:
    """A listener that reads the preamble and runs accept_channel on a thread."""

    def __init__(self, pki: Pki, book: TokenBook[Any]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = make_endpoint(pki.destination, server=True)
        self.book = book
        self.qemu_ends: list[socket.socket] = []
        self.results: list[tuple[DataChannel, TunnelGrant[Any], socket.socket] | FerryError] = []
        self.done = threading.Event()

    def connect_local(self, grant: TunnelGrant[Any], index: int) -> socket.socket:
        ours, qemus = socket.socketpair()
        self.qemu_ends.append(qemus)
        return ours

    def serve_one(self) -> None:
        def run() -> None:
            conn, _ = self.listener.accept()
            assert conn.recv(len(PREAMBLE), socket.MSG_WAITALL) == PREAMBLE
            try:
                self.results.append(accept_channel(self.endpoint, conn, self.book,
                                                   self.connect_local, timeout=5))  # fmt: skip
            except FerryError as exc:
                self.results.append(exc)
            self.done.set()

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        for sock in self.qemu_ends:
            sock.close()
        for result in self.results:
            if isinstance(result, tuple):
                result[0].close()
                result[2].close()


@pytest.fixture
def dest(pki: Pki) -> Iterator[Destination]:
    d = Destination(pki, TokenBook())
    yield d
    d.close()


def _feed(sock: socket.socket, size: int) -> None:
    """Write ``size`` bytes, until the socket is closed under us."""
    with contextlib.suppress(OSError):
        sock.sendall(b"\0" * size)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", ["tls", "plain"])
def test_channel_carries_bytes_both_ways(pki: Pki, dest: Destination, mode: str) -> None:
    token = dest.book.issue("g1", 1, 30, "sink", allow_plaintext=True)
    dest.serve_one()
    client = open_channel(make_endpoint(pki.source, server=False), "127.0.0.1", dest.port,
                          token=token, index=0, mode=mode, timeout=5)  # fmt: skip
    assert dest.done.wait(5)
    result = dest.results[0]
    assert isinstance(result, tuple), result
    server, grant, local = result
    assert grant.sink == "sink" and server.index == 0 and server.mode == mode

    src_qemu, src_ours = socket.socketpair()
    dst_qemu = dest.qemu_ends[0]
    payload = os.urandom(3 << 20)
    threads = [
        threading.Thread(target=client.run, args=(src_ours,)),
        threading.Thread(target=server.run, args=(local,)),
    ]
    for t in threads:
        t.start()
    src_qemu.sendall(payload)
    src_qemu.shutdown(socket.SHUT_WR)
    received = bytearray()
    while chunk := dst_qemu.recv(1 << 20):
        received += chunk
    assert bytes(received) == payload
    dst_qemu.sendall(b"return path")
    dst_qemu.shutdown(socket.SHUT_WR)
    assert src_qemu.recv(64, socket.MSG_WAITALL) == b"return path"
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert client.bytes_out == len(payload) and client.bytes_in == len(b"return path")
    assert server.bytes_in == len(payload)
    client.close()
    src_qemu.close()
    src_ours.close()


def test_wrong_token_is_refused_with_the_reason(pki: Pki, dest: Destination) -> None:
    dest.book.issue("g1", 1, 30, "sink")
    dest.serve_one()
    with pytest.raises(AuthError, match="tunnel token unknown"):
        open_channel(make_endpoint(pki.source, server=False), "127.0.0.1", dest.port,
                     token="forged", index=0, mode="tls", timeout=5)  # fmt: skip
    assert dest.done.wait(5)
    assert isinstance(dest.results[0], AuthError)


def test_reused_channel_and_plaintext_without_consent(pki: Pki, dest: Destination) -> None:
    token = dest.book.issue("g1", 1, 30, "sink")
    endpoint = make_endpoint(pki.source, server=False)
    dest.serve_one()
    first = open_channel(endpoint, "127.0.0.1", dest.port, token=token, index=0, mode="tls",
                         timeout=5)  # fmt: skip
    first.close()
    dest.done.wait(5)
    dest.done.clear()
    dest.serve_one()
    with pytest.raises(AuthError, match="already used for channel 0"):
        open_channel(endpoint, "127.0.0.1", dest.port, token=token, index=0, mode="tls",
                     timeout=5)  # fmt: skip
    dest.done.wait(5)
    dest.done.clear()
    other = dest.book.issue("g2", 1, 30, "sink")
    dest.serve_one()
    with pytest.raises(AuthError, match="allow_plaintext_tunnel"):
        open_channel(endpoint, "127.0.0.1", dest.port, token=other, index=0, mode="plain",
                     timeout=5)  # fmt: skip


def test_certificate_from_another_ca_is_refused(pki: Pki, dest: Destination) -> None:
    token = dest.book.issue("g1", 1, 30, "sink")
    dest.serve_one()
    with pytest.raises(AuthError):
        open_channel(make_endpoint(pki.stranger, server=False), "127.0.0.1", dest.port,
                     token=token, index=0, mode="tls", timeout=5)  # fmt: skip
    assert dest.done.wait(5)
    assert isinstance(dest.results[0], AuthError), dest.results
    # The token was not spent by the stranger.
    assert dest.book.redeem(token, 0, "tls").name == "g1"


def test_nobody_listening_is_a_tunnel_error(pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(TunnelError, match=r"tunnel channel 0 to 127\.0\.0\.1"):
        open_channel(make_endpoint(pki.source, server=False), "127.0.0.1", port,
                     token="t", index=0, mode="tls", timeout=2)  # fmt: skip


def test_channel_set_stop_ends_a_stalled_relay_and_frees_fds(pki: Pki, dest: Destination) -> None:
    before = fds()
    token = dest.book.issue("g1", 1, 30, "sink")
    dest.serve_one()
    errors: list[FerryError] = []
    channels = ChannelSet("g1", on_error=errors.append)
    src_qemu, src_ours = socket.socketpair()

    def body() -> None:
        channel = open_channel(make_endpoint(pki.source, server=False), "127.0.0.1", dest.port,
                               token=token, index=0, mode="tls", timeout=5)  # fmt: skip
        channels.add(channel)
        try:
            channel.run(src_ours)
        finally:
            channels.release(channel)
            channel.close()

    channels.spawn(0, body)
    # Nobody reads the destination's end: the relays fill every buffer and stall.
    assert dest.done.wait(5)
    feeder = threading.Thread(target=lambda: _feed(src_qemu, 256 << 20), daemon=True)
    feeder.start()
    # Wait until the stream stalls: the counter stops moving with bytes in flight.
    deadline = time.monotonic() + 20
    last = -1
    while time.monotonic() < deadline:
        now = channels.bytes()[0]
        if now > 0 and now == last:
            break
        last = now
        time.sleep(0.3)
    assert last > 0
    channels.stop()
    assert channels.join(5), "the relay thread did not stop"
    assert errors == [] and channels.error is None
    out, _ = channels.bytes()
    assert out >= last
    src_qemu.shutdown(socket.SHUT_RDWR)  # wakes the blocked feeder
    src_qemu.close()
    feeder.join(5)
    src_ours.close()
    dest.close()
    dest.results.clear()
    assert fds() <= before
