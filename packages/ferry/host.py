"""The domains of one host, as both agents of the host see them.

Persistent definitions live in ``state_dir/domains/NAME.xml``; a running
domain has a status file ``run_dir/domains/NAME.status`` and its live XML
next to it (``NAME.xml``), so either agent (and a restarted one) can find
it.  Each qemu gets two QMP monitors, one per agent
(``qmp/NAME.source.sock`` and ``qmp/NAME.destination.sock``): a QMP socket
serves one client at a time, and with one monitor each the agents never
have to hand a connection over (ferry-destination receives a VM, then
ferry-source manages it without waiting for the other to let go).

At start the host makes what the XML leaves to it: the ports of displays
with ``autoport`` (from ``[graphics] port_range``, recorded in the live XML,
so ``dumpxml`` shows them, and in the status file's ``graphics``) and the
tap devices of bridge and network NICs (:mod:`ferry.netdev`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ferry.config import AgentConfig
from ferry.cpu_probe import check_start_cpu
from ferry.domain import (
    Domain,
    Graphics,
    GraphicsPorts,
    NicTap,
    RuntimePaths,
    format_domain,
    parse_domain,
    to_qemu_argv,
)
from ferry.domain.argv import live_sockets
from ferry.errors import ConfigError, NoDomain, QemuLaunchError, QMPError, StateFileError
from ferry.firmware_files import firmware_files, remove_default_nvram
from ferry.lease import LeaseManager, LeaseOwner, LeaseRecord, busy_error
from ferry.netdev import detach_switch_ports, open_taps
from ferry.pinning import apply_pinning, check_host_cpus, host_online_cpus, pin_sets
from ferry.qemu import QemuProcess, launch, read_start_time, reconnect
from ferry.qemu.scope import scope_for
from ferry.statefile import DomainStatus, atomic_write
from ferry.storage_policy import OpenedFiles, open_domain_files
from ferry.swtpm import (
    Swtpm,
    SwtpmPaths,
    attach_to_scope,
    kill_stale,
    remove_state,
    start_swtpm,
    state_to_remove,
    swtpm_paths,
)
from ferry.virtiofs import Virtiofsd, find_virtiofsd, kill_recorded, start_virtiofsd
from ferry.virtiofs import attach_to_scope as attach_virtiofsd

__all__ = ["FFDHE2048_PEM", "AgentName", "Host", "LiveDomain", "write_dh_params"]

log = logging.getLogger("ferry.host")

AgentName = Literal["source", "destination"]
AGENTS: tuple[AgentName, AgentName] = ("source", "destination")


@dataclass
class LiveDomain:
    """A domain as found on this host: its definition and, if running, its status."""

    domain: Domain
    persistent: bool
    status: DomainStatus | None

    @property
    def active(self) -> bool:
        """True when a qemu for it exists on this host."""
        return self.status is not None


#: RFC 7919's ffdhe2048 group (public, standard). qemu 7.2's server-side
#: ``tls-creds-x509`` generates DH parameters at every ``object-add`` when its
#: directory has no ``dh-params.pem`` (0.2-1 s on this machine, in Prepare of
#: every storage copy); TLS 1.3 does not even use them.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def write_dh_params(directory: Path) -> Path:
    """Put :data:`FFDHE2048_PEM` in ``directory`` as qemu's ``dh-params.pem`` (once)."""
    path = directory / "dh-params.pem"
    if not path.exists():
        tmp = directory / ".dh-params.pem.tmp"
        tmp.write_text(FFDHE2048_PEM)
        tmp.replace(path)
    return path


