"""Save, restore, managed save and core dumps, with real qemu and the test guest.

The guest's serial reports prove its memory came back: the counter goes on
from where it stopped, no page fails its check (bad_pages == 0), and it
never booted again (boot_count == 1).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

#: Every compressor whose tool is on this machine (raw always).
FORMATS = ["raw"] + [f for f in ("gzip", "bzip2", "xz", "lzop", "zstd") if shutil.which(f)]


def _define(host: HostEnv, tmp: Path, xml: str, name: str = "g1") -> None:
    path = tmp / f"{name}-{host.label}.xml"
    path.write_text(xml)
    host.ferryctl("define", str(path), check=True)


def _fails(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert "Traceback" not in result.stderr


def _resumed(serial: testguest.SerialReader, host: HostEnv, name: str, before: int) -> None:
    """The guest runs again on ``host`` with its memory intact."""
    serial.reconnect(host.serial_socket(name))
    after = serial.wait_for(lambda r: r.counter > before + 3, timeout=30)
    assert after.bad_pages == 0
    assert serial.boot_count == 1, "the guest rebooted instead of resuming"


def _saved(host: HostEnv, name: str, serial: testguest.SerialReader,
           state: str | None = "shut off") -> int:  # fmt: skip
    """The counter last reported before ``name`` went into a file.

    ``state``: what the host says of it then (None: a transient domain is gone).
    """
    last = serial.latest()
    assert last is not None
    wait_until(lambda: not host.qemu_pids(), 10, "qemu to exit after the save")
    assert host.domain_state(name) == state
    return last.counter


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_restore_here_and_there(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path, fmt: str
) -> None:
    a, b = cluster.a, cluster.b
    a.write_config(**{"save.image_format": fmt})
    a.start_agent("source")
    b.start_agent("source")  # raw: B only decompresses (the image says how)
    # Compressible pages (zip) keep xz quick; bzip2 is pathologically slow on
    # their short period (its block sort's worst case), so it gets the default
    # pattern, which it compresses at its usual rate.
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=32,
                                   wss_mib=4, rate_mib_s=4, zip=fmt != "bzip2"))  # fmt: skip
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        image = a.root / f"g1.{fmt}.save"
        saved = a.ctl_json("save", "g1", str(image))
        assert saved["format"] == fmt and saved["was_running"] is True
        before = _saved(a, "g1", serial)
        info = a.ctl_json("save-image-dumpxml", str(image))
        assert info["complete"] is True and info["compression"] == fmt
        assert "<name>g1</name>" in info["xml"]

        # The other host: the file copied into B's tree (B decompresses).
        there = b.root / image.name
        shutil.copyfile(image, there)
        b.ctl_json("restore", str(there))
        assert b.domain_state("g1") == "running"
        _resumed(serial, b, "g1", before)
        there.unlink()
        b.ferryctl("destroy", "g1", check=True)  # transient on B: gone
        wait_until(lambda: not b.qemu_pids(), 10, "qemu to exit on B")

        # The same image on the same host: the guest goes on from the save again.
        restored = a.ctl_json("restore", str(image))
        assert restored["state"] == "running"
        _resumed(serial, a, "g1", before)
        image.unlink()
        if fmt == "raw":
            # --paused wins over the saved state; a restore of a running name is refused.
            image = a.root / "g1.paused.save"
            a.ferryctl("save", "g1", str(image), "--paused", check=True)
            before = _saved(a, "g1", serial)
            assert a.ctl_json("restore", str(image))["state"] == "paused"
            _fails(a.ferryctl("restore", str(image)), "already running", "(domain-state)")
            a.ferryctl("resume", "g1", check=True)
            _resumed(serial, a, "g1", before)
            # save-image-define: an XML that changes the guest's hardware is refused;
            # --paused/--running rewrite the recorded state in place.
            a.ferryctl("save", "g1", str(image), check=True)
            before = _saved(a, "g1", serial)
            xml = a.ctl_json("save-image-dumpxml", str(image))["xml"]
            bigger = re.sub(r'<memory unit="(\w+)">(\d+)</memory>',
                            lambda m: f'<memory unit="{m[1]}">{int(m[2]) * 2}</memory>', xml)
            assert bigger != xml
            (tmp_path / "bigger.xml").write_text(bigger)
            (tmp_path / "same.xml").write_text(xml)
            _fails(a.ferryctl("save-image-define", str(image), str(tmp_path / "bigger.xml")),
                   "memory", "(abi-unstable)")  # fmt: skip
            a.ferryctl("save-image-define", str(image), str(tmp_path / "same.xml"), "--paused",
                       check=True)  # fmt: skip
            assert a.ctl_json("save-image-dumpxml", str(image))["was_running"] is False
            assert a.ctl_json("restore", str(image))["state"] == "paused"
            a.ferryctl("resume", "g1", check=True)
            _resumed(serial, a, "g1", before)
        a.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()


def test_missing_compressor_and_bad_images_are_refused(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    # A format whose tool is missing: refused naming the tool, the guest untouched.
    # The agent's PATH is this one without zstd (a farm of links to the rest).
    farm = tmp_path / "bin"
    farm.mkdir()
    for folder in os.environ.get("PATH", "").split(":"):
        if not os.path.isdir(folder):
            continue
        for entry in os.listdir(folder):
            if entry != "zstd" and not (farm / entry).exists():
                (farm / entry).symlink_to(os.path.join(folder, entry))
    a.agent_env["PATH"] = str(farm)
    a.write_config(**{"save.image_format": "zstd"})
    a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=64))
    a.ferryctl("start", "g1", check=True)
    image = a.root / "g1.save"
    _fails(a.ferryctl("save", "g1", str(image)), "the compressor 'zstd' is not installed",
           "(config-invalid)")  # fmt: skip
    assert not image.exists()
    assert a.domain_state("g1") == "running"
    a.stop_agent("source")
    del a.agent_env["PATH"]
    a.write_config()
    a.start_agent("source")
    # Not a save image; not an absolute path outside the policy.
    junk = a.root / "junk.save"
    junk.write_bytes(b"hello" * 100)
    _fails(a.ferryctl("restore", str(junk)), "not a Ferry save image", "(save-image)")
    _fails(a.ferryctl("save", "g1", "/etc/ferry-test.save"), "outside [storage] allowed",
           "(path-not-allowed)")  # fmt: skip
    assert not Path("/etc/ferry-test.save").exists()
    # A symlink as the last component is not followed.
    link = a.root / "link.save"
    link.symlink_to(a.root / "elsewhere")
    _fails(a.ferryctl("save", "g1", str(link)), "cannot open")
    assert not (a.root / "elsewhere").exists()
    assert a.domain_state("g1") == "running"
    a.ferryctl("destroy", "g1", check=True)


@pytest.mark.parametrize("victim", ["qemu", "agent"])
def test_save_killed_midway_leaves_a_partial_image(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path, victim: str
) -> None:
    a = cluster.a
    a.write_config(**{"testing.faults": ["src.save=stop"]})
    agent = a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=64))
    a.ferryctl("start", "g1", check=True)
    (qemu,) = a.qemu_pids()
    image = a.root / "g1.save"
    save = subprocess.Popen(a.ferryctl_argv("save", "g1", str(image)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        # The agent stops itself at the fault point (qemu's migration started).
        wait_until(lambda: _stopped(agent.pid), 30, "the agent to reach src.save")
        if victim == "qemu":
            subprocess.run(["kill", "-9", str(qemu)], check=True)
            agent.send_signal(signal.SIGCONT)
            out, err = save.communicate(timeout=30)
            assert save.returncode == 1, (out, err)
            assert "left marked partial" in err, err
        else:
            a.stop_agent("source", signal.SIGKILL)
            save.communicate(timeout=30)
            assert save.returncode != 0
            a.write_config()
            a.start_agent("source")
            # The restarted agent settles the interrupted save: the guest runs again.
            wait_until(lambda: a.domain_state("g1") == "running", 30, "g1 to run again")
            assert a.qemu_pids() == [qemu]
            assert a.ctl_json("jobinfo", "g1").get("job") is None
        info = a.ctl_json("save-image-dumpxml", str(image))
        assert info["complete"] is False
        _fails(a.ferryctl("restore", str(image)), "is a partial save image",
               "(save-image-partial)")  # fmt: skip
    finally:
        if save.poll() is None:
            save.kill()
            save.communicate()
        for pid in a.qemu_pids():
            subprocess.run(["kill", "-9", str(pid)], check=False)


def _stopped(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] == "T"


def test_managedsave_then_start_resumes(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=64,
                                   wss_mib=8, rate_mib_s=4))  # fmt: skip
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        a.ferryctl("managedsave", "g1", check=True)
        before = _saved(a, "g1", serial)
        managed = a.state_dir / "save" / "g1.save"
        assert managed.is_file()
        info = a.ctl_json("dominfo", "g1")
        assert info["managed_save"] is True and info["reason"] == "saved"
        result = a.ctl_json("start", "g1")
        assert result.get("restored") is True
        assert not managed.exists()
        _resumed(serial, a, "g1", before)
        # managedsave-remove: the next start boots afresh.
        a.ferryctl("managedsave", "g1", check=True)
        _saved(a, "g1", serial)
        a.ferryctl("managedsave-remove", "g1", check=True)
        assert not managed.exists()
        _fails(a.ferryctl("managedsave-remove", "g1"), "has no managed save image")
        a.ferryctl("start", "g1", check=True)
        serial.reconnect(a.serial_socket("g1"))
        wait_until(lambda: serial.boot_count == 2, 60, "a fresh boot")
        a.ferryctl("destroy", "g1", check=True)
    finally:
        serial.close()


def test_memory_only_dump_has_elf_notes(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    a.start_agent("source")
    _define(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=64))
    a.ferryctl("start", "g1", check=True)
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for(lambda r: r.counter >= 3, timeout=60)
        core = a.root / "g1.core"
        result = a.ctl_json("dump", "g1", str(core), "--memory-only")
        assert result["format"] == "elf" and result["bytes"] > 64 << 20
        header = subprocess.run(["readelf", "-h", str(core)], capture_output=True, text=True,
                                check=True).stdout  # fmt: skip
        assert "CORE (Core file)" in header
        notes = subprocess.run(["readelf", "-n", str(core)], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
        assert "NT_PRSTATUS" in notes, notes
        assert "QEMU" in notes, notes
        # kdump-compressed: qemu 7.2 writes makedumpfile's *flattened* form (it
        # cannot seek in a stream); `makedumpfile -R` turns it into what crash reads.
        kdump = a.root / "g1.kdump"
        a.ferryctl("dump", "g1", str(kdump), "--memory-only", "--format", "kdump-zlib",
                   check=True)  # fmt: skip
        assert kdump.read_bytes()[:12] == b"makedumpfile"
        # The guest carries on after a dump (not --crash).
        last = serial.latest()
        assert last is not None
        after = serial.wait_for(lambda r: r.counter > last.counter + 3, timeout=30)
        assert after.bad_pages == 0 and serial.boot_count == 1
        # A full dump is a save image (complete), and the guest still runs.
        full = a.root / "g1.full"
        a.ferryctl("dump", "g1", str(full), check=True)
        info = a.ctl_json("save-image-dumpxml", str(full))
        assert info["complete"] is True and info["kind"] == "dump"
        assert a.domain_state("g1") == "running"
        a.ferryctl("destroy", "g1", check=True)
        _fails(a.ferryctl("restore", str(full)), "is a core dump", "(save-image)")
        a.ferryctl("start", "g1", check=True)
        # --crash: the domain stops after the dump.
        serial.reconnect(a.serial_socket("g1"))
        serial.wait_for(lambda r: serial.boot_count == 2 and r.counter >= 1, timeout=60)
        a.ferryctl("dump", "g1", str(core), "--memory-only", "--crash", check=True)
        wait_until(lambda: not a.qemu_pids(), 10, "qemu to exit after dump --crash")
    finally:
        serial.close()
