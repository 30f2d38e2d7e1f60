"""The storage path policy: which host paths a domain may make qemu open.

Any host that holds a certificate from the CA can send a domain XML in
Prepare, and any member of the admin group can define one; without a policy
either could make qemu open ``/etc/shadow`` as a disk. So every host path
the domain model can name is checked against ``[storage] allowed``
(:class:`ferry.config.StorageConfig`) after resolving symlinks:

============================== ===================================== ===========
element                        path                                  handed over
============================== ===================================== ===========
``disk type='file'``           ``<source file>``                     fd set
``disk type='block'``          ``<source dev>``                      path
``os/kernel``, ``os/initrd``   the file                              fd
``serial|console|channel``     ``<source path>`` of a file or unix   path
``os/nvram``                   the VM's NVRAM file (when named)      fd set
============================== ===================================== ===========

A unix socket or chardev file may also be in the domain's own socket
directory (``run_dir/serial/NAME``), where Ferry places the sockets a
definition leaves unnamed, and those of channels whose path is one libvirt
chose for a run (``/var/lib/libvirt/qemu/channel/target/domain-…``, see
:func:`ferry.domain.model.is_libvirt_channel_path`), which are not checked.
Not checked either, and why: ``<emulator>`` (the host's ``[qemu] binary``
runs, the element is not used); rng backends (the parser admits only
/dev/urandom, /dev/random and /dev/hwrng); every other path-bearing element
(the parser refuses them). The UEFI loader and NVRAM template may also be
installed firmware (named by a qemu firmware descriptor): they are checked
and opened when qemu starts, by :mod:`ferry.firmware_files`, which also
creates a missing NVRAM file from its template before opening it.

A check alone would lose a race against a symlink swapped between the check
and qemu's open, so :func:`open_domain_files` opens file disks, the kernel
and the initrd itself: on the resolved path with ``O_NOFOLLOW``, then reads
back where the descriptor really points (``/proc/self/fd/N``) and checks
*that* against the policy; qemu gets the descriptor (``-add-fd`` and
``/dev/fdset/N`` for disks, as libvirt does; ``/proc/self/fd/N`` for the
kernel and initrd, which qemu 7.2 reads with ``fopen``). Block devices,
chardev files and sockets are checked, then handed over by path: qemu 7.2
opens a host_device with flags the agent cannot predict, and creates the
files and sockets itself.

The decisions (:func:`domain_paths`, :meth:`StoragePolicy.permits`) are
pure; only resolving and opening touch the file system, and resolving is
injectable for tests.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ferry.config import AgentConfig
from ferry.domain import Domain, PassedFiles
from ferry.domain.model import is_libvirt_channel_path
from ferry.errors import PathNotAllowed, QemuLaunchError
from ferry.names import check_domain_names

__all__ = [
    "SETTING",
    "DomainPath",
    "OpenedFiles",
    "StoragePolicy",
    "check_domain",
    "domain_paths",
    "open_domain_files",
]

#: The configuration setting named in refusals.
SETTING = "[storage] allowed"

PathKind = Literal["disk", "kernel", "initrd", "file", "socket", "directory", "nvram"]
Resolver = Callable[[str], str]


@dataclass(frozen=True)
class DomainPath:
    """One host path named by a domain, and what it is for."""

    #: where in the domain: ``domain/devices/disk[vda]/source``.
    element: str
    path: str
    kind: PathKind
    #: a disk's target dev (its fd set is keyed by it).
    target: str | None = None
    #: qemu may write it: its descriptor is opened read-write, else read-only.
    writable: bool = False
    #: a block device (checked, not opened: see the module docstring).
    block: bool = False


def domain_paths(domain: Domain) -> list[DomainPath]:
    """Every host path ``domain`` names that qemu would open, in argv order."""
    out: list[DomainPath] = []
    if domain.os.kernel:
        out.append(DomainPath("domain/os/kernel", domain.os.kernel, "kernel"))
    if domain.os.initrd:
        out.append(DomainPath("domain/os/initrd", domain.os.initrd, "initrd"))
    if domain.os.nvram is not None and domain.os.nvram.path:
        # Opened (and first created) by ferry.firmware_files; checked here from define on.
        out.append(DomainPath("domain/os/nvram", domain.os.nvram.path, "nvram", writable=True))
    for d in domain.disks:
        if d.source is None:
            continue  # an empty cdrom
        writable = not d.readonly  # cdroms are read-only (the parser sets it)
        out.append(DomainPath(f"domain/devices/disk[{d.target_dev}]/source", d.source, "disk",
                              target=d.target_dev, writable=writable,
                              block=d.type == "block"))  # fmt: skip
    for tag, devs in (("serial", domain.serials), ("console", domain.consoles),
                      ("channel", domain.channels)):  # fmt: skip
        for i, c in enumerate(devs):
            if c.source_path is None or c.type not in ("file", "unix") or (
                    c.type == "unix" and is_libvirt_channel_path(c.source_path)):
                # pty/null/spicevmc, or a socket Ferry places itself (in its own
                # directory also for a path libvirt chose for one run).
                continue
            kind: PathKind = "socket" if c.type == "unix" else "file"
            out.append(DomainPath(f"domain/devices/{tag}[{i}]/source", c.source_path, kind))
    for i, fs in enumerate(domain.filesystems):
        # A shared directory (virtiofs): its server, not qemu, opens it.
        out.append(DomainPath(f"domain/devices/filesystem[{i}]/source", fs.source_dir,
                              "directory", writable=True))
    return out


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


class StoragePolicy:
    """``[storage] allowed`` plus the domain's own socket directory.

    The allowed entries are resolved too (``/var/run`` → ``/run``), once,
    when the policy is made.
    """

    def __init__(
        self,
        allowed: Iterable[Path | str],
        own_dir: Path | str | None = None,
        *,
        resolve: Resolver = os.path.realpath,
    ) -> None:
        self.configured = tuple(str(p) for p in allowed)
        self.resolve = resolve
        self.allowed = tuple(resolve(p) for p in self.configured)
        self.own_dir = resolve(str(own_dir)) if own_dir is not None else None

    @classmethod
    def for_domain(cls, config: AgentConfig, name: str) -> StoragePolicy:
        """The policy of this host for domain ``name``."""
        return cls(config.storage.allowed, config.paths.serial_dir / name)

    def permits(self, resolved: str, kind: PathKind) -> bool:
        """True if qemu may use ``resolved`` (already free of symlinks) as a ``kind``."""
        if any(_under(resolved, root) for root in self.allowed):
            return True
        # Sockets and chardev files in the domain's own directory, where
        # Ferry places them; never images or kernels (nothing puts them there).
        return kind in ("socket", "file") and self.own_dir is not None and _under(
            resolved, self.own_dir
        )

    def refusal(self, where: str, item: DomainPath, resolved: str, *, opened: bool = False
                ) -> PathNotAllowed:  # fmt: skip
        """The error for ``item`` resolving to ``resolved``, which is not permitted."""
        shown = f"'{item.path}'"
        if resolved != item.path:
            shown += f" ({'opened as' if opened else 'resolves to'} '{resolved}')"
        listed = ", ".join(self.configured) or "nothing"
        own = (f" or the domain's socket directory {self.own_dir}"
               if item.kind in ("socket", "file") and self.own_dir else "")  # fmt: skip
        return PathNotAllowed(
            f"{where}: {item.element}: {item.kind} path {shown} is outside {SETTING} "
            f"({listed}){own}",
            element=item.element, path=item.path, resolved=resolved, setting=SETTING,
        )  # fmt: skip

    def check_path(self, item: DomainPath, where: str = "domain") -> str:
        """Resolve ``item.path`` (symlinks included) and check it; return the resolved path.

        :raises PathNotAllowed: naming the element, the path and the setting.
        """
        resolved = self.resolve(item.path)
        if not self.permits(resolved, item.kind):
            raise self.refusal(where, item, resolved)
        return resolved

    def check(self, domain: Domain, where: str = "domain") -> None:
        """Check every path of ``domain``.

        :raises PathNotAllowed: for the first path outside the policy.
        """
        for item in domain_paths(domain):
            self.check_path(item, where)


def check_domain(domain: Domain, config: AgentConfig, *, where: str = "domain") -> None:
    """Everything this host requires of a domain before it defines, starts or receives it.

    The name fits every path built from it (:mod:`ferry.names`) and every
    host path is within the storage policy. ``where`` names the request in
    messages (``define``, ``start``, ``prepare``).

    :raises NameInvalid: the name (or a socket built from it) does not fit.
    :raises PathNotAllowed: a path is outside ``[storage] allowed``.
    """
    check_domain_names(domain, config.paths, where=where)
    StoragePolicy.for_domain(config, domain.name).check(domain, where)


class OpenedFiles:
    """Descriptors opened for one qemu launch; close them once qemu has its copies."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self.passed = PassedFiles()

    def close(self) -> None:
        """Close every descriptor (qemu keeps its inherited copies)."""
        while self.fds:
            with contextlib.suppress(OSError):
                os.close(self.fds.pop())

    def __enter__(self) -> OpenedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fd_path(fd: int) -> str:
    # The kernel's own record of what the descriptor is: a symlink swapped
    # after the open cannot change it.
    return os.readlink(f"/proc/self/fd/{fd}")


