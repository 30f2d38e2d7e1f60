"""Save, restore, managed save and core dumps: qemu's state to and from a file.

libvirt's ``qemuSaveImage*`` and ``qemuDomainCoreDump`` in our words:

- **save** pauses the guest, writes a header marked partial
  (:mod:`ferry.save_image`), hands qemu a file descriptor (``getfd``) and
  migrates to ``fd:NAME``: straight into the file (raw), or into a pipe whose
  other end is the compressor's stdin, its stdout being the file. Once
  qemu's migration completed *and* the compressor exited 0, the data is
  fsync'd and the header re-marked complete; then qemu is stopped.
  A save that fails keeps the image marked partial (restore refuses it) and
  the guest as it was.
- **restore** starts qemu with ``-incoming defer`` from the image's XML and
  feeds it the stream through ``migrate-incoming fd:NAME`` (the
  decompressor between file and pipe when compressed).
- **managedsave** is a save to ``state_dir/save/NAME.save``; ``start``
  restores from it (and removes it), ``managedsave-remove`` drops it.
- **dump**: a full dump is the save path without stopping qemu; a
  memory-only dump is qemu's ``dump-guest-memory`` to an fd (ELF or kdump).

Every file is opened here, by the agent, and qemu gets a descriptor: it
never opens a path (root-squashed NFS, a confined qemu, and no symlink
swapped in to redirect the write). Paths are checked against
``[storage] allowed`` after the open, on what the descriptor really is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry import allowed
from ferry.acl import check_access
from ferry.domain import Domain, check_abi_stability, format_domain, parse_domain
from ferry.domain.argv import unplaced_sockets
from ferry.errors import (
    DomainExists,
    DomainState,
    FerryError,
    PathNotAllowed,
    QMPError,
    SaveError,
    SaveImageError,
    SaveRefused,
)
from ferry.jobs import AsyncJob, Job, JobType
from ferry.journal import MessageID, log_event
from ferry.netdev import host_networks
from ferry.qemu import QemuProcess
from ferry.qemu.migration import query_migrate, set_params
from ferry.rpc import RequestContext
from ferry.save_image import (
    SaveHeader,
    check_restorable,
    compressor_argv,
    decompressor_argv,
    mark_complete,
    read_header,
    rewrite_metadata,
    write_header,
)
from ferry.storage_policy import SETTING, StoragePolicy, check_domain

if TYPE_CHECKING:
    from ferry_source.agent import SourceAgent

__all__ = ["DUMP_FORMATS", "SaveDriver"]

log = logging.getLogger("ferry.source.save")

JOB_TIMEOUT = 30.0
#: How often the migration to the file is polled.
POLL_S = 0.05
#: Unlimited: a save has no link to share (libvirt: QEMU_DOMAIN_MIG_BANDWIDTH_MAX).
MAX_BANDWIDTH = 1 << 53
#: dump-guest-memory formats by their virsh names.
DUMP_FORMATS = {"elf": "elf", "kdump-zlib": "kdump-zlib", "kdump-lzo": "kdump-lzo",
                "kdump-snappy": "kdump-snappy"}  # fmt: skip
Handler = Callable[[RequestContext, dict[str, Any]], Awaitable[dict[str, Any]]]


def _open_file(path: str, *, write: bool, policy: StoragePolicy, where: str,
               own_dir: Path) -> int:  # fmt: skip
    """Open a save/dump file for the agent; checked against the storage policy.

    The directory is resolved and checked, the file opened in it with
    ``O_NOFOLLOW``, and what the descriptor really is checked again.
    """
    if not os.path.isabs(path):
        raise SaveError(f"{where}: the file must be an absolute path, not {path!r}")
    parent = os.path.realpath(os.path.dirname(path))
    target = os.path.join(parent, os.path.basename(path))
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    flags |= (os.O_RDWR | os.O_CREAT | os.O_TRUNC) if write else os.O_RDONLY
    mine = parent == str(own_dir)
    if not mine and not policy.permits(target, "file"):
        raise _outside(where, path, target, policy)
    try:
        fd = os.open(target, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        raise SaveError(f"{where}: cannot open '{path}': {exc.strerror or exc}",
                        path=path) from None  # fmt: skip
    try:
        actual = os.readlink(f"/proc/self/fd/{fd}")
        if not mine and not policy.permits(actual, "file"):
            raise _outside(where, path, actual, policy)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SaveError(f"{where}: '{path}' is not a regular file", path=path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _outside(where: str, path: str, resolved: str, policy: StoragePolicy) -> PathNotAllowed:
    listed = ", ".join(policy.configured) or "nothing"
    shown = f"'{path}'" + (f" (resolves to '{resolved}')" if resolved != path else "")
    return PathNotAllowed(f"{where}: file {shown} is outside {SETTING} ({listed})",
                          path=path, resolved=resolved, setting=SETTING)  # fmt: skip


async def _pass_fd(proc: QemuProcess, fd: int, name: str) -> None:
    """Hand ``fd`` to qemu under ``name`` (``getfd`` with SCM_RIGHTS)."""
    client = proc.qmp._client  # the library's client: only it can send SCM_RIGHTS
    if client is None:
        raise QMPError("QMP getfd: not connected", command="getfd")
    with contextlib.suppress(QMPError):
        await proc.qmp.execute("closefd", {"fdname": name})  # a stale one of a failed run
    client.send_fd_scm(fd)
    await proc.qmp.execute("getfd", {"fdname": name})


async def _wait_migration(proc: QemuProcess, what: str) -> None:
    """Poll qemu's migration until it completed; raise on failure."""
    while True:
        stats = await query_migrate(proc.qmp, timeout=30.0)
        if stats.status == "completed":
            return
        if stats.status in ("failed", "cancelled"):
            raise SaveError(f"{what}: qemu's migration {stats.status}"
                            + (f": {stats.error_desc}" if stats.error_desc else ""))  # fmt: skip
        await asyncio.sleep(POLL_S)


