"""The tunnel's TLS stream, run twice: compiled ``ferry_native`` and ``ferry_native.reference``.

Tests that need one stream take the ``backend`` fixture; tests that need two
connected streams take ``pair`` (client backend, server backend), so that the
native stream is checked against the ``ssl``-module reference on the wire as
well as on its own.  Certificates come from ``ferryctl pki`` in a temporary
directory: a cluster CA with a server and a client host, and a rogue CA.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import importlib
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferryctl.pki import HostFiles, init_ca, issue_host

BACKENDS = ["ferry_native", "ferry_native.reference"]
PAIRS = [(c, s) for c in BACKENDS for s in BACKENDS]
# Generous: the machine may be busy with other test runs.
PROMPT_S = 1.0
HANDSHAKE_S = 10.0
JOIN_S = 20.0


def _short(name: str) -> str:
    return "native" if name == "ferry_native" else "reference"


@pytest.fixture(params=BACKENDS, ids=_short)
def backend(request: pytest.FixtureRequest) -> ModuleType:
    """The module under test: the compiled package or the pure-Python reference."""
    return importlib.import_module(request.param)


@pytest.fixture(params=PAIRS, ids=lambda p: f"{_short(p[0])}-client-{_short(p[1])}-server")
def pair(request: pytest.FixtureRequest) -> tuple[ModuleType, ModuleType]:
    """(client backend, server backend): every combination, interop included."""
    client, server = request.param
    return importlib.import_module(client), importlib.import_module(server)


@dataclass(frozen=True)
class Pki:
    """The throwaway PKI: the cluster's hosts and a host of a foreign CA."""

    server: HostFiles  # CN server, DNS server.test, IP 127.0.0.1
    client: HostFiles  # CN client, DNS client.test, IP 127.0.0.2
    rogue: HostFiles  # another CA's host with the server's names


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA with two hosts, and a rogue CA with one, made by ferryctl pki."""
    root = tmp_path_factory.mktemp("pki")
    init_ca(root / "ca")
    init_ca(root / "rogue-ca", common_name="Rogue CA")
    return Pki(
        server=issue_host(root / "ca", root / "server", "server", dns=["server.test"],
                          ips=["127.0.0.1"]),
        client=issue_host(root / "ca", root / "client", "client", dns=["client.test"],
                          ips=["127.0.0.2"]),
        rogue=issue_host(root / "rogue-ca", root / "rogue", "server", dns=["server.test"],
                         ips=["127.0.0.1"]),
    )


def _endpoint(mod: ModuleType, files: HostFiles, *, server: bool, ca: Path | None = None) -> Any:
    return mod.TlsEndpoint(
        server=server, ca_file=str(ca or files.ca), cert_file=str(files.cert),
        key_file=str(files.key),
    )


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def sockets() -> Iterator[Callable[[], tuple[socket.socket, socket.socket]]]:
    """Factory of connected loopback TCP pairs (client, server), all closed after the test."""
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
        made.extend((client, conn))
        return client, conn

    yield make
    for sock in made:
        sock.close()


class Background:
    """A call in a thread; join() returns its value or raises its exception."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.value = fn(*args)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = JOIN_S) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


def _wait_for(cond: Callable[[], bool], timeout: float = JOIN_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def _read_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 20):
        parts.append(chunk)
    return b"".join(parts)


@pytest.fixture
def connect(
    pki: Pki, sockets: Callable[[], tuple[socket.socket, socket.socket]]
) -> Iterator[Callable[..., tuple[Any, Any]]]:
    """Make a client and a server stream over loopback TCP and do the handshake."""
    streams: list[Any] = []

    def make(
        client_mod: ModuleType, server_mod: ModuleType, *, peer_name: str = "127.0.0.1"
    ) -> tuple[Any, Any]:
        c, s = sockets()
        client = client_mod.TlsStream(
            _endpoint(client_mod, pki.client, server=False), c.fileno(), peer_name=peer_name
        )
        server = server_mod.TlsStream(_endpoint(server_mod, pki.server, server=True), s.fileno())
        streams.extend((client, server))
        accepting = Background(server.handshake, HANDSHAKE_S)
        client.handshake(HANDSHAKE_S)
        accepting.join()
        return client, server

    yield make
    for stream in streams:
        stream.close()


