"""Copying disks with a live migration (``--copy-storage-all`` / ``-inc``): the plan, sans I/O.

libvirt's design, our words and code. The destination creates each image
the source copies (same format, same virtual size; for ``-inc`` the same
backing file, which must already be there) and exports it, writable, from
its incoming qemu's NBD server. The source mirrors each disk into its
export (``blockdev-mirror``) until all are in sync, then migrates memory;
at switchover, with the guest paused, the mirrors are ended in sync, so
the destination's images are exactly the source's.

This module decides, from the domain, the flags and what ``qemu-img info``
said, *which* disks are copied and *how*, and builds the QMP arguments and
``qemu-img`` argv. It does no I/O: the agents run what it returns. What
comes from the peer (the plan in the cookie) is validated here before the
destination creates any file (:meth:`DiskCopy.from_wire`).

Which disks (libvirt's rule): without ``--migrate-disks``, every disk that
is a ``device='disk'`` with a source, not read-only and not shareable (a
shareable disk is on storage both hosts see). ``--migrate-disks vda,vdb``
copies exactly those, and naming a disk that is not there, or one that
cannot be copied (a cdrom, read-only, shareable), is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ferry.domain import Disk, Domain
from ferry.errors import CookieError, MigrationRefused

__all__ = [
    "COPY_MODES",
    "CopyMode",
    "DiskCopy",
    "ImageInfo",
    "MirrorProgress",
    "NbdAddress",
    "block_export_add_args",
    "copy_plan",
    "create_image_argv",
    "image_info_from_json",
    "mirror_args",
    "mirror_progress",
    "nbd_client_args",
    "nbd_server_start_args",
    "select_disks",
    "tls_creds_args",
]

CopyMode = Literal["all", "inc"]
COPY_MODES: tuple[CopyMode, ...] = ("all", "inc")

#: Image formats Ferry creates on the destination (those its disks may use).
_FORMATS = ("raw", "qcow2")
#: The largest virtual size a peer may ask the destination to create (64 TiB).
_MAX_SIZE = 64 << 40
_TARGET_RE = re.compile(r"^[a-z]{2,3}[a-z]{1,3}$")
_MAX_PATH = 4096


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info --output=json`` says of one image."""

    format: str
    virtual_size: int
    backing: str | None = None
    backing_format: str | None = None


def image_info_from_json(data: Mapping[str, Any]) -> ImageInfo:
    """Read ``qemu-img info --output=json`` (the top image only).

    Raises:
        ValueError: the document lacks the format or the virtual size.
    """
    fmt, size = data.get("format"), data.get("virtual-size")
    if not isinstance(fmt, str) or not isinstance(size, int) or size < 0:
        raise ValueError("qemu-img info: no format or virtual-size")
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    bfmt = data.get("backing-filename-format")
    return ImageInfo(format=fmt, virtual_size=size,
                     backing=backing if isinstance(backing, str) else None,
                     backing_format=bfmt if isinstance(bfmt, str) else None)  # fmt: skip


@dataclass(frozen=True)
class DiskCopy:
    """One disk to copy: what the destination creates and exports, what the source mirrors."""

    target: str  # the guest's name for it (vda), also the NBD export name
    path: str  # the image, the same path on both hosts
    format: str
    virtual_size: int
    #: ``-inc``: only the top layer is copied; the destination's image gets
    #: this backing file, which must already exist there.
    shallow: bool = False
    backing: str | None = None
    backing_format: str | None = None

    @property
    def export(self) -> str:
        """The NBD export name on the destination."""
        return f"ferry-{self.target}"

    @property
    def client_node(self) -> str:
        """The source's node name of the NBD client that the mirror writes to."""
        return f"ferry-nbd-{self.target}"

    @property
    def job(self) -> str:
        """The source's block job id of this disk's mirror."""
        return f"ferry-mirror-{self.target}"

    def to_wire(self) -> dict[str, Any]:
        """The cookie form (the destination reads it with :meth:`from_wire`)."""
        out: dict[str, Any] = {"target": self.target, "path": self.path, "format": self.format,
                               "virtual_size": self.virtual_size, "shallow": self.shallow}
        if self.backing is not None:
            out["backing"] = self.backing
            out["backing_format"] = self.backing_format
        return out

    @classmethod
    def from_wire(cls, data: object) -> DiskCopy:
        """Validate one disk of a peer's copy plan before anything is created.

        Raises:
            CookieError: a field is missing, of the wrong type or out of bounds.
        """
        if not isinstance(data, Mapping):
            raise CookieError("copy plan: each disk must be a map")
        target, path, fmt = data.get("target"), data.get("path"), data.get("format")
        size, shallow = data.get("virtual_size"), data.get("shallow", False)
        backing, bfmt = data.get("backing"), data.get("backing_format")
        if not isinstance(target, str) or not _TARGET_RE.match(target):
            raise CookieError(f"copy plan: bad disk target {target!r}")
        if not _is_path(path):
            raise CookieError(f"copy plan: disk {target}: bad path")
        if fmt not in _FORMATS:
            raise CookieError(f"copy plan: disk {target}: format {fmt!r} is not one of "
                              f"{', '.join(_FORMATS)}")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= _MAX_SIZE:
            raise CookieError(f"copy plan: disk {target}: bad virtual size {size!r}")
        if not isinstance(shallow, bool):
            raise CookieError(f"copy plan: disk {target}: shallow must be a boolean")
        if shallow:
            if not _is_path(backing) or bfmt not in _FORMATS:
                raise CookieError(f"copy plan: disk {target}: a shallow copy needs a backing "
                                  "file and its format")
        elif backing is not None or bfmt is not None:
            raise CookieError(f"copy plan: disk {target}: backing given for a full copy")
        assert isinstance(path, str) and isinstance(fmt, str)
        return cls(target=target, path=path, format=fmt, virtual_size=size, shallow=shallow,
                   backing=backing if shallow else None,
                   backing_format=bfmt if shallow else None)  # fmt: skip


