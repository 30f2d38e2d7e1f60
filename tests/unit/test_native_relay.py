"""The tunnel relay, run twice: compiled ``ferry_native`` and ``ferry_native.reference``.

Every test takes the ``backend`` fixture, so one suite checks both (as
msgpack-python runs its suite with and without the extension).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib
import os
import random
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BACKENDS = ["ferry_native", "ferry_native.reference"]
KINDS = ["socketpair", "tcp", "pipe"]
# Generous: the machine may be busy with other test runs.
PROMPT_S = 2.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> ModuleType:
    """The module under test: the compiled package or the pure-Python reference."""
    return importlib.import_module(request.param)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Channel:
    """One byte channel: bytes written to ``write_fd`` come out of ``read_fd``."""

    read_fd: int
    write_fd: int
    is_socket: bool
    _closers: list[Callable[[], None]] = field(default_factory=list)

    def close_write(self) -> None:
        """Signal end of file to the reader."""
        if self.is_socket:
            with (
                contextlib.suppress(OSError),
                socket.socket(fileno=os.dup(self.write_fd)) as sock,
            ):
                sock.shutdown(socket.SHUT_WR)
        else:
            self._close_fd("write_fd")

    def _close_fd(self, name: str) -> None:
        fd = getattr(self, name)
        if fd >= 0:
            os.close(fd)
            setattr(self, name, -1)

    def close(self) -> None:
        """Close both ends."""
        self._close_fd("read_fd")
        self._close_fd("write_fd")


def _channel(kind: str) -> Channel:
    if kind == "pipe":
        r, w = os.pipe()
        return Channel(r, w, is_socket=False)
    if kind == "socketpair":
        a, b = socket.socketpair()
        return Channel(b.detach(), a.detach(), is_socket=True)
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    return Channel(conn.detach(), client.detach(), is_socket=True)


@pytest.fixture
def channels() -> Iterator[Callable[[str], Channel]]:
    """Factory of channels, all closed after the test."""
    made: list[Channel] = []

    def make(kind: str) -> Channel:
        chan = _channel(kind)
        made.append(chan)
        return chan

    yield make
    for chan in made:
        chan.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _feed(fd: int, data: bytes) -> threading.Thread:
    """Write ``data`` to ``fd`` in a daemon thread that gives up once the fd is closed."""

    def target() -> None:
        with contextlib.suppress(OSError):
            _write_all(fd, data)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _pump(
    backend: ModuleType, src: Channel, dst: Channel, data: bytes, **kwargs: int
) -> tuple[int, bytes]:
    """Send ``data`` into ``src``, relay src→dst, read dst to EOF; return (run(), bytes read)."""
    received: list[bytes] = []

    def send() -> None:
        _write_all(src.write_fd, data)
        src.close_write()

    sender = threading.Thread(target=send)
    receiver = threading.Thread(target=lambda: received.append(_read_all(dst.read_fd)))
    sender.start()
    receiver.start()
    with backend.Relay(src.read_fd, dst.write_fd, **kwargs) as r:
        copied = r.run()
        assert not r.stopped
        assert r.bytes_copied == copied
    if not dst.is_socket:
        dst.close_write()  # half_close only shuts sockets down; a pipe needs closing
    sender.join(10)
    receiver.join(10)
    assert not receiver.is_alive()
    return copied, received[0]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [0, 1, 4095, 65537, (3 << 20) + 7])
def test_bytes_identical(
    backend: ModuleType, channels: Callable[[str], Channel], kind: str, size: int
) -> None:
    data = random.Random(size).randbytes(size)
    copied, got = _pump(backend, channels(kind), channels(kind), data)
    assert copied == size
    assert got == data


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    size=st.integers(0, 1 << 20),
    buffer_size=st.integers(1024, 1 << 20),
    kinds=st.tuples(st.sampled_from(KINDS), st.sampled_from(KINDS)),
    seed=st.integers(0, 2**32),
)
def test_bytes_identical_random(
    backend: ModuleType,
    size: int,
    buffer_size: int,
    kinds: tuple[str, str],
    seed: int,
) -> None:
    data = random.Random(seed).randbytes(size)
    src, dst = _channel(kinds[0]), _channel(kinds[1])
    try:
        copied, got = _pump(backend, src, dst, data, buffer_size=buffer_size)
    finally:
        src.close()
        dst.close()
    assert copied == size
    assert got == data


def test_tiny_buffer(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    data = bytes(range(256)) * 8
    copied, got = _pump(backend, channels("tcp"), channels("pipe"), data, buffer_size=1)
    assert (copied, got) == (len(data), data)


def test_multi_megabyte_tcp(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    data = random.Random(7).randbytes(24 << 20)
    copied, got = _pump(backend, channels("tcp"), channels("tcp"), data)
    assert copied == len(data)
    assert got == data


@pytest.mark.parametrize("kind", KINDS)
def test_non_blocking_fds(
    backend: ModuleType, channels: Callable[[str], Channel], kind: str
) -> None:
    """O_NONBLOCK fds: EAGAIN is waited out with poll(), and the flags are left alone."""
    src, dst = channels(kind), channels(kind)
    for fd in (src.read_fd, dst.write_fd):
        os.set_blocking(fd, False)
    data = random.Random(3).randbytes(2 << 20)
    copied, got = _pump(backend, src, dst, data, buffer_size=100_000)
    assert (copied, got) == (len(data), data)
    assert not os.get_blocking(src.read_fd)
    if dst.write_fd >= 0:
        assert not os.get_blocking(dst.write_fd)


def test_blocking_flags_untouched(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("tcp"), channels("tcp")
    flags = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (src.read_fd, dst.write_fd)]
    _pump(backend, src, dst, b"x" * 100_000)
    assert [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in (src.read_fd, dst.write_fd)] == flags


def test_regular_file_source(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    data = random.Random(5).randbytes((1 << 20) + 333)
    dst = channels("socketpair")
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        f.seek(0)
        received: list[bytes] = []
        receiver = threading.Thread(target=lambda: received.append(_read_all(dst.read_fd)))
        receiver.start()
        assert backend.relay(f.fileno(), dst.write_fd) == len(data)
        receiver.join(10)
    assert received == [data]


@pytest.mark.parametrize("kind", ["socketpair", "tcp"])
def test_half_close(backend: ModuleType, channels: Callable[[str], Channel], kind: str) -> None:
    """EOF on the source shuts the destination down for writing only."""
    src, dst = channels(kind), channels(kind)
    src.close_write()
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        assert r.run() == 0
    assert os.read(dst.read_fd, 10) == b""  # the receiver sees EOF...
    _write_all(dst.read_fd, b"reply")  # ...and can still answer
    assert os.read(dst.write_fd, 10) == b"reply"


def test_no_half_close(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("socketpair"), channels("socketpair")
    _write_all(src.write_fd, b"abc")
    src.close_write()
    with backend.Relay(src.read_fd, dst.write_fd, half_close=False) as r:
        assert not r.half_close
        assert r.run() == 3
    assert os.read(dst.read_fd, 10) == b"abc"
    os.set_blocking(dst.read_fd, False)
    with pytest.raises(BlockingIOError):
        os.read(dst.read_fd, 10)  # no EOF: the destination is still open


def _run_in_thread(r: object) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = r.run()  # type: ignore[attr-defined]
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


@pytest.mark.parametrize("kind", KINDS)
def test_stop_idle_source(
    backend: ModuleType, channels: Callable[[str], Channel], kind: str
) -> None:
    src, dst = channels(kind), channels(kind)
    _write_all(src.write_fd, b"hello")
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        thread, result = _run_in_thread(r)
        deadline = time.monotonic() + PROMPT_S
        while r.bytes_copied < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not r.stopped
        started = time.monotonic()
        r.stop()
        thread.join(PROMPT_S)
        assert not thread.is_alive()
        assert time.monotonic() - started < PROMPT_S
        assert result == {"value": 5}
        assert r.stopped
        assert r.run() == 0  # a stopped relay stays stopped
        assert r.stopped


def test_stop_while_destination_full(
    backend: ModuleType, channels: Callable[[str], Channel]
) -> None:
    """The receiver stops reading: run() is blocked on send, stop() still ends it."""
    src, dst = channels("tcp"), channels("tcp")
    feeder = _feed(src.write_fd, bytes(64 << 20))
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        thread, result = _run_in_thread(r)
        last, deadline = -1, time.monotonic() + 10
        while time.monotonic() < deadline:  # until the copy stalls
            time.sleep(0.1)
            if r.bytes_copied == last:
                break
            last = r.bytes_copied
        started = time.monotonic()
        r.stop()
        thread.join(PROMPT_S)
        assert not thread.is_alive()
        assert time.monotonic() - started < PROMPT_S
        assert r.stopped
        assert result["value"] == r.bytes_copied
    src.close()  # unblocks the feeder
    feeder.join(PROMPT_S)


def test_stop_before_run(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("pipe"), channels("pipe")
    _write_all(src.write_fd, b"data")
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        r.stop()
        assert r.stopped
        assert r.run() == 0
    assert r.bytes_copied == 0


def test_stop_after_eof_is_not_stopped(
    backend: ModuleType, channels: Callable[[str], Channel]
) -> None:
    src, dst = channels("socketpair"), channels("socketpair")
    src.close_write()
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        r.run()
        r.stop()
        assert not r.stopped  # the copy was complete


def test_close_while_running(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("socketpair"), channels("socketpair")
    before = _open_fds()
    r = backend.Relay(src.read_fd, dst.write_fd)
    thread, result = _run_in_thread(r)
    time.sleep(0.05)
    r.close()
    thread.join(PROMPT_S)
    assert not thread.is_alive()
    assert result == {"value": 0}
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.run()
    r.close()
    assert _open_fds() == before


def test_concurrent_run_refused(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("pipe"), channels("pipe")
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        thread, _ = _run_in_thread(r)
        time.sleep(0.05)
        with pytest.raises(RuntimeError, match="already running"):
            r.run()
        r.stop()
        thread.join(PROMPT_S)


@pytest.mark.parametrize("kind", KINDS)
def test_destination_closed(
    backend: ModuleType, channels: Callable[[str], Channel], kind: str
) -> None:
    src, dst = channels(kind), channels(kind)
    os.close(dst.read_fd)
    dst.read_fd = -1
    feeder = _feed(src.write_fd, bytes(4 << 20))
    with backend.Relay(src.read_fd, dst.write_fd) as r, pytest.raises(OSError) as info:
        r.run()
    assert isinstance(info.value, BrokenPipeError | ConnectionResetError)
    assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    assert info.value.strerror
    src.close()
    feeder.join(PROMPT_S)


def test_bad_fd(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    before = _open_fds()
    with pytest.raises(OSError) as info:
        backend.Relay(r, w)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        backend.relay(-1, 1)
    assert info.value.errno == errno.EBADF
    assert _open_fds() == before


@pytest.mark.parametrize("kind", KINDS)
def test_fd_closed_after_construction(
    backend: ModuleType, channels: Callable[[str], Channel], kind: str
) -> None:
    src, dst = channels(kind), channels(kind)
    with backend.Relay(src.read_fd, dst.write_fd) as r:
        # dup2 of a closed-for-good fd number would be racy; close and run at once.
        os.close(src.read_fd)
        src.read_fd = -1
        with pytest.raises(OSError) as info:
            r.run()
    assert info.value.errno == errno.EBADF


def test_bad_buffer_size(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    chan = channels("pipe")
    for size in (0, -1, backend.MAX_BUFFER_SIZE + 1):
        with pytest.raises(ValueError, match="buffer_size"):
            backend.Relay(chan.read_fd, chan.write_fd, buffer_size=size)


class _Alarm(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[Callable[[Callable[[], None], float], None]]:
    """Arm SIGALRM to call a handler every ``interval`` seconds; disarmed after the test."""
    previous = signal.getsignal(signal.SIGALRM)

    def arm(handler: Callable[[], None], interval: float) -> None:
        signal.signal(signal.SIGALRM, lambda signum, frame: handler())
        signal.setitimer(signal.ITIMER_REAL, interval, interval)

    yield arm
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("kind", ["socketpair", "pipe"])
def test_signal_handler_exception_ends_run(
    backend: ModuleType,
    channels: Callable[[str], Channel],
    alarm: Callable[[Callable[[], None], float], None],
    kind: str,
) -> None:
    """In the main thread, a signal handler's exception (say KeyboardInterrupt) gets out."""
    src, dst = channels(kind), channels(kind)

    def handler() -> None:
        raise _Alarm

    with backend.Relay(src.read_fd, dst.write_fd) as r:
        alarm(handler, 0.05)
        with pytest.raises(_Alarm):
            r.run()


