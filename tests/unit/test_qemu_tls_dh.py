"""qemu's TLS directory carries fixed DH parameters (qemu would generate them per object)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ferry.host import write_dh_params


def test_dh_params_are_rfc7919_ffdhe2048_and_written_once(tmp_path: Path) -> None:
    path = write_dh_params(tmp_path)
    assert path.name == "dh-params.pem"
    shown = subprocess.run(["openssl", "pkeyparam", "-in", str(path), "-text", "-noout"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "GROUP: ffdhe2048" in shown and "2048 bit" in shown
    before = path.stat().st_mtime_ns
    assert write_dh_params(tmp_path) == path and path.stat().st_mtime_ns == before
    assert [p.name for p in tmp_path.iterdir()] == ["dh-params.pem"]
