"""A guest with an emulated TPM 2.0 starts with its swtpm and migrates live with the TPM's state.

What virt-install ``--tpm emulator`` writes (``<tpm model='tpm-crb'|'tpm-tis'>
<backend type='emulator' version='2.0'/>``, and a TPM 1.2 on tpm-tis) on the
test guest (SeaBIOS, which initialises the TPM and extends its PCRs at boot). On host A the first
start manufactures the TPM (``swtpm_setup``: random seeds) and a swtpm serves
it; after the live migration B's swtpm holds the *same* TPM — its permanent
state file equals A's byte for byte and differs from a TPM manufactured
afresh — the guest counts on with its memory intact, and A has neither qemu
nor swtpm left. The state follows libvirt's rules: A keeps it (a persistent
definition) until undefine, B drops it when the transient guest ends.

Where qemu runs in a systemd scope, its swtpm joins that scope (systemd's
``AttachProcessesToUnit``, through ``busctl``); systemd is not PID 1 here, so
stand-ins for ``systemd-run`` and ``busctl`` record what the agent asks.

A destination whose swtpm dies during Prepare fails the migration cleanly:
the guest keeps running on A, and B is left with no qemu, no swtpm and no
state directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faults import proc_state, thaw, wait_frozen
from standins import write_systemd_run

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

UUID = "6a1f6c0e-58f4-4bfb-9d7b-5a3c2f1e0b11"


def _swtpm_pids(host: HostEnv) -> list[int]:
    """swtpm processes (not zombies) in ``host``'s namespace."""
    out = []
    for pid in host.ns.pids():
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if os.path.basename(exe) == "swtpm" and proc_state(pid) not in (None, "Z", "X"):
            out.append(pid)
    return out


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if proc_state(p) not in (None, "Z", "X")]


def _state_dir(host: HostEnv, version: str = "2.0") -> Path:
    return host.state_dir / "swtpm" / UUID / ("tpm2" if version == "2.0" else "tpm1.2")


def _permall(host: HostEnv, version: str = "2.0") -> bytes:
    name = "tpm2-00.permall" if version == "2.0" else "tpm-00.permall"
    return (_state_dir(host, version) / name).read_bytes()


def _xml(
    name: str, kernel: Path, virt_type: str, machine: str, model: str, version: str = "2.0"
) -> str:
    tpm = f"<tpm model='{model}'><backend type='emulator' version='{version}'/></tpm>"
    text = guest_xml(name, kernel, virt_type=virt_type, uuid=UUID, extra_devices=tpm)
    return text.replace("machine='pc'", f"machine='{machine}'")


