"""The q35/i440fx controller tree and PCI addresses on any bus (issue 14).

What virt-install writes (unnumbered pcie-root-ports), what ``virsh
dumpxml`` shows (every controller numbered and addressed, every device on a
root port), libvirt's own files: parsed, formatted back, built into a qemu
argv with the same addresses, started in a real qemu whose PCI tree is
read back and migrated live into a second qemu (which refuses the stream
of a different tree); the cross-checks name what is wrong; the ABI check names a
different tree.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import pytest
from lxml import etree
from test_domain_argv import (
    _QMP,
    QEMU,
    _corpus_dir,
    _host_ready,
    _launched,
    _short_tmp,
    needs_qemu,
)

from ferry.domain import RuntimePaths, parse_domain, to_qemu_argv
from ferry.domain.abi import check_abi_stability
from ferry.domain.format import format_domain
from ferry.domain.model import Address, Controller, Domain
from ferry.errors import ABIError, XMLError, XMLUnsupported

HERE = Path(__file__).resolve().parent
DUMPXML = HERE / "golden" / "domain" / "q35-dumpxml-root-ports.xml"
LIBVIRT = _corpus_dir()
PATHS = RuntimePaths(Path("/run/ferry/chardev/t"), Path("/run/ferry/qmp/t.sock"),
                     Path("/run/ferry/pid/t.pid"))


def dom(devices: str, machine: str = "q35", virt: str = "qemu") -> str:
    return (f"<domain type='{virt}'><name>t</name>"
            "<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid><memory unit='MiB'>64</memory>"
            f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>"
            f"<devices>{devices}</devices></domain>")


def devices(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def device(argv: list[str], ident: str) -> str:
    found = [d for d in devices(argv) if re.search(rf"(^|,)id={re.escape(ident)}(,|$)", d)]
    assert len(found) == 1, (ident, devices(argv))
    return found[0]


def refused(text: str, cls: type[XMLError] = XMLError) -> list[dict[str, object]]:
    with pytest.raises(cls) as info:
        parse_domain(text, where="t.xml")
    problems: list[dict[str, object]] = info.value.details["problems"]
    return problems


# virt-install --print-xml for a q35 guest: the tree as it writes it.
ROOT_PORTS = "<controller type='pci' model='pcie-root'/>" + \
    "<controller type='pci' model='pcie-root-port'/>" * 14


def test_virt_install_root_ports_get_indexes_and_libvirt_layout() -> None:
    d = parse_domain(dom("<controller type='usb' model='qemu-xhci' ports='15'/>" + ROOT_PORTS
                         + "<disk type='file'><source file='/i.qcow2'/><target dev='vda'/>"
                           "</disk>"))
    pci = [c for c in d.controllers if c.type == "pci"]
    assert [(c.index, c.model) for c in pci] == [(0, "pcie-root")] + [
        (i, "pcie-root-port") for i in range(1, 15)]
    argv = to_qemu_argv(d, paths=PATHS)
    # libvirt's packing: functions 0..7 of slot 2, then slot 3; port = slot << 3 | function.
    assert device(argv, "pci.1") == \
        "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2,multifunction=on"
    assert device(argv, "pci.8") == \
        "pcie-root-port,port=0x17,chassis=8,id=pci.8,bus=pcie.0,addr=0x2.0x7"
    assert device(argv, "pci.9") == \
        "pcie-root-port,port=0x18,chassis=9,id=pci.9,bus=pcie.0,addr=0x3,multifunction=on"
    assert device(argv, "pci.14") == \
        "pcie-root-port,port=0x1d,chassis=14,id=pci.14,bus=pcie.0,addr=0x3.0x5"
    # Devices without addresses stay on the root bus, in slots the ports left free.
    assert device(argv, "usb").endswith("bus=pcie.0,addr=0x1")
    assert device(argv, "virtio-disk0").endswith("bus=pcie.0,addr=0x4")
    # The root ports come first: every later device finds its bus.
    assert devices(argv)[:14] == [device(argv, f"pci.{i}") for i in range(1, 15)]
    # The indexes are written back (libvirt's define does the same).
    again = parse_domain(format_domain(d))
    assert again == d
    assert format_domain(d).count("model=\"pcie-root-port\"") == 14


def test_dumpxml_tree_builds_the_same_addresses() -> None:
    d = parse_domain(DUMPXML.read_bytes())
    ports = {c.index: c for c in d.controllers if c.model == "pcie-root-port"}
    assert (ports[1].model_name, ports[1].chassis, ports[1].port) == ("pcie-root-port", 1, 0x10)
    argv = to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)
    assert device(argv, "pci.1") == \
        "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2,multifunction=on"
    assert device(argv, "pci.10") == \
        "pcie-root-port,port=0x19,chassis=10,id=pci.10,bus=pcie.0,addr=0x3.0x1"
    assert device(argv, "pci.11") == "pcie-pci-bridge,id=pci.11,bus=pci.10,addr=0x0"
    assert device(argv, "pci.12") == "pci-bridge,chassis_nr=12,id=pci.12,bus=pci.11,addr=0x1"
    assert device(argv, "usb").endswith(",bus=pci.2,addr=0x0")
    assert device(argv, "virtio-serial0").endswith(",bus=pci.3,addr=0x0")
    assert device(argv, "virtio-disk0").endswith(",bus=pci.4,addr=0x0")
    assert device(argv, "balloon0").endswith(",bus=pci.5,addr=0x0")
    assert device(argv, "rng0").endswith(",bus=pci.6,addr=0x0")
    assert device(argv, "scsi0") == "virtio-scsi-pci,num_queues=2,id=scsi0,bus=pci.7,addr=0x0"
    assert device(argv, "net0").endswith(",bus=pci.1,addr=0x0")
    assert device(argv, "net1").endswith(",bus=pci.12,addr=0x3")
    assert device(argv, "video0").endswith(",bus=pcie.0,addr=0x1")
    assert not any(x.startswith("ahci") for x in devices(argv))  # q35's SATA is built in
    # Parents before children: each bus exists when a device names it.
    made = {"pcie.0"}
    for spec in devices(argv):
        bus = re.search(r"(?:^|,)bus=([^,]+)", spec)
        if bus and bus.group(1).startswith("pci"):
            assert bus.group(1) in made, spec
        ident = re.search(r"(?:^|,)id=(pci\.\d+)", spec)
        if ident:
            made.add(ident.group(1))


def _paths_and_attrs(tree: etree._Element) -> list[str]:
    out = []
    for el in tree.iter():
        if isinstance(el.tag, str):
            path = "/".join(str(a.tag) for a in [*el.iterancestors()][::-1]) + "/" + str(el.tag)
            out += [f"{path}@{k}={v}" for k, v in el.attrib.items()]
    return out


def test_dumpxml_round_trip_keeps_every_attribute() -> None:
    text = DUMPXML.read_bytes()
    d = parse_domain(text)
    formatted = format_domain(d)
    assert parse_domain(formatted) == d and format_domain(parse_domain(formatted)) == formatted
    parser = etree.XMLParser(remove_comments=True)
    got = _paths_and_attrs(etree.fromstring(formatted.encode(), parser))
    missing = [a for a in _paths_and_attrs(etree.fromstring(text, parser))
               if "controller" in a or "address" in a if a not in got]
    assert not missing, missing


def test_libvirt_ich9_usb_companions() -> None:
    # libvirt's usb-redir.xml: ich9-ehci1 with its three uhci companions (one index).
    src = etree.parse(str(LIBVIRT / "b-unsupported" / "usb-redir.xml")).getroot()
    ctls = "".join(etree.tostring(c, encoding="unicode") for c in src.iter("controller"))
    d = parse_domain(dom(ctls + "<input type='tablet' bus='usb'/>", machine="pc"))
    usb = [c for c in d.controllers if c.type == "usb"]
    assert [(c.model, c.master_startport) for c in usb] == [
        ("ich9-ehci1", None), ("ich9-uhci1", 0), ("ich9-uhci2", 2), ("ich9-uhci3", 4)]
    argv = to_qemu_argv(d, paths=PATHS)
    usb_devs = [x for x in devices(argv) if x.startswith("ich9")]
    assert usb_devs == [
        "ich9-usb-ehci1,id=usb,bus=pci.0,addr=0x4.0x7",
        "ich9-usb-uhci1,masterbus=usb.0,firstport=0,bus=pci.0,addr=0x4,multifunction=on",
        "ich9-usb-uhci2,masterbus=usb.0,firstport=2,bus=pci.0,addr=0x4.0x1",
        "ich9-usb-uhci3,masterbus=usb.0,firstport=4,bus=pci.0,addr=0x4.0x2",
    ]
    assert parse_domain(format_domain(d)) == d
    # Without addresses the group shares one slot, as libvirt places it.
    bare = re.sub(r"<address[^>]*/>", "", ctls)
    argv = to_qemu_argv(parse_domain(dom(bare, machine="pc")), paths=PATHS)
    assert [x.split(",bus=")[1] for x in devices(argv) if x.startswith("ich9")] == [
        "pci.0,addr=0x2.0x7", "pci.0,addr=0x2,multifunction=on", "pci.0,addr=0x2.0x1",
        "pci.0,addr=0x2.0x2"]


def test_libvirt_pc_builtin_controllers_keep_their_functions() -> None:
    d = parse_domain((LIBVIRT / "a-supported-ish" / "disk-virtio.x86_64-latest.xml").read_bytes())
    argv = to_qemu_argv(d, paths=PATHS)
    assert device(argv, "usb") == "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x1.0x2"
    assert device(argv, "virtio-disk0").endswith("bus=pci.0,addr=0x2")


def test_pc_pci_bridge_and_automatic_placement_around_explicit_addresses() -> None:
    d = parse_domain(dom(
        "<controller type='pci' index='0' model='pci-root'/>"
        "<controller type='pci' model='pci-bridge'/>"
        "<disk type='file'><source file='/a'/><target dev='vda'/>"
        "<address type='pci' bus='0x01' slot='0x05'/></disk>"
        "<disk type='file'><source file='/b'/><target dev='vdb'/>"
        "<address type='pci' slot='0x03'/></disk>"
        "<disk type='file'><source file='/c'/><target dev='vdc'/></disk>"
        "<interface type='user'><address type='pci' slot='0x04' function='0x1'/></interface>"
        "<interface type='user'><address type='pci' slot='0x04'/></interface>",
        machine="pc"))
    argv = to_qemu_argv(d, paths=PATHS)
    assert device(argv, "pci.1") == "pci-bridge,chassis_nr=1,id=pci.1,bus=pci.0,addr=0x2"
    assert device(argv, "virtio-disk0").endswith("bus=pci.1,addr=0x5")
    assert device(argv, "virtio-disk1").endswith("bus=pci.0,addr=0x3")
    # Slots 2 (the bridge), 3 and 4 (explicit) are taken: the automatic one gets 5.
    assert device(argv, "virtio-disk2").endswith("bus=pci.0,addr=0x5")
    # Function 0 of a slot with more functions is made multifunction.
    assert device(argv, "net1").endswith("bus=pci.0,addr=0x4,multifunction=on")
    assert device(argv, "net0").endswith("bus=pci.0,addr=0x4.0x1")


def test_root_ports_skip_slots_explicit_addresses_take() -> None:
    d = parse_domain(dom(
        "<controller type='pci' index='1' model='pcie-root-port'/>"
        "<controller type='pci' index='2' model='pcie-root-port'/>"
        "<interface type='user'><address type='pci' slot='0x02'/></interface>"))
    argv = to_qemu_argv(d, paths=PATHS)
    assert device(argv, "pci.1").endswith("id=pci.1,bus=pcie.0,addr=0x3,multifunction=on")
    assert device(argv, "pci.2") == \
        "pcie-root-port,port=0x19,chassis=2,id=pci.2,bus=pcie.0,addr=0x3.0x1"


# -- cross-checks ------------------------------------------------------------------------


def messages(problems: list[dict[str, object]]) -> list[str]:
    return [str(p["message"]) for p in problems]


def test_every_tree_problem_is_named_with_what_to_do() -> None:
    text = dom(
        "<controller type='pci' index='0' model='pcie-root'/>"
        "<controller type='pci' index='1' model='pcie-root-port'/>"
        "<controller type='pci' index='2' model='pcie-root-port'>"
        "<target chassis='1'/></controller>"
        "<controller type='pci' index='3' model='pcie-root-port'>"
        "<address type='pci' bus='0x01' slot='0x00'/></controller>"
        "<controller type='pci' index='4' model='pci-bridge'>"
        "<address type='pci' bus='0x04' slot='0x01'/></controller>"
        "<controller type='sata' index='0'><address type='pci' slot='0x05'/></controller>"
        "<disk type='file'><source file='/a'/><target dev='vda'/>"
        "<address type='pci' bus='0x07' slot='0x00'/></disk>"
        "<disk type='file'><source file='/b'/><target dev='vdb'/>"
        "<address type='pci' bus='0x01' slot='0x00'/></disk>"
        "<disk type='file'><source file='/c'/><target dev='vdc'/>"
        "<address type='pci' bus='0x02' slot='0x01'/></disk>"
        "<interface type='user'><address type='pci' slot='0x1f' function='0x3'/></interface>")
    problems = refused(text)
    got = messages(problems)
    assert "the pci address of virtio disk vda names bus 0x07, which does not exist (the buses " \
           "are 0 (pcie-root), 1 (pcie-root-port), 2 (pcie-root-port), 3 (pcie-root-port), " \
           "4 (pci-bridge))" in got
    assert "pci address bus 0x01 slot 0x00 function 0 is used by both virtio disk vdb and " \
           "pci controller 3" in got
    assert "pci controller 3 (pcie-root-port) cannot plug into bus 0x01, a pcie-root-port" in got
    assert "pci controller 4 (pci-bridge) plugs into bus 0x04, which is not lower than its own " \
           "index 4" in got
    assert "the pci address of virtio disk vdc is slot 0x01 of bus 0x02, a pcie-root-port, " \
           "which has only slot 0" in got
    assert "the pci address of interface 52:54:00" in " ".join(got)
    assert any("where the machine has the ICH9 SMBus" in m for m in got)
    assert any(m.startswith("the sata controller is built into the 'q35' machine at pci "
                            "00:1f.2") for m in got)
    assert "pcie-root-port 2 has chassis 1, as has pcie-root-port 1 (qemu needs each root " \
           "port's chassis unique)" in got
    assert all(p.get("hint") for p in problems), problems
    assert all(p["line"] is not None for p in problems)


def test_machine_type_problems() -> None:
    got = messages(refused(dom("<controller type='pci' index='1' model='pcie-root-port'/>",
                               machine="pc"), XMLUnsupported))
    assert got == ["pci controller model 'pcie-root-port' needs the q35 machine (PCI Express); "
                   "this guest's machine is 'pc'"]
    problems = refused(dom("<controller type='pci' index='0' model='pci-root'/>"),
                       XMLUnsupported)
    assert messages(problems) == ["the root bus of the q35 machine ('q35') is pcie-root, "
                                  "not pci-root"]
    assert problems[0]["hint"] == "use model='pcie-root'"
    got = messages(refused(dom("<controller type='pci' index='0' model='pcie-root-port'/>")))
    assert got == ["pci controller index 0 is the root bus (pcie-root), not a pcie-root-port"]
    got = messages(refused(dom("<controller type='pci' index='3'/>")))
    assert got == ["a pci controller other than the root (index 0) needs a model"]


def test_controller_children_are_checked() -> None:
    got = messages(refused(dom(
        "<controller type='pci' index='1' model='pcie-root-port'>"
        "<model name='pci-bridge'/><target chassisNr='2'/></controller>"
        "<controller type='usb' model='qemu-xhci'><master startport='0'/></controller>"
        "<controller type='usb' index='0' model='ich9-uhci1'/>"
        "<controller type='virtio-serial'><driver queues='2'/></controller>")))
    assert "pcie-root-port model name 'pci-bridge' is not supported (supported: " \
           "pcie-root-port, ioh3420)" in got
    assert "<target chassisNr> is not valid for a pcie-root-port controller (a pcie-root-port " \
           "takes only chassis, port, hotplug)" in got
    assert "<master> is only valid for the ich9-uhci1..3 companions of an ich9-ehci1" in got
    assert "a ich9-uhci1 companion controller needs <master startport=…>" in got
    assert "<driver queues> is only supported for virtio-scsi controllers" in got


def test_index_assignment_follows_libvirt() -> None:
    d = parse_domain(dom("<controller type='pci' index='2' model='pcie-root-port'/>"
                         "<controller type='pci' model='pcie-root-port'/>"
                         "<controller type='pci' model='pcie-root-port'/>"
                         "<controller type='pci' model='pcie-root'/>", virt="qemu"))
    assert [(c.index, c.model) for c in d.controllers] == [
        (2, "pcie-root-port"), (1, "pcie-root-port"), (3, "pcie-root-port"), (0, "pcie-root")]
    # Given index 0, a root port is refused: that is the root's.
    assert "index 0 is the root bus" in " ".join(messages(refused(dom(
        "<controller type='pci' index='0' model='pcie-root-port'/>"))))
    assert "defined twice" in " ".join(messages(refused(dom(
        "<controller type='pci' index='1' model='pcie-root-port'/>" * 2))))


def test_hotplug_and_ioh3420() -> None:
    d = parse_domain(dom("<controller type='pci' index='1' model='pcie-root-port'>"
                         "<model name='ioh3420'/><target chassis='5' port='0x8' hotplug='off'/>"
                         "</controller>"))
    assert device(to_qemu_argv(d, paths=PATHS), "pci.1") == \
        "ioh3420,port=0x8,chassis=5,id=pci.1,hotplug=off,bus=pcie.0,addr=0x2"
    assert "<target chassis=\"5\" port=\"0x8\" hotplug=\"off\"/>" in format_domain(d)
    assert parse_domain(format_domain(d)) == d


# -- ABI ---------------------------------------------------------------------------------


def _abi_error(old: Domain, new: Domain) -> str:
    with pytest.raises(ABIError) as info:
        check_abi_stability(old, new)
    return str(info.value)


def test_abi_names_a_different_tree() -> None:
    src = parse_domain(DUMPXML.read_bytes())
    check_abi_stability(src, parse_domain(format_domain(src)))
    fewer = dataclasses.replace(src, controllers=tuple(
        c for c in src.controllers if c.index != 9 or c.type != "pci"))
    assert _abi_error(src, fewer).startswith(
        "pci controller tree differs: bus 9 (pcie-root-port) is only in the source definition")
    other = tuple(dataclasses.replace(c, model="pci-bridge", model_name=None)
                  if (c.type, c.index) == ("pci", 9) else c for c in src.controllers)
    assert _abi_error(src, dataclasses.replace(src, controllers=other)) == \
        "pci controller tree differs: bus 9 model differs: pcie-root-port vs pci-bridge"
    moved = tuple(dataclasses.replace(c, chassis=20) if (c.type, c.index) == ("pci", 9) else c
                  for c in src.controllers)
    assert _abi_error(src, dataclasses.replace(src, controllers=moved)) == \
        "pci controller 9 (pcie-root-port) target chassis differs: 9 vs 20"
    disk = dataclasses.replace(src.disks[0], address=Address("pci", 0, 8, 0, 0))
    assert _abi_error(src, dataclasses.replace(src, disks=(disk, *src.disks[1:]))) == \
        "disk vda address differs: pci(domain=0, bus=4, slot=0, function=0) vs " \
        "pci(domain=0, bus=8, slot=0, function=0)"


def test_abi_unnumbered_and_numbered_trees_are_the_same() -> None:
    bare = parse_domain(dom(ROOT_PORTS))
    numbered = parse_domain(format_domain(bare))
    check_abi_stability(bare, numbered)
    assert to_qemu_argv(bare, paths=PATHS) == to_qemu_argv(numbered, paths=PATHS)
    assert isinstance(numbered.controllers[1], Controller)


# -- real qemu ---------------------------------------------------------------------------


def _pci_tree(qmp: _QMP) -> dict[str, tuple[int, int, int]]:
    """qdev id → (bus number, slot, function) as the guest's firmware numbered the buses."""
    found: dict[str, tuple[int, int, int]] = {}

    def walk(bus: int, devs: list[dict[str, object]]) -> None:
        for dev in devs:
            ident = str(dev.get("qdev_id") or "")
            if ident:
                found[ident] = (bus, int(str(dev["slot"])), int(str(dev["function"])))
            bridge = dev.get("pci_bridge")
            if isinstance(bridge, dict):
                walk(int(bridge["bus"]["secondary"]), list(bridge.get("devices", [])))

    for root in qmp.cmd("query-pci"):
        walk(int(root["bus"]), root["devices"])
    return found


