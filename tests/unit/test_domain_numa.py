"""Guest NUMA cells, ``<numatune>``, ``<cputune>`` pinning and tcp serials (issue 14).

Parse (every problem of a file at once), format (nothing dropped), ABI
(cells are guest visible, placement and pinning are not), the qemu argv
(``ram-nodeN`` backends, ``host-nodes``/``policy``, huge pages per cell,
the host's nodes) and the pin plan (sans-I/O), plus pinning real threads
of this process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from virtinst_corpus import dropped

import ferry.domain._argv_numa as numa_mod
import ferry.domain.argv as argv_mod
from ferry.domain import (
    RuntimePaths,
    check_abi_stability,
    format_domain,
    parse_domain,
    to_qemu_argv,
)
from ferry.domain._numa import format_cpuset, parse_cpuset
from ferry.domain.model import Domain
from ferry.errors import ABIError, QemuLaunchError, XMLError, XMLUnsupported
from ferry.pinning import apply_pinning, check_host_cpus, pin_plan, pin_sets

PATHS = RuntimePaths(Path("/run/ferry/serial/vm"), Path("/run/ferry/q.sock"),
                     Path("/run/ferry/vm.pid"))

TWO_CELLS = """<cpu mode='host-model'><topology sockets='2' dies='1' cores='2' threads='1'/>
    <numa>
      <cell id='0' cpus='0-1' memory='1048576' unit='KiB'/>
      <cell id='1' cpus='2-3' memory='1048576' unit='KiB' memAccess='shared' discard='yes'/>
    </numa></cpu>"""


def dom(*, extra: str = "", top: str = "", devices: str = "", vcpu: str = "<vcpu>4</vcpu>",
        memory: str = "<memory unit='KiB'>2097152</memory>") -> str:
    return f"""<domain type='kvm'>
  <name>vm</name>
  <uuid>00000000-0000-0000-0000-0000000000bb</uuid>
  {memory}
  {vcpu}
  {top}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  {extra}
  <devices>{devices}</devices>
</domain>
"""


def round_trip(text: str) -> Domain:
    d = parse_domain(text, where="t.xml")
    out = format_domain(d)
    again = parse_domain(out, where="formatted")
    assert again == d
    assert format_domain(again) == out
    assert dropped(text, out) == ([], []), out
    check_abi_stability(d, again)
    return d


def refused(text: str, cls: type[XMLError] = XMLError) -> XMLError:
    with pytest.raises(cls) as info:
        parse_domain(text, where="t.xml")
    return info.value


def argv_of(d: Domain) -> list[str]:
    return to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)


@pytest.fixture(autouse=True)
def _host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with NUMA nodes 0-1 and plenty of 2 MiB huge pages."""
    monkeypatch.setattr(numa_mod, "host_numa_nodes", lambda: frozenset({0, 1}))
    monkeypatch.setattr(argv_mod, "_default_hugepage_kib", lambda: 2048)
    monkeypatch.setattr(argv_mod, "_free_hugepages", lambda kib: 4096)


# -- cpusets -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "numbers", "normal"), [
    ("0", {0}, "0"),
    ("0-3,^2,8", {0, 1, 3, 8}, "0-1,3,8"),
    (" 4 , 1-2 ", {1, 2, 4}, "1-2,4"),
    ("0-7,^2-5", {0, 1, 6, 7}, "0-1,6-7"),
])
def test_cpuset_parse_and_format(text: str, numbers: set[int], normal: str) -> None:
    assert parse_cpuset(text) == numbers
    assert format_cpuset(parse_cpuset(text)) == normal


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"), ("^0", "names no CPU"), ("3-1", "backwards"), ("a", "not a number"),
    ("1,,2", "not a number"), ("8192", "larger than 8191"), ("0-", "not a number"),
])
def test_cpuset_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_cpuset(text)


# -- parse and format ------------------------------------------------------------------


def test_two_cells_round_trip() -> None:
    d = round_trip(dom(extra=TWO_CELLS))
    assert d.cpu is not None
    c0, c1 = d.cpu.numa
    assert (c0.id, c0.cpus, c0.memory_kib, c0.mem_access, c0.discard) == \
        (0, "0-1", 1048576, None, None)
    assert (c1.id, c1.cpus, c1.memory_kib, c1.mem_access, c1.discard) == \
        (1, "2-3", 1048576, "shared", True)


