"""The qemu side of a ``<tpm>``: qemu talks to the ``swtpm`` Ferry started.

``-chardev socket,id=chrtpm,path=CTRL -tpmdev emulator,id=tpm-tpm0,
chardev=chrtpm -device tpm-crb|tpm-tis,tpmdev=tpm-tpm0,id=tpm0`` (libvirt's
ids). qemu connects to swtpm's control socket when it starts; the state of
the TPM then travels in the migration stream (qemu's ``tpm-emulator``
fetches swtpm's state blobs on the source and hands them to the
destination's swtpm). The socket lives in the domain's runtime directory
(``RuntimePaths.run_dir``), in a ``swtpm/`` subdirectory of its own, so no
chardev socket name can collide with it; :mod:`ferry.swtpm` starts swtpm
on that path.
"""

from __future__ import annotations

from pathlib import Path

from ferry.domain._checks import UNIX_PATH_MAX
from ferry.domain.model import Domain
from ferry.errors import QemuLaunchError

__all__ = ["swtpm_run_dir", "tpm_argv", "tpm_socket"]


def swtpm_run_dir(run_dir: Path) -> Path:
    """Where swtpm's control socket and pidfile go (under the domain's run dir)."""
    return run_dir / "swtpm"


def tpm_socket(run_dir: Path) -> Path:
    """swtpm's control socket, which qemu's ``-chardev`` connects to."""
    return swtpm_run_dir(run_dir) / "ctrl.sock"


def tpm_argv(domain: Domain, run_dir: Path) -> list[str]:
    """The qemu options of ``domain``'s TPM (none without one).

    :raises QemuLaunchError: the socket path is too long for a unix socket.
    """
    out: list[str] = []
    for i, t in enumerate(domain.tpms):
        sock = str(tpm_socket(run_dir))
        if len(sock.encode()) > UNIX_PATH_MAX:
            raise QemuLaunchError(
                f"domain {domain.name}: swtpm socket path {sock} is longer "
                f"than {UNIX_PATH_MAX} bytes (use a shorter [paths] run_dir)",
                domain=domain.name,
            )
        if "," in sock or "\n" in sock or "\0" in sock:
            raise QemuLaunchError(
                f"domain {domain.name}: swtpm socket path {sock!r} cannot be passed to qemu",
                domain=domain.name,
            )
        out += [
            "-chardev",
            f"socket,id=chrtpm,path={sock}",
            "-tpmdev",
            f"emulator,id=tpm-tpm{i},chardev=chrtpm",
            "-device",
            f"{t.model},tpmdev=tpm-tpm{i},id=tpm{i}",
        ]
    return out
