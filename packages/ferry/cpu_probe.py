"""Ask qemu about CPUs: what this host can run, and what a running guest runs.

:func:`host_cpu` starts a short-lived ``qemu -machine none`` with QMP on
its stdio and asks ``query-cpu-model-expansion type=full`` of the
accelerator's own CPU (``host`` under KVM, ``max`` under TCG) and
``query-cpu-definitions`` (each named model's features this host lacks).
The answer is cached per agent process: a host's CPU and its qemu do not
change while the agent runs.

:func:`running_cpu` reads the CPU a running qemu presents to its guest
(every property of qemu's static ``base`` model, read from vCPU 0), which
is what a host-model guest must be given on the destination.

The verdicts are sans-I/O, in :mod:`ferry.domain._cpu`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from ferry.domain import Domain
from ferry.domain._cpu import (
    CpuExpansion,
    CpuSignature,
    HostCpu,
    missing_features,
    passthrough_differences,
)
from ferry.errors import CpuIncompatible, CpuStartError, QemuError
from ferry.protocol.cookie import CpuSection
from ferry.qemu.qmp import QMP

__all__ = ["check_guest_cpu", "host_cpu", "running_cpu", "source_cpu"]

PROBE_TIMEOUT = 30.0

_cache: dict[tuple[str, str], HostCpu] = {}


async def host_cpu(qemu_binary: str, accel: str) -> HostCpu:
    """This host's CPU as qemu sees it under ``accel`` ("kvm" or "tcg"), cached.

    Raises:
        QemuError: qemu could not be run or did not answer.
    """
    key = (qemu_binary, accel)
    found = _cache.get(key)
    if found is None:
        # Two first callers at once both probe; the answers are the same.
        found = _cache[key] = await _probe(qemu_binary, accel)
    return found


async def _probe(qemu_binary: str, accel: str) -> HostCpu:
    model = "host" if accel == "kvm" else "max"
    commands = [
        {"execute": "qmp_capabilities"},
        {"execute": "query-cpu-model-expansion", "id": "expansion",
         "arguments": {"type": "full", "model": {"name": model}}},
        {"execute": "query-cpu-definitions", "id": "definitions"},
        {"execute": "quit"},
    ]
    argv = [qemu_binary, "-machine", f"none,accel={accel}", "-nodefaults", "-display", "none",
            "-qmp", "stdio"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise QemuError(f"cannot run {qemu_binary} to probe the host CPU: {exc}") from exc
    text = "".join(json.dumps(c) + "\n" for c in commands).encode()
    try:
        out, err = await asyncio.wait_for(proc.communicate(text), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QemuError(f"{qemu_binary} did not answer the CPU probe within "
                        f"{PROBE_TIMEOUT:.0f}s") from None
    answers: dict[str, Any] = {}
    for line in out.decode(errors="replace").splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("id") in ("expansion", "definitions"):
            answers[msg["id"]] = msg.get("return")
    expansion, definitions = answers.get("expansion"), answers.get("definitions")
    if not isinstance(expansion, dict) or not isinstance(definitions, list):
        why = err.decode(errors="replace").strip() or "no answer"
        raise QemuError(f"{qemu_binary} (accel {accel}) did not describe the host CPU: {why}")
    return HostCpu.from_qmp(accel, expansion, definitions)


async def running_cpu(qmp: QMP) -> CpuExpansion:
    """The CPU vCPU 0 of a running qemu presents (features that are on, signature).

    Raises:
        QMPError: qemu did not answer.
    """
    cpus = await qmp.execute("query-cpus-fast")
    path = cpus[0]["qom-path"]
    static = await qmp.execute("query-cpu-model-expansion",
                               {"type": "static", "model": {"name": "base"}})
    props: dict[str, Any] = {}
    for name in static["model"].get("props", {}):
        props[name] = await qmp.execute("qom-get", {"path": path, "property": name})
    return CpuExpansion.from_props(props)


async def source_cpu(domain: Domain, qmp: QMP, qemu_binary: str) -> CpuSection | None:
    """Begin: what the destination needs to know of the guest's CPU (None: the XML says it).

    host-model: the CPU the running qemu presents; host-passthrough and
    maximum: this host's CPU signature, which the destination's must equal.

    Raises:
        QemuError: qemu did not answer.
    """
    cpu = domain.cpu
    if cpu is None or cpu.mode == "custom":
        return None
    if cpu.mode == "host-model":
        if cpu.expansion is not None:  # it arrived here by migration and runs that CPU
            expansion = CpuExpansion(cpu.expansion)
        else:
            expansion = await running_cpu(qmp)
        return CpuSection(mode=cpu.mode, expansion=expansion.to_wire())
    host = await host_cpu(qemu_binary, _accel(domain))
    return CpuSection(mode=cpu.mode, signature=host.signature.to_wire())


async def check_guest_cpu(domain: Domain, section: CpuSection | None, qemu_binary: str) -> Domain:
    """Prepare: refuse a guest CPU this host cannot run exactly; return the domain to start.

    A host-model domain comes back with the source's CPU as its
    ``expansion`` (started as exactly that CPU).

    Raises:
        CpuIncompatible: naming the features this host lacks, or how its
            CPU differs from the source's (host-passthrough).
        QemuError: qemu could not describe this host's CPU.
    """
    cpu = domain.cpu
    if cpu is None:
        return domain
    host = await host_cpu(qemu_binary, _accel(domain))
    name = domain.name
    if cpu.mode in ("host-passthrough", "maximum"):
        if section is None or section.signature is None:
            raise CpuIncompatible(
                f"cannot receive domain '{name}': its {cpu.mode} CPU came without the source "
                "host's CPU signature, so this host cannot check that its CPU is identical"
            )
        diffs = passthrough_differences(CpuSignature.from_wire(section.signature),
                                        host.signature)  # fmt: skip
        if diffs:
            raise CpuIncompatible(
                f"cannot receive domain '{name}': its {cpu.mode} CPU needs a host CPU identical "
                f"to the source's, and this host's differs: {'; '.join(diffs)} (use "
                "mode='host-model' or a named model to migrate between unlike hosts)",
                differences=diffs,
            )
        return domain
    expansion = None
    if cpu.mode == "host-model" and section is not None and section.expansion is not None:
        expansion = CpuExpansion.from_props(section.expansion)
    missing, problem = missing_features(cpu, host, expansion)
    if problem is not None:
        raise CpuIncompatible(f"cannot receive domain '{name}': {problem}")
    if missing:
        what = f"CPU model {cpu.model or 'qemu64'!r}" if cpu.mode == "custom" else \
            "the source's host-model CPU"
        raise CpuIncompatible(
            f"cannot receive domain '{name}': this host's CPU ({host.accel}) lacks "
            f"{len(missing)} feature(s) of {what}: {', '.join(missing)}",
            missing=missing,
        )
    if expansion is not None:
        return dataclasses.replace(
            domain, cpu=dataclasses.replace(cpu, expansion=expansion.props))
    return domain


async def check_start_cpu(domain: Domain, qemu_binary: str) -> None:
    """Start: refuse a named CPU model this host cannot run exactly (libvirt's ``check='partial'``).

    qemu's ``enforce`` does the same where Ferry can pass it; a model with a
    ``policy='force'`` feature cannot have it (a forced feature is on even if
    the host lacks it), so the start would otherwise run a CPU with features
    silently dropped, which no destination could then match.
    ``check='none'`` (and a CPU without a model) skips it, as in libvirt.

    Raises:
        CpuStartError: naming the model and the features this host lacks.
        QemuError: qemu could not describe this host's CPU.
    """
    cpu = domain.cpu
    if cpu is None or cpu.mode != "custom" or cpu.model is None or cpu.check == "none":
        return
    host = await host_cpu(qemu_binary, _accel(domain))
    missing, problem = missing_features(cpu, host)
    if problem is not None:
        raise CpuStartError(f"cannot start domain '{domain.name}': {problem}")
    if missing:
        raise CpuStartError(
            f"cannot start domain '{domain.name}': this host's CPU ({host.accel}) lacks "
            f"{len(missing)} feature(s) of CPU model {cpu.model!r}: {', '.join(missing)} "
            "(choose a model this host runs, mode='host-model', or check='none' to let qemu "
            "drop what is missing)", missing=missing)


def _accel(domain: Domain) -> str:
    return "kvm" if domain.virt_type == "kvm" else "tcg"
