"""``make install DESTDIR=…``: what lands where, with which modes, and that it runs.

The install is real (``tools/install.sh`` through the Makefile): a venv is
built, Ferry is compiled into it as a wheel, and everything is put under a
temporary DESTDIR, relocated so that it works once copied to ``/``. It takes
10 to 60 s (pip, the Cython build); the module runs once per session with a
generous timeout and no ``e2e`` mark, so ``make unit`` and ``make test`` run it.
"""

from __future__ import annotations

import marshal
import os
import shutil
import stat
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferry.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("ferry-source", "ferry-destination", "ferryctl")
UNITS = ("ferry-source.service", "ferry-destination.service", "ferry-destination.socket")
VENV = "/opt/ferry"
PREFIX = "/usr/local"

# pip and the Cython build: far more than the suite's default 300 s would
# ever be needed, but a busy CI machine should not fail this on time alone.
pytestmark = pytest.mark.timeout(900)


def _not_ready() -> str | None:
    if shutil.which("make") is None:
        return "make is not installed"
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else "python3"
    probe = subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True)
    if probe.returncode != 0:
        return f"{python} cannot make virtual environments (python3-venv)"
    return None


@dataclass
class Installed:
    """One ``make install DESTDIR=root`` and what it printed."""

    root: Path
    output: str

    def path(self, absolute: str) -> Path:
        """Where the absolute path ``absolute`` of the target system is staged."""
        return self.root / absolute.lstrip("/")


