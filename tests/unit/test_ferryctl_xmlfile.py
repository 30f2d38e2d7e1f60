"""ferryctl reads domain XML as bytes: the declared encoding wins, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.domain import MAX_XML_BYTES, parse_domain
from ferry.errors import FrameTooLarge, XMLError
from ferry.protocol.framing import FrameDecoder
from ferryctl.xmlfile import decode_xml, read_domain_xml

BODY = (
    "<domain type='qemu'><name>caf\u00e9</name><memory unit='MiB'>64</memory>"
    "<description>na\u00efve r\u00e9sum\u00e9</description>"
    "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>\n"
)


@pytest.mark.parametrize("encoding", ["UTF-16", "ISO-8859-1", "UTF-8", "windows-1252"])
def test_a_declared_encoding_is_applied(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "d.xml"
    path.write_bytes(f"<?xml version='1.0' encoding='{encoding}'?>\n{BODY}".encode(encoding))
    text = read_domain_xml(path)
    # What the agent gets (a str) parses to the same names as the file says.
    d = parse_domain(text)
    assert d.name == "caf\u00e9" and d.description == "na\u00efve r\u00e9sum\u00e9"


def test_utf16_with_bom_and_no_declaration(tmp_path: Path) -> None:
    path = tmp_path / "d.xml"
    path.write_bytes(BODY.encode("utf-16"))
    assert parse_domain(read_domain_xml(path)).name == "caf\u00e9"


def test_undeclared_latin1_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.xml"
    path.write_bytes(BODY.encode("latin-1"))
    with pytest.raises(XMLError) as info:
        read_domain_xml(path)
    message = str(info.value)
    assert message.startswith(f"{path}: cannot decode the domain XML: byte 0xe9 at offset ")
    assert "is not UTF-8, and it declares no encoding that fits its bytes" in message
    assert "encoding='ISO-8859-1'" in message


def test_unknown_declared_encoding_is_a_clear_error() -> None:
    data = b"<?xml version='1.0' encoding='no-such-codec'?><domain/>"
    with pytest.raises(XMLError, match="cannot decode the domain XML"):
        decode_xml(data, "x.xml")


def test_malformed_utf8_is_passed_on_for_the_agent_to_report() -> None:
    assert decode_xml(b"<domain><name>x</domain>", "x.xml") == "<domain><name>x</domain>"


def test_a_10_mb_file_is_refused_before_sending(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    path.write_bytes(b"<domain>" + b" " * (10 * 1024 * 1024) + b"</domain>")
    with pytest.raises(XMLError) as info:
        read_domain_xml(path)
    assert str(info.value) == (
        f"{path}: the domain XML is too large: {10 * 1024 * 1024 + 17} bytes, more than the "
        f"{MAX_XML_BYTES}-byte limit for a domain XML; nothing was sent"
    )


def test_the_agents_frame_refusal_says_what_the_limit_is() -> None:
    decoder = FrameDecoder(1 << 20)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed((10 << 20).to_bytes(4, "big"))
    assert str(info.value) == (
        "frame of 10485760 bytes refused: the limit is 1048576 bytes ([limits] max_frame); "
        "a request, such as a domain XML, must fit in one"
    )