def test_numatune_and_cputune_round_trip() -> None:
    d = round_trip(dom(extra=TWO_CELLS, top="""<iothreads>2</iothreads>
  <cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='3' cpuset='0'/>
    <emulatorpin cpuset='0-1'/><iothreadpin iothread='2' cpuset='1'/></cputune>
  <numatune><memory mode='interleave' nodeset='0-1'/>
    <memnode cellid='1' mode='preferred' nodeset='1'/></numatune>"""))
    assert d.cputune is not None and d.numatune is not None
    assert d.cputune.vcpupins == ((0, "1"), (3, "0")) and d.cputune.emulatorpin == "0-1"
    assert d.cputune.iothreadpins == ((2, "1"),)
    assert (d.numatune.mode, d.numatune.nodeset) == ("interleave", "0-1")
    assert d.numatune.memnodes[0].cellid == 1 and d.numatune.memnodes[0].mode == "preferred"
    # cpusets are kept normalised, as libvirt's dumpxml writes them.
    d = parse_domain(dom(top="<cputune><vcpupin vcpu='3' cpuset='1,0-1,^1'/></cputune>"))
    assert d.cputune is not None and d.cputune.vcpupins == ((3, "0"),)


def test_corpus_hugepages_numa_shape() -> None:
    """virt-install's hugepages-numa: one cell, numatune strict, vcpupin, huge pages."""
    d = round_trip(dom(vcpu="<vcpu>2</vcpu>", top="""<memoryBacking><hugepages/></memoryBacking>
  <numatune><memory mode='strict' nodeset='0'/></numatune>""",
                       extra="""<cpu mode='host-model'><numa>
      <cell id='0' cpus='0-1' memory='2097152' unit='KiB'/></numa></cpu>
  <cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/></cputune>"""))
    argv = " ".join(argv_of(d))
    assert ("-object memory-backend-memfd,id=ram-node0,size=2147483648,hugetlb=on,"
            "hugetlbsize=2097152,host-nodes=0,policy=bind "
            "-numa node,nodeid=0,cpus=0-1,memdev=ram-node0 -m 2048") in argv
    assert "memory-backend=" not in argv  # with cells there is no machine RAM backend


def test_cell_problems_are_all_reported() -> None:
    err = refused(dom(memory="<memory unit='GiB'>3</memory>", extra="""<cpu><numa>
      <cell id='1' cpus='0-1' memory='1' unit='GiB'/>
      <cell id='1' cpus='1-5' memory='1' unit='GiB'/>
      <cell cpus='x' memory='1' unit='GiB'/>
      <cell id='3' cpus='3'/>
    </numa></cpu>"""))
    text = str(err)
    for part in ("cell id 1 is out of order", "cell 1 names vCPU 5, but there are only 4",
                 "vCPUs 1 of cell 1 are already in cell 0", "invalid cell cpus 'x'",
                 "<cell> needs memory"):
        assert part in text, text


def test_cells_must_cover_vcpus_and_memory() -> None:
    err = refused(dom(extra="<cpu><numa><cell id='0' cpus='0-2' memory='1048576'/></numa></cpu>"))
    assert "vCPUs 3 are in no NUMA cell (<vcpu> is 4)" in str(err)
    err = refused(dom(extra="""<cpu><numa><cell id='0' cpus='0-1' memory='1048576'/>
      <cell id='1' cpus='2-3' memory='524288'/></numa></cpu>"""))
    assert ("the NUMA cells have 1048576 + 524288 = 1572864 KiB of memory, but <memory> "
            "is 2097152 KiB") in str(err)
    assert err.details["element"] == "domain/cpu/numa"


def test_numatune_problems() -> None:
    err = refused(dom(extra=TWO_CELLS, top="""<numatune><memory placement='auto'/>
      <memnode cellid='2' nodeset='0'/><memnode cellid='0'/>
      <memnode cellid='1' mode='bogus' nodeset='0'/></numatune>"""))
    text = str(err)
    for part in ("placement='auto' needs numad", "<memnode cellid='2'> names no guest NUMA cell",
                 "<memnode> needs a nodeset", "memnode mode 'bogus' is not supported"):
        assert part in text, text
    err = refused(dom(top="<numatune><memnode cellid='0' nodeset='0'/></numatune>"))
    assert "<memnode> needs guest NUMA cells" in str(err)
    err = refused(dom(top="<numatune><memory mode='strict'/></numatune>"))
    assert "<memory> needs a nodeset" in str(err)


