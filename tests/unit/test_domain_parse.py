"""parse_domain: fields, units, defaults, refusals with line numbers, hostile XML."""

from __future__ import annotations

import re
import uuid

import pytest

from ferry.domain import MAX_XML_BYTES, Domain, parse_domain
from ferry.errors import XMLError, XMLUnsupported

GUEST1 = """<domain type='kvm'>
  <name>guest1</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>/var/lib/ferry/guest.elf</kernel><cmdline>wss=64 rate=0</cmdline></os>
  <memoryBacking><allocation mode='immediate'/></memoryBacking>
  <devices>
    <serial type='unix'><source mode='bind' path='/run/ferry/serial/guest1.sock'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
"""  # noqa: E501


def dom(devices: str = "", *, extra: str = "", os: str | None = None, head: str = "") -> str:
    """A small valid domain; ``extra`` goes after <os>, ``devices`` inside <devices>."""
    os = os if os is not None else "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
    return (
        f"<domain type='qemu'{head}>\n"
        "  <name>t</name>\n"
        "  <uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>\n"
        "  <memory unit='MiB'>64</memory>\n"
        f"  {os}\n"
        f"  {extra}\n"
        "  <devices>\n"
        f"    {devices}\n"
        "  </devices>\n"
        "</domain>\n"
    )


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def refused(text: str, cls: type[XMLError] = XMLError) -> XMLError:
    with pytest.raises(cls) as info:
        parse_domain(text, where="t.xml")
    return info.value


# -- the typical guest ------------------------------------------------------


def test_typical_guest_fields() -> None:
    d = parse_domain(GUEST1)
    assert isinstance(d, Domain)
    assert d.virt_type == "kvm" and d.name == "guest1"
    assert d.memory_kib == 256 * 1024 == d.current_memory_kib and d.memory_mib == 256
    assert d.vcpus == 1
    assert d.os.machine == "pc" and d.os.arch == "x86_64"
    assert d.os.kernel == "/var/lib/ferry/guest.elf" and d.os.cmdline == "wss=64 rate=0"
    assert d.os.boot_devs == ()  # direct kernel boot: no default boot device
    assert d.memory_allocation == "immediate" and d.preallocated
    assert d.memballoon.model == "none"
    (serial,) = d.serials
    assert serial.type == "unix" and serial.source_mode == "bind"
    assert serial.source_path == "/run/ferry/serial/guest1.sock"
    assert serial.target_port == 0 and serial.target_type == "isa-serial"
    assert str(uuid.UUID(d.uuid)) == d.uuid  # generated, canonical


def test_bytes_and_str_give_the_same_model() -> None:
    a = parse_domain(dom())
    b = parse_domain(dom().encode())
    assert a == b


def test_str_with_encoding_declaration() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + dom().replace("<name>t", "<name>tä")
    assert parse_domain(text).name == "tä"
    assert parse_domain(text.encode("latin-1")).name == "tä"


def test_wrong_input_type_is_an_xml_error() -> None:
    with pytest.raises(XMLError):
        parse_domain(42)  # type: ignore[arg-type]


# -- units ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unit", "kib"),
    [
        ("1", "b", 1), ("1024", "bytes", 1), ("1025", "byte", 2),
        ("3", "k", 3), ("3", "KiB", 3), ("2", "KB", 2), ("1", "KB", 1),
        ("2", "M", 2048), ("2", "MiB", 2048), ("1", "MB", 977),
        ("1", "G", 1 << 20), ("1", "GiB", 1 << 20), ("1", "GB", 976563),
        ("1", "T", 1 << 30), ("1", "TiB", 1 << 30), ("1", "mib", 1024),
        (" 5 ", "KiB", 5),
    ],
)
def test_memory_units(value: str, unit: str, kib: int) -> None:
    memory = f"<memory unit='{unit}'>{value}</memory>"
    text = dom().replace("<memory unit='MiB'>64</memory>", memory)
    assert parse_domain(text).memory_kib == kib


