"""Guest CPU models across hosts (issue 14): what migrates, and what the destination refuses.

host-model and host-passthrough guests under this host's accelerator, and a
named model (the first of a list this host runs exactly, under KVM if it
can, else under TCG) migrate live with the guest's memory intact; the
host-model guest is started on B as the CPU A's qemu ran (``-cpu base,…,
enforce``) and migrates back. A guest that asks for a feature the host
lacks (with ``check='none'`` qemu starts it without the feature, as libvirt
lets it) is refused by the destination in Prepare with that feature named,
and keeps running on A.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, HostEnv, guest_xml
from ferry.cpu_probe import host_cpu
from ferry.domain._cpu import HostCpu

pytestmark = pytest.mark.e2e

QEMU = "qemu-system-x86_64"

# Named 64-bit models, newest first: the test guest runs in long mode.
MODELS = ("Skylake-Client", "Haswell-noTSX", "SandyBridge", "Westmere", "Nehalem", "Penryn",
          "kvm64", "qemu64")
# Features one of which a host may lack (the refusal needs one it lacks).
RARE = ("avx512f", "avx512-fp16", "amx-tile", "avx2", "avx", "sse4.2", "svm", "vmx", "pni")


def _probe(accel: str) -> HostCpu:
    return asyncio.run(host_cpu(QEMU, accel))


def _named_model(kvm: bool) -> tuple[str, str]:
    """(virt type, a named model this host runs exactly under it)."""
    for virt, accel in ((("kvm", "kvm"),) if kvm else ()) + (("qemu", "tcg"),):
        host = _probe(accel)
        for model in MODELS:
            if host.unavailable.get(model) == ():
                return virt, model
    pytest.skip("no named 64-bit CPU model runs exactly on this host")


def _with_cpu(xml: str, cpu: str) -> str:
    return xml.replace("<vcpu>1</vcpu>", f"<vcpu>1</vcpu>\n  {cpu}", 1)


def _qemu_cpu_arg(host: HostEnv) -> str:
    """The ``-cpu`` value of the one qemu on ``host``."""
    (pid,) = host.qemu_pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return argv[argv.index("-cpu") + 1]


def _migrate_and_check(cluster: Cluster, src: HostEnv, dst: HostEnv,
                       serial: testguest.SerialReader) -> None:
    before = serial.wait_for(lambda r: r.counter >= 1, timeout=120)
    moved = src.ferryctl("migrate", "g1", dst.uri, "--live", "--json", timeout=300)
    assert moved.returncode == 0, moved.stderr + cluster.logs()
    assert dst.domain_state("g1") == "running"
    assert src.domain_state("g1") is None or src.domain_state("g1") != "running"
    serial.reconnect(dst.serial_socket("g1"))
    after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=120)
    assert serial.boot_count == 1 and after.bad_pages == 0


@pytest.mark.parametrize("mode", ["host-model", "host-passthrough"])
def test_host_cpu_modes_migrate_there_and_back(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path, mode: str
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "g1.xml"
    xml.write_text(_with_cpu(guest_xml("g1", guest_kernel, virt_type=virt_type, wss_mib=4,
                                       rate_mib_s=1), f"<cpu mode='{mode}'/>"))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=120)
        own = "host" if virt_type == "kvm" else "max"
        assert _qemu_cpu_arg(a).split(",")[0] == own
        _migrate_and_check(cluster, a, b, serial)
        cpu_b = _qemu_cpu_arg(b)
        if mode == "host-model":
            # B runs the CPU A's qemu ran, property by property, or none at all.
            assert cpu_b.startswith("base,") and cpu_b.endswith(",enforce=on"), cpu_b
            assert "family=" in cpu_b and "vendor=" in cpu_b, cpu_b
        else:
            assert cpu_b.split(",")[0] == own
        # B's Begin reads what B's qemu runs: the guest goes back unchanged.
        _migrate_and_check(cluster, b, a, serial)
        a.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()


def test_named_model_migrates(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    virt, model = _named_model(virt_type == "kvm")
    cluster.start()
    xml = tmp_path / "g1.xml"
    cpu = f"<cpu mode='custom' match='exact'><model fallback='forbid'>{model}</model></cpu>"
    xml.write_text(_with_cpu(guest_xml("g1", guest_kernel, virt_type=virt, wss_mib=4,
                                       rate_mib_s=1), cpu))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=120)
        assert _qemu_cpu_arg(a) == f"{model},enforce=on"
        _migrate_and_check(cluster, a, b, serial)
        assert _qemu_cpu_arg(b) == f"{model},enforce=on"
        b.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()


def test_destination_refuses_a_cpu_feature_it_lacks(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    virt, model = _named_model(virt_type == "kvm")
    host = _probe("kvm" if virt == "kvm" else "tcg")
    lacking = next((f for f in RARE if f.replace(".", "-") not in host.features), None)
    if lacking is None:
        pytest.skip(f"this host has every one of {RARE}")
    cluster.start()
    xml = tmp_path / "g1.xml"
    # check='none': qemu starts the guest without the feature, as libvirt lets it.
    cpu = (f"<cpu mode='custom' match='exact' check='none'><model>{model}</model>"
           f"<feature policy='require' name='{lacking}'/></cpu>")
    xml.write_text(_with_cpu(guest_xml("g1", guest_kernel, virt_type=virt, wss_mib=4,
                                       rate_mib_s=1), cpu))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=120)
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=120)
        pids_b = b.qemu_pids()
        refused = a.ferryctl("migrate", "g1", b.uri, "--live", timeout=300)
        assert refused.returncode != 0, refused.stdout + cluster.logs()
        assert "(cpu-incompatible)" in refused.stderr, refused.stderr + cluster.logs()
        assert lacking in refused.stderr and model in refused.stderr, refused.stderr
        # Refused in Prepare, before any qemu: nothing started on B, A runs on.
        assert b.qemu_pids() == pids_b == []
        assert b.domain_state("g1") is None
        assert a.domain_state("g1") == "running"
        # B's own log says why it refused.
        said = b.agent_log("destination")
        assert "prepare: refused g1" in said and lacking in said, said
        serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=120)
        info = json.loads(a.ferryctl("dominfo", "g1", "--json", check=True).stdout)
        assert info["state"] == "running"
        a.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()


def test_probe_answers_under_this_accelerator(virt_type: str) -> None:
    host = _probe("kvm" if virt_type == "kvm" and os.access("/dev/kvm", os.W_OK) else "tcg")
    assert host.signature.vendor and host.signature.family > 0
    assert "lm" in host.features and "qemu64" in host.unavailable
