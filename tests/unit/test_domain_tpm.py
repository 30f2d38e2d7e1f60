"""``<tpm>`` (issue 14): parsed, formatted back, ABI-checked, turned into qemu and swtpm argv.

What virt-install ``--tpm emulator`` and win11 write is accepted; a host TPM
(passthrough), an encrypted state, an external swtpm and a second TPM are
refused with the reason. The swtpm side (:mod:`ferry.swtpm`) is sans-I/O
here: its argv, swtpm_setup's argv, its paths and the rule for its state
directory. A real swtpm with a real qemu is tests/e2e/test_tpm_migrate.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from ferry.domain import (
    RuntimePaths,
    check_abi_stability,
    format_domain,
    parse_domain,
    to_qemu_argv,
)
from ferry.domain.model import Domain, Tpm
from ferry.errors import ABIError, QemuLaunchError, XMLError, XMLUnsupported
from ferry.swtpm import (
    SwtpmPaths,
    attach_to_scope_argv,
    state_to_remove,
    swtpm_argv,
    swtpm_paths,
    swtpm_setup_argv,
)

UUID = "00000000-0000-0000-0000-0000000000aa"
PATHS = RuntimePaths(
    Path("/run/ferry/serial/vm"), Path("/run/ferry/q.sock"), Path("/run/ferry/vm.pid")
)


def dom(devices: str, machine: str = "q35") -> str:
    return f"""<domain type='kvm'>
  <name>vm</name>
  <uuid>{UUID}</uuid>
  <memory unit='KiB'>65536</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>
    {devices}
  </devices>