# -- handshake and control exchange -------------------------------------------


def test_handshake_and_control_exchange(
    pair: tuple[ModuleType, ModuleType], pki: Pki, connect: Callable[..., tuple[Any, Any]]
) -> None:
    client, server = connect(*pair)
    assert client.cipher == server.cipher
    assert client.cipher.startswith("TLS_AES_")  # AES-GCM: the CPU has AES-NI
    assert client.peer_certificate() == ssl.PEM_cert_to_DER_cert(pki.server.cert.read_text())
    assert server.peer_certificate() == ssl.PEM_cert_to_DER_cert(pki.client.cert.read_text())
    client.send_all(b"hello server", 5)
    assert server.recv_some(100, 5) == b"hello server"
    big = random.Random(1).randbytes(100_000)
    sending = Background(server.send_all, big, 5)
    got = b""
    while len(got) < len(big):
        chunk = client.recv_some(1 << 20, 5)
        assert 0 < len(chunk) <= 16 * 1024  # one record at most
        got += chunk
    sending.join()
    assert got == big
    client.handshake(5)  # done already: nothing happens
    assert client.bytes_sent == client.bytes_received == 0  # pump() only


def test_dns_peer_name(pair: tuple[ModuleType, ModuleType], connect: Callable[..., Any]) -> None:
    client, server = connect(*pair, peer_name="server.test")
    client.send_all(b"x", 5)
    assert server.recv_some(10, 5) == b"x"


def test_recv_some_timeout(backend: ModuleType, connect: Callable[..., tuple[Any, Any]]) -> None:
    client, _ = connect(backend, backend)
    with pytest.raises(backend.TlsError, match=r"^receive timed out after 0\.1 s$"):
        client.recv_some(10, 0.1)


def test_close_notify_gives_empty_bytes(
    pair: tuple[ModuleType, ModuleType], connect: Callable[..., tuple[Any, Any]]
) -> None:
    client, server = connect(*pair)
    unwrapping = Background(server.unwrap, 5)
    assert client.recv_some(10, 5) == b""
    client.unwrap(5)
    unwrapping.join()


# -- refusals -----------------------------------------------------------------


def _handshake_both(client: Any, server: Any) -> tuple[BaseException | None, BaseException | None]:
    """Run both handshakes; return their exceptions (None when one succeeded)."""
    accepting = Background(server.handshake, HANDSHAKE_S)
    client_error: BaseException | None = None
    try:
        client.handshake(HANDSHAKE_S)
    except Exception as exc:
        client_error = exc
    server_error: BaseException | None = None
    try:
        accepting.join()
    except Exception as exc:
        server_error = exc
    return client_error, server_error


def test_server_refuses_client_of_other_ca(
    pair: tuple[ModuleType, ModuleType],
    pki: Pki,
    sockets: Callable[[], tuple[socket.socket, socket.socket]],
) -> None:
    client_mod, server_mod = pair
    c, s = sockets()
    # The client trusts the cluster CA but presents the rogue CA's certificate.
    rogue = _endpoint(client_mod, pki.rogue, server=False, ca=pki.server.ca)
    with (
        client_mod.TlsStream(rogue, c.fileno(), peer_name="127.0.0.1") as client,
        server_mod.TlsStream(_endpoint(server_mod, pki.server, server=True), s.fileno()) as server,
    ):
        client_error, server_error = _handshake_both(client, server)
        assert isinstance(server_error, server_mod.TlsError)
        assert str(server_error) == (
            "certificate verify failed: unable to get local issuer certificate"
        )
        # TLS 1.3: the client's handshake is over before the server checks it;
        # the refusal arrives as an alert on the first read.
        if client_error is None:
            with pytest.raises(client_mod.TlsError) as info:
                client.recv_some(10, 5)
            client_error = info.value
        assert str(client_error) == "peer sent a TLS alert: tlsv1 alert unknown ca"


