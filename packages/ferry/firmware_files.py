"""UEFI firmware on the host: descriptors, the per-VM NVRAM file, descriptors for qemu.

:mod:`ferry.domain.firmware` chooses the firmware (sans I/O); this module
reads the descriptors, makes the VM's NVRAM file and opens the images for
qemu, the way :mod:`ferry.storage_policy` opens disks:

* Descriptors come from ``/etc/qemu/firmware`` and ``/usr/share/qemu/firmware``
  (qemu's search order: a file in ``/etc`` replaces the one of the same name,
  an empty one hides it). A malformed file is logged and skipped.
* The NVRAM file of a domain without an ``<nvram>`` path is Ferry's:
  ``state_dir/nvram/NAME_VARS.fd`` (libvirt's is
  ``/var/lib/libvirt/qemu/nvram/NAME_VARS.fd``). An explicit path is the
  operator's and must be within ``[storage] allowed``. Either is created from
  the template when missing (a copy written beside it, synced, then linked
  into place, so a crash leaves no half file and an existing file, possibly
  the very one a running source uses on shared storage, is never
  overwritten); an existing one is used as it is.
* The loader and the template must be installed firmware (named by a
  descriptor) or within ``[storage] allowed``: a definition from a peer must
  not map ``/etc/shadow`` into guest memory. Both are opened here
  (``O_NOFOLLOW`` on the resolved path, checked again through
  ``/proc/self/fd``), the code read-only and the variables read-write, and
  qemu gets them as fd sets (``/dev/fdset/N``).

A migration's destination creates its NVRAM file from the template in
Prepare (unless it exists: shared storage, or left from an earlier stay);
qemu carries the flash contents in the stream (a pflash is a RAM block) and
its pflash post-load handler writes them to the destination's file when the
CPUs start. The destination records a file it created in the status file
(``nvram_created``) and removes it when the incoming qemu is discarded
(:meth:`ferry.host.Host.cleanup`); the source's file stays with the source's
definition and goes when that is undefined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ferry.config import AgentConfig
from ferry.domain import Domain
from ferry.domain.firmware import (
    FirmwareDescriptor,
    descriptor_paths,
    loader_type,
    needs_nvram,
    parse_descriptor,
    resolve_firmware,
)
from ferry.errors import PathNotAllowed, QemuLaunchError
from ferry.storage_policy import SETTING, OpenedFiles, StoragePolicy

__all__ = [
    "FIRMWARE_DIRS",
    "FirmwareFiles",
    "default_nvram_path",
    "firmware_files",
    "load_descriptors",
    "remove_default_nvram",
]

log = logging.getLogger("ferry.firmware")

#: Where qemu's firmware descriptors are, in the order qemu searches them.
FIRMWARE_DIRS: tuple[Path, ...] = (Path("/etc/qemu/firmware"), Path("/usr/share/qemu/firmware"))


def load_descriptors(dirs: Sequence[Path] = FIRMWARE_DIRS) -> list[FirmwareDescriptor]:
    """The host's firmware descriptors, by file name (an earlier directory wins)."""
    chosen: dict[str, Path] = {}
    for d in dirs:
        with contextlib.suppress(OSError):
            for p in d.glob("*.json"):
                chosen.setdefault(p.name, p)
    out = []
    for name in sorted(chosen):
        path = chosen[name]
        try:
            data = path.read_bytes()
            if not data.strip():
                continue  # an empty file masks the one of the same name
            out.append(parse_descriptor(name, data))
        except (OSError, ValueError) as exc:
            log.warning("skipping firmware descriptor %s: %s", path, exc)
    return out


def default_nvram_path(config: AgentConfig, name: str) -> Path:
    """Ferry's NVRAM file for domain ``name`` (its ``<nvram>`` names no path)."""
    return config.paths.state_dir / "nvram" / f"{name}_VARS.fd"


def remove_default_nvram(config: AgentConfig, name: str) -> bool:
    """Delete ``name``'s default NVRAM file (its definition is gone); True if there was one."""
    try:
        default_nvram_path(config, name).unlink()
    except FileNotFoundError:
        return False
    log.info("removed the NVRAM file of %s", name)
    return True


@dataclass
class FirmwareFiles:
    """What :func:`firmware_files` prepared for one qemu launch."""

    #: The domain with its firmware resolved (what qemu runs, the live XML).
    domain: Domain
    #: The NVRAM file qemu uses, if any.
    nvram: Path | None = None
    #: True when this launch created it from the template.
    created: bool = False
    fds: list[int] = field(default_factory=list)


