"""to_qemu_argv: goldens, KVM checks, incoming, prealloc, escaping, and real qemu.

Goldens live in tests/unit/golden/domain/*.argv.json (and corpus/ for the
libvirt files); regenerate them with ``FERRY_UPDATE_GOLDEN=1 pytest
tests/unit/test_domain_argv.py`` and review the diff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ferry.domain import (
    Domain,
    GraphicsPorts,
    RuntimePaths,
    kvm_usable,
    parse_domain,
    qemu_disk_ids,
    to_qemu_argv,
)
from ferry.errors import FerryError, QemuLaunchError, XMLUnsupported

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "domain"
UPDATE = os.environ.get("FERRY_UPDATE_GOLDEN") == "1"


def _corpus_dir() -> Path:
    env = os.environ.get("FERRY_SHARED_DIR")
    if env:
        return Path(env) / "libvirt-xml"
    return HERE.parents[1].parent / "shared" / "libvirt-xml"


CORPUS_A = sorted((_corpus_dir() / "a-supported-ish").glob("*.xml"))


def paths_for(name: str, **extra: Any) -> RuntimePaths:
    return RuntimePaths(
        run_dir=Path(f"/run/ferry/chardev/{name}"),
        qmp_socket=Path(f"/run/ferry/qmp/{name}.sock"),
        pidfile=Path(f"/run/ferry/pid/{name}.pid"),
        **extra,
    )


def yes() -> bool:
    return True


GUEST1 = (GOLDEN / "guest1.xml").read_text()


# -- goldens ----------------------------------------------------------------------------

# case name → (xml file, keyword arguments of to_qemu_argv besides paths)
CASES: dict[str, tuple[Path, dict[str, Any], dict[str, Any]]] = {
    "guest1": (GOLDEN / "guest1.xml", {}, {}),
    "guest1-incoming": (GOLDEN / "guest1.xml", {"incoming": True, "paused": True}, {}),
    "q35-kitchen-sink": (
        GOLDEN / "q35-kitchen-sink.xml",
        {"graphics_ports": {1: GraphicsPorts(port=5930, tls_port=5931)}},
        {"log_file": Path("/var/log/ferry/sink.log"),
         "spice_tls_dir": Path("/etc/pki/ferry-spice")},
    ),
}
for _path in CORPUS_A:
    CASES[f"corpus/{_path.stem}"] = (_path, {}, {"spice_tls_dir": Path("/etc/pki/ferry-spice")})


def _run_case(xml: Path, kwargs: dict[str, Any], extra_paths: dict[str, Any]) -> dict[str, Any]:
    domain = parse_domain(xml.read_bytes(), where=xml.name)
    try:
        argv = to_qemu_argv(domain, paths=paths_for(domain.name, **extra_paths), kvm_usable=yes,
                            **kwargs)
    except FerryError as exc:
        return {"refused": type(exc).__name__, "message": str(exc)}
    return {"argv": argv}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_argv_golden(case: str) -> None:
    xml, kwargs, extra_paths = CASES[case]
    got = _run_case(xml, kwargs, extra_paths)
    golden = GOLDEN / f"{case}.argv.json"
    if UPDATE:
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(got, indent=1) + "\n")
    assert golden.exists(), f"missing golden {golden}; run with FERRY_UPDATE_GOLDEN=1"
    assert got == json.loads(golden.read_text())


def test_every_corpus_file_but_the_network_one_builds_an_argv() -> None:
    if not CORPUS_A:
        pytest.skip("no corpus")
    refused = {c for c in CASES if c.startswith("corpus/") and "argv" not in _run_case(*CASES[c])}
    # <interface type='network'> needs libvirt's virtual networks.
    assert refused == {"corpus/net-mtu"}


# -- the shape of the argv ------------------------------------------------------------


def test_typical_guest_argv() -> None:
    d = parse_domain(GUEST1)
    argv = to_qemu_argv(d, paths=paths_for("guest1"), kvm_usable=yes)
    assert argv[0] == "qemu-system-x86_64"
    assert all(isinstance(a, str) for a in argv)
    joined = " ".join(argv)
    assert "-name guest=guest1,debug-threads=on" in joined
    assert f"-uuid {d.uuid}" in joined
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert "-machine pc,accel=kvm,usb=off,dump-guest-core=off,acpi=off,memory-backend=pc.ram" \
        in joined
    assert "-object memory-backend-ram,id=pc.ram,size=268435456,prealloc=on -m 256" in joined
    assert "-smp 1,sockets=1,cores=1,threads=1" in joined
    assert "-kernel /var/lib/ferry/guest.elf" in joined
    assert argv[argv.index("-append") + 1] == "wss=64 rate=0"
    assert "-chardev socket,id=charmonitor,path=/run/ferry/qmp/guest1.sock,server=on,wait=off" \
        in joined
    assert "-mon chardev=charmonitor,id=monitor,mode=control" in joined
    assert argv[argv.index("-pidfile") + 1] == "/run/ferry/pid/guest1.pid" and "-daemonize" in argv
    assert "-display none" in joined and "-msg timestamp=on" in joined
    assert "-sandbox on,obsolete=deny,resourcecontrol=deny" in joined
    assert ("-chardev socket,id=charserial0,path=/run/ferry/serial/guest1.sock,server=on,wait=off"
            " -device isa-serial,chardev=charserial0,id=serial0,index=0") in joined
    assert "virtio-balloon" not in joined  # memballoon model='none'
    assert "-incoming" not in argv and "-S" not in argv and "-D" not in argv


def test_incoming_and_paused() -> None:
    d = parse_domain(GUEST1)
    argv = to_qemu_argv(d, paths=paths_for("g"), kvm_usable=yes, incoming=True, paused=True)
    assert argv[-2:] == ["-incoming", "defer"]
    assert "-S" in argv


def test_prealloc_only_for_immediate_allocation() -> None:
    ondemand = parse_domain(GUEST1.replace("immediate", "ondemand"))
    plain = parse_domain(GUEST1.replace("<memoryBacking><allocation mode='immediate'/>"
                                        "</memoryBacking>", ""))
    for d in (ondemand, plain):
        joined = " ".join(to_qemu_argv(d, paths=paths_for("g"), kvm_usable=yes))
        assert "prealloc" not in joined and "memory-backend" not in joined
        assert "-m 256" in joined
    threads = parse_domain(GUEST1.replace("mode='immediate'", "mode='immediate' threads='4'"))
    joined = " ".join(to_qemu_argv(threads, paths=paths_for("g"), kvm_usable=yes))
    assert "prealloc=on,prealloc-threads=4" in joined


def test_memory_is_rounded_up_to_whole_mib() -> None:
    d = parse_domain(GUEST1.replace("<memory unit='MiB'>256", "<memory unit='KiB'>219100"))
    argv = to_qemu_argv(d, paths=paths_for("g"), kvm_usable=yes)
    assert argv[argv.index("-m") + 1] == "214"
    assert "size=224395264," in " ".join(argv)


# -- KVM ------------------------------------------------------------------------------


def test_kvm_unusable_is_a_clear_error() -> None:
    d = parse_domain(GUEST1)
    with pytest.raises(QemuLaunchError) as info:
        to_qemu_argv(d, paths=paths_for("g"), kvm_usable=lambda: False)
    assert str(info.value).startswith(
        "domain type 'kvm' needs /dev/kvm, which cannot be used here: ")
    assert "type='qemu'" in str(info.value)


def test_default_kvm_check_explains_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ferry.domain.argv.os.path.exists", lambda p: False)
    assert kvm_usable() is False
    with pytest.raises(QemuLaunchError, match="/dev/kvm does not exist"):
        to_qemu_argv(parse_domain(GUEST1), paths=paths_for("g"))


def test_tcg_domains_never_look_at_kvm() -> None:
    def boom() -> bool:
        raise AssertionError("kvm_usable must not be called for type='qemu'")

    d = parse_domain(GUEST1.replace("type='kvm'", "type='qemu'"))
    joined = " ".join(to_qemu_argv(d, paths=paths_for("g"), kvm_usable=boom))
    assert "accel=tcg" in joined


@pytest.mark.parametrize(
    ("cpu", "virt", "expected"),
    [
        ("<cpu mode='host-passthrough'/>", "kvm", "-cpu host"),
        ("<cpu mode='host-passthrough' migratable='off'/>", "kvm", "-cpu host,migratable=off"),
        ("<cpu mode='host-passthrough'/>", "qemu", "-cpu max"),
        ("<cpu mode='host-model'/>", "kvm", "-cpu host"),
        ("<cpu mode='host-model'/>", "qemu", "-cpu max"),
        ("<cpu mode='maximum'/>", "qemu", "-cpu max"),
        ("<cpu><model>Haswell</model><feature policy='forbid' name='hle'/>"
         "<feature policy='force' name='x2apic'/></cpu>", "qemu", "-cpu Haswell,hle=off,x2apic=on"),
        ("<cpu><topology sockets='1' cores='1' threads='1'/></cpu>", "qemu", "-cpu qemu64 "),
        ("<features><apic eoi='on'/></features>", "kvm", "-cpu qemu64,kvm-pv-eoi=on"),
        ("<features><apic eoi='on'/></features>", "qemu", "-m"),
    ],
)
def test_cpu_argument(cpu: str, virt: str, expected: str) -> None:
    xml = GUEST1.replace("type='kvm'", f"type='{virt}'").replace("<os>", cpu + "<os>")
    argv = to_qemu_argv(parse_domain(xml), paths=paths_for("g"), kvm_usable=yes)
    joined = " ".join(argv)
    assert expected in joined
    if expected == "-m":
        assert "-cpu" not in argv


# -- escaping and hostile values -------------------------------------------------------


def _domain(devices: str = "", *, name: str = "g", os: str = "<os><type>hvm</type></os>") -> Domain:
    return parse_domain(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>{os}"
        f"<devices>{devices}<memballoon model='none'/></devices></domain>"
    )


def test_commas_in_values_are_doubled() -> None:
    d = _domain(
        "<disk type='file'><source file='/img/a,b.img'/><target dev='vda'/></disk>"
        "<serial type='unix'><source mode='bind' path='/run/s,1.sock'/></serial>",
        name="a,b",
    )
    argv = to_qemu_argv(d, paths=RuntimePaths(Path("/run/x,y"), Path("/run/q,m.sock"),
                                              Path("/run/p,id")))
    joined = " ".join(argv)
    assert "-name guest=a,,b,debug-threads=on" in joined
    assert "driver=file,filename=/img/a,,b.img,node-name=virtio-disk0-storage" in joined
    assert "socket,id=charserial0,path=/run/s,,1.sock,server=on" in joined
    assert "socket,id=charmonitor,path=/run/q,,m.sock," in joined
    # -pidfile takes the whole argument: no escaping there.
    assert argv[argv.index("-pidfile") + 1] == "/run/p,id"


def test_initrd_with_a_comma_is_refused() -> None:
    d = _domain(os="<os><type>hvm</type><kernel>/k</kernel><initrd>/i,x</initrd></os>")
    with pytest.raises(XMLUnsupported, match="initrd"):
        to_qemu_argv(d, paths=paths_for("g"))


def test_shell_metacharacters_stay_inside_one_argument() -> None:
    evil = "x; rm -rf / $(reboot) `id` | cat > /etc/passwd & 'q' \"d\""
    d = _domain(name="evil $(id);&amp;", os=f"<os><type>hvm</type><kernel>/k</kernel>"
                                        f"<cmdline>{evil.replace('&', '&amp;')}</cmdline></os>")
    argv = to_qemu_argv(d, paths=paths_for("g"))
    assert argv[argv.index("-append") + 1] == evil
    assert argv[argv.index("-name") + 1] == "guest=evil $(id);&,debug-threads=on"
    # Nothing was split or merged: every option is followed by exactly its value.
    assert argv.count("-append") == 1 and argv.count("-name") == 1
    assert all("\0" not in a and "\n" not in a for a in argv)


def test_runtime_paths_with_newlines_are_refused() -> None:
    d = _domain()
    with pytest.raises(QemuLaunchError):
        to_qemu_argv(d, paths=RuntimePaths(Path("/r"), Path("/r/q\n.sock"), Path("/r/p")))
    with pytest.raises(QemuLaunchError):
        to_qemu_argv(d, paths=RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/p\0")))


def test_default_socket_paths_under_run_dir_must_fit() -> None:
    d = _domain("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
                "</channel>")
    argv = to_qemu_argv(d, paths=paths_for("g"))
    assert "path=/run/ferry/chardev/g/org.qemu.guest_agent.0.sock," in " ".join(argv)
    deep = RuntimePaths(Path("/run/" + "d" * 100), Path("/q"), Path("/p"))
    with pytest.raises(QemuLaunchError, match="longer than 107"):
        to_qemu_argv(d, paths=deep)


# -- graphics ports ---------------------------------------------------------------------


def test_vnc_autoport() -> None:
    d = _domain("<graphics type='vnc' autoport='yes' listen='::1'/>")
    joined = " ".join(to_qemu_argv(d, paths=paths_for("g")))
    assert "-vnc [::1]:0,to=99" in joined  # qemu takes the first free display
    joined = " ".join(to_qemu_argv(d, paths=paths_for("g"),
                                   graphics_ports={0: GraphicsPorts(5907)}))
    assert "-vnc [::1]:7 " in joined + " "
    assert "-device VGA,id=video0,bus=pci.0,addr=0x2" in joined


def test_spice_autoport_needs_chosen_ports_and_tls_needs_certificates() -> None:
    d = _domain("<graphics type='spice' autoport='yes'/>")
    with pytest.raises(QemuLaunchError, match="graphics_ports"):
        to_qemu_argv(d, paths=paths_for("g"))
    joined = " ".join(to_qemu_argv(d, paths=paths_for("g"),
                                   graphics_ports={0: GraphicsPorts(5910)}))
    assert "-spice port=5910,addr=127.0.0.1,disable-ticketing=on,seamless-migration=on" in joined
    with pytest.raises(QemuLaunchError, match="spice_tls_dir"):
        to_qemu_argv(d, paths=paths_for("g"), graphics_ports={0: GraphicsPorts(5910, 5911)})


def test_interface_network_is_refused_at_launch() -> None:
    d = _domain("<interface type='network'><source network='default'/></interface>")
    with pytest.raises(XMLUnsupported, match=r"add \[networks.default\] bridge"):
        to_qemu_argv(d, paths=paths_for("g"))


# -- device placement ---------------------------------------------------------------------


def _pci_slots(argv: list[str]) -> list[str]:
    return [a.split("addr=")[1].split(",")[0] for a in argv if "addr=" in a]


def test_explicit_pci_addresses_never_collide_with_automatic_ones() -> None:
    d = _domain(
        "<disk type='file'><source file='/a'/><target dev='vda'/></disk>"
        "<disk type='file'><source file='/b'/><target dev='vdb'/>"
        "<address type='pci' slot='0x02'/></disk>"
        "<interface type='user'/><interface type='user'><address type='pci' slot='3'/></interface>"
        "<rng model='virtio'><backend model='random'/></rng>"
    )
    slots = _pci_slots(to_qemu_argv(d, paths=paths_for("g")))
    assert len(slots) == len(set(slots)) == 5
    assert "0x2" in slots and "0x3" in slots


def test_qemu_disk_ids() -> None:
    d = _domain(
        "<disk type='file'><source file='/a'/><target dev='vdb'/></disk>"
        "<disk type='file'><source file='/b'/><target dev='hdc'/></disk>"
        "<disk type='file'><source file='/c'/><target dev='sdb'/></disk>"
    )
    assert qemu_disk_ids(d) == {"vdb": "virtio-disk1", "hdc": "ide0-1-0", "sdb": "scsi0-0-1-0"}
    joined = " ".join(to_qemu_argv(d, paths=paths_for("g")))
    assert "-device lsi,id=scsi0" in joined  # implicit SCSI controller, libvirt's default
    for ident in ("virtio-disk1", "ide0-1-0", "scsi0-0-1-0"):
        assert f"drive={ident}-format,id={ident}" in joined


# -- real qemu ---------------------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


@contextlib.contextmanager
def _short_tmp() -> Iterator[Path]:
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path is too deep.
    path = Path(tempfile.mkdtemp(prefix="fdom-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _launched(argv: list[str], pidfile: Path) -> Iterator[int]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"qemu refused the argv: {proc.stderr}\n{argv}"
    pid = int(pidfile.read_text().strip())
    try:
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _host_ready(d: Domain, tmp: Path) -> Domain:
    """Point a corpus domain at files that exist here, so that qemu can start it."""
    disks = []
    for i, disk in enumerate(d.disks):
        src = None
        if disk.source is not None:
            img = tmp / f"disk{i}.img"
            if disk.format == "qcow2":
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"],
                               check=True)
            else:
                with img.open("wb") as f:
                    f.truncate(16 << 20)
            src = str(img)
        disks.append(dataclasses.replace(disk, type="file", source=src))

    def local(chars: tuple[Any, ...], tag: str) -> tuple[Any, ...]:
        out = []
        for i, c in enumerate(chars):
            if c.type == "unix" and c.source_path is not None:
                c = dataclasses.replace(c, source_mode="bind", source_path=str(tmp / f"{tag}{i}"))
            elif c.type == "file":
                c = dataclasses.replace(c, source_path=str(tmp / f"{tag}{i}.log"))
            out.append(c)
        return tuple(out)

    # Ports picked at launch (the corpus's fixed ones may be taken here), no TLS.
    graphics = tuple(
        dataclasses.replace(g, autoport=True, port=None, tls_port=None, listen="127.0.0.1",
                            default_mode=None,
                            options=tuple(o for o in g.options if o.element != "channel"))
        for g in d.graphics
    )
    # The syntax is under test, not this host's CPU: a named model's features
    # may be missing here, which enforce (the default check) would refuse.
    cpu = d.cpu if d.cpu is None else dataclasses.replace(d.cpu, check="none")
    return dataclasses.replace(
        d, virt_type="qemu", memory_kib=65536, current_memory_kib=65536, cpu=cpu,
        os=dataclasses.replace(d.os, kernel=None, initrd=None, cmdline=None),
        disks=tuple(disks), serials=local(d.serials, "s"), consoles=local(d.consoles, "c"),
        channels=local(d.channels, "ch"), graphics=graphics,
        interfaces=tuple(dataclasses.replace(n, type="user", source=None)
                         for n in d.interfaces),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@needs_qemu
def test_real_qemu_accepts_a_minimal_domain() -> None:
    with _short_tmp() as tmp:
        d = _domain()
        paths = RuntimePaths(tmp, tmp / "qmp.sock", tmp / "pid")
        argv = to_qemu_argv(d, paths=paths, paused=True, qemu_binary=QEMU or "")
        with _launched(argv, paths.pidfile) as pid:
            assert d.uuid in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            assert (tmp / "qmp.sock").exists()


REAL_CASES = [*CORPUS_A, GOLDEN / "q35-kitchen-sink.xml", GOLDEN / "guest1.xml"]


@needs_qemu
@pytest.mark.parametrize("xml", REAL_CASES, ids=lambda p: p.name)
def test_real_qemu_accepts_the_argv_of(xml: Path) -> None:
    with _short_tmp() as tmp:
        d = _host_ready(parse_domain(xml.read_bytes()), tmp)
        ports = {i: GraphicsPorts(_free_port()) for i, g in enumerate(d.graphics)
                 if g.type == "spice"}
        paths = RuntimePaths(tmp, tmp / "qmp.sock", tmp / "pid")
        argv = to_qemu_argv(d, paths=paths, paused=True, graphics_ports=ports,
                            qemu_binary=QEMU or "")
        with _launched(argv, paths.pidfile):
            pass


class _QMP:
    """Just enough QMP for the migration check (one command at a time)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            msg = json.loads(self.file.readline())
            if "event" not in msg:
                assert "error" not in msg, msg
                return msg["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@needs_qemu
def test_real_prealloc_destination_accepts_a_plain_source() -> None:
    """The RAM block must be called pc.ram, or this migration fails in qemu."""
    plain = _domain()
    prealloc = dataclasses.replace(plain, memory_allocation="immediate")
    with _short_tmp() as tmp:
        src_paths = RuntimePaths(tmp, tmp / "src.sock", tmp / "src.pid")
        dst_paths = RuntimePaths(tmp, tmp / "dst.sock", tmp / "dst.pid")
        src_argv = to_qemu_argv(plain, paths=src_paths, paused=True, qemu_binary=QEMU or "")
        dst_argv = to_qemu_argv(prealloc, paths=dst_paths, incoming=True, qemu_binary=QEMU or "")
        assert "prealloc=on" in " ".join(dst_argv)
        with _launched(src_argv, src_paths.pidfile), _launched(dst_argv, dst_paths.pidfile):
            src, dst = _QMP(src_paths.qmp_socket), _QMP(dst_paths.qmp_socket)
            try:
                uri = f"unix:{tmp / 'mig.sock'}"
                dst.cmd("migrate-incoming", uri=uri)
                src.cmd("migrate", uri=uri)
                deadline = time.monotonic() + 30
                status = ""
                while time.monotonic() < deadline:
                    info = src.cmd("query-migrate")
                    status = info.get("status", "")
                    if status in ("completed", "failed"):
                        break
                    time.sleep(0.1)
                assert status == "completed", info
            finally:
                src.close()
                dst.close()
