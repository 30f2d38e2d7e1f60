"""``<filesystem type='mount'>`` with ``<driver type='virtiofs'/>``: a host directory shared.

What virt-install's ``--filesystem SRC,TAG,driver.type=virtiofs`` writes
(and virt-manager's "Add Filesystem"): the host directory ``<source dir>``
(checked against the storage policy like every path) appears in the guest
under the mount tag ``<target dir>``. It needs virtiofsd serving the
directory on a vhost-user socket and guest RAM qemu shares with it
(``<memoryBacking><access mode='shared'/>``, or every guest NUMA cell
``memAccess='shared'``): a start without it is refused, as libvirt refuses
it (:func:`start_refusal`). The host starts one virtiofsd per filesystem
(:mod:`ferry.virtiofs`, argv from :func:`virtiofsd_argv`) on a socket in
the domain's run dir (:func:`virtiofs_socket`), and qemu gets
``-chardev socket,id=chr-vu-fsN,path=SOCK -device vhost-user-fs-pci,
queue-size=Q,chardev=chr-vu-fsN,tag=TAG,bus,addr`` (libvirt's ids,
:func:`filesystem_argv`). It cannot migrate:
qemu 7.2's vhost-user-fs device blocks migration, and Begin names it
(:func:`migration_blockers`). 9p (``driver type='path'|'handle'``) is not
supported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import UNIX_PATH_MAX, check_host_path
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, int_attr, one
from ferry.domain.model import Address, Domain, Filesystem
from ferry.errors import QemuLaunchError, XMLUnsupported

__all__ = [
    "filesystem_argv",
    "migration_blockers",
    "parse_filesystem",
    "shares_memory",
    "start_refusal",
    "virtiofs_socket",
    "virtiofsd_argv",
]


_FS = "domain/devices/filesystem"
#: A virtio-fs mount tag: at most 36 bytes (the device's config field).
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,36}$")


def parse_filesystem(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Filesystem:
    """A virtiofs ``<filesystem>``: source directory, mount tag, queue size, address."""
    loc = ctx.loc(el, _FS)
    mark = ctx.count
    ctx.guard(enum, el, "type", loc, ("mount",), default="mount", what="filesystem type")
    access = ctx.guard(
        enum, el, "accessmode", loc, ("passthrough",), what="filesystem accessmode (virtiofs)"
    )
    drv = one(ctx, el, "driver", loc)
    queue = None
    if drv is None:
        ctx.report(
            loc,
            "a <filesystem> without <driver type='virtiofs'/> is 9p, which Ferry does not support",
            cls=XMLUnsupported,
            hint="add <driver type='virtiofs'/> (and shared memory backing)",
        )
    else:
        dloc = ctx.loc(drv, f"{_FS}/driver")
        dtype = ctx.guard(enum, drv, "type", dloc, ("virtiofs",), what="filesystem driver")
        if dtype is None and get(drv, "type") is None:
            ctx.report(dloc, "<driver> needs type='virtiofs'", hint="add type='virtiofs'")
        queue = ctx.guard(int_attr, drv, "queue", dloc, lo=1, hi=1024)
    src = one(ctx, el, "source", loc)
    tgt = one(ctx, el, "target", loc)
    source = target = None
    if src is None or get(src, "dir") is None:
        ctx.report(
            loc,
            "a virtiofs <filesystem> needs <source dir='…'/>",
            hint="add <source dir='/srv/share'/> (the host directory)",
        )
    else:
        source = ctx.guard(
            check_host_path,
            get(src, "dir") or "",
            ctx.loc(src, f"{_FS}/source"),
            "filesystem source dir",
        )
    if tgt is None or get(tgt, "dir") is None:
        ctx.report(
            loc,
            "a <filesystem> needs <target dir='…'/> (the guest's mount tag)",
            hint="add <target dir='share'/>",
        )
    else:
        raw = (get(tgt, "dir") or "").strip()
        if not _TAG_RE.fullmatch(raw):
            ctx.report(
                ctx.loc(tgt, f"{_FS}/target"),
                f"mount tag {raw!r} is not 1 to 36 letters, digits or _.:-",
                hint="use a short tag such as 'share'",
            )
        else:
            target = raw
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if ctx.count != mark or source is None or target is None:
        raise Skip()
    return Filesystem(
        source_dir=source,
        target_dir=target,
        accessmode=cast(Any, access),
        queue=queue,
        address=address,
    )


def shares_memory(domain: Domain) -> bool:
    """Whether all of ``domain``'s guest RAM is shared with other processes.

    libvirt's rule for vhost-user: ``<memoryBacking><access mode='shared'/>``,
    or, with guest NUMA cells, every cell shared (its own ``memAccess`` or
    else the memoryBacking's).
    """
    cells = domain.cpu.numa if domain.cpu is not None else ()
    if cells:
        return all((c.mem_access or domain.memory_access) == "shared" for c in cells)
    return domain.memory_access == "shared"


def start_refusal(domain: Domain) -> str | None:
    """Why ``domain``'s virtiofs filesystems cannot start (None: they can, or none)."""
    if not domain.filesystems or shares_memory(domain):
        return None
    tags = ", ".join(repr(f.target_dir) for f in domain.filesystems)
    return (
        f"virtiofs <filesystem> ({tags}) needs shared guest memory (virtiofsd maps the "
        "guest's RAM): add <memoryBacking><source type='memfd'/><access mode='shared'/>"
        "</memoryBacking>"
    )


def virtiofs_socket(run_dir: Path, index: int) -> Path:
    """The vhost-user socket of filesystem ``index`` (in the domain's run dir)."""
    return run_dir / "virtiofs" / f"fs{index}.sock"


def _opt(value: str, what: str, domain: Domain) -> str:
    """A value inside comma-separated options (neither qemu's nor virtiofsd's ``-o``
    may carry a comma here: virtiofsd has no escape for it)."""
    if "," in value or "\n" in value or "\0" in value:
        raise QemuLaunchError(
            f"domain {domain.name}: {what} {value!r} cannot be passed to "
            "virtiofsd/qemu (comma or newline)",
            domain=domain.name,
        )
    return value


def virtiofsd_argv(binary: str, domain: Domain, index: int, fd: int) -> list[str]:
    """qemu 7.2's C virtiofsd serving filesystem ``index`` on listening socket ``fd``.

    As libvirt runs it (qemu_virtiofs.c): the socket is created and bound
    by the caller and handed over with ``--fd`` (so it listens before qemu
    starts: nothing to wait for), ``-o source=DIR``, the default cache
    mode and namespace sandbox, xattr off (libvirt's default), in the
    foreground (``-f``; the host tracks it by a pidfd).
    """
    fs = domain.filesystems[index]
    return [
        binary,
        f"--fd={fd}",
        "-f",
        "-o",
        f"source={_opt(fs.source_dir, 'filesystem source dir', domain)}",
    ]


def filesystem_argv(
    domain: Domain, run_dir: Path, place: Callable[[Address | None], str]
) -> list[str]:
    """The qemu options of ``domain``'s virtiofs filesystems (``place`` gives bus/addr)."""
    out: list[str] = []
    for i, fs in enumerate(domain.filesystems):
        sock = str(virtiofs_socket(run_dir, i))
        if len(sock.encode()) > UNIX_PATH_MAX:
            raise QemuLaunchError(
                f"domain {domain.name}: virtiofs socket path {sock} is longer "
                f"than {UNIX_PATH_MAX} bytes (use a shorter [paths] run_dir)",
                domain=domain.name,
            )
        _opt(sock, "virtiofs socket path", domain)
        out += [
            "-chardev",
            f"socket,id=chr-vu-fs{i},path={sock}",
            "-device",
            f"vhost-user-fs-pci,id=fs{i},"
            + (f"queue-size={fs.queue}," if fs.queue else "")
            + f"chardev=chr-vu-fs{i},tag={fs.target_dir},{place(fs.address)}",
        ]
    return out


def migration_blockers(domain: Domain) -> list[str]:
    """The virtiofs filesystems of ``domain``, each named: qemu 7.2 cannot migrate them."""
    return [
        f"<filesystem> {f.source_dir} (mount tag {f.target_dir!r}, virtiofs): qemu's "
        "vhost-user-fs device cannot migrate; unmount and remove it first"
        for f in domain.filesystems
    ]