def _is_path(value: object) -> bool:
    return (isinstance(value, str) and value.startswith("/") and 1 < len(value) <= _MAX_PATH
            and "\0" not in value)  # fmt: skip


def _copyable(disk: Disk) -> str | None:
    """Why ``disk`` cannot be copied, or None."""
    if disk.device != "disk":
        return f"it is a {disk.device}"
    if disk.source is None:
        return "it has no source"
    if disk.readonly:
        return "it is read-only"
    if disk.shareable:
        return "it is shareable (on storage both hosts see)"
    return None


def select_disks(domain: Domain, migrate_disks: Sequence[str] | None) -> list[Disk]:
    """The disks a storage copy moves (see the module docstring for the rule).

    Raises:
        MigrationRefused: ``migrate_disks`` names a disk that is not there or
            cannot be copied (every such name, with the reason).
    """
    by_target = {d.target_dev: d for d in domain.disks}
    if migrate_disks is None:
        return [d for d in domain.disks if _copyable(d) is None]
    problems = []
    for name in dict.fromkeys(migrate_disks):
        disk = by_target.get(name)
        if disk is None:
            problems.append(f"{name}: no such disk (the domain has "
                            f"{', '.join(by_target) or 'none'})")
        elif (why := _copyable(disk)) is not None:
            problems.append(f"{name}: cannot be copied: {why}")
    if problems:
        raise MigrationRefused("--migrate-disks: " + "; ".join(problems))
    return [by_target[n] for n in dict.fromkeys(migrate_disks)]


def copy_plan(
    disks: Iterable[Disk], infos: Mapping[str, ImageInfo], mode: CopyMode
) -> list[DiskCopy]:
    """What to copy of each disk, from its image's ``qemu-img info``.

    Raises:
        MigrationRefused: an image format Ferry does not create, a format that
            disagrees with the XML, or ``-inc`` on an image with no backing file.
    """
    out: list[DiskCopy] = []
    problems: list[str] = []
    for disk in disks:
        assert disk.source is not None
        info = infos[disk.source]
        declared = disk.format or "raw"
        if info.format != declared:
            problems.append(f"{disk.target_dev}: the image is {info.format}, the XML says "
                            f"{declared}")
            continue
        if info.format not in _FORMATS:
            problems.append(f"{disk.target_dev}: cannot create a {info.format} image")
            continue
        if mode == "inc":
            if info.backing is None or info.backing_format not in _FORMATS:
                problems.append(f"{disk.target_dev}: --copy-storage-inc needs an image with a "
                                "backing file both hosts have; this one has "
                                + ("none" if info.backing is None else
                                   f"a {info.backing_format or 'unknown'}-format one"))  # fmt: skip
                continue
            out.append(DiskCopy(target=disk.target_dev, path=disk.source, format=info.format,
                                virtual_size=info.virtual_size, shallow=True,
                                backing=info.backing,
                                backing_format=info.backing_format))  # fmt: skip
        else:
            out.append(DiskCopy(target=disk.target_dev, path=disk.source, format=info.format,
                                virtual_size=info.virtual_size))  # fmt: skip
    if problems:
        raise MigrationRefused("cannot copy storage: " + "; ".join(problems))
    return out


def create_image_argv(copy: DiskCopy, qemu_img: str = "qemu-img") -> list[str]:
    """``qemu-img create`` for the destination's image of ``copy`` (an argv)."""
    argv = [qemu_img, "create", "-q", "-f", copy.format]
    if copy.shallow:
        assert copy.backing is not None and copy.backing_format is not None
        argv += ["-b", copy.backing, "-F", copy.backing_format]
    return [*argv, copy.path, str(copy.virtual_size)]


