"""A VM's NICs on the host: networks resolved to bridges, tap devices made by Ferry.

``<interface type='network'>`` names a libvirt network (``<source
network='default'/>``, virt-install's default). Ferry has no virtual
networks of its own: each host says in its configuration which bridge a
network name stands for there (``[networks.default] bridge = "br0"``), so
the same XML starts on every host that maps the name. A name a host does
not map is refused at define (:func:`network_problems`, with the setting to
add), in a migration's Prepare on the destination, and at start.

``<interface type='bridge'>`` and a mapped network get a tap device the
agent creates itself, as libvirt does, rather than qemu's setuid bridge
helper (which needs ``/etc/qemu/bridge.conf``): :func:`open_taps` opens
``/dev/net/tun`` and creates the device with ``TUNSETIFF`` (the kernel
picks the name ``ferryN``), attaches it to the bridge with ``ip link set
dev TAP master BRIDGE up`` (an argv, never a shell) and hands the
descriptor to qemu (``-netdev tap,fd=N``). The device is not persistent:
the kernel deletes it when the last descriptor closes, that is when qemu
exits (or at once, when the start fails before qemu holds it).

A NIC with ``<virtualport type='openvswitch'>``, or on a network the host
maps to an Open vSwitch bridge (``virtualport = "openvswitch"``), becomes a
port of that bridge instead (:mod:`ferry.ovs`); the port is removed when the
VM leaves the host (:func:`detach_switch_ports`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator, Mapping

from ferry import ovs
from ferry.config import AgentConfig
from ferry.domain import Domain, HostNetworks, Interface
from ferry.domain._nics import network_table
from ferry.domain.argv import NicTap
from ferry.errors import QemuLaunchError, XMLUnsupported

__all__ = [
    "TAP_TEMPLATE",
    "bridge_of",
    "check_networks",
    "detach_switch_ports",
    "host_networks",
    "network_problems",
    "open_taps",
    "switch_port_of",
    "unmapped_hint",
]

#: Name template of the tap devices (the kernel fills in the number).
TAP_TEMPLATE = "ferry%d"

# linux/if_tun.h
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFNAMSIZ = 16

_IP_TIMEOUT = 10.0


def unmapped_hint(network: str, config: AgentConfig) -> str:
    """What to add to this host's configuration for ``network``."""
    where = config.source_path or "agent.toml"
    return f'add [{network_table(network)}] bridge = "..." to {where}'


def network_problems(domain: Domain, config: AgentConfig) -> list[str]:
    """One message per network NIC of ``domain`` this host does not map."""
    out = []
    for i, nic in enumerate(domain.interfaces):
        if nic.type == "network" and nic.source not in config.networks:
            out.append(f"interface {i} ({nic.mac}): network {nic.source!r} is not mapped on "
                       f"host {config.host.name}: {unmapped_hint(str(nic.source), config)}")
    return out


def check_networks(domain: Domain, config: AgentConfig, *, where: str) -> None:
    """Refuse ``domain`` when one of its networks is not mapped on this host.

    Raises:
        XMLUnsupported: naming every unmapped network and the setting to add.
    """
    problems = network_problems(domain, config)
    if problems:
        raise XMLUnsupported(f"{where}: " + "; ".join(problems), where=where,
                             element="domain/devices/interface/source")


def bridge_of(nic: Interface, config: AgentConfig) -> str | None:
    """The host bridge of a bridge or network NIC (None for user networking).

    Raises:
        XMLUnsupported: a network this host does not map.
    """
    if nic.type == "bridge":
        return nic.source
    if nic.type == "network":
        mapped = config.networks.get(str(nic.source))
        if mapped is None:
            raise XMLUnsupported(
                f"network {nic.source!r} is not mapped on host {config.host.name}: "
                + unmapped_hint(str(nic.source), config),
                element="domain/devices/interface/source",
            )
        return mapped.bridge
    return None


def switch_port_of(
    domain: Domain, nic: Interface, bridge: str, tap: str, config: AgentConfig
) -> ovs.SwitchPort | None:
    """The Open vSwitch port ``nic`` needs on this host, or None (a Linux bridge)."""
    mapped = config.networks.get(str(nic.source)) if nic.type == "network" else None
    on_ovs = nic.virtualport is not None or (
        mapped is not None and mapped.virtualport == "openvswitch")
    if not on_ovs:
        return None
    vp = nic.virtualport
    interface_id = (vp.interfaceid if vp is not None and vp.interfaceid is not None
                    else ovs.default_interface_id(domain.uuid, nic.mac))  # fmt: skip
    return ovs.SwitchPort(bridge=bridge, tap=tap, mac=nic.mac, interface_id=interface_id,
                          vm_id=domain.uuid, profile_id=vp.profileid if vp else None)


