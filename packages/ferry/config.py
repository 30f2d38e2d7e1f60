"""Agent configuration: one TOML file, loaded once into frozen dataclasses.

Every path comes from here so that two "hosts" (network namespaces) can run
on one machine, each with its own state directories.  Unknown keys are an
error rather than silently ignored: a typo in a security setting must not
leave it at its default unnoticed.

Example::

    [host]
    uuid = "0b1c…"            # required: this host's identity in cookies
    name = "hv-a"             # label in logs and the journal

    [paths]
    state_dir = "/var/lib/ferry"
    run_dir = "/run/ferry"
    lockspace_dir = "/var/lib/ferry/lockspace"   # shared by all hosts (NFS)

    [admin]
    group = "ferry"           # members may use the admin sockets

    [source]
    admin_socket = "/run/ferry/source.sock"

    [destination]
    admin_socket = "/run/ferry/destination.sock"
    listen = "0.0.0.0:49160"
    migration_address = "192.0.2.10"
    migration_ports = [49200, 49299]

    [tls]
    ca = "/etc/ferry/pki/ca.pem"
    cert = "/etc/ferry/pki/host.pem"
    key = "/etc/ferry/pki/host-key.pem"

    [qemu]
    binary = "qemu-system-x86_64"
    launch_timeout_s = 60
    # Where qemu runs, so that restarting an agent never stops a VM:
    #   "auto"     a scope when systemd is the init system, else detached
    #   "scope"    always a transient scope machine.slice/ferry-qemu-NAME-ID.scope
    #              (systemd-run --scope; an error if that fails)
    #   "detached" own session only (-daemonize), in the agent's cgroup
    cgroup = "auto"
    # Extra properties for that scope, e.g. raw block devices as guest disks
    # (the scope already gets DevicePolicy=closed and the units' DeviceAllow=):
    scope_properties = ["DeviceAllow=block-sd rw"]

    [limits]
    max_frame = 1048576           # bytes of one wire frame
    max_unauthenticated = 64      # per listening socket; more are closed at once
    handshake_timeout_s = 5       # accept -> TLS handshake and hello done
    frame_read_timeout_s = 30     # a started frame must be complete by then

    [peers]
    allowed = ["hv-a", "hv-*.example.org"]   # certificate CN or DNS SAN; [] = any host of the CA
    operators = ["alice"]   # operator certificates (ferryctl pki client) let in; [] = none

    [storage]
    # Every host path a domain names (disks, kernel, initrd, chardev files and
    # sockets) must resolve, symlinks included, to one of these (or below one).
    allowed = ["/var/lib/ferry/images", "/var/lib/libvirt/images"]

    [graphics]
    # Where vnc/spice listen when the domain XML names no address (libvirt's
    # vnc_listen/spice_listen), and the ports autoport='yes' takes from
    # (libvirt's remote_display_port_min/max; vnc needs 5900 or more).
    listen = "127.0.0.1"
    port_range = [5900, 65535]
    websocket_port_range = [5700, 65535]
    # x509 directory (ca-cert.pem, server-cert.pem, server-key.pem) for spice
    # TLS ports; without it spice gets no TLS port (libvirt's spice_tls).
    spice_tls_dir = "/etc/pki/ferry-spice"

    # The host bridge each libvirt network name of <interface type='network'>
    # stands for on this host, so that the same XML starts on every host.
    [networks.default]
    bridge = "br0"
    # An Open vSwitch bridge instead: Ferry adds each tap as a port of it with
    # ovs-vsctl (external-ids iface-id, attached-mac, vm-id) and removes the
    # port when the VM leaves the host.
    [networks.ovs]
    bridge = "ovsbr0"
    virtualport = "openvswitch"

    [openvswitch]
    # ovs-vsctl and its database (unset: ovs-vsctl's default socket).
    vsctl = "ovs-vsctl"
    db = "unix:/run/openvswitch/db.sock"

    [[acl]]
    groups = ["ferry"]
    ops = ["*"]
    domains = ["*"]
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import ConfigError

__all__ = [
    "ACLRule",
    "AgentConfig",
    "DestinationConfig",
    "GraphicsConfig",
    "HostConfig",
    "LimitsConfig",
    "MigrationConfig",
    "NetworkConfig",
    "PathsConfig",
    "PeersConfig",
    "QemuConfig",
    "SaveConfig",
    "StorageConfig",
    "TLSConfig",
    "TestingConfig",
    "load_config",
    "parse_config",
    "parse_hostport",
]


@dataclass(frozen=True)
class HostConfig:
    """This host's identity."""

    uuid: str
    name: str


