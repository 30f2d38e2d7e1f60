"""Controlling a migration: disk I/O errors, jobinfo and tuning a running migration.

Two namespace hosts, real qemu, real TLS, as in test_migration.py (whose
helpers these tests reuse).

Real I/O errors: the guest's disk variant (``testguest.build(variant="disk")``,
``disk=1`` on its command line) writes one sector to its IDE disk after every
report, each to a new 4 KiB block of the image.  The image lives on a small
tmpfs of its own; filling that file system makes the guest's next write fail
in qemu with ENOSPC, and with ``error_policy='stop'`` qemu pauses the VM with
run state ``io-error`` (and a ``BLOCK_IO_ERROR`` event).  Freeing the space
and resuming lets qemu re-issue the failed write, which then succeeds: the
guest never sees the error (``disk_errors`` stays 0) and keeps counting.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_migration import assert_moved, define_and_start, events, migrate, refused

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

MIB = 1 << 20
IO_ERROR_REFUSAL = (
    "cannot migrate domain 'g1': it is paused after an I/O error and --abort-on-error was given"
)
NO_MIGRATION = "no migration is running for domain 'g1'"


# -- helpers --------------------------------------------------------------------


class SmallFS:
    """A private tmpfs holding the guest's disk image; ``fill()`` makes it full."""

    def __init__(self, size_mib: int = 16) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="fy-disk-"))
        self.path.chmod(0o755)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "ferry-test", self.path],
            check=True,
            capture_output=True,
        )
        self.filler = self.path / "filler"

    def image(self, name: str = "disk.img", size_mib: int = 64) -> Path:
        """A sparse raw image (bigger than the file system: blocks are allocated on write)."""
        path = self.path / name
        with path.open("wb") as f:
            f.truncate(size_mib * MIB)
        return path

    def fill(self) -> None:
        """Take every free block: the next allocating write gets ENOSPC."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            # The guest allocates blocks too: all that is free at once, and
            # when it took some in between, block by block to the end.
            one_block = False
            while st := os.statvfs(self.path):
                if not st.f_bavail:
                    return
                size = st.f_frsize if one_block else st.f_bavail * st.f_frsize
                try:
                    os.posix_fallocate(fd, os.fstat(fd).st_size, size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    one_block = True
        finally:
            os.close(fd)

    def free(self) -> None:
        """Give the space back."""
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        # Lazy: qemu processes of a failed test may still hold the image
        # until the cluster fixture has killed them.
        subprocess.run(["umount", "-l", self.path], check=False, capture_output=True)
        with contextlib.suppress(OSError):
            self.path.rmdir()


@pytest.fixture
def small_fs() -> Iterator[SmallFS]:
    """Set up before (so torn down after) the cluster, whose qemu use the image."""
    if os.geteuid() != 0:
        pytest.skip("end-to-end tests need root")
    fs = SmallFS()
    try:
        yield fs
    finally:
        fs.close()


@dataclass
class DiskGuest:
    serial: testguest.SerialReader
    fs: SmallFS


def disk_guest_xml(kernel: Path, virt_type: str, image: Path, **kw: Any) -> str:
    """The disk variant of the test guest with an IDE disk that stops the VM on errors."""
    disk = (
        "<disk type='file' device='disk'>"
        "<driver name='qemu' type='raw' cache='none' error_policy='stop'/>"
        f"<source file='{image}'/><target dev='hda' bus='ide'/></disk>"
    )
    return guest_xml(
        "g1", kernel, virt_type=virt_type, extra_devices=disk, cmdline_extra="disk=1", **kw
    )


@pytest.fixture
def disk_guest(
    small_fs: SmallFS, cluster: Cluster, virt_type: str, tmp_path: Path
) -> Iterator[DiskGuest]:
    """g1 on host A writing a sector to its IDE disk (on ``small_fs``) every report."""
    cluster.start()
    kernel = testguest.build(variant="disk")
    define_and_start(cluster.a, tmp_path, disk_guest_xml(kernel, virt_type, small_fs.image()))
    serial = testguest.SerialReader(cluster.a.serial_socket("g1"))
    try:
        boot = serial.wait_for_boot(timeout=60)
        assert boot.disk_every == 1, boot.raw
        serial.wait_for(lambda r: r.counter >= 2 and r.disk_writes >= 2, timeout=60)
        yield DiskGuest(serial, small_fs)
    finally:
        serial.close()


def state(host: HostEnv, name: str = "g1") -> tuple[str, str | None]:
    """(state, reason) as ``ferryctl dominfo`` reports them."""
    info = host.ctl_json("dominfo", name)
    return info["state"], info.get("reason")


def wait_io_error_pause(host: HostEnv, timeout: float = 30) -> None:
    """Wait until the domain is paused on an I/O error."""
    wait_until(
        lambda: state(host) == ("paused", "io-error"),
        timeout,
        f"g1 on {host.label} to pause on EIO",
    )


def assert_guest_resumed(guest: DiskGuest, host: HostEnv, checksum: int) -> None:
    """After ``resume`` the guest's failed write went through and it carries on intact."""
    serial = guest.serial
    before = serial.latest()
    assert before is not None
    host.ferryctl("resume", "g1", check=True)
    after = serial.wait_for(
        lambda r: r.counter > before.counter + 3 and r.disk_writes > before.disk_writes + 2,
        timeout=30,
    )
    assert state(host) == ("running", None)
    assert serial.boot_count == 1, "the guest rebooted"
    assert after.bad_pages == 0
    assert after.checksum == checksum
    # qemu re-issued the write that had failed: the guest never saw an error.
    assert after.disk_errors == 0, after.raw


