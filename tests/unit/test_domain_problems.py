"""parse_domain reports every problem of a document at once: located, grouped, capped."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from ferry.domain import parse_domain
from ferry.domain._problems import KINDS, MAX_MESSAGE_CHARS, MAX_PROBLEMS
from ferry.errors import FerryError, NameInvalid, XMLError, XMLUnsupported, from_wire


def refused(text: str, cls: type[XMLError] = XMLError) -> XMLError:
    with pytest.raises(cls) as info:
        parse_domain(text, where="vm.xml")
    return info.value


def lines_of(text: str, *needles: str) -> list[int]:
    return [text[: text.index(n)].count("\n") + 1 for n in needles]


def problems(err: XMLError) -> list[dict[str, Any]]:
    found = err.details["problems"]
    assert isinstance(found, list)
    return found


# Five different problems, one of each kind, in an otherwise valid guest.
FIVE = """<domain type='kvm'>
  <name>five</name>
  <memory unit='MiB'>0</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader stateless='yes'>/f</loader></os>
  <devices>
    <disk type='file'><source file='/img/a.qcow2'/><target dev='vda'/></disk>
    <disk type='file'><source file='/img/b.qcow2'/><target dev='vda'/></disk>
    <interface type='user'><model type='ne2k_pci'/></interface>
    <shmem name='ivshmem'/>
  </devices>
</domain>
"""


def test_five_problems_are_all_reported_with_line_path_and_hint() -> None:
    err = refused(FIVE)
    memory, firmware, second_disk, nic_model, shmem = lines_of(
        FIVE, "<memory", "<os><type", "<disk type='file'><source file='/img/b",
        "<model type='ne2k_pci'", "<shmem")
    got = [(p["kind"], p["line"], p["path"]) for p in problems(err)]
    assert got == [
        ("unsupported-element", shmem, "domain/devices/shmem"),
        ("unsupported-attribute", firmware, "domain/os/loader"),
        ("unsupported-value", nic_model, "domain/devices/interface/model"),
        ("invalid", memory, "domain/memory"),
        ("conflict", second_disk, "domain/devices/disk"),
    ]
    assert err.details["problem_count"] == 5 and err.details["truncated"] is False
    for p in problems(err):
        assert set(p) == {"line", "path", "kind", "code", "message", "hint"}
        assert p["message"] and p["hint"]
    codes = {p["path"]: p["code"] for p in problems(err)}
    assert codes["domain/devices/shmem"] == "xml-unsupported"
    assert codes["domain/memory"] == "xml-invalid"
    hints = {p["path"]: p["hint"] for p in problems(err)}
    assert "virtio" in hints["domain/devices/interface/model"]  # use one of: virtio, ...
    assert "remove" in hints["domain/os/loader"]
    # The message lists each problem on a line of its own, located the way a
    # single problem always was: FILE:LINE: PATH: MESSAGE.
    text = str(err)
    assert text.startswith("vm.xml: 5 problems in the domain XML")
    for p in problems(err):
        assert f"\n  vm.xml:{p['line']}: {p['path']}: {p['message']}" in text
    assert "vm.xml:9: domain/devices/shmem: element <shmem> is not supported by Ferry" in text
    assert f"vm.xml:{memory}: domain/memory: memory must be greater than 0" in text
    assert f"vm.xml:{second_disk}: domain/devices/disk: disk target 'vda' is used twice" in text


def test_the_first_problem_found_sets_class_and_top_level_details() -> None:
    # The schema walk runs first: the unsupported element is found first, as
    # it was when only the first problem was reported.
    err = refused(FIVE, XMLUnsupported)
    assert (err.details["element"], err.details["line"]) == ("domain/os/loader", 4)
    assert err.details["attribute"] == "stateless"
    # A plain XMLError first makes the whole an XMLError (catchable as such).
    text = FIVE.replace("<name>five</name>", "<name>five</name> stray")
    err = refused(text)
    assert type(err) is XMLError and err.details["element"] == "domain"
    # And a name problem first keeps its class too.
    err = refused(FIVE.replace("<name>five</name>", "<name>a/b</name>").replace(
        " stateless='yes'", "").replace("<shmem name='ivshmem'/>", ""), NameInvalid)
    assert err.details["element"] == "domain/name"


def test_groups_follow_the_kinds_and_each_is_sorted_by_line() -> None:
    # <on_reboot> is checked before the devices although it comes after them.
    text = """<domain type='kvm'>
  <name>g</name>
  <memory>65536</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='network'><target dev='vda'/></disk>
    <graphics type='sdl'/>
  </devices>
  <on_reboot>explode</on_reboot>
  <on_crash>explode</on_crash>
  <bogus/>
