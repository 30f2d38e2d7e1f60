"""A virtiofs share starts with its virtiofsd, refuses migration, leaves nothing (issue 14).

A KVM test guest with ``<filesystem type='mount'><driver type='virtiofs'/>``
sharing a temp directory, with shared guest RAM (``<memoryBacking><source
type='memfd'/><access mode='shared'/>``, what virt-install writes): it starts
with one virtiofsd on that directory, connected to qemu's vhost-user-fs-pci
device; ``ferryctl migrate`` is refused by the source in Begin naming the
filesystem, and the guest runs on; destroy leaves no virtiofsd. virtiofsd
ends with its qemu by itself (its vhost-user connection closes): checked by
killing qemu under the agent; it outlives an agent restart. A start
without shared memory is refused with libvirt's reason, and no virtiofsd
is left.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
from pathlib import Path

import pytest
from faults import proc_state

import testguest
from cluster import Cluster, guest_xml, wait_until

pytestmark = pytest.mark.e2e

SHARED = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


def _xml(name: str, kernel: Path, virt_type: str, share: Path, *, shared: bool = True) -> str:
    fs = (f"<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>"
          f"<source dir='{share}'/><target dir='hostshare'/></filesystem>")
    text = guest_xml(name, kernel, virt_type=virt_type, wss_mib=4, prealloc=False,
                     extra_devices=fs)
    return text.replace("</memory>", "</memory>" + SHARED, 1) if shared else text


def _virtiofsd_pids(share: Path) -> list[int]:
    """virtiofsd processes (not zombies) serving ``share``, in any namespace.

    virtiofsd's sandbox puts it in network and mount namespaces of its own,
    so it is not among the host's namespace's processes.
    """
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            argv = _cmdline(pid)
        except OSError:
            continue
        if (os.path.basename(exe).startswith("virtiofsd") and f"source={share}" in argv
                and proc_state(pid) not in (None, "Z", "X")):
            out.append(pid)
    return out


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _top(share: Path) -> int:
    """The one virtiofsd the agent started for ``share`` (its sandbox child aside)."""
    pids = _virtiofsd_pids(share)
    tops = [p for p in pids if _ppid(p) not in pids]
    assert len(tops) == 1, pids
    return tops[0]


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def test_virtiofs_starts_refuses_migration_and_leaves_nothing(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hi\n")
    xml = tmp_path / "v1.xml"
    xml.write_text(_xml("v1", guest_kernel, virt_type, share))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", "v1", check=True)
    serial = testguest.SerialReader(a.serial_socket("v1"))
    try:
        serial.wait_for_boot(timeout=60)
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        vfsd = _top(share)
        assert f"source={share}" in _cmdline(vfsd)
        (qemu,) = a.qemu_pids()
        argv = _cmdline(qemu)
        sock = a.serial_socket("v1").parent / "virtiofs" / "fs0.sock"
        assert f"socket,id=chr-vu-fs0,path={sock}" in argv, argv
        assert any(x.startswith("vhost-user-fs-pci,id=fs0,chardev=chr-vu-fs0,tag=hostshare,")
                   for x in argv), argv
        live = a.ferryctl("dumpxml", "v1", check=True).stdout
        assert f'<source dir="{share}"/>' in live and '<target dir="hostshare"/>' in live, live

        refused = a.ferryctl("migrate", "v1", b.uri, "--live", timeout=120)
        assert refused.returncode != 0, refused.stdout + cluster.logs()
        assert "(migration-refused)" in refused.stderr, refused.stderr + cluster.logs()
        assert str(share) in refused.stderr and "'hostshare'" in refused.stderr, refused.stderr
        assert b.qemu_pids() == [] and b.domain_state("v1") is None
        assert a.domain_state("v1") == "running"
        serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=60)
        assert _top(share) == vfsd

        # An agent restart leaves virtiofsd serving its guest (it is no asyncio child).
        a.stop_agent("source")
        a.start_agent("source")
        assert a.domain_state("v1") == "running" and _top(share) == vfsd
        serial.wait_for(lambda r: r.counter > before.counter + 4, timeout=60)

        a.ferryctl("destroy", "v1", check=True)
        wait_until(lambda: not _virtiofsd_pids(share), timeout=15, what="virtiofsd gone")
        assert not sock.exists()

        # virtiofsd ends with its qemu by itself: qemu killed under the agent.
        a.ferryctl("start", "v1", check=True)
        vfsd = _top(share)
        (qemu,) = a.qemu_pids()
        pidfd = os.pidfd_open(vfsd)
        try:
            os.kill(qemu, signal.SIGKILL)
            exited, _, _ = select.select([pidfd], [], [], 15)
            assert exited, "virtiofsd outlived its qemu"
        finally:
            os.close(pidfd)
        wait_until(lambda: a.domain_state("v1") != "running", timeout=30, what="v1 stopped")
        assert "killed virtiofsd" not in a.agent_log("source")
        assert not _virtiofsd_pids(share)
    finally:
        serial.close()


def test_virtiofs_without_shared_memory_is_refused(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    cluster.start()
    share = tmp_path / "share"
    share.mkdir()
    xml = tmp_path / "v2.xml"
    xml.write_text(_xml("v2", guest_kernel, virt_type, share, shared=False))
    # Refused at define already (it could never start), with what to add.
    defined = a.ferryctl("define", str(xml))
    assert defined.returncode == 1, defined.stdout + cluster.logs()
    assert "shared guest memory" in defined.stderr, defined.stderr
    assert "'hostshare'" in defined.stderr and "access mode='shared'" in defined.stderr
    assert a.domain_state("v2") is None
    assert a.qemu_pids() == [] and not _virtiofsd_pids(share)


def test_virtiofsd_is_stopped_when_qemu_fails_to_start(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    """A qemu that fails to start leaves no virtiofsd (nor its socket) behind."""
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    failing = tmp_path / "qemu-fails"
    # The agent's probes run the real qemu; a guest's launch (-daemonize) fails.
    failing.write_text("#!/bin/sh\ncase \" $* \" in *' -daemonize '*) "
                       "echo 'test: qemu refuses to start' >&2; exit 1;; esac\n"
                       f"exec {real} \"$@\"\n")
    failing.chmod(0o755)
    a = cluster.a
    a.extra_config["qemu.binary"] = str(failing)
    a.write_config()
    cluster.start()
    share = tmp_path / "share"
    share.mkdir()
    xml = tmp_path / "v3.xml"
    xml.write_text(_xml("v3", guest_kernel, virt_type, share))
    a.ferryctl("define", str(xml), check=True)
    started = a.ferryctl("start", "v3", timeout=60)
    assert started.returncode != 0, started.stdout + cluster.logs()
    assert "virtiofsd pid" in a.agent_log("source"), cluster.logs()
    assert a.qemu_pids() == [] and not _virtiofsd_pids(share)
    assert a.domain_state("v3") == "shut off", started.stderr
    assert not list((a.serial_socket("v3").parent / "virtiofs").glob("*.sock"))