def test_memory_without_unit_is_kib() -> None:
    text = dom().replace("<memory unit='MiB'>64</memory>", "<memory>219100</memory>")
    d = parse_domain(text)
    assert d.memory_kib == 219100 and d.memory_mib == 214


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ("<memory>0</memory>", "greater than 0"),
        ("<memory>-1</memory>", "not a non-negative integer"),
        ("<memory>1.5</memory>", "not a non-negative integer"),
        ("<memory unit='parsecs'>1</memory>", "unknown memory unit"),
        ("<memory unit='PiB'>5</memory>", "larger than"),
    ],
)
def test_bad_memory(memory: str, message: str) -> None:
    text = dom().replace("<memory unit='MiB'>64</memory>", memory)
    err = refused(text)
    assert message in str(err)
    assert err.details["element"] == "domain/memory"
    assert err.details["line"] == 4


def test_current_memory() -> None:
    d = parse_domain(dom(extra="<currentMemory unit='MiB'>32</currentMemory>"))
    assert d.current_memory_kib == 32 * 1024
    err = refused(dom(extra="<currentMemory unit='MiB'>128</currentMemory>"))
    assert "larger than memory" in str(err)


def test_vcpu() -> None:
    d = parse_domain(dom(extra="<vcpu placement='static' cpuset='1-4,8-20,^9'>3</vcpu>"))
    assert (d.vcpus, d.vcpu_placement, d.vcpu_cpuset) == (3, "static", "1-4,8-20,^9")
    assert parse_domain(dom()).vcpus == 1
    assert "out of range" in str(refused(dom(extra="<vcpu>0</vcpu>")))
    assert "invalid cpuset" in str(refused(dom(extra="<vcpu cpuset='a-b'>1</vcpu>")))


