"""Src storage copy (``--copy-storage-all`` / ``-inc``): plan in Begin, mirrors in Perform.

Begin asks ``qemu-img info`` about each disk to copy and puts the plan in
the cookie (:class:`~ferry.protocol.cookie.StorageCopy`); the destination
creates and exports the images and answers where its NBD server listens
(:class:`~ferry.protocol.cookie.Nbd`). Perform then, before any memory
moves: a TLS client object with this host's certificate, one NBD client
node per disk and one ``blockdev-mirror`` into it; it waits until every
mirror is in sync (``ready``), reporting progress, and only then migrates
memory. qemu stops at ``pre-switchover`` (the guest paused): the mirrors
are ended there (``block-job-cancel`` of a ready mirror ends it with the
target complete) before the device state moves. On any failure the
mirrors are cancelled and their nodes removed; the source keeps running
on its own disks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence

from ferry.command import run_command
from ferry.domain import Domain
from ferry.domain.argv import qemu_disk_ids
from ferry.errors import FerryError, JobAborted, MigrationFailed, MigrationRefused, MigrationStalled
from ferry.flags import MigrationFlags, MigrationParams
from ferry.netkill import destroy_connections
from ferry.protocol.cookie import Nbd
from ferry.qemu import QemuProcess
from ferry.qemu.settings import MIB
from ferry.storage_copy import (
    CopyMode,
    DiskCopy,
    ImageInfo,
    NbdAddress,
    copy_plan,
    image_info_from_json,
    mirror_args,
    mirror_progress,
    nbd_client_args,
    select_disks,
    tls_creds_args,
)
from ferry_source.context import Emit, SourceContext
from ferry_source.outgoing import Outgoing

__all__ = [
    "abort_mirrors",
    "clear_stale_mirrors",
    "copy_mode",
    "end_mirrors",
    "plan_storage",
    "start_mirrors",
]

log = logging.getLogger("ferry.source.migration")

QEMU_IMG_TIMEOUT = 30.0
#: How often the mirrors are looked at (memory starts at most this late after
#: they are in sync), and how often their progress is shown.
POLL_INTERVAL = 0.02
EMIT_INTERVAL = 0.1
#: The id of the TLS client object of a migration's NBD clients.
TLS_OBJECT = "ferry-nbd-tls"


def copy_mode(flags: MigrationFlags) -> CopyMode | None:
    """"all", "inc" or None (no storage copy) from the flags."""
    if flags & MigrationFlags.NON_SHARED_DISK:
        return "all"
    if flags & MigrationFlags.NON_SHARED_INC:
        return "inc"
    return None


async def _image_info(path: str) -> ImageInfo:
    # -U: the running qemu holds the image's locks; reading the header is safe.
    try:
        done = await run_command(["qemu-img", "info", "-U", "--output=json", path],
                                 QEMU_IMG_TIMEOUT)  # fmt: skip
    except TimeoutError:
        raise MigrationRefused(f"qemu-img info {path}: no answer in {QEMU_IMG_TIMEOUT:g} s") \
            from None
    except OSError as exc:
        raise MigrationRefused(f"cannot run qemu-img: {exc}") from None
    if done.returncode != 0:
        raise MigrationRefused(f"cannot read disk image {path}: {done.stderr.strip()}")
    try:
        return image_info_from_json(json.loads(done.stdout))
    except ValueError as exc:
        raise MigrationRefused(f"qemu-img info {path}: {exc}") from None


async def plan_storage(
    domain: Domain, flags: MigrationFlags, params: MigrationParams
) -> list[DiskCopy]:
    """The disks this migration copies (empty without ``--copy-storage-*``).

    Raises:
        MigrationRefused: a disk named by ``--migrate-disks`` cannot be
            copied, or an image cannot be read or copied as asked.
    """
    mode = copy_mode(flags)
    if mode is None:
        return []
    disks = select_disks(domain, params.migrate_disks)
    if not disks:
        raise MigrationRefused(
            f"cannot copy storage of domain '{domain.name}': it has no disk to copy "
            "(read-only, shareable and empty disks are never copied)")
    infos = {d.source: await _image_info(d.source) for d in disks if d.source is not None}
    return copy_plan(disks, infos, mode)


def _speed(params: MigrationParams) -> int:
    """--bandwidth applies to the disks too (MiB/s → bytes/s; 0: unlimited)."""
    return (params.bandwidth_mib or 0) * MIB


async def start_mirrors(
    ctx: SourceContext, out: Outgoing, proc: QemuProcess, nbd: Nbd, emit: Emit
) -> None:
    """Mirror every planned disk into the destination's exports; return once all are in sync.

    Raises:
        MigrationFailed: a mirror failed (qemu's reason, disk named).
        MigrationStalled: no disk byte moved for ``stall_timeout_s``.
        JobAborted: the migration was aborted meanwhile.
    """
    assert out.job is not None
    copies = out.storage
    ids = qemu_disk_ids(out.domain)
    server, use_tls = _nbd_server(ctx, out, nbd)
    async with ctx.jobs.nested(out.job):
        await clear_stale_mirrors(proc)
        if use_tls:
            await proc.qmp.execute("object-add", tls_creds_args(TLS_OBJECT, "client",
                                                                str(ctx.host.qemu_tls_dir())))
        for c in copies:
            node_args = nbd_client_args(c, server, TLS_OBJECT if use_tls else None)
            if use_tls:
                node_args["tls-hostname"] = nbd.tls_hostname
            await proc.qmp.execute("blockdev-add", node_args)
            out.mirror_nodes.append(c.client_node)
            sync_writes = bool(out.flags & MigrationFlags.NON_SHARED_SYNCHRONOUS_WRITES)
            await proc.qmp.execute("blockdev-mirror", mirror_args(
                c, f"{ids[c.target]}-format", synchronous_writes=sync_writes,
                speed=_speed(out.params)))  # fmt: skip
            out.mirror_jobs.append(c.job)
    stall_s = ctx.config.migration.stall_timeout_s
    last_copied, last_move, last_emit = -1, time.monotonic(), 0.0
    fault_hit = False
    started, ram = time.monotonic(), out.domain.memory_kib * 1024
    while True:
        jobs = await proc.qmp.execute("query-block-jobs")
        progress = mirror_progress(copies, jobs if isinstance(jobs, list) else [])
        if progress.failed:
            raise MigrationFailed("storage copy failed: " + "; ".join(progress.failed))
        elapsed = time.monotonic() - started
        rate = progress.copied / elapsed if elapsed > 0 else 0.0
        # The ETA: what is left of the disks, then the RAM, at the disks' rate
        # so far (null until something moved: JSON has no Infinity).
        left = progress.total - progress.copied + ram
        snap = {"status": "copying storage", "disk_copied": progress.copied,
                "disk_total": progress.total, "disk_bytes_per_s": round(rate),
                "eta_s": round(left / rate, 1) if rate > 0 else None,
                "elapsed_s": round(elapsed, 3),
                "disks": {t: {"copied": c, "total": n, "ready": r}
                          for t, c, n, r in progress.disks}}  # fmt: skip
        out.progress.clear()
        out.progress.update(snap)
        now = time.monotonic()
        if progress.copied != last_copied:
            last_copied, last_move = progress.copied, now
            if now - last_emit >= EMIT_INTERVAL or progress.ready:
                last_emit = now
                emit("storage", dict(snap))
            if progress.copied and not fault_hit and not progress.ready:
                fault_hit = True
                # Tests: freeze (or lose a reply) while the disks are mirrored.
                if ctx.faults.hit("src.mirror") == "drop-reply" and out.session:
                    out.session.writer.transport.abort()
        elif now - last_move > stall_s:
            # The NBD client's requests hang on a dead link: destroy its
            # connection (or stop the tunnel carrying it) so that cancelling
            # the mirrors does not wait on them.
            if out.disk_tunnel is not None:
                await out.disk_tunnel.close(drain=False)
            elif nbd.host is not None and nbd.port is not None:
                await destroy_connections(nbd.host, nbd.port)
            raise MigrationStalled(f"no disk data moved for {stall_s:g} s: the link to "
                                   f"{out.peer} looks down; the migration was cancelled",
                                   peer=out.peer)  # fmt: skip
        if progress.ready:
            if last_emit != now:
                # qemu reports ready after flushing the target, with no new
                # bytes: say it, or the last event would show the disks not ready.
                emit("storage", dict(snap))
            out.disk_bytes = progress.total
            log.info("storage of %s in sync on %s: %d disk(s), %.1f MiB", out.name, out.peer,
                     len(copies), progress.total / MIB)
            return
        if out.abort.is_set():
            raise JobAborted(f"migration of {out.name} {out.abort_reason}")
        if out.failure is not None:
            raise out.failure
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(out.abort.wait(), POLL_INTERVAL)


def _nbd_server(ctx: SourceContext, out: Outgoing, nbd: Nbd) -> tuple[NbdAddress, bool]:
    """Where qemu's NBD clients connect, and whether with TLS.

    Raises:
        MigrationFailed: the destination's answer does not fit this migration
            (a tunnel it does not have, plaintext this host does not allow).
    """
    tls = ctx.config.tls
    if nbd.transport == "tunnel":
        if out.tunnel is None or nbd.first_channel is None:
            raise MigrationFailed(f"{out.peer} exports the disks through a tunnel, but this "
                                  "migration is not tunnelled")  # fmt: skip
        path = out.tunnel.path.with_name(out.tunnel.path.stem + "-nbd.sock")
        out.disk_tunnel = out.tunnel.sibling(path, nbd.first_channel, len(out.storage))
        out.disk_tunnel.listen()
        out.disk_transport = "tunnel"
        return str(path), False
    if out.tunnel is not None:
        raise MigrationFailed(f"{out.peer} exports the disks over TCP, outside the tunnel "
                              "--tunnelled asked for")  # fmt: skip
    assert nbd.host is not None and nbd.port is not None
    if not nbd.tls and not (tls is not None and tls.allow_plaintext_nbd):
        raise MigrationFailed(f"{out.peer} offers the disks over NBD without TLS, which this "
                              "host's config does not allow ([tls] allow_plaintext_nbd)")
    use_tls = nbd.tls and tls is not None
    out.disk_transport = "nbd-tls" if use_tls else "nbd-plain"
    return (nbd.host, nbd.port), use_tls


async def _close_disk_tunnel(out: Outgoing, *, drain: bool) -> None:
    if out.disk_tunnel is not None:
        await out.disk_tunnel.close(drain=drain)
        out.disk_tunnel_bytes += out.disk_tunnel.bytes()[0]
        out.disk_tunnel = None


async def end_mirrors(proc: QemuProcess, out: Outgoing, timeout: float = 60.0) -> None:
    """At switchover (guest paused): end every mirror with its target complete.

    ``block-job-cancel`` of a ready mirror stops it once the target has
    everything (qemu's "complete without pivot"); the job must then say
    concluded with no error and offset == len.

    Raises:
        MigrationFailed: a mirror ended short or in error.
    """
    for job in out.mirror_jobs:
        await proc.qmp.execute("block-job-cancel", {"device": job})
    deadline = time.monotonic() + timeout
    pending = set(out.mirror_jobs)
    while pending:
        jobs = await proc.qmp.execute("query-block-jobs")
        for j in jobs if isinstance(jobs, list) else []:
            if j.get("device") not in pending or j.get("status") != "concluded":
                continue
            if j.get("error") or j.get("offset") != j.get("len"):
                raise MigrationFailed(f"storage copy of {j['device']} ended short: "
                                      f"{j.get('error') or 'incomplete'}")  # fmt: skip
            pending.discard(j["device"])
        if not pending:
            break
        if time.monotonic() > deadline:
            raise MigrationFailed(f"storage mirrors did not end in {timeout:g} s: "
                                  + ", ".join(sorted(pending)))  # fmt: skip
        await asyncio.sleep(0.01)
    await _remove(proc, out)
    # The NBD clients are gone: their tunnel channels end by themselves.
    await _close_disk_tunnel(out, drain=True)


async def abort_mirrors(proc: QemuProcess, out: Outgoing) -> None:
    """Cancel every mirror and remove its NBD client node (a failed migration). Never raises."""
    if not out.mirror_jobs and not out.mirror_nodes:
        await _close_disk_tunnel(out, drain=False)
        return
    # Stopped first: a mirror cancelled while its requests hang on a dead
    # tunnel would wait for them.
    await _close_disk_tunnel(out, drain=False)
    for job in out.mirror_jobs:
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("block-job-cancel", {"device": job, "force": True})
    deadline = time.monotonic() + 30
    while out.mirror_jobs and time.monotonic() < deadline:
        try:
            jobs = await proc.qmp.execute("query-block-jobs")
        except FerryError:
            break
        live = {j.get("device") for j in jobs if isinstance(j, dict)
                and j.get("status") not in ("concluded", "null")}  # fmt: skip
        if not live & set(out.mirror_jobs):
            break
        await asyncio.sleep(0.02)
    with contextlib.suppress(FerryError):
        await _remove(proc, out)


async def _remove(proc: QemuProcess, out: Outgoing) -> None:
    for job in list(out.mirror_jobs):
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("job-dismiss", {"id": job})
        out.mirror_jobs.remove(job)
    for node in list(out.mirror_nodes):
        await proc.qmp.execute("blockdev-del", {"node-name": node})
        out.mirror_nodes.remove(node)
    with contextlib.suppress(FerryError):
        await proc.qmp.execute("object-del", {"id": TLS_OBJECT})


async def clear_stale_mirrors(proc: QemuProcess, timeout: float = 30.0) -> list[str]:
    """Cancel and remove what a storage copy left in ``proc`` (its agent died mid-copy).

    The mirror jobs and NBD client nodes live in qemu, not in the agent: a
    source agent restarted during a copy finds them still there. Called when
    the source gets its VM back (and before a new copy): the jobs named
    ``ferry-mirror-*`` are cancelled and dismissed, the ``ferry-nbd-*`` nodes
    and the TLS object removed. Returns what was found. Never raises.
    """
    found: list[str] = []
    with contextlib.suppress(FerryError):
        jobs = await proc.qmp.execute("query-block-jobs")
        stale = [str(j.get("device")) for j in jobs if isinstance(j, dict)
                 and str(j.get("device", "")).startswith("ferry-mirror-")]  # fmt: skip
        found += stale
        for job in stale:
            with contextlib.suppress(FerryError):
                await proc.qmp.execute("block-job-cancel", {"device": job, "force": True})
        deadline = time.monotonic() + timeout
        while stale and time.monotonic() < deadline:
            jobs = await proc.qmp.execute("query-block-jobs")
            if all(j.get("status") in ("concluded", "null") for j in jobs
                   if isinstance(j, dict) and j.get("device") in stale):  # fmt: skip
                break
            await asyncio.sleep(0.02)
        for job in stale:
            with contextlib.suppress(FerryError):
                await proc.qmp.execute("job-dismiss", {"id": job})
        nodes = await proc.qmp.execute("query-named-block-nodes", {"flat": True})
        for node in {str(n.get("node-name")) for n in nodes if isinstance(n, dict)}:
            if node.startswith("ferry-nbd-"):
                found.append(node)
                with contextlib.suppress(FerryError):
                    await proc.qmp.execute("blockdev-del", {"node-name": node})
        with contextlib.suppress(FerryError):
            await proc.qmp.execute("object-del", {"id": TLS_OBJECT})
    if found:
        log.warning("removed what an interrupted storage copy left in qemu: %s",
                    " ".join(found))
    return found


def copied_targets(copies: Sequence[DiskCopy]) -> frozenset[str]:
    """The guest names of the disks a plan copies."""
    return frozenset(c.target for c in copies)