@dataclass(frozen=True)
class PathsConfig:
    """Where state lives; see DESIGN.md, "State on disk"."""

    state_dir: Path = Path("/var/lib/ferry")
    run_dir: Path = Path("/run/ferry")
    lockspace_dir: Path = Path("/var/lib/ferry/lockspace")

    @property
    def domains_dir(self) -> Path:
        """Persistent domain definitions."""
        return self.state_dir / "domains"

    @property
    def snapshots_dir(self) -> Path:
        """Snapshot metadata, one folder per domain."""
        return self.state_dir / "snapshots"

    @property
    def status_dir(self) -> Path:
        """Live status files of running domains."""
        return self.run_dir / "domains"

    @property
    def locks_dir(self) -> Path:
        """Per-domain job lock files shared by both agents of the host."""
        return self.run_dir / "locks"

    @property
    def qmp_dir(self) -> Path:
        """QMP sockets of the domains' qemu processes."""
        return self.run_dir / "qmp"

    @property
    def serial_dir(self) -> Path:
        """Default directory for serial/console unix sockets."""
        return self.run_dir / "serial"

    @property
    def log_dir(self) -> Path:
        """qemu's own log files."""
        return self.run_dir / "log"

    @property
    def tunnel_dir(self) -> Path:
        """Unix sockets between qemu and the agents for tunnelled migrations."""
        return self.run_dir / "tunnel"

    @property
    def jobs_dir(self) -> Path:
        """Job records (one ``UUID.job`` per domain with a recorded job)."""
        return self.run_dir / "jobs"

    @property
    def outcomes_dir(self) -> Path:
        """The destination's durable record of each incoming migration's outcome."""
        return self.run_dir / "outcomes"

    @property
    def fences_dir(self) -> Path:
        """Domains that migrated away (or whose outcome is unknown): not to be run here."""
        return self.state_dir / "fences"

    def all_dirs(self) -> list[Path]:
        """Every directory an agent creates at start."""
        return [
            self.domains_dir,
            self.snapshots_dir,
            self.status_dir,
            self.locks_dir,
            self.qmp_dir,
            self.serial_dir,
            self.log_dir,
            self.tunnel_dir,
            self.jobs_dir,
            self.outcomes_dir,
            self.fences_dir,
            self.lockspace_dir,
        ]


@dataclass(frozen=True)
class TLSConfig:
    """Mutual TLS between agents: our CA, certificate and key."""

    ca: Path
    cert: Path
    key: Path
    allow_plaintext_tunnel: bool = False
    #: The disks' NBD stream (``--copy-storage-*`` without ``--tunnelled``)
    #: may go without TLS when both hosts set this.
    allow_plaintext_nbd: bool = False


@dataclass(frozen=True)
class DestinationConfig:
    """ferry-destination's listeners and incoming-migration settings."""

    admin_socket: Path = Path("/run/ferry/destination.sock")
    listen: tuple[str, int] = ("0.0.0.0", 49160)
    migration_address: str = "0.0.0.0"
    migration_ports: tuple[int, int] = (49200, 49299)
    incoming_timeout_s: float = 300.0


@dataclass(frozen=True)
class QemuConfig:
    """How qemu is run on this host."""

    binary: str = "qemu-system-x86_64"
    launch_timeout_s: float = 60.0
    #: "auto" | "scope" | "detached": see :mod:`ferry.qemu.scope`.
    cgroup: str = "auto"
    #: Extra ``NAME=VALUE`` properties of the transient scope.
    scope_properties: tuple[str, ...] = ()
    #: Threads that preallocate guest RAM when the domain XML names none
    #: (``<allocation threads=.../>``); 0 = one per host CPU, at most 4.
    prealloc_threads: int = 0
    #: The virtiofsd of virtiofs ``<filesystem>``s; "" = search :data:`ferry.virtiofs.SEARCH`.
    virtiofsd: str = ""


