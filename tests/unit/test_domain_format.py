"""format_domain: round trip, the migratable form, metadata kept verbatim."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ferry.domain import (
    Disk,
    Domain,
    Graphics,
    format_domain,
    parse_domain,
)
from ferry.errors import XMLError

GOLDEN = Path(__file__).resolve().parent / "golden" / "domain"


@pytest.mark.parametrize("path", sorted(GOLDEN.glob("*.xml")), ids=lambda p: p.name)
def test_golden_inputs_round_trip(path: Path) -> None:
    d = parse_domain(path.read_bytes(), where=path.name)
    text = format_domain(d)
    assert parse_domain(text) == d
    assert format_domain(parse_domain(text)) == text


def test_kitchen_sink_keeps_everything() -> None:
    d = parse_domain((GOLDEN / "q35-kitchen-sink.xml").read_bytes())
    text = format_domain(d)
    for fragment in (
        "<title>Kitchen sink</title>",
        "<description>Every modelled device\non one machine</description>",
        '<ferry:tags xmlns:ferry="https://ferry.example/xmlns/1">golden</ferry:tags>',
        '<allocation mode="immediate" threads="2"/>',
        '<topology sockets="1" dies="1" cores="2" threads="2"/>',
        '<timer name="rtc" tickpolicy="catchup" track="guest"/>',
        '<suspend-to-disk enabled="yes"/>',
        '<mac address="52:54:00:aa:bb:cc"/>',
        '<source mode="connect" path="/run/ferry/sink/ext.sock"/>',
        '<channel name="main" mode="secure"/>',
        '<address type="pci" domain="0x0000" bus="0x00" slot="0x0c" function="0x0"/>',
        '<backend model="builtin"/>',
    ):
        assert fragment in text, fragment
    assert "id=" not in text.splitlines()[0]  # the runtime id is not kept


def test_metadata_is_verbatim() -> None:
    inner = ("\n      <app1:foo xmlns:app1=\"http://foo.org/\">fooish</app1:foo>\n"
             "  <!-- a comment -->\n  <app2:bar xmlns:app2=\"http://bar.com/\" maman=\"baz\">"
             "barish</app2:bar>\n  ")
    text = (
        "<domain type='qemu'><name>m</name><memory>1024</memory>"
        f"<os><type>hvm</type></os><metadata>{inner}</metadata></domain>"
    )
    d = parse_domain(text)
    assert d.metadata == inner
    out = format_domain(d)
    assert f"<metadata>{inner}</metadata>" in out
    assert parse_domain(out).metadata == inner


def test_metadata_namespace_declared_on_the_root_travels_with_it() -> None:
    text = (
        "<domain type='qemu' xmlns:x='urn:x'><name>m</name><memory>1024</memory>"
        "<os><type>hvm</type></os><metadata><x:a>1</x:a></metadata></domain>"
    )
    d = parse_domain(text)
    assert d.metadata == '<x:a xmlns:x="urn:x">1</x:a>'
    assert parse_domain(format_domain(d)) == d


def test_bad_metadata_in_a_built_model_is_an_xml_error() -> None:
    d = parse_domain("<domain type='qemu'><name>m</name><memory>1024</memory>"
                     "<os><type>hvm</type></os></domain>")
    with pytest.raises(XMLError):
        format_domain(dataclasses.replace(d, metadata="<unclosed>"))
    with pytest.raises(XMLError):
        format_domain(dataclasses.replace(d, metadata="<!DOCTYPE x><x/>"))
    with pytest.raises(XMLError):
        format_domain(dataclasses.replace(d, description="bell\x07"))


def _vnc_domain() -> Domain:
    return parse_domain(
        "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"
        "<graphics type='spice' autoport='yes'/></devices></domain>"
    )


def test_migratable_form_drops_autoport_ports() -> None:
    d = _vnc_domain()
    # The agent records the ports qemu picked on this host.
    live = dataclasses.replace(d, graphics=(
        dataclasses.replace(d.graphics[0], port=5901),
        dataclasses.replace(d.graphics[1], port=5902, tls_port=5903),
    ))
    normal = format_domain(live)
    assert 'port="5901" autoport="yes"' in normal
    assert 'tlsPort="5903"' in normal
    assert parse_domain(normal) == live

    migratable = format_domain(live, migratable=True)
    assert 'port="-1" autoport="yes"' in migratable
    assert "5901" not in migratable and "5902" not in migratable and "5903" not in migratable
    assert parse_domain(migratable) == d
    # Listen addresses are configuration: kept in both forms.
    assert 'listen="127.0.0.1"' in migratable


def test_fixed_ports_are_kept_in_the_migratable_form() -> None:
    d = parse_domain(
        "<domain type='qemu'><name>g</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><graphics type='vnc' port='5907' autoport='no'/></devices></domain>"
    )
    assert format_domain(d, migratable=True) == format_domain(d)
    assert parse_domain(format_domain(d, migratable=True)).graphics[0].port == 5907


def test_a_domain_built_in_code_formats_and_parses() -> None:
    d = Domain(
        virt_type="qemu",
        name="built",
        uuid="6c4f3b9e-2a47-4f1e-9d0c-3f5a8b7e1c22",
        memory_kib=131072,
        current_memory_kib=131072,
        vcpus=2,
        disks=(Disk(type="file", device="disk", target_dev="vda", target_bus="virtio",
                    source="/var/lib/ferry/images/built.img"),),
        graphics=(Graphics(type="vnc", port=5905, autoport=False),),
    )
    again = parse_domain(format_domain(d))
    # The parser fills the defaults the hand-built model left out.
    assert again.os.boot_devs == ("hd",)
    assert again.videos and again.videos[0].model == "vga"
    assert dataclasses.replace(again, os=d.os, videos=()) == d


def test_output_is_plain_xml_text() -> None:
    text = format_domain(_vnc_domain())
    assert text.startswith("<domain ") and text.endswith("</domain>\n")
    assert "<?xml" not in text