def test_client_refuses_server_of_other_ca(
    pair: tuple[ModuleType, ModuleType],
    pki: Pki,
    sockets: Callable[[], tuple[socket.socket, socket.socket]],
) -> None:
    client_mod, server_mod = pair
    c, s = sockets()
    rogue = _endpoint(server_mod, pki.rogue, server=True, ca=pki.server.ca)
    with (
        client_mod.TlsStream(
            _endpoint(client_mod, pki.client, server=False), c.fileno(), peer_name="127.0.0.1"
        ) as client,
        server_mod.TlsStream(rogue, s.fileno()) as server,
    ):
        client_error, server_error = _handshake_both(client, server)
    assert isinstance(client_error, client_mod.TlsError)
    assert str(client_error) == "certificate verify failed: unable to get local issuer certificate"
    assert isinstance(server_error, server_mod.TlsError)
    assert str(server_error) == "peer sent a TLS alert: tlsv1 alert unknown ca"


def test_client_without_certificate_refused(
    backend: ModuleType, pki: Pki, sockets: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    c, s = sockets()
    # A plain ssl client that has no certificate to present.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.server.ca)

    def dial() -> None:
        with ctx.wrap_socket(socket.socket(fileno=os.dup(c.fileno())),
                             server_hostname="127.0.0.1") as tls, contextlib.suppress(OSError):
            tls.recv(10)  # the server's alert

    dialling = Background(dial)
    with (
        backend.TlsStream(_endpoint(backend, pki.server, server=True), s.fileno()) as server,
        pytest.raises(backend.TlsError, match=r"^peer did not present a certificate$"),
    ):
        server.handshake(HANDSHAKE_S)
    dialling.join()


@pytest.mark.parametrize("peer_name", ["127.0.0.9", "other.test", "client.test"])
def test_wrong_peer_name(
    pair: tuple[ModuleType, ModuleType],
    pki: Pki,
    sockets: Callable[[], tuple[socket.socket, socket.socket]],
    peer_name: str,
) -> None:
    client_mod, server_mod = pair
    c, s = sockets()
    with (
        client_mod.TlsStream(
            _endpoint(client_mod, pki.client, server=False), c.fileno(), peer_name=peer_name
        ) as client,
        server_mod.TlsStream(_endpoint(server_mod, pki.server, server=True), s.fileno()) as server,
    ):
        client_error, server_error = _handshake_both(client, server)
    assert isinstance(client_error, client_mod.TlsError)
    assert str(client_error) == f"certificate does not match {peer_name}"
    assert isinstance(server_error, server_mod.TlsError)


@pytest.mark.parametrize("side", ["client", "server"])
def test_handshake_timeout(
    backend: ModuleType,
    pki: Pki,
    sockets: Callable[[], tuple[socket.socket, socket.socket]],
    side: str,
) -> None:
    """The peer accepted the TCP connection but never speaks TLS."""
    c, s = sockets()
    if side == "client":
        stream = backend.TlsStream(
            _endpoint(backend, pki.client, server=False), c.fileno(), peer_name="127.0.0.1"
        )
    else:
        stream = backend.TlsStream(_endpoint(backend, pki.server, server=True), s.fileno())
    with stream, pytest.raises(backend.TlsError, match=r"^handshake timed out after 0\.2 s$"):
        stream.handshake(0.2)


def test_peer_closes_during_handshake(
    backend: ModuleType, pki: Pki, sockets: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    c, s = sockets()
    s.shutdown(socket.SHUT_RDWR)
    with (
        backend.TlsStream(
            _endpoint(backend, pki.client, server=False), c.fileno(), peer_name="127.0.0.1"
        ) as client,
        pytest.raises(backend.TlsError,
                      match=r"^peer closed the connection during the TLS handshake"),
    ):
        client.handshake(HANDSHAKE_S)


def test_stop_interrupts_handshake(
    backend: ModuleType, pki: Pki, sockets: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    c, _ = sockets()
    with backend.TlsStream(
        _endpoint(backend, pki.client, server=False), c.fileno(), peer_name="127.0.0.1"
    ) as client:
        running = Background(client.handshake, 60)
        _wait_for(lambda: "running" in repr(client))
        started = time.monotonic()
        client.stop()
        with pytest.raises(backend.TlsError, match=r"^handshake interrupted by stop\(\)$"):
            running.join(PROMPT_S * 5)
        assert time.monotonic() - started < PROMPT_S


# -- pump ---------------------------------------------------------------------


@dataclass
class Tunnel:
    """app_a <-> [client.pump] <-TLS-> [server.pump] <-> app_b, over socketpairs."""

    client: Any
    server: Any
    app_a: socket.socket
    app_b: socket.socket
    plain_a: socket.socket
    plain_b: socket.socket
    pumps: list[Background]

    def close(self) -> None:
        for sock in (self.app_a, self.app_b, self.plain_a, self.plain_b):
            sock.close()


@pytest.fixture
def tunnel(connect: Callable[..., tuple[Any, Any]]) -> Iterator[Callable[..., Tunnel]]:
    """Factory: connected streams with both pumps running in threads."""
    made: list[Tunnel] = []

    def make(client_mod: ModuleType, server_mod: ModuleType, *, buffer_size: int = 256 * 1024,
             start: bool = True) -> Tunnel:
        client, server = connect(client_mod, server_mod)
        app_a, plain_a = socket.socketpair()
        app_b, plain_b = socket.socketpair()
        t = Tunnel(client, server, app_a, app_b, plain_a, plain_b, [])
        made.append(t)
        if start:
            t.pumps = [
                Background(lambda: client.pump(plain_a.fileno(), buffer_size=buffer_size)),
                Background(lambda: server.pump(plain_b.fileno(), buffer_size=buffer_size)),
            ]
        return t

    yield make
    for t in made:
        t.client.stop()
        t.server.stop()
        for p in t.pumps:
            p.thread.join(JOIN_S)
        t.close()


def _writer(sock: socket.socket, data: bytes, chunks: list[int]) -> Background:
    """Write ``data`` in pieces of the ``chunks`` sizes (cycled), then shut down for writing."""

    def run() -> None:
        view = memoryview(data)
        i = 0
        while view:
            n = chunks[i % len(chunks)]
            sock.sendall(view[:n])
            view = view[n:]
            i += 1
        sock.shutdown(socket.SHUT_WR)

    return Background(run)


def _feed(sock: socket.socket, nbytes: int) -> Background:
    """Send ``nbytes`` zeros until done or the socket is closed under it."""

    def run() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(bytes(nbytes))

    return Background(run)


@settings(max_examples=5, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    up=st.integers(0, 2 << 20),
    down=st.integers(0, 2 << 20),
    chunks=st.lists(st.integers(1, 1 << 20), min_size=1, max_size=4),
    # Not below 4 KiB: the reference makes a record of each read, slowly.
    buffer_size=st.sampled_from([4096, 16383, 16384, 65536, 256 * 1024, 1 << 20]),
    seed=st.integers(0, 2**32),
)
def test_pump_both_directions_random(
    pair: tuple[ModuleType, ModuleType],
    tunnel: Callable[..., Tunnel],
    up: int,
    down: int,
    chunks: list[int],
    buffer_size: int,
    seed: int,
) -> None:
    rng = random.Random(seed)
    data_up, data_down = rng.randbytes(up), rng.randbytes(down)
    t = tunnel(*pair, buffer_size=buffer_size)
    writers = [_writer(t.app_a, data_up, chunks), _writer(t.app_b, data_down, chunks[::-1])]
    readers = [Background(_read_all, t.app_b), Background(_read_all, t.app_a)]
    got_up, got_down = readers[0].join(), readers[1].join()
    for b in (*writers, *t.pumps):
        b.join()
    assert got_up == data_up
    assert got_down == data_down
    assert t.client.bytes_sent == t.server.bytes_received == up
    assert t.server.bytes_sent == t.client.bytes_received == down
    assert not t.client.stopped and not t.server.stopped


@pytest.mark.parametrize("buffer_size", [1, 100])
def test_pump_tiny_buffer(
    pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel], buffer_size: int
) -> None:
    """Records smaller than the peer's buffer, partial records left in OpenSSL."""
    data_up, data_down = bytes(range(256)) * 12, random.Random(4).randbytes(12_000)
    t = tunnel(*pair, buffer_size=buffer_size)
    writers = [_writer(t.app_a, data_up, [1000]), _writer(t.app_b, data_down, [12_000])]
    assert _read_all(t.app_b) == data_up
    assert _read_all(t.app_a) == data_down
    for b in (*writers, *t.pumps):
        b.join()


def test_pump_large(pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel]) -> None:
    data = random.Random(7).randbytes(24 << 20)
    t = tunnel(*pair)
    writer = _writer(t.app_a, data, [1 << 20])
    t.app_b.shutdown(socket.SHUT_WR)
    assert _read_all(t.app_b) == data
    assert _read_all(t.app_a) == b""
    writer.join()
    for p in t.pumps:
        p.join()


def test_half_close(pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel]) -> None:
    """EOF on one side's plain fd reaches the other app; the reverse direction keeps going."""
    t = tunnel(*pair)
    t.app_a.sendall(b"request")
    t.app_a.shutdown(socket.SHUT_WR)
    assert _read_all(t.app_b) == b"request"  # EOF arrived: the request is complete
    assert all(p.thread.is_alive() for p in t.pumps)  # the other direction is still open
    reply = random.Random(2).randbytes(5 << 20)
    writer = _writer(t.app_b, reply, [65536])
    assert _read_all(t.app_a) == reply
    writer.join()
    for p in t.pumps:
        p.join()
    assert (t.client.bytes_sent, t.client.bytes_received) == (7, len(reply))


