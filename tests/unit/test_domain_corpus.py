"""libvirt's own test XML (shared/libvirt-xml) through parse → format → parse.

Group A must parse and round-trip to an equal model (or be refused with
XMLUnsupported naming element and line); group B must all be refused that
way. Nothing may raise anything but an XMLError.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest

from ferry.domain import format_domain, parse_domain
from ferry.errors import XMLError, XMLUnsupported


def _corpus_dir() -> Path:
    env = os.environ.get("FERRY_SHARED_DIR")
    if env:
        return Path(env) / "libvirt-xml"
    return Path(__file__).resolve().parents[2].parent / "shared" / "libvirt-xml"


CORPUS = _corpus_dir()
GROUP_A = sorted((CORPUS / "a-supported-ish").glob("*.xml"))
GROUP_B = sorted((CORPUS / "b-unsupported").glob("*.xml"))

needs_corpus = pytest.mark.skipif(not GROUP_A, reason=f"no libvirt XML corpus at {CORPUS}")


def _assert_names_element_and_line(exc: XMLUnsupported, name: str) -> None:
    line = exc.details.get("line")
    element = exc.details.get("element")
    assert isinstance(line, int) and line > 0, exc.details
    assert isinstance(element, str) and element.startswith("domain"), exc.details
    # The message alone is enough for an operator: file, line, element (on a
    # line of its own when the file has more than one problem).
    assert re.search(rf"^( {{2}})?{re.escape(name)}:{line}: {re.escape(element)}: ", str(exc),
                     re.MULTILINE), str(exc)


@needs_corpus
def test_corpus_is_complete() -> None:
    assert len(GROUP_A) == 28
    assert len(GROUP_B) == 14


@needs_corpus
@pytest.mark.parametrize("path", GROUP_A, ids=lambda p: p.name)
def test_group_a_round_trips(path: Path) -> None:
    try:
        domain = parse_domain(path.read_bytes(), where=path.name)
    except XMLUnsupported as exc:  # allowed by the brief, but none do today
        _assert_names_element_and_line(exc, path.name)
        pytest.fail(f"group A file refused: {exc}")
    text = format_domain(domain)
    again = parse_domain(text, where=f"formatted {path.name}")
    assert again == domain
    # Formatting is a fixed point after one round.
    assert format_domain(again) == text
    # The migratable form parses too, to the same guest.
    assert parse_domain(format_domain(domain, migratable=True)).uuid == domain.uuid


# Group B files Ferry accepts since issue 14 (huge pages, watchdog, USB
# redirection, an emulated TPM, guest NUMA with numatune): they must round-trip like group A.
ACCEPTED_B = {"hugepages-default.xml", "usb-redir.xml", "watchdog.xml", "tpm-emulator.xml",
              "numatune-memnode-restrictive-mode.xml"}


@needs_corpus
@pytest.mark.parametrize("path", [p for p in GROUP_B if p.name in ACCEPTED_B],
                         ids=lambda p: p.name)
def test_group_b_files_accepted_now_round_trip(path: Path) -> None:
    test_group_a_round_trips(path)


@needs_corpus
@pytest.mark.parametrize("path", [p for p in GROUP_B if p.name not in ACCEPTED_B],
                         ids=lambda p: p.name)
def test_group_b_is_refused_with_element_and_line(path: Path) -> None:
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(path.read_bytes(), where=path.name)
    _assert_names_element_and_line(info.value, path.name)


# What each group B file is refused for (the first unsupported thing in it).
EXPECTED_B = {
    "boot-order.xml": "domain/devices/disk/boot",
    "hostdev-vfio.xml": "domain/devices/hostdev/driver",  # model='vfio-pci-igb'; vfio is fine
    "iothreads-disk.xml": "domain/devices/disk/driver",  # queues, <iothreads> mapping
    "launch-security-sev-direct.xml": "domain/os/shim",
    "net-vhostuser.xml": "domain/devices/interface/source",  # vhostuser
    "net-virtio-teaming.xml": "domain/devices/interface/teaming",
    "sound-device.xml": "domain/devices/sound",
    "vhost-user-fs-fd-memory.xml": "domain/devices/filesystem/binary",  # and memory source file
    "video-virtio-vga.xml": "domain/devices/video",
}


@needs_corpus
@pytest.mark.parametrize("path", [p for p in GROUP_B if p.name not in ACCEPTED_B],
                         ids=lambda p: p.name)
def test_group_b_names_the_expected_element(path: Path) -> None:
    with pytest.raises(XMLUnsupported) as info:
        parse_domain(path.read_bytes(), where=path.name)
    assert info.value.details["element"] == EXPECTED_B[path.name]


@needs_corpus
@pytest.mark.parametrize("path", GROUP_A + GROUP_B, ids=lambda p: p.name)
def test_truncated_corpus_files_raise_only_xml_errors(path: Path) -> None:
    data = path.read_bytes()
    for cut in range(0, len(data), max(1, len(data) // 25)):
        with contextlib.suppress(XMLError):
            parse_domain(data[:cut])


@needs_corpus
def test_selected_values_from_the_corpus() -> None:
    by_name = {p.name: p for p in GROUP_A}
    d = parse_domain(by_name["disk-cache.xml"].read_bytes())
    assert [(x.target_dev, x.target_bus, x.cache) for x in d.disks] == [
        ("hda", "ide", "writeback"),
        ("hdb", "ide", "unsafe"),
        ("sda", "scsi", "none"),
        ("vda", "virtio", "writethrough"),
        ("sdb", "usb", "directsync"),
    ]
    d = parse_domain(by_name["x86_64-pc-minimal.xml"].read_bytes())
    assert d.memory_kib == 4194304 and d.vcpus == 4 and d.os.boot_devs == ("hd",)
    assert d.memballoon.model == "virtio" and d.current_memory_kib == d.memory_kib
    d = parse_domain(by_name["graphics-vnc-no-listen-attr.xml"].read_bytes())
    assert d.graphics[0].listen == "2001:1:2:3:4:5:1234:1234"
    assert d.graphics[0].port == 5903 and not d.graphics[0].autoport
    d = parse_domain(by_name["metadata.xml"].read_bytes())
    assert d.metadata is not None and '<app1:foo xmlns:app1="http://foo.org/">fooish' in d.metadata
    d = parse_domain(by_name["cpu-host-model-features.xml"].read_bytes())
    assert d.cpu is not None and d.cpu.mode == "host-model"
    assert [(f.name, f.policy) for f in d.cpu.features] == [
        ("abm", "require"), ("ds", "force"), ("invtsc", "disable")]
