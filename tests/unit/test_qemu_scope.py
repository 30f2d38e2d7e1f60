"""ferry.qemu.scope: unit names, systemd-run argv, the sd_booted() rule, stderr parsing.

Pure functions, no systemd needed; where ``systemd-escape`` is installed the
escaping is compared with systemd's own.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.errors import QemuLaunchError
from ferry.qemu import scope as scope_mod
from ferry.qemu.scope import (
    DEFAULT_SCOPE_PROPERTIES,
    ScopeRequest,
    escape_unit_component,
    find_systemd_run,
    scope_for,
    scope_unit_name,
    split_scope_marker,
    systemd_booted,
    systemd_run_argv,
    systemd_run_env,
    systemd_run_version,
    use_scope,
)

NAMES = [
    "g1",
    "my-vm",
    "a/b",
    ".hidden",
    "in.the.middle",
    "ü vm",
    "x\\y",
    "a:b_c.d",
    "sp ace",
    "tab\there",
    "dollar$HOME",
    "日本",
    "-leading-dash",
]


# ----------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("g1", "g1"),
        ("my-vm", "my\\x2dvm"),
        ("a/b", "a-b"),
        (".hidden", "\\x2ehidden"),
        ("in.the.middle", "in.the.middle"),
        ("ü vm", "\\xc3\\xbc\\x20vm"),
        ("x\\y", "x\\x5cy"),
        ("a:b_c.d", "a:b_c.d"),
        ("dollar$HOME", "dollar\\x24HOME"),
    ],
)
def test_escape_known_values(text: str, expected: str) -> None:
    assert escape_unit_component(text) == expected


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape missing")
@pytest.mark.parametrize("text", NAMES)
def test_escape_matches_systemd_escape(text: str) -> None:
    out = subprocess.run(
        ["systemd-escape", "--", text], capture_output=True, text=True, check=True, timeout=10
    )
    assert escape_unit_component(text) == out.stdout.strip()


UNIT_RE = re.compile(r"ferry-qemu-(?P<name>.*)-(?P<token>[0-9a-f]{8})\.scope")


@pytest.mark.parametrize("name", NAMES)
def test_unit_name_shape(name: str) -> None:
    unit = scope_unit_name(name)
    m = UNIT_RE.fullmatch(unit)
    assert m, unit
    assert m.group("name") == escape_unit_component(name)
    # Only characters systemd allows in a unit name.
    assert re.fullmatch(r"[A-Za-z0-9:_.\\-]+", unit), unit
    assert len(unit) <= 255


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape missing")
@pytest.mark.parametrize("name", NAMES)
def test_unit_name_round_trips_through_systemd_unescape(name: str) -> None:
    m = UNIT_RE.fullmatch(scope_unit_name(name))
    assert m
    out = subprocess.run(
        ["systemd-escape", "--unescape", "--", m.group("name")],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    # --unescape turns "-" back into "/", as the escaping made "/" into "-".
    assert out.stdout.rstrip("\n") == name


def test_unit_name_token_is_fresh_per_launch() -> None:
    assert scope_unit_name("g1") != scope_unit_name("g1")
    assert scope_unit_name("g1", token="deadbeef") == "ferry-qemu-g1-deadbeef.scope"


def test_long_name_is_cut_at_a_whole_character() -> None:
    name = "é" * 200  # the longest domain name, 8 escaped characters each
    unit = scope_unit_name(name, token="0123abcd")
    assert len(unit) <= 255
    m = UNIT_RE.fullmatch(unit)
    assert m
    escaped = m.group("name")
    assert escaped and len(escaped) % len("\\xc3\\xa9") == 0
    assert escaped == "\\xc3\\xa9" * (len(escaped) // 8)
    plain = scope_unit_name("a" * 200, token="0123abcd")
    assert plain == f"ferry-qemu-{'a' * 200}-0123abcd.scope"


# ----------------------------------------------------------------- the sd_booted() rule


def test_systemd_booted_follows_the_directory(tmp_path: Path) -> None:
    marker = tmp_path / "run-systemd-system"
    assert not systemd_booted(marker)
    assert not use_scope("auto", booted_path=marker)
    marker.mkdir()
    assert systemd_booted(marker)
    assert use_scope("auto", booted_path=marker)
    # Explicit modes ignore it.
    assert use_scope("scope", booted_path=tmp_path / "nope")
    assert not use_scope("detached", booted_path=marker)


def test_default_path_is_sd_booted() -> None:
    assert Path("/run/systemd/system") == scope_mod.SYSTEMD_BOOTED_PATH
    assert systemd_booted() == Path("/run/systemd/system").is_dir()


def test_bad_mode_is_refused() -> None:
    with pytest.raises(QemuLaunchError, match="cgroup: expected one of auto, scope, detached"):
        use_scope("cgroup")


def test_scope_for(tmp_path: Path) -> None:
    booted = tmp_path / "system"
    assert scope_for("auto", "g1", "u-1", booted_path=booted) is None
    assert scope_for("detached", "g1", "u-1") is None
    req = scope_for("scope", "web-1", "6c1f2a8e", extra_properties=["DeviceAllow=block-sd rw"])
    assert req is not None
    assert UNIT_RE.fullmatch(req.unit) and req.unit.startswith("ferry-qemu-web\\x2d1-")
    assert req.slice == "machine.slice"
    assert req.where == f"machine.slice/{req.unit}"
    assert req.description == "Ferry qemu: domain web-1 (6c1f2a8e)"
    assert req.properties == (*DEFAULT_SCOPE_PROPERTIES, "DeviceAllow=block-sd rw")
    booted.mkdir()
    assert scope_for("auto", "g1", "u-1", booted_path=booted) is not None
    with pytest.raises(QemuLaunchError, match="scope_properties"):
        scope_for("scope", "g1", "u-1", extra_properties=["no equals sign"])
    with pytest.raises(QemuLaunchError, match="scope_properties"):
        scope_for("scope", "g1", "u-1", extra_properties=["A=b\nExecStart=/bin/sh"])


def test_scope_properties_repeat_the_units_device_policy() -> None:
    units = Path(__file__).resolve().parents[2] / "systemd"
    for service in ("ferry-source.service", "ferry-destination.service"):
        lines = [ln.strip() for ln in (units / service).read_text().splitlines()]
        device = [ln for ln in lines if ln.startswith(("DevicePolicy=", "DeviceAllow="))]
        assert tuple(device) == DEFAULT_SCOPE_PROPERTIES, service


# ----------------------------------------------------------------- argv


QEMU_ARGV = ["/usr/bin/qemu-system-x86_64", "-name", "guest=a b;$(x)", "-daemonize"]


def _req() -> ScopeRequest:
    return ScopeRequest(unit="ferry-qemu-g1-0123abcd.scope", description="Ferry qemu: domain g1")


def test_argv_composition() -> None:
    argv = systemd_run_argv("/usr/bin/systemd-run", _req(), QEMU_ARGV, version=252)
    assert argv == [
        "/usr/bin/systemd-run",
        "--scope",
        "--slice=machine.slice",
        "--unit=ferry-qemu-g1-0123abcd.scope",
        "--description=Ferry qemu: domain g1",
        "--collect",
        "--no-ask-password",
        "--property=DevicePolicy=closed",
        "--property=DeviceAllow=/dev/kvm rw",
        "--property=DeviceAllow=/dev/net/tun rw",
        "--property=DeviceAllow=/dev/vhost-net rw",
        "--property=DeviceAllow=/dev/vhost-vsock rw",
        "--",
        *QEMU_ARGV,
    ]
    # qemu's argv follows "--" untouched (shell metacharacters and all).
    assert argv[argv.index("--") + 1 :] == QEMU_ARGV
    assert "--quiet" not in argv  # see the module docstring: we need its stderr line


@pytest.mark.parametrize(
    ("version", "expand"), [(None, False), (253, False), (254, True), (257, True)]
)
def test_expand_environment_only_where_known(version: int | None, expand: bool) -> None:
    argv = systemd_run_argv("systemd-run", _req(), QEMU_ARGV, version=version)
    opts = argv[: argv.index("--")]
    assert ("--expand-environment=no" in opts) is expand


def test_env_for_systemd_run() -> None:
    env = systemd_run_env({"PATH": "/bin", "SYSTEMD_LOG_LEVEL": "err", "JOURNAL_STREAM": "8:9"})
    assert env["PATH"] == "/bin"
    assert env["SYSTEMD_LOG_LEVEL"] == "info"
    assert env["SYSTEMD_LOG_TARGET"] == "console"
    assert env["SYSTEMD_COLORS"] == "0"


# ----------------------------------------------------------------- systemd-run's stderr


@pytest.mark.parametrize(
    "line",
    [
        "Running scope as unit: ferry-qemu-g1-0123abcd.scope",  # systemd 252
        "Running as unit: ferry-qemu-g1-0123abcd.scope; invocation ID: 0123456789abcdef",  # 256
    ],
)
def test_marker_found_and_removed(line: str) -> None:
    found, rest = split_scope_marker(f"{line}\nqemu-system-x86_64: warning: x\n", _req())
    assert found
    assert rest == "qemu-system-x86_64: warning: x"


def test_marker_absent_means_systemd_run_failed() -> None:
    text = "Failed to connect to bus: No such file or directory"
    assert split_scope_marker(text, _req()) == (False, text)
    other = "Running scope as unit: ferry-qemu-OTHER-0123abcd.scope"
    assert split_scope_marker(other, _req())[0] is False


# ----------------------------------------------------------------- finding systemd-run


def test_missing_systemd_run_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QemuLaunchError) as info:
        find_systemd_run(_req())
    assert "machine.slice/ferry-qemu-g1-0123abcd.scope" in info.value.message
    assert "systemd-run is not on PATH" in info.value.message
    assert info.value.details["unit"] == "ferry-qemu-g1-0123abcd.scope"


def test_version_probe(tmp_path: Path) -> None:
    fake = tmp_path / "systemd-run"
    fake.write_text(f"#!{sys.executable}\nprint('systemd 256 (256.5-1)')\nprint('+PAM +AUDIT')\n")
    fake.chmod(0o755)
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexit 1\n")
    silent.chmod(0o755)
    assert asyncio.run(systemd_run_version(str(fake))) == 256
    assert asyncio.run(systemd_run_version(str(silent))) is None
    assert asyncio.run(systemd_run_version(str(tmp_path / "absent"))) is None
    real = shutil.which("systemd-run")
    if real is not None:
        assert isinstance(asyncio.run(systemd_run_version(real)), int)
