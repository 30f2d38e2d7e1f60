"""A real swtpm under :mod:`ferry.swtpm` and :class:`ferry.host.Host` (qemu faked).

swtpm starts listening, dies with its control connection (how it never
outlives qemu), is stopped when qemu fails to start, and a stale one is
found again by its pidfile and killed — but never a process that is not
this domain's swtpm; a TPM's state directory follows the definition.
Skipped where swtpm is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import ferry.host
from ferry.config import AgentConfig, parse_config
from ferry.domain import Domain, parse_domain
from ferry.domain._argv_tpm import tpm_argv
from ferry.errors import QemuLaunchError
from ferry.host import Host
from ferry.swtpm import kill_stale, start_swtpm

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed")

UUID = "3f2b9a51-7c1e-4d0a-9b6e-2a4c8d1e5f70"
XML = f"""<domain type='qemu'><name>t</name><uuid>{UUID}</uuid><memory>65536</memory>
<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
</devices></domain>"""


def _domain() -> Domain:
    return parse_domain(XML)


def _config(tmp: Path) -> AgentConfig:
    return parse_config({
        "host": {"uuid": "6c1f2a8e-0d4b-4c35-9a51-3f0e2b7d9c10", "name": "hv-a"},
        "paths": {"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run")},
        "qemu": {"cgroup": "detached"},
    })  # fmt: skip


def _exited(pid: int, timeout: float = 5.0) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(fd)


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test left running goes: its swtpm, and its qemu."""
    yield
    paths = Host(_config(tmp_path), "source").swtpm_paths(_domain())
    assert paths is not None
    kill_stale(paths, name="t")
    qemu_pidfile = tmp_path / "qemu.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(qemu_pidfile.read_text())
        if str(qemu_pidfile).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu is not installed")
def test_swtpm_listens_and_ends_with_its_qemu(tmp_path: Path) -> None:
    host = Host(_config(tmp_path), "source")
    paths = host.swtpm_paths(_domain())
    assert paths is not None

    async def run() -> int:
        tpm = await start_swtpm(_domain(), paths, incoming=True, swtpm_setup=None)
        assert tpm.alive() and paths.ctrl_socket.exists()
        assert (paths.state_dir.stat().st_mode & 0o777) == 0o700
        tpm.close()  # as after qemu started: only qemu's connection binds it now
        return tpm.pid

    pid = asyncio.run(run())
    qemu_pidfile = tmp_path / "qemu.pid"
    subprocess.run(
        ["qemu-system-x86_64", "-machine", "q35,accel=tcg", "-m", "64", "-nodefaults",
         "-display", "none", "-S", "-daemonize", "-pidfile", str(qemu_pidfile),
         *tpm_argv(_domain(), host.chardev_dir("t"))],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    qemu = int(qemu_pidfile.read_text())
    assert not _exited(pid, 0.2)
    # qemu killed outright (no QMP quit): the kernel closes its connections and
    # swtpm (--terminate) exits by itself.
    os.kill(qemu, signal.SIGKILL)
    assert _exited(qemu)
    assert _exited(pid), "swtpm outlived its qemu"


def test_a_failed_qemu_start_stops_swtpm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = Host(_config(tmp_path), "source")
    host.ensure_dirs()
    seen: dict[str, Any] = {}

    async def failing(argv: list[str], **kwargs: Any) -> None:
        paths = host.swtpm_paths(_domain())
        assert paths is not None and paths.ctrl_socket.exists()
        seen["pid"] = int(paths.pidfile.read_text())
        seen["argv"] = argv
        raise QemuLaunchError("qemu said no")

    monkeypatch.setattr(ferry.host, "launch", failing)
    with pytest.raises(QemuLaunchError, match="qemu said no"):
        asyncio.run(host.start(_domain()))
    assert _exited(seen["pid"]), "swtpm left running after qemu failed"
    assert "-tpmdev" in seen["argv"]
    # A transient domain that never ran keeps no TPM.
    assert not (tmp_path / "state" / "swtpm" / UUID).exists()

    # A persistent one keeps the TPM its first start manufactured.
    host.save_definition(_domain())
    with pytest.raises(QemuLaunchError):
        asyncio.run(host.start(_domain()))
    assert _exited(seen["pid"])
    assert (tmp_path / "state" / "swtpm" / UUID / "tpm2" / "tpm2-00.permall").exists()
    # ... until undefine.
    host.delete_definition("t")
    assert not (tmp_path / "state" / "swtpm" / UUID).exists()


def test_a_failed_incoming_start_removes_only_the_state_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Host(_config(tmp_path), "destination")
    host.ensure_dirs()

    async def failing(argv: list[str], **kwargs: Any) -> None:
        raise QemuLaunchError("qemu said no")

    monkeypatch.setattr(ferry.host, "launch", failing)
    host.save_definition(_domain())  # even with a definition here
    with pytest.raises(QemuLaunchError):
        asyncio.run(host.start(_domain(), incoming=True))
    assert not (tmp_path / "state" / "swtpm" / UUID).exists()
    # A state that was here before the migration stays.
    state = tmp_path / "state" / "swtpm" / UUID / "tpm2"
    state.mkdir(parents=True)
    (state / "marker").write_text("mine")
    with pytest.raises(QemuLaunchError):
        asyncio.run(host.start(_domain(), incoming=True))
    assert (state / "marker").read_text() == "mine"
    # What else the domain's directory holds (a TPM 1.2's state) stays too.
    shutil.rmtree(state)
    other = state.parent / "tpm1.2"
    other.mkdir()
    with pytest.raises(QemuLaunchError):
        asyncio.run(host.start(_domain(), incoming=True))
    assert not state.exists() and other.is_dir()


def test_kill_stale_kills_this_domains_swtpm_and_nothing_else(tmp_path: Path) -> None:
    host = Host(_config(tmp_path), "source")
    paths = host.swtpm_paths(_domain())
    assert paths is not None
    tpm = asyncio.run(start_swtpm(_domain(), paths, incoming=True, swtpm_setup=None))
    pid = tpm.pid
    tpm.close()
    assert kill_stale(paths, name="t")
    assert _exited(pid)
    assert not paths.pidfile.exists()
    # A pidfile naming some other process (here: this test) is not acted on.
    paths.pidfile.write_text(str(os.getpid()))
    assert not kill_stale(paths, name="t")


def test_cleanup_of_a_running_transient_domain_leaves_no_swtpm_and_no_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Host(_config(tmp_path), "source")
    host.ensure_dirs()
    paths = host.swtpm_paths(_domain())
    assert paths is not None
    tpm = asyncio.run(start_swtpm(_domain(), paths, incoming=True, swtpm_setup=None))
    tpm.close()
    host.save_live_definition(_domain())
    host.cleanup("t")  # its qemu is gone (say the agent found it dead)
    assert _exited(tpm.pid)
    assert not paths.domain_dir.exists()
