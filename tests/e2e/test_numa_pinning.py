"""Guest NUMA, host pinning, huge pages and a tcp serial console, migrated live (issue 14).

The test guest gets two vCPUs in two NUMA cells (``ram-node0``/``ram-node1``
backends bound to host node 0 by ``<numatune>``), each vCPU pinned to its own
host CPU and the emulator threads to one: after a live peer-to-peer migration
the destination's vCPU threads have the affinity asked for (read from
``/proc/PID/task/TID/status``), and the guest's memory is intact (its
checksums report no bad page). The same with the cells in 2 MiB huge pages,
which the test reserves (``vm.nr_hugepages``, restored afterwards). A
telnet serial port listening on 127.0.0.1 answers on the destination (in its
own network namespace) after the migration. A destination XML that pins to
CPUs the destination lacks is refused in Prepare.
"""

from __future__ import annotations

import re
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until

pytestmark = pytest.mark.e2e

TELNET_PORT = 4555
# vCPU k → host CPU; the emulator threads → EMULATOR, I/O thread 1 → IOTHREAD
# (the host has CPUs 0-1).
VCPU_CPUS = {0: "1", 1: "0"}
EMULATOR = "1"
IOTHREAD = "0"


def _numa_xml(name: str, kernel: Path, virt_type: str, *, hugepages: bool) -> str:
    """The test guest with 2 vCPUs in 2 NUMA cells of 64 MiB, pinned, with a tcp serial."""
    uuid = str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"ferry-test:{name}"))
    xml = guest_xml(name, kernel, virt_type=virt_type, mem_mib=128, prealloc=not hugepages,
                    uuid=uuid,
                    extra_devices=f"""
    <serial type='tcp'><source mode='bind' host='127.0.0.1' service='{TELNET_PORT}'/>
      <protocol type='telnet'/><target port='1'/></serial>""")
    pins = "".join(f"<vcpupin vcpu='{k}' cpuset='{c}'/>" for k, c in VCPU_CPUS.items())
    tunes = (f"<vcpu>2</vcpu><iothreads>1</iothreads><cputune>{pins}"
             f"<emulatorpin cpuset='{EMULATOR}'/>"
             f"<iothreadpin iothread='1' cpuset='{IOTHREAD}'/></cputune>"
             "<numatune><memory mode='strict' nodeset='0'/>"
             "<memnode cellid='1' mode='preferred' nodeset='0'/></numatune>")
    cells = ("<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/>"
             "<cell id='1' cpus='1' memory='64' unit='MiB'/></numa></cpu>")
    xml = xml.replace("<vcpu>1</vcpu>", tunes).replace("</os>", "</os>\n  " + cells)
    if hugepages:
        xml = xml.replace("<devices>", "<memoryBacking><hugepages><page size='2' unit='MiB'/>"
                                       "</hugepages><allocation mode='immediate'/>"
                                       "</memoryBacking>\n  <devices>")
    return xml