def test_stop_when_peer_stops_reading(
    pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel]
) -> None:
    """Nobody reads the server's plain side: the client's pump blocks; stop() ends it."""
    t = tunnel(*pair)
    feeder = _feed(t.app_a, 256 << 20)
    last, stalled_since = -1, time.monotonic()
    while time.monotonic() - stalled_since < 0.3:  # until the copy stalls
        if t.client.bytes_sent != last:
            last, stalled_since = t.client.bytes_sent, time.monotonic()
        time.sleep(0.02)
    assert t.client.bytes_sent < 256 << 20
    started = time.monotonic()
    t.client.stop()
    t.pumps[0].thread.join(PROMPT_S)
    assert not t.pumps[0].thread.is_alive()
    assert time.monotonic() - started < PROMPT_S
    assert t.pumps[0].join() is None  # returns normally
    assert t.client.stopped
    t.client.pump(t.plain_a.fileno())  # a stopped stream stays stopped: returns at once
    t.server.stop()
    t.pumps[1].join()
    t.app_a.shutdown(socket.SHUT_RDWR)  # unblocks the feeder (close() would not)
    feeder.join()


def test_stop_before_pump(backend: ModuleType, tunnel: Callable[..., Tunnel]) -> None:
    t = tunnel(backend, backend, start=False)
    t.client.stop()
    assert t.client.stopped
    t.client.pump(t.plain_a.fileno())
    assert t.client.bytes_sent == 0