@dataclass(frozen=True)
class ACLRule:
    """One access rule: these subjects may run these ops on these domains.

    Subjects are local users and groups (admin socket callers, by peer
    credentials), peer agents (by their host certificate's common name or
    DNS names) and operators (by the name of their operator certificate;
    ``peers`` never matches an operator, ``operators`` never a host).
    Patterns are shell-style (``fnmatch``).
    """

    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()
    ops: tuple[str, ...] = ("*",)
    domains: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class MigrationConfig:
    """How long the source waits, and how long outcomes are remembered.

    The source never guesses the outcome of a migration whose Finish it sent:
    it asks the destination (``migration_outcome``) for ``outcome_timeout_s``
    before it leaves the VM paused with the outcome unknown.
    """

    #: No progress in qemu's counters for this long cancels the migration.
    stall_timeout_s: float = 30.0
    #: How long the source waits for Prepare's and Finish's replies.
    reply_timeout_s: float = 120.0
    #: How long the source keeps asking a lost destination for the outcome.
    outcome_timeout_s: float = 60.0
    #: How long the destination keeps the outcome record of a migration.
    outcome_retention_s: float = 7 * 86400.0
    #: Client-driven migration: how long either agent keeps a migration whose
    #: client's connection closed between phases, for ``ferryctl
    #: migrate-recover`` to take it over, before it discards it.
    client_grace_s: float = 15.0


@dataclass(frozen=True)
class LimitsConfig:
    """What a connection may cost before and after it authenticated ([limits]).

    Before authentication (TLS handshake, peer allow-list, ``hello``) a
    connection holds no thread and no large buffer, at most
    ``max_unauthenticated`` of them exist per listening socket (more are
    accepted and closed at once), and each has ``handshake_timeout_s`` to
    authenticate.  Afterwards a frame that has started must be complete
    within ``frame_read_timeout_s``.
    """

    #: Concurrent unauthenticated connections per listening socket.
    max_unauthenticated: int = 64
    #: Seconds from accept to a completed TLS handshake and hello.
    handshake_timeout_s: float = 5.0
    #: Seconds an authenticated peer has to finish a frame it started.
    frame_read_timeout_s: float = 30.0
    #: Seconds between two "refused N connections" log lines.
    refusal_log_interval_s: float = 10.0


@dataclass(frozen=True)
class PeersConfig:
    """Which peer hosts may connect at all ([peers]).

    ``allowed`` holds certificate names (the common name or a DNS
    subjectAltName; shell-style patterns).  Empty: every host whose
    certificate our CA signed (the agent logs that at start-up).

    ``operators`` holds the names of operator certificates (``ferryctl pki
    client NAME``; shell-style patterns, case-sensitive) that may connect
    to the peer port at all; each op they call then needs an ``[[acl]]``
    rule naming them in ``operators``.  Empty, the default: no operator.
    ``allowed`` never admits an operator, ``operators`` never a host.
    """

    allowed: tuple[str, ...] = ()
    operators: tuple[str, ...] = ()


@dataclass(frozen=True)
class StorageConfig:
    """Which host paths a domain may make qemu open ([storage]).

    ``allowed`` holds absolute directories (or single files or devices);
    :mod:`ferry.storage_policy` checks every path of a domain against them
    after resolving symlinks.  Sockets Ferry places itself (under the run
    directory) need no entry.
    """

    allowed: tuple[Path, ...] = (Path("/var/lib/ferry/images"), Path("/var/lib/libvirt/images"))


@dataclass(frozen=True)
class GraphicsConfig:
    """Where vnc and spice listen and which ports autoport takes ([graphics])."""

    #: The listen address of a display whose XML names none.
    listen: str = "127.0.0.1"
    #: autoport='yes' takes the first free ports from here (vnc: 5900 or more).
    port_range: tuple[int, int] = (5900, 65535)
    #: A vnc ``websocket='-1'`` takes its port from here.
    websocket_port_range: tuple[int, int] = (5700, 65535)
    #: x509 directory for spice TLS ports; None: spice gets no TLS port.
    spice_tls_dir: Path | None = None


@dataclass(frozen=True)
class NetworkConfig:
    """``[networks.NAME]``: what ``<source network='NAME'/>`` means on this host."""

    name: str
    #: The bridge the VM's tap device is attached to (a Linux bridge, or an
    #: Open vSwitch bridge when ``virtualport`` is "openvswitch").
    bridge: str
    virtualport: str | None = None