def _open_checked(policy: StoragePolicy, item: DomainPath, resolved: str, write: bool,
                  where: str) -> int:  # fmt: skip
    """Open ``resolved`` for ``item`` and prove the descriptor is inside the policy."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW
    # O_NONBLOCK: a FIFO put in place of the image must not hang the agent.
    try:
        fd = os.open(resolved, flags | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathNotAllowed(
                f"{where}: {item.element}: {item.kind} path '{item.path}' became a symlink "
                f"after it was checked; refusing it ({SETTING})",
                element=item.element, path=item.path, resolved=resolved, setting=SETTING,
            ) from None  # fmt: skip
        raise QemuLaunchError(
            f"{where}: {item.element}: cannot open {item.kind} '{item.path}': "
            f"{exc.strerror or exc}", element=item.element, path=item.path,
        ) from None  # fmt: skip
    try:
        actual = _fd_path(fd)
        if not policy.permits(actual, item.kind):
            raise policy.refusal(where, item, actual, opened=True)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise QemuLaunchError(
                f"{where}: {item.element}: {item.kind} '{item.path}' is not a regular file",
                element=item.element, path=item.path,
            )  # fmt: skip
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_items(policy: StoragePolicy, items: list[DomainPath], where: str,
                files: OpenedFiles) -> Iterator[tuple[DomainPath, int]]:  # fmt: skip
    for item in items:
        resolved = policy.check_path(item, where)
        if item.kind in ("socket", "file", "directory", "nvram") or item.block:
            continue  # checked; handed over by path, or opened by ferry.firmware_files
        # One descriptor, in the one access mode qemu will use (see
        # ferry.domain.argv: no auto-read-only reopen for passed files).
        fd = _open_checked(policy, item, resolved, item.writable, where)
        files.fds.append(fd)
        yield item, fd


def open_domain_files(
    domain: Domain, config: AgentConfig, *, where: str = "domain",
    policy: StoragePolicy | None = None,
) -> OpenedFiles:  # fmt: skip
    """Check ``domain``'s paths and open those qemu can take as descriptors.

    Returns the open descriptors and the :class:`~ferry.domain.PassedFiles`
    for :func:`~ferry.domain.to_qemu_argv`; pass ``files.fds`` to the qemu
    launch and close them (``with``) once qemu runs. On an error nothing is
    left open.

    :raises PathNotAllowed: a path, or what a descriptor really points to,
        is outside the policy (or a checked path became a symlink).
    :raises QemuLaunchError: a file cannot be opened or is not a regular file.
    """
    policy = policy or StoragePolicy.for_domain(config, domain.name)
    files = OpenedFiles()
    fd_sets: list[tuple[int, int, str]] = []
    disks: list[tuple[str, str]] = []
    kernel = initrd = None
    try:
        for item, fd in _open_items(policy, domain_paths(domain), where, files):
            if item.kind == "disk":
                assert item.target is not None
                fdset = len(disks) + 1
                fd_sets.append((fd, fdset, f"disk-{item.target}"))
                disks.append((item.target, f"/dev/fdset/{fdset}"))
            elif item.kind == "kernel":
                kernel = f"/proc/self/fd/{fd}"
            else:
                initrd = f"/proc/self/fd/{fd}"
    except BaseException:
        files.close()
        raise
    files.passed = PassedFiles(fd_sets=tuple(fd_sets), disks=tuple(disks), kernel=kernel,
                               initrd=initrd)  # fmt: skip
    return files