def make_install(destdir: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    """Run ``make install DESTDIR=destdir`` in the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    argv = ["make", "-C", str(REPO), "--no-print-directory", "install", f"DESTDIR={destdir}"]
    argv += [f"{k}={v}" for k, v in variables.items()]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=800, env=env, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    reason = _not_ready()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("destdir")
    result = make_install(root)
    assert result.returncode == 0, result.stdout + result.stderr
    yield Installed(root, result.stdout + result.stderr)
    shutil.rmtree(root, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ----------------------------------------------------------------- layout


def test_files_are_where_systemd_and_operators_look(installed: Installed) -> None:
    p = installed.path
    for unit in UNITS:
        f = p(f"/etc/systemd/system/{unit}")
        assert f.is_file() and _mode(f) == 0o644, unit
        assert f.read_text().startswith("#"), unit
    for kind in ("tmpfiles.d", "sysusers.d"):
        f = p(f"/usr/lib/{kind}/ferry.conf")
        assert _mode(f) == 0o644
        assert f.read_text() == (REPO / "systemd" / kind / "ferry.conf").read_text()
    assert _mode(p("/etc/ferry")) == 0o755
    assert _mode(p("/etc/ferry/pki")) == 0o700, "the host key goes here"
    assert _mode(p("/etc/ferry/agent.toml")) == 0o644

    for script in SCRIPTS:
        link = p(f"{PREFIX}/bin/{script}")
        assert link.is_symlink(), script
        # Points at the final location, not into the staging tree.
        assert os.readlink(link) == f"{VENV}/bin/{script}"
        target = p(f"{VENV}/bin/{script}")
        assert _mode(target) == 0o755, script
        assert target.read_text().splitlines()[0] == f"#!{VENV}/bin/python", script

    # Nothing world-writable, nothing setuid anywhere in the tree.
    for dirpath, dirnames, filenames in os.walk(installed.root):
        for name in dirnames + filenames:
            st = (Path(dirpath) / name).lstat()
            if stat.S_ISLNK(st.st_mode):
                continue
            assert not st.st_mode & stat.S_IWOTH, Path(dirpath) / name
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), Path(dirpath) / name


def test_venv_uses_a_system_python(installed: Installed) -> None:
    """The units set ProtectHome=yes: an interpreter under /root or /home is invisible there."""
    cfg = dict(
        line.split(" = ", 1)
        for line in installed.path(f"{VENV}/pyvenv.cfg").read_text().splitlines()
        if " = " in line
    )
    assert not cfg["home"].startswith(("/root", "/home")), cfg
    python = installed.path(f"{VENV}/bin/python")
    real = Path(os.path.realpath(python))
    assert not str(real).startswith(("/root", "/home", str(installed.root))), real


def test_venv_is_relocated(installed: Installed) -> None:
    """Nothing in the staged venv names the staging directory."""
    staging = str(installed.root).encode()
    venv = installed.path(VENV)
    for f in [*venv.joinpath("bin").iterdir(), venv / "pyvenv.cfg"]:
        if f.is_file() and not f.is_symlink():
            assert staging not in f.read_bytes(), f
    # Byte code records its source path (tracebacks show it): the final one.
    pycs = list(venv.glob("lib/python3*/site-packages/ferry/__pycache__/__init__.*.pyc"))
    assert pycs, "no byte code compiled for ferry"
    code = marshal.loads(pycs[0].read_bytes()[16:])
    assert code.co_filename.startswith(f"{VENV}/lib/"), code.co_filename


def test_installed_package_is_compiled_not_editable(installed: Installed) -> None:
    python = str(installed.path(f"{VENV}/bin/python"))
    probe = (
        "import ferry, ferry_native, ferry_source, ferry_destination, ferryctl;"
        "print(ferry_native.BACKEND); print(ferry.__file__)"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    backend, location = out.stdout.split()
    assert backend == "native"
    # Installed into the venv, not pointing back at the checkout.
    assert location.startswith(str(installed.path(VENV))), location
    assert not list(installed.path(VENV).glob("lib/python3*/site-packages/__editable__*"))


# ----------------------------------------------------------------- it runs


def test_installed_ferryctl_runs(installed: Installed) -> None:
    python = str(installed.path(f"{VENV}/bin/python"))
    for script in SCRIPTS:
        out = subprocess.run(
            [python, str(installed.path(f"{VENV}/bin/{script}")), "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, (script, out.stderr)
        assert out.stdout.startswith(f"usage: {script}"), out.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private mount namespace",
)
def test_installed_tree_runs_as_on_the_target(installed: Installed) -> None:
    """In a private mount namespace the staged /opt and PREFIX/bin are bound
    over the real ones: ``ferryctl --help`` then runs by the same path a user
    types (symlink → script → shebang → venv python), and ``systemd-analyze
    verify`` finds every ExecStart= program of the installed units."""
    root = installed.root
    bound = {"/opt": root / "opt", f"{PREFIX}/bin": root / PREFIX.lstrip("/") / "bin"}
    units = " ".join(str(installed.path(f"/etc/systemd/system/{u}")) for u in UNITS)
    analyze = shutil.which("systemd-analyze")
    verify = f"cd {installed.path('/etc/systemd/system')} && {analyze} verify {units}"
    script = "set -e\n"
    script += "".join(f"mount --bind {src} {dst}\n" for dst, src in bound.items())
    script += f"{PREFIX}/bin/ferryctl --help\n"
    if analyze:
        script += f"{verify}\n"
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("usage: ferryctl")
    problems = [ln for ln in out.stderr.splitlines() if "ferry" in ln]
    assert problems == [], "\n".join(problems)


def test_units_point_at_the_installed_commands(installed: Installed) -> None:
    for service in ("ferry-source", "ferry-destination"):
        text = installed.path(f"/etc/systemd/system/{service}.service").read_text()
        shipped = (REPO / "systemd" / f"{service}.service").read_text()
        assert text == shipped, "PREFIX=/usr/local must install the units unchanged"
        exec_start = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
        assert exec_start == [f"ExecStart={PREFIX}/bin/{service} --config /etc/ferry/agent.toml"]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles missing",
)
def test_tmpfiles_and_sysusers_found_by_name(installed: Installed, tmp_path: Path) -> None:
    """The units run ``systemd-tmpfiles --create ferry.conf``: by name, so the
    file must be where systemd searches. Applied to a copy of the tree."""
    root = tmp_path / "root"
    shutil.copytree(installed.path("/usr/lib"), root / "usr/lib", symlinks=True)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    for argv in (["systemd-sysusers", f"--root={root}", "ferry.conf"],
                 ["systemd-tmpfiles", f"--root={root}", "--create", "ferry.conf"]):  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (argv, out.stderr)
    assert "ferry:" in (root / "etc/group").read_text()
    assert _mode(root / "run/ferry") == 0o2750
    assert _mode(root / "var/lib/ferry/lockspace") == 0o750


# ----------------------------------------------------------------- the config


def test_default_config_parses(installed: Installed) -> None:
    path = installed.path("/etc/ferry/agent.toml")
    config = load_config(path)
    assert uuid.UUID(config.host.uuid).version == 4
    assert config.admin_group == "ferry"
    assert config.destination.listen == ("0.0.0.0", 49160)
    assert config.paths.run_dir == Path("/run/ferry")
    assert config.tls is not None
    assert config.tls.cert == Path(f"/etc/ferry/pki/{config.host.name}.pem")
    assert config.tls.key == Path(f"/etc/ferry/pki/{config.host.name}-key.pem")
    assert [r.groups for r in config.acl] == [("ferry",)]
    # qemu in a machine.slice scope under systemd, detached elsewhere.
    assert config.qemu.cgroup == "auto"
    # The agents run as root: the file is read by them, written by root only.
    assert _mode(path) == 0o644


@pytest.fixture
def destdir(tmp_path: Path) -> Iterator[Path]:
    """An empty DESTDIR, removed afterwards (a venv is ~75 MB)."""
    root = tmp_path / "destdir"
    root.mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_second_install_keeps_the_operators_config(destdir: Path) -> None:
    """Installing again (an upgrade) replaces the program, never agent.toml;
    and a different PREFIX is followed by the units' ExecStart=."""
    if _not_ready():
        pytest.skip(str(_not_ready()))
    first = make_install(destdir, PREFIX="/usr")
    assert first.returncode == 0, first.stdout + first.stderr
    config = destdir / "etc/ferry/agent.toml"
    original = tomllib.loads(config.read_text())
    edited = config.read_text().replace('group = "ferry"', 'group = "wheel"') + "\n# mine\n"
    config.write_text(edited)
    config.chmod(0o600)
    # A change of the program must reach the venv even at the same version.
    marker = destdir / "opt/ferry/lib"
    inits = list(marker.glob("python3*/site-packages/ferry/__init__.py"))
    assert len(inits) == 1
    inits[0].write_text(inits[0].read_text() + "\nSTALE = True\n")

    second = make_install(destdir, PREFIX="/usr")
    assert second.returncode == 0, second.stdout + second.stderr
    assert config.read_text() == edited, "make install overwrote an operator's agent.toml"
    assert _mode(config) == 0o600
    assert "keeping the existing" in second.stdout
    assert "STALE" not in inits[0].read_text(), "the reinstall left the old program in place"
    assert load_config(config).host.uuid == original["host"]["uuid"]

    exec_start = [
        ln
        for ln in (destdir / "etc/systemd/system/ferry-source.service").read_text().splitlines()
        if ln.startswith("ExecStart=")
    ]
    assert exec_start == ["ExecStart=/usr/bin/ferry-source --config /etc/ferry/agent.toml"]
    assert os.readlink(destdir / "usr/bin/ferryctl") == f"{VENV}/bin/ferryctl"