@dataclass(frozen=True)
class OpenVSwitchConfig:
    """``[openvswitch]``: how Ferry reaches Open vSwitch for ``virtualport`` ports."""

    vsctl: str = "ovs-vsctl"
    #: ovs-vsctl's ``--db`` (e.g. ``unix:/run/openvswitch/db.sock``); None: its default.
    db: str | None = None


@dataclass(frozen=True)
class SaveConfig:
    """``[save]``: how save, managedsave and full dumps write their images."""

    #: raw, gzip, bzip2, xz, lzop or zstd (ferry.save_image.FORMATS).
    image_format: str = "raw"


@dataclass(frozen=True)
class TestingConfig:
    """Fault injection used only by the test suite; all off by default."""

    fail_cpu_start: bool = False
    #: ``POINT=ACTION`` strings; see :mod:`ferry.faults`.
    faults: tuple[str, ...] = ()
    #: Features the destination's hello leaves out: an older peer, for tests.
    without_features: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    """The whole validated configuration of one host's agents."""

    host: HostConfig
    paths: PathsConfig = field(default_factory=PathsConfig)
    admin_group: str | None = "ferry"
    source_admin_socket: Path = Path("/run/ferry/source.sock")
    destination: DestinationConfig = field(default_factory=DestinationConfig)
    tls: TLSConfig | None = None
    qemu: QemuConfig = field(default_factory=QemuConfig)
    acl: tuple[ACLRule, ...] = ()
    migrate_hook: Path | None = None
    max_frame: int = 1 << 20
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    graphics: GraphicsConfig = field(default_factory=GraphicsConfig)
    #: ``[networks.NAME]`` tables by NAME.
    networks: Mapping[str, NetworkConfig] = field(default_factory=dict)
    openvswitch: OpenVSwitchConfig = field(default_factory=OpenVSwitchConfig)
    testing: TestingConfig = field(default_factory=TestingConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    source_path: Path | None = None


# Values of [qemu] cgroup (ferry.qemu.scope.CGROUP_MODES; not imported from
# there so that reading a config does not import the qemu package).
_CGROUP_MODES = ("auto", "scope", "detached")


def parse_hostport(value: str, *, what: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check both parts.

    Raises:
        ConfigError: naming ``what`` when the value is malformed.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise ConfigError(f"{what}: port {port} out of range 1..65535")
    return host, port


class _Section:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"[{where}] must be a table")
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int subclass; a port given as `true` is a mistake.
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"[{self.where}] {key}: wrong type bool")
        if not isinstance(value, kind):
            raise ConfigError(f"[{self.where}] {key}: wrong type {type(value).__name__}")
        return value

    def path(self, key: str, default: Path | None = None) -> Path | None:
        text = self.get(key, str)
        if text is None:
            return default
        path = Path(text)
        if not path.is_absolute():
            raise ConfigError(f"[{self.where}] {key}: path {text!r} must be absolute")
        return path

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"[{self.where}] unknown key(s): {', '.join(unknown)}")