def detach_switch_ports(config: AgentConfig, ports: object, vm_id: str) -> list[str]:
    """Remove the switch ports a VM's status recorded (``extra["switch_ports"]``).

    Returns the taps removed. Never raises: called while cleaning up.
    """
    removed = []
    for tap in ports if isinstance(ports, list) else ():
        if isinstance(tap, str) and ovs.detach(config.openvswitch, tap, vm_id):
            removed.append(tap)
    return removed


def _create_tap(vnet_hdr: bool) -> tuple[int, str]:
    """Open ``/dev/net/tun`` and create a tap device: (descriptor, name)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)
        ifr = struct.pack(f"{_IFNAMSIZ}sH22x", TAP_TEMPLATE.encode(), flags)
        out = fcntl.ioctl(fd, _TUNSETIFF, ifr)
    except BaseException:
        os.close(fd)
        raise
    name = out[:_IFNAMSIZ].split(b"\0", 1)[0].decode()
    return fd, name


def _ip(*args: str) -> None:
    """Run ``ip ARGS`` (an argv, no shell); raise with its message when it fails."""
    argv = ["ip", *args]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_IP_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuLaunchError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        raise QemuLaunchError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


def _is_bridge(name: str) -> bool:
    """Whether ``name`` is a Linux bridge in the agent's network namespace."""
    try:
        done = subprocess.run(["ip", "-d", "-o", "link", "show", "dev", name],
                              capture_output=True, text=True, timeout=_IP_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and " bridge " in done.stdout


def _attach(tap: str, bridge: str, mtu: int | None, domain: str) -> None:
    if not _is_bridge(bridge):
        raise QemuLaunchError(
            f"domain {domain}: bridge {bridge!r} does not exist on this host (or is not a "
            f"Linux bridge): create it (ip link add {bridge} type bridge) or map the "
            "network to another one (an Open vSwitch bridge needs <virtualport "
            "type='openvswitch'/> in the interface, or virtualport = \"openvswitch\" in "
            "the network's [networks.NAME])", bridge=bridge)
    if mtu is not None:
        _ip("link", "set", "dev", tap, "mtu", str(mtu))
    _ip("link", "set", "dev", tap, "master", bridge, "up")


@contextlib.contextmanager
def open_taps(domain: Domain, config: AgentConfig) -> Iterator[Mapping[int, NicTap]]:
    """Tap devices for the bridge and network NICs of ``domain``, by NIC index.

    Each is attached to its bridge and up. Pass the descriptors to qemu;
    they are closed when the block ends (qemu keeps its copies, and the
    devices live as long as qemu does).

    Raises:
        XMLUnsupported: a network this host does not map.
        QemuLaunchError: a tap cannot be made (no ``/dev/net/tun``, no
            CAP_NET_ADMIN) or the bridge does not exist.
    """
    taps: dict[int, NicTap] = {}
    switch_ports: list[str] = []
    try:
        for i, nic in enumerate(domain.interfaces):
            bridge = bridge_of(nic, config)
            if bridge is None:
                continue
            vnet_hdr = nic.model == "virtio"
            try:
                fd, name = _create_tap(vnet_hdr)
            except OSError as exc:
                raise QemuLaunchError(
                    f"domain {domain.name}: cannot create a tap device for interface {i} "
                    f"({nic.mac}) on bridge {bridge!r}: {exc.strerror or exc} (the agent "
                    "needs /dev/net/tun and CAP_NET_ADMIN)", bridge=bridge) from None
            port = switch_port_of(domain, nic, bridge, name, config)
            taps[i] = NicTap(fd=fd, ifname=name, vnet_hdr=vnet_hdr, switch_port=port is not None)
            if port is None:
                _attach(name, bridge, nic.mtu, domain.name)
            else:
                if nic.mtu is not None:
                    _ip("link", "set", "dev", name, "mtu", str(nic.mtu))
                _ip("link", "set", "dev", name, "up")
                ovs.attach(config.openvswitch, port, domain.name)
                switch_ports.append(name)
        yield taps
    except BaseException:
        # qemu never held these taps: their switch ports must not outlive them.
        detach_switch_ports(config, switch_ports, domain.uuid)
        raise
    finally:
        for tap in taps.values():
            with contextlib.suppress(OSError):
                os.close(tap.fd)


def host_networks(config: AgentConfig) -> HostNetworks:
    """The networks this host maps, for :func:`~ferry.domain.parse_domain` at define."""
    return HostNetworks(names=frozenset(config.networks), host=config.host.name,
                        config_file=str(config.source_path or "agent.toml"))