def assert_nothing_on(host: HostEnv, name: str = "g1") -> None:
    """No qemu, no incoming job and no status files left on ``host``."""
    wait_until(lambda: not host.qemu_pids(), 15, f"no qemu left on {host.label}")
    listed = host.ctl_json("list", agent="destination")
    assert listed in ({"domains": []}, []), listed
    leftovers = list((host.run_dir / "domains").glob(f"{name}.*"))
    assert leftovers == [], leftovers


def ferryctl_argv(host: HostEnv, *args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "ferryctl"), "--connect", str(host.source_socket),
            *args]  # fmt: skip


def transferred(host: HostEnv) -> int:
    return int(host.ctl_json("jobinfo", "g1").get("transferred") or 0)


class QMP:
    """A tiny synchronous QMP client for a monitor no agent is using.

    Each qemu has one monitor per agent (``qmp/NAME.source.sock`` and
    ``qmp/NAME.destination.sock``); on the host a domain was started on, the
    destination agent leaves its monitor alone, so a test can read qemu's
    view there while ferry-source drives the migration on the other one.
    """

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw", encoding="utf-8")
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise AssertionError(f"QMP {command}: {reply['error']}")
            # an event: skip

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def migration_parameters(host: HostEnv, name: str = "g1") -> dict[str, Any]:
    """qemu's own migration parameters, read on the idle destination-agent monitor."""
    with QMP(host.run_dir / "qmp" / f"{name}.destination.sock") as qmp:
        params: dict[str, Any] = qmp.execute("query-migrate-parameters")
        return params


# -- I/O errors -------------------------------------------------------------------


def test_io_error_pause_refused_with_abort_on_error_allowed_without(
    disk_guest: DiskGuest, cluster: Cluster
) -> None:
    a, b = cluster.a, cluster.b
    serial = disk_guest.serial
    checksum = serial.wait_for(lambda r: r.sweeps >= 1, timeout=30).checksum
    # The file system fills up: the guest's next write fails, qemu pauses it.
    disk_guest.fs.fill()
    wait_io_error_pause(a)
    paused_at = serial.latest()
    assert paused_at is not None and paused_at.disk_errors == 0

    # libvirt's rule: with --abort-on-error such a domain is refused ...
    result = migrate(a, "g1", b, "--abort-on-error")
    refused(result, "migration-refused")
    assert f"error: {IO_ERROR_REFUSAL} (migration-refused)" in result.stderr.splitlines()
    assert_nothing_on(b)
    assert len(a.qemu_pids()) == 1
    assert state(a) == ("paused", "io-error")
    assert a.ctl_json("jobinfo", "g1")["job"] is None

    # ... and without it, it migrates (the disk is still full).
    result = migrate(a, "g1", b)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert events(result)[-1]["event"] == "result"
    assert a.qemu_pids() == [], "qemu still running on the source"
    assert len(b.qemu_pids()) == 1
    assert a.domain_state("g1") in (None, "shut off")
    # It arrives paused: libvirt leaves a domain that was paused paused on the
    # destination; and had B started its CPUs, the re-issued write would have
    # failed again there (io-error).
    assert b.domain_state("g1") == "paused"
    serial.reconnect(b.serial_socket("g1"))
    # Space again: resuming on B re-issues the failed write, which succeeds.
    disk_guest.fs.free()
    assert_guest_resumed(disk_guest, b, checksum)


def test_io_error_pause_refused_in_begin(disk_guest: DiskGuest, cluster: Cluster) -> None:
    """libvirt refuses in Begin (qemuMigrationSrcIsAllowed): the destination is
    never asked to prepare, so no qemu is started there for nothing."""
    a, b = cluster.a, cluster.b
    disk_guest.fs.fill()
    wait_io_error_pause(a)
    result = migrate(a, "g1", b, "--abort-on-error")
    refused(result, "migration-refused", IO_ERROR_REFUSAL)
    phases = [e["data"]["phase"] for e in events(result) if e["event"] == "phase"]
    assert phases == ["begin"], phases
    assert "prepare: receiving" not in b.agent_log("destination")