def _str_tuple(section: _Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = section.get(key, list)
    if value is None:
        return default
    if not all(isinstance(item, str) for item in value):
        raise ConfigError(f"[{section.where}] {key}: every item must be a string")
    return tuple(value)


def parse_config(data: Mapping[str, Any], *, source_path: Path | None = None) -> AgentConfig:
    """Validate a decoded TOML document into an :class:`AgentConfig`.

    Raises:
        ConfigError: naming the table and key of the first problem.
    """
    top = _Section(data, "top level")
    host_s = _Section(top.get("host", dict, {}), "host")
    host_uuid = host_s.get("uuid", str)
    if host_uuid is None:
        raise ConfigError("[host] uuid is required")
    try:
        host_uuid = str(uuidlib.UUID(host_uuid))
    except ValueError:
        raise ConfigError(f"[host] uuid: {host_uuid!r} is not a UUID") from None
    host = HostConfig(uuid=host_uuid, name=host_s.get("name", str, socket.gethostname()))
    host_s.finish()

    paths_s = _Section(top.get("paths", dict, {}), "paths")
    defaults = PathsConfig()
    state_dir = paths_s.path("state_dir", defaults.state_dir)
    run_dir = paths_s.path("run_dir", defaults.run_dir)
    assert state_dir is not None and run_dir is not None
    lockspace = paths_s.path("lockspace_dir", state_dir / "lockspace")
    assert lockspace is not None
    paths = PathsConfig(state_dir=state_dir, run_dir=run_dir, lockspace_dir=lockspace)
    paths_s.finish()

    admin_s = _Section(top.get("admin", dict, {}), "admin")
    admin_group = admin_s.get("group", str, "ferry")
    admin_s.finish()

    source_s = _Section(top.get("source", dict, {}), "source")
    source_sock = source_s.path("admin_socket", run_dir / "source.sock")
    assert source_sock is not None
    source_s.finish()

    dest_s = _Section(top.get("destination", dict, {}), "destination")
    dest_sock = dest_s.path("admin_socket", run_dir / "destination.sock")
    assert dest_sock is not None
    listen = parse_hostport(dest_s.get("listen", str, "0.0.0.0:49160"), what="[destination] listen")
    mig_addr = dest_s.get("migration_address", str, listen[0])
    try:
        ipaddress.ip_address(mig_addr)
    except ValueError:
        raise ConfigError(
            f"[destination] migration_address: {mig_addr!r} is not an IP address"
        ) from None
    ports = dest_s.get("migration_ports", list, [49200, 49299])
    if (
        len(ports) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in ports)
        or not 0 < ports[0] <= ports[1] < 65536
    ):
        raise ConfigError("[destination] migration_ports: expected [FIRST, LAST] within 1..65535")
    incoming_timeout = float(dest_s.get("incoming_timeout_s", (int, float), 300.0))
    if incoming_timeout <= 0:
        raise ConfigError("[destination] incoming_timeout_s must be > 0")
    destination = DestinationConfig(
        admin_socket=dest_sock,
        listen=listen,
        migration_address=mig_addr,
        migration_ports=(ports[0], ports[1]),
        incoming_timeout_s=incoming_timeout,
    )
    dest_s.finish()

    tls: TLSConfig | None = None
    if "tls" in data:
        tls_s = _Section(top.get("tls", dict), "tls")
        files = {k: tls_s.path(k) for k in ("ca", "cert", "key")}
        missing = [k for k, v in files.items() if v is None]
        if missing:
            raise ConfigError(f"[tls] missing key(s): {', '.join(missing)}")
        tls = TLSConfig(
            ca=files["ca"],  # type: ignore[arg-type]
            cert=files["cert"],  # type: ignore[arg-type]
            key=files["key"],  # type: ignore[arg-type]
            allow_plaintext_tunnel=bool(tls_s.get("allow_plaintext_tunnel", bool, False)),
            allow_plaintext_nbd=bool(tls_s.get("allow_plaintext_nbd", bool, False)),
        )
        tls_s.finish()
    else:
        top.used.add("tls")

    qemu_s = _Section(top.get("qemu", dict, {}), "qemu")
    cgroup = qemu_s.get("cgroup", str, "auto")
    if cgroup not in _CGROUP_MODES:
        raise ConfigError(
            f"[qemu] cgroup: {cgroup!r} is not one of "
            + ", ".join(f'"{m}"' for m in _CGROUP_MODES)
            + ' ("auto": a systemd scope in machine.slice when systemd is init, else detached)'
        )
    scope_properties = _str_tuple(qemu_s, "scope_properties", ())
    for prop in scope_properties:
        name, sep, _ = prop.partition("=")
        if (
            not sep
            or not name.isalnum()
            or not name[0].isalpha()
            or any(c in prop for c in "\n\r\0")
        ):
            raise ConfigError(
                f"[qemu] scope_properties: {prop!r} is not NAME=VALUE "
                '(e.g. "DeviceAllow=block-sd rw")'
            )
    prealloc_threads = qemu_s.get("prealloc_threads", int, 0)
    if not 0 <= prealloc_threads <= 64:
        raise ConfigError("[qemu] prealloc_threads must be within 0..64 (0 = automatic)")
    qemu = QemuConfig(
        binary=qemu_s.get("binary", str, "qemu-system-x86_64"),
        launch_timeout_s=float(qemu_s.get("launch_timeout_s", (int, float), 60.0)),
        cgroup=cgroup,
        scope_properties=scope_properties,
        prealloc_threads=prealloc_threads,
        virtiofsd=qemu_s.get("virtiofsd", str, ""),
    )
    if qemu.virtiofsd and not qemu.virtiofsd.startswith("/"):
        raise ConfigError("[qemu] virtiofsd must be an absolute path (/usr/lib/qemu/virtiofsd)")
    qemu_s.finish()

    rules: list[ACLRule] = []
    acl_data = top.get("acl", list, [])
    for index, item in enumerate(acl_data):
        rule_s = _Section(item, f"acl.{index}")
        rules.append(
            ACLRule(
                users=_str_tuple(rule_s, "users", ()),
                groups=_str_tuple(rule_s, "groups", ()),
                peers=_str_tuple(rule_s, "peers", ()),
                operators=_str_tuple(rule_s, "operators", ()),
                ops=_str_tuple(rule_s, "ops", ("*",)),
                domains=_str_tuple(rule_s, "domains", ("*",)),
            )
        )
        rule_s.finish()

    hooks_s = _Section(top.get("hooks", dict, {}), "hooks")
    migrate_hook = hooks_s.path("migrate")
    hooks_s.finish()

    limits_s = _Section(top.get("limits", dict, {}), "limits")
    max_frame = limits_s.get("max_frame", int, 1 << 20)
    if not 4096 <= max_frame <= 64 << 20:
        raise ConfigError("[limits] max_frame must be within 4096..67108864")
    limits = _parse_limits(limits_s)
    limits_s.finish()

    peers_s = _Section(top.get("peers", dict, {}), "peers")
    peers = PeersConfig(
        allowed=_str_tuple(peers_s, "allowed", ()),
        operators=_str_tuple(peers_s, "operators", ()),
    )
    if any(not name.strip() for name in peers.allowed):
        raise ConfigError("[peers] allowed: names must not be empty")
    if any(not name.strip() for name in peers.operators):
        raise ConfigError("[peers] operators: names must not be empty")
    peers_s.finish()

    migration_s = _Section(top.get("migration", dict, {}), "migration")
    timeouts: dict[str, float] = {}
    for key, default in (("stall_timeout_s", 30.0), ("reply_timeout_s", 120.0),
                         ("outcome_timeout_s", 60.0), ("outcome_retention_s", 7 * 86400.0),
                         ("client_grace_s", 15.0)):
        value = float(migration_s.get(key, (int, float), default))
        if value <= 0:
            raise ConfigError(f"[migration] {key} must be > 0")
        timeouts[key] = value
    migration = MigrationConfig(**timeouts)
    migration_s.finish()

    storage = _parse_storage(_Section(top.get("storage", dict, {}), "storage"))
    graphics = _parse_graphics(_Section(top.get("graphics", dict, {}), "graphics"))
    networks = _parse_networks(top.get("networks", dict, {}))
    ovs_s = _Section(top.get("openvswitch", dict, {}), "openvswitch")
    openvswitch = OpenVSwitchConfig(vsctl=ovs_s.get("vsctl", str, "ovs-vsctl"),
                                    db=ovs_s.get("db", str))
    if not openvswitch.vsctl or (openvswitch.db is not None and not openvswitch.db.strip()):
        raise ConfigError("[openvswitch] vsctl and db must not be empty")
    ovs_s.finish()

    save_s = _Section(top.get("save", dict, {}), "save")
    save = SaveConfig(image_format=save_s.get("image_format", str, "raw"))
    if save.image_format not in ("raw", "gzip", "bzip2", "xz", "lzop", "zstd"):
        raise ConfigError(f"[save] image_format = {save.image_format!r}: not one of raw, "
                          "gzip, bzip2, xz, lzop, zstd")
    save_s.finish()

    testing_s = _Section(top.get("testing", dict, {}), "testing")
    faults = _str_tuple(testing_s, "faults", ())
    from ferry.faults import parse_faults

    parse_faults(faults)  # refuse a typo at start, not when the point is reached
    testing = TestingConfig(
        fail_cpu_start=bool(testing_s.get("fail_cpu_start", bool, False)), faults=faults,
        without_features=_str_tuple(testing_s, "without_features", ()),
    )
    testing_s.finish()

    top.finish()
    return AgentConfig(
        host=host,
        paths=paths,
        admin_group=admin_group or None,
        source_admin_socket=source_sock,
        destination=destination,
        tls=tls,
        qemu=qemu,
        acl=tuple(rules),
        migrate_hook=migrate_hook,
        max_frame=max_frame,
        limits=limits,
        peers=peers,
        migration=migration,
        storage=storage,
        graphics=graphics,
        networks=networks,
        openvswitch=openvswitch,
        testing=testing,
        save=save,
        source_path=source_path,
    )


