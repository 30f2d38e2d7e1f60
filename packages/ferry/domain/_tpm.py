"""``<tpm>``: a TPM that ``swtpm`` emulates (libvirt's ``backend type='emulator'``).

What virt-install ``--tpm emulator`` and virt-manager write is accepted:
``<tpm model='tpm-crb|tpm-tis'><backend type='emulator' version='2.0'/></tpm>``
(TPM 1.2 too, on tpm-tis only: the CRB interface is TPM 2.0's), with
``persistent_state`` and ``<active_pcr_banks>``. Refused, with the reason:

* ``backend type='passthrough'`` (the host's ``/dev/tpm0``): a host TPM holds
  this machine's identity; it can neither be shared with a guest safely
  here nor ever follow the guest to another host.
* ``type='external'`` (a swtpm someone else runs): Ferry must start and stop
  the emulator with qemu to move its state with a migration.
* ``<encryption secret=…>``: Ferry has no secret store to hand swtpm a key.
* a second ``<tpm>``: x86 guests have one.

The host side (state directory, ``swtpm`` process) is :mod:`ferry.swtpm`.
"""

from __future__ import annotations

from typing import Any, cast

from lxml import etree

from ferry.domain._checks import fail
from ferry.domain._context import Ctx, DeviceEnv, Skip
from ferry.domain._values import all_of, elements, enum, one, yes_no
from ferry.domain.model import Tpm
from ferry.errors import XMLUnsupported

__all__ = ["PCR_BANKS", "TPM_MODELS", "parse_tpm"]

_TPM = "domain/devices/tpm"
#: ``<tpm model=…>`` Ferry emulates (x86).
TPM_MODELS = ("tpm-tis", "tpm-crb")
#: ``<active_pcr_banks>`` children (swtpm_setup ``--pcr-banks``).
PCR_BANKS = ("sha1", "sha256", "sha384", "sha512")


def parse_tpm(ctx: Ctx, el: etree._Element, env: DeviceEnv) -> Tpm:
    """A ``<tpm>`` with an emulator backend (see the module docstring)."""
    loc = ctx.loc(el, _TPM)
    mark = ctx.count
    if env.index > 0:
        ctx.report(loc, "a domain has at most one <tpm>", kind="conflict", hint="keep one <tpm>")
    model = ctx.guard(enum, el, "model", loc, TPM_MODELS, default="tpm-tis", what="tpm model")
    be = one(ctx, el, "backend", loc)
    if be is None:
        raise fail(
            loc, "<tpm> needs a <backend>", hint="add <backend type='emulator' version='2.0'/>"
        )
    bloc = ctx.loc(be, f"{_TPM}/backend")
    btype = be.get("type")
    if btype == "passthrough":
        ctx.report(
            bloc,
            "tpm backend 'passthrough' is not supported: the host's TPM cannot "
            "follow the guest to another host, and Ferry only runs guests it can "
            "migrate",
            cls=XMLUnsupported,
            hint="use <backend type='emulator' version='2.0'/> (swtpm)",
        )
    elif btype is None:
        ctx.report(bloc, "<backend> needs a type", hint="add type='emulator'")
    else:
        ctx.guard(enum, be, "type", bloc, ("emulator",), what="tpm backend")
    version = ctx.guard(enum, be, "version", bloc, ("1.2", "2.0"), what="tpm version")
    if version == "1.2" and model == "tpm-crb":
        ctx.report(
            bloc,
            "a tpm-crb is a TPM 2.0 interface; it cannot carry a TPM 1.2",
            kind="conflict",
            hint="use version='2.0', or model='tpm-tis'",
        )
    persistent = ctx.guard(yes_no, be, "persistent_state", bloc)
    banks: list[str] = []
    pcr = one(ctx, be, "active_pcr_banks", bloc)
    if pcr is not None:
        ploc = ctx.loc(pcr, f"{_TPM}/backend/active_pcr_banks")
        for bank in elements(pcr):
            name = str(bank.tag)
            if name in banks:
                ctx.report(ploc, f"PCR bank {name} is listed twice", hint=f"keep one <{name}/>")
            banks.append(name)
        if version == "1.2":
            ctx.report(
                ploc,
                "a TPM 1.2 has no PCR banks to choose",
                kind="conflict",
                hint="remove <active_pcr_banks>",
            )
    for enc in all_of(be, "encryption"):
        ctx.report(
            ctx.loc(enc, f"{_TPM}/backend/encryption"),
            "an encrypted TPM state is not supported: Ferry has no secret store to give "
            "swtpm the key",
            cls=XMLUnsupported,
            hint="remove <encryption> (the state directory is 0700, root only)",
        )
    if ctx.count != mark or model is None:
        raise Skip()
    return Tpm(
        model=cast(Any, model),
        version=cast(Any, version),
        persistent_state=persistent,
        pcr_banks=tuple(banks),
    )
