"""Dst storage copy: the images a migration's disks are mirrored into, and their NBD exports.

Prepare creates each image of the source's plan (the cookie's ``storage``
section, checked field by field and against the domain XML), inside the
storage policy, and never over an existing file: an image is created here
or the migration is refused. The incoming qemu then exports them, writable,
from an NBD server on the migration address with this host's certificate
(``tls-creds-x509``) and admits only the source host's certificate
(``authz-simple`` on its CN): nobody but this migration can write to them.

The paths of the images made here are kept in the incoming qemu's status
file (``created_images``) until Finish succeeds, so a failed, cancelled or
abandoned migration deletes them (and only them) — also after an agent
restart (:mod:`ferry_destination.recovery`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Sequence

from ferry.command import run_command
from ferry.domain import Domain
from ferry.domain.argv import qemu_disk_ids
from ferry.errors import CookieError, FerryError, MigrationRefused
from ferry.protocol.cookie import Nbd, StorageCopy
from ferry.qemu import QemuProcess
from ferry.storage_copy import (
    DiskCopy,
    block_export_add_args,
    create_image_argv,
    nbd_server_start_args,
    tls_creds_args,
)
from ferry.storage_policy import DomainPath, StoragePolicy
from ferry_destination.context import DestinationContext

__all__ = [
    "CREATED_KEY",
    "check_plan",
    "create_images",
    "forget_created",
    "record_created",
    "remove_images",
    "start_nbd",
    "start_nbd_unix",
    "stop_nbd",
]

log = logging.getLogger("ferry.destination")

#: The status-file key of the images this host created for an incoming migration.
CREATED_KEY = "created_images"
QEMU_IMG_TIMEOUT = 60.0
TLS_OBJECT = "ferry-nbd-tls"
AUTHZ_OBJECT = "ferry-nbd-authz"


def check_plan(domain: Domain, storage: StorageCopy) -> list[DiskCopy]:
    """The source's plan, each disk validated and matched with the domain XML.

    Raises:
        CookieError: a malformed disk entry.
        MigrationRefused: a disk that is not the XML's (other path, format, a
            read-only or shareable disk), or a disk named twice.
    """
    copies = [DiskCopy.from_wire(d) for d in storage.disks]
    by_target = {d.target_dev: d for d in domain.disks}
    seen: set[str] = set()
    for c in copies:
        disk = by_target.get(c.target)
        if c.target in seen:
            raise CookieError(f"copy plan: disk {c.target} is named twice")
        seen.add(c.target)
        if disk is None or disk.source != c.path:
            raise MigrationRefused(f"copy plan: disk {c.target} ({c.path}) is not a disk of "
                                   f"domain '{domain.name}' as its XML says")  # fmt: skip
        if (disk.format or "raw") != c.format or disk.readonly or disk.shareable:
            raise MigrationRefused(f"copy plan: disk {c.target} cannot be copied as asked "
                                   "(format, read-only or shareable differ from the XML)")
    return copies


async def _run(argv: Sequence[str]) -> None:
    try:
        done = await run_command(argv, QEMU_IMG_TIMEOUT)
    except TimeoutError:
        raise MigrationRefused(f"{argv[0]} did not finish in {QEMU_IMG_TIMEOUT:g} s") from None
    except OSError as exc:
        raise MigrationRefused(f"cannot run {argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise MigrationRefused(f"{' '.join(argv[:2])}: {done.stderr.strip()}")


async def create_images(dst: DestinationContext, domain: Domain, copies: Sequence[DiskCopy]
                        ) -> list[str]:  # fmt: skip
    """Create every image of ``copies``; the paths created (all of them, or none on error).

    Raises:
        PathNotAllowed: an image or backing file outside ``[storage] allowed``.
        MigrationRefused: an image already exists, a backing file does not,
            or ``qemu-img create`` failed.
    """
    policy = StoragePolicy.for_domain(dst.config, domain.name)
    host = dst.config.host.name
    for c in copies:
        where = f"domain/devices/disk[{c.target}]/source"
        policy.check_path(DomainPath(where, c.path, "disk", target=c.target, writable=True),
                          "prepare")  # fmt: skip
        if os.path.lexists(c.path):
            raise MigrationRefused(
                f"cannot copy disk {c.target}: {c.path} already exists on host {host} "
                "(Ferry creates the copy and never writes over a file; remove it, or migrate "
                "without --copy-storage-* if both hosts share it)", path=c.path)
        if c.shallow:
            assert c.backing is not None
            policy.check_path(DomainPath(f"{where} (backing file)", c.backing, "disk",
                                         target=c.target), "prepare")  # fmt: skip
            if not os.path.exists(c.backing):
                raise MigrationRefused(
                    f"cannot copy disk {c.target} with --copy-storage-inc: its backing file "
                    f"{c.backing} does not exist on host {host}", path=c.backing)
    created: list[str] = []
    try:
        for c in copies:
            await _run(create_image_argv(c))
            created.append(c.path)
            log.info("created %s (%s, %d bytes%s) for disk %s", c.path, c.format,
                     c.virtual_size, f", backing {c.backing}" if c.shallow else "", c.target)
    except BaseException:
        remove_images(created)
        raise
    return created


def remove_images(paths: Iterable[str]) -> list[str]:
    """Delete images this host created; the ones removed. Never raises."""
    removed = []
    for path in paths:
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove copied image %s: %s", path, exc)
    if removed:
        log.info("removed the images of a failed storage copy: %s", " ".join(removed))
    return removed


def record_created(dst: DestinationContext, name: str, paths: Sequence[str]) -> None:
    """Keep ``paths`` in ``name``'s status file until Finish succeeds."""
    status = dst.host.load_status(name)
    if status is not None:
        status.extra[CREATED_KEY] = list(paths)
        dst.host.save_status(status)


