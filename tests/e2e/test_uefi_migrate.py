"""A UEFI guest migrates live with its firmware variables (issue 14).

OVMF (Debian's ``ovmf``) boots to the UEFI shell on a serial line; the
guest is ``type='qemu'`` (TCG: OVMF does not run under this host's nested
KVM). Through the shell the test writes a non-volatile UEFI variable
(``setvar … -nv -bs``: the firmware stores it in the flash, i.e. the VM's
NVRAM file) and a volatile shell environment variable (``set -v``: guest
RAM only; a plain ``set`` would be non-volatile, stored in the NVRAM too). The
guest then migrates live to the other host, whose Prepare created its own
NVRAM file from the template (each host keeps its NVRAM files under its own
state directory: no shared storage). On the destination the same shell
answers, both variables are there, the destination's NVRAM *file* holds
the variable (qemu's pflash post-load wrote the migrated flash back), the
source runs nothing and, with ``--undefine-source``, kept no NVRAM file.
Finally the guest is destroyed and booted afresh on the destination from
that file alone: the variable is still there, the RAM-only one is not.

Three cases: plain OVMF, migrated peer-to-peer; secure-boot OVMF (SMM on,
the flash writable from SMM only), migrated tunnelled; plain OVMF with an
NVRAM file the operator named on storage both hosts see, which the
destination uses in place (same inode, nothing created) and which outlives
the definitions. A last test breaks the migration after B's Prepare created
its file: B removes that file, A runs on with its own.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from cluster import Cluster, HostEnv, wait_until

pytestmark = pytest.mark.e2e

#: A vendor GUID of our own (the EFI global GUID refuses names it does not define).
GUID = "6f3c2a8e-5b1d-4e7a-9c40-f3e2d1c0b9a8"
VALUE = "before"

FIRMWARE = {
    # 60-edk2-x86_64.json: no secure boot, no SMM.
    "plain": "<feature enabled='no' name='secure-boot'/>",
    # 50-edk2-x86_64-secure.json: secure boot, requires SMM (Ferry turns it on),
    # no keys enrolled (the shell, not signed by anyone, may still run).
    "secure": "<feature enabled='yes' name='secure-boot'/>"
              "<feature enabled='no' name='enrolled-keys'/>",
}


TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def uefi_xml(name: str, features: str, nvram: Path | None = None, tpm: bool = False) -> str:
    """A q35 UEFI guest with nothing but a serial console Ferry places (and a TPM).

    ``nvram``: an NVRAM file of the operator's (else Ferry's per-host default).
    """
    nvram_el = f"<nvram>{nvram}</nvram>" if nvram is not None else ""
    tpm_el = TPM if tpm else ""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='q35'>hvm</type>
    <firmware>{features}</firmware>{nvram_el}
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='unix'><source mode='bind'/><target port='0'/></serial>
    <memballoon model='none'/>{tpm_el}
  </devices>
</domain>
"""


