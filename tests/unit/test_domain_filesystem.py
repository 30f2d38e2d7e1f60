"""virtiofs ``<filesystem>``: defined, round-tripped, path-checked; migration refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from virtinst_corpus import dropped

from ferry.domain import RuntimePaths, check_abi_stability, format_domain, parse_domain
from ferry.domain.argv import to_qemu_argv
from ferry.errors import ABIError, XMLError, XMLUnsupported
from ferry.storage_policy import StoragePolicy, domain_paths
from ferry_source.checks import unmigratable

PATHS = RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/pid"))
# As virt-install --filesystem source=/srv/share,target=share,driver.type=virtiofs writes it.
VIRTINST = """<filesystem type="mount">
      <source dir="/srv/share"/>
      <target dir="share"/>
      <driver type="virtiofs"/>
    </filesystem>"""
LIBVIRT = """<filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs' queue='1024'/>
      <source dir='/srv/data'/>
      <target dir='data:1'/>
      <alias name='fs0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
    </filesystem>"""


def dom(devices: str) -> str:
    return f"""<domain type='kvm'><name>vm</name>
  <uuid>00000000-0000-0000-0000-0000000000aa</uuid>
  <memory unit='KiB'>65536</memory><vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    {devices}
  </devices>
</domain>"""


def test_virtiofs_filesystems_define_and_round_trip() -> None:
    text = dom(VIRTINST + LIBVIRT.replace("<alias name='fs0'/>", ""))
    d = parse_domain(text)
    out = format_domain(d)
    assert parse_domain(out) == d and dropped(text, out) == ([], [])
    check_abi_stability(d, parse_domain(out))
    a, b = d.filesystems
    assert (a.source_dir, a.target_dir, a.accessmode, a.queue) == ("/srv/share", "share", None,
                                                                  None)
    assert (b.target_dir, b.accessmode, b.queue) == ("data:1", "passthrough", 1024)
    assert b.address is not None and b.address.slot == 9
    # The alias (libvirt's runtime name) is accepted and not kept.
    assert parse_domain(dom(LIBVIRT)).filesystems[0] == b


def test_the_shared_directory_is_a_storage_policy_path() -> None:
    d = parse_domain(dom(VIRTINST))
    (item,) = [p for p in domain_paths(d) if p.kind == "directory"]
    assert (item.element, item.path) == ("domain/devices/filesystem[0]/source", "/srv/share")
    policy = StoragePolicy(["/var/lib/ferry/images"], Path("/run/ferry/serial/vm"))
    assert not policy.permits("/srv/share", "directory")
    assert not policy.permits("/run/ferry/serial/vm/x", "directory")
    assert StoragePolicy(["/srv"], None).permits("/srv/share", "directory")


def test_start_without_shared_memory_is_refused() -> None:
    text = dom(VIRTINST).replace(
        "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>", "")
    with pytest.raises(XMLUnsupported) as info:
        to_qemu_argv(parse_domain(text), paths=PATHS, kvm_usable=lambda: True)
    assert info.value.details["element"] == "domain/devices/filesystem"
    assert "shared guest memory" in str(info.value) and "'share'" in str(info.value)
    assert "<access mode='shared'/>" in str(info.value)


def test_migration_is_refused_naming_the_filesystem() -> None:
    (blocker,) = unmigratable(parse_domain(dom(VIRTINST)))
    assert "/srv/share" in blocker and "'share'" in blocker and "cannot migrate" in blocker


def test_abi_compares_the_mount_tag() -> None:
    d = parse_domain(dom(VIRTINST))
    with pytest.raises(ABIError, match="mount tag"):
        check_abi_stability(d, parse_domain(dom(VIRTINST.replace('"share"/>', '"other"/>'))))


@pytest.mark.parametrize(("fs", "path", "words"), [
    ("<filesystem type='mount'><source dir='/srv/a'/><target dir='a'/></filesystem>",
     "domain/devices/filesystem", "9p"),
    ("<filesystem type='mount'><driver type='path'/><source dir='/srv/a'/><target dir='a'/>"
     "</filesystem>", "domain/devices/filesystem/driver", "path"),
    ("<filesystem accessmode='mapped'><driver type='virtiofs'/><source dir='/srv/a'/>"
     "<target dir='a'/></filesystem>", "domain/devices/filesystem", "mapped"),
    ("<filesystem><driver type='virtiofs'/><target dir='a'/></filesystem>",
     "domain/devices/filesystem", "<source dir"),
    ("<filesystem><driver type='virtiofs'/><source dir='/srv/a'/></filesystem>",
     "domain/devices/filesystem", "<target dir"),
    ("<filesystem><driver type='virtiofs'/><source dir='srv/a'/><target dir='a'/>"
     "</filesystem>", "domain/devices/filesystem/source", "absolute"),
    ("<filesystem><driver type='virtiofs'/><source dir='/srv/a'/><target dir='a b'/>"
     "</filesystem>", "domain/devices/filesystem/target", "mount tag"),
    ("<filesystem><driver type='virtiofs'/><source dir='/srv/a'/><target dir='a'/>"
     "<readonly/></filesystem>", "domain/devices/filesystem/readonly", "readonly"),
])
def test_bad_filesystems_name_the_element(fs: str, path: str, words: str) -> None:
    with pytest.raises(XMLError) as info:
        parse_domain(dom(fs), where="t.xml")
    assert info.value.details["element"] == path and words in str(info.value), str(info.value)