def _parse_limits(section: _Section) -> LimitsConfig:
    """The pre-authentication and frame-deadline keys of [limits]."""
    defaults = LimitsConfig()
    cap = section.get("max_unauthenticated", int, defaults.max_unauthenticated)
    if not 1 <= cap <= 65536:
        raise ConfigError("[limits] max_unauthenticated must be within 1..65536")
    seconds: dict[str, float] = {}
    for key in ("handshake_timeout_s", "frame_read_timeout_s", "refusal_log_interval_s"):
        value = float(section.get(key, (int, float), getattr(defaults, key)))
        if not 0 < value <= 3600:
            raise ConfigError(f"[limits] {key} must be > 0 and at most 3600 seconds")
        seconds[key] = value
    return LimitsConfig(max_unauthenticated=cap, **seconds)


def _parse_storage(section: _Section) -> StorageConfig:
    """[storage] allowed: absolute, normalised paths (a typo must not widen the policy)."""
    items = _str_tuple(section, "allowed", tuple(str(p) for p in StorageConfig().allowed))
    allowed: list[Path] = []
    for text in items:
        normal = os.path.normpath(text) == (text.rstrip("/") or "/")
        if not text.startswith("/") or not normal or "\0" in text:
            raise ConfigError(
                f"[storage] allowed: {text!r} must be an absolute, normalised path "
                "(no '..', no doubled '/')"
            )
        allowed.append(Path(text))
    section.finish()
    return StorageConfig(allowed=tuple(allowed))