def test_cputune_problems() -> None:
    err = refused(dom(top="""<cputune><vcpupin vcpu='4' cpuset='0'/><vcpupin vcpu='0'/>
      <vcpupin vcpu='1' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/>
      <emulatorpin cpuset='z'/><iothreadpin iothread='1' cpuset='0'/></cputune>"""))
    text = str(err)
    for part in ("<vcpupin vcpu='4'> names no vcpu (<vcpu> is 4)", "<vcpupin> needs a cpuset",
                 "vcpu 1 is pinned twice", "invalid cpuset 'z'",
                 "<iothreadpin iothread='1'> names no iothread (<iothreads> is 0)"):
        assert part in text, text
    # Cgroup and scheduler settings are not made: refused by name.
    for child in ("<shares>1024</shares>", "<period>1000</period>", "<quota>-1</quota>",
                  "<vcpusched vcpus='0' scheduler='fifo' priority='1'/>"):
        err = refused(dom(top=f"<cputune>{child}</cputune>"), XMLUnsupported)
        assert str(err.details["element"]).startswith("domain/cputune/")


# -- ABI -----------------------------------------------------------------------------------


def test_abi_compares_cells_not_placement() -> None:
    d = parse_domain(dom(extra=TWO_CELLS, top="""<cputune><vcpupin vcpu='0' cpuset='1'/>
      </cputune><numatune><memory nodeset='0'/></numatune>"""))
    assert d.cpu is not None
    # Placement and pinning are the host's: a destination may differ.
    check_abi_stability(d, dataclasses.replace(d, cputune=None, numatune=None))
    c0, c1 = d.cpu.numa
    moved = dataclasses.replace(d, cpu=dataclasses.replace(
        d.cpu, numa=(dataclasses.replace(c0, cpus="0"), dataclasses.replace(c1, cpus="1-3"))))
    with pytest.raises(ABIError, match="NUMA cell 0 cpus differs: 0-1 vs 0"):
        check_abi_stability(d, moved)
    one = dataclasses.replace(d, cpu=dataclasses.replace(d.cpu, numa=(c0,)))
    with pytest.raises(ABIError, match="NUMA cell count differs: 2 vs 1"):
        check_abi_stability(d, one)
    shared = dataclasses.replace(d, cpu=dataclasses.replace(
        d.cpu, numa=(c0, dataclasses.replace(c1, mem_access=None, discard=None))))
    check_abi_stability(d, shared)


# -- argv ----------------------------------------------------------------------------------


def test_two_cells_argv() -> None:
    d = parse_domain(dom(extra=TWO_CELLS, top="""<numatune>
      <memory mode='interleave' nodeset='0-1'/><memnode cellid='1' mode='restrictive'
      nodeset='1'/></numatune><memoryBacking><allocation mode='immediate'/></memoryBacking>"""))
    argv = argv_of(d)
    joined = " ".join(argv)
    assert ("-object memory-backend-ram,id=ram-node0,size=1073741824,prealloc=on,"
            "host-nodes=0-1,policy=interleave") in joined
    # memAccess='shared' shares the cell; restrictive binds (module docstring).
    assert ("-object memory-backend-ram,id=ram-node1,size=1073741824,share=on,prealloc=on,"
            "host-nodes=1,policy=bind") in joined
    assert ("-numa node,nodeid=0,cpus=0-1,memdev=ram-node0 "
            "-numa node,nodeid=1,cpus=2-3,memdev=ram-node1 -m 2048") in joined
    assert "memory-backend=" not in joined


