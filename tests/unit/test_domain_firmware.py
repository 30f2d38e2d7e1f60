"""UEFI firmware: parse, round trip, ABI, descriptor choice, argv, the NVRAM file."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ferry.config import AgentConfig, parse_config
from ferry.domain import RuntimePaths, check_abi_stability, format_domain, parse_domain
from ferry.domain.argv import PassedFiles, to_qemu_argv
from ferry.domain.firmware import (
    FirmwareDescriptor,
    choose_firmware,
    needs_nvram,
    parse_descriptor,
    resolve_firmware,
)
from ferry.domain.model import Domain
from ferry.errors import ABIError, PathNotAllowed, QemuLaunchError, XMLError, XMLUnsupported
from ferry.firmware_files import (
    default_nvram_path,
    firmware_files,
    load_descriptors,
    remove_default_nvram,
)
from ferry.storage_policy import OpenedFiles

UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


def dom(os_inner: str = "", *, firmware: str | None = "efi", machine: str = "q35",
        features: str = "<acpi/><apic/>") -> str:
    fw = f" firmware='{firmware}'" if firmware else ""
    return f"""<domain type='qemu'>
  <name>u</name>
  <uuid>{UUID}</uuid>
  <memory unit='MiB'>256</memory>
  <os{fw}><type arch='x86_64' machine='{machine}'>hvm</type>{os_inner}</os>
  <features>{features}</features>
  <devices><memballoon model='none'/></devices>
