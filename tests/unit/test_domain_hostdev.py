"""``<hostdev>``: parsed, round-tripped, put in the argv, and refused for migration in Begin."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from virtinst_corpus import dropped

from ferry.domain import RuntimePaths, check_abi_stability, format_domain, parse_domain
from ferry.domain.argv import to_qemu_argv
from ferry.domain.model import Domain
from ferry.errors import ABIError, MigrationRefused, XMLError, XMLUnsupported
from ferry.flags import MigrationFlags
from ferry_source.checks import is_allowed, unmigratable

PATHS = RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/pid"))

PCI = """<hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source><address domain='0x0000' bus='0x03' slot='0x00' function='0x1'/></source>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
    </hostdev>"""
PCI_AUTO = """<hostdev mode='subsystem' type='pci' managed='yes'>
      <source><address domain='0x0000' bus='0x06' slot='0x12' function='0x2'/></source></hostdev>"""
USB_ID = """<hostdev mode='subsystem' type='usb' managed='yes'>
      <source><vendor id='0x046d'/><product id='0xc52b'/></source></hostdev>"""
USB_ADDR = """<hostdev mode='subsystem' type='usb'>
      <source><address bus='1' device='3'/></source>
      <address type='usb' bus='0' port='2'/></hostdev>"""


def dom(devices: str, machine: str = "q35") -> str:
    return f"""<domain type='kvm'><name>vm</name>
  <uuid>00000000-0000-0000-0000-0000000000aa</uuid>
  <memory unit='KiB'>65536</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>
    {devices}
  </devices>
</domain>"""


def round_trip(text: str) -> Domain:
    d = parse_domain(text, where="t.xml")
    out = format_domain(d)
    again = parse_domain(out, where="formatted")
    assert again == d and format_domain(again) == out
    assert dropped(text, out) == ([], []), out
    check_abi_stability(d, again)
    return d


def devices_of(d: Domain) -> list[str]:
    argv = to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def test_pci_and_usb_hostdevs_parse_and_round_trip() -> None:
    d = round_trip(dom(PCI + PCI_AUTO + USB_ID + USB_ADDR))
    pci, auto, by_id, by_addr = d.hostdevs
    assert (pci.type, pci.pci_addr, pci.driver, pci.managed) == ("pci", (0, 3, 0, 1), "vfio", True)
    assert pci.address is not None and pci.address.slot == 7
    assert auto.pci_addr == (0, 6, 0x12, 2) and auto.address is None
    assert (by_id.vendor, by_id.product) == (0x046D, 0xC52B)
    assert (by_addr.usb_bus, by_addr.usb_device) == (1, 3)
    assert [h.describe() for h in d.hostdevs] == [
        "PCI host device 0000:03:00.1", "PCI host device 0000:06:12.2",
        "USB host device 046d:c52b", "USB host device at bus 1 device 3"]


def test_libvirt_runtime_alias_is_accepted() -> None:
    aliased = PCI.replace("<address type=", "<alias name='hostdev0'/><address type=")
    assert parse_domain(dom(aliased)) == parse_domain(dom(PCI))


def test_argv_vfio_pci_and_usb_host() -> None:
    devs = devices_of(parse_domain(dom(PCI + PCI_AUTO + USB_ID + USB_ADDR)))
    assert "vfio-pci,host=0000:03:00.1,id=hostdev0,bus=pcie.0,addr=0x7" in devs
    auto = next(x for x in devs if x.startswith("vfio-pci,host=0000:06:12.2,id=hostdev1,"))
    assert "bus=pcie.0,addr=0x" in auto and "addr=0x7" not in auto
    assert "usb-host,vendorid=0x046d,productid=0xc52b,id=hostdev2,bus=usb.0" in devs
    assert "usb-host,hostbus=1,hostaddr=3,id=hostdev3,bus=usb.0,port=2" in devs
    # A USB host device brings the USB controller it needs.
    assert any(x.startswith("qemu-xhci,id=usb") for x in devs)


def test_pc_machine_puts_a_usb_host_device_on_piix_uhci() -> None:
    devs = devices_of(parse_domain(dom(USB_ID, machine="pc")))
    assert any(x.startswith("piix3-usb-uhci,id=usb") for x in devs), devs
    assert devs[-1].startswith("usb-host,vendorid=0x046d")


@pytest.mark.parametrize(("xml", "path", "words"), [
    ("<hostdev mode='subsystem' type='pci'/>", "domain/devices/hostdev", "needs a <source>"),
    ("<hostdev mode='subsystem' type='pci'><source><address bus='1'/></source></hostdev>",
     "domain/devices/hostdev/source/address", "needs bus and slot"),
    ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/></source></hostdev>",
     "domain/devices/hostdev/source", "both <vendor> and <product>"),
    ("<hostdev mode='subsystem' type='usb'><source><address bus='1' slot='2' device='3'/>"
     "</source></hostdev>", "domain/devices/hostdev/source/address", "PCI source attribute"),
    ("<hostdev mode='subsystem' type='usb'><source/></hostdev>", "domain/devices/hostdev/source",
     "needs <vendor>/<product> or <address bus device>"),
    ("<hostdev mode='subsystem' type='usb'><source><vendor id='0x10000'/><product id='1'/>"
     "</source></hostdev>", "domain/devices/hostdev/source/vendor", "id"),
])
def test_bad_hostdevs_name_the_element(xml: str, path: str, words: str) -> None:
    with pytest.raises(XMLError) as info:
        parse_domain(dom(xml), where="t.xml")
    assert info.value.details["element"] == path and words in str(info.value), str(info.value)


@pytest.mark.parametrize("xml", [
    "<hostdev mode='capabilities' type='storage'><source><block>/dev/sdf1</block></source>"
    "</hostdev>",
    "<hostdev mode='subsystem' type='scsi'/>",
    "<hostdev mode='subsystem' type='pci'><driver model='vfio-pci-igb'/><source>"
    "<address bus='1' slot='0'/></source></hostdev>",
    "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'><vendor id='1'/>"
    "<product id='2'/></source></hostdev>",
])
def test_other_hostdevs_are_refused_as_unsupported(xml: str) -> None:
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(dom(xml), where="t.xml")
    assert str(info.value.details["element"]).startswith("domain/devices/hostdev")


def test_every_host_device_blocks_migration_in_begin() -> None:
    d = parse_domain(dom(PCI + USB_ID))
    blockers = unmigratable(d)
    assert len(blockers) == 2
    assert "PCI host device 0000:03:00.1" in blockers[0] and "type='pci'" in blockers[0]
    assert "USB host device 046d:c52b" in blockers[1] and "type='usb'" in blockers[1]
    with pytest.raises(MigrationRefused) as info:
        is_allowed(d, MigrationFlags.LIVE, [], "running")
    assert info.value.details["blockers"] == blockers
    assert "cannot migrate domain 'vm'" in str(info.value)
    assert unmigratable(dataclasses.replace(d, hostdevs=())) == []


def test_abi_check_compares_host_devices() -> None:
    d = parse_domain(dom(USB_ID))
    other = parse_domain(dom(USB_ID.replace("0xc52b", "0xc52c")))
    with pytest.raises(ABIError, match="hostdev 0 device"):
        check_abi_stability(d, other)
    with pytest.raises(ABIError, match="hostdevs"):
        check_abi_stability(d, dataclasses.replace(d, hostdevs=()))
