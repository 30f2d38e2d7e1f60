"""Benchmark the tunnel relay on loopback TCP: direct vs ferry_native vs reference vs socat.

Moves ``--gib`` GiB from a sender process to a receiver process, either
directly or through a relay in between, and prints throughput (median, min,
max in GiB/s over ``--reps`` interleaved repetitions), each mode's ratio to
the direct path, and the relay's CPU seconds per GiB moved::

    .venv/bin/python tools/bench/relay.py --gib 2 --reps 3
    .venv/bin/python tools/bench/relay.py --json
    .venv/bin/python tools/bench/relay.py --tls --gib 2 --reps 3

Modes (``--modes``, comma-separated):

- ``direct``: sender -> receiver, no relay: the ceiling.
- ``native``: sender -> ``ferry_native.Relay`` (a thread of this process) -> receiver.
- ``reference``: the same through ``ferry_native.reference.Relay``.
- ``socat``: through ``socat -b 1048576 TCP-LISTEN:... TCP:...``, another
  relay one might deploy instead.
- ``splice`` (not in the default set): an ``os.splice`` loop through a 1 MiB
  pipe, the zero-copy alternative the native relay was measured against.

With ``--tls`` the run measures the encrypted tunnel instead, in the same
run as ``direct`` and the plain ``native`` relay (``TLS_MODES``): the bytes
cross *two* relays in a row, an encrypting and a decrypting one, joined by a
TLS 1.3 connection with mutual authentication (a throwaway CA and host
certificate from ``ferryctl pki``)::

    sender -> [encrypting side] =TLS=> [decrypting side] -> receiver

- ``tls-native``: two ``ferry_native.TlsStream.pump`` calls, each in its own
  thread of this process (client side encrypts, server side decrypts).
- ``tls-reference``: the same with ``ferry_native.reference.TlsStream``.
- ``tls-socat``: two socat processes, ``TCP-LISTEN -> OPENSSL`` and
  ``OPENSSL-LISTEN -> TCP``, with the same certificates, ``verify=1`` and
  ``min-version=TLS1.3``.

Their CPU figure is the sum of both sides (both threads' ``thread_time``, or
both socats' rusage), so it is the whole cost of encrypting plus decrypting
a GiB; the cipher suite is printed (OpenSSL's TLS 1.3 default,
TLS_AES_256_GCM_SHA384, with AES-NI).

Sender and receiver are fresh processes for every run, kept cheap so that
the relay is what is measured: the sender ``sendfile``s a 64 MiB memfd over
and over, the receiver ``recv_into``s one 4 MiB buffer; the receiver times
from its first byte to end of file.  Relay CPU is the relay thread's
``time.thread_time`` (in-process modes) or the child's rusage (socat).
On a machine with fewer than three cores, the sender, relay and receiver
compete for CPU, which lowers every relayed mode alike.

Not part of the test suite: it takes a while and its numbers depend on the
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

GIB = 1 << 30
MODES = ("direct", "native", "reference", "socat")
TLS_MODES = ("direct", "native", "tls-native", "tls-reference", "tls-socat")
ALL_MODES = (*MODES, "splice", *TLS_MODES[2:])
TLS_HANDSHAKE_S = 10.0
SENDER_CHUNK = 64 << 20
RECEIVER_BUFFER = 4 << 20
CONNECT_TIMEOUT_S = 10.0


# -- the two ends (run as child processes) -----------------------------------


def _connect(port: int) -> socket.socket:
    """Connect to 127.0.0.1:``port``, retrying while nothing listens yet (socat starting).

    Raises:
        OSError: still refused after ``CONNECT_TIMEOUT_S``.
    """
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def sender_main(port: int, nbytes: int) -> None:
    """Send ``nbytes`` to ``port`` with sendfile from a memfd, then close."""
    memfd = os.memfd_create("ferry-bench")
    size = min(SENDER_CHUNK, max(nbytes, 1))
    os.ftruncate(memfd, size)
    with mmap.mmap(memfd, size) as m:
        # Real pages with a pattern, not holes: no zero-page shortcut.
        pattern = bytes(range(256)) * 4096
        for off in range(0, size, len(pattern)):
            m[off : off + len(pattern)] = pattern[: size - off]
    with _connect(port) as sock:
        left = nbytes
        while left > 0:
            offset = 0
            chunk = min(left, size)
            while chunk > 0:
                sent = os.sendfile(sock.fileno(), memfd, offset, chunk)
                offset += sent
                chunk -= sent
                left -= sent
        sock.shutdown(socket.SHUT_WR)
    os.close(memfd)


def receiver_main(nbytes: int) -> None:
    """Listen, print the port, receive to end of file, print a JSON result."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        print(server.getsockname()[1], flush=True)
        conn, _ = server.accept()
    buf = bytearray(RECEIVER_BUFFER)
    got = 0
    first = 0.0
    with conn:
        n = conn.recv_into(buf)
        first = time.perf_counter()
        while n:
            got += n
            n = conn.recv_into(buf)
    elapsed = time.perf_counter() - first
    print(json.dumps({"bytes": got, "seconds": elapsed}), flush=True)
    if got != nbytes:
        sys.exit(f"receiver: got {got} bytes, expected {nbytes}")


