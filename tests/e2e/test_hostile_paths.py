"""Issue 11, hostile domain XML: storage paths, names and encodings against live agents.

Each test asserts the text an operator (or a hostile peer) gets back, and
that qemu never opened what it must not: no qemu process exists after a
refusal, and where qemu runs it holds descriptors the agent opened and
checked, not paths it could be tricked into following.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import uuid as uuidlib
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hostile_tools import in_namespace

import testguest
from cluster import Cluster, HostEnv, guest_xml, wait_until
from ferry.config import PathsConfig
from ferry.errors import FerryError
from ferry.flags import MigrationFlags, MigrationParams
from ferry.names import name_limit
from ferry.protocol.cookie import Cookie, Identity
from ferry.rpc import connect_tcp, make_hello
from ferry.tls import TLSFiles, client_context

pytestmark = pytest.mark.e2e

SHADOW_DISK = (
    "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
    "<source file='{path}'/><target dev='vda' bus='virtio'/></disk>"
)


def _allowed(host: HostEnv) -> str:
    """The [storage] allowed list of ``host`` as it appears in refusals."""
    text = host.config_path.read_text()
    line = next(li for li in text.splitlines() if li.startswith("allowed = ") and "/" in li)
    return ", ".join(json.loads(line.split("=", 1)[1]))


@pytest.fixture
def narrow(cluster: Cluster, guest_kernel: Path) -> Cluster:
    """Both hosts allow only the bed's images directory and the guest kernel's directory."""
    images = cluster.tmp / "images"
    images.mkdir()
    for host in (cluster.a, cluster.b):
        host.extra_config["storage.allowed"] = [str(images), str(guest_kernel.parent)]
        host.write_config()
    return cluster.start()


def define(host: HostEnv, tmp: Path, xml: str | bytes, name: str = "d.xml") -> Any:
    path = tmp / name
    if isinstance(xml, str):
        path.write_text(xml)
    else:
        path.write_bytes(xml)
    return host.ferryctl("define", str(path))


def assert_refused(result: Any, message: str, code: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {message} ({code})"


# -- storage paths ---------------------------------------------------------------------


def test_etc_shadow_disk_refused_at_define(
    narrow: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = narrow.a
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type,
                    extra_devices=SHADOW_DISK.format(path="/etc/shadow"))  # fmt: skip
    assert_refused(
        define(a, tmp_path, xml),
        "define: domain/devices/disk[vda]/source: disk path '/etc/shadow' is outside "
        f"[storage] allowed ({_allowed(a)})",
        "path-not-allowed",
    )
    # Through a symlink placed inside the allowed directory: resolved first.
    link = narrow.tmp / "images" / "innocent.img"
    link.symlink_to("/etc/shadow")
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type,
                    extra_devices=SHADOW_DISK.format(path=link))  # fmt: skip
    assert_refused(
        define(a, tmp_path, xml),
        f"define: domain/devices/disk[vda]/source: disk path '{link}' (resolves to "
        f"'/etc/shadow') is outside [storage] allowed ({_allowed(a)})",
        "path-not-allowed",
    )
    # A kernel outside the policy is refused the same way.
    assert_refused(
        define(a, tmp_path, guest_xml("g1", Path("/etc/shadow"), virt_type=virt_type)),
        "define: domain/os/kernel: kernel path '/etc/shadow' is outside "
        f"[storage] allowed ({_allowed(a)})",
        "path-not-allowed",
    )
    assert a.ctl_json("list", "--all") == []
    assert a.qemu_pids() == []


def test_symlink_swapped_after_define_is_refused_at_start(
    narrow: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = narrow.a
    images = narrow.tmp / "images"
    (images / "real.img").write_bytes(b"\0" * (1 << 20))
    link = images / "disk.img"
    link.symlink_to(images / "real.img")
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type, disks=[(str(link), "none")])
    assert define(a, tmp_path, xml).returncode == 0
    # The attacker (anyone who can write the images directory) swaps the
    # checked link to point outside.
    link.unlink()
    link.symlink_to("/etc/shadow")
    assert_refused(
        a.ferryctl("start", "g1"),
        f"start: domain/devices/disk[vda]/source: disk path '{link}' (resolves to "
        f"'/etc/shadow') is outside [storage] allowed ({_allowed(a)})",
        "path-not-allowed",
    )
    assert a.qemu_pids() == []
    assert a.domain_state("g1") == "shut off"


def test_qemu_gets_descriptors_not_paths(
    narrow: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = narrow.a
    image = narrow.tmp / "images" / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type, disks=[(str(image), "none")])
    with_serial = testguest.SerialReader  # the guest must really boot from the passed fd
    (tmp_path / "g1.xml").write_text(xml)
    a.ferryctl("define", str(tmp_path / "g1.xml"), check=True)
    a.ferryctl("start", "g1", check=True)
    with with_serial(a.serial_socket("g1")) as serial:
        serial.wait_for_boot(timeout=60)
    (pid,) = a.qemu_pids()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    joined = " ".join(argv)
    # The image and the kernel are named by descriptor only.
    assert str(image) not in joined and str(guest_kernel) not in joined
    assert "-add-fd" in argv and "filename=/dev/fdset/1," in joined
    kernel_arg = argv[argv.index("-kernel") + 1]
    assert kernel_arg.startswith("/proc/self/fd/")
    held = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert str(image) in held
    # Swapping the path now changes nothing for the running qemu: its
    # descriptor is the checked file.
    image.rename(image.with_suffix(".moved"))
    image.symlink_to("/etc/shadow")
    held = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert "/etc/shadow" not in held and str(image.with_suffix(".moved")) in held


def hostile_prepare(cluster: Cluster, xml: str, *, dname: str | None = None) -> FerryError:
    """Host A's certificate, sending B a Prepare of ``xml`` directly; B's refusal."""
    a, b = cluster.a, cluster.b
    files = TLSFiles(ca=a.pki_dir / "ca.pem", cert=a.pki_dir / "a.pem",
                     key=a.pki_dir / "a-key.pem")  # fmt: skip
    domain_uuid = str(uuidlib.uuid4())
    xml = xml.replace("<name>", f"<uuid>{domain_uuid}</uuid><name>", 1)
    name = xml.split("<name>", 1)[1].split("</name>", 1)[0]
    cookie = Cookie().with_identity(Identity(name=name, uuid=domain_uuid, hostname="a",
                                             host_uuid=a.host_uuid,
                                             migration_id=uuidlib.uuid4().hex))  # fmt: skip

    async def run() -> FerryError:
        hello = make_hello(a.host_uuid, "a", "source")
        session = await connect_tcp(
            b.ns.address, 49160, hello, ssl_context=client_context(files), server_hostname="b"
        )
        try:
            await session.request("prepare", {
                "xml": xml, "cookie": cookie.encode(),
                "flags": int(MigrationFlags.LIVE | MigrationFlags.PEER2PEER),
                "params": MigrationParams(dest_name=dname).to_wire(),
            }, timeout=60)  # fmt: skip
        except FerryError as exc:
            return exc
        finally:
            await session.close()
        raise AssertionError("prepare was accepted")

    return in_namespace(a.ns.name, lambda: asyncio.run(run()))


def test_etc_shadow_disk_refused_in_a_peers_prepare(
    narrow: Cluster, guest_kernel: Path, virt_type: str
) -> None:
    xml = guest_xml("g1", guest_kernel, virt_type=virt_type,
                    extra_devices=SHADOW_DISK.format(path="/etc/shadow"))  # fmt: skip
    err = hostile_prepare(narrow, xml)
    assert err.code == "path-not-allowed"
    assert err.message == (
        "prepare: domain/devices/disk[vda]/source: disk path '/etc/shadow' is outside "
        f"[storage] allowed ({_allowed(narrow.b)})"
    )
    assert narrow.b.qemu_pids() == []
    # A rename to a name that cannot work, or that could pass for another.
    clean = guest_xml("g1", guest_kernel, virt_type=virt_type)
    err = hostile_prepare(narrow, clean, dname="g1\u202eevil")
    assert err.code == "name-invalid"
    assert "contains U+202E (a bidirectional override, isolate or mark" in err.message
    limit = name_limit(PathsConfig(run_dir=narrow.b.run_dir))[0]
    err = hostile_prepare(narrow, clean, dname="x" * 200)
    assert err.code == "name-invalid"
    assert f"domain name is 200 bytes long (UTF-8); on this host at most {limit} bytes fit" \
        in err.message
    assert narrow.b.qemu_pids() == []
    assert narrow.b.ctl_json("list", "--all") == []


# -- names --------------------------------------------------------------------------------


def test_names_that_are_valid_are_names_that_work(
    narrow: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = narrow.a
    paths = PathsConfig(run_dir=a.run_dir)
    limit = name_limit(paths)[0]
    qmp = f"{paths.qmp_dir}/NAME.destination.sock"
    assert_refused(
        define(a, tmp_path, guest_xml("x" * 200, guest_kernel, virt_type=virt_type)),
        f"define: domain/name: domain name is 200 bytes long (UTF-8); on this host at most "
        f"{limit} bytes fit: the QMP socket {qmp} must fit in the 107-byte unix socket path "
        "limit (a shorter [paths] run_dir leaves more room)",
        "name-invalid",
    )
    result = define(a, tmp_path, guest_xml("\U0001f600" * 100, guest_kernel, virt_type=virt_type))
    assert_refused(result, "define:2: domain/name: domain name is 400 bytes long (UTF-8), "
                           "longer than 200 bytes", "name-invalid")  # fmt: skip
    result = define(a, tmp_path, guest_xml("vm\u202egnp.exe", guest_kernel, virt_type=virt_type))
    assert_refused(
        result,
        "define:2: domain/name: domain name 'vm\\u202egnp.exe' contains U+202E (a "
        "bidirectional override, isolate or mark, or an invisible character): it could be "
        "made to look like another name",
        "name-invalid",
    )
    assert a.ctl_json("list", "--all") == []
    # The longest name the rule admits really works: define, start, boot.
    longest = "n" * limit
    (tmp_path / "long.xml").write_text(guest_xml(longest, guest_kernel, virt_type=virt_type))
    a.ferryctl("define", str(tmp_path / "long.xml"), check=True)
    a.ferryctl("start", longest, check=True)
    with testguest.SerialReader(a.serial_socket(longest)) as serial:
        serial.wait_for_boot(timeout=60)
    assert a.domain_state(longest) == "running"
    a.ferryctl("destroy", longest, check=True)


# -- encodings and size -------------------------------------------------------------------


def test_utf16_and_latin1_files_define(
    cluster: Cluster, guest_kernel: Path, virt_type: str, tmp_path: Path
) -> None:
    a = cluster.a
    a.start_agent("source")
    # One UUID: the second file updates the definition the first made.
    body = guest_xml("caf\u00e9", guest_kernel, virt_type=virt_type, uuid=str(uuidlib.uuid4()))
    for encoding, name in (("UTF-16", "utf16.xml"), ("ISO-8859-1", "latin1.xml")):
        data = f"<?xml version='1.0' encoding='{encoding}'?>\n{body}".encode(encoding)
        result = define(a, tmp_path, data, name)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"Domain 'caf\u00e9' defined from {tmp_path / name}"
    assert [d["name"] for d in a.ctl_json("list", "--all")] == ["caf\u00e9"]
    # latin-1 that does not say so: a clear error, no traceback.
    result = define(a, tmp_path, body.encode("latin-1"), "undeclared.xml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"error: {tmp_path / 'undeclared.xml'}: cannot decode the domain XML: byte 0xe9 at "
        "offset "
    )
    assert "declare it, e.g. <?xml version='1.0' encoding='ISO-8859-1'?>" in result.stderr


def test_10_mb_xml_refusal_names_the_domain_xml_and_the_limit(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = cluster.a
    a.start_agent("source")
    big = "<domain type='qemu'><description>" + "x" * (10 << 20) + "</description></domain>"
    result = define(a, tmp_path, big, "big.xml")
    assert_refused(
        result,
        f"{tmp_path / 'big.xml'}: the domain XML is too large: {len(big)} bytes, more than "
        "the 1048576-byte limit for a domain XML; nothing was sent",
        "xml-invalid",
    )
    # A client that sends it anyway: the agent refuses the frame by its
    # header, before reading it, and says what the limit is.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(a.source_socket))
        sock.sendall(struct.pack(">I", len(big) + 64))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    (length,) = struct.unpack(">I", data[:4])
    reply = msgpack.unpackb(data[4 : 4 + length], raw=False)
    assert reply["error"]["code"] == "frame-too-large"
    assert reply["error"]["message"] == (
        f"frame of {len(big) + 64} bytes refused: the limit is 1048576 bytes ([limits] "
        "max_frame); a request, such as a domain XML, must fit in one"
    )
    wait_until(lambda: a.ferryctl("list").returncode == 0, 10, "the agent to still serve")
