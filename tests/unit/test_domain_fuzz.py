"""Fuzz parse_domain: only XMLError (and subclasses) may ever escape.

Three generators: raw bytes/text; byte-level mutations of real domain XML;
and tree-level mutations of real domain XML (well-formed, so they reach the
typed parser). Whatever parses must also format, re-parse to an equal model,
be ABI-stable with itself, and either build an argv or be refused with a
Ferry error.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from ferry.domain import (
    RuntimePaths,
    check_abi_stability,
    format_domain,
    parse_domain,
    to_qemu_argv,
)
from ferry.domain._problems import KINDS, MAX_PROBLEMS
from ferry.domain._schema import SCHEMA as _SCHEMA
from ferry.errors import FerryError, XMLError

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "domain"


def _corpus_dir() -> Path:
    env = os.environ.get("FERRY_SHARED_DIR")
    if env:
        return Path(env) / "libvirt-xml"
    return HERE.parents[1].parent / "shared" / "libvirt-xml"


SEEDS: list[bytes] = [p.read_bytes() for p in sorted(GOLDEN.glob("*.xml"))]
SEEDS += [p.read_bytes() for p in sorted(_corpus_dir().glob("*/*.xml"))]

PATHS = RuntimePaths(Path("/run/ferry/f"), Path("/run/ferry/f/q.sock"), Path("/run/ferry/f/p"))

# No example database: the tests must not write outside their own files.
FUZZ = settings(max_examples=int(os.environ.get("FERRY_FUZZ_EXAMPLES", "300")), deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow])

TAGS = sorted({p.rsplit("/", 1)[-1] for p in _SCHEMA} | {"hostdev", "boot", "alias", "shim"})
ATTRS = sorted(set().union(*(s.attrs for s in _SCHEMA.values())) | {"snapshot", "order"})
VALUES = [
    "", "0", "1", "2", "-1", "yes", "no", "on", "off", "0x1f", "0x", "5900", "65536", "qemu",
    "kvm", "virtio", "ide", "scsi", "sata", "usb", "file", "block", "unix", "pty", "null",
    "bind", "connect", "/a/b", "/a,b", "/dev/sda", "/proc/x", "../x", "/a/../b", "pci", "drive",
    "virtio-serial", "vnc", "spice", "127.0.0.1", "::1", "MiB", "KiB", "b", "qxl", "vga",
    "cirrus", "none", "immediate", "ondemand", "hd", "cdrom", "network", "q35", "pc", "hvm",
    "x86_64", "isa-serial", "serial", "random", "builtin", "/dev/urandom", "custom",
    "host-model", "host-passthrough", "52:54:00:00:00:01", "01:00:00:00:00:01",
    "c7a5fdbd-edaf-9455-926a-d65c16db1809", "4294967296", "99999999999999999999", "vda", "hda",
    "sda", "qemu-xhci", "lsilogic", "virtio-scsi", "pcie-root", "pci-root", "rtc", "pit", "hpet",
    "catchup", "delay", "localtime", "utc", "destroy", "restart", "br0", "\u00e9", "a b",
]
TOKENS = [t.encode() for t in (
    "<", ">", "/>", "</", "&", "&amp;", "&#0;", "&#10;", "<!DOCTYPE d>", "<!ENTITY x 'y'>",
    "<![CDATA[x]]>", "<!-- c -->", "<?pi x?>", "'", '"', "=", "\x00", "\xff", "\n",
    *[f"<{t}/>" for t in TAGS[:40]], *[f" {a}='1'" for a in ATTRS[:40]],
)]


def _check(data: bytes | str) -> None:
    try:
        domain = parse_domain(data, where="fuzz")
    except XMLError as exc:
        _check_problems(exc)
        return
    # Anything that parses is a complete, consistent model.
    text = format_domain(domain)
    again = parse_domain(text, where="fuzz-formatted")
    assert again == domain
    check_abi_stability(domain, again)
    parse_domain(format_domain(domain, migratable=True))
    try:
        argv = to_qemu_argv(domain, paths=PATHS, kvm_usable=lambda: True)
    except FerryError:
        return
    assert argv and all(isinstance(a, str) and "\0" not in a for a in argv)


def _check_problems(exc: XMLError) -> None:
    """Every refusal lists its problems, none of them a bug of ours."""
    assert "internal error" not in str(exc) and "cannot interpret" not in str(exc), str(exc)
    problems = exc.details["problems"]
    assert 1 <= len(problems) == exc.details["problem_count"] <= MAX_PROBLEMS
    for p in problems:
        assert set(p) == {"line", "path", "kind", "code", "message", "hint"}, p
        assert p["kind"] in KINDS and p["message"] and p["hint"], p


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.text(max_size=1024))
def test_random_text(data: str) -> None:
    _check(data)


@FUZZ
@given(st.data())
def test_byte_mutations_of_real_xml(data: st.DataObject) -> None:
    doc = bytearray(data.draw(st.sampled_from(SEEDS)))
    for _ in range(data.draw(st.integers(1, 6))):
        if not doc:
            break
        at = data.draw(st.integers(0, len(doc) - 1))
        op = data.draw(st.sampled_from(["delete", "insert", "flip", "token", "dup"]))
        if op == "delete":
            del doc[at : at + data.draw(st.integers(1, 40))]
        elif op == "insert":
            doc[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "flip":
            doc[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "token":
            doc[at:at] = data.draw(st.sampled_from(TOKENS))
        else:
            end = min(len(doc), at + data.draw(st.integers(1, 200)))
            doc[end:end] = doc[at:end]
    _check(bytes(doc))


def _tree_of(seed: bytes) -> etree._Element | None:
    try:
        root = etree.fromstring(seed, etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError:
        return None
    return root


@FUZZ
@given(st.data())
def test_tree_mutations_of_real_xml(data: st.DataObject) -> None:
    seed = data.draw(st.sampled_from(SEEDS))
    root = _tree_of(seed)
    assert root is not None
    for _ in range(data.draw(st.integers(1, 5))):
        elements = [e for e in root.iter() if isinstance(e.tag, str)]
        el = data.draw(st.sampled_from(elements))
        op = data.draw(st.sampled_from(
            ["set", "unset", "text", "remove", "dup", "add", "move"]))
        if op == "set":
            el.set(data.draw(st.sampled_from(ATTRS)), data.draw(st.sampled_from(VALUES)))
        elif op == "unset" and el.attrib:
            del el.attrib[data.draw(st.sampled_from(sorted(str(k) for k in el.attrib)))]
        elif op == "text":
            el.text = data.draw(st.sampled_from(VALUES))
        elif op == "remove" and el is not root:
            parent = el.getparent()
            if parent is not None:
                parent.remove(el)
        elif op == "dup" and el is not root:
            parent = el.getparent()
            if parent is not None:
                parent.append(etree.fromstring(etree.tostring(el)))
        elif op == "add":
            child = etree.SubElement(el, data.draw(st.sampled_from(TAGS)))
            if data.draw(st.booleans()):
                child.set(data.draw(st.sampled_from(ATTRS)), data.draw(st.sampled_from(VALUES)))
        elif op == "move" and el is not root:
            target = data.draw(st.sampled_from(elements))
            if target is not el and el not in target.iterancestors():
                target.append(el)
    _check(etree.tostring(root))