async def _spawn(argv: list[str], stdin: int, stdout: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, stdin=stdin, stdout=stdout, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip


async def _hand_to_qemu(
    proc: QemuProcess, fd: int, argv: list[str] | None, fdname: str, *, qemu_writes: bool
) -> asyncio.subprocess.Process | None:
    """Give qemu the file ``fd`` as ``fdname``, or, with a (de)compressor ``argv``, a
    pipe to it, the child between the pipe and the file; the child, if any.

    ``qemu_writes``: qemu writes the stream (save: pipe → compressor → file),
    else reads it (restore: file → decompressor → pipe). Our ends of the pipe
    are closed on return: qemu and the child hold their own, so each sees EOF
    when the other ends. A child started before a failure is killed.
    """
    if argv is None:
        await _pass_fd(proc, fd, fdname)
        return None
    r, w = os.pipe2(os.O_CLOEXEC)
    child: asyncio.subprocess.Process | None = None
    try:
        child = await (_spawn(argv, r, fd) if qemu_writes else _spawn(argv, fd, w))
        await _pass_fd(proc, w if qemu_writes else r, fdname)
    except BaseException:
        await _kill_child(child)
        raise
    finally:
        os.close(r)
        os.close(w)
    return child


async def _finish_child(child: asyncio.subprocess.Process | None, what: str) -> None:
    if child is None:
        return
    _out, err = await child.communicate()
    if child.returncode != 0:
        words = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
        raise SaveError(f"{what} exited with status {child.returncode}"
                        + (f": {words[0]}" if words else ""))  # fmt: skip


async def _kill_child(child: asyncio.subprocess.Process | None) -> None:
    if child is None or child.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.kill()
    with contextlib.suppress(Exception):
        await child.communicate()


class SaveDriver:
    """The save/restore/dump ops of ferry-source."""

    def __init__(self, agent: SourceAgent) -> None:
        self.agent = agent
        self.config = agent.config
        self.host = agent.host
        self.jobs = agent.jobs
        self._tasks: set[asyncio.Task[None]] = set()

    def handlers(self) -> dict[str, Handler]:
        """Ops for the agent's table."""
        return {
            "save": self.op_save,
            "restore": self.op_restore,
            "save_image_dumpxml": self.op_save_image_dumpxml,
            "save_image_define": self.op_save_image_define,
            "managedsave": self.op_managedsave,
            "managedsave_remove": self.op_managedsave_remove,
            "dump": self.op_dump,
        }

    # -- watchdog action dump --------------------------------------------------------

    def on_watchdog(self, name: str, data: dict[str, Any]) -> None:
        """qemu's WATCHDOG event: with ``<watchdog action='dump'>``, dump then resume.

        qemu was told ``-action watchdog=pause``; the dump goes to
        ``state_dir/dump/NAME-TIME.core`` (memory-only ELF, as libvirt's
        auto-dump), then the guest runs again.
        """
        live = self.host.live_definition(name)
        if live is None or data.get("action") != "pause" or not any(
                w.action == "dump" for w in live.watchdogs):
            return
        task = asyncio.create_task(self._watchdog_dump(live))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog_dump(self, dom: Domain) -> None:
        folder = self.config.paths.state_dir / "dump"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / f"{dom.name}-{time.strftime('%Y-%m-%d-%H:%M:%S')}.core"
        try:
            job = await self.jobs.begin_async(dom.uuid, dom.name, AsyncJob.DUMP,
                                              timeout=JOB_TIMEOUT)  # fmt: skip
            try:
                job.record(resume=True, path=str(path))
                proc = await self.host.process(dom.name)
                size = await self._memory_dump(proc, str(path), "elf", own=True)
                await proc.qmp.execute("cont")
            finally:
                await self.jobs.end_async(job)
        except (FerryError, OSError) as exc:
            log_event(log, MessageID.DOMAIN_STOPPED,
                      f"domain {dom.name}: watchdog fired; the dump to {path} failed: {exc}",
                      level=logging.ERROR, domain=dom.name, uuid=dom.uuid,
                      job="dump")  # fmt: skip
            return
        log_event(log, MessageID.DOMAIN_STARTED,
                  f"domain {dom.name}: watchdog fired; memory dumped to {path} ({size} bytes), "
                  "guest resumed", level=logging.WARNING, domain=dom.name, uuid=dom.uuid,
                  job="dump")  # fmt: skip

    # -- recovery ----------------------------------------------------------------

    async def recover_all(self) -> None:
        """Settle the SAVE and DUMP jobs a killed ferry-source left.

        libvirt's rule (qemuProcessRecoverJob): the migration to the file is
        cancelled if still running, and a guest the job paused runs again.
        The image stays marked partial: nobody saw qemu and the compressor
        finish, so restore refuses it.
        """
        for found in self.jobs.recorded():
            if found.job.async_job not in (AsyncJob.SAVE, AsyncJob.DUMP):
                continue
            try:
                job = await self.jobs.adopt(found.uuid, found.name, found.job, timeout=5.0)
            except FerryError as exc:
                log.error("cannot adopt the %s job of %s: %s", found.job.async_job,
                          found.name, exc)  # fmt: skip
                continue
            try:
                await self._settle(found.name, job.data)
            except (FerryError, OSError) as exc:
                log.error("settling the interrupted %s of %s: %s", found.job.async_job,
                          found.name, exc)  # fmt: skip
            finally:
                await self.jobs.end_async(job)

    async def _settle(self, name: str, data: dict[str, Any]) -> None:
        if self.host.load_status(name) is None:
            return  # qemu is gone: nothing to resume
        proc = await self.host.process(name)
        stats = await query_migrate(proc.qmp, timeout=10.0)
        if stats.status in ("active", "setup", "device", "pre-switchover"):
            await proc.qmp.execute("migrate_cancel")
            while not (await query_migrate(proc.qmp, timeout=10.0)).finished:
                await asyncio.sleep(POLL_S)
        if data.get("resume") and not (await proc.qmp.query_status()).running:
            await proc.qmp.execute("cont")
            status = self.host.load_status(name)
            if status is not None:
                status.run_state = "running"
                self.host.save_status(status)
        resumed = "; the guest runs again" if data.get("resume") else ""
        log_event(log, MessageID.DOMAIN_STARTED,
                  f"domain {name}: an interrupted save/dump to {data.get('path')} was settled "
                  f"(the image stays partial){resumed}", domain=name, job="save")  # fmt: skip

    # -- paths -------------------------------------------------------------------

    @property
    def managed_dir(self) -> Path:
        """Where managed save images live."""
        return self.config.paths.state_dir / "save"

    def managed_path(self, name: str) -> Path:
        """The managed save image of ``name``."""
        return self.managed_dir / f"{name}.save"

    def has_managed(self, name: str) -> bool:
        """True if ``name`` has a managed save image."""
        return self.managed_path(name).is_file()

    def _policy(self) -> StoragePolicy:
        return StoragePolicy(self.config.storage.allowed)

    def _open(self, path: str, *, write: bool, where: str) -> int:
        return _open_file(path, write=write, policy=self._policy(), where=where,
                          own_dir=self.managed_dir)  # fmt: skip

    # -- save ----------------------------------------------------------------------

    def _header_xml(self, live_dom: Domain, xml: str | None, where: str) -> str:
        """The XML the image records: the live one, or ``--xml`` (ABI-checked)."""
        if xml is None:
            return format_domain(unplaced_sockets(live_dom, self.host.chardev_dir(live_dom.name)),
                                 migratable=True)  # fmt: skip
        new = parse_domain(xml, where=where, networks=host_networks(self.config))
        check_abi_stability(live_dom, new)
        return format_domain(new)

    async def op_save(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """virsh save: the state to a file, then qemu stops."""
        return await self._save(ctx, args["name"], args["path"], op="save",
                                running=args["running"], paused=args["paused"],
                                xml=args["xml"], bypass_cache=args["bypass_cache"])  # fmt: skip

    async def op_managedsave(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """virsh managedsave: save to the domain's own image; start resumes from it."""
        live = self.agent.resolve(ctx, "managedsave", args["name"])
        if not live.persistent:
            raise DomainState(f"cannot do managed save for transient domain "
                              f"'{live.domain.name}'", name=live.domain.name)  # fmt: skip
        self.managed_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return await self._save(ctx, args["name"], str(self.managed_path(live.domain.name)),
                                op="managedsave", running=args["running"],
                                paused=args["paused"], xml=None,
                                bypass_cache=args["bypass_cache"])  # fmt: skip

    async def op_managedsave_remove(self, ctx: RequestContext, args: dict[str, Any]
                                    ) -> dict[str, Any]:  # fmt: skip
        """virsh managedsave-remove."""
        live = self.agent.resolve(ctx, "managedsave_remove", args["name"])
        path = self.managed_path(live.domain.name)
        try:
            path.unlink()
        except FileNotFoundError:
            raise DomainState(f"domain '{live.domain.name}' has no managed save image",
                              name=live.domain.name) from None  # fmt: skip
        return {"name": live.domain.name, "removed": str(path)}

    async def _save(self, ctx: RequestContext, name: str, path: str, *, op: str, running: bool,
                    paused: bool, xml: str | None, bypass_cache: bool
                    ) -> dict[str, Any]:  # fmt: skip
        live, proc = await self.agent._running(ctx, op, name)
        dom = live.domain
        problems = allowed.is_allowed(dom, False)
        if problems:
            raise SaveRefused(allowed.refusal(dom.name, "save", problems),
                              blockers=[p.message for p in problems])  # fmt: skip
        fmt = self.config.save.image_format
        argv = compressor_argv(fmt)  # a missing tool: refused before anything changes
        header_xml = self._header_xml(dom, xml, op)
        job = await self.jobs.begin_async(dom.uuid, dom.name, AsyncJob.SAVE, timeout=JOB_TIMEOUT)
        started = time.monotonic()
        try:
            was_running = (await proc.qmp.query_status()).running
            header = SaveHeader(xml=header_xml, was_running=was_running, compression=fmt,
                                kind="save", name=dom.name, uuid=dom.uuid)  # fmt: skip
            if running:
                header.was_running = True
            elif paused:
                header.was_running = False
            size = await self._to_file(proc, dom, path, header, argv, op=op, pause=True,
                                       bypass_cache=bypass_cache, job=job)  # fmt: skip
            # The image is complete: the guest now lives in the file.
            await self.host.kill(dom.name)
        finally:
            await self.jobs.end_async(job)
        elapsed = time.monotonic() - started
        log_event(log, MessageID.DOMAIN_STOPPED,
                  f"domain {dom.name} saved to {path} ({fmt}, {size} bytes, {elapsed:.2f}s)",
                  domain=dom.name, uuid=dom.uuid, job="save")  # fmt: skip
        return {"name": dom.name, "path": path, "format": fmt, "bytes": size,
                "seconds": elapsed, "was_running": header.was_running}  # fmt: skip

    async def _to_file(self, proc: QemuProcess, dom: Domain, path: str, header: SaveHeader,
                       argv: list[str] | None, *, op: str, pause: bool, bypass_cache: bool,
                       job: Job) -> int:  # fmt: skip
        """Migrate qemu's state into ``path`` (header first); return the file's size.

        The guest is paused first when ``pause`` (and resumed if this fails).
        On failure the image stays marked partial.
        """
        # Opened before the guest pauses: a refused path changes nothing.
        fd = self._open(path, write=True, where=op)
        child: asyncio.subprocess.Process | None = None
        stopped_here = False
        try:
            run = await proc.qmp.query_status()
            if pause and run.running:
                # Recorded first: an agent killed from here on resumes it at restart.
                job.record(resume=True, path=path)
                await proc.qmp.execute("stop")
                stopped_here = True
            write_header(fd, header)
            await set_params(proc.qmp, {"max-bandwidth": MAX_BANDWIDTH})
            child = await _hand_to_qemu(proc, fd, argv, "ferry-save", qemu_writes=True)
            await proc.qmp.execute("migrate", {"uri": "fd:ferry-save"})
            # Tests freeze the agent here (kill qemu or the agent mid-save).
            self.agent.ctx.faults.hit("src.save")
            await _wait_migration(proc, op)
            await _finish_child(child, f"the compressor '{argv[0] if argv else ''}'")
            mark_complete(fd)
            if bypass_cache:
                # The image does not stay in this host's page cache.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return os.fstat(fd).st_size
        except BaseException as exc:
            await _kill_child(child)
            with contextlib.suppress(FerryError, OSError):
                stats = await query_migrate(proc.qmp, timeout=5.0)
                if stats.status in ("active", "setup", "device", "pre-switchover"):
                    await proc.qmp.execute("migrate_cancel")
            if stopped_here:
                with contextlib.suppress(FerryError, OSError):
                    await proc.qmp.execute("cont")
            if isinstance(exc, FerryError) and not isinstance(exc, SaveRefused):
                raise SaveError(f"{op} of domain '{dom.name}' failed: {exc.message}; the "
                                f"image '{path}' is left marked partial",
                                path=path) from exc  # fmt: skip
            raise
        finally:
            os.close(fd)

    # -- restore ---------------------------------------------------------------------

    async def op_restore(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """virsh restore: start a domain from a save image."""
        fd = self._open(args["path"], write=False, where="restore")
        try:
            header = read_header(fd, f"'{args['path']}'")
            check_restorable(header, f"'{args['path']}'")
            domain = self._image_domain(header, args["xml"], "restore")
            check_access(self.config.acl, ctx.subject, "restore", domain.name, domain.uuid)
            return await self._restore(domain, header, fd, path=args["path"],
                                       running=args["running"], paused=args["paused"])  # fmt: skip
        finally:
            os.close(fd)

    def _image_domain(self, header: SaveHeader, xml: str | None, where: str) -> Domain:
        nets = host_networks(self.config)
        saved = parse_domain(header.xml, where=where, networks=nets)
        if xml is None:
            return saved
        new = parse_domain(xml, where=where, networks=nets)
        check_abi_stability(saved, new)
        return new

    async def _restore(self, domain: Domain, header: SaveHeader, fd: int, *, path: str,
                       running: bool, paused: bool) -> dict[str, Any]:  # fmt: skip
        if header.kind != "save":
            # The domain ran on after its full dump: restoring it would make a second copy.
            raise SaveImageError(f"'{path}' is a core dump of '{domain.name}', not a save "
                                 "image: the domain kept running after it; restore refuses it",
                                 kind=header.kind)  # fmt: skip
        check_domain(domain, self.config, where="restore")
        # A domain that migrated away (or may have) must not run here again.
        self.agent._check_fence(domain, "restore", force=False)
        existing = self.host.load_definition(domain.name)
        if existing is not None and existing.uuid != domain.uuid:
            raise DomainExists(f"domain '{domain.name}' already exists with uuid "
                               f"{existing.uuid}", name=domain.name)  # fmt: skip
        other = self.host.find_uuid(domain.uuid)
        if other is not None and other.domain.name != domain.name:
            raise DomainExists(f"domain with uuid {domain.uuid} already exists as "
                               f"'{other.domain.name}'", uuid=domain.uuid)  # fmt: skip
        argv = decompressor_argv(header.compression)
        started = time.monotonic()
        async with self.jobs.sync_job(domain.uuid, domain.name, JobType.MODIFY,
                                      timeout=JOB_TIMEOUT):  # fmt: skip
            if self.host.load_status(domain.name) is not None:
                raise DomainState(f"domain '{domain.name}' is already running", name=domain.name)
            proc = await self.host.start(domain, incoming=True)
            child: asyncio.subprocess.Process | None = None
            try:
                os.lseek(fd, header.data_offset, os.SEEK_SET)
                child = await _hand_to_qemu(proc, fd, argv, "ferry-restore", qemu_writes=False)
                await proc.qmp.execute("migrate-incoming", {"uri": "fd:ferry-restore"})
                await _wait_migration(proc, "restore")
                await _finish_child(child, f"the decompressor '{argv[0] if argv else ''}'")
                await self.host.acquire_leases(domain, proc)
                run = (header.was_running or running) and not paused
                if run:
                    await proc.qmp.execute("cont")
                status = self.host.load_status(domain.name)
                if status is not None:
                    status.run_state = "running" if run else "paused"
                    self.host.save_status(status)
            except BaseException as exc:
                await _kill_child(child)
                await self.host.kill(domain.name)
                if isinstance(exc, FerryError) and not isinstance(exc, SaveError):
                    raise SaveError(f"restore of '{path}' failed: {exc.message}",
                                    path=path) from exc  # fmt: skip
                raise
        self.agent.watch(domain.name)
        elapsed = time.monotonic() - started
        log_event(log, MessageID.DOMAIN_STARTED,
                  f"domain {domain.name} restored from {path} ({header.compression}, "
                  f"{elapsed:.2f}s)", domain=domain.name, uuid=domain.uuid,
                  job="restore")  # fmt: skip
        return {"name": domain.name, "path": path, "pid": proc.pid, "seconds": elapsed,
                "state": "running" if run else "paused"}  # fmt: skip

    async def start_managed(self, ctx: RequestContext, domain: Domain, *, paused: bool
                            ) -> dict[str, Any]:  # fmt: skip
        """``start`` of a domain with a managed save image: restore it, then remove it."""
        path = self.managed_path(domain.name)
        fd = self._open(str(path), write=False, where="start")
        try:
            header = read_header(fd, f"the managed save image of '{domain.name}'")
            check_restorable(header, f"the managed save image of '{domain.name}'")
            saved = self._image_domain(header, None, "start")
            if saved.uuid != domain.uuid:
                raise SaveImageError(f"the managed save image of '{domain.name}' is of "
                                     f"another domain (uuid {saved.uuid})")  # fmt: skip
            result = await self._restore(saved, header, fd, path=str(path),
                                         running=False, paused=paused)  # fmt: skip
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        return {**result, "restored": True}

    # -- image inspection --------------------------------------------------------------

    async def op_save_image_dumpxml(self, ctx: RequestContext, args: dict[str, Any]
                                    ) -> dict[str, Any]:  # fmt: skip
        """virsh save-image-dumpxml: the XML a save image records."""
        fd = self._open(args["path"], write=False, where="save-image-dumpxml")
        try:
            header = read_header(fd, f"'{args['path']}'")
        finally:
            os.close(fd)
        domain = parse_domain(header.xml, where="save-image-dumpxml",
                              networks=host_networks(self.config))  # fmt: skip
        check_access(self.config.acl, ctx.subject, "save_image_dumpxml", domain.name,
                     domain.uuid)  # fmt: skip
        return {"xml": header.xml, "name": domain.name, "uuid": domain.uuid,
                "complete": header.complete, "compression": header.compression,
                "was_running": header.was_running, "kind": header.kind}  # fmt: skip

    async def op_save_image_define(self, ctx: RequestContext, args: dict[str, Any]
                                   ) -> dict[str, Any]:  # fmt: skip
        """virsh save-image-define: replace the image's XML (ABI-checked) in place."""
        fd = self._open(args["path"], write=False, where="save-image-define")
        os.close(fd)  # checked read-only first: a bad path must not be truncated
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(os.path.realpath(args["path"]), flags)
        try:
            header = read_header(fd, f"'{args['path']}'")
            domain = self._image_domain(header, args["xml"], "save-image-define")
            check_access(self.config.acl, ctx.subject, "save_image_define", domain.name,
                         domain.uuid)  # fmt: skip
            if args["running"]:
                header.was_running = True
            elif args["paused"]:
                header.was_running = False
            header.xml = format_domain(domain)
            rewrite_metadata(fd, header)
        finally:
            os.close(fd)
        return {"name": domain.name, "path": args["path"], "was_running": header.was_running}

    # -- dump ------------------------------------------------------------------------

    async def op_dump(self, ctx: RequestContext, args: dict[str, Any]) -> dict[str, Any]:
        """virsh dump: full (migration stream) or memory-only (ELF/kdump) core dump."""
        live, proc = await self.agent._running(ctx, "dump", args["name"])
        dom = live.domain
        memory_only = args["memory_only"]
        fmt = args["format"] or ("elf" if memory_only else None)
        if fmt is not None and not memory_only:
            raise SaveError("dump: --format needs --memory-only")
        if fmt is not None and fmt not in DUMP_FORMATS:
            raise SaveError(f"dump: unknown --format {fmt!r}; one of {', '.join(DUMP_FORMATS)}")
        if args["crash"] and args["reset"]:
            raise SaveError("dump: --crash and --reset are mutually exclusive")
        problems = allowed.is_allowed(dom, False, memory=not memory_only)
        if problems:
            raise SaveRefused(allowed.refusal(dom.name, "dump", problems),
                              blockers=[p.message for p in problems])  # fmt: skip
        argv = None if memory_only else compressor_argv(self.config.save.image_format)
        path = args["path"]
        job = await self.jobs.begin_async(dom.uuid, dom.name, AsyncJob.DUMP, timeout=JOB_TIMEOUT)
        started = time.monotonic()
        try:
            was_running = (await proc.qmp.query_status()).running
            if was_running and not args["live"]:
                job.record(resume=not args["crash"], path=path)
                await proc.qmp.execute("stop")
            try:
                if memory_only:
                    assert fmt is not None
                    size = await self._memory_dump(proc, path, fmt)
                else:
                    header = SaveHeader(xml=self._header_xml(dom, None, "dump"),
                                        was_running=was_running,
                                        compression=self.config.save.image_format, kind="dump",
                                        name=dom.name, uuid=dom.uuid)  # fmt: skip
                    size = await self._to_file(proc, dom, path, header, argv, op="dump",
                                               pause=False, bypass_cache=args["bypass_cache"],
                                               job=job)  # fmt: skip
            finally:
                if not args["crash"]:
                    with contextlib.suppress(FerryError):
                        if args["reset"]:
                            await proc.qmp.execute("system_reset")
                        if was_running and not (await proc.qmp.query_status()).running:
                            await proc.qmp.execute("cont")
            if args["crash"]:
                await self.host.kill(dom.name)
        finally:
            await self.jobs.end_async(job)
        elapsed = time.monotonic() - started
        what = f"memory-only {fmt}" if memory_only else "full"
        if args["crash"]:
            log_event(log, MessageID.DOMAIN_STOPPED,
                      f"domain {dom.name} dumped to {path} ({what}, {size} bytes) and stopped "
                      "(--crash)", domain=dom.name, uuid=dom.uuid, job="dump")  # fmt: skip
        else:
            log.info("domain %s dumped to %s (%s, %d bytes)", dom.name, path, what, size)
        return {"name": dom.name, "path": path, "bytes": size, "seconds": elapsed,
                "memory_only": memory_only, "format": fmt or "save-image"}  # fmt: skip

    async def _memory_dump(self, proc: QemuProcess, path: str, fmt: str, *,
                           own: bool = False) -> int:  # fmt: skip
        if own:  # the agent's own dump folder (watchdog): not a user's path
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            fd = self._open(path, write=True, where="dump")
        try:
            if fmt != "elf":
                caps = await proc.qmp.execute("query-dump-guest-memory-capability")
                have = {str(f) for f in (caps or {}).get("formats", [])}
                if fmt not in have:
                    raise SaveError(f"dump: this qemu cannot write {fmt} "
                                    f"(it has {', '.join(sorted(have))})")  # fmt: skip
            await _pass_fd(proc, fd, "ferry-dump")
            await proc.qmp.execute("dump-guest-memory", {
                "paging": False, "protocol": "fd:ferry-dump", "detach": True,
                "format": DUMP_FORMATS[fmt]})  # fmt: skip
            while True:
                reply = await proc.qmp.execute("query-dump", timeout=30.0)
                state = reply.get("status") if isinstance(reply, dict) else None
                if state == "completed":
                    break
                if state == "failed":
                    raise SaveError("dump: qemu's dump-guest-memory failed")
                await asyncio.sleep(POLL_S)
            os.fsync(fd)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