class UefiShell:
    """The UEFI shell on a serial socket: typed into a character at a time.

    The shell echoes each key; under TCG it reads the 16550 slowly, and
    keys sent faster than it echoes them are lost, so each one waits for
    its echo.
    """

    PROMPT = b"Shell> "

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(0.5)
        wait_until(lambda: self._connect(path), 30, f"serial socket {path}")
        self.buf = b""

    def _connect(self, path: Path) -> bool:
        try:
            self.sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()

    def _recv(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            raise ConnectionError(f"serial line closed; last output: {self.buf[-300:]!r}")
        self.buf += data

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Output up to and including ``marker``; pressing ESC at the startup.nsh countdown."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if b"startup.nsh" in self.buf and marker == self.PROMPT:
                self.sock.sendall(b"\x1b")  # skip the countdown
                self.buf = self.buf.replace(b"startup.nsh", b"")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {marker!r} after {timeout:.0f}s: {self.buf[-300:]!r}")
            self._recv()
        end = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def boot(self, timeout: float = 120) -> None:
        """Wait for the first prompt (~10 s under TCG)."""
        self.read_until(self.PROMPT, timeout)

    def run(self, command: str, timeout: float = 60) -> str:
        """Type ``command``, press enter, return its output up to the next prompt."""
        self.buf = b""
        for ch in command.encode():
            self.sock.sendall(bytes([ch]))
            deadline = time.monotonic() + 10
            while bytes([ch]) not in self.buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the shell did not echo {chr(ch)!r}: {self.buf!r}")
                self._recv()
            self.buf = b""
        self.sock.sendall(b"\r")
        return self.read_until(self.PROMPT, timeout).decode(errors="replace")


def nvram_file(host: HostEnv, name: str) -> Path:
    """Ferry's default NVRAM file of ``name`` on ``host``."""
    return host.state_dir / "nvram" / f"{name}_VARS.fd"


def holds_probe(path: Path) -> bool:
    """The variable's name and value, as the firmware stores them (UCS-2)."""
    data = path.read_bytes()
    return "FerryProbe".encode("utf-16-le") in data and VALUE.encode("utf-16-le") in data


def tpm_permall(host: HostEnv, uuid: str) -> bytes:
    """The TPM 2.0's permanent state (seeds, NV) as the host's swtpm keeps it."""
    return (host.state_dir / "swtpm" / uuid / "tpm2" / "tpm2-00.permall").read_bytes()


@pytest.mark.parametrize(("firmware", "mode", "shared", "tpm"), [
    ("plain", "p2p", False, False),
    ("secure", "tunnelled", False, False),
    # An NVRAM file both hosts see (the test hosts share a file system): the same file.
    ("plain", "p2p", True, False),
    # What virt-manager makes for Windows 11: secure boot and a TPM 2.0 (crb).
    ("secure", "p2p", False, True),
])
def test_uefi_guest_migrates_with_its_variables(
    cluster: Cluster, tmp_path: Path, firmware: str, mode: str, shared: bool, tpm: bool
) -> None:
    a, b = cluster.a, cluster.b
    cluster.start()
    name = f"uefi-{firmware}" + ("-shared" if shared else "") + ("-tpm" if tpm else "")
    xml = tmp_path / f"{name}.xml"
    shared_file = tmp_path / f"{name}_VARS.fd" if shared else None
    xml.write_text(uefi_xml(name, FIRMWARE[firmware], shared_file, tpm=tpm))
    a_file = shared_file or nvram_file(a, name)
    b_file = shared_file or nvram_file(b, name)
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", name, check=True)
    shell = UefiShell(a.serial_socket(name))
    try:
        shell.boot()
        live = a.ferryctl("dumpxml", name, check=True).stdout
        if firmware == "secure":
            assert "OVMF_CODE_4M.secboot.fd" in live and 'secure="yes"' in live, live
            assert '<smm state="on"/>' in live, live
        else:
            assert "OVMF_CODE_4M.fd" in live and 'secure="no"' in live, live
        out = shell.run(f'setvar FerryProbe -guid {GUID} -nv -bs =L"{VALUE}"')
        assert "Unable" not in out, out
        shell.run("set -v FERRYMEM ram-survived")  # -v: volatile (RAM); plain set is NV
        assert "ram-survived" in shell.run("echo %FERRYMEM%")
        assert holds_probe(a_file)  # the firmware wrote it to A's file
        assert not nvram_file(b, name).exists()
        inode = a_file.stat().st_ino
        uuid = str(a.ctl_json("dominfo", name)["uuid"])
        # The TPM's identity (its seeds, made when A first started it); the
        # firmware measured the boot into it (volatile state, moved too).
        tpm_before = tpm_permall(a, uuid) if tpm else b""

        args = ["migrate", name, b.uri, "--live", "--persistent", "--undefine-source"]
        if mode == "tunnelled":
            args.append("--tunnelled")
        moved = a.ferryctl(*args, timeout=300)
        assert moved.returncode == 0, moved.stderr + cluster.logs()
        assert b.domain_state(name) == "running"
        assert a.domain_state(name) is None and a.qemu_pids() == []
        # B's Prepare made the file from the template; qemu wrote the
        # migrated flash into it when B's CPUs started.
        assert holds_probe(b_file)
        if tpm:
            # B's swtpm started empty; the stream brought A's TPM state.
            assert tpm_permall(b, uuid) == tpm_before
        if shared:
            # Used in place, never replaced; the operator's file outlives A's definition.
            assert b_file.stat().st_ino == inode and not nvram_file(b, name).exists()
            assert "created the NVRAM file" not in b.agent_log("destination")
        else:
            assert not a_file.exists()  # undefined on A, with its NVRAM file

        shell.close()
        shell = UefiShell(b.serial_socket(name))
        assert "ram-survived" in shell.run("echo %FERRYMEM%")
        out = shell.run(f"dmpstore FerryProbe -guid {GUID}")
        assert "FerryProbe" in out and "b.e.f.o.r.e" in out, out

        # A fresh boot on B, from B's NVRAM file alone.
        shell.close()
        b.ferryctl("destroy", name, check=True)
        b.ferryctl("start", name, check=True)
        shell = UefiShell(b.serial_socket(name))
        shell.boot()
        out = shell.run(f"dmpstore FerryProbe -guid {GUID}")
        assert "FerryProbe" in out and "b.e.f.o.r.e" in out, out
        assert "ram-survived" not in shell.run("echo %FERRYMEM%")
        b.ferryctl("destroy", name, check=True)
        b.ferryctl("undefine", name, check=True)
        assert b_file.exists() == shared  # Ferry's own file goes with the definition
    finally:
        shell.close()


def test_failed_migration_removes_only_the_nvram_file_prepare_created(
    cluster: Cluster, tmp_path: Path
) -> None:
    """B's Prepare created an NVRAM file; the migration fails: B removes it, A keeps its own."""
    a, b = cluster.a, cluster.b
    fast = {"migration.reply_timeout_s": 8, "migration.outcome_timeout_s": 5}
    a.write_config(**fast)
    # B's reply to Prepare is lost (the connection drops): the source gives up.
    b.write_config(**fast, **{"testing.faults": ["dst.prepare=drop-reply"]})
    cluster.start()
    name = "uefi-fail"
    xml = tmp_path / f"{name}.xml"
    xml.write_text(uefi_xml(name, FIRMWARE["plain"]))
    a.ferryctl("define", str(xml), check=True)
    a.ferryctl("start", name, check=True)
    shell = UefiShell(a.serial_socket(name))
    try:
        shell.boot()
        out = shell.run(f'setvar FerryProbe -guid {GUID} -nv -bs =L"{VALUE}"')
        assert "Unable" not in out, out
        failed = a.ferryctl("migrate", name, b.uri, "--live", timeout=300)
        assert failed.returncode != 0, failed.stdout + cluster.logs()
        assert "created the NVRAM file" in b.agent_log("destination")
        wait_until(lambda: not nvram_file(b, name).exists() and b.qemu_pids() == [], 90,
                   "B to discard the incoming qemu and its NVRAM file")
        assert b.domain_state(name) is None
        # A runs on, with its own file and the variable in the firmware.
        assert a.domain_state(name) == "running" and holds_probe(nvram_file(a, name))
        out = shell.run(f"dmpstore FerryProbe -guid {GUID}")
        assert "b.e.f.o.r.e" in out, out
        a.ferryctl("destroy", name, check=True)
        assert nvram_file(a, name).exists()  # destroy keeps it: it belongs to the definition
    finally:
        shell.close()
