"""virt-install's XML for typical installs, generated now, through Ferry's parser (issue 14).

tools/testbed/virtinst_corpus.py runs ``virt-install --print-xml`` (Debian's
virtinst, against ``test:///default``: no daemon) for each configuration and
surveys the files.  Every file must be accepted, round-tripping without
losing anything, or refused with messages that name the element; the
configurations that define today are a floor.  Run with ``-s`` to see the
table and the refusal causes (most common first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import virtinst_corpus as vc

pytestmark = pytest.mark.skipif(vc.available() is not None, reason=str(vc.available()))

#: Configurations Ferry defines today: a regression fails the test.  When a
#: file starts to define, the test says so: move it from REFUSED_TODAY to
#: virtinst_corpus.DEFINE_FLOOR.
DEFINE_FLOOR = vc.DEFINE_FLOOR

#: Of those, the ones whose qemu command line Ferry builds (what start needs).
#: Not hugepages-numa: its argv needs 1024 free 2 MiB huge pages on the host
#: running the survey (the e2e start test reserves them).
ARGV_FLOOR = tuple(n for n in DEFINE_FLOOR if n != "hugepages-numa")

#: Refused today, and why (as the survey groups the causes).
REFUSED_TODAY: dict[str, str] = {}

#: Values Ferry may rewrite between input and formatted output, as
#: (substring of the "path/@attr=value" item, why).  Empty: none may change.
ALLOWED_CHANGES: tuple[tuple[str, str], ...] = ()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> vc.Corpus:
    return vc.generate(tmp_path_factory.mktemp("virtinst"))


@pytest.fixture(scope="module")
def rows(corpus: vc.Corpus) -> list[vc.SurveyRow]:
    return vc.survey(corpus.files)


def test_at_least_20_configs_are_generated_as_configured(corpus: vc.Corpus) -> None:
    assert len(vc.CONFIGS) >= 20
    assert len({c.name for c in vc.CONFIGS}) == len(vc.CONFIGS)
    failed = [f"{g.name}: {g.error}\n  {g.command()}" for g in corpus.files if g.xml is None]
    assert not failed, "virt-install did not write:\n" + "\n".join(failed)
    # Each file has what its config is for, and nothing of the test driver.
    wrong = {g.name: vc.missing(g) for g in corpus.files if vc.missing(g)}
    assert not wrong, wrong
    for g in corpus.files:
        assert (corpus.root / f"{g.name}.xml").read_text() == g.xml
        for image in g.config.images:
            assert (corpus.root / image.name).exists(), image


def test_every_file_is_accepted_or_clearly_refused(
    corpus: vc.Corpus, rows: list[vc.SurveyRow]
) -> None:
    print("\n" + vc.format_table(rows))
    print("\nrefusal causes, most common first:\n" + vc.format_causes(rows))
    argv = {g.name: g.command() for g in corpus.files}  # to reproduce a file by hand
    internal = {r.name: (r.internal, argv[r.name]) for r in rows
                if r.internal or r.status == "internal"}  # fmt: skip
    assert not internal, internal
    unclear = {r.name: ([p.message for p in r.problems], argv[r.name]) for r in rows
               if not r.clear}  # fmt: skip
    assert not unclear, unclear
    for r in rows:
        if r.status == "refused":
            assert r.message and r.message.startswith(f"{r.name}.xml"), r.message  # the file
        for p in r.problems:
            assert p.element and p.element.startswith("domain"), p


def test_define_floor(rows: list[vc.SurveyRow]) -> None:
    accepted = {r.name for r in rows if r.status == "accepted"}
    lost = set(DEFINE_FLOOR) - accepted
    assert not lost, {r.name: [p.message for p in r.problems] for r in rows if r.name in lost}
    new = sorted(accepted - set(DEFINE_FLOOR))
    if new:
        print(f"\nnow define (add them to virtinst_corpus.DEFINE_FLOOR): {' '.join(new)}")


def test_every_config_is_in_the_floor_or_listed_as_refused() -> None:
    names = {c.name for c in vc.CONFIGS}
    assert set(DEFINE_FLOOR) | set(REFUSED_TODAY) == names
    assert not set(DEFINE_FLOOR) & set(REFUSED_TODAY)
    assert set(ARGV_FLOOR) <= set(DEFINE_FLOOR)


def test_accepted_files_round_trip_without_dropping_anything(rows: list[vc.SurveyRow]) -> None:
    bad = {}
    for r in rows:
        if r.status != "accepted":
            continue
        changed = [c for c in r.changed if not any(a in c for a, _ in ALLOWED_CHANGES)]
        if r.round_trip or r.dropped or changed:
            bad[r.name] = {"round_trip": r.round_trip, "dropped": r.dropped, "changed": changed}
    assert not bad, bad


def test_argv_floor(rows: list[vc.SurveyRow]) -> None:
    builds = {r.name for r in rows if r.status == "accepted" and r.argv_error is None}
    lost = set(ARGV_FLOOR) - builds
    assert not lost, {r.name: r.argv_error for r in rows if r.name in lost}


# -- the survey's own checks can fail ------------------------------------------


MINIMAL = """<domain type='kvm'>
  <name>m</name>
  <memory>131072</memory>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <interface type='user'><model type='virtio'/></interface>
    <interface type='user'><model type='e1000'/></interface>
  </devices>