def _fresh_tpm(tmp_path: Path, version: str) -> bytes:
    """The permanent state of a TPM manufactured now, as Ferry's first start does."""
    state = tmp_path / "fresh"
    state.mkdir()
    subprocess.run(
        [
            "swtpm_setup",
            *(["--tpm2"] if version == "2.0" else []),
            "--tpm-state",
            str(state),
            "--createek",
            "--not-overwrite",
            "--logfile",
            str(tmp_path / "fresh.log"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return (state / ("tpm2-00.permall" if version == "2.0" else "tpm-00.permall")).read_bytes()


@pytest.mark.parametrize(
    ("machine", "model", "version", "mode"),
    [
        ("pc", "tpm-tis", "2.0", "p2p"),
        ("q35", "tpm-crb", "2.0", "tunnelled"),
        ("pc", "tpm-tis", "1.2", "p2p"),
    ],
)
def test_tpm_state_moves_with_the_guest(
    cluster: Cluster,
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
    machine: str,
    model: str,
    version: str,
    mode: str,
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / "t1.xml"
    xml.write_text(_xml("t1", guest_kernel, virt_type, machine, model, version))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "t1", check=True)
    serial = testguest.SerialReader(a.serial_socket("t1"))
    try:
        serial.wait_for_boot(timeout=60)
        # One swtpm, on a 0700 state directory manufactured at this first start.
        a_swtpm = _swtpm_pids(a)
        assert len(a_swtpm) == 1, a_swtpm
        assert _state_dir(a, version).stat().st_mode & 0o777 == 0o700
        live = a.ferryctl("dumpxml", "t1", check=True).stdout
        assert f'<tpm model="{model}">' in live and f'version="{version}"' in live, live
        a_qemu = a.qemu_pids()

        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        args = ["migrate", "t1", b.uri, "--live", "--json"]
        if mode == "tunnelled":
            args.append("--tunnelled")
        moved = a.ferryctl(*args, timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state("t1") == "running"
        serial.reconnect(b.serial_socket("t1"))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0

        # A's qemu and swtpm are gone; B runs one swtpm.
        wait_until(
            lambda: not _alive(a_qemu) and not _alive(a_swtpm), 10, "A's qemu and swtpm to exit"
        )
        assert _swtpm_pids(a) == []
        b_swtpm = _swtpm_pids(b)
        assert len(b_swtpm) == 1, b_swtpm
        # The TPM itself moved: B's state is A's, not some new TPM's.
        assert _permall(b, version) == _permall(a, version)
        assert _permall(b, version) != _fresh_tpm(tmp_path, version)

        # B's guest is transient: its TPM state goes with it.
        b.ferryctl("destroy", "t1", check=True)
        wait_until(lambda: not _alive(b_swtpm), 10, "B's swtpm to exit")
        assert not (b.state_dir / "swtpm" / UUID).exists()
        # A keeps its state for its persistent definition, until undefine.
        assert _state_dir(a, version).is_dir()
        a.ferryctl("undefine", "t1", check=True)
        assert not (a.state_dir / "swtpm" / UUID).exists()
    finally:
        serial.close()


def test_swtpm_lost_during_prepare_fails_the_migration_cleanly(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    b.write_config(**{"testing.faults": ["dst.prepare=stop"]})
    cluster.start()
    xml = tmp_path / "t2.xml"
    xml.write_text(_xml("t2", guest_kernel, virt_type, "q35", "tpm-crb"))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "t2", check=True)
    serial = testguest.SerialReader(a.serial_socket("t2"))
    migrate: subprocess.Popen[str] | None = None
    frozen: int | None = None
    try:
        serial.wait_for_boot(timeout=60)
        migrate = subprocess.Popen(
            a.ns.exec_argv(a.ferryctl_argv("migrate", "t2", b.uri, "--live")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # B's incoming qemu and its swtpm run; Prepare has not answered yet.
        frozen = wait_frozen(b, "destination", 60, also=migrate)
        b_swtpm = _swtpm_pids(b)
        assert len(b_swtpm) == 1, b_swtpm
        assert _state_dir(b).is_dir()
        os.kill(b_swtpm[0], signal.SIGKILL)
        wait_until(lambda: not _alive(b_swtpm), 10, "B's swtpm to die")
        thaw(frozen)
        frozen = None
        _, err = migrate.communicate(timeout=300)
        # B's qemu exits when it cannot hand the TPM's state to a swtpm. Which
        # side notices first is a race: the source's qemu (its stream broke:
        # "the migration failed"), or Finish on B, which then names the cause.
        assert migrate.returncode != 0, err
        assert ("incoming qemu exited" in err and "tpm-emulator" in err) or (
            "qemu reports the migration failed" in err), err
        # The guest still runs on A, counting, its memory intact.
        assert a.domain_state("t2") == "running", cluster.logs()
        mark = serial.wait_for(lambda r: r.counter >= 1, timeout=30)
        later = serial.wait_for(lambda r: r.counter > mark.counter + 2, timeout=30)
        assert later.bad_pages == 0 and serial.boot_count == 1
        assert len(_swtpm_pids(a)) == 1
        # B has nothing left of it: no qemu, no swtpm, no state it created.
        wait_until(
            lambda: not b.qemu_pids() and not _swtpm_pids(b), 30, "B's qemu and swtpm to be gone"
        )
        wait_until(
            lambda: not (b.state_dir / "swtpm" / UUID).exists(),
            30,
            "B to remove the TPM state it created",
        )
        a.ferryctl("destroy", "t2", check=True)
        assert _swtpm_pids(a) == []
    finally:
        if frozen is not None:
            thaw(frozen)
        if migrate is not None and migrate.poll() is None:
            migrate.kill()
            migrate.wait()
        serial.close()


_BUSCTL = """#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "busctl.jsonl"), "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def test_swtpm_joins_its_qemus_scope(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    bindir = a.root / "standin"
    bindir.mkdir()
    write_systemd_run(bindir)
    busctl = bindir / "busctl"
    busctl.write_text(_BUSCTL.format(python=sys.executable))
    busctl.chmod(0o755)
    a.write_config(**{"qemu.cgroup": "scope"})
    a.agent_env = {**a.agent_env, "PATH": f"{bindir}:{os.environ['PATH']}"}
    cluster.start()
    xml = tmp_path / "t3.xml"
    xml.write_text(_xml("t3", guest_kernel, virt_type, "q35", "tpm-crb"))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "t3", check=True)
    runs = [json.loads(line) for line in (bindir / "calls.jsonl").read_text().splitlines()]
    assert len(runs) == 1
    unit = next(x.split("=", 1)[1] for x in runs[0]["argv"] if x.startswith("--unit="))
    swtpm = _swtpm_pids(a)
    assert len(swtpm) == 1, swtpm
    calls = [json.loads(line) for line in (bindir / "busctl.jsonl").read_text().splitlines()]
    assert calls == [["call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                      "org.freedesktop.systemd1.Manager", "AttachProcessesToUnit", "ssau",
                      unit, "", "1", str(swtpm[0])]]  # fmt: skip
    a.ferryctl("destroy", "t3", check=True)
    wait_until(lambda: not _alive(swtpm), 10, "the swtpm to end with its qemu")
