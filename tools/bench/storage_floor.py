"""The floor of ``storage.py``: bare qemu copying the disk with the VM, driven over QMP.

The same qemu work as Ferry's ``--copy-storage-all``, with no agent: the
qemus are launched by ``migration.MinimalDriver`` (Ferry's argv, in the
hosts' network and mount namespaces), and the QMP arguments come from
``ferry.storage_copy`` as the agents build them. Timed from the creation of
the target image to the source qemu killed:

1. ``create image``: ``qemu-img create`` of the target (the destination
   qemu opens it at start, as in Ferry's Prepare);
2. ``launch``: the destination qemu (``-incoming defer``) and QMP connect;
3. ``export``: ``nbd-server-start``
   (``tls-creds-x509`` + ``authz-simple`` on the source's CN with TLS),
   ``block-export-add``, ``migrate-incoming``;
4. ``disk copy``: on the source a TLS client object, ``blockdev-add`` of the
   NBD client, ``blockdev-mirror``, ``query-block-jobs`` every ``--poll-ms``
   until the mirror is ready;
5. ``memory``: ``pause-before-switchover``, unlimited bandwidth, ``migrate``,
   polled until ``pre-switchover``;
6. ``switchover``: ``block-job-cancel`` (a ready mirror ends with its target
   complete), wait for ``concluded`` with offset == len, remove the job, the
   node and the TLS object, ``migrate-continue``;
7. ``finish``: source and destination completed, ``nbd-server-stop``,
   ``cont`` on the destination, SIGKILL of the source.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

from migration import UNLIMITED_BANDWIDTH, MinimalDriver, log, wait_guest_on
from storage_report import StorageRep
from tunnel import qemu_tls_dir

import testguest
from cluster import Cluster, HostEnv

__all__ = ["FloorDriver", "GuestBroken", "check_disk_report", "wait_workload"]

NBD_PORT = 49351  # outside the agents' migration_ports (49200-49299)
MEMORY_PORT = 49352
TLS_OBJECT = "floor-nbd-tls"
AUTHZ_OBJECT = "floor-nbd-authz"


def ms(a: float, b: float) -> float:
    """Monotonic seconds ``a`` to ``b`` in ms."""
    return round((b - a) * 1000, 1)


class GuestBroken(RuntimeError):
    """The guest misbehaved after a move (reboot, bad page, bad disk block)."""


def check_disk_report(rep: testguest.Report, where: str) -> None:
    """The disk workload must have read back every block as written, with no I/O error."""
    if rep.dbad or rep.derrors or rep.bad_pages:
        raise GuestBroken(
            f"guest on {where}: dbad={rep.dbad} derrors={rep.derrors} "
            f"bad_pages={rep.bad_pages} ({rep.raw})"
        )


def wait_workload(serial: testguest.SerialReader, busy: bool) -> testguest.Report:
    """Booted, RAM filled and, for the busy guest, its disk writes under way (2 s of them)."""
    serial.wait_for_boot(timeout=120)
    rep = serial.wait_for(lambda r: r.counter >= 2, timeout=300)
    if busy:
        first, since = rep.dwritten_kib, rep.host_time
        rep = serial.wait_for(
            lambda r: r.dwritten_kib > first and r.host_time >= since + 2, timeout=60
        )
    check_disk_report(rep, "the source")
    return rep


class FloorDriver(MinimalDriver):
    """One guest under bare qemu; :meth:`migrate` copies its disk with it (see the module)."""

    def __init__(
        self,
        cluster: Cluster,
        kernel: Path,
        args: argparse.Namespace,
        *,
        xml: str,
        workload: str,
        image: str,
        disk_bytes: int,
    ) -> None:
        from ferry.domain.argv import qemu_disk_ids
        from ferry.storage_copy import DiskCopy

        super().__init__(cluster, kernel, args, xml=xml, root=f"floor-{workload}")
        self.busy = workload == "busy"
        disk = self.domain.disks[0]
        self.copy = DiskCopy(
            target=disk.target_dev, path=image, format="raw", virtual_size=disk_bytes
        )
        self.node = f"{qemu_disk_ids(self.domain)[disk.target_dev]}-format"
        self.src: Any = None
        self.serial: testguest.SerialReader | None = None
        self.last: testguest.Report | None = None

    async def boot(self, host: HostEnv) -> None:
        """(Re)start the guest on ``host`` (every qemu of ours killed first)."""
        await self.close()
        if self.serial is not None:
            self.serial.close()
        self.src, serial_path = await self.launch(host, incoming=False)
        await self.src.qmp.execute("cont")
        self.serial = testguest.SerialReader(serial_path)
        self.last = await asyncio.to_thread(wait_workload, self.serial, self.busy)

    async def shutdown(self) -> None:
        """Kill every qemu of ours, close the serial reader."""
        await self.close()
        if self.serial is not None:
            self.serial.close()
            self.serial = None

    async def _wait_jobs(self, qmp: Any, until: str, deadline: float) -> None:
        from ferry.storage_copy import mirror_progress

        while True:
            jobs = await qmp.execute("query-block-jobs")
            jobs = jobs if isinstance(jobs, list) else []
            if until == "ready":
                progress = mirror_progress([self.copy], jobs)
                if progress.failed:
                    raise RuntimeError("floor mirror failed: " + "; ".join(progress.failed))
                if progress.ready:
                    return
            else:
                job = next((j for j in jobs if j.get("device") == self.copy.job), None)
                if job is None:
                    raise RuntimeError("floor mirror vanished at switchover")
                if job.get("status") == "concluded":
                    if job.get("error") or job.get("offset") != job.get("len"):
                        raise RuntimeError(f"floor mirror ended short: {job}")
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"floor mirror not {until} after {self.args.timeout:.0f} s")
            await asyncio.sleep(self.args.poll_ms / 1000)

    async def _migration(self, qmp: Any, until: str, deadline: float) -> Any:
        from ferry.qemu import query_migrate

        while True:
            stats = await query_migrate(qmp)
            if stats.status == until:
                return stats
            if stats.status in ("failed", "cancelled"):
                raise RuntimeError(f"floor migration {stats.status}: {stats.error_desc}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"floor migration not {until} after {self.args.timeout:.0f} s")
            await asyncio.sleep(self.args.poll_ms / 1000)

    async def migrate(
        self, sh: HostEnv, dh: HostEnv, *, tls: bool, sync: bool, variant: str, rnd: int
    ) -> StorageRep:
        """Move the guest from ``sh`` to ``dh`` with its disk; the guest checked on ``dh``."""
        from ferry.qemu import query_migrate
        from ferry.storage_copy import (
            block_export_add_args,
            create_image_argv,
            mirror_args,
            nbd_client_args,
            nbd_server_start_args,
            tls_creds_args,
        )

        src, creds = self.src, TLS_OBJECT if tls else None
        assert src is not None and self.serial is not None
        t0 = time.monotonic()
        deadline = t0 + self.args.timeout
        # The target first: the incoming qemu opens its disk at start (as in Ferry's Prepare).
        local = dataclasses.replace(self.copy, path=str(dh.local_dir / Path(self.copy.path).name))
        made = await asyncio.create_subprocess_exec(*create_image_argv(local))
        if await made.wait() != 0:
            raise RuntimeError(f"qemu-img create {local.path} failed")
        t_create = time.monotonic()
        dst, dst_serial = await self.launch(dh, incoming=True)
        t_launch = time.monotonic()
        if tls:
            await dst.qmp.execute(
                "object-add",
                tls_creds_args(TLS_OBJECT, "server", str(qemu_tls_dir(self.cluster, dh))),
            )
            await dst.qmp.execute(
                "object-add",
                {"qom-type": "authz-simple", "id": AUTHZ_OBJECT, "identity": f"CN={sh.label}"},
            )
        t_creds = time.monotonic()
        start = nbd_server_start_args((dh.ns.address, NBD_PORT), creds)
        if tls:
            start["tls-authz"] = AUTHZ_OBJECT
        await dst.qmp.execute("nbd-server-start", start)
        await dst.qmp.execute("block-export-add", block_export_add_args(self.copy, self.node))
        uri = f"tcp:{dh.ns.address}:{MEMORY_PORT}"
        await dst.qmp.execute("migrate-incoming", {"uri": uri})
        t_export = time.monotonic()
        if tls:
            await src.qmp.execute(
                "object-add",
                tls_creds_args(TLS_OBJECT, "client", str(qemu_tls_dir(self.cluster, sh))),
            )
        node_args = nbd_client_args(self.copy, (dh.ns.address, NBD_PORT), creds)
        if tls:
            node_args["tls-hostname"] = dh.ns.address
        await src.qmp.execute("blockdev-add", node_args)
        await src.qmp.execute(
            "blockdev-mirror", mirror_args(self.copy, self.node, synchronous_writes=sync)
        )
        t_mirror = time.monotonic()
        await self._wait_jobs(src.qmp, "ready", deadline)
        t_ready = time.monotonic()
        await src.qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "pause-before-switchover", "state": True}]},
        )
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
        await src.qmp.execute("migrate", {"uri": uri})
        await self._migration(src.qmp, "pre-switchover", deadline)
        t_pre = time.monotonic()
        await src.qmp.execute("block-job-cancel", {"device": self.copy.job})
        await self._wait_jobs(src.qmp, "concluded", deadline)
        await src.qmp.execute("job-dismiss", {"id": self.copy.job})
        await src.qmp.execute("blockdev-del", {"node-name": self.copy.client_node})
        if tls:
            await src.qmp.execute("object-del", {"id": TLS_OBJECT})
        await src.qmp.execute("migrate-continue", {"state": "pre-switchover"})
        t_switch = time.monotonic()
        stats = await self._migration(src.qmp, "completed", deadline)
        for _ in range(500):  # qemu 7.2: completed a moment before the times are filled in
            if stats.total_time_ms:
                break
            await asyncio.sleep(0.002)
            stats = await query_migrate(src.qmp)
        await self._migration(dst.qmp, "completed", deadline)
        await dst.qmp.execute("nbd-server-stop")
        if tls:
            for obj in (AUTHZ_OBJECT, TLS_OBJECT):
                await dst.qmp.execute("object-del", {"id": obj})
        await dst.qmp.execute("cont")
        await self.kill(src)
        t_end = time.monotonic()
        self.src = dst
        rep = StorageRep(
            variant=variant,
            workload="busy" if self.busy else "idle",
            round=rnd,
            wall_ms=ms(t0, t_end),
            disk_ms=ms(t_mirror, t_ready),
            memory_ms=float(stats.total_time_ms or 0) or None,
            downtime_ms=float(stats.downtime_ms or 0) or None,
            disk_bytes=self.copy.virtual_size,
            steps={
                "create image": ms(t0, t_create),
                "launch": ms(t_create, t_launch),
                "tls objects": ms(t_launch, t_creds),
                "export": ms(t_creds, t_export),
                "mirror start": ms(t_export, t_mirror),
                "disk copy": ms(t_mirror, t_ready),
                "memory to pre-switchover": ms(t_ready, t_pre),
                "end mirror + continue": ms(t_pre, t_switch),
                "completed + cont + kill": ms(t_switch, t_end),
            },
        )
        self.last = await asyncio.to_thread(wait_guest_on, self.serial, dst_serial, self.last)
        check_disk_report(self.last, dh.label)
        log(
            f"{variant} {rnd} {sh.label}->{dh.label}: wall {rep.wall_ms:.0f} ms, disk "
            f"{rep.disk_ms:.0f} ms, memory {rep.memory_ms} ms"
        )
        return rep

    async def abandon(self) -> None:
        """After a failure: kill every qemu of ours (the next rep boots afresh)."""
        with contextlib.suppress(Exception):
            await self.shutdown()
