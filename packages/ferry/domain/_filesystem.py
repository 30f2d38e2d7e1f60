"""``<filesystem type='mount'>`` with ``<driver type='virtiofs'/>``: a host directory shared.

What virt-install's ``--filesystem SRC,TAG,driver.type=virtiofs`` writes
(and virt-manager's "Add Filesystem"): the host directory ``<source dir>``
(checked against the storage policy like every path) appears in the guest
under the mount tag ``<target dir>``. It needs virtiofsd serving the
directory on a vhost-user socket and guest RAM qemu shares with it
(``<memoryBacking><access mode='shared'/>``); Ferry does not start
virtiofsd yet, so such a domain defines and round-trips but its start is
refused with that said (:func:`start_refusal`). It cannot migrate either:
qemu 7.2's vhost-user-fs device blocks migration, and Begin names it
(:func:`migration_blockers`). 9p (``driver type='path'|'handle'``) is not
supported.
"""

from __future__ import annotations

import re
from typing import Any, cast

from lxml import etree

from ferry.domain._address import parse_address
from ferry.domain._checks import check_host_path
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import enum, get, int_attr, one
from ferry.domain.model import Domain, Filesystem
from ferry.errors import XMLUnsupported

__all__ = ["migration_blockers", "parse_filesystem", "start_refusal"]

_FS = "domain/devices/filesystem"
#: A virtio-fs mount tag: at most 36 bytes (the device's config field).
_TAG_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,36}$")


def parse_filesystem(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Filesystem:
    """A virtiofs ``<filesystem>``: source directory, mount tag, queue size, address."""
    loc = ctx.loc(el, _FS)
    mark = ctx.count
    ctx.guard(enum, el, "type", loc, ("mount",), default="mount", what="filesystem type")
    access = ctx.guard(enum, el, "accessmode", loc, ("passthrough",),
                       what="filesystem accessmode (virtiofs)")
    drv = one(ctx, el, "driver", loc)
    queue = None
    if drv is None:
        ctx.report(loc, "a <filesystem> without <driver type='virtiofs'/> is 9p, which Ferry "
                        "does not support", cls=XMLUnsupported,
                   hint="add <driver type='virtiofs'/> (and shared memory backing)")
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
        ctx.report(loc, "a virtiofs <filesystem> needs <source dir='…'/>",
                   hint="add <source dir='/srv/share'/> (the host directory)")
    else:
        source = ctx.guard(check_host_path, get(src, "dir") or "",
                           ctx.loc(src, f"{_FS}/source"), "filesystem source dir")
    if tgt is None or get(tgt, "dir") is None:
        ctx.report(loc, "a <filesystem> needs <target dir='…'/> (the guest's mount tag)",
                   hint="add <target dir='share'/>")
    else:
        raw = (get(tgt, "dir") or "").strip()
        if not _TAG_RE.fullmatch(raw):
            ctx.report(ctx.loc(tgt, f"{_FS}/target"),
                       f"mount tag {raw!r} is not 1 to 36 letters, digits or _.:-",
                       hint="use a short tag such as 'share'")
        else:
            target = raw
    address = ctx.guard(parse_address, ctx, el, loc, ("pci",))
    if ctx.count != mark or source is None or target is None:
        raise Skip()
    return Filesystem(source_dir=source, target_dir=target, accessmode=cast(Any, access),
                      queue=queue, address=address)


def start_refusal(domain: Domain) -> str | None:
    """Why ``domain`` cannot start here (None: it has no virtiofs filesystem)."""
    if not domain.filesystems:
        return None
    tags = ", ".join(repr(f.target_dir) for f in domain.filesystems)
    return (f"virtiofs <filesystem> ({tags}) needs a virtiofsd serving the directory, which "
            "Ferry does not start yet; remove the filesystem to start the guest")


def migration_blockers(domain: Domain) -> list[str]:
    """The virtiofs filesystems of ``domain``, each named: qemu 7.2 cannot migrate them."""
    return [f"<filesystem> {f.source_dir} (mount tag {f.target_dir!r}, virtiofs): qemu's "
            "vhost-user-fs device cannot migrate; unmount and remove it first"
            for f in domain.filesystems]