def _open(path: str, write: bool, what: str, where: str,
          permitted: Iterable[str], policy: StoragePolicy) -> int:  # fmt: skip
    """Open ``path`` (resolved, no symlink) and check what the descriptor is."""
    resolved = os.path.realpath(path)
    allowed = set(permitted)

    def check(actual: str) -> None:
        if actual not in allowed and not policy.permits(actual, "disk"):
            raise PathNotAllowed(
                f"{where}: domain/os: {what} '{path}'"
                + (f" (resolves to '{actual}')" if actual != path else "")
                + f" is neither installed firmware (named by a firmware descriptor) nor "
                  f"within {SETTING} ({', '.join(policy.configured) or 'nothing'})",
                element="domain/os", path=path, resolved=actual, setting=SETTING)

    check(resolved)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(resolved, flags | os.O_NONBLOCK)
    except OSError as exc:
        raise QemuLaunchError(f"{where}: domain/os: cannot open {what} '{path}': "
                              f"{exc.strerror or exc}", element="domain/os", path=path) from None
    try:
        check(os.readlink(f"/proc/self/fd/{fd}"))
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise QemuLaunchError(f"{where}: domain/os: {what} '{path}' is not a regular file",
                                  element="domain/os", path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_from(template_fd: int, dest: Path) -> bool:
    """Copy the template to ``dest`` unless it exists; True if this call created it."""
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if dest.exists():
        return False
    tfd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(tfd, "wb") as out:
            os.lseek(template_fd, 0, os.SEEK_SET)
            while chunk := os.read(template_fd, 1 << 20):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, dest)  # never replaces: EEXIST if one appeared meanwhile
        except FileExistsError:
            return False
        dfd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def firmware_files(
    domain: Domain, config: AgentConfig, files: OpenedFiles, *, where: str = "start",
    descriptors: Sequence[FirmwareDescriptor] | None = None,
) -> Iterator[FirmwareFiles]:  # fmt: skip
    """Resolve ``domain``'s firmware and open its images for qemu, into ``files``.

    The descriptors go into ``files.fds`` and ``files.passed`` (fd sets after
    the disks'; ``PassedFiles.firmware`` names them: code, then variables).
    The NVRAM file is created from its template when missing; when the block
    raises, a file created here is removed again (only that one).

    :raises XMLUnsupported: no installed firmware fits the definition.
    :raises PathNotAllowed: a loader, template or NVRAM path outside what the
        host allows.
    :raises QemuLaunchError: a file cannot be opened or is not a regular file.
    """
    os_ = domain.os
    if os_.loader is None and os_.firmware != "efi":
        yield FirmwareFiles(domain)
        return
    descs = list(descriptors) if descriptors is not None else load_descriptors()
    resolved = resolve_firmware(domain, descs)
    out = FirmwareFiles(resolved)
    ro = resolved.os
    if ro.loader is None or ro.loader.path is None:  # resolve_firmware names one for UEFI
        raise QemuLaunchError(f"{where}: domain/os/loader: no firmware image to load",
                              element="domain/os/loader")
    policy = StoragePolicy.for_domain(config, domain.name)
    installed = {os.path.realpath(p) for p in descriptor_paths(descs)}
    nvram = ro.nvram if needs_nvram(ro) else None
    opened: list[int] = []
    try:
        writable_code = loader_type(ro) == "pflash" and ro.loader.readonly is False
        opened.append(_open(ro.loader.path, writable_code, "loader", where,
                            () if writable_code else installed, policy))
        if nvram is not None:
            if nvram.path is None:
                path = default_nvram_path(config, domain.name)
            else:
                path = Path(nvram.path)
                resolved_path = os.path.realpath(path)
                if not policy.permits(resolved_path, "disk"):
                    raise PathNotAllowed(
                        f"{where}: domain/os/nvram: NVRAM path '{path}' is outside {SETTING} "
                        f"({', '.join(policy.configured) or 'nothing'})",
                        element="domain/os/nvram", path=str(path), resolved=resolved_path,
                        setting=SETTING)
            if not path.exists():
                if nvram.template is None:
                    raise QemuLaunchError(
                        f"{where}: domain/os/nvram: the NVRAM file '{path}' does not exist and "
                        "no template is known to create it from", element="domain/os/nvram")
                tfd = _open(nvram.template, False, "NVRAM template", where, installed, policy)
                try:
                    out.created = _create_from(tfd, path)
                finally:
                    os.close(tfd)
                if out.created:
                    log.info("%s: created the NVRAM file %s of %s from %s", where, path,
                             domain.name, nvram.template)
            out.nvram = path
            own = (os.path.realpath(path),) if nvram.path is None else ()
            opened.append(_open(str(path), True, "NVRAM file", where, own, policy))
    except BaseException:
        for fd in opened:
            os.close(fd)
        if out.created and out.nvram is not None:
            with contextlib.suppress(FileNotFoundError):
                out.nvram.unlink()
        raise
    files.fds.extend(opened)
    out.fds = opened
    if loader_type(ro) == "rom":
        # -bios reads the file with a plain open(): a /dev/fdset name means nothing to it.
        files.passed = dataclasses.replace(files.passed, firmware=(f"/proc/self/fd/{opened[0]}",))
    else:
        first = len(files.passed.fd_sets) + 1
        sets = tuple((fd, first + i, f"pflash{i}") for i, fd in enumerate(opened))
        files.passed = dataclasses.replace(
            files.passed, fd_sets=files.passed.fd_sets + sets,
            firmware=tuple(f"/dev/fdset/{s}" for _, s, _ in sets))
    try:
        yield out
    except BaseException:
        if out.created and out.nvram is not None:
            with contextlib.suppress(FileNotFoundError):
                out.nvram.unlink()
            log.info("%s: removed the NVRAM file %s it had created", where, out.nvram)
        raise