def test_close_while_pumping(backend: ModuleType, tunnel: Callable[..., Tunnel]) -> None:
    t = tunnel(backend, backend)
    _wait_for(lambda: "running" in repr(t.client))
    t.client.close()
    assert t.pumps[0].join() is None
    assert t.client.closed
    with pytest.raises(ValueError, match="closed"):
        t.client.pump(t.plain_a.fileno())


def test_truncated_stream_recv(
    pair: tuple[ModuleType, ModuleType],
    connect: Callable[..., tuple[Any, Any]],
) -> None:
    client_mod, _ = pair
    client, server = connect(*pair)
    server.send_all(b"partial", 5)
    with socket.socket(fileno=os.dup(server.fd)) as raw:
        raw.shutdown(socket.SHUT_WR)  # end of file without close_notify
    assert client.recv_some(100, 5) == b"partial"
    with pytest.raises(client_mod.TlsError,
                       match=r"^peer closed the connection without close_notify \(truncated\)$"):
        client.recv_some(100, 5)


def test_truncated_stream_pump(
    pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel]
) -> None:
    client_mod, _ = pair
    t = tunnel(*pair, start=False)
    pumping = Background(t.client.pump, t.plain_a.fileno())
    t.server.send_all(b"x" * 100_000, 5)  # not a pump: send_all never sends close_notify
    with socket.socket(fileno=os.dup(t.server.fd)) as raw:
        raw.shutdown(socket.SHUT_WR)
    with pytest.raises(client_mod.TlsError,
                       match=r"^peer closed the connection without close_notify \(truncated\)$"):
        pumping.join()
    assert t.client.bytes_received == 100_000