</domain>
"""


def test_dropped_finds_elements_attributes_and_values() -> None:
    assert vc.dropped(MINIMAL, MINIMAL) == ([], [])
    without_listen = MINIMAL.replace("<listen type='address' address='127.0.0.1'/>", "")
    lost, _ = vc.dropped(MINIMAL, without_listen)
    assert "domain/devices/graphics/listen x1" in lost
    one_nic = MINIMAL.replace("<interface type='user'><model type='e1000'/></interface>", "")
    lost, changed = vc.dropped(MINIMAL, one_nic)
    assert "domain/devices/interface x1" in lost
    assert changed == []  # counted as the dropped element, not again as values
    rewritten = MINIMAL.replace("model type='e1000'", "model type='rtl8139'")
    assert vc.dropped(MINIMAL, rewritten) == ([], ["domain/devices/interface/model/@type=e1000"])
    # A pty's allocated path is documented as ignored.
    pty = MINIMAL.replace("</devices>", "<console type='pty'><source path='/dev/pts/3'/></console>"
                                        "</devices>")
    assert vc.dropped(pty, pty.replace("<source path='/dev/pts/3'/>", "")) == ([], [])


def test_every_problem_is_listed_even_when_parse_stops_at_the_first() -> None:
    # The same problem twice (as 14 pcie-root-ports are) must not end the search.
    xml = (MINIMAL.replace("<devices>", "<devices><gizmo/><gizmo/>")
           .replace("</devices>", "</devices><frobnicate/>")
           .replace("<name>m</name>", "<name knob='1'>m</name>"))
    g = vc.Generated(vc.Config("several", "test", ()), ["true"], xml)
    row = vc.survey_one(g)
    assert row.status == "refused" and row.clear
    found = " ".join(p.message for p in row.problems)
    for what in ("knob", "frobnicate", "gizmo"):
        assert what in found, found
    assert len(row.problems) == 3  # the second gizmo is the same problem again


def test_problems_that_parse_lists_all_at_once_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    import ferry.domain
    from ferry.errors import XMLUnsupported

    listed = [
        {"line": 3, "path": "domain/devices/sound", "kind": "unsupported-element",
         "code": "xml-unsupported", "message": "element <sound> is not supported by Ferry",
         "hint": "remove the element"},
        {"line": 9, "path": "domain/os", "kind": "unsupported-attribute",
         "code": "xml-unsupported", "message": "attribute 'firmware' is not supported by Ferry",
         "hint": "remove the attribute"},
    ]  # fmt: skip

    def refuse(xml: str, *, where: str = "") -> None:
        raise XMLUnsupported(f"{where}: 2 problems in the domain XML; fix them all, then try "
                             "again: ...", where=where, line=3, element="domain/devices/sound",
                             problems=listed, problem_count=2)  # fmt: skip

    monkeypatch.setattr(ferry.domain, "parse_domain", refuse)
    row = vc.survey_one(vc.Generated(vc.Config("two", "test", ()), ["true"], MINIMAL))
    assert row.status == "refused" and row.clear
    assert [p.element for p in row.problems] == ["domain/devices/sound", "domain/os"]
    assert row.problems[1].message.startswith("two.xml:9: domain/os: attribute 'firmware'")
    assert row.problems[1].cause() == (
        "domain/os: attribute 'firmware' is not supported by Ferry (remove the attribute)")


def test_an_internal_error_is_not_a_clear_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import ferry.domain

    def boom(xml: str, *, where: str = "") -> None:
        raise KeyError("bug")

    monkeypatch.setattr(ferry.domain, "parse_domain", boom)
    row = vc.survey_one(vc.Generated(vc.Config("x", "test", ()), ["true"], MINIMAL))
    assert row.status == "internal" and not row.clear and "KeyError" in (row.internal or "")


def test_capabilities_describe_this_host(tmp_path: Path) -> None:
    from lxml import etree

    caps = etree.fromstring(vc.host_capabilities().encode())
    assert caps.xpath("guest/arch[@name='x86_64']/machine[text()='q35']")
    dom = etree.fromstring(vc.domain_capabilities().encode())
    loaders = dom.xpath("os/loader/value/text()")
    assert all(Path(p).exists() for p in loaders)