</domain>
"""


def refused(text: str, cls: type[XMLError] = XMLError) -> XMLError:
    with pytest.raises(cls) as info:
        parse_domain(text)
    return info.value


# Debian 12's ovmf descriptors (2022.11), as installed in /usr/share/qemu/firmware.
def _desc(name: str, code: str, vars_: str, machines: list[str], features: list[str]) -> str:
    return json.dumps({
        "description": name, "interface-types": ["uefi"],
        "mapping": {"device": "flash",
                    "executable": {"filename": f"/usr/share/OVMF/{code}", "format": "raw"},
                    "nvram-template": {"filename": f"/usr/share/OVMF/{vars_}", "format": "raw"}},
        "targets": [{"architecture": "x86_64", "machines": machines}],
        "features": features, "tags": []})


DEBIAN = [
    parse_descriptor("60-edk2-x86_64.json", _desc(
        "plain", "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", ["pc-i440fx-*", "pc-q35-*"],
        ["acpi-s3", "amd-sev", "verbose-dynamic"])),
    parse_descriptor("40-edk2-x86_64-secure-enrolled.json", _desc(
        "enrolled", "OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd", ["pc-q35-*"],
        ["acpi-s3", "amd-sev", "enrolled-keys", "requires-smm", "secure-boot",
         "verbose-dynamic"])),
    parse_descriptor("50-edk2-x86_64-secure.json", _desc(
        "secure", "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.fd", ["pc-q35-*"],
        ["acpi-s3", "amd-sev", "requires-smm", "secure-boot", "verbose-dynamic"])),
]


# -- parse and round trip ---------------------------------------------------------------


def test_firmware_efi_loader_nvram_and_features_round_trip() -> None:
    for text in (
        dom(),
        dom("<firmware><feature enabled='yes' name='secure-boot'/>"
            "<feature enabled='no' name='enrolled-keys'/></firmware>"),
        dom("<loader readonly='yes' secure='yes' type='pflash'>/fw/CODE.fd</loader>"
            "<nvram template='/fw/VARS.fd'/>", firmware=None,
            features="<acpi/><smm state='on'/>"),
        dom("<loader readonly='yes' type='pflash'>/fw/CODE.fd</loader>"
            "<nvram template='/fw/VARS.fd'>/img/u_VARS.fd</nvram>", firmware=None,
            machine="pc"),
        dom("<loader type='rom'>/fw/bios.bin</loader>", firmware=None),
        dom(firmware="bios"),
        # What libvirt 9.2 and later write after autoselection (virsh dumpxml).
        dom("<firmware><feature enabled='yes' name='enrolled-keys'/>"
            "<feature enabled='yes' name='secure-boot'/></firmware>"
            "<loader readonly='yes' secure='yes' type='pflash' format='raw'>"
            "/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>"
            "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd' templateFormat='raw' "
            "format='raw'>/var/lib/libvirt/qemu/nvram/u_VARS.fd</nvram>",
            features="<acpi/><smm state='on'/>"),
    ):
        d = parse_domain(text)
        again = parse_domain(format_domain(d))
        assert again == d, text
    d = parse_domain(dom("<firmware><feature enabled='yes' name='secure-boot'/></firmware>"))
    assert d.os.firmware == "efi" and d.os.firmware_features == (("secure-boot", True),)
    assert needs_nvram(d.os)
    d = parse_domain(dom("<loader readonly='yes' secure='yes' type='pflash'>/fw/C.fd</loader>"
                         "<nvram template='/fw/V.fd'/>", firmware=None,
                         features="<smm state='on'/>"))
    assert d.os.loader is not None and d.os.loader.secure and d.os.loader.path == "/fw/C.fd"
    assert d.os.nvram is not None and d.os.nvram.path is None
    assert d.os.nvram.template == "/fw/V.fd"
    assert not needs_nvram(parse_domain(dom("<loader type='rom'>/fw/b</loader>",
                                            firmware=None)).os)


@pytest.mark.parametrize(("text", "words"), [
    # libvirt: "Secure boot requires SMM feature enabled".
    (dom("<loader readonly='yes' secure='yes' type='pflash'>/fw/C.fd</loader>", firmware=None),
     "(SMM)"),
    (dom("<firmware><feature enabled='yes' name='secure-boot'/></firmware>",
         features="<smm state='off'/>"), "system management mode"),
    (dom("<loader readonly='yes' secure='yes' type='pflash'>/fw/C.fd</loader>", firmware=None,
         machine="pc", features="<smm state='on'/>"), "q35"),
    (dom("<nvram>/img/v.fd</nvram>", firmware="bios"), "firmware='bios'"),
    (dom("<nvram>/img/v.fd</nvram>", firmware=None), "pflash <loader>"),
    (dom("<loader type='pflash'/>", firmware=None), "needs the firmware's path"),
    (dom("<loader type='rom' secure='yes'>/fw/b</loader>", firmware=None), "cannot be secure"),
    (dom("<loader type='rom'>/fw/b</loader><nvram>/img/v</nvram>", firmware=None),
     "pflash"),
    (dom("<firmware><feature enabled='no' name='secure-boot'/>"
         "<feature enabled='yes' name='enrolled-keys'/></firmware>"), "enrolled-keys"),
    (dom("<firmware><feature enabled='yes' name='secure-boot'/>"
         "<feature enabled='no' name='secure-boot'/></firmware>"), "listed twice"),
    (dom("<firmware><feature enabled='yes' name='secure-boot'/></firmware>", firmware=None),
     "firmware='efi'"),
    (dom("<loader type='pflash'>relative.fd</loader>", firmware=None), "absolute"),
    (dom("<nvram template='/fw/../etc/x'/>"), "'..'"),
])
def test_firmware_refusals_name_the_problem(text: str, words: str) -> None:
    err = refused(text)
    assert words in str(err) + str(err.details.get("hint", "")), str(err)
    assert str(err.details.get("element", "")).startswith("domain/os")


def test_unknown_firmware_values_are_unsupported() -> None:
    refused(dom(firmware="uboot"), XMLUnsupported)
    refused(dom("<firmware><feature enabled='yes' name='amd-sev'/></firmware>"), XMLUnsupported)
    refused(dom("<loader type='flash'>/fw/x</loader>", firmware=None), XMLUnsupported)
    refused(dom("<loader type='rom'/>"), XMLUnsupported)
    refused(dom("<nvram format='qcow2'/>"), XMLUnsupported)
    refused(dom("<loader format='qcow2'/>"), XMLUnsupported)


# -- ABI --------------------------------------------------------------------------------


def test_abi_compares_what_the_guest_sees_not_host_paths() -> None:
    secure = ("<loader readonly='yes' secure='yes' type='pflash'>{}</loader>"
              "<nvram template='/fw/V.fd'>{}</nvram>")
    a = parse_domain(dom(secure.format("/fw/C.fd", "/img/a.fd"), firmware=None,
                         features="<smm state='on'/>"))
    b = parse_domain(dom(secure.format("/usr/share/x/C.fd", "/img/b.fd"), firmware=None,
                         features="<smm state='on'/>"))
    check_abi_stability(a, b)
    plain = parse_domain(dom("<loader readonly='yes' secure='no' type='pflash'>/fw/C.fd"
                             "</loader><nvram/>", firmware=None, features="<smm state='on'/>"))
    with pytest.raises(ABIError, match="os loader secure differs"):
        check_abi_stability(a, plain)
    with pytest.raises(ABIError, match="os firmware differs"):
        check_abi_stability(parse_domain(dom()), parse_domain(dom(firmware="bios")))
    with pytest.raises(ABIError, match="os loader differs"):
        check_abi_stability(parse_domain(dom(firmware=None)), parse_domain(
            dom("<loader type='rom'>/fw/bios.bin</loader>", firmware=None)))
    # firmware='efi' as defined vs as resolved at start: the same guest.
    efi = parse_domain(dom())
    check_abi_stability(efi, resolve_firmware(efi, DEBIAN))


# -- descriptors ------------------------------------------------------------------------


def _choice(text: str) -> str:
    d = parse_domain(text)
    return choose_firmware(d.os, d.features.smm, DEBIAN).name


def test_descriptor_choice_follows_libvirt() -> None:
    # File name order: unconstrained UEFI on q35 gets secure boot with keys enrolled.
    assert _choice(dom()) == "40-edk2-x86_64-secure-enrolled.json"
    assert _choice(dom(machine="pc-q35-7.2")) == "40-edk2-x86_64-secure-enrolled.json"
    assert _choice(dom(machine="pc")) == "60-edk2-x86_64.json"  # secure ones are q35 only
    assert _choice(dom(features="<smm state='off'/>")) == "60-edk2-x86_64.json"
    assert _choice(dom("<firmware><feature enabled='no' name='secure-boot'/></firmware>")) \
        == "60-edk2-x86_64.json"
    assert _choice(dom("<firmware><feature enabled='yes' name='secure-boot'/>"
                       "<feature enabled='no' name='enrolled-keys'/></firmware>")) \
        == "50-edk2-x86_64-secure.json"
    assert _choice(dom("<loader>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd</loader>")) \
        == "50-edk2-x86_64-secure.json"
    assert _choice(dom("<loader secure='no'/>")) == "60-edk2-x86_64.json"


def test_no_fitting_descriptor_says_why_for_each() -> None:
    d = parse_domain(dom("<firmware><feature enabled='yes' name='secure-boot'/></firmware>"))
    with pytest.raises(XMLUnsupported) as info:
        choose_firmware(d.os, d.features.smm, [DEBIAN[0]])
    text = str(info.value)
    assert "secure-boot=yes" in text
    assert "60-edk2-x86_64.json: feature secure-boot missing" in text
    d = parse_domain(dom(machine="pc"))
    with pytest.raises(XMLUnsupported) as info:
        choose_firmware(d.os, d.features.smm, DEBIAN[1:])
    assert "40-edk2-x86_64-secure-enrolled.json: not for x86_64 pc-i440fx-7.2" in str(info.value)
    with pytest.raises(XMLUnsupported, match="install the ovmf package"):
        choose_firmware(d.os, None, [])


def test_resolve_firmware_writes_the_choice_into_the_definition() -> None:
    d = resolve_firmware(parse_domain(dom()), DEBIAN)
    assert d.os.loader is not None and d.os.nvram is not None
    assert d.os.loader.path == "/usr/share/OVMF/OVMF_CODE_4M.ms.fd"
    assert (d.os.loader.readonly, d.os.loader.secure, d.os.loader.type) == (True, True, "pflash")
    assert d.os.nvram.template == "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
    assert d.os.nvram.path is None and d.features.smm is True
    assert parse_domain(format_domain(d)) == d  # the live XML parses back
    # Resolving again (the destination's start) changes nothing.
    assert resolve_firmware(d, DEBIAN) == d
    plain = resolve_firmware(parse_domain(dom(
        "<firmware><feature enabled='no' name='secure-boot'/></firmware>")), DEBIAN)
    assert plain.os.loader is not None and plain.os.loader.secure is False
    assert plain.features.smm is None
    # An explicit loader takes the template of the descriptor naming it.
    explicit = parse_domain(dom("<loader readonly='yes' type='pflash'>"
                                "/usr/share/OVMF/OVMF_CODE_4M.fd</loader>", firmware=None))
    got = resolve_firmware(explicit, DEBIAN)
    assert got.os.nvram is not None and got.os.nvram.template == "/usr/share/OVMF/OVMF_VARS_4M.fd"
    unknown = parse_domain(dom("<loader readonly='yes' type='pflash'>/fw/mine.fd</loader>",
                               firmware=None))
    with pytest.raises(XMLUnsupported, match="no NVRAM template is known"):
        resolve_firmware(unknown, DEBIAN)
    assert resolve_firmware(parse_domain(dom(firmware=None)), DEBIAN).os.loader is None


@pytest.mark.parametrize("data", [
    "not json", "[]", "{}", '{"mapping": {}}',
    '{"mapping": {"device": "flash", "executable": {}}}',
    '{"mapping": {"device": "flash"}, "targets": [{"architecture": 1}]}',
    '{"mapping": {"device": "flash"}, "features": "secure-boot"}',
])
def test_malformed_descriptors_are_value_errors(data: str) -> None:
    with pytest.raises(ValueError, match=r"bad\.json"):
        parse_descriptor("bad.json", data)


def test_descriptors_load_in_name_order_with_etc_overriding(tmp_path: Path) -> None:
    etc, share = tmp_path / "etc", tmp_path / "share"
    etc.mkdir()
    share.mkdir()
    (share / "60-a.json").write_text(_desc("a", "A.fd", "AV.fd", ["pc-q35-*"], []))
    (share / "50-b.json").write_text(_desc("b", "B.fd", "BV.fd", ["pc-q35-*"], []))
    (share / "70-c.json").write_text(_desc("c", "C.fd", "CV.fd", ["pc-q35-*"], []))
    (share / "80-bad.json").write_text("{")
    (etc / "60-a.json").write_text(_desc("a", "E.fd", "EV.fd", ["pc-q35-*"], []))
    (etc / "70-c.json").write_text("")  # masks share's
    got = load_descriptors((etc, share))
    assert [(d.name, d.executable) for d in got] == [
        ("50-b.json", "/usr/share/OVMF/B.fd"), ("60-a.json", "/usr/share/OVMF/E.fd")]


# -- argv -------------------------------------------------------------------------------


def _argv(d: Domain, files: PassedFiles | None = None) -> list[str]:
    p = Path("/run/t")
    return to_qemu_argv(d, paths=RuntimePaths(run_dir=p, qmp_socket=p / "q", pidfile=p / "p"),
                        files=files)


def _machine(argv: list[str]) -> str:
    return argv[argv.index("-machine") + 1]


def test_argv_maps_code_and_vars_as_pflash_block_nodes() -> None:
    d = resolve_firmware(parse_domain(dom()), DEBIAN)
    argv = _argv(d, PassedFiles(fd_sets=((10, 1, "pflash0"), (11, 2, "pflash1")),
                                firmware=("/dev/fdset/1", "/dev/fdset/2")))
    assert "pflash0=pflash0-format,pflash1=pflash1-format" in _machine(argv)
    assert "smm=on" in _machine(argv)
    blockdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs == [
        "driver=file,filename=/dev/fdset/1,node-name=pflash0-storage,read-only=on",
        "node-name=pflash0-format,read-only=on,driver=raw,file=pflash0-storage",
        "driver=file,filename=/dev/fdset/2,node-name=pflash1-storage,read-only=off",
        "node-name=pflash1-format,read-only=off,driver=raw,file=pflash1-storage",
    ]
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert "-add-fd" in argv
    # Without passed files: the definition's paths (a named NVRAM file).
    named = parse_domain(dom("<loader readonly='yes' type='pflash'>/fw/C,1.fd</loader>"
                             "<nvram>/img/u_VARS.fd</nvram>", firmware=None))
    argv = _argv(named)
    assert "driver=file,filename=/fw/C,,1.fd,node-name=pflash0-storage,read-only=on" in argv
    assert "cfi.pflash01" not in " ".join(argv) and "smm" not in _machine(argv)


def test_argv_refuses_what_it_cannot_map() -> None:
    with pytest.raises(QemuLaunchError, match="not resolved"):
        _argv(parse_domain(dom()))
    unnamed = resolve_firmware(parse_domain(dom()), DEBIAN)
    with pytest.raises(QemuLaunchError, match="NVRAM file is not named"):
        _argv(unnamed)


def test_argv_rom_loader_is_bios() -> None:
    d = parse_domain(dom("<loader type='rom'>/fw/bios.bin</loader>", firmware=None))
    argv = _argv(d)
    assert argv[argv.index("-bios") + 1] == "/fw/bios.bin" and "pflash0" not in _machine(argv)
    argv = _argv(d, PassedFiles(firmware=("/proc/self/fd/9",)))
    assert argv[argv.index("-bios") + 1] == "/proc/self/fd/9"


# -- the NVRAM file ---------------------------------------------------------------------


@pytest.fixture
def fw_host(tmp_path: Path) -> tuple[AgentConfig, list[FirmwareDescriptor], Path]:
    """A host with its own firmware tree (code and template) and an images directory."""
    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "CODE.fd").write_bytes(b"C" * 4096)
    (fw / "VARS.fd").write_bytes(b"V" * 4096)
    descs = [parse_descriptor("60-t.json", json.dumps({
        "interface-types": ["uefi"],
        "mapping": {"device": "flash", "executable": {"filename": str(fw / "CODE.fd")},
                    "nvram-template": {"filename": str(fw / "VARS.fd")}},
        "targets": [{"architecture": "x86_64", "machines": ["pc-q35-*"]}],
        "features": []}))]
    (tmp_path / "images").mkdir()
    cfg = parse_config({"host": {"uuid": UUID},
                        "paths": {"state_dir": str(tmp_path / "state"),
                                  "run_dir": str(tmp_path / "run")},
                        "storage": {"allowed": [str(tmp_path / "images")]}})
    return cfg, descs, tmp_path


def _prepare(d: Domain, cfg: AgentConfig, descs: list[FirmwareDescriptor]) -> Any:
    files = OpenedFiles()
    return files, firmware_files(d, cfg, files, descriptors=descs)


def test_nvram_file_is_made_from_the_template_once(fw_host: Any) -> None:
    cfg, descs, _ = fw_host
    d = parse_domain(dom())
    path = default_nvram_path(cfg, "u")
    files, cm = _prepare(d, cfg, descs)
    with files, cm as fw:
        assert fw.created and fw.nvram == path and path.read_bytes() == b"V" * 4096
        assert fw.domain.os.loader.path.endswith("CODE.fd")
        assert len(files.fds) == 2 and files.passed.firmware == ("/dev/fdset/1", "/dev/fdset/2")
        # The code read-only, the variables read-write; blocking, for qemu.
        modes = [fcntl.fcntl(fd, fcntl.F_GETFL) for fd in files.fds]
        assert [m & os.O_ACCMODE for m in modes] == [os.O_RDONLY, os.O_RDWR]
        assert not any(m & os.O_NONBLOCK for m in modes)
    assert files.fds == []  # closed with the launch
    path.write_bytes(b"guest wrote this")
    files, cm = _prepare(d, cfg, descs)
    with files, cm as fw:
        assert not fw.created and path.read_bytes() == b"guest wrote this"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert remove_default_nvram(cfg, "u") and not path.exists()
    assert not remove_default_nvram(cfg, "u")


def test_a_failed_launch_removes_only_a_file_it_created(fw_host: Any) -> None:
    cfg, descs, _ = fw_host
    d = parse_domain(dom())
    path = default_nvram_path(cfg, "u")
    files, cm = _prepare(d, cfg, descs)
    with pytest.raises(RuntimeError), files, cm:
        assert path.exists()
        raise RuntimeError("qemu did not start")
    assert not path.exists()
    path.write_bytes(b"kept")
    files, cm = _prepare(d, cfg, descs)
    with pytest.raises(RuntimeError), files, cm:
        raise RuntimeError("qemu did not start")
    assert path.read_bytes() == b"kept"


def test_paths_outside_firmware_and_policy_are_refused(fw_host: Any) -> None:
    cfg, descs, tmp = fw_host
    (tmp / "elsewhere").mkdir()
    (tmp / "elsewhere" / "secret").write_bytes(b"s" * 4096)
    # A loader that no descriptor names and the policy does not allow.
    d = parse_domain(dom(f"<loader readonly='yes' type='pflash'>{tmp}/elsewhere/secret</loader>"
                         f"<nvram template='{tmp}/fw/VARS.fd'/>", firmware=None))
    files, cm = _prepare(d, cfg, descs)
    with pytest.raises(PathNotAllowed, match="installed firmware"), files, cm:
        pass
    # An explicit NVRAM path outside [storage] allowed.
    d = parse_domain(dom(f"<nvram>{tmp}/elsewhere/u_VARS.fd</nvram>"))
    files, cm = _prepare(d, cfg, descs)
    with pytest.raises(PathNotAllowed, match="storage"), files, cm:
        pass
    assert not (tmp / "elsewhere" / "u_VARS.fd").exists()
    # Inside it: created there from the template.
    d = parse_domain(dom(f"<nvram>{tmp}/images/u_VARS.fd</nvram>"))
    files, cm = _prepare(d, cfg, descs)
    with files, cm as fw:
        assert fw.created and (tmp / "images" / "u_VARS.fd").read_bytes() == b"V" * 4096
    # A symlink swapped in for the template is followed to where it points, and checked.
    (tmp / "images" / "link.fd").symlink_to(tmp / "elsewhere" / "secret")
    d = parse_domain(dom(f"<nvram template='{tmp}/images/link.fd'>{tmp}/images/n.fd</nvram>",
                         firmware=None).replace(
        "<nvram", f"<loader readonly='yes' type='pflash'>{tmp}/fw/CODE.fd</loader><nvram"))
    files, cm = _prepare(d, cfg, descs)
    with pytest.raises(PathNotAllowed), files, cm:
        pass
    assert not (tmp / "images" / "n.fd").exists()


def test_a_domain_without_uefi_needs_nothing(fw_host: Any) -> None:
    cfg, descs, _ = fw_host
    d = parse_domain(dom(firmware=None))
    files, cm = _prepare(d, cfg, descs)
    with files, cm as fw:
        assert fw.domain is d and files.fds == [] and files.passed.firmware == ()
    assert dataclasses.replace(d) == d


def test_a_named_nvram_file_is_checked_from_define_on() -> None:
    from ferry.storage_policy import StoragePolicy, domain_paths

    d = parse_domain(dom("<nvram>/etc/u_VARS.fd</nvram>"))
    assert [(p.element, p.kind, p.writable) for p in domain_paths(d)] == [
        ("domain/os/nvram", "nvram", True)]
    policy = StoragePolicy(["/var/lib/ferry/images"], resolve=lambda p: p)
    with pytest.raises(PathNotAllowed, match=r"domain/os/nvram: nvram path '/etc/u_VARS\.fd'"):
        policy.check(d, "define")
    policy.check(parse_domain(dom("<nvram>/var/lib/ferry/images/u_VARS.fd</nvram>")), "define")
    assert domain_paths(parse_domain(dom())) == []  # Ferry's own file: not the policy's


def test_a_loader_without_type_is_pflash_for_uefi_and_rom_otherwise() -> None:
    from ferry.domain.firmware import loader_type

    rom = parse_domain(dom("<loader>/fw/bios.bin</loader>", firmware=None))
    assert loader_type(rom.os) == "rom" and not needs_nvram(rom.os)
    assert "-bios" in _argv(rom)
    flash = parse_domain(dom("<loader readonly='yes'>/fw/C.fd</loader>"
                             "<nvram>/img/u_VARS.fd</nvram>", firmware=None))
    assert loader_type(flash.os) == "pflash" and needs_nvram(flash.os)
    assert "pflash1=pflash1-format" in _machine(_argv(flash))
    assert parse_domain(format_domain(flash)) == flash  # the type stays unstated


@pytest.mark.parametrize(("run_state", "kept"), [("incoming", False), ("running", True),
                                                 ("paused", True)])
def test_cleanup_removes_the_nvram_file_of_an_incoming_that_never_ran(
    fw_host: Any, run_state: str, kept: bool
) -> None:
    from ferry.host import Host
    from ferry.statefile import DomainStatus

    cfg, _, _ = fw_host
    host = Host(cfg, "destination")
    host.ensure_dirs()
    path = default_nvram_path(cfg, "u")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"V")
    host.save_status(DomainStatus(name="u", uuid=UUID, pid=1, run_state=run_state,
                                  extra={"nvram_created": str(path)}))
    host.cleanup("u")
    assert path.exists() == kept and host.load_status("u") is None


def test_resolving_keeps_what_the_definition_states() -> None:
    d = parse_domain(dom("<loader format='raw'/><nvram format='raw' templateFormat='raw'>"
                         "/img/u_VARS.fd</nvram>"))
    got = resolve_firmware(d, DEBIAN)
    assert got.os.loader is not None and got.os.loader.format == "raw"
    assert got.os.nvram == dataclasses.replace(
        d.os.nvram, template="/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