# -- unwrap -------------------------------------------------------------------


def test_unwrap_then_plaintext(
    pair: tuple[ModuleType, ModuleType], connect: Callable[..., tuple[Any, Any]]
) -> None:
    """Both sides unwrap and at once talk in the clear; nothing of it is lost to TLS."""
    client, server = connect(*pair)
    client.send_all(b"last TLS message", 5)
    assert server.recv_some(100, 5) == b"last TLS message"

    def unwrap_and_talk(stream: Any, words: bytes, expect: int) -> bytes:
        stream.unwrap(5)
        with socket.socket(fileno=os.dup(stream.fd)) as raw:
            raw.sendall(words)  # right away: the peer may still be unwrapping
            got = b""
            while len(got) < expect:
                chunk = raw.recv(expect - len(got))
                assert chunk
                got += chunk
            return got

    a_words, b_words = b"plain from the client" * 100, b"plain from the server" * 50
    serving = Background(unwrap_and_talk, server, b_words, len(a_words))
    assert unwrap_and_talk(client, a_words, len(b_words)) == b_words
    assert serving.join() == a_words
    with pytest.raises(ValueError, match="unwrapped"):
        client.send_all(b"x", 1)
    assert "unwrapped" in repr(client)


# -- misuse, resources, flags --------------------------------------------------


def test_bad_files(backend: ModuleType, pki: Pki, tmp_path: Path) -> None:
    files = pki.server
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    missing = tmp_path / "missing.pem"

    def make(ca: Path = files.ca, cert: Path = files.cert, key: Path = files.key) -> Any:
        return backend.TlsEndpoint(server=True, ca_file=ca, cert_file=cert, key_file=key)

    with pytest.raises(FileNotFoundError) as nf:
        make(ca=missing)
    assert nf.value.filename == str(missing)
    assert "TLS CA certificate file" in str(nf.value)
    with pytest.raises(FileNotFoundError, match="TLS private key file"):
        make(key=missing)
    with pytest.raises(IsADirectoryError, match="TLS certificate file"):
        make(cert=tmp_path)
    with pytest.raises(ValueError, match=f"TLS CA certificate file {garbage} holds no usable"):
        make(ca=garbage)
    with pytest.raises(ValueError, match=f"TLS certificate file {garbage} holds no usable"):
        make(cert=garbage)
    with pytest.raises(ValueError, match=f"TLS private key file {garbage} holds no usable"):
        make(key=garbage)
    with pytest.raises(ValueError, match=f"TLS private key file {pki.client.key} does not belong "
                                         f"to certificate file {files.cert}"):
        make(key=pki.client.key)