def test_paused_on_io_error_stays_paused_on_destination(
    disk_guest: DiskGuest, cluster: Cluster
) -> None:
    """libvirt: a domain paused when the migration starts is left paused on the
    destination (it adds VIR_MIGRATE_PAUSED).  Here the disk has space again
    before the migration, so if B started the CPUs, the guest would just run."""
    a, b = cluster.a, cluster.b
    disk_guest.fs.fill()
    wait_io_error_pause(a)
    disk_guest.fs.free()
    result = migrate(a, "g1", b)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert len(b.qemu_pids()) == 1
    assert b.domain_state("g1") == "paused"


@pytest.mark.multipass
def test_io_error_during_migration_with_abort_on_error_cancels(
    disk_guest: DiskGuest, cluster: Cluster
) -> None:
    a, b = cluster.a, cluster.b
    serial = disk_guest.serial
    checksum = serial.wait_for(lambda r: r.sweeps >= 1, timeout=30).checksum
    # Capped so that it is still copying when the disk error comes.
    argv = ferryctl_argv(a, "migrate", "g1", b.uri, "--live", "--json", "--abort-on-error",
                         "--bandwidth", "16")  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: transferred(a) > 4 * MIB, 60, "the transfer to get going")
        assert len(b.qemu_pids()) == 1, "no incoming qemu on B mid-transfer"
        disk_guest.fs.fill()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    assert "(migration-failed)" in err, err
    assert "migration aborted: the guest hit an I/O error (" in err, err
    assert "and --abort-on-error was given" in err, err
    assert "Traceback" not in err
    phases = [e["data"]["phase"] for e in events_of(out) if e["event"] == "phase"]
    assert phases == ["begin", "prepare", "perform", "finish", "confirm"], phases

    # The VM stayed on A, paused on the error; B has nothing left.
    assert_nothing_on(b)
    assert len(a.qemu_pids()) == 1
    wait_io_error_pause(a)
    assert a.ctl_json("jobinfo", "g1")["job"] is None
    # Space again: resume on A, the write goes through, the guest is intact ...
    disk_guest.fs.free()
    assert_guest_resumed(disk_guest, a, checksum)
    # ... and a second migration (uncapped) succeeds.
    result = migrate(a, "g1", b)
    assert result.returncode == 0, result.stderr + cluster.logs()
    assert_moved(cluster, serial)
    last = serial.latest()
    assert last is not None
    after = serial.wait_for(lambda r: r.disk_writes > last.disk_writes + 2, timeout=30)
    assert after.disk_errors == 0