# -- relays (this process) ---------------------------------------------------


@dataclass
class RelayThread:
    """Accepts one connection on ``listener`` and relays it to ``upstream`` in a thread."""

    listener: socket.socket
    upstream: socket.socket
    copy: Callable[[int, int], int]
    cpu_s: float = 0.0
    copied: int = 0
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, name="bench-relay")
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn, self.upstream:
                start = time.thread_time()
                self.copied = self.copy(conn.fileno(), self.upstream.fileno())
                self.cpu_s = time.thread_time() - start
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        """Wait for the copy; re-raise its error.

        Raises:
            BaseException: whatever the relay raised.
        """
        self.thread.join()
        if self.error is not None:
            raise self.error


def _native_copy(src: int, dst: int) -> int:
    import ferry_native

    with ferry_native.Relay(src, dst) as r:
        return r.run()


def _reference_copy(src: int, dst: int) -> int:
    import ferry_native.reference

    with ferry_native.reference.Relay(src, dst) as r:
        return r.run()


def _splice_copy(src: int, dst: int) -> int:
    """Relay with splice(2) through a 1 MiB pipe (zero copy in user space)."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_MORE
    total = 0
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(wr, fcntl.F_SETPIPE_SZ, 1 << 20)
        while True:
            n = os.splice(src, wr, 1 << 20, flags=flags)
            if n == 0:
                break
            while n:
                moved = os.splice(rd, dst, n, flags=flags)
                n -= moved
                total += moved
        with socket.socket(fileno=os.dup(dst)) as sock:
            sock.shutdown(socket.SHUT_WR)
    finally:
        os.close(rd)
        os.close(wr)
    return total


COPIES: dict[str, Callable[[int, int], int]] = {
    "native": _native_copy,
    "reference": _reference_copy,
    "splice": _splice_copy,
}


# -- TLS tunnels (this process, or two socats) ---------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """CA, certificate and key of the one host both sides of the tunnel are."""

    ca: str
    cert: str
    key: str


def make_tls_files(directory: str) -> TlsFiles:
    """A throwaway CA and a certificate for 127.0.0.1 (serverAuth + clientAuth), via ferryctl."""
    from pathlib import Path

    from ferryctl.pki import init_ca, issue_host

    root = Path(directory)
    init_ca(root / "ca")
    host = issue_host(root / "ca", root / "host", "bench", dns=[], ips=["127.0.0.1"])
    return TlsFiles(str(host.ca), str(host.cert), str(host.key))


@dataclass
class TlsPair:
    """An encrypting and a decrypting TlsStream pump, each in its own thread.

    ``listener`` takes the sender's plain connection; the encrypting side dials
    ``tls_listener`` over TLS; the decrypting side writes to ``upstream``.
    """

    backend: str
    files: TlsFiles
    listener: socket.socket
    upstream: socket.socket
    tls_listener: socket.socket = field(init=False)
    cpu_s: list[float] = field(default_factory=lambda: [0.0, 0.0])
    cipher: str | None = None
    errors: list[BaseException] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tls_listener = socket.create_server(("127.0.0.1", 0))
        self.threads = [
            threading.Thread(target=self._guard, args=(self._encrypt,), name="bench-tls-enc"),
            threading.Thread(target=self._guard, args=(self._decrypt,), name="bench-tls-dec"),
        ]
        for t in self.threads:
            t.start()

    def _module(self) -> Any:
        import importlib

        return importlib.import_module(self.backend)

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:
            self.errors.append(exc)

    def _endpoint(self, server: bool) -> Any:
        f = self.files
        return self._module().TlsEndpoint(
            server=server, ca_file=f.ca, cert_file=f.cert, key_file=f.key
        )

    def _encrypt(self) -> None:
        endpoint = self._endpoint(False)
        plain, _ = self.listener.accept()
        start = time.thread_time()
        with (
            plain,
            socket.create_connection(self.tls_listener.getsockname()) as tls,
            self._module().TlsStream(endpoint, tls.fileno(), peer_name="127.0.0.1") as s,
        ):
            s.handshake(TLS_HANDSHAKE_S)
            self.cipher = s.cipher
            s.pump(plain.fileno())
        self.cpu_s[0] = time.thread_time() - start

    def _decrypt(self) -> None:
        endpoint = self._endpoint(True)
        tls, _ = self.tls_listener.accept()
        start = time.thread_time()
        with tls, self.upstream, self._module().TlsStream(endpoint, tls.fileno()) as s:
            s.handshake(TLS_HANDSHAKE_S)
            s.pump(self.upstream.fileno())
        self.cpu_s[1] = time.thread_time() - start

    def join(self) -> None:
        """Wait for both pumps; re-raise the first error.

        Raises:
            BaseException: whatever a pump raised.
        """
        for t in self.threads:
            t.join()
        self.tls_listener.close()
        if self.errors:
            raise self.errors[0]


def _socat_tls_pair(
    files: TlsFiles, receiver_port: int
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """Start the two socats of a TLS tunnel; return the plain port to send to."""
    plain_port, tls_port = _free_port(), _free_port()
    tls_opts = f"cert={files.cert},key={files.key},cafile={files.ca},verify=1,min-version=TLS1.3"
    decrypting = subprocess.Popen(
        [
            "socat",
            "-b",
            "1048576",
            f"OPENSSL-LISTEN:{tls_port},bind=127.0.0.1,reuseaddr,{tls_opts}",
            f"TCP:127.0.0.1:{receiver_port}",
        ]
    )
    encrypting = subprocess.Popen(
        [
            "socat",
            "-b",
            "1048576",
            f"TCP-LISTEN:{plain_port},bind=127.0.0.1,reuseaddr",
            f"OPENSSL:127.0.0.1:{tls_port},{tls_opts},retry=100,interval=0.01",
        ]
    )
    return plain_port, [encrypting, decrypting]


# -- one run -----------------------------------------------------------------


@dataclass
class Run:
    """Outcome of moving the bytes once in one mode."""

    mode: str
    seconds: float
    gib_per_s: float
    relay_cpu_s: float | None
    cipher: str | None = None


def _child(*args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _receiver(nbytes: int) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    proc = subprocess.Popen(_child("_receiver", str(nbytes)), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline()), proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def run_once(mode: str, nbytes: int, tls_files: TlsFiles | None = None) -> Run:
    """Move ``nbytes`` once in ``mode`` and measure it.

    Raises:
        RuntimeError: a child failed or the byte count is wrong.
    """
    with _receiver(nbytes) as (receiver_port, receiver):
        relay_cpu: float | None = None
        relay: RelayThread | None = None
        socat: subprocess.Popen[bytes] | None = None
        tls_pair: TlsPair | None = None
        socats: list[subprocess.Popen[bytes]] = []
        if mode == "direct":
            port = receiver_port
        elif mode.startswith("tls-"):
            assert tls_files is not None
            if mode == "tls-socat":
                port, socats = _socat_tls_pair(tls_files, receiver_port)
            else:
                backend = {"tls-native": "ferry_native", "tls-reference": "ferry_native.reference"}
                listener = socket.create_server(("127.0.0.1", 0))
                port = listener.getsockname()[1]
                upstream = socket.create_connection(("127.0.0.1", receiver_port))
                tls_pair = TlsPair(backend[mode], tls_files, listener, upstream)
        elif mode == "socat":
            port = _free_port()
            socat = subprocess.Popen(
                [
                    "socat",
                    "-b",
                    "1048576",
                    f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr",
                    f"TCP:127.0.0.1:{receiver_port}",
                ]
            )
        else:
            listener = socket.create_server(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            upstream = socket.create_connection(("127.0.0.1", receiver_port))
            relay = RelayThread(listener, upstream, COPIES[mode])
        sender = subprocess.Popen(_child("_sender", str(port), str(nbytes)))
        if sender.wait() != 0:
            raise RuntimeError(f"{mode}: sender failed")
        if relay is not None:
            relay.join()
            relay.listener.close()
            relay_cpu = relay.cpu_s
        cipher: str | None = None
        if tls_pair is not None:
            tls_pair.join()
            tls_pair.listener.close()
            relay_cpu = sum(tls_pair.cpu_s)
            cipher = tls_pair.cipher
        if socats:
            relay_cpu = 0.0
            for proc in socats:
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc.returncode != 0:
                    raise RuntimeError(f"socat exited with {proc.returncode}")
                relay_cpu += usage.ru_utime + usage.ru_stime
        if socat is not None:
            _, status, usage = os.wait4(socat.pid, 0)
            socat.returncode = os.waitstatus_to_exitcode(status)
            if socat.returncode != 0:
                raise RuntimeError(f"socat exited with {socat.returncode}")
            relay_cpu = usage.ru_utime + usage.ru_stime
        assert receiver.stdout is not None
        result = json.loads(receiver.stdout.readline())
        if receiver.wait() != 0 or result["bytes"] != nbytes:
            raise RuntimeError(f"{mode}: receiver got {result['bytes']} of {nbytes} bytes")
    seconds = float(result["seconds"])
    return Run(mode, seconds, nbytes / GIB / seconds, relay_cpu, cipher)


# -- report ------------------------------------------------------------------


def summarize(runs: Sequence[Run], gib: float) -> dict[str, dict[str, float | None]]:
    """Median/min/max GiB/s, ratio of medians to direct, median relay CPU s/GiB per mode."""
    summary: dict[str, dict[str, float | None]] = {}
    modes = list(dict.fromkeys(r.mode for r in runs))
    for mode in modes:
        rates = [r.gib_per_s for r in runs if r.mode == mode]
        cpus = [r.relay_cpu_s / gib for r in runs if r.mode == mode and r.relay_cpu_s is not None]
        summary[mode] = {
            "median_gib_s": statistics.median(rates),
            "min_gib_s": min(rates),
            "max_gib_s": max(rates),
            "cpu_s_per_gib": statistics.median(cpus) if cpus else None,
        }
    direct = summary.get("direct", {}).get("median_gib_s")
    for figures in summary.values():
        median = figures["median_gib_s"]
        figures["ratio_to_direct"] = median / direct if direct and median is not None else None
    return summary


def verdict(summary: dict[str, dict[str, float | None]]) -> dict[str, bool] | None:
    """The issue's target: native at least as fast as the best of socat and the reference,
    with less CPU per GiB than socat.  None when a mode is missing."""
    try:
        native = summary["native"]
        others = [summary["socat"], summary["reference"]]
    except KeyError:
        return None
    fastest_other = max(o["median_gib_s"] or 0.0 for o in others)
    native_cpu = native["cpu_s_per_gib"]
    socat_cpu = summary["socat"]["cpu_s_per_gib"]
    return {
        "native_fastest": (native["median_gib_s"] or 0.0) >= fastest_other,
        "native_cheaper_than_socat": (
            native_cpu is not None and socat_cpu is not None and native_cpu < socat_cpu
        ),
    }


def print_table(summary: dict[str, dict[str, float | None]], gib: float, reps: int) -> None:
    """Print the summary as a fixed-width table."""

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"{gib:g} GiB over loopback TCP, {reps} interleaved repetitions, {os.cpu_count()} CPUs")
    print(f"{'mode':<13} {'median':>8} {'min':>8} {'max':>8}  {'vs direct':>9}  {'relay CPU':>10}")
    print(f"{'':<13} {'GiB/s':>8} {'GiB/s':>8} {'GiB/s':>8}  {'':>9}  {'s/GiB':>10}")
    for mode, f in summary.items():
        print(
            f"{mode:<13} {fmt(f['median_gib_s'], '8.2f')} {fmt(f['min_gib_s'], '8.2f')} "
            f"{fmt(f['max_gib_s'], '8.2f')}  {fmt(f['ratio_to_direct'], '9.2f')}  "
            f"{fmt(f['cpu_s_per_gib'], '10.3f')}"
        )
    v = verdict(summary)
    if v is not None:
        print(
            "target: native >= max(socat, reference): "
            f"{'yes' if v['native_fastest'] else 'NO'}; "
            f"native CPU/GiB < socat: {'yes' if v['native_cheaper_than_socat'] else 'NO'}"
        )
    tls = summary.get("tls-native")
    if tls is not None:
        plain = summary.get("native", {}).get("median_gib_s")
        others = {m: summary[m]["median_gib_s"] for m in ("tls-reference", "tls-socat")
                  if m in summary}
        parts = [f"tls-native / {m}: {(tls['median_gib_s'] or 0) / o:.2f}x"
                 for m, o in others.items() if o]
        if plain:
            parts.append(f"tls-native / native relay: {(tls['median_gib_s'] or 0) / plain:.2f}")
        print("; ".join(parts))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the interleaved repetitions, print the table or JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_sender"]:
        sender_main(int(args[1]), int(args[2]))
        return 0
    if args[:1] == ["_receiver"]:
        receiver_main(int(args[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gib", type=float, default=4.0, help="GiB per run (default 4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per mode (default 3)")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, of {', '.join(ALL_MODES)} (default {','.join(MODES)})",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help=f"measure the TLS tunnel: --modes defaults to {','.join(TLS_MODES)}",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    opts = parser.parse_args(args)
    if opts.tls and opts.modes == ",".join(MODES):
        opts.modes = ",".join(TLS_MODES)
    modes = [m for m in opts.modes.split(",") if m]
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if {"socat", "tls-socat"} & set(modes) and shutil.which("socat") is None:
        parser.error("socat is not installed (apt-get install socat), or leave it out of --modes")
    nbytes = int(opts.gib * GIB)
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="ferry-bench-pki-") as pki_dir:
        tls_files = make_tls_files(pki_dir) if any(m.startswith("tls-") for m in modes) else None
        for rep in range(opts.reps):
            # Interleaved, so that a slow phase of the machine hits every mode.
            for mode in modes:
                run = run_once(mode, nbytes, tls_files)
                runs.append(run)
                if not opts.json:
                    cpu = "" if run.relay_cpu_s is None else f", relay CPU {run.relay_cpu_s:.2f} s"
                    suite = f", {run.cipher}" if run.cipher else ""
                    print(
                        f"  rep {rep + 1} {mode:<13} {run.gib_per_s:6.2f} GiB/s{cpu}{suite}",
                        file=sys.stderr,
                    )
    summary = summarize(runs, nbytes / GIB)
    if opts.json:
        print(
            json.dumps(
                {
                    "gib": nbytes / GIB,
                    "reps": opts.reps,
                    "cpus": os.cpu_count(),
                    "modes": summary,
                    "runs": [r.__dict__ for r in runs],
                    "target": verdict(summary),
                },
                indent=2,
            )
        )
    else:
        print_table(summary, nbytes / GIB, opts.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