def test_misuse(
    backend: ModuleType, pki: Pki, sockets: Callable[[], tuple[socket.socket, socket.socket]]
) -> None:
    c, s = sockets()
    client_ep = _endpoint(backend, pki.client, server=False)
    server_ep = _endpoint(backend, pki.server, server=True)
    with pytest.raises(ValueError, match="peer_name"):
        backend.TlsStream(client_ep, c.fileno())
    with pytest.raises(ValueError, match="peer_name"):
        backend.TlsStream(server_ep, s.fileno(), peer_name="x")
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            backend.TlsStream(server_ep, r)
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(OSError) as info:
        backend.TlsStream(server_ep, r)
    assert info.value.errno == errno.EBADF
    with pytest.raises(TypeError):
        backend.TlsStream(object(), s.fileno())
    stream = backend.TlsStream(server_ep, s.fileno())
    for call in (lambda: stream.recv_some(1, 1), lambda: stream.send_all(b"x", 1),
                 lambda: stream.unwrap(1), lambda: stream.pump(c.fileno()),
                 stream.peer_certificate):
        with pytest.raises(ValueError, match="handshake"):
            call()
    with pytest.raises(ValueError, match="timeout"):
        stream.handshake(-1)
    assert stream.cipher is None
    assert "new" in repr(stream)
    stream.close()
    stream.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        stream.handshake(1)
    assert stream.closed and "closed" in repr(stream)


def test_busy_refused(backend: ModuleType, connect: Callable[..., tuple[Any, Any]]) -> None:
    client, _ = connect(backend, backend)
    receiving = Background(client.recv_some, 10, 30)
    _wait_for(lambda: "running" in repr(client))
    with pytest.raises(RuntimeError, match="busy"):
        client.send_all(b"x", 1)
    client.stop()
    with pytest.raises(backend.TlsError, match="interrupted by stop"):
        receiving.join()


def test_flags_untouched(
    pair: tuple[ModuleType, ModuleType], tunnel: Callable[..., Tunnel]
) -> None:
    t = tunnel(*pair, start=False)
    fds = [t.client.fd, t.server.fd, t.plain_a.fileno(), t.plain_b.fileno()]
    flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds]
    t.pumps = [Background(t.client.pump, t.plain_a.fileno()),
               Background(t.server.pump, t.plain_b.fileno())]
    t.app_a.sendall(b"abc")
    t.app_a.shutdown(socket.SHUT_WR)
    t.app_b.shutdown(socket.SHUT_WR)
    assert _read_all(t.app_b) == b"abc"
    for p in t.pumps:
        p.join()
    assert [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in fds] == flags


def test_no_fd_leak(
    pair: tuple[ModuleType, ModuleType],
    pki: Pki,
    sockets: Callable[[], tuple[socket.socket, socket.socket]],
) -> None:
    client_mod, server_mod = pair
    pairs = [sockets() for _ in range(6)]
    client_ep = _endpoint(client_mod, pki.client, server=False)
    server_ep = _endpoint(server_mod, pki.server, server=True)
    before = _open_fds()
    for i, (c, s) in enumerate(pairs):
        client = client_mod.TlsStream(client_ep, c.fileno(), peer_name="127.0.0.1")
        server = server_mod.TlsStream(server_ep, s.fileno())
        if i % 2:
            _handshake_both(client, server)
            client.send_all(b"x", 5)
            assert server.recv_some(1, 5) == b"x"
        if i % 3 == 0:
            client.close()
            server.close()
        # else: dropped without close(), freed by GC
        del client, server
    for mod in (client_mod, server_mod):
        with mod.TlsStream(_endpoint(mod, pki.server, server=True), pairs[0][1].fileno()):
            pass
    gc.collect()
    assert _open_fds() == before


def test_backend_identity(backend: ModuleType) -> None:
    if backend.__name__ == "ferry_native":
        assert backend.BACKEND == "native"
        assert backend.TlsStream.__module__ == "ferry_native._tls"
    else:
        assert backend.BACKEND == "reference"
        assert backend.TlsStream.__module__ == "ferry_native.reference.tls"
    assert issubclass(backend.TlsError, ConnectionError)
    for cls in (backend.TlsEndpoint, backend.TlsStream):
        for name in dir(cls):
            if not name.startswith("_"):
                assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"


def test_same_api() -> None:
    import ferry_native
    import ferry_native.reference

    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    for name in ("TlsEndpoint", "TlsStream"):
        assert public(getattr(ferry_native, name)) == public(getattr(ferry_native.reference, name))
    assert ferry_native.__all__ == ferry_native.reference.__all__
