"""Breaking things on the two-host test bed: frozen agents, a cut link, a killed qemu.

The fault matrix (``tests/faults/``) drives every fault at a deterministic
point: the agent that reaches the point freezes itself (``[testing] faults =
["POINT=stop"]``, see :mod:`ferry.faults`), the test sees it frozen here,
acts while it is, and thaws it.  Nothing in this module sleeps to
synchronise: every wait polls a condition with a bound.

``ip netns exec`` execs its command, so the pid of the Popen a
:class:`~cluster.HostEnv` keeps for an agent is the agent's own pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from cluster import Cluster, HostEnv, wait_until

__all__ = [
    "Link",
    "agent_pid",
    "freeze_point_logged",
    "kill_qemu",
    "proc_state",
    "thaw",
    "wait_frozen",
]


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``T``, ``Z`` …), None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2 (comm) is in parentheses and may contain ')' or spaces.
    rest = raw[raw.rfind(b")") + 2 :].split()
    return rest[0].decode() if rest else None


def agent_pid(host: HostEnv, agent: str) -> int:
    """The pid of a running agent of ``host`` (``source`` or ``destination``).

    Raises:
        RuntimeError: the agent is not running.
    """
    proc = host.procs.get(agent)
    if proc is None or proc.poll() is not None:
        raise RuntimeError(f"ferry-{agent} on {host.label} is not running")
    return proc.pid


def wait_frozen(
    host: HostEnv,
    agent: str,
    timeout: float,
    *,
    also: subprocess.Popen[str] | None = None,
) -> int:
    """Wait until the agent has stopped itself (state ``T``); returns its pid.

    ``also`` is a process whose exit means the point will never be reached
    (the ``ferryctl migrate`` that should get there): the wait fails at once
    with its output instead of running into the timeout.

    Raises:
        RuntimeError: the agent exited, or ``also`` did, before freezing.
        TimeoutError: not frozen within ``timeout``.
    """
    pid = agent_pid(host, agent)

    def frozen() -> bool:
        state = proc_state(pid)
        if state in (None, "Z", "X"):
            raise RuntimeError(
                f"ferry-{agent} on {host.label} exited before reaching its fault point"
            )
        if state in ("T", "t"):
            return True
        if also is not None and also.poll() is not None:
            raise RuntimeError(
                f"ferry-{agent} on {host.label} never reached its fault point: the process "
                f"that should get it there exited first ({also.returncode})"
            )
        return False

    wait_until(frozen, timeout, f"ferry-{agent} on {host.label} to freeze at its fault point")
    return pid


def freeze_point_logged(host: HostEnv, agent: str, point: str) -> bool:
    """True when the agent's log says it reached ``point`` (see :mod:`ferry.faults`)."""
    return f"fault point {point} reached" in host.agent_log(agent)


def thaw(pid: int) -> None:
    """SIGCONT ``pid`` (no-op when it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def kill_qemu(host: HostEnv, timeout: float = 10.0) -> int:
    """SIGKILL the one qemu of ``host`` and wait until it is dead; returns its pid.

    Dead means gone or a zombie: its parent may be a frozen agent that cannot
    reap it yet.

    Raises:
        AssertionError: ``host`` does not run exactly one qemu.
    """
    pids = host.qemu_pids()
    assert len(pids) == 1, f"expected one qemu on {host.label}, found {pids}"
    pid = pids[0]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: proc_state(pid) in (None, "Z", "X"), timeout, f"qemu {pid} to die")
    return pid


class Link:
    """The veth pair between A and B, cut and restored from one side.

    Setting one end down takes the carrier away from the other: packets in
    flight are lost silently, as when a cable or a switch port goes.  The
    link is restored on :meth:`close` (or leaving the ``with`` block) if it
    is still cut.
    """

    def __init__(self, cluster: Cluster, side: str = "b") -> None:
        host = cluster.a if side == "a" else cluster.b
        self.host = host
        self.hosts = (cluster.a, cluster.b)
        self.device = f"f{side}{cluster.hosts.tag}"
        self.cut_at: float | None = None
        self.down_for: float | None = None

    def _set(self, state: str) -> None:
        subprocess.run(
            ["ip", "-n", self.host.ns.name, "link", "set", "dev", self.device, state],
            check=True,
            capture_output=True,
        )

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self.cut_at is not None

    def cut(self) -> None:
        """Take the link down."""
        self._set("down")
        self.cut_at = time.monotonic()

    def restore(self) -> None:
        """Bring the link back up (the kernel restores the subnet's route)."""
        if self.cut_at is None:
            return
        self._set("up")
        # Neighbour entries that failed while the link was down answer the
        # next connect with EHOSTUNREACH until they expire: forget them, as
        # a host does when its carrier comes back.
        for host in self.hosts:
            subprocess.run(["ip", "-n", host.ns.name, "neigh", "flush", "all"],
                           check=False, capture_output=True)  # fmt: skip
        self.down_for = time.monotonic() - self.cut_at
        self.cut_at = None

    def close(self) -> None:
        """Restore the link if it is cut (teardown)."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self.restore()

    def __enter__(self) -> Link:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