def events_of(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# -- jobinfo, migrate-setspeed, migrate-setmaxdowntime ------------------------------


@pytest.fixture
def dirtying_guest(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> Iterator[testguest.SerialReader]:
    """g1 on A rewriting 32 MiB at 200 MiB/s: with qemu's default 300 ms
    downtime limit it never converges at the bandwidths used here."""
    cluster.start()
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type, mem_mib=128, wss_mib=32,
                    rate_mib_s=200)  # fmt: skip
    define_and_start(cluster.a, tmp_path, xml)
    serial = testguest.SerialReader(cluster.a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 2 and r.sweeps >= 1, timeout=60)
        yield serial
    finally:
        serial.close()


def throughput(host: HostEnv, amount: int) -> float:
    """Bytes/s of the migration while it moves (at least) ``amount`` more bytes,
    by jobinfo's ``transferred`` over its ``elapsed_s`` (both taken by the agent,
    so ferryctl's own start-up time does not count)."""

    def progress() -> tuple[int, float]:
        info = host.ctl_json("jobinfo", "g1")
        return int(info.get("transferred") or 0), float(info["elapsed_s"])

    x0, t0 = progress()

    def moved() -> tuple[int, float] | None:
        x, t = progress()
        return (x, t) if x >= x0 + amount else None

    x1, t1 = wait_until(moved, 60, f"{amount / MIB:.0f} MiB more to be sent")
    return (x1 - x0) / (t1 - t0)


@pytest.mark.multipass
def test_jobinfo_setspeed_setmaxdowntime_during_migration(
    dirtying_guest: testguest.SerialReader, cluster: Cluster
) -> None:
    a, b = cluster.a, cluster.b
    serial = dirtying_guest
    # Nothing to tune while no migration runs.
    refused(a.ferryctl("migrate-setspeed", "g1", "64"), "job", NO_MIGRATION)
    refused(a.ferryctl("migrate-setmaxdowntime", "g1", "2000"), "job", NO_MIGRATION)
    assert a.ctl_json("jobinfo", "g1") == {"job": None}
    assert "Job type:       None" in a.ferryctl("jobinfo", "g1", check=True).stdout

    argv = ferryctl_argv(a, "migrate", "g1", b.uri, "--live", "--json", "--bandwidth", "16")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: transferred(a) > 4 * MIB, 60, "the transfer to get going")
        # jobinfo: what job, which phase, how far, and the accounting figures.
        info = a.ctl_json("jobinfo", "g1")
        assert info["job"] == "migration-out", info
        assert info["phase"] == "perform", info
        assert info["status"] == "active", info
        assert len(info["migration_id"]) == 32, info
        assert info["elapsed_s"] > 0, info
        assert 4 * MIB < info["transferred"] < info["total"], info
        assert 0 < info["remaining"] < info["total"], info
        assert info["total"] >= 120 * MIB, info
        for key in ("bandwidth", "dirty_rate", "iteration", "throttle_pct", "converging",
                    "predicted_downtime_s", "expected_downtime_ms"):  # fmt: skip
            assert key in info, (key, info)
        assert 8 * MIB < info["bandwidth"] < 24 * MIB, info
        text = a.ferryctl("jobinfo", "g1", check=True).stdout
        for label in ("Job:", "Phase:", "Transferred:", "Remaining:", "Total:", "Bandwidth:"):
            assert any(line.startswith(label) for line in text.splitlines()), (label, text)
        assert "migration-out" in text and "perform" in text

        # qemu's own parameters, as ferry-source set them for --bandwidth 16.
        params = migration_parameters(a)
        assert params["max-bandwidth"] == 16 * MIB, params
        assert params["downtime-limit"] == 300, params
        slow = throughput(a, 24 * MIB)
        assert 10 * MIB < slow < 22 * MIB, slow / MIB

        # migrate-setspeed: qemu's max-bandwidth changes, and so does the pace.
        result = a.ferryctl("migrate-setspeed", "g1", "48", check=True)
        assert "48 MiB/s" in result.stdout, result.stdout
        assert migration_parameters(a)["max-bandwidth"] == 48 * MIB
        fast = throughput(a, 48 * MIB)
        print(f"jobinfo: {info}\nthroughput 16 MiB/s cap: {slow / MIB:.1f} MiB/s, "
              f"48 MiB/s cap: {fast / MIB:.1f} MiB/s")  # fmt: skip
        assert fast > 32 * MIB, (slow / MIB, fast / MIB)
        assert proc.poll() is None, "the migration ended before its downtime limit was raised"

        # migrate-setmaxdowntime: qemu's downtime-limit changes; with 2 s the
        # 32 MiB working set fits in the switchover and the migration finishes.
        result = a.ferryctl("migrate-setmaxdowntime", "g1", "2000", check=True)
        assert "2000 ms" in result.stdout, result.stdout
        assert migration_parameters(a)["downtime-limit"] == 2000
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err + cluster.logs()
    progress = [e["data"] for e in events_of(out) if e["event"] == "progress"]
    assert progress, out
    assert events_of(out)[-1]["event"] == "result"
    assert_moved(cluster, serial)
    # And nothing to tune any more.
    refused(b.ferryctl("migrate-setspeed", "g1", "64"), "job", NO_MIGRATION)


def listening_tcp_ports(host: HostEnv) -> set[int]:
    """TCP ports listening in ``host``'s namespace."""
    out = subprocess.run(host.ns.exec_argv(["ss", "-Hltn"]), capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.split()}


def test_spice_clients_are_told_where_the_guest_went(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """The destination's SPICE port and address come back in the cookie and the
    source hands them to qemu (client_migrate_info). The guest listens on the
    wildcard address, so B advertises the address A reached it on."""
    a, b = cluster.a, cluster.b
    cluster.start()
    spice = "<graphics type='spice' port='5930' autoport='no' listen='0.0.0.0'/>"
    define_and_start(a, tmp_path, guest_xml("g1", guest_kernel, virt_type=virt_type,
                                            extra_devices=spice))  # fmt: skip
    serial = testguest.SerialReader(a.serial_socket("g1"))
    try:
        serial.wait_for_boot(timeout=60)
        serial.wait_for(lambda r: r.counter >= 2, timeout=60)
        assert 5930 in listening_tcp_ports(a)
        result = migrate(a, "g1", b)
        assert result.returncode == 0, result.stderr + cluster.logs()
        assert_moved(cluster, serial)
        assert 5930 in listening_tcp_ports(b), "no SPICE server on B"
        log = a.agent_log("source")
        assert f"spice clients told to follow to {b.ns.address}:5930" in log, log
    finally:
        serial.close()
