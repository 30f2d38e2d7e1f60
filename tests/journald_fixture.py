"""A real ``systemd-journald`` for tests, in a private journal namespace.

Import the fixture into a test module (``from journald_fixture import journald``,
after putting ``tests/`` on ``sys.path``) and ask for ``journald``.

Why a namespace: ``systemd-journald NAMESPACE`` runs an independent journald
that listens on ``/run/systemd/journal.NAMESPACE/socket`` and stores its files
in ``/var/log/journal/MACHINE-ID.NAMESPACE`` (or under ``/run/log/journal``
when there is no ``/var/log/journal``). It works without systemd as PID 1, it
never touches a system journal that may be running, several test sessions can
run at once (each gets its own namespace name), and teardown can delete
everything it wrote. ``journalctl --namespace=NS`` and
``systemd.journal.Reader(namespace=NS)`` read it; Ferry logs to it with
``setup_logging(..., namespace=NS)`` or ``FERRY_JOURNAL_NAMESPACE=NS``.

Fallback when a namespaced journald cannot start (older systemd, no
permission): use the system journal if its socket exists, else start a plain
``systemd-journald`` on ``/run/systemd/journal/socket`` and stop it at
teardown (only if this fixture started it). Tests get the same
:class:`PrivateJournal` either way; ``namespace`` is then None.

Needs root (journald binds sockets under /run and writes /var/log/journal);
tests are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

JOURNALD = Path("/lib/systemd/systemd-journald")
JOURNALCTL = shutil.which("journalctl") or "/usr/bin/journalctl"
DEFAULT_SOCKET = Path("/run/systemd/journal/socket")


@dataclass
class PrivateJournal:
    """A running journald the tests may log to and read from."""

    namespace: str | None
    socket: Path
    started: bool
    proc: subprocess.Popen[bytes] | None = None
    cleanup_dirs: list[Path] = field(default_factory=list)

    def journalctl_args(self) -> list[str]:
        """``journalctl`` with the namespace option when one is used."""
        args = [JOURNALCTL, "--no-pager"]
        if self.namespace:
            args.append(f"--namespace={self.namespace}")
        return args

    def sync(self) -> None:
        """Ask journald to write everything it has received (``journalctl --sync``).

        Sending a datagram returns before journald has processed it; --sync
        waits until it has, so the next read sees the entry. Best effort: the
        readers below also poll.
        """
        subprocess.run(
            [*self.journalctl_args(), "--sync"],
            check=False,
            capture_output=True,
            timeout=10,
        )

    def query_json(self, *matches: str) -> list[dict[str, Any]]:
        """Run ``journalctl -o json MATCH…`` and return the parsed entries."""
        out = subprocess.run(
            [*self.journalctl_args(), "-o", "json", *matches],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def wait_for(
        self,
        fetch: Callable[[], list[Any]],
        *,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[Any]:
        """Call ``fetch`` until it returns at least ``count`` items or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self.sync()
            found = fetch()
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


def _wait_socket(path: Path, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_socket():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _machine_id() -> str:
    try:
        return Path("/etc/machine-id").read_text().strip()
    except OSError:
        return ""


def _start_namespaced(name: str) -> PrivateJournal | None:
    run_dir = Path(f"/run/systemd/journal.{name}")
    sock = run_dir / "socket"
    proc = subprocess.Popen(
        [str(JOURNALD), name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C on pytest should not kill it mid-test
    )
    if not _wait_socket(sock, proc, 10.0):
        _stop(proc)
        shutil.rmtree(run_dir, ignore_errors=True)
        return None
    mid = _machine_id()
    cleanup = [run_dir]
    if mid:
        cleanup += [
            Path(f"/var/log/journal/{mid}.{name}"),
            Path(f"/run/log/journal/{mid}.{name}"),
        ]
    return PrivateJournal(
        namespace=name, socket=sock, started=True, proc=proc, cleanup_dirs=cleanup
    )


def _start_default() -> PrivateJournal | None:
    if DEFAULT_SOCKET.is_socket():
        return PrivateJournal(namespace=None, socket=DEFAULT_SOCKET, started=False)
    DEFAULT_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(JOURNALD)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if not _wait_socket(DEFAULT_SOCKET, proc, 10.0):
        _stop(proc)
        return None
    return PrivateJournal(namespace=None, socket=DEFAULT_SOCKET, started=True, proc=proc)


def start_journal() -> PrivateJournal | None:
    """Start a namespaced journald (or fall back, see module docstring)."""
    if os.geteuid() != 0 or not JOURNALD.exists():
        return None
    # Namespace names: letters, digits, '-', '_' (journald validates them).
    name = f"ferrytest-{os.getpid()}"
    if os.environ.get("FERRY_TEST_JOURNALD") != "default":
        started = _start_namespaced(name)
        if started is not None:
            return started
    return _start_default()


def stop_journal(journal: PrivateJournal) -> None:
    """Stop journald if we started it and remove what it wrote."""
    if journal.started and journal.proc is not None:
        _stop(journal.proc)
    for d in journal.cleanup_dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def journald() -> Iterator[PrivateJournal]:
    """A running journald for one test (skip if none can be had).

    Per test: a namespaced journald exits after about 30 s without
    clients (measured here), so one shared across tests was found gone,
    its socket refusing connections, when ``make test`` came back to it.
    """
    journal = start_journal()
    if journal is None:
        pytest.skip("cannot run systemd-journald here (needs root and systemd installed)")
    try:
        yield journal
    finally:
        stop_journal(journal)
