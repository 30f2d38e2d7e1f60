"""Open vSwitch ports for a VM's tap devices (``<virtualport type='openvswitch'>``).

A NIC goes to an Open vSwitch bridge when its XML says so
(``<virtualport type='openvswitch'>`` on a bridge or network interface) or
when the host maps its network to one (``[networks.NAME] virtualport =
"openvswitch"``). Ferry then does what libvirt does: the tap it created
becomes a port of the bridge, with the external IDs an SDN controller keys
on (``iface-id``, ``attached-mac``, ``vm-id``, ``iface-status``), and the
port is removed when the VM leaves the host (it stopped, or migrated away).

The interface ID is the XML's ``interfaceid``, else one derived from the
domain UUID and the MAC: the same on every host, so a controller sees the
same port identity before and after a migration without any state carried.

The argv builders are pure (unit-tested); :func:`run_vsctl` runs one argv
(never a shell) with a timeout.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ferry.config import OpenVSwitchConfig
from ferry.errors import QemuLaunchError

__all__ = [
    "SwitchPort",
    "add_port_argv",
    "bridge_exists_argv",
    "default_interface_id",
    "del_port_argv",
    "owner_argv",
    "run_vsctl",
]

#: Namespace of derived interface IDs (uuid5 of "DOMAIN-UUID/MAC").
_IFACE_NS = uuid.UUID("6f2c3e0a-5d1b-4c3e-9a57-0f3e1d2c4b5a")
_VSCTL_TIMEOUT_S = 10


@dataclass(frozen=True)
class SwitchPort:
    """One tap device as a port of an Open vSwitch bridge."""

    bridge: str
    tap: str
    mac: str
    interface_id: str
    vm_id: str
    profile_id: str | None = None


def default_interface_id(domain_uuid: str, mac: str) -> str:
    """The interface ID of a NIC whose XML names none (stable across hosts)."""
    return str(uuid.uuid5(_IFACE_NS, f"{domain_uuid}/{mac.lower()}"))


def _base(config: OpenVSwitchConfig) -> list[str]:
    argv = [config.vsctl]
    if config.db is not None:
        argv.append(f"--db={config.db}")
    return [*argv, f"--timeout={_VSCTL_TIMEOUT_S}"]


def bridge_exists_argv(config: OpenVSwitchConfig, bridge: str) -> list[str]:
    """``ovs-vsctl br-exists BRIDGE``: exit 0 if it exists, 2 if not."""
    return [*_base(config), "br-exists", bridge]


def add_port_argv(config: OpenVSwitchConfig, port: SwitchPort) -> list[str]:
    """Make ``port.tap`` a port of ``port.bridge`` with libvirt's external IDs.

    A stale record of the same name (a tap of an earlier VM the kernel has
    deleted since) is dropped in the same transaction.
    """
    argv = [*_base(config), "--", "--if-exists", "del-port", port.tap,
            "--", "add-port", port.bridge, port.tap,
            "--", "set", "Interface", port.tap,
            f'external-ids:attached-mac="{port.mac}"',
            f'external-ids:iface-id="{port.interface_id}"',
            f'external-ids:vm-id="{port.vm_id}"',
            "external-ids:iface-status=active"]  # fmt: skip
    if port.profile_id is not None:
        argv += ["--", "set", "Port", port.tap, f'external-ids:port-profile="{port.profile_id}"']
    return argv


def owner_argv(config: OpenVSwitchConfig, tap: str) -> list[str]:
    """The ``vm-id`` of port ``tap`` (empty output: no such port)."""
    return [*_base(config), "--if-exists", "get", "Interface", tap, "external-ids:vm-id"]


def del_port_argv(config: OpenVSwitchConfig, tap: str) -> list[str]:
    """Remove port ``tap`` if it exists."""
    return [*_base(config), "--if-exists", "del-port", tap]


def run_vsctl(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run one ovs-vsctl argv.

    Raises:
        QemuLaunchError: ovs-vsctl is missing or did not answer in time.
    """
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              timeout=_VSCTL_TIMEOUT_S + 5)  # fmt: skip
    except FileNotFoundError:
        raise QemuLaunchError(
            f"{argv[0]} not found: install Open vSwitch (Debian: openvswitch-switch) or set "
            "[openvswitch] vsctl") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QemuLaunchError(f"{' '.join(argv)}: {exc}") from None


def attach(config: OpenVSwitchConfig, port: SwitchPort, domain: str) -> None:
    """Add ``port`` to its bridge.

    Raises:
        QemuLaunchError: the bridge does not exist or ovs-vsctl failed.
    """
    found = run_vsctl(bridge_exists_argv(config, port.bridge))
    if found.returncode == 2:
        raise QemuLaunchError(
            f"domain {domain}: Open vSwitch bridge {port.bridge!r} does not exist on this "
            f"host: create it (ovs-vsctl add-br {port.bridge}) or map the network to another "
            "one", bridge=port.bridge)
    if found.returncode != 0:
        raise QemuLaunchError(f"domain {domain}: cannot reach Open vSwitch: "
                              f"{found.stderr.strip() or found.returncode}", bridge=port.bridge)
    done = run_vsctl(add_port_argv(config, port))
    if done.returncode != 0:
        raise QemuLaunchError(
            f"domain {domain}: cannot add {port.tap} to Open vSwitch bridge {port.bridge!r}: "
            f"{done.stderr.strip() or done.returncode}", bridge=port.bridge)


def detach(config: OpenVSwitchConfig, tap: str, vm_id: str) -> bool:
    """Remove port ``tap`` if it is still this VM's; True if it was removed.

    The kernel reuses tap names: once this VM's tap is gone another VM may
    already have added a port of the same name, which must stay. Never raises
    (a VM that has stopped must not fail to clean up over its switch port).
    """
    try:
        owner = run_vsctl(owner_argv(config, tap))
        if owner.returncode != 0 or owner.stdout.strip().strip('"') != vm_id:
            return False
        return run_vsctl(del_port_argv(config, tap)).returncode == 0
    except QemuLaunchError:
        return False