def _affinity(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    m = re.search(r"^Cpus_allowed_list:\s*(\S+)$", status, re.MULTILINE)
    assert m is not None, status
    return m.group(1)


def _vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index → thread id of qemu ``pid`` (thread names ``CPU k/KVM``, debug-threads)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        m = re.match(r"CPU (\d+)/", (task / "comm").read_text())
        if m:
            out[int(m.group(1))] = int(task.name)
    return out


def _check_pinned(host: HostEnv) -> int:
    """The host's one qemu has its vCPU and main threads where the XML says; its pid."""
    (pid,) = host.qemu_pids()
    vcpus = _vcpu_threads(pid)
    assert sorted(vcpus) == [0, 1], vcpus
    for k, tid in vcpus.items():
        assert _affinity(pid, tid) == VCPU_CPUS[k], (k, tid)
    assert _affinity(pid, pid) == EMULATOR
    (io,) = (int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()
             if (t / "comm").read_text().strip() == "IO iothread1")
    assert _affinity(pid, io) == IOTHREAD
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"node,nodeid=1,cpus=1,memdev=ram-node1" in argv, argv
    return pid


def _telnet_greeting(host: HostEnv) -> bytes:
    """The first bytes the tcp serial port sends on a connection in ``host``'s namespace."""
    code = (f"import socket,sys;s=socket.create_connection(('127.0.0.1',{TELNET_PORT}),"
            "timeout=10);sys.stdout.buffer.write(s.recv(64))")
    done = subprocess.run(host.ns.exec_argv([sys.executable, "-c", code]),
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _migrate_pinned(cluster: Cluster, xml_text: str, tmp_path: Path, name: str,
                    on_start: Callable[[int], None] = lambda pid: None,
                    before_migrate: Callable[[], None] = lambda: None) -> None:
    """Define, start (``on_start(pid)`` checks more), check, migrate live, check on B."""
    a, b = cluster.a, cluster.b
    cluster.start()
    xml = tmp_path / f"{name}.xml"
    xml.write_text(xml_text)
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", name, check=True)
    serial = testguest.SerialReader(a.serial_socket(name))
    try:
        serial.wait_for_boot(timeout=60)
        on_start(_check_pinned(a))
        # A telnet server opens with IAC (0xff) option negotiation.
        assert _telnet_greeting(a).startswith(b"\xff")
        live = a.ferryctl("dumpxml", name, check=True).stdout
        for part in ("<vcpupin vcpu=\"0\" cpuset=\"1\"/>", "<emulatorpin cpuset=\"1\"/>",
                     "<memnode cellid=\"1\" mode=\"preferred\" nodeset=\"0\"/>",
                     "<cell id=\"1\" cpus=\"1\" memory=\"65536\" unit=\"KiB\"/>",
                     "<protocol type=\"telnet\"/>"):
            assert part in live, live
        before_migrate()
        before = serial.wait_for(lambda r: r.counter >= 1, timeout=60)
        moved = a.ferryctl("migrate", name, b.uri, "--live", "--json", timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state(name) == "running"
        wait_until(lambda: not a.qemu_pids(), timeout=30, what="the source qemu to exit")
        _check_pinned(b)
        assert _telnet_greeting(b).startswith(b"\xff")
        serial.reconnect(b.serial_socket(name))
        after = serial.wait_for(lambda r: r.counter > before.counter + 2, timeout=30)
        assert serial.boot_count == 1 and after.bad_pages == 0
        b.ferryctl("destroy", name, check=True)
    finally:
        serial.close()


def test_numa_pinned_guest_migrates_with_its_pinning(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    xml = _numa_xml("numa1", guest_kernel, virt_type, hugepages=False)

    def refused_where_cpus_lack() -> None:
        # Pinning is the host's (not in the ABI check): a destination XML may
        # pin elsewhere, but not to CPUs the destination does not have.
        elsewhere = tmp_path / "elsewhere.xml"
        elsewhere.write_text(xml.replace(f"<emulatorpin cpuset='{EMULATOR}'/>",
                                          "<emulatorpin cpuset='7'/>"))
        a, b = cluster.a, cluster.b
        moved = a.ferryctl("migrate", "numa1", b.uri, "--live", "--xml", str(elsewhere),
                           timeout=120)
        assert moved.returncode != 0
        assert "<emulatorpin> cpuset '7' names CPU(s) 7, which this host does not have " \
            "online" in moved.stderr, moved.stderr
        assert a.domain_state("numa1") == "running" and b.domain_state("numa1") is None
        assert not b.qemu_pids()

    _migrate_pinned(cluster, xml, tmp_path, "numa1", before_migrate=refused_where_cpus_lack)


_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
_FREE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")


@pytest.fixture
def hugepages() -> Iterator[int]:
    """2 MiB huge pages for two 128 MiB guests (source and destination qemu), reserved."""
    if not _NR_HUGEPAGES.exists() or not _FREE_2M.exists():
        pytest.skip("the kernel has no 2 MiB huge pages")
    old = int(_NR_HUGEPAGES.read_text())
    want = old + 2 * 64 + 8
    try:
        _NR_HUGEPAGES.write_text(str(want))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages: {exc}")
    try:
        if int(_FREE_2M.read_text()) < 2 * 64:
            pytest.skip("the kernel could not reserve enough huge pages (fragmented memory)")
        yield want
    finally:
        _NR_HUGEPAGES.write_text(str(old))


def test_numa_hugepages_guest_migrates(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path, hugepages: int
) -> None:
    free_before = int(_FREE_2M.read_text())

    def in_huge_pages(pid: int) -> None:
        # Preallocated in huge pages: 64 pages (128 MiB) are taken from the pool.
        assert free_before - int(_FREE_2M.read_text()) >= 64
        argv = b" ".join(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))
        assert b"memory-backend-memfd,id=ram-node0,size=67108864,hugetlb=on" in argv, argv

    _migrate_pinned(cluster, _numa_xml("numa2", guest_kernel, virt_type, hugepages=True),
                    tmp_path, "numa2", in_huge_pages)
    # Both qemus are gone: every huge page is back in the pool.
    wait_until(lambda: int(_FREE_2M.read_text()) == free_before, timeout=30,
               what="the huge pages to return to the pool")
