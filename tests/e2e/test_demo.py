"""``make demo`` as a smoke test: it succeeds, says what it should, leaves nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "tools" / "demo.py"


def _not_ready() -> str | None:
    if os.geteuid() != 0:
        return "the demo needs root (network namespaces, journald)"
    for tool in ("ip", "qemu-system-x86_64", "as", "ld", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/lib/systemd/systemd-journald").exists():
        return "systemd-journald is not installed"
    return None


def _cmdlines() -> list[str]:
    """Every process's command line, NULs as spaces."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            out.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return out


@pytest.mark.multipass
def test_demo_runs_and_cleans_up() -> None:
    reason = _not_ready()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "FERRY_KEEP_TESTBED"}
    proc = subprocess.run(
        [sys.executable, str(DEMO)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=REPO,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output

    for key in (
        "== [1/7] Two hosts",
        "== [2/7] Test guest 'g1' on host A",
        "== [3/7] Before",
        "== [4/7] Live migration A -> B",
        "phase: perform",
        "Migration completed: g1 now runs on b",
        "== [5/7] After",
        "qemu processes in",
        "bad pages 0",
        "checksum of the static pages unchanged",
        "with no reboot",
        "== [6/7] The migration's journal",
        "entering perform",
        "finish: g1 now runs here on b",
        "== [7/7] Teardown",
        "Summary",
        "downtime",
        "demo total",
        "Demo completed successfully.",
    ):
        assert key in proc.stdout, f"{key!r} missing from the demo's output:\n{output}"
    # Both the before and after status lines come from the guest itself.
    assert re.search(r"guest says on B: counter=\d+ .*bad pages=0", proc.stdout), output

    # Nothing of the demo is left: namespaces, test bed, qemu, journald and its files.
    namespaces = re.findall(r"namespace (ferry-[0-9a-f]+-[ab])\b", proc.stdout)
    assert len(set(namespaces)) == 2, output
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in set(namespaces):
        assert name not in netns, f"namespace {name} left behind"
    testbed = re.search(r"test bed directory: (\S+)", proc.stdout)
    assert testbed is not None, output
    assert not Path(testbed.group(1)).exists(), "test bed directory left behind"
    journal_ns = re.search(r"journald namespace '([\w-]+)'", proc.stdout)
    assert journal_ns is not None, output
    ns = journal_ns.group(1)
    assert not Path(f"/run/systemd/journal.{ns}").exists()
    assert not list(Path("/var/log/journal").glob(f"*.{ns}"))
    assert not list(Path("/run/log/journal").glob(f"*.{ns}"))
    for cmdline in _cmdlines():
        assert f"systemd-journald {ns}" not in cmdline, "the demo's journald is still running"
        assert testbed.group(1) not in cmdline, f"process left behind: {cmdline[:200]}"