</domain>
"""
    err = refused(text)
    got = [(p["kind"], p["line"]) for p in problems(err)]
    assert got == [("unsupported-element", 11), ("unsupported-value", 6),
                   ("unsupported-value", 7), ("unsupported-value", 9),
                   ("unsupported-value", 10)]
    message = str(err).splitlines()
    assert message[1] == KINDS["unsupported-element"] + ":"
    assert message[3] == KINDS["unsupported-value"] + ":"
    assert [int(m.group(1)) for m in map(re.compile(r"^  vm\.xml:(\d+):").match, message)
            if m] == [11, 6, 7, 9, 10]


def test_a_single_problem_keeps_its_one_line_message() -> None:
    text = FIVE.replace(" stateless='yes'", "") \
        .replace("<shmem name='ivshmem'/>", "") \
        .replace("<model type='ne2k_pci'/>", "").replace("/img/b.qcow2'/><target dev='vda'",
                                                           "/img/b.qcow2'/><target dev='vdb'")
    err = refused(text)
    assert str(err) == "vm.xml:3: domain/memory: memory must be greater than 0"
    assert err.details["problem_count"] == 1 and err.details["truncated"] is False
    assert [(p["kind"], p["line"]) for p in problems(err)] == [("invalid", 3)]


def test_problems_inside_one_device_are_all_reported() -> None:
    text = """<domain type='kvm'>
  <name>d</name>
  <memory>65536</memory>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file'>
      <driver name='qemu' type='vmdk' cache='sometimes'/>
      <source file='relative.img'/>
      <target dev='vda'/>
      <address type='pci' domain='0x0001' bus='0x04' slot='0'/>
    </disk>
  </devices>
</domain>
"""
    err = refused(text)
    assert [(p["line"], p["kind"], p["message"]) for p in problems(err)] == [
        (7, "unsupported-value",
         "disk format 'vmdk' is not supported (supported: raw, qcow2)"),
        (7, "unsupported-value", "cache mode 'sometimes' is not supported (supported: none, "
                                 "writeback, writethrough, directsync, unsafe)"),
        (10, "unsupported-value",
         "pci domain 0x0001 does not exist: x86 guests have only PCI domain 0"),
        (8, "invalid", "disk source 'relative.img' is not an absolute path"),
    ]


def test_no_consequential_problems() -> None:
    # A graphics element with a problem is left out, but its video does not
    # then count as "video without graphics"; a bad <os> does not make the
    # q35-only checks guess the machine; a bad <vcpu> is not compared with
    # the topology.
    text = """<domain type='kvm'>
  <name>c</name>
  <memory>65536</memory>
  <vcpu>lots</vcpu>
  <os><type machine='microvm'>hvm</type></os>
  <cpu><topology sockets='2' cores='2' threads='1'/></cpu>
  <devices>
    <graphics type='vnc' port='12'/>
    <video><model type='vga'/></video>
    <controller type='ide'/>
  </devices>
</domain>
"""
    err = refused(text)
    assert [(p["line"], p["path"]) for p in problems(err)] == [
        (5, "domain/os/type"), (4, "domain/vcpu"), (8, "domain/devices/graphics")]


def test_a_multiple_element_is_reported_and_the_rest_still_checked() -> None:
    text = """<domain type='kvm'>
  <name>m</name>
  <memory>65536</memory>
  <memory>1</memory>
  <os><type>hvm</type></os>
  <devices>
    <memballoon model='virtio'/>
    <memballoon model='none'/>
    <rng model='virtio'><backend model='random'>/dev/sda</backend></rng>
  </devices>
