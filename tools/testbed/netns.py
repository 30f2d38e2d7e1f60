"""Two "hosts" on one machine: network namespaces joined by a veth pair.

Used by the end-to-end tests and the demo.  Everything made here is torn
down by :meth:`TwoHosts.close` even when a test fails: every process still
in a namespace (agents and the detached qemu processes they started) is
killed, then the namespaces are deleted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field

__all__ = ["Namespace", "TwoHosts", "netns_available"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def netns_available() -> bool:
    """True when we may create network namespaces (root, iproute2 present)."""
    if os.geteuid() != 0:
        return False
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@dataclass
class Namespace:
    """One network namespace with one veth end and an address."""

    name: str
    address: str

    def exec_argv(self, argv: list[str]) -> list[str]:
        """argv that runs ``argv`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        """Every process whose network namespace is this one."""
        result = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in result.stdout.split() if p.isdigit()]

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL everything in the namespace and wait until it is gone."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


@dataclass
class TwoHosts:
    """Host A and host B, each a namespace, joined by a veth pair."""

    a: Namespace
    b: Namespace
    tag: str
    _made: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, subnet: int | None = None) -> TwoHosts:
        """Make both namespaces and the link; addresses 10.231.N.1 and .2.

        Raises:
            subprocess.CalledProcessError: when iproute2 refuses (not root).
        """
        tag = secrets.token_hex(3)
        n = subnet if subnet is not None else int(tag[:2], 16)
        a = Namespace(f"ferry-{tag}-a", f"10.231.{n}.1")
        b = Namespace(f"ferry-{tag}-b", f"10.231.{n}.2")
        hosts = cls(a, b, tag)
        try:
            for ns in (a, b):
                _ip("netns", "add", ns.name)
                hosts._made.append(ns.name)
                _ip("-n", ns.name, "link", "set", "lo", "up")
            veth_a, veth_b = f"fa{tag}", f"fb{tag}"
            _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
            _ip("link", "set", veth_a, "netns", a.name)
            _ip("link", "set", veth_b, "netns", b.name)
            for ns, dev in ((a, veth_a), (b, veth_b)):
                _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", dev)
                _ip("-n", ns.name, "link", "set", dev, "up")
        except BaseException:
            hosts.close()
            raise
        return hosts

    def close(self) -> None:
        """Kill every process in both namespaces, then delete them."""
        for name in self._made:
            ns = self.a if name == self.a.name else self.b
            ns.kill_all()
            _ip("netns", "del", name, check=False)
        self._made.clear()

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
