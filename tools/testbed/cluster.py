"""A two-host Ferry test bed: namespaces, certificates, configs, agents.

Used by the end-to-end tests and by ``make demo``.  Each host has its own
config, host UUID, state and run directories and certificate; both share a
lockspace directory (as hosts share one over NFS).  Agents run inside their
host's namespace; ferryctl talks to them over their unix admin sockets
(which are files, reachable from any namespace).

:meth:`Cluster.close` tears everything down even after a failure: agents
and every qemu they started are killed (all processes in the namespaces),
the namespaces deleted and the temporary tree removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns import Namespace, TwoHosts

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AGENT_PORT = 49160

#: Where a host with local storage (:meth:`HostEnv.enable_local_storage`) sees
#: its own disk directory: the same path on every host, different files, as
#: two machines with local disks have. Inside the temp directory, so the
#: default storage policy admits it.
LOCAL_STORAGE = Path(tempfile.gettempdir()) / "ferry-local-storage"

__all__ = ["LOCAL_STORAGE", "Cluster", "HostEnv", "wait_until"]


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _bin(name: str) -> str:
    path = VENV_BIN / name
    return str(path) if path.exists() else name


@dataclass
class HostEnv:
    """One host: its namespace, directories, config and agent processes."""

    label: str
    ns: Namespace
    root: Path
    host_uuid: str
    pki_dir: Path
    lockspace: Path
    extra_config: dict[str, Any] = field(default_factory=dict)
    agent_env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Agents (and their qemus) see :attr:`local_dir` at :data:`LOCAL_STORAGE`.
    local_storage: bool = False

    @property
    def local_dir(self) -> Path:
        """This host's own disk directory (its agents see it at LOCAL_STORAGE)."""
        return self.root / "local"

    def enable_local_storage(self) -> Path:
        """Give this host local disks: agents started from now on run in a private
        mount namespace where :data:`LOCAL_STORAGE` is :attr:`local_dir`.

        Returns :attr:`local_dir`, where the test puts (and checks) this host's images.
        """
        self.local_storage = True
        self.local_dir.mkdir(exist_ok=True)
        LOCAL_STORAGE.mkdir(exist_ok=True)
        return self.local_dir

    def local_view(self, argv: list[str]) -> list[str]:
        """``argv`` run in a private mount namespace where :data:`LOCAL_STORAGE` is
        this host's :attr:`local_dir` (what its agents see; backing paths resolve)."""
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$0" "$1" || exit 1; shift; exec "$@"',
                str(self.local_dir), str(LOCAL_STORAGE), *argv]  # fmt: skip

    @property
    def run_dir(self) -> Path:
        """This host's run directory (sockets, status files)."""
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        """This host's persistent state (definitions)."""
        return self.root / "state"

    @property
    def config_path(self) -> Path:
        """agent.toml of this host."""
        return self.root / "agent.toml"

    @property
    def source_socket(self) -> Path:
        """ferry-source's admin socket."""
        return self.run_dir / "source.sock"

    @property
    def destination_socket(self) -> Path:
        """ferry-destination's admin socket."""
        return self.run_dir / "destination.sock"

    @property
    def uri(self) -> str:
        """The URI other hosts use to reach this host's ferry-destination."""
        return f"ferry://{self.ns.address}:{AGENT_PORT}"

    def serial_socket(self, name: str, index: int = 0) -> Path:
        """Where a domain's auto-placed serial socket lives on this host."""
        return self.run_dir / "serial" / name / f"serial{index}.sock"

    def write_config(self, **overrides: Any) -> None:
        """Write agent.toml (TOML by hand: the stdlib only reads it)."""
        tables: dict[str, dict[str, Any]] = {
            "host": {"uuid": self.host_uuid, "name": self.label},
            "paths": {
                "state_dir": str(self.state_dir),
                "run_dir": str(self.run_dir),
                "lockspace_dir": str(self.lockspace),
            },
            "admin": {"group": "root"},
            "destination": {
                "listen": f"{self.ns.address}:{AGENT_PORT}",
                "migration_address": self.ns.address,
                "migration_ports": [49200, 49299],
                "incoming_timeout_s": 60,
            },
            "tls": {
                "ca": str(self.pki_dir / "ca.pem"),
                "cert": str(self.pki_dir / f"{self.label}.pem"),
                "key": str(self.pki_dir / f"{self.label}-key.pem"),
            },
            # The test guests' kernels (testguest.build: TMPDIR/ferry-guest-*)
            # and disk images (the cluster's tree, pytest's tmp_path, private
            # tmpfs mounts) all live in the temp directory; a test that needs
            # a narrower policy sets "storage.allowed" itself.
            "storage": {"allowed": sorted({str(self.root.parent), tempfile.gettempdir()})},
        }
        settings = {**self.extra_config, **overrides}
        acl_rules: list[dict[str, Any]] = settings.pop("acl", [])
        for key, value in settings.items():
            table, _, item = key.partition(".")
            tables.setdefault(table, {})[item] = value
        lines = []
        for table, items in tables.items():
            lines.append(f"[{table}]")
            for item, value in items.items():
                lines.append(f"{item} = {json.dumps(value)}")
            lines.append("")
        for rule in acl_rules:
            lines.append("[[acl]]")
            for item, value in rule.items():
                lines.append(f"{item} = {json.dumps(value)}")
            lines.append("")
        self.config_path.write_text("\n".join(lines))

    def start_agent(self, agent: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """Start ``source`` or ``destination`` in this host's namespace."""
        binary = _bin(f"ferry-{agent}")
        log = (self.root / f"{agent}.log").open("ab")
        env = dict(os.environ)
        env.setdefault("FERRY_JOURNAL_SOCKET", "/nonexistent")
        # agent_env wins; naming a journal namespace there drops the default
        # "no journal" socket above (the socket takes precedence otherwise).
        if "FERRY_JOURNAL_NAMESPACE" in self.agent_env and (
            "FERRY_JOURNAL_SOCKET" not in self.agent_env
        ):
            env.pop("FERRY_JOURNAL_SOCKET", None)
        env.update(self.agent_env)
        argv = [binary, "--config", str(self.config_path), "--debug"]
        if self.local_storage:
            # Both agents of the host bind the same directory: one host's view.
            argv = self.local_view(argv)
        proc = subprocess.Popen(
            self.ns.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Own session: a Ctrl-C at the terminal must not reach the agents.
            start_new_session=True,
        )
        log.close()
        self.procs[agent] = proc
        if wait:
            self.wait_agent(agent)
        return proc

    def wait_agent(self, agent: str) -> None:
        """Wait until ``agent`` (started) listens on its admin socket; raise if it exited."""
        proc = self.procs[agent]
        sock = self.source_socket if agent == "source" else self.destination_socket
        wait_until(
            lambda: self._accepts(sock) or proc.poll() is not None,
            30,
            f"ferry-{agent} on {self.label} to listen",
        )
        if proc.poll() is not None:
            raise RuntimeError(
                f"ferry-{agent} on {self.label} exited with {proc.returncode}:\n"
                + self.agent_log(agent)
            )

    @staticmethod
    def _accepts(path: Path) -> bool:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
            except OSError:
                return False
        return True

    def agent_log(self, agent: str) -> str:
        """The agent's stderr log so far."""
        with contextlib.suppress(FileNotFoundError):
            return (self.root / f"{agent}.log").read_text(errors="replace")
        return ""

    def stop_agent(self, agent: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal an agent and wait for it to exit."""
        proc = self.procs.pop(agent, None)
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def ferryctl(
        self,
        *args: str,
        agent: str = "source",
        check: bool = False,
        timeout: float = 120,
        user: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ferryctl against one of this host's agents."""
        sock = self.source_socket if agent == "source" else self.destination_socket
        argv = [_bin("ferryctl"), "--connect", str(sock), *args]
        if user is not None:
            import pwd

            gid = pwd.getpwnam(user).pw_gid
            argv = ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups", *argv]
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"ferryctl {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def ferryctl_argv(self, *args: str, agent: str = "source") -> list[str]:
        """argv of ferryctl against one of this host's agents (for a background Popen)."""
        sock = self.source_socket if agent == "source" else self.destination_socket
        return [_bin("ferryctl"), "--connect", str(sock), *args]

    def ctl_json(self, *args: str, agent: str = "source") -> Any:
        """Run ferryctl with --json and decode its output."""
        result = self.ferryctl(*args, "--json", agent=agent, check=True)
        return json.loads(result.stdout)

    def domain_state(self, name: str) -> str | None:
        """The state ferryctl reports, or None when the domain is unknown."""
        result = self.ferryctl("dominfo", name, "--json")
        if result.returncode != 0:
            return None
        return str(json.loads(result.stdout)["state"])

    def qemu_pids(self) -> list[int]:
        """pids of qemu processes in this host's namespace."""
        out = []
        for pid in self.ns.pids():
            with contextlib.suppress(OSError):
                exe = os.readlink(f"/proc/{pid}/exe")
                if "qemu-system" in exe:
                    out.append(pid)
        return out


class Cluster:
    """Hosts A and B with certificates and agents."""

    def __init__(
        self, *, base: Path | None = None, agent_env: dict[str, str] | None = None
    ) -> None:
        """``agent_env``: extra environment for every agent (merged last), e.g.
        ``{"FERRY_JOURNAL_NAMESPACE": "ns"}`` to log to a journald namespace."""
        self.agent_env = dict(agent_env or {})
        self.tmp = Path(tempfile.mkdtemp(prefix="fy-", dir=base or "/tmp"))
        # Other users must reach the admin sockets (ACL tests run ferryctl as
        # nobody); the sockets themselves are 0660.
        self.tmp.chmod(0o755)
        self.hosts = TwoHosts.create()
        self.pki = self.tmp / "pki"
        self.lockspace = self.tmp / "lockspace"
        self.lockspace.mkdir()
        self.a = self._host("a", self.hosts.a)
        self.b = self._host("b", self.hosts.b)
        self._make_pki()

    def _host(self, label: str, ns: Namespace) -> HostEnv:
        root = self.tmp / label
        root.mkdir(mode=0o755)
        host = HostEnv(
            label=label,
            ns=ns,
            root=root,
            host_uuid=str(uuidlib.uuid4()),
            pki_dir=self.pki,
            lockspace=self.lockspace,
            agent_env=self.agent_env,
        )
        host.write_config()
        return host

    def _make_pki(self) -> None:
        from ferryctl.pki import init_ca, issue_host

        init_ca(self.pki)
        for host in (self.a, self.b):
            files = issue_host(
                self.pki, self.pki, host.label, dns=[host.label], ips=[host.ns.address]
            )
            # Names the config expects.
            if files.cert != self.pki / f"{host.label}.pem":
                shutil.copy(files.cert, self.pki / f"{host.label}.pem")
            if files.key != self.pki / f"{host.label}-key.pem":
                shutil.copy(files.key, self.pki / f"{host.label}-key.pem")
                os.chmod(self.pki / f"{host.label}-key.pem", 0o600)

    #: The operator of client-driven tests, and what its [[acl]] rule lets it do.
    OPERATOR = "ops"
    OPERATOR_OPS = ("prepare", "finish", "migration_progress", "adopt_incoming")

    def operator_pki(self) -> Path:
        """An operator certificate (``ferryctl pki client ops``); its directory."""
        from ferryctl.pki import issue_client

        out = self.tmp / "operator"
        if not (out / f"{self.OPERATOR}.pem").exists():
            issue_client(self.pki, out, self.OPERATOR)
        return out

    def operator_config(self) -> dict[str, Any]:
        """Config overrides that admit the operator to a host's peer port, for its ops only."""
        return {
            "peers.operators": [self.OPERATOR],
            "acl": [{"operators": [self.OPERATOR], "ops": list(self.OPERATOR_OPS),
                     "domains": ["*"]}],
        }  # fmt: skip

    def client_argv(
        self, *args: str, fault: str | None = None, source: HostEnv | None = None
    ) -> list[str]:
        """argv of a client-driven ferryctl run on the ``source`` host (default A; in its
        network namespace: it dials the destination itself) with the operator certificate;
        ``fault`` is the test-only point where it SIGKILLs itself (FERRY_TESTING_CLIENT_DIES)."""
        host = source or self.a
        env = ["env", f"FERRY_OPERATOR_PKI={self.operator_pki()}"]
        if fault is not None:
            env.append(f"FERRY_TESTING_CLIENT_DIES={fault}")
        return host.ns.exec_argv([*env, *host.ferryctl_argv(*args)])

    def start(self, agents: Sequence[str] = ("source", "destination")) -> Cluster:
        """Start the agents on both hosts (all at once: each spends most of its
        start-up importing, which overlaps)."""
        for host in (self.a, self.b):
            for agent in agents:
                host.start_agent(agent, wait=False)
        for host in (self.a, self.b):
            for agent in agents:
                host.wait_agent(agent)
        return self

    def logs(self) -> str:
        """Every agent log, for a failing test's report."""
        parts = []
        for host in (self.a, self.b):
            for agent in ("source", "destination"):
                text = host.agent_log(agent)
                if text:
                    parts.append(f"----- {host.label} ferry-{agent} -----\n{text[-6000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        """Tear everything down (idempotent)."""
        for host in (self.a, self.b):
            for agent in list(host.procs):
                with contextlib.suppress(Exception):
                    host.stop_agent(agent, signal.SIGKILL, timeout=5)
        self.hosts.close()
        if not os.environ.get("FERRY_KEEP_TESTBED"):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def guest_xml(
    name: str,
    kernel: Path,
    *,
    virt_type: str = "kvm",
    mem_mib: int = 128,
    wss_mib: int = 16,
    rate_mib_s: int = 0,
    report_ms: int = 100,
    uuid: str | None = None,
    prealloc: bool = True,
    disks: Sequence[tuple[str, str]] = (),
    extra_devices: str = "",
    cmdline_extra: str = "",
    zip: bool = False,
) -> str:
    """Domain XML for the test guest; its serial port is a unix socket Ferry places.

    ``disks`` is a list of ``(path, cache)`` raw file disks on virtio.
    ``cmdline_extra`` is appended to the guest's command line (e.g. ``disk=1``
    for the disk variant of the guest, see tools/guest/guest.S).  ``zip``
    gives the guest compressible pages (``zip=1``, see guest.S "zip mode").
    """
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    # zip=1 only when asked: the default command line stays byte-for-byte the old one
    tail = (" zip=1" if zip else "") + (f" {cmdline_extra}" if cmdline_extra else "")
    backing = "<memoryBacking><allocation mode='immediate'/></memoryBacking>" if prealloc else ""
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='raw' cache='{cache}'/>"
        f"<source file='{path}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, (path, cache) in enumerate(disks)
    )
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>{uuid_el}
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <cmdline>wss={wss_mib} rate={rate_mib_s} report={report_ms} seed=7{tail}</cmdline>
  </os>
  {backing}
  <devices>
    {disk_xml}
    <serial type='unix'><source mode='bind'/><target port='0'/></serial>
    <memballoon model='none'/>
    {extra_devices}
  </devices>
</domain>
"""
