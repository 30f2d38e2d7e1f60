"""ferry.config: the [qemu] table (binary, launch timeout, cgroup, scope properties)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import ferry.config
from ferry.config import QemuConfig, load_config, parse_config
from ferry.errors import ConfigError
from ferry.qemu.scope import CGROUP_MODES

HOST = {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10", "name": "hv-a"}


def _qemu(**table: Any) -> QemuConfig:
    return parse_config({"host": HOST, "qemu": table}).qemu


def test_defaults() -> None:
    qemu = parse_config({"host": HOST}).qemu
    assert qemu == QemuConfig()
    assert qemu.cgroup == "auto"
    assert qemu.scope_properties == ()
    assert qemu.binary == "qemu-system-x86_64"


@pytest.mark.parametrize("mode", ["auto", "scope", "detached"])
def test_cgroup_modes(mode: str) -> None:
    assert _qemu(cgroup=mode).cgroup == mode


def test_modes_agree_with_the_scope_module() -> None:
    # config.py keeps its own copy so that reading a config imports no qemu code.
    assert ferry.config._CGROUP_MODES == CGROUP_MODES


@pytest.mark.parametrize("bad", ["Auto", "systemd", "", "scope "])
def test_bad_cgroup_names_the_key_and_the_choices(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        _qemu(cgroup=bad)
    msg = str(info.value)
    assert msg.startswith("[qemu] cgroup: ")
    assert repr(bad) in msg
    for mode in CGROUP_MODES:
        assert f'"{mode}"' in msg


def test_cgroup_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"\[qemu\] cgroup: wrong type bool"):
        _qemu(cgroup=True)
    with pytest.raises(ConfigError, match=r"\[qemu\] cgroup: wrong type int"):
        _qemu(cgroup=1)


def test_scope_properties() -> None:
    props = ["DeviceAllow=block-sd rw", "TasksMax=infinity", "Description="]
    assert _qemu(scope_properties=props).scope_properties == tuple(props)


@pytest.mark.parametrize(
    "bad",
    ["DeviceAllow", "=x", "Device Allow=x", "1X=y", "A=b\nExecStart=/bin/sh", "A=\0"],
)
def test_bad_scope_property(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"\[qemu\] scope_properties: .* is not NAME=VALUE"):
        _qemu(scope_properties=[bad])


def test_scope_properties_must_be_strings() -> None:
    with pytest.raises(ConfigError, match="every item must be a string"):
        _qemu(scope_properties=[1])
    with pytest.raises(ConfigError, match="wrong type str"):
        _qemu(scope_properties="DeviceAllow=block-sd rw")


def test_unknown_qemu_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"\[qemu\] unknown key\(s\): cgroups"):
        _qemu(cgroups="scope")


def test_docstring_example_parses(tmp_path: Path) -> None:
    """The example in ferry.config's docstring is a valid config."""
    doc = ferry.config.__doc__ or ""
    example = doc.split("Example::", 1)[1]
    toml_text = "\n".join(
        line[4:] if line.startswith("    ") else line for line in example.splitlines()
    )
    toml_text = re.sub(r'uuid = "0b1c…"', f'uuid = "{HOST["uuid"]}"', toml_text)
    data = tomllib.loads(toml_text)
    path = tmp_path / "agent.toml"
    path.write_text(toml_text)
    config = load_config(path)
    assert data["qemu"]["cgroup"] == config.qemu.cgroup == "auto"
    assert config.qemu.scope_properties == ("DeviceAllow=block-sd rw",)


def test_prealloc_threads_default_and_range() -> None:
    assert _qemu().prealloc_threads == 0
    assert _qemu(prealloc_threads=2).prealloc_threads == 2
    for bad in (-1, 65):
        with pytest.raises(ConfigError, match="prealloc_threads"):
            _qemu(prealloc_threads=bad)


def test_prealloc_threads_reach_the_incoming_argv(tmp_path: Path) -> None:
    from ferry.domain import parse_domain
    from ferry.host import Host

    paths = {name: str(tmp_path / name) for name in ("state_dir", "run_dir", "lockspace_dir")}
    config = parse_config({"host": HOST, "paths": paths, "qemu": {"prealloc_threads": 3}})
    host = Host(config, "destination")
    xml = ("<domain type='qemu'><name>p</name><memory unit='MiB'>64</memory>"
           "<memoryBacking><allocation mode='immediate'/></memoryBacking>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")  # fmt: skip
    domain = parse_domain(xml, where="test")
    assert host._with_prealloc_threads(domain).prealloc_threads == 3
    named = parse_domain(xml.replace("mode='immediate'", "mode='immediate' threads='1'"), where="t")
    assert host._with_prealloc_threads(named).prealloc_threads == 1
    plain = parse_domain(
        xml.replace("<memoryBacking><allocation mode='immediate'/></memoryBacking>", ""), where="t"
    )
    assert host._with_prealloc_threads(plain) is plain