@needs_qemu
def test_real_qemu_builds_the_dumpxml_tree_with_its_bus_numbers() -> None:
    # The firmware numbers the buses depth first; with libvirt's layout each
    # bus number is the controller index, so the guest sees the XML's addresses.
    with _short_tmp() as tmp:
        d = _host_ready(parse_domain(DUMPXML.read_bytes()), tmp)
        d = dataclasses.replace(d, graphics=(), videos=())
        paths = RuntimePaths(tmp, tmp / "qmp.sock", tmp / "pid")
        argv = to_qemu_argv(d, paths=paths, qemu_binary=QEMU or "")
        with _launched(argv, paths.pidfile):
            qmp = _QMP(paths.qmp_socket)
            try:
                deadline = time.monotonic() + 30
                tree = _pci_tree(qmp)
                while tree.get("net1", (0,))[0] == 0 and time.monotonic() < deadline:
                    time.sleep(0.2)  # until the firmware has numbered the buses
                    tree = _pci_tree(qmp)
            finally:
                qmp.close()
    want = {"pci.1": (0, 2, 0), "pci.9": (0, 3, 0), "pci.10": (0, 3, 1), "pci.11": (10, 0, 0),
            "pci.12": (11, 1, 0), "usb": (2, 0, 0), "virtio-serial0": (3, 0, 0),
            "virtio-disk0": (4, 0, 0), "balloon0": (5, 0, 0), "rng0": (6, 0, 0),
            "scsi0": (7, 0, 0), "net0": (1, 0, 0), "net1": (12, 3, 0)}
    assert {k: tree.get(k) for k in want} == want