</domain>
"""
    err = refused(text)
    assert [(p["line"], p["message"]) for p in problems(err)] == [
        (4, "<memory> appears more than once"),
        (8, "<memballoon> appears more than once"),
        (9, "rng source '/dev/sda' is not allowed (allowed: /dev/urandom, /dev/random, "
            "/dev/hwrng)"),
    ]


def test_the_number_of_problems_is_capped() -> None:
    unknown = "\n".join(f"  <x{i}/>" for i in range(MAX_PROBLEMS + 50))
    text = f"<domain type='kvm'>\n{unknown}\n<name>x</name></domain>"
    err = refused(text, XMLUnsupported)
    assert len(problems(err)) == MAX_PROBLEMS == err.details["problem_count"]
    assert err.details["truncated"] is True
    assert [p["line"] for p in problems(err)] == list(range(2, MAX_PROBLEMS + 2))
    message = str(err)
    assert message.startswith(f"vm.xml: {MAX_PROBLEMS} or more problems")
    assert message.endswith("… and maybe more: Ferry stopped looking (too many problems)")
    assert message.count("\n  vm.xml:") == MAX_PROBLEMS


def test_the_same_problem_on_one_line_is_listed_once_and_bounded() -> None:
    text = ("<domain type='kvm'><name>x</name><memory>1</memory><os><type>hvm</type></os>"
            "<devices>" + "<disk/>" * 5000 + "</devices></domain>")
    err = refused(text)
    assert [p["message"] for p in problems(err)] == [
        "<disk> needs a <target>", "the disk has no source (only a cdrom may be empty)"]
    assert err.details["truncated"] is True


@pytest.mark.parametrize(
    "devices",
    [
        "<shmem/>\n" * 100_000,
        "<disk/>\n" * 100_000,
        "<interface type='user'><address type='pci' slot='5'/></interface>\n" * 12_000,
        "<graphics type='spice'>" + "<image compression='off'/>\n" * 30_000 + "</graphics>",
        "<serial type='pty'><target port='0'/></serial>\n" * 20_000,
    ],
    ids=["unknown", "invalid", "conflicts", "options", "ports"],
)
def test_hostile_documents_with_many_problems_are_bounded(devices: str) -> None:
    text = ("<domain type='kvm'><name>x</name><memory>1</memory><os><type>hvm</type></os>"
            f"<devices>{devices}</devices></domain>")
    assert len(text) < 1024 * 1024
    started = time.monotonic()
    err = refused(text)
    assert time.monotonic() - started < 5
    assert len(problems(err)) <= MAX_PROBLEMS
    assert len(str(err)) < 200 * MAX_PROBLEMS + 1000


def test_long_values_are_cut_in_messages() -> None:
    text = FIVE.replace("type='user'", "type='" + "u" * 5000 + "'")
    err = refused(text)
    (nic,) = [p for p in problems(err) if p["path"] == "domain/devices/interface"]
    assert len(nic["message"]) == MAX_MESSAGE_CHARS and nic["message"].endswith("…")


def test_load_errors_are_one_problem_with_their_details() -> None:
    err = refused("<domain type='kvm'>\n<name>x</nam>\n</domain>")
    assert [(p["kind"], p["line"], p["path"]) for p in problems(err)] == [("malformed", 2, None)]
    assert str(err).startswith("vm.xml:2: malformed XML: ")
    err = refused("<domain>" + " " * (1 << 20) + "</domain>")
    assert err.details["limit"] == 1 << 20 and problems(err)[0]["kind"] == "malformed"
    err = refused("<notdomain/>")
    assert problems(err)[0]["kind"] == "malformed"
    assert str(err) == "vm.xml:1: notdomain: root element is <notdomain>, expected <domain>"


def test_the_problems_travel_on_the_wire() -> None:
    err = refused(FIVE)
    back = from_wire(err.to_wire())
    assert isinstance(back, XMLUnsupported) and isinstance(back, FerryError)
    assert str(back) == str(err)
    assert back.details["problems"] == problems(err)


# What virt-manager writes for a q35 desktop guest: every problem in one pass.
VIRT_MANAGER = """<domain type="kvm">
  <name>desktop</name>
  <memory unit="KiB">4194304</memory>
  <vcpu placement="static">2</vcpu>
  <os firmware="efi">
    <type arch="x86_64" machine="pc-q35-8.2">hvm</type>
  </os>
  <features><acpi/><apic/><vmport state="off"/></features>
  <cpu mode="host-passthrough" check="none" migratable="on"/>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" discard="unmap"/>
      <source file="/var/lib/libvirt/images/desktop.qcow2"/>
      <target dev="vda" bus="virtio"/>
      <address type="pci" domain="0x0000" bus="0x04" slot="0x00" function="0x0"/>
    </disk>
    <controller type="pci" index="0" model="pcie-root"/>
    <controller type="pci" index="1" model="pcie-root-port">
      <model name="pcie-root-port"/>
      <target chassis="1" port="0x10"/>
    </controller>
    <interface type="network">
      <source network="default"/>
      <model type="virtio"/>
      <address type="pci" domain="0x0000" bus="0x01" slot="0x00" function="0x0"/>
    </interface>
    <channel type="spicevmc"><target type="virtio" name="com.redhat.spice.0"/></channel>
    <graphics type="spice" autoport="yes"><listen type="address"/></graphics>
    <sound model="ich9"/>
    <audio id="1" type="spice"/>
    <video><model type="virtio" heads="1" primary="yes"/></video>
    <redirdev bus="usb" type="spicevmc"/>
  </devices>
</domain>
"""


def test_a_virt_manager_guest_gets_every_problem_at_once() -> None:
    # <os firmware='efi'> is accepted (UEFI); what is left is one address.
    err = refused(VIRT_MANAGER, XMLError)
    got = [(p["line"], p["path"]) for p in problems(err)]
    assert got == [
        # The root port tree is accepted; this excerpt has no bus 4 (root port 4).
        (15, "domain/devices/disk/address"),
    ]


def test_the_schema_and_the_device_table_agree() -> None:
    # Supporting a device is a schema entry plus a line in DEVICES: neither
    # may be missing (a device in the schema but not the table would be a
    # KeyError, one in the table but not the schema would never be reached).
    from ferry.domain._devices import DEVICES
    from ferry.domain._schema import SCHEMA

    in_schema = {p.split("/")[2] for p in SCHEMA if p.count("/") == 2
                 and p.startswith("domain/devices/")} - {"emulator"}
    assert in_schema == set(DEVICES)