</domain>"""


VIRT_INSTALL = "<tpm model='tpm-crb'><backend type='emulator'/></tpm>"


def parsed(devices: str, machine: str = "q35") -> Domain:
    return parse_domain(dom(devices, machine), where="t.xml")


def refused(devices: str) -> XMLError:
    with pytest.raises(XMLError) as info:
        parsed(devices)
    return info.value


def test_virt_install_tpm_round_trips() -> None:
    d = parsed(VIRT_INSTALL)
    assert d.tpms == (Tpm(model="tpm-crb"),)
    assert d.tpms[0].tpm_version == "2.0"
    text = format_domain(d)
    assert '<tpm model="tpm-crb">' in text and '<backend type="emulator"/>' in text
    assert parse_domain(text) == d
    assert format_domain(parse_domain(text)) == text


def test_every_accepted_attribute_round_trips() -> None:
    d = parsed(
        "<tpm model='tpm-tis'><backend type='emulator' version='2.0' "
        "persistent_state='yes'><active_pcr_banks><sha256/><sha384/>"
        "</active_pcr_banks></backend><alias name='tpm0'/></tpm>"
    )
    t = d.tpms[0]
    assert (t.model, t.version, t.persistent_state, t.pcr_banks) == (
        "tpm-tis",
        "2.0",
        True,
        ("sha256", "sha384"),
    )
    text = format_domain(d)
    assert 'persistent_state="yes"' in text and "<sha384/>" in text
    assert parse_domain(text) == d


def test_model_defaults_to_tis_and_tpm_1_2_is_accepted_there() -> None:
    d = parsed("<tpm><backend type='emulator' version='1.2'/></tpm>", machine="pc")
    assert d.tpms == (Tpm(model="tpm-tis", version="1.2"),)
    assert parse_domain(format_domain(d)) == d


@pytest.mark.parametrize(
    ("devices", "element", "message"),
    [
        (
            "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend>"
            "</tpm>",
            "domain/devices/tpm/backend",
            "cannot follow the guest to another host",
        ),
        (
            "<tpm model='tpm-crb'><backend type='external'/></tpm>",
            "domain/devices/tpm/backend",
            "tpm backend 'external' is not supported",
        ),
        (
            "<tpm model='tpm-crb'><backend type='emulator'><encryption secret='"
            "11111111-2222-3333-4444-555555555555'/></backend></tpm>",
            "domain/devices/tpm/backend/encryption",
            "no secret store",
        ),
        (
            "<tpm model='tpm-spapr'><backend type='emulator'/></tpm>",
            "domain/devices/tpm",
            "tpm model 'tpm-spapr' is not supported",
        ),
        (
            "<tpm model='tpm-crb'><backend type='emulator' version='1.2'/></tpm>",
            "domain/devices/tpm/backend",
            "cannot carry a TPM 1.2",
        ),
        ("<tpm model='tpm-crb'/>", "domain/devices/tpm", "needs a <backend>"),
        (
            "<tpm model='tpm-crb'><backend type='emulator' version='3.0'/></tpm>",
            "domain/devices/tpm/backend",
            "tpm version '3.0' is not supported",
        ),
        (
            "<tpm model='tpm-crb'><backend type='emulator'><active_pcr_banks><md5/>"
            "</active_pcr_banks></backend></tpm>",
            "domain/devices/tpm/backend/active_pcr_banks/md5",
            "not supported",
        ),
        (VIRT_INSTALL + VIRT_INSTALL, "domain/devices/tpm", "at most one <tpm>"),
    ],
)
def test_what_cannot_be_done_is_refused_with_the_reason(
    devices: str, element: str, message: str
) -> None:
    err = refused(devices)
    assert message in str(err), str(err)
    assert re.search(rf"t\.xml:\d+: {re.escape(element)}: ", str(err)), str(err)


def test_all_tpm_problems_are_reported_at_once() -> None:
    err = refused(
        "<tpm model='tpm-crb'><backend type='passthrough' version='1.2'>"
        "<encryption secret='x'/></backend></tpm>"
    )
    text = str(err)
    assert "passthrough" in text and "cannot carry a TPM 1.2" in text
    assert "no secret store" in text
    assert isinstance(err, XMLUnsupported)


def test_qemu_argv_connects_to_the_swtpm_socket() -> None:
    for machine, model in (("q35", "tpm-crb"), ("pc", "tpm-tis")):
        d = parsed(f"<tpm model='{model}'><backend type='emulator' version='2.0'/></tpm>", machine)
        argv = to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)
        i = argv.index("-tpmdev")
        assert argv[i - 2 : i + 4] == [
            "-chardev",
            "socket,id=chrtpm,path=/run/ferry/serial/vm/swtpm/ctrl.sock",
            "-tpmdev",
            "emulator,id=tpm-tpm0,chardev=chrtpm",
            "-device",
            f"{model},tpmdev=tpm-tpm0,id=tpm0",
        ]
    assert "-tpmdev" not in to_qemu_argv(parsed(""), paths=PATHS, kvm_usable=lambda: True)


def test_abi_model_and_version_must_match() -> None:
    crb = parsed(VIRT_INSTALL)
    check_abi_stability(crb, crb)
    explicit = parsed(
        "<tpm model='tpm-crb'><backend type='emulator' version='2.0' "
        "persistent_state='yes'><active_pcr_banks><sha1/></active_pcr_banks>"
        "</backend></tpm>"
    )
    # version 2.0 is the default; persistence and PCR banks are the host's (the state moves).
    check_abi_stability(crb, explicit)
    tis = dataclasses.replace(crb, tpms=(Tpm(model="tpm-tis"),))
    with pytest.raises(ABIError, match="tpm 0 model"):
        check_abi_stability(crb, tis)
    with pytest.raises(ABIError, match="tpm 0 version"):
        check_abi_stability(tis, dataclasses.replace(tis, tpms=(Tpm(version="1.2"),)))
    with pytest.raises(ABIError, match="1 tpms vs 0"):
        check_abi_stability(crb, dataclasses.replace(crb, tpms=()))


def _paths(tpm: Tpm | None = None) -> SwtpmPaths:
    tpm = tpm or Tpm(model="tpm-crb")
    return swtpm_paths(
        Path("/var/lib/ferry/swtpm"),
        Path("/run/ferry/serial/vm"),
        Path("/run/ferry/log"),
        "vm",
        UUID,
        tpm,
    )


def test_swtpm_paths_follow_libvirt() -> None:
    p = _paths()
    assert p.domain_dir == Path(f"/var/lib/ferry/swtpm/{UUID}")
    assert p.state_dir == p.domain_dir / "tpm2"
    assert p.ctrl_socket == Path("/run/ferry/serial/vm/swtpm/ctrl.sock")
    assert p.pidfile == Path("/run/ferry/serial/vm/swtpm/swtpm.pid")
    assert p.log_file == Path("/run/ferry/log/vm-swtpm.log")
    assert _paths(Tpm(version="1.2")).state_dir.name == "tpm1.2"
    # qemu's argv and swtpm's agree on the socket.
    d = parsed(VIRT_INSTALL)
    assert f"path={p.ctrl_socket}" in " ".join(
        to_qemu_argv(d, paths=PATHS, kvm_usable=lambda: True)
    )


def test_swtpm_argv() -> None:
    p = _paths()
    assert swtpm_argv("/usr/bin/swtpm", Tpm(model="tpm-crb"), p) == [
        "/usr/bin/swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir=/var/lib/ferry/swtpm/{UUID}/tpm2,mode=0600",
        "--ctrl",
        "type=unixio,path=/run/ferry/serial/vm/swtpm/ctrl.sock,mode=0600",
        "--log",
        "file=/run/ferry/log/vm-swtpm.log,level=1",
        "--pid",
        "file=/run/ferry/serial/vm/swtpm/swtpm.pid",
        "--terminate",
        "--daemon",
    ]
    assert "--tpm2" not in swtpm_argv("swtpm", Tpm(version="1.2"), _paths(Tpm(version="1.2")))


def test_swtpm_refuses_a_path_its_options_cannot_carry() -> None:
    p = swtpm_paths(Path("/var/lib/a,b"), Path("/run/x"), Path("/run/log"), "vm", UUID, Tpm())
    with pytest.raises(QemuLaunchError, match="cannot be passed to swtpm"):
        swtpm_argv("swtpm", Tpm(), p)


def test_swtpm_setup_argv_manufactures_like_libvirt() -> None:
    argv = swtpm_setup_argv(
        "/usr/bin/swtpm_setup", Tpm(model="tpm-crb"), _paths(), name="vm", uuid=UUID
    )
    assert argv == [
        "/usr/bin/swtpm_setup",
        "--tpm2",
        "--tpm-state",
        f"/var/lib/ferry/swtpm/{UUID}/tpm2",
        "--vmid",
        f"vm:{UUID}",
        "--logfile",
        "/run/ferry/log/vm-swtpm.log",
        "--createek",
        "--create-ek-cert",
        "--create-platform-cert",
        "--lock-nvram",
        "--not-overwrite",
    ]
    banks = swtpm_setup_argv(
        "swtpm_setup", Tpm(pcr_banks=("sha256", "sha384")), _paths(), name="vm", uuid=UUID
    )
    assert banks[-2:] == ["--pcr-banks", "sha256,sha384"]


def test_attach_to_scope_argv() -> None:
    assert attach_to_scope_argv("ferry-qemu-vm-1234abcd.scope", 42) == [
        "busctl",
        "call",
        "org.freedesktop.systemd1",
        "/org/freedesktop/systemd1",
        "org.freedesktop.systemd1.Manager",
        "AttachProcessesToUnit",
        "ssau",
        "ferry-qemu-vm-1234abcd.scope",
        "",
        "1",
        "42",
    ]


@pytest.mark.parametrize(
    ("tpm", "persistent", "unfinished", "created", "remove"),
    [
        (Tpm(), True, False, False, False),  # a persistent domain keeps its TPM
        (Tpm(), False, False, False, True),  # a transient one's goes with it
        (Tpm(persistent_state=True), False, False, False, False),  # unless asked to stay
        (Tpm(), False, True, True, True),  # a failed incoming removes what it created
        (Tpm(), True, True, True, True),
        (Tpm(), False, True, False, False),  # ... and only that
        (Tpm(), True, True, False, False),
    ],
)
def test_state_directory_rule(
    tpm: Tpm, persistent: bool, unfinished: bool, created: bool, remove: bool
) -> None:
    assert (
        state_to_remove(
            tpm, persistent=persistent, incoming_unfinished=unfinished, created_here=created
        )
        is remove
    )