class Host:
    """Definitions, status files and qemu processes of this host, for one agent."""

    def __init__(self, config: AgentConfig, agent: AgentName) -> None:
        self.config = config
        self.agent = agent
        self.paths = config.paths
        self._procs: dict[str, QemuProcess] = {}
        self._process_locks: dict[str, asyncio.Lock] = {}
        self.leases = LeaseManager(config.paths.lockspace_dir)

    # -- paths --------------------------------------------------------------

    def definition_path(self, name: str) -> Path:
        """Persistent definition of ``name``."""
        return self.paths.domains_dir / f"{name}.xml"

    def status_path(self, name: str) -> Path:
        """Status file of running ``name``."""
        return self.paths.status_dir / f"{name}.status"

    def live_xml_path(self, name: str) -> Path:
        """Live XML of running ``name``."""
        return self.paths.status_dir / f"{name}.xml"

    def qmp_socket(self, name: str, agent: AgentName | None = None) -> Path:
        """The QMP monitor socket of ``agent`` (default: ours) for ``name``."""
        return self.paths.qmp_dir / f"{name}.{agent or self.agent}.sock"

    def ports_path(self, name: str) -> Path:
        """The display ports ``name``'s qemu holds (or is about to bind)."""
        return self.paths.status_dir / f"{name}.ports"

    def pidfile(self, name: str) -> Path:
        """qemu's pidfile."""
        return self.paths.status_dir / f"{name}.pid"

    def chardev_dir(self, name: str) -> Path:
        """Where sockets the XML leaves unnamed go (serial0.sock, …)."""
        return self.paths.serial_dir / name

    def ensure_dirs(self) -> None:
        """Create every state directory (0750: VM names are not for everyone)."""
        for path in self.paths.all_dirs():
            path.mkdir(parents=True, exist_ok=True, mode=0o750)

    # -- definitions ----------------------------------------------------------

    def load_definition(self, name: str) -> Domain | None:
        """The persistent definition of ``name``, or None."""
        path = self.definition_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_domain(data, where=str(path))

    def definitions(self) -> dict[str, Domain]:
        """All persistent definitions; a broken file is logged and skipped."""
        out: dict[str, Domain] = {}
        if not self.paths.domains_dir.is_dir():
            return out
        for path in sorted(self.paths.domains_dir.glob("*.xml")):
            try:
                dom = parse_domain(path.read_bytes(), where=str(path))
            except Exception as exc:
                log.error("skipping unreadable definition %s: %s", path, exc)
                continue
            out[dom.name] = dom
        return out

    def save_definition(self, domain: Domain) -> None:
        """Write the persistent definition atomically."""
        atomic_write(self.definition_path(domain.name), format_domain(domain).encode())

    def delete_definition(self, name: str) -> bool:
        """Remove the persistent definition; True if there was one.

        An inactive domain's TPM state goes with it (libvirt's undefine); a
        running one keeps it until its qemu is gone (it is transient then).
        Ferry's NVRAM file of the domain goes with it too, unless the domain
        still runs here (it is then transient and still uses the file).
        """
        domain = None
        with contextlib.suppress(Exception):
            domain = self.load_definition(name)
        try:
            self.definition_path(name).unlink()
        except FileNotFoundError:
            return False
        paths = self.swtpm_paths(domain) if domain is not None else None
        if (paths is not None and domain is not None and self.load_status(name) is None
                and not domain.tpms[0].persistent_state):
            remove_state(paths, name=name)
        if self.load_status(name) is None:
            remove_default_nvram(self.config, name)
        return True

    # -- live state -----------------------------------------------------------

    def load_status(self, name: str) -> DomainStatus | None:
        """The status of running ``name``, or None when it is not running."""
        try:
            return DomainStatus.load(self.status_path(name))
        except FileNotFoundError:
            return None

    def save_status(self, status: DomainStatus) -> None:
        """Write the status file atomically."""
        status.save(self.status_path(status.name))

    def running_names(self) -> list[str]:
        """Names of domains with a status file."""
        if not self.paths.status_dir.is_dir():
            return []
        return sorted(p.stem for p in self.paths.status_dir.glob("*.status"))

    def live_definition(self, name: str) -> Domain | None:
        """The live XML of running ``name``."""
        path = self.live_xml_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return parse_domain(data, where=str(path))

    def save_live_definition(self, domain: Domain) -> None:
        """Record the live XML of a running domain."""
        atomic_write(self.live_xml_path(domain.name), format_domain(domain).encode())

    def find(self, name: str) -> LiveDomain:
        """Look a domain up by name (running or defined).

        Raises:
            NoDomain: when neither a definition nor a running domain has that name.
        """
        persistent = self.load_definition(name)
        status = self.load_status(name)
        if status is not None and status.pid is None:
            status = None  # only a job record: no qemu
        live = self.live_definition(name) if status is not None else None
        domain = live or persistent
        if domain is None:
            raise NoDomain(f"domain not found: no domain with matching name '{name}'", name=name)
        return LiveDomain(domain=domain, persistent=persistent is not None, status=status)

    def find_uuid(self, uuid: str) -> LiveDomain | None:
        """Look a domain up by UUID among running and defined ones."""
        for name in self.running_names():
            live = self.live_definition(name)
            if live is not None and live.uuid == uuid:
                return self.find(name)
        for dom in self.definitions().values():
            if dom.uuid == uuid:
                return self.find(dom.name)
        return None

    def all_domains(self) -> list[LiveDomain]:
        """Every domain on the host: running ones and defined ones."""
        names = set(self.running_names()) | set(self.definitions())
        out = []
        for name in sorted(names):
            with contextlib.suppress(NoDomain):
                out.append(self.find(name))
        return out

    # -- qemu -----------------------------------------------------------------

    def runtime_paths(self, name: str) -> RuntimePaths:
        """Where qemu's runtime files go for ``name``."""
        return RuntimePaths(
            run_dir=self.chardev_dir(name),
            qmp_socket=self.qmp_socket(name, "source"),
            pidfile=self.pidfile(name),
            log_file=self.paths.log_dir / f"{name}.log",
            spice_tls_dir=self.config.graphics.spice_tls_dir,
        )

    async def start(
        self,
        domain: Domain,
        *,
        incoming: bool = False,
        extra_status: dict[str, object] | None = None,
    ) -> QemuProcess:
        """Launch qemu for ``domain`` (CPUs paused: ``-S``) and record its status.

        The caller resumes the CPUs (``cont``) when the domain should run;
        starting paused means nothing runs before the status file exists.

        Disk images, kernel and initrd are opened here, within the storage
        policy, and qemu gets the descriptors (:mod:`ferry.storage_policy`).

        Raises:
            QemuLaunchError: qemu refused to start (message has qemu's words).
            PathNotAllowed: a path of the domain is outside ``[storage] allowed``.
        """
        where = "prepare" if incoming else "start"
        if not incoming:  # Prepare checked the CPU already, against the source's
            await check_start_cpu(domain, self.config.qemu.binary)
        with open_domain_files(domain, self.config, where=where) as files, \
                firmware_files(domain, self.config, files, where=where) as fw, \
                open_taps(domain, self.config) as taps:
            if incoming and fw.created:
                # Removed again if this incoming qemu is discarded (cleanup).
                extra_status = {**(extra_status or {}), "nvram_created": str(fw.nvram)}
            return await self._start(fw.domain, files, incoming=incoming,
                                     extra_status=extra_status, taps=taps)

    async def _start(
        self,
        domain: Domain,
        files: OpenedFiles,
        *,
        incoming: bool,
        extra_status: dict[str, object] | None,
        taps: Mapping[int, NicTap],
    ) -> QemuProcess:
        paths = self.runtime_paths(domain.name)
        paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not incoming:
            # Refuse before qemu opens the images: qemu's own image locking
            # would refuse too, but could not say which VM holds the disk.
            for disk in self.writable_disks(domain):
                owner = self.leases.owner_of(disk)
                if owner is not None:
                    raise busy_error(disk, owner)
        # The ports are reserved (NAME.ports) until cleanup; the live XML
        # records them (dumpxml shows them, the migratable form leaves them out).
        # Pinned CPUs this host lacks: refused before anything starts (in
        # Prepare too: a destination may have fewer CPUs than the source).
        check_host_cpus(domain, host_online_cpus())
        ports, displays = self._reserve_graphics(domain)
        # The live XML says where Ferry put the sockets (ferry.domain.argv.live_sockets).
        live_domain = live_sockets(_with_ports(domain, ports), paths)
        try:
            argv = to_qemu_argv(
                self._with_prealloc_threads(domain), paths=paths, incoming=incoming,
                qemu_binary=self.config.qemu.binary, files=files.passed,
                graphics_ports=ports, nic_taps=taps,
                graphics_listen=self.config.graphics.listen,
            )  # fmt: skip
        except BaseException:
            self._release_graphics(domain.name)
            raise
        if "-S" not in argv:
            argv.append("-S")
        # The second monitor: the other agent's.
        other = self.qmp_socket(domain.name, "destination")
        argv += [
            "-chardev",
            f"socket,id=monitor-dst,path={other},server=on,wait=off",
            "-mon",
            "chardev=monitor-dst,mode=control",
        ]
        for path in (paths.qmp_socket, other):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        proc_qmp = self.qmp_socket(domain.name)
        # systemd is init: its own scope in machine.slice (out of our cgroup).
        scope = scope_for(
            self.config.qemu.cgroup,
            domain.name,
            domain.uuid,
            extra_properties=self.config.qemu.scope_properties,
        )
        self.save_live_definition(live_domain)
        tpm = None
        vfs: list[Virtiofsd] = []
        try:
            # swtpm and virtiofsd first: qemu connects to their sockets while it starts.
            tpm = await self._start_swtpm(domain, incoming=incoming)
            vfs = await start_virtiofsd(domain, paths.run_dir, self.paths.log_dir,
                                        find_virtiofsd(self.config.qemu.virtiofsd or None))
            proc = await launch(
                argv,
                pidfile=paths.pidfile,
                qmp_socket=proc_qmp,
                timeout=self.config.qemu.launch_timeout_s,
                qmp_name=f"{self.agent}:{domain.name}",
                scope=scope,
                pass_fds=[*files.fds, *(tap.fd for tap in taps.values())],
            )
        except QemuLaunchError as exc:
            await self._stop_swtpm(domain, tpm, incoming=incoming)
            for v in vfs:
                await v.stop()
            self._release_graphics(domain.name)
            with contextlib.suppress(FileNotFoundError):
                self.live_xml_path(domain.name).unlink()
            if "(no message)" in exc.message and paths.log_file is not None:
                # With -D, qemu writes its errors to the log file.
                with contextlib.suppress(OSError):
                    tail = paths.log_file.read_text(errors="replace").strip().splitlines()[-3:]
                    if tail:
                        raise QemuLaunchError(
                            exc.message.replace("(no message)", " / ".join(tail)), **exc.details
                        ) from None
            raise
        except BaseException:
            await self._stop_swtpm(domain, tpm, incoming=incoming)
            for v in vfs:
                await v.stop()
            self._release_graphics(domain.name)
            with contextlib.suppress(FileNotFoundError):
                self.live_xml_path(domain.name).unlink()
            raise
        try:
            # qemu is paused (-S): no vCPU has run before its thread is pinned.
            if not pin_sets(domain).empty:
                await apply_pinning(domain, proc.pid, proc.qmp)
        except BaseException:
            with contextlib.suppress(Exception):
                await proc.kill()
            for v in vfs:
                await v.stop()
            self._release_graphics(domain.name)
            with contextlib.suppress(FileNotFoundError):
                self.live_xml_path(domain.name).unlink()
            raise
        status = DomainStatus(
            name=domain.name,
            uuid=domain.uuid,
            pid=proc.pid,
            qmp_path=self.qmp_socket(domain.name, "source"),
            start_time=proc.start_time,
            run_state="incoming" if incoming else "paused",
            extra=dict(extra_status or {}),
        )
        if proc.scope_unit is not None:
            # Kept so that an agent restarted later still knows its scope.
            status.extra["scope_unit"] = proc.scope_unit
        if displays:
            status.extra["graphics"] = displays
        if taps:
            status.extra["taps"] = {str(i): t.ifname for i, t in taps.items()}
            on_switch = [t.ifname for t in taps.values() if t.switch_port]
            if on_switch:
                status.extra["switch_ports"] = on_switch
        if tpm is not None:
            # qemu holds swtpm's control connection now: swtpm ends with it.
            status.extra["swtpm"] = {"pid": tpm.pid, "created": tpm.created}
            tpm.close()
            if proc.scope_unit is not None:
                await attach_to_scope(proc.scope_unit, tpm.pid, name=domain.name)
        if vfs:
            # qemu holds each virtiofsd's vhost-user connection: they end with it.
            status.extra["virtiofsd"] = [v.record() for v in vfs]
            for v in vfs:
                v.hand_over()
                if proc.scope_unit is not None:
                    await attach_virtiofsd(proc.scope_unit, v.pid, name=domain.name)
        self.save_status(status)
        self._procs[domain.name] = proc
        return proc

    # -- display ports ----------------------------------------------------------

    def graphics(self, name: str) -> list[dict[str, object]]:
        """Where running ``name``'s displays listen: type, port, tls_port, websocket, listen."""
        status = self.load_status(name)
        found = status.extra.get("graphics") if status is not None else None
        return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []

    def _reserve_graphics(
        self, domain: Domain
    ) -> tuple[dict[int, GraphicsPorts], list[dict[str, object]]]:
        """Choose the ports of ``domain``'s displays that leave them to the host.

        Under a lock both agents of the host take, the ports other domains
        hold or reserved (their ``NAME.ports``) are skipped and each port is
        probed with a bind on the display's address; the choice is written
        to ``NAME.ports`` before the lock is released, so that a concurrent
        start on this host (the other agent's too) picks other ports.

        Returns the ports for :func:`~ferry.domain.to_qemu_argv` and the
        displays' addresses for the status file.

        Raises:
            QemuLaunchError: no free port in the range; a spice display that
                asks for TLS on a host without ``[graphics] spice_tls_dir``.
        """
        cfg = self.config.graphics
        needs = [(i, g) for i, g in enumerate(domain.graphics)
                 if g.autoport or g.websocket == -1]  # fmt: skip
        if not needs:
            return {}, [_display(g, None, cfg.listen) for g in domain.graphics]
        self.paths.locks_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        with (self.paths.locks_dir / "graphics-ports.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            taken = self._reserved_ports(exclude=domain.name)
            chosen: dict[int, GraphicsPorts] = {}
            for i, g in needs:
                address = g.listen or cfg.listen

                def pick(lo: int, hi: int, what: str, address: str = address) -> int:
                    port = free_port(address, lo, hi, taken)
                    if port is None:
                        raise QemuLaunchError(
                            f"domain {domain.name}: no free {what} port in {lo}..{hi} on "
                            f"{address} ([graphics] port_range)", domain=domain.name)
                    taken.add(port)
                    return port

                chosen[i] = _choose(g, pick, cfg.port_range, cfg.websocket_port_range,
                                    tls=cfg.spice_tls_dir is not None, domain=domain.name)
            ports = sorted(p for c in chosen.values()
                           for p in (c.port, c.tls_port, c.websocket) if p)  # fmt: skip
            atomic_write(self.ports_path(domain.name), json.dumps(ports).encode())
        displays = [_display(g, chosen.get(i), cfg.listen) for i, g in enumerate(domain.graphics)]
        return chosen, displays

    def _reserved_ports(self, exclude: str) -> set[int]:
        out: set[int] = set()
        if not self.paths.status_dir.is_dir():
            return out
        for path in self.paths.status_dir.glob("*.ports"):
            if path.stem == exclude:
                continue
            with contextlib.suppress(OSError, ValueError):
                out.update(p for p in json.loads(path.read_text()) if isinstance(p, int))
        return out

    def _release_graphics(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ports_path(name).unlink()

    # -- swtpm ------------------------------------------------------------------

    def swtpm_paths(self, domain: Domain) -> SwtpmPaths | None:
        """Where ``domain``'s swtpm keeps its state and socket (None: no TPM)."""
        if not domain.tpms:
            return None
        return swtpm_paths(self.paths.state_dir / "swtpm", self.chardev_dir(domain.name),
                           self.paths.log_dir, domain.name, domain.uuid, domain.tpms[0])

    async def _start_swtpm(self, domain: Domain, *, incoming: bool) -> Swtpm | None:
        paths = self.swtpm_paths(domain)
        if paths is None:
            return None
        return await start_swtpm(domain, paths, incoming=incoming)

    async def _stop_swtpm(self, domain: Domain, tpm: Swtpm | None, *, incoming: bool) -> None:
        """After qemu failed to start: stop its swtpm; its state follows
        :func:`ferry.swtpm.state_to_remove` (an incoming migration's goes
        if Prepare created it; a persistent domain's manufactured TPM stays)."""
        if tpm is None:
            return
        await tpm.stop()
        if state_to_remove(domain.tpms[0], persistent=self.definition_path(domain.name).exists(),
                           incoming_unfinished=incoming, created_here=tpm.created):
            remove_state(tpm.paths, name=domain.name, whole=not incoming)

    def _swtpm_gone(self, domain: Domain, status: DomainStatus | None) -> None:
        """``domain``'s qemu is gone: no swtpm may stay; its state follows
        :func:`ferry.swtpm.state_to_remove`."""
        paths = self.swtpm_paths(domain)
        if paths is None:
            return
        kill_stale(paths, name=domain.name)
        for stale in (paths.ctrl_socket, paths.pidfile):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        info = status.extra.get("swtpm") if status is not None else None
        created = bool(info.get("created")) if isinstance(info, dict) else False
        unfinished = status is not None and status.run_state == "incoming"
        persistent = self.definition_path(domain.name).exists()
        if state_to_remove(domain.tpms[0], persistent=persistent,
                           incoming_unfinished=unfinished, created_here=created):
            # A failed incoming migration removes only the state it created.
            remove_state(paths, name=domain.name, whole=not unfinished)

    def _with_prealloc_threads(self, domain: Domain) -> Domain:
        """``domain`` with the host's preallocation threads when its XML names none.

        Preallocating an incoming qemu's RAM is on the migration's critical
        path (Prepare), and one thread zeroes ~5 GiB/s at best; the thread
        count changes nothing the guest can see.
        """
        if not domain.preallocated or domain.prealloc_threads is not None:
            return domain
        threads = self.config.qemu.prealloc_threads or min(os.cpu_count() or 1, 4)
        if threads <= 1:
            return domain
        return dataclasses.replace(domain, prealloc_threads=threads)

    async def process(self, name: str, *, timeout: float = 10.0) -> QemuProcess:
        """Our QMP-connected handle on running ``name`` (reconnecting if needed).

        Raises:
            NoDomain: not running here.
            QMPError: running but its monitor does not answer.
        """
        proc = self._procs.get(name)
        if proc is not None and proc.alive() and proc.qmp.connected:
            return proc
        # qemu's monitor takes one client at a time: two concurrent
        # reconnects (the rescan loop and a request) would leave the second
        # waiting for a greeting that never comes.
        lock = self._process_locks.setdefault(name, asyncio.Lock())
        async with lock:
            return await self._process_locked(name, timeout)

    async def _process_locked(self, name: str, timeout: float) -> QemuProcess:
        proc = self._procs.get(name)
        if proc is not None and proc.alive() and proc.qmp.connected:
            return proc
        if proc is not None:
            self._procs.pop(name, None)
            with contextlib.suppress(Exception):
                await proc.close()
        status = self.load_status(name)
        if status is None or status.pid is None:
            # No pid: a job record written before qemu exists (e.g. an
            # incoming migration being prepared) — not ours to clean up.
            raise NoDomain(f"domain '{name}' is not running", name=name)
        mine = DomainStatus.from_dict({**status.to_dict(), "qmp_path": str(self.qmp_socket(name))})
        found = await reconnect(
            mine, timeout=timeout, pidfile=self.pidfile(name), qmp_name=f"{self.agent}:{name}"
        )
        if found is None:
            self.cleanup(name)
            raise NoDomain(f"domain '{name}' is not running (its qemu is gone)", name=name)
        unit = status.extra.get("scope_unit")
        if isinstance(unit, str) and found.scope_unit is None:
            found.scope_unit = unit
        self._procs[name] = found
        return found

    def cached(self, name: str) -> QemuProcess | None:
        """The handle we hold on ``name``, if any (no reconnect)."""
        return self._procs.get(name)

    async def release(self, name: str) -> None:
        """Drop our QMP connection to ``name`` without stopping qemu."""
        proc = self._procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(Exception):
                await proc.close()

    async def kill(self, name: str) -> None:
        """Stop ``name``'s qemu at once and remove its runtime state."""
        try:
            proc = await self.process(name)
        except NoDomain:
            self.cleanup(name)
            return
        except QMPError:
            # The monitor is wedged: kill by pid, but only the very process
            # the status names (same start time), never a reused pid.
            status = self.load_status(name)
            if (
                status is not None
                and status.pid
                and read_start_time(status.pid) == status.start_time
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(status.pid, 9)
            self.cleanup(name)
            return
        await proc.kill()
        self._procs.pop(name, None)
        self.cleanup(name)

    def qemu_tls_dir(self) -> Path:
        """This host's certificate and key as qemu's ``tls-creds-x509`` reads them.

        qemu wants fixed names in one directory (``ca-cert.pem``,
        ``server-cert.pem``, ``client-key.pem``, ...); these are symlinks to
        the files of ``[tls]``, made once per agent in the run directory.

        Raises:
            ConfigError: the host has no ``[tls]`` configuration.
        """
        tls = self.config.tls
        if tls is None:
            raise ConfigError("this host has no [tls] configuration (ca, cert, key)")
        out = self.config.paths.run_dir / f"qemu-tls-{self.agent}"
        out.mkdir(mode=0o700, exist_ok=True)
        links = {"ca-cert.pem": tls.ca}
        for role in ("server", "client"):
            links[f"{role}-cert.pem"] = tls.cert
            links[f"{role}-key.pem"] = tls.key
        for name, target in links.items():
            link = out / name
            if not link.is_symlink() or Path(os.readlink(link)) != target.resolve():
                tmp = out / f".{name}.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(target.resolve())
                tmp.replace(link)
        write_dh_params(out)
        return out

    def cleanup(self, name: str) -> None:
        """Remove a stopped domain's status, live XML, pidfile, sockets and switch ports
        (and its swtpm, and the TPM state of a transient domain, and any
        virtiofsd still there).

        An incoming domain that never ran here also loses the NVRAM file
        its Prepare created (:mod:`ferry.firmware_files`).
        """
        self._procs.pop(name, None)
        status = None
        with contextlib.suppress(StateFileError):
            status = self.load_status(name)
        if status is not None and status.extra.get("switch_ports"):
            removed = detach_switch_ports(self.config, status.extra["switch_ports"],
                                          status.uuid)  # fmt: skip
            if removed:
                log.info("domain %s: removed Open vSwitch ports %s", name, " ".join(removed))
        try:
            live = self.live_definition(name)
            if live is not None and live.tpms:
                self._swtpm_gone(live, status)
        except Exception as exc:  # cleanup goes on: the rest must still be removed
            log.warning("domain %s: cannot clean up its swtpm: %s", name, exc)
        if status is not None and status.extra.get("virtiofsd"):
            kill_recorded(status.extra["virtiofsd"], name=name)
        created = status.extra.get("nvram_created") if status is not None else None
        if status is not None and status.run_state == "incoming" and isinstance(created, str):
            with contextlib.suppress(FileNotFoundError):
                Path(created).unlink()
                log.info("removed the NVRAM file %s created for incoming %s", created, name)
        for path in (
            self.status_path(name),
            self.live_xml_path(name),
            self.pidfile(name),
            self.ports_path(name),
            *(self.qmp_socket(name, agent) for agent in AGENTS),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- disk leases ------------------------------------------------------------

    @staticmethod
    def writable_disks(domain: Domain) -> list[str]:
        """Disks two copies of the VM must never both write: they get a lease."""
        return [
            d.source
            for d in domain.disks
            if d.source and d.device == "disk" and not d.readonly and not d.shareable
        ]

    async def acquire_leases(self, domain: Domain, proc: QemuProcess) -> LeaseRecord | None:
        """Take the leases of ``domain``'s writable disks for its qemu ``proc``.

        The lease holder watches qemu: when qemu exits, the leases go with it.

        Raises:
            LeaseBusy: another VM (on any host) holds one of the disks.
        """
        owner = LeaseOwner(
            host_uuid=self.config.host.uuid,
            host_name=self.config.host.name,
            domain=domain.name,
            domain_uuid=domain.uuid,
        )
        record = await self.leases.acquire(
            owner,
            self.writable_disks(domain),
            guard_pid=proc.pid,
            guard_start_time=proc.start_time,
        )
        status = self.load_status(domain.name)
        if status is not None:
            status.extra["leases"] = record.to_dict() if record else None
            self.save_status(status)
        return record

    async def release_leases(self, name: str) -> None:
        """Give up ``name``'s leases (its qemu keeps running, paused)."""
        status = self.load_status(name)
        if status is None or not status.extra.get("leases"):
            return
        record = LeaseRecord.from_dict(status.extra["leases"])
        await self.leases.release(record)
        status.extra["leases"] = None
        self.save_status(status)

    async def reconnect_all(self) -> list[str]:
        """At agent start: reconnect to every running qemu, clean up dead ones.

        Returns the names of domains found running.
        """
        found = []
        for name in self.running_names():
            try:
                await self.process(name)
            except NoDomain:
                log.info("domain %s had exited while the agent was down; cleaned up", name)
                continue
            except (QMPError, StateFileError) as exc:
                log.warning("domain %s: cannot reconnect yet: %s", name, exc)
            found.append(name)
        return found

    async def close(self) -> None:
        """Disconnect from every qemu (they keep running)."""
        for name in list(self._procs):
            await self.release(name)


# -- display ports (module helpers) ---------------------------------------------


def free_port(address: str, lo: int, hi: int, taken: frozenset[int] | set[int] = frozenset()
              ) -> int | None:  # fmt: skip
    """The first port in ``lo..hi`` not in ``taken`` that binds on ``address`` (displays
    here, migration streams in the destination's Prepare)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for port in range(lo, hi + 1):
        if port in taken:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As qemu binds: a port in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                continue
        return port
    return None


def _choose(
    g: Graphics,
    pick: Callable[[int, int, str], int],
    port_range: tuple[int, int],
    ws_range: tuple[int, int],
    *,
    tls: bool,
    domain: str,
) -> GraphicsPorts:
    """The ports one display needs, as libvirt allocates them.

    vnc: a port of 5900 or more (qemu counts displays from 5900) and, for
    ``websocket='-1'``, a websocket port. spice: a plain port unless its
    default mode is secure; a TLS port when the host has spice TLS
    (``[graphics] spice_tls_dir``), which a secure mode requires.
    """
    lo, hi = port_range
    if g.type == "vnc":
        port = pick(max(lo, 5900), hi, "vnc") if g.autoport else g.port
        ws = pick(*ws_range, "vnc websocket") if g.websocket == -1 else None
        return GraphicsPorts(port=port, websocket=ws)
    modes = [dict(o.attrs).get("mode") for o in g.options if o.element == "channel"]
    secure = g.default_mode == "secure" or "secure" in modes
    if secure and not tls:
        raise QemuLaunchError(
            f"domain {domain}: its spice display asks for TLS (mode 'secure'), but this host "
            "has no spice TLS: set [graphics] spice_tls_dir (the x509 directory) in the "
            "agent configuration", domain=domain)
    plain = g.default_mode != "secure" or "insecure" in modes
    port = pick(lo, hi, "spice") if plain else None
    tls_port = pick(lo, hi, "spice TLS") if tls else None
    return GraphicsPorts(port=port, tls_port=tls_port)


def _display(g: Graphics, chosen: GraphicsPorts | None, default_listen: str) -> dict[str, object]:
    """One display as the status file records it."""
    port = chosen.port if chosen is not None and g.autoport else g.port
    tls = chosen.tls_port if chosen is not None and g.autoport else g.tls_port
    ws = chosen.websocket if chosen is not None and chosen.websocket else g.websocket
    return {"type": g.type, "port": port, "tls_port": tls if tls and tls > 0 else None,
            "websocket": ws if ws and ws > 0 else None, "listen": g.listen or default_listen}


def _with_ports(domain: Domain, ports: Mapping[int, GraphicsPorts]) -> Domain:
    """``domain`` with the chosen autoport ports recorded (its live XML)."""
    if not ports:
        return domain
    graphics = list(domain.graphics)
    for i, chosen in ports.items():
        g = graphics[i]
        if g.autoport:
            graphics[i] = dataclasses.replace(
                g, port=chosen.port,
                tls_port=chosen.tls_port if chosen.tls_port is not None else g.tls_port)
    return dataclasses.replace(domain, graphics=tuple(graphics))