# -- identity -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("a/b", "contains '/'"),
        (".hidden", "starts with '.'"),
        ("x" * 201, "longer than 200"),
        ("a&#10;b", "control character"),
        ("a&#9;b", "control character"),
        (" padded", "white space"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    err = refused(dom().replace("<name>t</name>", f"<name>{name}</name>"))
    assert message in str(err)
    assert err.details["element"] == "domain/name" and err.details["line"] == 2


def test_name_limits_and_renamed() -> None:
    d = parse_domain(dom().replace("<name>t</name>", f"<name>{'x' * 200}</name>"))
    assert len(d.name) == 200
    r = d.renamed("other-name")
    assert r.name == "other-name" and r.uuid == d.uuid and r.disks == d.disks
    for bad in ("", "a/b", ".x", "nul\0byte", "new\nline"):
        with pytest.raises(XMLError):
            d.renamed(bad)


def test_uuid_forms() -> None:
    text = dom().replace("c7a5fdbd-edaf-9455-926a-d65c16db1809", "C7A5FDBDEDAF9455926AD65C16DB1809")
    assert parse_domain(text).uuid == "c7a5fdbd-edaf-9455-926a-d65c16db1809"
    err = refused(dom().replace("c7a5fdbd-edaf-9455-926a-d65c16db1809", "not-a-uuid"))
    assert "invalid UUID" in str(err) and err.details["line"] == 3
    a = parse_domain(dom().replace("<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>", ""))
    b = parse_domain(dom().replace("<uuid>c7a5fdbd-edaf-9455-926a-d65c16db1809</uuid>", ""))
    assert a.uuid != b.uuid  # generated per definition, like libvirt


def test_title_description_metadata() -> None:
    text = dom(extra=(
        "<title>Short</title><description>two\nlines &amp; more</description>"
        "<metadata><!-- keep me --><a:x xmlns:a='urn:a' k='v'>t</a:x></metadata>"
    ))
    d = parse_domain(text)
    assert d.title == "Short"
    assert d.description == "two\nlines & more"
    assert d.metadata == '<!-- keep me --><a:x xmlns:a="urn:a" k="v">t</a:x>'
    assert "control character" in str(refused(dom(extra="<title>a&#10;b</title>")))


def test_domain_type_and_root() -> None:
    err = refused(dom().replace("type='qemu'", "type='xen'"), XMLUnsupported)
    assert "domain type 'xen'" in str(err)
    assert "required" in str(refused(dom().replace(" type='qemu'", "")))
    err = refused("<notdomain/>")
    assert "expected <domain>" in str(err)
    # libvirt's live XML carries the runtime id: accepted and ignored.
    assert parse_domain(dom(head=" id='12'")).name == "t"


# -- defaults ---------------------------------------------------------------------


def test_defaults_filled_in_like_libvirt() -> None:
    d = parse_domain(dom(
        "<disk type='file'><source file='/img/a.img'/><target dev='vdb'/></disk>"
        "<disk type='file' device='cdrom'><target dev='hdc'/></disk>"
        "<interface type='user'/>"
        "<graphics type='vnc'/>"
        "<console type='pty'/>"
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    ))
    assert d.os.boot_devs == ("hd",)
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == ("destroy", "restart", "destroy")
    assert d.clock.offset == "utc"
    assert d.memballoon.model == "virtio"
    assert d.disks[0].target_bus == "virtio" and d.disks[0].format is None
    assert d.disks[1].target_bus == "ide" and d.disks[1].readonly and d.disks[1].source is None
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", d.interfaces[0].mac)
    g = d.graphics[0]
    assert g.autoport and g.port is None
    assert [v.model for v in d.videos] == ["vga"]
    assert d.consoles[0].target_type == "serial" and d.consoles[0].target_port == 0
    assert d.channels[0].source_mode == "bind" and d.channels[0].source_path is None


def test_os_machine_and_boot() -> None:
    d = parse_domain(dom(os=(
        "<os><type machine='pc-q35-7.2'>hvm</type><boot dev='cdrom'/><boot dev='network'/>"
        "<bootmenu enable='yes' timeout='500'/></os>"
    )))
    assert d.os.machine == "pc-q35-7.2" and d.os.is_q35 and d.os.arch == "x86_64"
    assert d.os.boot_devs == ("cdrom", "network")
    assert d.os.bootmenu is True and d.os.bootmenu_timeout == 500
    err = refused(dom(os="<os><type machine='microvm'>hvm</type></os>"), XMLUnsupported)
    assert "machine type 'microvm'" in str(err)
    # A character reference survives attribute normalisation: no trailing newline sneaks in.
    refused(dom(os="<os><type machine='pc&#10;'>hvm</type></os>"), XMLUnsupported)
    refused(dom(extra="<vcpu cpuset='1&#10;'>1</vcpu>"))
    err = refused(dom(os="<os><type>xen</type></os>"), XMLUnsupported)
    assert "os type 'xen'" in str(err)
    err = refused(dom(os="<os><type>hvm</type><boot dev='fd'/></os>"), XMLUnsupported)
    assert "boot device 'fd'" in str(err)
    err = refused(dom(os="<os><type>hvm</type><cmdline>x</cmdline></os>"))
    assert "need a <kernel>" in str(err)


def test_cpu_features_clock_pm() -> None:
    d = parse_domain(dom(extra=(
        "<vcpu>4</vcpu>"
        "<cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model>"
        "<topology sockets='2' cores='2' threads='1'/>"
        "<feature policy='disable' name='svm'/><feature name='pcid'/></cpu>"
        "<features><acpi/><apic eoi='on'/><pae/></features>"
        "<clock offset='localtime'><timer name='rtc' tickpolicy='catchup'/>"
        "<timer name='hpet' present='no'/></clock>"
        "<pm><suspend-to-mem enabled='no'/></pm>"
    )))
    assert d.cpu is not None and d.cpu.model == "qemu64" and d.cpu.topology is not None
    assert (d.cpu.topology.sockets, d.cpu.topology.dies, d.cpu.topology.cores) == (2, 1, 2)
    assert [(f.name, f.policy) for f in d.cpu.features] == [("svm", "disable"),
                                                           ("pcid", "require")]
    assert d.features.acpi and d.features.apic and d.features.apic_eoi and d.features.pae
    assert d.clock.offset == "localtime" and len(d.clock.timers) == 2
    assert d.pm.suspend_to_mem is False and d.pm.suspend_to_disk is None
    err = refused(dom(extra="<vcpu>3</vcpu><cpu><topology sockets='2'/></cpu>"))
    assert "topology gives 2 vCPUs" in str(err)
    err = refused(dom(extra="<features><gic version='3'/></features>"), XMLUnsupported)
    assert err.details["element"] == "domain/features/gic"
    err = refused(dom(extra="<clock><timer name='tsc' frequency='1'/></clock>"), XMLUnsupported)
    assert err.details["element"] == "domain/clock/timer"


def test_lifecycle_values() -> None:
    d = parse_domain(dom(extra="<on_reboot>destroy</on_reboot><on_crash>preserve</on_crash>"))
    assert d.on_reboot == "destroy" and d.on_crash == "preserve"
    err = refused(dom(extra="<on_reboot>explode</on_reboot>"), XMLUnsupported)
    assert err.details["element"] == "domain/on_reboot"


def test_memory_backing_only_allocation() -> None:
    d = parse_domain(dom(extra="<memoryBacking><allocation mode='ondemand'/></memoryBacking>"))
    assert d.memory_allocation == "ondemand" and not d.preallocated
    d = parse_domain(dom(extra="<memoryBacking><allocation mode='immediate' threads='4'/>"
                               "</memoryBacking>"))
    assert d.preallocated and d.prealloc_threads == 4
    for child in ("<locked/>", "<nosharepages/>", "<source type='file'/>", "<discard/>"):
        err = refused(dom(extra=f"<memoryBacking>{child}</memoryBacking>"), XMLUnsupported)
        assert err.details["element"].startswith("domain/memoryBacking/")


# -- devices ----------------------------------------------------------------------


def test_disks() -> None:
    d = parse_domain(dom(
        "<disk type='block' device='disk'>"
        "<driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>"
        "<source dev='/dev/vg/x'/><target dev='sda' bus='sata'/><shareable/></disk>"
        "<disk type='file'><driver name='qemu' type='raw' event_idx='on'/>"
        "<source file='/img/b.img'/><target dev='vdb' bus='virtio'/><readonly/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/></disk>"
    ))
    a, b = d.disks
    assert (a.type, a.source, a.format, a.cache, a.io, a.discard) == (
        "block", "/dev/vg/x", "qcow2", "none", "native", "unmap")
    assert a.shareable and a.target_bus == "sata"
    assert b.readonly and b.event_idx is True and b.address is not None and b.address.slot == 7


@pytest.mark.parametrize(
    ("disk", "cls", "message"),
    [
        ("<disk type='network'><target dev='vda'/></disk>", XMLUnsupported, "disk type 'network'"),
        ("<disk type='file' device='floppy'><source file='/a'/><target dev='fda'/></disk>",
         XMLUnsupported, "disk device 'floppy'"),
        ("<disk type='file'><source file='/a'/><target dev='vda' bus='fdc'/></disk>",
         XMLUnsupported, "disk bus 'fdc'"),
        ("<disk type='file'><source file='/a'/><target dev='vda'/><boot order='1'/></disk>",
         XMLUnsupported, "element <boot>"),
        ("<disk type='file'><source file='/a'/><target dev='vda'/><serial>x</serial></disk>",
         XMLUnsupported, "element <serial>"),
        ("<disk type='file' snapshot='no'><source file='/a'/><target dev='vda'/></disk>",
         XMLUnsupported, "attribute 'snapshot'"),
        ("<disk type='file'><driver name='qemu' type='vmdk'/><source file='/a'/>"
         "<target dev='vda'/></disk>", XMLUnsupported, "disk format 'vmdk'"),
        ("<disk type='file'><source file='/a'/><target dev='xvda'/></disk>", XMLError,
         "invalid disk target"),
        ("<disk type='file'><target dev='vda'/></disk>", XMLError, "has no source"),
        ("<disk type='file' device='cdrom'><source file='/a.iso'/><target dev='vdc' bus='virtio'/>"
         "</disk>", XMLUnsupported, "cdrom on the virtio bus"),
        ("<disk type='file'><source dev='/dev/sda'/><target dev='vda'/></disk>", XMLError,
         "takes <source file="),
        ("<disk type='file'><driver io='native'/><source file='/a'/><target dev='vda'/></disk>",
         XMLError, "io='native' needs cache"),
    ],
)
def test_disk_refusals(disk: str, cls: type[XMLError], message: str) -> None:
    text = dom(disk)
    err = refused(text, cls)
    assert message in str(err)
    assert err.details["line"] == line_of(text, "<disk")


def test_duplicates_and_address_conflicts() -> None:
    two = "<disk type='file'><source file='/a'/><target dev='vda'/></disk>" * 2
    assert "used twice" in str(refused(dom(two)))
    clash = (
        "<interface type='user'><address type='pci' domain='0' bus='0' slot='5'/></interface>"
        "<memballoon model='virtio'><address type='pci' slot='0x05' function='0'/></memballoon>"
    )
    assert "slot 0x05 function 0 is used by both" in str(refused(dom(clash)))
    err = refused(dom("<controller type='pci' index='1' model='pcie-root-port'/>"),
                  XMLUnsupported)
    assert "pci controller model 'pcie-root-port' needs the q35 machine" in str(err)
    err = refused(dom("<memballoon model='virtio'><address type='pci' bus='1' slot='1'/>"
                      "</memballoon>"))
    assert "names bus 0x01, which does not exist" in str(err)
    assert "more than once" in str(refused(dom(extra="<vcpu>1</vcpu><vcpu>2</vcpu>")))


@pytest.mark.parametrize(
    ("devices", "element"),
    [
        ("<hostdev mode='subsystem' type='scsi'/>", "domain/devices/hostdev"),
        ("<filesystem type='mount'/>", "domain/devices/filesystem"),
        ("<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/>"
         "</backend></tpm>", "domain/devices/tpm/backend"),
        ("<smartcard mode='passthrough' type='spicevmc'/>", "domain/devices/smartcard"),
        ("<shmem name='x'/>", "domain/devices/shmem"),
        ("<interface type='user'><boot order='1'/></interface>",
         "domain/devices/interface/boot"),
        ("<video><model type='vga'/><acceleration accel3d='yes'/></video>",
         "domain/devices/video/acceleration"),
    ],
)
def test_unsupported_devices_name_element_and_line(devices: str, element: str) -> None:
    text = dom(devices)
    err = refused(text, XMLUnsupported)
    assert err.details["element"] == element
    assert err.details["line"] == line_of(text, devices[:8])
    # The located line, on its own (a file with more problems lists them all).
    assert re.search(rf"^( {{2}})?t\.xml:{err.details['line']}: {re.escape(element)}: ",
                     str(err), re.MULTILINE)


@pytest.mark.parametrize(
    ("extra", "element"),
    [
        ("<numatune><memory placement='auto'/></numatune>", "domain/numatune/memory"),
        ("<memtune/>", "domain/memtune"),
        ("<cputune><shares>1024</shares></cputune>", "domain/cputune/shares"),
        ("<seclabel type='none'/>", "domain/seclabel"),
        ("<launchSecurity type='sev'/>", "domain/launchSecurity"),
        ("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'/>",
         "domain/qemu:commandline"),
    ],
)
def test_unsupported_top_level_elements(extra: str, element: str) -> None:
    text = dom(extra=extra)
    err = refused(text, XMLUnsupported)
    assert err.details["element"] == element
    assert err.details["line"] == 6


def test_unsupported_os_children() -> None:
    for child in ("<shim>/x</shim>", "<dtb>/x</dtb>", "<smbios mode='host'/>",
                  "<loader stateless='yes'>/x</loader>"):
        err = refused(dom(os=f"<os><type>hvm</type>{child}</os>"), XMLUnsupported)
        assert err.details["element"].startswith("domain/os/")
    err = refused(dom(os="<os firmware='uboot'><type>hvm</type></os>"), XMLUnsupported)
    assert "firmware" in str(err)


def test_interfaces() -> None:
    d = parse_domain(dom(
        "<interface type='bridge'><mac address='52:54:00:AB:CD:EF'/><source bridge='br0'/>"
        "<model type='virtio'/><mtu size='1400'/></interface>"
        "<interface type='network'><source network='default'/><tune><sndbuf>1600</sndbuf>"
        "</tune></interface>"
    ))
    br, net = d.interfaces
    assert (br.type, br.mac, br.source, br.model, br.mtu) == (
        "bridge", "52:54:00:ab:cd:ef", "br0", "virtio", 1400)
    assert (net.type, net.source, net.sndbuf) == ("network", "default", 1600)
    for bad, cls in (
        ("<interface type='vhostuser'/>", XMLUnsupported),
        ("<interface type='user'><model type='ne2k_pci'/></interface>", XMLUnsupported),
        ("<interface type='user'><mac address='01:00:5e:00:00:01'/></interface>", XMLError),
        ("<interface type='user'><mac address='zz'/></interface>", XMLError),
        ("<interface type='bridge'/>", XMLError),
        ("<interface type='bridge'><source bridge='a,b'/></interface>", XMLError),
    ):
        refused(dom(bad), cls)


def test_graphics_and_video() -> None:
    d = parse_domain(dom(
        "<graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1' websocket='-1'>"
        "<listen type='address' address='127.0.0.1'/></graphics>"
        "<graphics type='spice' port='-1' tlsPort='-1'><image compression='off'/></graphics>"
        "<video><model type='cirrus' vram='16384' heads='1'/></video>"
    ))
    vnc, spice = d.graphics
    assert (vnc.port, vnc.autoport, vnc.listen, vnc.websocket) == (5905, False, "127.0.0.1", -1)
    assert (spice.port, spice.autoport, spice.tls_port) == (None, True, -1)
    assert spice.options[0].element == "image"
    assert d.videos[0].model == "cirrus"
    assert "autoport='no' needs a port" in str(refused(dom("<graphics type='vnc' autoport='no'/>")))
    assert "differs from the listen attribute" in str(refused(dom(
        "<graphics type='vnc' listen='127.0.0.1'><listen type='address' address='::1'/>"
        "</graphics>")))
    err = refused(dom("<graphics type='sdl'/>"), XMLUnsupported)
    assert "graphics type 'sdl'" in str(err)
    err = refused(dom("<graphics type='vnc'><image compression='off'/></graphics>"),
                  XMLUnsupported)
    assert "does not apply to vnc" in str(err)
    err = refused(dom("<video><model type='virtio'/></video>"), XMLUnsupported)
    assert "without <graphics>" in str(err)
    err = refused(dom("<graphics type='vnc'/><video><model type='vga'/></video>"
                      "<video><model type='cirrus'/></video>"), XMLUnsupported)
    assert "secondary video must be qxl or virtio" in str(err)
    assert "invalid listen" in str(refused(dom("<graphics type='vnc' listen='a b'/>")))


def test_chardevs() -> None:
    d = parse_domain(dom(
        "<serial type='pty'><source path='/dev/pts/3'/></serial>"
        "<serial type='file'><source path='/var/log/s.log' append='on'/></serial>"
        "<console type='unix'><source mode='connect' path='/run/c.sock'/>"
        "<target type='virtio'/></console>"
        "<channel type='pty'><target type='virtio' name='org.x'/>"
        "<address type='virtio-serial' controller='0' bus='0' port='2'/></channel>"
    ))
    pty, f = d.serials
    assert pty.source_path is None and pty.target_port == 0  # runtime pty path dropped
    assert f.source_path == "/var/log/s.log" and f.append is True and f.target_port == 1
    assert d.consoles[0].source_mode == "connect" and d.consoles[0].target_type == "virtio"
    assert d.channels[0].address is not None and d.channels[0].address.port == 2
    # A listening unix socket may leave its path to the host (RuntimePaths.run_dir).
    d = parse_domain(dom("<serial type='unix'/>"))
    assert d.serials[0].source_path is None and d.serials[0].source_mode == "bind"
    for bad, cls in (
        ("<serial type='udp'/>", XMLUnsupported),
        ("<serial type='tcp'/>", XMLError),
        ("<serial type='tcp'><source host='127.0.0.1' service='4555'/>"
         "<protocol type='telnets'/></serial>", XMLUnsupported),
        ("<serial type='pty'><protocol type='raw'/></serial>", XMLError),
        ("<serial type='unix'><source mode='connect'/></serial>", XMLError),
        ("<serial type='file'/>", XMLError),
        ("<serial type='pty'><target type='pci-serial'/></serial>", XMLUnsupported),
        ("<serial type='pty'><log file='/x'/></serial>", XMLUnsupported),
        ("<channel type='pty'><target type='guestfwd'/></channel>", XMLUnsupported),
        ("<channel type='pty'/>", XMLError),
        ("<serial type='pty'/><serial type='pty'><target port='0'/></serial>", XMLError),
    ):
        refused(dom(bad), cls)


def test_controllers_inputs_audio_rng() -> None:
    d = parse_domain(dom(
        "<controller type='usb' index='0' model='qemu-xhci' ports='15'/>"
        "<controller type='virtio-serial' index='1' ports='8'/>"
        "<input type='tablet' bus='usb'/><input type='mouse'/>"
        "<audio id='1' type='none'/>"
        "<rng model='virtio'><rate bytes='10' period='100'/><backend model='random'/></rng>"
    ))
    assert [(c.type, c.index, c.model, c.ports) for c in d.controllers] == [
        ("usb", 0, "qemu-xhci", 15), ("virtio-serial", 1, None, 8)]
    assert [(i.type, i.bus) for i in d.inputs] == [("tablet", "usb"), ("mouse", "ps2")]
    assert d.audios[0].type == "none"
    assert d.rngs[0].backend_path == "/dev/urandom" and d.rngs[0].rate_bytes == 10
    err = refused(dom("<rng model='virtio'><backend model='random'>/dev/sda</backend></rng>"))
    assert "rng source '/dev/sda' is not allowed" in str(err)
    refused(dom("<rng model='virtio'><backend model='egd' type='tcp'/></rng>"), XMLUnsupported)
    refused(dom("<controller type='fdc'/>"), XMLUnsupported)
    err = refused(dom("<controller type='usb' model='ich9-uhci1'><master startport='0'/>"
                      "</controller>"))
    assert "needs an ich9-ehci1 controller" in str(err)
    refused(dom("<input type='tablet' bus='ps2'/>"), XMLError)
    q35 = "<os><type machine='q35'>hvm</type></os>"
    err = refused(dom("<disk type='file'><source file='/a'/><target dev='hda'/></disk>", os=q35),
                  XMLUnsupported)
    assert "no IDE bus" in str(err)


# -- paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("relative/kernel", "not an absolute path"),
        ("/a/../etc/shadow", "'..' component"),
        ("/a/./b", "not normalised"),
        ("/a//b", "not normalised"),
        ("/a/b/", "not normalised"),
        ("//a", "not an absolute path"),
        ("/proc/self/mem", "under /proc"),
        ("/sys/kernel/x", "under /sys"),
        ("/dev/sda", "under /dev"),
        ("/proc", "under /proc"),
        ("/a&#10;b", "control character"),
    ],
)
def test_unsafe_paths_are_refused(path: str, message: str) -> None:
    text = dom(os=f"<os><type>hvm</type><kernel>{path}</kernel></os>")
    err = refused(text)
    assert message in str(err)
    assert err.details["element"] == "domain/os/kernel" and err.details["line"] == 5
    # The same rule for a file disk, and for a serial log file.
    err = refused(dom(f"<disk type='file'><source file='{path}'/><target dev='vda'/></disk>"))
    assert message in str(err) and err.details["element"] == "domain/devices/disk/source"
    err = refused(dom(f"<serial type='file'><source path='{path}'/></serial>"))
    assert message in str(err)