def test_cell_cpus_with_several_ranges_and_host_nodes() -> None:
    d = parse_domain(dom(top="<numatune><memory nodeset='0,1'/></numatune>", extra="""<cpu><numa>
      <cell id='0' cpus='0,2' memory='1' unit='GiB'/>
      <cell id='1' cpus='1,3' memory='1' unit='GiB'/></numa></cpu>"""))
    joined = " ".join(argv_of(d))
    assert "-numa node,nodeid=0,cpus=0,cpus=2,memdev=ram-node0" in joined
    assert "host-nodes=0-1,policy=bind" in joined
    d = parse_domain(dom(top="<numatune><memory nodeset='0,4-5'/></numatune>", extra="""<cpu>
      <numa><cell cpus='0-3' memory='2' unit='GiB'/></numa></cpu>"""))
    with pytest.raises(QemuLaunchError, match=r"<numatune><memory> nodeset '0,4-5' names host "
                                              r"NUMA node\(s\) 4-5, which this host does not "
                                              r"have \(its nodes: 0-1\)"):
        argv_of(d)


def test_numatune_without_cells_places_pc_ram() -> None:
    d = parse_domain(dom(top="<numatune><memory mode='preferred' nodeset='1'/></numatune>"))
    joined = " ".join(argv_of(d))
    assert "-object memory-backend-ram,id=pc.ram,size=2147483648,host-nodes=1,policy=preferred" \
        in joined
    assert "memory-backend=pc.ram" in joined
    d = parse_domain(dom(top="<numatune><memory nodeset='2'/></numatune>"))
    with pytest.raises(QemuLaunchError, match="names host NUMA node"):
        argv_of(d)


def test_hugepage_cells_must_be_whole_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    d = parse_domain(dom(memory="<memory unit='MiB'>3</memory>", vcpu="<vcpu>2</vcpu>",
                         top="<memoryBacking><hugepages/></memoryBacking>", extra="""<cpu><numa>
      <cell cpus='0' memory='2' unit='MiB'/><cell cpus='1' memory='1' unit='MiB'/></numa></cpu>"""))
    with pytest.raises(QemuLaunchError, match="ram-node1 of 1 MiB is not a whole number of "
                                              "2048 KiB pages"):
        argv_of(d)
    monkeypatch.setattr(argv_mod, "_free_hugepages", lambda kib: 1)
    with pytest.raises(QemuLaunchError, match="the guest needs 2 huge pages"):
        argv_of(d)


# -- tcp serial ------------------------------------------------------------------------------


def test_tcp_serial_and_console() -> None:
    d = round_trip(dom(devices="""
    <serial type='tcp'><source mode='bind' host='127.0.0.1' service='4555'/>
      <protocol type='telnet'/></serial>
    <serial type='tcp'><source host='::1' service='4556'/></serial>
    <console type='tcp'><source mode='connect' host='peer.example' service='23'/>
      <protocol type='raw'/><target type='serial' port='2'/></console>"""))
    telnet, raw = d.serials
    assert (telnet.host, telnet.service, telnet.source_mode, telnet.protocol) == \
        ("127.0.0.1", 4555, "bind", "telnet")
    assert (raw.source_mode, raw.protocol) == ("connect", "raw")  # libvirt's defaults
    joined = " ".join(argv_of(d))
    assert ("-chardev socket,id=charserial0,host=127.0.0.1,port=4555,server=on,wait=off,"
            "telnet=on -device isa-serial,chardev=charserial0,id=serial0,index=0") in joined
    assert "-chardev socket,id=charserial1,host=::1,port=4556,reconnect=1 " in joined
    assert "-chardev socket,id=charconsole0,host=peer.example,port=23,reconnect=1" in joined
    # The host side may differ on a destination.
    check_abi_stability(d, dataclasses.replace(
        d, serials=(dataclasses.replace(telnet, service=5000), raw)))


def test_tcp_serial_problems() -> None:
    err = refused(dom(devices="""
    <serial type='tcp'><source mode='listen' host='bad host' path='/x'/></serial>
    <serial type='tcp'><source host='h' service='0'/><protocol type='tls'/></serial>"""))
    text = str(err)
    for part in ("socket mode 'listen' is not supported", "path does not apply to a tcp serial",
                 "<source> needs host and service", "service 0 is out of range",
                 "serial protocol 'tls' is not supported"):
        assert part in text, text


# -- pinning (sans-I/O plan, host check, real threads) -----------------------------------------


def _pinned(extra_top: str, vcpu: str = "<vcpu>4</vcpu>") -> Domain:
    return parse_domain(dom(vcpu=vcpu, top=extra_top))


