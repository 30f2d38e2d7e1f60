"""Client-driven migration end to end: ferryctl runs the five phases itself.

ferryctl runs in host A's network namespace with an operator certificate
(``ferryctl pki client ops``): Begin/Perform/Confirm on A's admin socket,
Prepare/Finish on B's agent port over TLS.  Real agents, real qemu.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_migration import assert_moved, boot_guest

import testguest
from cluster import Cluster, guest_xml

pytestmark = pytest.mark.e2e

GRACE_S = 3


@pytest.fixture
def client_hosts(cluster: Cluster) -> Cluster:
    """Both hosts admit the operator 'ops' for the client-driven ops; short grace."""
    for host in (cluster.a, cluster.b):
        host.write_config(**cluster.operator_config(), **{"migration.client_grace_s": GRACE_S})
    return cluster.start()


@pytest.fixture
def guest(
    client_hosts: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    serial = boot_guest(client_hosts.a, tmp_path, guest_xml("g1", guest_kernel,
                                                             virt_type=virt_type))  # fmt: skip
    try:
        yield serial
    finally:
        serial.close()


def run_client(cluster: Cluster, *args: str, fault: str | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:  # fmt: skip
    argv = cluster.client_argv("migrate", "g1", cluster.b.uri, "--client-driven", *args,
                               fault=fault)  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)  # fmt: skip


def events(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_client_driven_live_migration_moves_the_guest(
    guest: testguest.SerialReader, client_hosts: Cluster
) -> None:
    result = run_client(client_hosts, "--live", "--json")
    assert result.returncode == 0, result.stderr + client_hosts.logs()
    evs = events(result)
    phases = [e["data"]["phase"] for e in evs if e["event"] == "phase"]  # type: ignore[index]
    assert phases == ["begin", "prepare", "perform", "finish", "confirm"], phases
    assert_moved(client_hosts, guest)