def _migrate(src: Domain, dst: Domain, tmp: Path) -> str:
    """Migrate a running qemu of ``src`` into an incoming qemu of ``dst``: the final status."""
    src_paths = RuntimePaths(tmp, tmp / "src.sock", tmp / "src.pid")
    dst_paths = RuntimePaths(tmp, tmp / "dst.sock", tmp / "dst.pid")
    src_argv = to_qemu_argv(src, paths=src_paths, paused=True, qemu_binary=QEMU or "")
    dst_argv = to_qemu_argv(dst, paths=dst_paths, incoming=True, qemu_binary=QEMU or "")
    with _launched(src_argv, src_paths.pidfile), _launched(dst_argv, dst_paths.pidfile):
        s, d = _QMP(src_paths.qmp_socket), _QMP(dst_paths.qmp_socket)
        try:
            # Run the source until its firmware has numbered the buses: the
            # bridges' configuration is then part of the stream.
            s.cmd("cont")
            time.sleep(1.5)
            uri = f"unix:{tmp / 'mig.sock'}"
            d.cmd("migrate-incoming", uri=uri)
            s.cmd("migrate", uri=uri)
            deadline = time.monotonic() + 60
            status = ""
            while time.monotonic() < deadline:
                status = s.cmd("query-migrate").get("status", "")
                if status in ("completed", "failed"):
                    break
                time.sleep(0.1)
            if status == "completed":  # the destination has taken the whole device tree
                deadline = time.monotonic() + 20
                while d.cmd("query-status")["status"] == "inmigrate" and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                status = f"completed, destination {d.cmd('query-status')['status']}"
            return status
        finally:
            s.close()
            d.close()


@needs_qemu
def test_real_qemu_migrates_the_root_port_tree() -> None:
    # The same model on both ends gives the same tree, and the stream loads.
    with _short_tmp() as tmp:
        d = _host_ready(parse_domain(DUMPXML.read_bytes()), tmp)
        d = dataclasses.replace(d, graphics=(), videos=())
        assert _migrate(d, d, tmp) == "completed, destination running"


@needs_qemu
def test_real_qemu_refuses_a_stream_for_another_tree_as_the_abi_check_does() -> None:
    with _short_tmp() as tmp:
        d = _host_ready(parse_domain(DUMPXML.read_bytes()), tmp)
        d = dataclasses.replace(d, graphics=(), videos=())
        # Root port 8 (00:02.7) has nothing behind it; without it the tree differs.
        fewer = dataclasses.replace(d, controllers=tuple(
            c for c in d.controllers if (c.type, c.index) != ("pci", 8)))
        assert "bus 8 (pcie-root-port) is only in the source definition" in _abi_error(d, fewer)
        assert _migrate(d, fewer, tmp) == "failed"
