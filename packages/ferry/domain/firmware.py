"""UEFI firmware autoselection from qemu's firmware descriptors (sans I/O).

qemu's ``docs/interop/firmware.json`` describes each installed firmware in a
JSON file (Debian's ``ovmf``: ``/usr/share/qemu/firmware/40-edk2-x86_64-
secure-enrolled.json``, ``50-…-secure.json``, ``60-edk2-x86_64.json``):
its interface (uefi, bios), how it is mapped (``flash``: an executable and
an NVRAM template), the machines it runs on and its features
(``secure-boot``, ``enrolled-keys``, ``requires-smm``, …). libvirt reads them
to turn ``<os firmware='efi'>`` into a loader and an NVRAM template; this
module does the same choice, in libvirt's order (file name order, the first
match wins: on Debian an unconstrained ``firmware='efi'`` gets secure boot
with Microsoft's keys enrolled, as libvirt gives it):

* the interface is ``uefi`` for ``firmware='efi'`` (``bios`` for bios);
* a target has the guest's architecture and a machine glob matching its
  machine type (``q35``/``pc`` are qemu 7.2's aliases ``pc-q35-7.2`` and
  ``pc-i440fx-7.2``);
* the mapping is ``flash`` in split mode (code + NVRAM template): the only
  kind Ferry runs (``memory`` is for SEV, ``kernel`` for direct boot);
* a ``<loader>`` path or ``<nvram template>`` the XML states must be the
  descriptor's; ``<loader secure='yes|no'>`` wants (or refuses) secure boot;
* each ``<firmware><feature enabled='yes|no' name=…/>`` must be present
  (or absent) in the descriptor's features;
* ``requires-smm`` firmware is skipped when ``<smm state='off'/>``.

:func:`resolve_firmware` returns the domain with the choice written in:
``<loader readonly='yes' type='pflash' secure=…>`` with the executable,
``<nvram template=…>``, and ``<smm state='on'/>`` for firmware that needs it
(libvirt's live XML shows the same). A migration carries that resolved
definition, so the destination maps the very same firmware files.

Reading the files (which directories, ``/etc`` overriding ``/usr/share``)
is :mod:`ferry.firmware_files`'s job; here JSON goes in and a choice comes out.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ferry.domain.model import OS, Domain, Loader, Nvram
from ferry.errors import XMLUnsupported

__all__ = [
    "FirmwareDescriptor",
    "choose_firmware",
    "descriptor_paths",
    "loader_type",
    "needs_nvram",
    "parse_descriptor",
    "resolve_firmware",
]

#: qemu 7.2's machine type aliases, which descriptors match by glob.
_MACHINE_ALIASES = {"q35": "pc-q35-7.2", "pc": "pc-i440fx-7.2"}
#: libvirt's ``<type arch>`` → the descriptor's architecture.
_ARCH = {"x86_64": "x86_64", "i686": "i386"}


@dataclass(frozen=True)
class FirmwareDescriptor:
    """One firmware descriptor file, the parts a choice needs."""

    #: The file name (``60-edk2-x86_64.json``): the order of preference.
    name: str
    interfaces: tuple[str, ...]
    #: ``flash``, ``memory`` or ``kernel``.
    device: str
    #: flash: ``split`` (code + NVRAM template), ``combined`` or ``stateless``.
    mode: str = "split"
    executable: str | None = None
    nvram_template: str | None = None
    #: (architecture, machine globs) per target.
    targets: tuple[tuple[str, tuple[str, ...]], ...] = ()
    features: frozenset[str] = frozenset()


def parse_descriptor(name: str, data: bytes | str) -> FirmwareDescriptor:
    """Read one descriptor (qemu's firmware.json schema).

    :raises ValueError: not JSON, or not the shape the schema gives.
    """
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"firmware descriptor {name}: not JSON: {exc}") from None

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ValueError(f"firmware descriptor {name}: {what}")

    need(isinstance(doc, dict), "not a JSON object")
    mapping = doc.get("mapping")
    need(isinstance(mapping, dict), "no mapping")
    device = mapping.get("device")
    need(isinstance(device, str), "mapping has no device")

    def filename(key: str) -> str | None:
        part = mapping.get(key)
        if part is None:
            return None
        need(isinstance(part, dict) and isinstance(part.get("filename"), str),
             f"mapping {key} has no filename")
        return str(part["filename"])

    targets = []
    for t in doc.get("targets") or []:
        need(isinstance(t, dict) and isinstance(t.get("architecture"), str)
             and isinstance(t.get("machines"), list)
             and all(isinstance(m, str) for m in t["machines"]), "a target is malformed")
        targets.append((str(t["architecture"]), tuple(str(m) for m in t["machines"])))
    ifaces = doc.get("interface-types") or []
    features = doc.get("features") or []
    need(isinstance(ifaces, list) and all(isinstance(i, str) for i in ifaces),
         "interface-types is not a list of strings")
    need(isinstance(features, list) and all(isinstance(f, str) for f in features),
         "features is not a list of strings")
    mode = mapping.get("mode", "split")
    need(isinstance(mode, str), "mapping mode is not a string")
    return FirmwareDescriptor(
        name=name, interfaces=tuple(ifaces), device=device, mode=mode,
        executable=filename("executable") if device == "flash" else filename("filename"),
        nvram_template=filename("nvram-template"), targets=tuple(targets),
        features=frozenset(features),
    )


def loader_type(os_: OS) -> str | None:
    """How the loader is mapped: its ``type``, else pflash for UEFI (firmware='efi'
    or an ``<nvram>``) and rom otherwise; None without a loader."""
    ld = os_.loader
    if ld is not None and ld.type is not None:
        return ld.type
    if os_.firmware == "efi" or os_.nvram is not None:
        return "pflash"
    return "rom" if ld is not None else None


def needs_nvram(os_: OS) -> bool:
    """True when the guest's firmware keeps its variables in a per-VM NVRAM file.

    That is UEFI chosen by ``firmware='efi'`` (every split flash firmware),
    a read-only pflash loader, or an explicit ``<nvram>``.
    """
    if loader_type(os_) != "pflash":
        return False
    return os_.nvram is not None or os_.firmware == "efi" or (
        os_.loader is not None and os_.loader.readonly is not False)


def _machine(machine: str) -> str:
    return _MACHINE_ALIASES.get(machine, machine)


def _why_not(os_: OS, smm: bool | None, d: FirmwareDescriptor) -> str | None:
    """Why ``d`` does not fit the guest (None: it fits)."""
    want = "bios" if os_.firmware == "bios" else "uefi"
    if want not in d.interfaces:
        return f"interface is not {want}"
    arch = _ARCH.get(os_.arch, os_.arch)
    machine = _machine(os_.machine)
    if not any(a == arch and any(fnmatch.fnmatchcase(machine, g) for g in globs)
               for a, globs in d.targets):
        return f"not for {arch} {machine}"
    if want == "uefi" and (d.device != "flash" or d.mode != "split"
                           or d.executable is None or d.nvram_template is None):
        return "not a split flash image with an NVRAM template"
    ld = os_.loader
    if ld is not None and ld.path is not None and ld.path != d.executable:
        return f"executable is not {ld.path}"
    tpl = os_.nvram.template if os_.nvram is not None else None
    if tpl is not None and tpl != d.nvram_template:
        return f"NVRAM template is not {tpl}"
    secure = "secure-boot" in d.features
    if ld is not None and ld.secure is not None and ld.secure != secure:
        return "secure boot " + ("missing" if ld.secure else "present")
    for name, enabled in os_.firmware_features:
        if (name in d.features) != enabled:
            return f"feature {name} " + ("missing" if enabled else "present")
    if smm is False and "requires-smm" in d.features:
        return "requires SMM, which <smm state='off'/> disables"
    return None


def choose_firmware(
    os_: OS, smm: bool | None, descriptors: Iterable[FirmwareDescriptor]
) -> FirmwareDescriptor:
    """The first descriptor (by file name) that fits ``os_`` (module docstring).

    ``smm`` is the domain's ``<features><smm state>`` (None: not stated).

    :raises XMLUnsupported: none fits; the message says why each was passed over.
    """
    ordered = sorted(descriptors, key=lambda d: d.name)
    reasons = []
    for d in ordered:
        why = _why_not(os_, smm, d)
        if why is None:
            return d
        reasons.append(f"{d.name}: {why}")
    wanted = [f"{n}={'yes' if e else 'no'}" for n, e in os_.firmware_features]
    if os_.loader is not None and os_.loader.path:
        wanted.append(f"loader {os_.loader.path}")
    raise XMLUnsupported(
        f"no installed firmware fits <os firmware='{os_.firmware or 'efi'}'> "
        f"({', '.join(wanted) or 'no constraints'}; machine {os_.machine}): "
        + ("; ".join(reasons) or "no firmware descriptors found (install the ovmf package)"),
        element="domain/os",
        hint="install the firmware (Debian: ovmf), or name <loader> and <nvram template>",
    )


def resolve_firmware(domain: Domain, descriptors: Sequence[FirmwareDescriptor]) -> Domain:
    """``domain`` with its UEFI firmware chosen (unchanged when it has none to choose).

    ``firmware='efi'`` is resolved by :func:`choose_firmware`; an explicit
    pflash loader without an NVRAM template takes the template of the
    descriptor naming the same executable (as libvirt does). The result
    states the loader (readonly pflash, secure as the firmware is), the
    NVRAM template, and ``smm`` on where the firmware requires it.

    :raises XMLUnsupported: no firmware fits, or no template is known for
        an explicit loader whose NVRAM file does not exist yet.
    """
    os_ = domain.os
    if os_.firmware == "bios" or not needs_nvram(os_):
        return domain
    ld = os_.loader
    nv = os_.nvram or Nvram()
    if os_.firmware != "efi":
        # An explicit loader: only the template may be missing.
        if nv.template is not None:
            return domain
        match = next((d for d in sorted(descriptors, key=lambda d: d.name)
                      if d.executable is not None and ld is not None
                      and d.executable == ld.path and d.nvram_template), None)
        if match is None:
            if nv.path is not None:
                return domain  # an existing file needs no template; a missing one is refused later
            raise XMLUnsupported(
                f"no NVRAM template is known for the loader "
                f"{ld.path if ld is not None else '?'}: no firmware descriptor names it",
                element="domain/os/nvram", hint="add <nvram template='…_VARS.fd'/>")
        return dataclasses.replace(domain, os=dataclasses.replace(
            os_, nvram=dataclasses.replace(nv, template=match.nvram_template)))
    chosen = choose_firmware(os_, domain.features.smm, descriptors)
    smm_needed = "requires-smm" in chosen.features
    loader = Loader(path=chosen.executable, readonly=True,
                    secure=True if smm_needed and "secure-boot" in chosen.features else
                    (ld.secure if ld is not None and ld.secure is not None else False),
                    type="pflash", format=ld.format if ld is not None else None)
    features = domain.features
    if smm_needed and features.smm is None:
        features = dataclasses.replace(features, smm=True)
    return dataclasses.replace(domain, features=features, os=dataclasses.replace(
        os_, loader=loader, nvram=dataclasses.replace(nv, template=chosen.nvram_template)))


def descriptor_paths(descriptors: Iterable[FirmwareDescriptor]) -> frozenset[str]:
    """Every executable and NVRAM template the host's descriptors name.

    These are installed firmware: a loader or template among them is
    allowed without a ``[storage] allowed`` entry.
    """
    out: set[str] = set()
    for d in descriptors:
        out.update(p for p in (d.executable, d.nvram_template) if p)
    return frozenset(out)
