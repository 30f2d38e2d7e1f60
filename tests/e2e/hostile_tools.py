"""Hostile clients for the e2e tests: floods and fuzz inputs from inside a test namespace.

Every connection is made from a thread that joined host A's network
namespace (``setns``), to host B's address inside the test bed: nothing
here can reach any other address.  The admin sockets are files, reached
from anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from ferry.tunnel.wire import PREAMBLE

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
HALF_OPEN_TLS = b"\x16\x03\x01"


def in_namespace(ns_name: str, body: Callable[[], T]) -> T:
    """Run ``body`` on a thread inside network namespace ``ns_name``; return its result."""
    result: list[Any] = []

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns_name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        try:
            result.append(("ok", body()))
        except BaseException as exc:
            result.append(("error", exc))

    thread = threading.Thread(target=run, name=f"in-{ns_name}")
    thread.start()
    thread.join()
    kind, value = result[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def threads_of(pid: int) -> int:
    """OS threads of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fds_of(pid: int) -> int:
    """Open fds of ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_many(address: str, port: int, count: int, timeout: float = 20.0) -> list[socket.socket]:
    """``count`` TCP connections to ``address:port`` (call inside the namespace)."""
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((address, port))
        socks.append(s)
    poller = select.poll()
    waiting = {s.fileno(): s for s in socks}
    for fd in waiting:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for fd, _ev in poller.poll(200):
            if fd in waiting:
                poller.unregister(fd)
                del waiting[fd]
    return socks


def send_each(socks: list[socket.socket], payload: bytes) -> int:
    """Send ``payload`` on every socket that takes it; the number that did."""
    sent = 0
    for s in socks:
        try:
            s.send(payload)
            sent += 1
        except OSError:
            pass
    return sent


def wait_all_closed(
    socks: list[socket.socket], timeout: float, sample: Callable[[], None] | None = None
) -> int:
    """Wait until the peer closed every socket; return how many it did.

    ``sample`` is called between polls (to record the agent's memory while
    the connections are held).
    """
    poller = select.poll()
    open_fds: dict[int, socket.socket] = {}
    for s in socks:
        with contextlib.suppress(OSError):
            open_fds[s.fileno()] = s
            poller.register(s.fileno(), select.POLLIN)
    closed = 0
    deadline = time.monotonic() + timeout
    while open_fds and time.monotonic() < deadline:
        if sample is not None:
            sample()
        for fd, _ev in poller.poll(200):
            s = open_fds.get(fd)
            if s is None:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                poller.unregister(fd)
                del open_fds[fd]
                closed += 1
    return closed


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket."""
    for s in socks:
        s.close()


# -- fuzz inputs ----------------------------------------------------------------


def client_hello(rng: random.Random) -> bytes:
    """A real TLS ClientHello (from the ssl module), for truncating."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=f"h{rng.randrange(1000)}")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def frame(body: bytes) -> bytes:
    """A length-prefixed frame around ``body``."""
    return struct.pack(">I", len(body)) + body


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "str", "bytes", "none", "bool", "float"]
    if depth < 3:
        kinds += ["list", "map"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randrange(-1000, 1000)])
    if kind == "str":
        return "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(rng.randrange(0, 40)))
    if kind == "bytes":
        return rng.randbytes(rng.randrange(0, 64))
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "float":
        return rng.choice([float("nan"), float("inf"), -0.0, rng.random()])
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {str(_random_value(rng, 3)): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(0, 5))}  # fmt: skip


OPS = ["prepare", "finish", "journal_query", "list", "dominfo", "define", "start",
       "destroy", "undefine", "migrate", "job_info", "job_abort", "snapshot_create",
       "migration_outcome", "nosuchop", ""]  # fmt: skip


def mutated_frames(rng: random.Random, count: int) -> Iterator[bytes]:
    """Frames for an established session: valid-looking requests, mutated and random ones.

    No input names a real domain or carries valid XML, so none can change
    anything on the host.
    """
    for i in range(count):
        op = rng.choice(OPS)
        args = {str(k): _random_value(rng) for k in ("name", "xml", "flags", "params", "cookie")
                if rng.random() < 0.6}  # fmt: skip
        args["name"] = f"fuzz-nonexistent-{i}"
        body = msgpack.packb({"type": rng.choice(["request", "request", "reply", "event",
                                                  "hello", "tunnel", "bogus", 7]),
                              "id": rng.choice([i, -1, None, "x", 2**40]), "op": op,
                              "args": args}, use_bin_type=True)  # fmt: skip
        choice = rng.randrange(6)
        if choice == 0:  # bit flips
            data = bytearray(body)
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield frame(bytes(data))
        elif choice == 1:  # random bytes as a frame
            yield frame(rng.randbytes(rng.randrange(0, 300)))
        elif choice == 2:  # a lying length header (up to 4 GiB)
            yield struct.pack(">I", rng.choice([0, 1, 2**31, 2**32 - 1, len(body) + 5])) + body
        elif choice == 3:  # deep nesting
            yield frame(b"\x91" * rng.randrange(100, 5000) + b"\xc0")
        else:
            yield frame(body)


def preamble_inputs(rng: random.Random, count: int) -> Iterator[bytes]:
    """Random and near-miss tunnel preambles, some followed by junk."""
    for _ in range(count):
        choice = rng.randrange(4)
        if choice == 0:
            yield rng.randbytes(8)
        elif choice == 1:
            cut = rng.randrange(1, len(PREAMBLE))
            yield PREAMBLE[:cut]
        elif choice == 2:
            yield PREAMBLE + rng.randbytes(rng.randrange(0, 600))
        else:
            flipped = bytearray(PREAMBLE)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            yield bytes(flipped)
