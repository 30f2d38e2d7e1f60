"""Begin's refusals: what makes a migration unsafe before anything moves.

libvirt's ``qemuMigrationSrcIsAllowed`` and ``qemuMigrationSrcIsSafe``,
in our words.
"""

from __future__ import annotations

import os

from ferry import allowed
from ferry.allowed import unmigratable
from ferry.domain import Domain
from ferry.errors import MigrationRefused
from ferry.flags import MigrationFlags
from ferry.qemu import QemuProcess
from ferry.uri import DEFAULT_AGENT_PORT, parse_dest_uri

__all__ = [
    "DEFAULT_AGENT_PORT",
    "check_io_error",
    "is_allowed",
    "parse_dest_uri",
    "unmigratable",
    "unsafe_disks",
]

# Cache modes that bypass the host page cache: safe when another host opens
# the same image (libvirt's qemuMigrationSrcIsSafe).
SAFE_CACHE = frozenset({"none", "directsync"})
# statfs f_type of cluster filesystems whose coherent caches make any mode safe.
CLUSTER_FS_MAGIC = {
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x00C36400: "ceph",
    0x47504653: "gpfs",
}


def _fs_magic(path: str) -> int | None:
    """statfs(2) f_type of the filesystem holding ``path`` (None if unknown)."""
    import ctypes
    import ctypes.util

    class StatFS(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    buf = StatFS()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def unsafe_disks(domain: Domain, copied: frozenset[str] = frozenset()) -> list[str]:
    """Disks whose cache mode makes migration unsafe, each with the reason.

    A disk in ``copied`` (``--copy-storage-*``) is safe whatever its cache:
    the mirror reads through qemu, and ends in sync with the guest paused.
    """
    problems = []
    for disk in domain.disks:
        if disk.readonly or disk.shareable or disk.source is None or disk.device == "cdrom":
            continue
        if disk.target_dev in copied:
            continue
        cache = disk.cache or "default"
        if cache in SAFE_CACHE:
            continue
        magic = _fs_magic(disk.source)
        if magic in CLUSTER_FS_MAGIC:
            continue
        problems.append(
            f"disk {disk.target_dev} ({disk.source}) uses cache mode '{cache}': the source "
            "host may still hold unwritten data for it in its page cache; use cache "
            "'none' or 'directsync', or pass --unsafe"
        )
    return problems


def is_allowed(
    domain: Domain, flags: MigrationFlags, snapshots: list[str], run_state: str | None,
    copied: frozenset[str] = frozenset(),
) -> None:
    """Refuse a migration of ``domain`` that cannot be safe.

    Raises:
        MigrationRefused: naming the reason (snapshots, a part of the domain
            that cannot migrate, unsafe cache, I/O error).
    """
    if snapshots:
        raise MigrationRefused(
            f"cannot migrate domain '{domain.name}' with {len(snapshots)} snapshot(s)",
            snapshots=snapshots,
        )
    # Shared with save, dump and snapshot (ferry.allowed: remote=True here).
    blockers = allowed.is_allowed(domain, True)
    if blockers:
        raise MigrationRefused(
            allowed.refusal(domain.name, "migrate", blockers),
            blockers=[p.message for p in blockers],
        )
    if not flags & MigrationFlags.UNSAFE:
        problems = unsafe_disks(domain, copied)
        if problems:
            raise MigrationRefused("unsafe migration: " + "; ".join(problems))
    if run_state == "io-error" and flags & MigrationFlags.ABORT_ON_ERROR:
        raise MigrationRefused(
            f"cannot migrate domain '{domain.name}': it is paused after an I/O error "
            "and --abort-on-error was given"
        )


async def check_io_error(proc: QemuProcess, domain: str, flags: MigrationFlags) -> None:
    """Refuse with ABORT_ON_ERROR when qemu says the guest is paused on an I/O error.

    Raises:
        MigrationRefused: the guest is paused on an I/O error.
    """
    if not flags & MigrationFlags.ABORT_ON_ERROR:
        return
    run = await proc.qmp.query_status()
    if run.reason == "io-error" or run.status == "io-error":
        raise MigrationRefused(
            f"cannot migrate domain '{domain}': it is paused after an I/O error "
            "and --abort-on-error was given"
        )