#: Where an NBD server listens: (host, port) over TCP, or a unix socket path
#: (``--tunnelled``: the destination agent connects the tunnel's disk channels there).
NbdAddress = tuple[str, int] | str


def nbd_server_start_args(listen: NbdAddress, tls_creds: str | None) -> dict[str, Any]:
    """``nbd-server-start`` on the destination: TCP or a unix socket, TLS when given."""
    if isinstance(listen, str):
        addr: dict[str, Any] = {"type": "unix", "data": {"path": listen}}
    else:
        addr = {"type": "inet", "data": {"host": listen[0], "port": str(listen[1])}}
    args: dict[str, Any] = {"addr": addr}
    if tls_creds is not None:
        args["tls-creds"] = tls_creds
    return args


def tls_creds_args(object_id: str, endpoint: str, directory: str) -> dict[str, Any]:
    """``object-add`` of qemu's x509 credentials (``endpoint`` "server" or "client")
    from ``directory`` (:meth:`ferry.host.Host.qemu_tls_dir`), peers verified."""
    return {"qom-type": "tls-creds-x509", "id": object_id, "endpoint": endpoint,
            "dir": directory, "verify-peer": True}  # fmt: skip


def block_export_add_args(copy: DiskCopy, node: str) -> dict[str, Any]:
    """``block-export-add``: the destination's node of ``copy``, writable over NBD."""
    return {"type": "nbd", "id": copy.export, "node-name": node, "name": copy.export,
            "writable": True}  # fmt: skip


def nbd_client_args(copy: DiskCopy, server: NbdAddress, tls_creds: str | None) -> dict[str, Any]:
    """``blockdev-add`` on the source: an NBD client node of the destination's export."""
    if isinstance(server, str):
        where: dict[str, Any] = {"type": "unix", "path": server}
    else:
        where = {"type": "inet", "host": server[0], "port": str(server[1])}
    args: dict[str, Any] = {
        "driver": "nbd", "node-name": copy.client_node, "export": copy.export, "server": where,
    }  # fmt: skip
    if tls_creds is not None:
        args["tls-creds"] = tls_creds
    return args


def mirror_args(
    copy: DiskCopy, device_node: str, *, synchronous_writes: bool, speed: int = 0
) -> dict[str, Any]:
    """``blockdev-mirror`` of the source's ``device_node`` into the NBD client node.

    ``synchronous_writes`` (libvirt's ``--copy-storage-synchronous-writes``)
    is qemu's ``copy-mode: write-blocking``: a guest write completes only
    when both copies have it, so a disk-busy guest cannot outrun the mirror.
    The job is not dismissed by itself so that its end state can be read.
    """
    args: dict[str, Any] = {
        "job-id": copy.job, "device": device_node, "target": copy.client_node,
        "sync": "top" if copy.shallow else "full",
        "copy-mode": "write-blocking" if synchronous_writes else "background",
        "auto-finalize": True, "auto-dismiss": False,
    }  # fmt: skip
    if speed:
        args["speed"] = speed
    return args


@dataclass(frozen=True)
class MirrorProgress:
    """All mirrors of a migration, from one ``query-block-jobs``."""

    copied: int
    total: int
    #: Every mirror is in sync (``ready``): memory may start moving.
    ready: bool
    #: Per disk: (target, copied, total, ready).
    disks: tuple[tuple[str, int, int, bool], ...]
    #: Jobs that are gone or ended in error, with qemu's words.
    failed: tuple[str, ...] = ()


def mirror_progress(
    copies: Sequence[DiskCopy], jobs: Sequence[Mapping[str, Any]]
) -> MirrorProgress:
    """Fold ``query-block-jobs`` into the progress of ``copies``' mirrors."""
    by_id = {j.get("device"): j for j in jobs}
    disks = []
    failed = []
    for c in copies:
        job = by_id.get(c.job)
        if job is None:
            failed.append(f"{c.target}: mirror job is gone")
            disks.append((c.target, 0, c.virtual_size, False))
            continue
        if job.get("status") in ("aborting", "concluded", "null") and not job.get("ready"):
            failed.append(f"{c.target}: mirror {job.get('status')}"
                          + (f": {job['error']}" if job.get("error") else ""))  # fmt: skip
        offset, length = int(job.get("offset", 0)), int(job.get("len", 0))
        disks.append((c.target, offset, length, bool(job.get("ready"))))
    return MirrorProgress(
        copied=sum(d[1] for d in disks), total=sum(d[2] for d in disks),
        ready=bool(disks) and not failed and all(d[3] for d in disks),
        disks=tuple(disks), failed=tuple(failed))  # fmt: skip