def test_pin_plan() -> None:
    d = _pinned("""<iothreads>2</iothreads><cputune><vcpupin vcpu='1' cpuset='3'/>
      <emulatorpin cpuset='0'/><iothreadpin iothread='1' cpuset='2'/></cputune>""",
                vcpu="<vcpu placement='static' cpuset='4-5'>2</vcpu>")
    plan = pin_plan(pin_sets(d), vcpu_tids={0: 100, 1: 101}, iothread_tids={1: 110, 2: 111},
                    all_tids=[90, 91, 100, 101, 110, 111])
    assert plan == [
        (90, {0}), (91, {0}),  # emulator threads first: emulatorpin
        (110, {2}), (111, {4, 5}),  # iothread 2 has no pin: <vcpu cpuset>
        (100, {4, 5}), (101, {3}),  # vCPU 0 has no pin: <vcpu cpuset>
    ]
    # Without <vcpu cpuset> and emulatorpin, unpinned threads are left alone.
    d = _pinned("<cputune><vcpupin vcpu='2' cpuset='1'/></cputune>")
    sets = pin_sets(d)
    assert sets.emulator is None and not sets.empty
    assert pin_plan(sets, vcpu_tids={0: 10, 2: 12}, iothread_tids={}, all_tids=[9, 10, 12]) == \
        [(12, {1})]
    # <vcpu cpuset> alone pins everything, the emulator too (libvirt's default).
    d = _pinned("", vcpu="<vcpu cpuset='1'>1</vcpu>")
    assert pin_plan(pin_sets(d), vcpu_tids={0: 10}, iothread_tids={}, all_tids=[9, 10]) == \
        [(9, {1}), (10, {1})]
    assert pin_sets(_pinned("")).empty


def test_check_host_cpus() -> None:
    d = _pinned("""<cputune><vcpupin vcpu='0' cpuset='0-3'/><vcpupin vcpu='1' cpuset='1'/>
      <emulatorpin cpuset='6'/></cputune>""", vcpu="<vcpu cpuset='1-2'>4</vcpu>")
    with pytest.raises(QemuLaunchError) as info:
        check_host_cpus(d, frozenset({0, 1}))
    assert str(info.value) == (
        "domain vm: <vcpu cpuset> cpuset '1-2' names CPU(s) 2; <vcpupin vcpu='0'> cpuset '0-3' "
        "names CPU(s) 2-3; <emulatorpin> cpuset '6' names CPU(s) 6, which this host does not "
        "have online (its CPUs: 0-1); pin to CPUs of this host")
    check_host_cpus(d, frozenset(range(8)))
    with pytest.raises(QemuLaunchError, match="names no CPU"):
        check_host_cpus(_pinned("", vcpu="<vcpu cpuset='^0'>1</vcpu>"), frozenset({0}))


class _FakeQmp:
    def __init__(self, replies: Mapping[str, Any]) -> None:
        self.replies = replies
        self.asked: list[str] = []

    async def execute(self, cmd: str, args: Mapping[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:  # fmt: skip
        self.asked.append(cmd)
        return self.replies[cmd]


def _affinity(tid: int) -> str:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines()
                if line.startswith("Cpus_allowed_list"))


def test_apply_pinning_pins_real_threads() -> None:
    online = sorted(os.sched_getaffinity(0))
    target = online[-1]
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait, daemon=True)
    worker.start()
    before = os.sched_getaffinity(0)
    try:
        tid = worker.native_id
        assert tid is not None
        everything = format_cpuset(set(online))
        d = _pinned(f"<cputune><vcpupin vcpu='0' cpuset='{target}'/>"
                    f"<emulatorpin cpuset='{everything}'/></cputune>", vcpu="<vcpu>1</vcpu>")
        qmp = _FakeQmp({"query-cpus-fast": [{"cpu-index": 0, "thread-id": tid}]})
        plan = asyncio.run(apply_pinning(d, os.getpid(), qmp))
        assert (tid, {target}) in plan and qmp.asked == ["query-cpus-fast"]
        assert _affinity(tid) == str(target)
        # A thread id that is not the process's is refused, not pinned.
        qmp = _FakeQmp({"query-cpus-fast": [{"cpu-index": 0, "thread-id": 1}]})
        with pytest.raises(QemuLaunchError, match="not a thread of pid"):
            asyncio.run(apply_pinning(d, os.getpid(), qmp))
    finally:
        stop.set()
        worker.join()
        os.sched_setaffinity(0, before)