def forget_created(dst: DestinationContext, name: str) -> None:
    """The VM runs here on its images now: they are no longer a migration's leftovers."""
    status = dst.host.load_status(name)
    if status is not None and status.extra.pop(CREATED_KEY, None) is not None:
        dst.host.save_status(status)


async def start_nbd(
    dst: DestinationContext, proc: QemuProcess, domain: Domain, copies: Sequence[DiskCopy], *,
    client: str, address: str, port: int, advertised: str, tls: bool = True,
) -> Nbd:
    """Export ``copies`` over TCP from ``proc``'s NBD server for ``client`` (a certificate CN) only.

    Without ``tls`` (both hosts' ``[tls] allow_plaintext_nbd``) nothing but
    the migration network keeps others off the exports: the operators chose that.

    Raises:
        QMPError: qemu refused (port taken, certificate unreadable, ...).
    """
    creds = None
    if tls:
        await proc.qmp.execute("object-add", tls_creds_args(TLS_OBJECT, "server",
                                                            str(dst.host.qemu_tls_dir())))
        await proc.qmp.execute("object-add", {"qom-type": "authz-simple", "id": AUTHZ_OBJECT,
                                              "identity": f"CN={client}"})  # fmt: skip
        creds = TLS_OBJECT
    args = nbd_server_start_args((address, port), creds)
    if tls:
        args["tls-authz"] = AUTHZ_OBJECT
    await _export(proc, domain, copies, args)
    log.info("exporting %d disk(s) on %s:%d for %s%s", len(copies), address, port, client,
             "" if tls else " (plaintext: both hosts allow it)")  # fmt: skip
    if tls:
        return Nbd(host=advertised, port=port, tls_hostname=advertised)
    return Nbd(host=advertised, port=port, tls=False)


async def start_nbd_unix(
    proc: QemuProcess, domain: Domain, copies: Sequence[DiskCopy], path: str, first_channel: int
) -> Nbd:
    """Export ``copies`` on a unix socket only this agent reaches (``--tunnelled``).

    The socket sits in the agent's private tunnel directory; the disks'
    tunnel channels (authenticated by the migration's token, encrypted
    unless both hosts allow a plaintext tunnel) are its only clients, so
    qemu's TLS would only encrypt twice.
    """
    await _export(proc, domain, copies, nbd_server_start_args(path, None))
    log.info("exporting %d disk(s) through the tunnel", len(copies))
    return Nbd(transport="tunnel", tls=False, first_channel=first_channel)


async def _export(proc: QemuProcess, domain: Domain, copies: Sequence[DiskCopy],
                  server_args: dict[str, object]) -> None:  # fmt: skip
    await proc.qmp.execute("nbd-server-start", server_args)
    ids = qemu_disk_ids(domain)
    for c in copies:
        node = f"{ids[c.target]}-format"
        await proc.qmp.execute("block-export-add", block_export_add_args(c, node))


async def stop_nbd(proc: QemuProcess) -> None:
    """Stop the NBD server (its exports go with it) before the guest runs here."""
    await proc.qmp.execute("nbd-server-stop")
    for obj in (AUTHZ_OBJECT, TLS_OBJECT):
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("object-del", {"id": obj})
