"""Internal snapshots in qemu: the ``snapshot-save``/``-load``/``-delete`` jobs (qemu ≥ 6.0).

Each is a job with an ID we choose; qemu keeps it (manual dismiss) until
we read its end from ``query-jobs``, so its error is never lost.  A shut-off
domain's images are not open: its internal snapshots (disks only) are
made, applied and deleted with ``qemu-img snapshot -c/-a/-d``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from typing import Any

from ferry.domain import Domain
from ferry.errors import QMPError, SnapshotError
from ferry.qemu import QemuProcess

__all__ = ["JOB_TIMEOUT_S", "active_nodes", "apply_offline", "create_offline", "delete_offline",
           "live_nodes", "qemu_img", "run_job"]  # fmt: skip

log = logging.getLogger("ferry.source.snapshots")

#: A snapshot job of a small guest takes well under a second; a big one
#: writes its whole RAM into the image.
JOB_TIMEOUT_S = 600.0


async def run_job(proc: QemuProcess, cmd: str, args: dict[str, Any], *,
                  timeout: float = JOB_TIMEOUT_S) -> None:  # fmt: skip
    """Run one snapshot job to its end.

    Raises:
        SnapshotError: qemu refused the command, the job ended with an error,
            or it did not end within ``timeout`` (then it is cancelled).
    """
    job_id = f"ferry-{cmd}-{uuid.uuid4().hex[:8]}"
    try:
        await proc.qmp.execute(cmd, {"job-id": job_id, **args})
    except QMPError as exc:
        raise SnapshotError(f"qemu refused {cmd}: {exc}") from None
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            jobs = await proc.qmp.execute("query-jobs")
        except QMPError as exc:
            raise SnapshotError(f"{cmd}: lost qemu while its job ran: {exc}") from None
        mine = next((j for j in jobs if j.get("id") == job_id), None)
        if mine is None:
            raise SnapshotError(f"{cmd}: qemu no longer knows its job {job_id}")
        if mine.get("status") == "concluded":
            with contextlib.suppress(QMPError):
                await proc.qmp.execute("job-dismiss", {"id": job_id})
            if mine.get("error"):
                raise SnapshotError(f"{cmd} failed: {mine['error']}")
            return
        if time.monotonic() > deadline:
            with contextlib.suppress(QMPError):
                await proc.qmp.execute("job-cancel", {"id": job_id})
            raise SnapshotError(f"{cmd} did not end within {timeout:.0f}s (cancelled)")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


async def active_nodes(proc: QemuProcess) -> dict[str, str]:
    """Device id → the node its guest device reads now (the top of its chain).

    qemu names the device by its id (``ide0-0-0``) or, for virtio, by the
    path of its backend (``/machine/peripheral/virtio-disk0/virtio-backend``).
    """
    out: dict[str, str] = {}
    try:
        blocks = await proc.qmp.execute("query-block")
    except QMPError as exc:
        raise SnapshotError(f"cannot list qemu's disks: {exc}") from None
    for block in blocks:
        node = (block.get("inserted") or {}).get("node-name")
        match = re.match(r"(?:/machine/peripheral/)?([^/]+)", block.get("qdev") or "")
        if node and match:
            out[match.group(1)] = node
    return out


async def live_nodes(proc: QemuProcess, ids: tuple[str, ...]) -> list[str]:
    """The nodes the disks with qemu ids ``ids`` read now, in order.

    Raises:
        SnapshotError: qemu shows no image on one of them.
    """
    active = await active_nodes(proc)
    missing = [i for i in ids if i not in active]
    if missing:
        raise SnapshotError(f"qemu shows no image on disk(s) {', '.join(missing)}")
    return [active[i] for i in ids]


def _offline_images(domain: Domain) -> list[str]:
    return [d.source for d in domain.disks
            if d.source is not None and d.device == "disk" and not d.readonly
            and d.format == "qcow2"]  # fmt: skip


async def _has_tag(binary: str, image: str, tag: str) -> bool:
    listed = await qemu_img(binary, "snapshot", "-l", "-U", image)
    return any(line.split()[1:2] == [tag] for line in listed.splitlines()[2:])


async def create_offline(domain: Domain, tag: str, binary: str = "qemu-img") -> None:
    """Take internal snapshot ``tag`` in every qcow2 image of the inactive domain.

    All or none: a failure deletes the tags already made.

    Raises:
        SnapshotError: qemu-img failed (an image in use, a tag that exists).
    """
    done: list[str] = []
    try:
        for image in _offline_images(domain):
            await qemu_img(binary, "snapshot", "-c", tag, image)
            done.append(image)
    except BaseException:
        for image in done:
            with contextlib.suppress(SnapshotError):
                await qemu_img(binary, "snapshot", "-d", tag, image)
        raise


async def apply_offline(domain: Domain, tag: str, binary: str = "qemu-img") -> None:
    """Revert the inactive domain's qcow2 images to internal snapshot ``tag``.

    Raises:
        SnapshotError: an image lacks the tag (checked on all before any
            changes) or qemu-img failed.
    """
    images = _offline_images(domain)
    missing = [i for i in images if not await _has_tag(binary, i, tag)]
    if missing:
        raise SnapshotError(f"image(s) {', '.join(missing)} hold no snapshot '{tag}'")
    for image in images:
        await qemu_img(binary, "snapshot", "-a", tag, image)


async def delete_offline(domain: Domain, tag: str, binary: str = "qemu-img") -> None:
    """Delete internal snapshot ``tag`` from the inactive domain's qcow2 images.

    An image that does not hold the tag is skipped (a snapshot taken before
    the disk was added).

    Raises:
        SnapshotError: qemu-img failed for another reason.
    """
    for image in _offline_images(domain):
        if await _has_tag(binary, image, tag):
            await qemu_img(binary, "snapshot", "-d", tag, image)


async def qemu_img(binary: str, *args: str) -> str:
    """Run qemu-img from an argv list; its stdout.

    Raises:
        SnapshotError: it failed (with its message).
    """
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise SnapshotError(f"qemu-img {' '.join(args)}: "
                            f"{err.decode(errors='replace').strip()}")  # fmt: skip
    return out.decode(errors="replace")
