"""virtiofs: the qemu options and the virtiofsd argv (sans I/O), the shared-memory rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.domain import RuntimePaths, parse_domain
from ferry.domain._filesystem import shares_memory, virtiofs_socket, virtiofsd_argv
from ferry.domain.argv import to_qemu_argv
from ferry.errors import QemuLaunchError
from ferry.virtiofs import find_virtiofsd

PATHS = RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/pid"))
SHARED = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
TWO = """<filesystem type='mount' accessmode='passthrough'><driver type='virtiofs'/>
  <source dir='/srv/share'/><target dir='share'/></filesystem>
<filesystem type='mount'><driver type='virtiofs' queue='512'/><source dir='/srv/data'/>
  <target dir='data'/>
  <address type='pci' domain='0x0000' bus='0x00' slot='0x0a' function='0x0'/></filesystem>"""


def dom(devices: str = TWO, backing: str = SHARED, cpu: str = "") -> str:
    return f"""<domain type='kvm'><name>vm</name>
  <uuid>00000000-0000-0000-0000-0000000000aa</uuid>
  <memory unit='KiB'>131072</memory><vcpu>2</vcpu>{backing}{cpu}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>{devices}</devices>
</domain>"""


def _pairs(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == opt]


def test_qemu_gets_a_chardev_and_a_vhost_user_fs_device_per_filesystem() -> None:
    argv = to_qemu_argv(parse_domain(dom()), paths=PATHS, kvm_usable=lambda: True)
    chardevs = [c for c in _pairs(argv, "-chardev") if "chr-vu-fs" in c]
    assert chardevs == ["socket,id=chr-vu-fs0,path=/r/virtiofs/fs0.sock",
                        "socket,id=chr-vu-fs1,path=/r/virtiofs/fs1.sock"]
    devices = [d for d in _pairs(argv, "-device") if d.startswith("vhost-user-fs-pci")]
    assert devices[0].startswith("vhost-user-fs-pci,id=fs0,chardev=chr-vu-fs0,tag=share,bus=")
    assert devices[1] == ("vhost-user-fs-pci,id=fs1,queue-size=512,chardev=chr-vu-fs1,tag=data,"
                          "bus=pcie.0,addr=0xa")
    # The RAM qemu shares with virtiofsd.
    assert any("share=on" in o for o in _pairs(argv, "-object"))


def test_the_sockets_are_in_the_run_dir() -> None:
    assert virtiofs_socket(Path("/run/ferry/vm"), 3) == Path("/run/ferry/vm/virtiofs/fs3.sock")


def test_virtiofsd_argv_hands_over_the_listening_socket() -> None:
    d = parse_domain(dom())
    assert virtiofsd_argv("/usr/lib/qemu/virtiofsd", d, 1, 7) == [
        "/usr/lib/qemu/virtiofsd", "--fd=7", "-f", "-o", "source=/srv/data"]


def test_a_comma_in_the_source_dir_is_refused() -> None:
    d = parse_domain(dom(TWO.replace("/srv/data", "/srv/a,b")))
    with pytest.raises(QemuLaunchError, match="comma"):
        virtiofsd_argv("/v", d, 1, 3)


@pytest.mark.parametrize(("backing", "cpu", "shared"), [
    (SHARED, "", True),
    ("<memoryBacking><access mode='shared'/></memoryBacking>", "", True),
    ("<memoryBacking><source type='memfd'/></memoryBacking>", "", False),
    ("", "", False),
    ("", "<cpu><numa><cell id='0' cpus='0-1' memory='131072' unit='KiB' memAccess='shared'/>"
         "</numa></cpu>", True),
    (SHARED, "<cpu><numa><cell id='0' cpus='0' memory='65536' unit='KiB'/><cell id='1' cpus='1' "
             "memory='65536' unit='KiB' memAccess='private'/></numa></cpu>", False),
])
def test_shared_memory_rule(backing: str, cpu: str, shared: bool) -> None:
    assert shares_memory(parse_domain(dom(backing=backing, cpu=cpu))) is shared


def test_find_virtiofsd(tmp_path: Path) -> None:
    exe = tmp_path / "virtiofsd"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert find_virtiofsd(None, [str(tmp_path / "none"), str(exe)]) == str(exe)
    assert find_virtiofsd(str(exe)) == str(exe)
    assert find_virtiofsd(str(tmp_path / "none"), [str(exe)]) is None
    assert find_virtiofsd(None, [str(tmp_path / "none")]) is None