def _port_range(section: _Section, key: str, default: tuple[int, int]) -> tuple[int, int]:
    value = section.get(key, list, list(default))
    if (
        len(value) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in value)
        or not 0 < value[0] <= value[1] < 65536
    ):
        raise ConfigError(f"[{section.where}] {key}: expected [FIRST, LAST] within 1..65535")
    return value[0], value[1]


def _parse_graphics(section: _Section) -> GraphicsConfig:
    """[graphics]: the default listen address, autoport ranges, spice TLS."""
    defaults = GraphicsConfig()
    listen = section.get("listen", str, defaults.listen)
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        raise ConfigError(f"[graphics] listen: {listen!r} is not an IP address") from None
    ports = _port_range(section, "port_range", defaults.port_range)
    if ports[1] < 5900:
        raise ConfigError("[graphics] port_range: vnc needs ports of 5900 or more "
                          "(qemu counts displays from 5900)")
    graphics = GraphicsConfig(
        listen=listen,
        port_range=ports,
        websocket_port_range=_port_range(section, "websocket_port_range",
                                         defaults.websocket_port_range),
        spice_tls_dir=section.path("spice_tls_dir"),
    )
    section.finish()
    return graphics


# A Linux interface name: at most 15 bytes, no '/', blank or ':' (IFNAMSIZ).
_IFNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _parse_networks(data: Any) -> dict[str, NetworkConfig]:
    """[networks.NAME] tables: the bridge each network name stands for here."""
    if not isinstance(data, Mapping):
        raise ConfigError("[networks] must hold one table per network: [networks.NAME]")
    out: dict[str, NetworkConfig] = {}
    for name, table in data.items():
        where = f"networks.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"[networks] {name}: expected a table [networks.{name}] "
                              'with bridge = "br0"')
        section = _Section(table, where)
        bridge = section.get("bridge", str)
        virtualport = section.get("virtualport", str)
        if virtualport not in (None, "openvswitch"):
            raise ConfigError(f"[{where}] virtualport: {virtualport!r} is not supported "
                              '(use "openvswitch", or leave it out for a Linux bridge)')
        if bridge is None:
            raise ConfigError(f'[{where}] bridge is required (the host bridge, e.g. "br0")')
        if not 0 < len(bridge) <= 15 or not set(bridge) <= _IFNAME_CHARS:
            raise ConfigError(f"[{where}] bridge: {bridge!r} is not an interface name "
                              "(1..15 of A-Z a-z 0-9 _ . -)")
        section.finish()
        out[name] = NetworkConfig(name=name, bridge=bridge, virtualport=virtualport)
    return out


def load_config(path: Path) -> AgentConfig:
    """Read and validate the agent configuration file.

    Raises:
        ConfigError: when the file is missing, not TOML, or invalid.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    return parse_config(data, source_path=path)
