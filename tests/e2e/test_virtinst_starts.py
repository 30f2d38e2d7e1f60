"""virt-install's XML, defined and started by a real agent (issue 14).

Each file of tools/testbed/virtinst_corpus.py that Ferry's parser accepts is
defined with ``ferryctl define`` on host A and started; it counts as started
once ``ferryctl dominfo`` says running and its qemu is up.  There is no OS:
the VM boots from an empty disk (or waits for media), which is enough.  Then
it is destroyed and undefined.  What does not start is listed with the
agent's reason; START_FLOOR is what must keep starting here.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import virtinst_corpus as vc

from cluster import Cluster, HostEnv, wait_until

pytestmark = pytest.mark.e2e

#: Accepted by define but cannot start on this test bed, and why.  Not an
#: assertion (they may start elsewhere); the test prints what it met.
CANNOT_START_HERE = {
    "win10": "Hyper-V enlightenments: this nested KVM cannot set MSR 0x40000021",
}

#: Configurations that start on this test bed today: a regression fails.
START_FLOOR = tuple(n for n in vc.DEFINE_FLOOR if n not in CANNOT_START_HERE)


def _try(host: HostEnv, xml: Path, name: str) -> tuple[str, str]:
    """Define and start ``name``: ("yes", "") or ("no"/"define", the reason)."""
    result = host.ferryctl("define", str(xml))
    if result.returncode != 0:
        return "define", result.stderr.strip()
    try:
        result = host.ferryctl("start", name, timeout=60)
        if result.returncode != 0:
            return "no", result.stderr.strip()
        wait_until(lambda: host.domain_state(name) == "running", 20, f"{name} running")
        # Still so a moment later: the guest's CPUs ran (firmware, no OS).
        time.sleep(0.5)
        if host.domain_state(name) != "running" or not host.qemu_pids():
            return "no", f"stopped right after the start:\n{host.agent_log('source')[-800:]}"
        return "yes", ""
    finally:
        host.ferryctl("destroy", name)
        host.ferryctl("undefine", name, check=True)
        wait_until(lambda: not host.qemu_pids(), 20, f"qemu of {name} to exit")


def test_virtinst_configs_define_and_start(cluster: Cluster, tmp_path: Path) -> None:
    reason = vc.available()
    if reason:
        pytest.skip(reason)
    corpus = vc.generate(tmp_path / "corpus")  # within the test bed's storage policy
    rows = vc.survey(corpus.files)
    a = cluster.a
    # virt-install's NICs (network='default', bridge=br0) on a bridge of host A.
    subprocess.run(a.ns.exec_argv(["ip", "link", "add", "br0", "type", "bridge"]), check=True)
    a.write_config(**{"networks.default.bridge": "br0"})
    a.start_agent("source")
    started: dict[str, str] = {}
    why: dict[str, str] = {}
    for row in rows:
        xml = corpus.root / f"{row.name}.xml"
        if row.status == "accepted":
            started[row.name], why[row.name] = _try(a, xml, row.name)
            continue
        # What a user sees: ferryctl refuses it as the survey did, in words.
        result = a.ferryctl("define", str(xml))
        assert result.returncode == 1, (row.name, result.stdout, result.stderr)
        assert "(xml-unsupported)" in result.stderr or "(xml-invalid)" in result.stderr, (
            row.name, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        assert a.domain_state(row.name) is None, f"{row.name} was defined after all"

    print("\n" + vc.format_table(rows, started))
    for name, text in why.items():
        if text:
            known = CANNOT_START_HERE.get(name)
            print(f"{name}: {started[name]}: {text}" + (f"\n    (known: {known})" if known else ""))
    # Every refusal is a Ferry message, not a traceback.
    for name, text in why.items():
        assert "Traceback" not in text, f"{name}: {text}"
        if started[name] != "yes":
            assert text, f"{name} did not start and nobody said why"
    lost = [n for n in START_FLOOR if started.get(n) != "yes"]
    assert not lost, {n: why.get(n, "not accepted by define") for n in lost}
    new = sorted(n for n, s in started.items() if s == "yes" and n not in START_FLOOR)
    if new:
        print(f"now start (add them to virtinst_corpus.DEFINE_FLOOR): {' '.join(new)}")
    summary = {"generated": len(rows), "define": len(started),
               "start": sum(s == "yes" for s in started.values())}  # fmt: skip
    print(json.dumps(summary))
