"""The guest-CPU check (ferry.domain._cpu), its cookie section and its -cpu argv."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from ferry import cpu_probe
from ferry.domain import parse_domain
from ferry.domain._cpu import (
    CpuExpansion,
    CpuSignature,
    HostCpu,
    feature_key,
    missing_features,
    passthrough_differences,
)
from ferry.domain.argv import RuntimePaths, to_qemu_argv
from ferry.domain.model import Cpu, CpuFeature, Domain
from ferry.errors import CookieError, CpuIncompatible
from ferry.protocol.cookie import Cookie, CpuSection

HOST = HostCpu.from_qmp(
    "kvm",
    {"model": {"name": "host", "props": {
        "vendor": "GenuineIntel", "family": 6, "model": 207, "stepping": 2,
        "lm": True, "sse4.2": True, "avx": True, "avx512f": False, "pni": True,
        "lahf_lm": True, "check": True, "migratable": True, "model-id": "Xeon",
    }}},
    [
        {"name": "Nehalem", "unavailable-features": []},
        {"name": "Icelake-Server", "unavailable-features": ["avx512f", "avx512vl", "pcid"]},
        {"name": "qemu64", "unavailable-features": []},
    ],
)


def _cpu(model: str | None = None, mode: str = "custom", **policies: str) -> Cpu:
    feats = tuple(CpuFeature(n.replace("__", "."), p) for n, p in policies.items())  # type: ignore[arg-type]
    return Cpu(mode=mode, model=model, features=feats)  # type: ignore[arg-type]


def test_feature_names_have_one_spelling() -> None:
    assert feature_key("sse4.2") == feature_key("sse4_2") == feature_key("SSE4-2") == "sse4-2"
    assert feature_key("lahf_lm") == "lahf-lm"
    assert feature_key("pclmuldq") == "pclmulqdq"  # libvirt's spelling of qemu's


def test_host_from_qmp_keeps_features_and_signature() -> None:
    assert HOST.signature == CpuSignature("GenuineIntel", 6, 207, 2, HOST.features)
    assert {"lm", "sse4-2", "avx", "pni", "lahf-lm"} <= HOST.features
    # Off features and qemu settings are not features the host has.
    assert not {"avx512f", "check", "migratable"} & HOST.features


def test_a_model_the_host_runs_misses_nothing() -> None:
    assert missing_features(_cpu("Nehalem"), HOST) == ([], None)


def test_missing_model_features_are_named_unless_disabled() -> None:
    assert missing_features(_cpu("Icelake-Server"), HOST) == (
        ["avx512f", "avx512vl", "pcid"], None)
    disabled = _cpu("Icelake-Server", avx512vl="disable", pcid="forbid")
    assert missing_features(disabled, HOST) == (["avx512f"], None)


def test_required_features_the_host_lacks_are_named() -> None:
    cpu = _cpu("Nehalem", avx512f="require", avx="require", sse4__2="require",
               amx_tile="force", avx2="optional")
    # force claims a feature regardless, optional takes it only if present.
    assert missing_features(cpu, HOST) == (["avx512f"], None)
    both = _cpu("Icelake-Server", avx512f="require")
    assert missing_features(both, HOST)[0] == ["avx512f", "avx512vl", "pcid"]


def test_check_none_and_no_model_check_only_required_features() -> None:
    none = dataclasses.replace(_cpu("Icelake-Server", avx512f="require", avx="require"),
                               check="none")
    assert missing_features(none, HOST) == (["avx512f"], None)
    host_lacks_qemu64 = dataclasses.replace(HOST, unavailable={"qemu64": ("pni",)})
    assert missing_features(_cpu(None), host_lacks_qemu64) == ([], None)
    assert missing_features(_cpu("qemu64"), host_lacks_qemu64) == (["pni"], None)


def test_unknown_model_and_default_model() -> None:
    missing, problem = missing_features(_cpu("Zen9"), HOST)
    assert missing == [] and problem is not None and "'Zen9'" in problem
    assert missing_features(_cpu(None, avx="require"), HOST) == ([], None)  # qemu64


def test_host_model_needs_every_feature_the_source_ran() -> None:
    ran = CpuExpansion.from_props({"vendor": "GenuineIntel", "family": 6, "lm": True,
                                   "avx": True, "avx512f": True, "amx-tile": True,
                                   "pni": False, "check": True})
    assert missing_features(_cpu(mode="host-model"), HOST, ran) == (
        ["amx-tile", "avx512f"], None)
    same = CpuExpansion.from_props({"lm": True, "avx": True, "family": 6})
    assert missing_features(_cpu(mode="host-model"), HOST, same) == ([], None)
    missing, problem = missing_features(_cpu(mode="host-model"), HOST)
    assert missing == [] and problem is not None and "source" in problem


def test_expansion_keeps_features_on_and_the_signature() -> None:
    e = CpuExpansion.from_props({"vendor": "AuthenticAMD", "family": 23, "model-id": "EPYC",
                                 "avx": True, "pni": False, "migratable": True,
                                 "apic-id": 7, "level": 13})
    assert dict(e.props) == {"vendor": "AuthenticAMD", "family": 23, "model-id": "EPYC",
                             "avx": True}
    assert e.features == {"avx"}


def test_passthrough_needs_an_identical_cpu() -> None:
    src = HOST.signature
    assert passthrough_differences(src, src) == []
    other = dataclasses.replace(src, model=85, features=(src.features - {"avx"}) | {"svm"})
    diffs = passthrough_differences(src, other)
    assert diffs == ["model 207 there, 85 here", "features missing here: avx",
                     "features only here: svm"]
    assert missing_features(_cpu(mode="host-passthrough"), HOST) == ([], None)


def test_cpu_cookie_section_round_trips() -> None:
    section = CpuSection(mode="host-model", expansion={"avx": True, "family": 6,
                                                       "model-id": "Intel(R) Xeon(R), 2"})
    cookie = Cookie.decode(Cookie().with_cpu(section, mandatory=True).encode())
    assert cookie.cpu == section and "cpu" in cookie.mandatory
    sig = CpuSection(mode="host-passthrough", signature=HOST.signature.to_wire())
    back = Cookie.decode(Cookie().with_cpu(sig).encode()).cpu
    assert back is not None and back.signature is not None
    assert CpuSignature.from_wire(back.signature) == HOST.signature


@pytest.mark.parametrize("key", ["avx,enforce=off", "a=b", "", "AVX", "x" * 65, "-x"])
def test_cpu_property_names_that_could_add_options_are_refused(key: str) -> None:
    with pytest.raises(CookieError, match="bad CPU property"):
        CpuSection.from_wire({"mode": "host-model", "expansion": {key: True}})


def test_cpu_property_values_must_be_plain() -> None:
    with pytest.raises(CookieError):
        CpuSection.from_wire({"mode": "host-model", "expansion": {"model-id": "a\nb"}})
    with pytest.raises(CookieError):
        CpuSection.from_wire({"mode": "host-passthrough",
                              "signature": {"vendor": "x", "family": "6"}})


def _cpu_arg(cpu_xml: str, virt: str = "qemu", expansion: CpuExpansion | None = None) -> str:
    d = parse_domain(f"""<domain type='{virt}'><name>c</name><memory>65536</memory>
      <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>{cpu_xml}</domain>""")
    if expansion is not None:
        assert d.cpu is not None
        d = dataclasses.replace(d, cpu=dataclasses.replace(d.cpu, expansion=expansion.props))
    paths = RuntimePaths(Path("/r"), Path("/r/q.sock"), Path("/r/pid"))
    argv = to_qemu_argv(d, paths=paths, kvm_usable=lambda: True)
    return argv[argv.index("-cpu") + 1]


def test_named_models_start_with_enforce_unless_check_none() -> None:
    assert _cpu_arg("<cpu><model>Nehalem</model></cpu>") == "Nehalem,enforce=on"
    assert _cpu_arg("<cpu check='full'><model>Nehalem</model>"
                    "<feature name='avx' policy='disable'/></cpu>") == \
        "Nehalem,enforce=on,avx=off"
    assert _cpu_arg("<cpu check='none'><model>Nehalem</model></cpu>") == "Nehalem"
    # force claims a feature whatever the host has: enforce would refuse it.
    assert _cpu_arg("<cpu><model>Nehalem</model><feature name='avx' policy='force'/></cpu>") \
        == "Nehalem,avx=on"
    assert _cpu_arg("<cpu mode='host-model'/>", virt="kvm") == "host"


def test_an_arrived_host_model_runs_the_source_cpu() -> None:
    e = CpuExpansion.from_props({"vendor": "GenuineIntel", "family": 6,
                                 "model-id": "Xeon, v2", "avx": True, "pni": False})
    assert _cpu_arg("<cpu mode='host-model'/>", virt="kvm", expansion=e) == \
        "base,avx=on,family=6,model-id=Xeon,, v2,vendor=GenuineIntel,enforce=on"


# -- Prepare's glue (ferry.cpu_probe.check_guest_cpu) over a probed host --------


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> str:
    """A qemu binary name whose KVM probe answer is HOST (no qemu runs)."""
    monkeypatch.setitem(cpu_probe._cache, ("qemu-test", "kvm"), HOST)
    return "qemu-test"


def _guest(cpu_xml: str) -> Domain:
    return parse_domain(f"""<domain type='kvm'><name>g</name><memory>65536</memory>
      <vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>{cpu_xml}</domain>""")


def _check(d: Domain, section: CpuSection | None, qemu: str) -> Domain:
    return asyncio.run(cpu_probe.check_guest_cpu(d, section, qemu))


def test_prepare_refuses_missing_features_by_name(probed: str) -> None:
    with pytest.raises(CpuIncompatible) as info:
        _check(_guest("<cpu><model>Icelake-Server</model></cpu>"), None, probed)
    assert info.value.code == "cpu-incompatible"
    assert info.value.details["missing"] == ["avx512f", "avx512vl", "pcid"]
    assert "CPU model 'Icelake-Server': avx512f, avx512vl, pcid" in str(info.value)
    d = _guest("<cpu><model>Nehalem</model></cpu>")
    assert _check(d, None, probed) is d
    plain = _guest("")
    assert _check(plain, None, probed) is plain  # no <cpu>: nothing to check


def test_prepare_starts_an_arrived_host_model_as_the_source_ran_it(probed: str) -> None:
    d = _guest("<cpu mode='host-model'/>")
    ran = {"vendor": "GenuineIntel", "family": 6, "lm": True, "avx": True}
    got = _check(d, CpuSection(mode="host-model", expansion=ran), probed)
    assert got.cpu is not None and dict(got.cpu.expansion or ()) == ran
    with pytest.raises(CpuIncompatible, match="host-model CPU: amx-tile"):
        _check(d, CpuSection(mode="host-model", expansion={**ran, "amx-tile": True}), probed)
    with pytest.raises(CpuIncompatible, match="older source"):
        _check(d, None, probed)


def test_prepare_needs_an_identical_cpu_for_host_passthrough(probed: str) -> None:
    d = _guest("<cpu mode='host-passthrough'/>")
    same = CpuSection(mode="host-passthrough", signature=HOST.signature.to_wire())
    assert _check(d, same, probed) is d
    other = dict(same.signature or {}, vendor="AuthenticAMD", features=["lm"])
    with pytest.raises(CpuIncompatible) as info:
        _check(d, CpuSection(mode="host-passthrough", signature=other), probed)
    diffs = info.value.details["differences"]
    assert diffs[0] == "vendor 'AuthenticAMD' there, 'GenuineIntel' here"
    assert diffs[1].startswith("features only here: ")
    with pytest.raises(CpuIncompatible, match="signature"):
        _check(d, None, probed)


def test_start_refuses_a_named_model_this_host_cannot_run(probed: str) -> None:
    """libvirt's check='partial' before a start, also for a model with a forced feature
    (which cannot take qemu's enforce): the start names the missing features."""
    from ferry.errors import CpuStartError

    forced = _guest("<cpu mode='custom' match='exact'><model>Icelake-Server</model>"
                    "<feature policy='force' name='x2apic'/></cpu>")  # fmt: skip
    with pytest.raises(CpuStartError) as info:
        asyncio.run(cpu_probe.check_start_cpu(forced, probed))
    assert info.value.code == "cpu-unsupported"
    assert info.value.details["missing"] == ["avx512f", "avx512vl", "pcid"]
    assert "cannot start domain 'g'" in str(info.value) and "check='none'" in str(info.value)
    # What may start: a model the host runs, check='none', host-model, no <cpu>.
    for ok in ("<cpu><model>Nehalem</model><feature policy='force' name='x2apic'/></cpu>",
               "<cpu check='none'><model>Icelake-Server</model></cpu>",
               "<cpu mode='host-model'/>", ""):  # fmt: skip
        asyncio.run(cpu_probe.check_start_cpu(_guest(ok), probed))
