"""Guest CPU against host CPU: what a host lacks to run a guest's CPU exactly.

Sans-I/O: the host's answers (:mod:`ferry.cpu_probe` asks qemu) come in as
plain data, verdicts go out. The rules follow libvirt's QEMU driver:

* ``custom`` (a named model): the model's features this host cannot give
  (qemu's ``query-cpu-definitions`` ``unavailable-features`` for the host's
  accelerator) that the guest does not disable, plus every
  ``policy='require'`` feature the host lacks. Without a ``<model>`` (qemu's
  qemu64) or with ``check='none'`` qemu runs the model without ``enforce``
  on both hosts (what it lacks, it drops): only the required features count.
  ``force`` claims a feature whatever the host has and ``optional`` takes it
  only if present: neither can be missing. ``disable``/``forbid`` remove a
  feature from the need.
* ``host-model``: libvirt turns it into a concrete CPU when the domain
  starts, and the migratable XML carries that CPU. Ferry starts it as
  ``-cpu host`` and, at Begin, reads the CPU the source's qemu actually runs
  (:class:`CpuExpansion`: qemu's static ``base`` model plus the features and
  signature of the running vCPU). The destination needs every feature of it
  and starts exactly that CPU (``-cpu base,…,enforce``).
* ``host-passthrough`` (and ``maximum``): the guest sees the host's own CPU,
  so it may move only to a host whose CPU is identical: same vendor,
  family, model, stepping and feature set (:func:`passthrough_differences`).

Feature names are compared in one spelling (:func:`feature_key`): qemu
knows ``sse4.1``, ``sse4_1`` and ``sse4-1`` as one feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.domain.model import Cpu

__all__ = [
    "SIGNATURE_KEYS",
    "CpuExpansion",
    "CpuSignature",
    "HostCpu",
    "cpu_opts",
    "feature_key",
    "missing_features",
    "passthrough_differences",
]

#: Non-feature properties of a static expansion: the CPU's identity and the
#: CPUID levels qemu must present to be the same CPU.
SIGNATURE_KEYS = ("vendor", "family", "model", "stepping", "model-id", "min-level",
                  "min-xlevel")

#: Properties of a vCPU that are qemu settings, not CPUID features.
_NOT_FEATURES = frozenset({
    "check", "enforce", "migratable", "host-phys-bits", "host-cache-info", "realized",
    "start-powered-off", "x-force-features", "full-cpuid-auto-level", "tcg-cpuid",
    "x-intel-pt-auto-level", "x-migrate-smi-count", "x-vendor-cpuid-only", "l3-cache",
    "legacy-cache", "fill-mtrr-mask", "cpuid-0xb", "kvm-no-smi-migration",
    "kvm-pv-enforce-cpuid", "vmware-cpuid-freq", "x-hv-synic-kvm-only",
})

#: libvirt's spelling → qemu's, where the two differ beyond ``_``/``.``/``-``.
_LIBVIRT_NAMES = {
    "pclmuldq": "pclmulqdq",
    "cmt": "cqm",
    "osxsave": "osxsave",
    "arch-facilities": "arch-capabilities",
}


def feature_key(name: str) -> str:
    """One spelling for a CPU feature: lower case, ``-`` for ``_`` and ``.``."""
    key = name.strip().lower().replace("_", "-").replace(".", "-")
    return _LIBVIRT_NAMES.get(key, key)


def _keys(names: Iterable[str]) -> frozenset[str]:
    return frozenset(feature_key(n) for n in names)


@dataclass(frozen=True)
class CpuSignature:
    """Who a CPU is and what it can do: vendor, family, model, stepping, features."""

    vendor: str
    family: int
    model: int
    stepping: int
    features: frozenset[str] = frozenset()

    def to_wire(self) -> dict[str, Any]:
        """The cookie form (features sorted)."""
        return {"vendor": self.vendor, "family": self.family, "model": self.model,
                "stepping": self.stepping, "features": sorted(self.features)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CpuSignature:
        """From the cookie form (already type-checked by the cookie's field specs)."""
        return cls(vendor=str(data["vendor"]), family=int(data["family"]),
                   model=int(data["model"]), stepping=int(data["stepping"]),
                   features=_keys(data.get("features") or ()))


@dataclass(frozen=True)
class HostCpu:
    """What this host's qemu can run under one accelerator.

    ``features``: the features of the accelerator's own CPU (``host`` under
    KVM, ``max`` under TCG), in :func:`feature_key` spelling.
    ``unavailable``: per named model, the features of it this host lacks
    (``query-cpu-definitions``); a model not in it is unknown to this qemu.
    """

    accel: str
    signature: CpuSignature
    unavailable: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def features(self) -> frozenset[str]:
        """The features this host can give a guest."""
        return self.signature.features

    @classmethod
    def from_qmp(
        cls, accel: str, expansion: Mapping[str, Any], definitions: Iterable[Mapping[str, Any]]
    ) -> HostCpu:
        """From qemu's answers: a full ``query-cpu-model-expansion`` of ``host``
        (or ``max``) and ``query-cpu-definitions``."""
        props = expansion.get("model", {}).get("props", {})
        features = frozenset(feature_key(k) for k, v in props.items()
                             if v is True and feature_key(k) not in _NOT_FEATURES)
        sig = CpuSignature(vendor=str(props.get("vendor", "")), family=_int(props, "family"),
                           model=_int(props, "model"), stepping=_int(props, "stepping"),
                           features=features)
        unavailable = {str(d["name"]): tuple(str(f) for f in d.get("unavailable-features", ()))
                       for d in definitions if "name" in d}
        return cls(accel=accel, signature=sig, unavailable=unavailable)


def _int(props: Mapping[str, Any], key: str) -> int:
    value = props.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class CpuExpansion:
    """A concrete CPU: qemu's static ``base`` model and the properties set on it.

    ``props`` holds the features that are on (``base`` has every feature
    off) and the :data:`SIGNATURE_KEYS`; it is what a host-model guest runs,
    read from the source's running vCPU and started as such on the destination.
    """

    props: tuple[tuple[str, bool | int | str], ...]

    @property
    def features(self) -> frozenset[str]:
        """The features the CPU has, in :func:`feature_key` spelling."""
        return frozenset(feature_key(k) for k, v in self.props
                         if v is True and feature_key(k) not in _NOT_FEATURES)

    def to_wire(self) -> dict[str, Any]:
        """The cookie form: a map of property to value."""
        return dict(self.props)

    @classmethod
    def from_props(cls, props: Mapping[str, Any]) -> CpuExpansion:
        """Keep what defines the CPU: features that are on, and the signature."""
        kept: list[tuple[str, bool | int | str]] = []
        for key in sorted(props):
            value = props[key]
            if key in SIGNATURE_KEYS and isinstance(value, int | str) \
                    and not isinstance(value, bool):
                kept.append((key, value))
            elif value is True and feature_key(key) not in _NOT_FEATURES:
                kept.append((key, True))
        return cls(tuple(kept))


def missing_features(
    cpu: Cpu, host: HostCpu, expansion: CpuExpansion | None = None
) -> tuple[list[str], str | None]:
    """(features this host lacks to run ``cpu`` exactly, a problem that is not a feature).

    ``expansion`` is the concrete CPU a host-model guest runs (from the
    source); for ``custom`` the model and features of ``cpu`` decide. The
    second value names a model this qemu does not know, or a host-model
    CPU that arrived without its expansion. host-passthrough is checked
    by :func:`passthrough_differences` instead (nothing is missing here).
    """
    if cpu.mode in ("host-passthrough", "maximum"):
        return [], None
    if cpu.mode == "host-model":
        if expansion is None:
            return [], ("the host-model CPU came without the CPU the source runs "
                        "(an older source?)")
        return sorted(expansion.features - host.features), None
    model = cpu.model or "qemu64"
    if model not in host.unavailable:
        return [], f"CPU model {model!r} is not known to this host's qemu"
    off = _keys(f.name for f in cpu.features if f.policy in ("disable", "forbid"))
    out: list[str] = []
    # Without a model, or with check='none', qemu ran the model without
    # enforce on the source too (it may lack the same features there): only
    # what the XML requires by name is checked.
    exact = cpu.model is not None and cpu.check != "none"
    for name in host.unavailable[model] if exact else ():
        if feature_key(name) not in off and name not in out:
            out.append(name)
    seen = _keys(out)
    for f in cpu.features:
        key = feature_key(f.name)
        if f.policy == "require" and key not in host.features and key not in seen:
            out.append(f.name)
            seen |= {key}
    return out, None


def passthrough_differences(source: CpuSignature, here: CpuSignature) -> list[str]:
    """How this host's CPU differs from the source's (empty: identical)."""
    out = [f"{what} {a!r} there, {b!r} here" for what, a, b in (
        ("vendor", source.vendor, here.vendor), ("family", source.family, here.family),
        ("model", source.model, here.model), ("stepping", source.stepping, here.stepping),
    ) if a != b]
    lacking = sorted(source.features - here.features)
    extra = sorted(here.features - source.features)
    if lacking:
        out.append("features missing here: " + ", ".join(lacking))
    if extra:
        out.append("features only here: " + ", ".join(extra))
    return out


def cpu_opts(expansion: CpuExpansion) -> list[tuple[str, object]]:
    """The ``-cpu base,…`` options of an expansion (``enforce`` last)."""
    opts: list[tuple[str, object]] = list(expansion.props)
    opts.append(("enforce", True))
    return opts