def test_block_disks_may_live_under_dev_but_not_proc() -> None:
    d = parse_domain(dom("<disk type='block'><source dev='/dev/mapper/vg-x'/>"
                         "<target dev='vda'/></disk>"))
    assert d.disks[0].source == "/dev/mapper/vg-x"
    refused(dom("<disk type='block'><source dev='/proc/x'/><target dev='vda'/></disk>"))
    refused(dom("<channel type='unix'><source path='/dev/log'/><target type='virtio'/>"
                "</channel>"))


def test_unix_socket_path_length() -> None:
    long_path = "/run/" + "x" * 120
    err = refused(dom(f"<serial type='unix'><source path='{long_path}'/></serial>"))
    assert "longer than 107 bytes" in str(err)


# -- hostile and malformed XML ----------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<domain type='qemu'><name>&lol9;</name></domain>
"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<domain type='qemu'><name>&xxe;</name><memory>1</memory><os><type>hvm</type></os></domain>
"""


def test_billion_laughs_is_refused_outright() -> None:
    err = refused(BILLION_LAUGHS)
    assert type(err) is XMLError
    assert "DOCTYPE" in str(err) and err.details["line"] == 2


def test_external_entity_is_refused_and_never_read() -> None:
    err = refused(XXE)
    assert "DOCTYPE" in str(err)
    assert "root:" not in str(err) and "root:" not in repr(err.details)


@pytest.mark.parametrize(
    "text",
    [
        '<!DOCTYPE domain SYSTEM "http://127.0.0.1:1/evil.dtd"><domain type="qemu"/>',
        '<!DOCTYPE domain [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]><domain/>',
        '<?xml version="1.0"?>\n\n<!ENTITY x "y"><domain/>',
    ],
)
def test_any_dtd_is_refused(text: str) -> None:
    err = refused(text)
    assert "DOCTYPE" in str(err) or "ENTITY" in str(err)


def test_doctype_in_utf16_is_refused_too() -> None:
    err = refused(XXE.replace('version="1.0"', 'version="1.0" encoding="UTF-16"')  # type: ignore[arg-type]
                  .encode("utf-16"))
    assert "DOCTYPE" in str(err)


def test_undefined_entity_and_xinclude() -> None:
    assert "not defined" in str(refused(dom().replace("<name>t", "<name>&x;t")))
    err = refused(dom(extra="<xi:include xmlns:xi='http://www.w3.org/2001/XInclude' "
                            "href='/etc/passwd'/>"), XMLUnsupported)
    assert err.details["element"] == "domain/xi:include"


def test_oversized_document() -> None:
    text = dom(extra="<description>" + "x" * MAX_XML_BYTES + "</description>")
    err = refused(text)
    assert "byte limit" in str(err) and err.details["limit"] == MAX_XML_BYTES
    # Just under the limit is fine.
    small = dom(extra="<description>" + "x" * (MAX_XML_BYTES - 1000) + "</description>")
    assert parse_domain(small).description is not None


def test_deep_nesting_is_refused() -> None:
    refused("<domain>" + "<a>" * 10000 + "</a>" * 10000 + "</domain>")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("<domain type='qemu'>\n<name>x</nam>\n</domain>", 2),
        ("<domain type='qemu'>\n\n\n<name>x</name>", 4),
        ("", 1),
        ("<domain type='qemu' type='kvm'/>", 1),
    ],
)
def test_malformed_xml_reports_the_line(text: str, line: int) -> None:
    err = refused(text)
    assert "malformed XML" in str(err) and err.details["line"] == line
    assert str(err).startswith(f"t.xml:{line}: ")


def test_stray_text_is_refused() -> None:
    err = refused(dom("<memballoon model='none'/>stray"))
    assert "unexpected text" in str(err)