def test_signals_interrupt_and_resume(
    backend: ModuleType,
    channels: Callable[[str], Channel],
    alarm: Callable[[Callable[[], None], float], None],
) -> None:
    """EINTR from frequent signals: the copy resumes where it was, no byte lost."""
    ticks = []
    alarm(lambda: ticks.append(1), 0.001)
    data = random.Random(9).randbytes(8 << 20)
    copied, got = _pump(backend, channels("tcp"), channels("pipe"), data, buffer_size=65536)
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    assert (copied, got) == (len(data), data)
    assert ticks


def test_bytes_copied_mid_copy(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("tcp"), channels("tcp")
    received: list[bytes] = []
    receiver = threading.Thread(target=lambda: received.append(_read_all(dst.read_fd)))
    receiver.start()
    first = random.Random(1).randbytes(3 << 20)
    with backend.Relay(src.read_fd, dst.write_fd, buffer_size=65536) as r:
        thread, result = _run_in_thread(r)
        _write_all(src.write_fd, first)
        deadline = time.monotonic() + 10
        while r.bytes_copied < len(first) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert r.bytes_copied == len(first)
        assert thread.is_alive()  # still running: the source is open
        _write_all(src.write_fd, b"tail")
        src.close_write()
        thread.join(10)
        assert result == {"value": len(first) + 4}
        assert r.bytes_copied == len(first) + 4
    receiver.join(10)
    assert received == [first + b"tail"]


async def test_asyncio_loop_keeps_ticking(backend: ModuleType) -> None:
    """A long copy in the default executor leaves the event loop responsive."""
    size = 16 << 30  # a sparse memfd: reading it costs no memory
    src = os.memfd_create("ferry-test-src")
    dst = os.open(os.devnull, os.O_WRONLY)
    try:
        os.ftruncate(src, size)
        with backend.Relay(src, dst) as r:
            loop = asyncio.get_running_loop()
            gaps: list[float] = []
            started = time.monotonic()
            job = loop.run_in_executor(None, r.run)
            last = time.monotonic()
            while not job.done():
                await asyncio.sleep(0.002)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            copied = await job
            duration = time.monotonic() - started
    finally:
        os.close(src)
        os.close(dst)
    assert copied == size
    assert len(gaps) >= 10, f"loop ticked {len(gaps)} times in {duration:.2f}s"
    # A relay that held the GIL would leave one gap as long as the copy.
    assert max(gaps) < max(0.1, duration / 4), (max(gaps), duration)


def test_no_fd_leak(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    src, dst = channels("socketpair"), channels("socketpair")
    before = _open_fds()
    for i in range(50):
        r = backend.Relay(src.read_fd, dst.write_fd)
        if i % 2:
            r.stop()
            r.run()
        r.close()
        r.close()  # idempotent
    with backend.Relay(src.read_fd, dst.write_fd):
        pass
    for _ in range(10):
        backend.Relay(src.read_fd, dst.write_fd)  # dropped without close(): freed by GC
    assert _open_fds() == before


def test_backend_identity(backend: ModuleType) -> None:
    if backend.__name__ == "ferry_native":
        assert backend.BACKEND == "native"
        assert backend.Relay.__module__ == "ferry_native._relay"
    else:
        assert backend.BACKEND == "reference"
        assert backend.Relay.__module__ == "ferry_native.reference.relay"
    assert backend.relay.__doc__


def test_same_api() -> None:
    import ferry_native
    import ferry_native.reference

    def public(obj: object) -> set[str]:
        return {name for name in dir(obj) if not name.startswith("_")}

    assert public(ferry_native.Relay) == public(ferry_native.reference.Relay)
    assert ferry_native.__all__ == ferry_native.reference.__all__


def test_repr(backend: ModuleType, channels: Callable[[str], Channel]) -> None:
    chan = channels("pipe")
    r = backend.Relay(chan.read_fd, chan.write_fd)
    assert "idle" in repr(r)
    r.stop()
    assert "stopped" in repr(r)
    r.close()
    assert "closed" in repr(r)
    assert (r.src_fd, r.dst_fd, r.buffer_size) == (chan.read_fd, chan.write_fd, 1 << 20)
