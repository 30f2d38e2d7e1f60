"""The migration cookie: feature sections passed between the five phases.

Like libvirt's ``qemuMigrationCookie``, a cookie is a map of named sections
plus the names of the sections the receiver must understand. On the wire it is
one msgpack map::

    {"identity": {...}, "graphics": {...}, ..., "mandatory": ["lockstate"]}

A receiver drops optional sections it does not know and refuses a cookie whose
``mandatory`` list names one it does not know, so a newer source can add
information without breaking an older destination, and can still insist when
ignoring the information would be unsafe (lock state, for instance).

The known sections each have a frozen dataclass (:class:`Identity`,
:class:`Graphics`, :class:`LockState`, :class:`Persistent`,
:class:`Statistics`, :class:`Snapshots`) with a :class:`Cookie` accessor
property and a ``with_...`` builder.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import msgpack

from ferry.errors import CookieError, CookieTooLarge

from .fields import FieldSpec, check_fields, check_value, short_repr
from .framing import decode_body

__all__ = [
    "KNOWN_SECTIONS",
    "MAX_COOKIE",
    "Cookie",
    "CpuSection",
    "Graphics",
    "Identity",
    "LockState",
    "Nbd",
    "Persistent",
    "Snapshots",
    "Statistics",
    "StorageCopy",
]

MAX_COOKIE = 16 * 1024
KNOWN_SECTIONS: frozenset[str] = frozenset(
    {"identity", "graphics", "lockstate", "persistent", "statistics", "snapshots", "storage",
     "nbd", "cpu"}
)

_MANDATORY_KEY = "mandatory"
_SECTION_NAME = FieldSpec(str, min_len=1, max_len=64)
_MANDATORY_SPEC = FieldSpec(list, max_len=64, items=_SECTION_NAME)
_SHORT = FieldSpec(str, required=True, min_len=1, max_len=255)
_PORT = FieldSpec(int, required=True, ge=0, le=65535)


@dataclass(frozen=True)
class Identity:
    """Who is migrating: the domain, the host it comes from, and the migration's id."""

    SECTION: ClassVar[str] = "identity"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "name": FieldSpec(str, required=True, min_len=1, max_len=200),
        "uuid": FieldSpec(str, required=True, min_len=1, max_len=64),
        "hostname": _SHORT,
        "host_uuid": FieldSpec(str, required=True, min_len=1, max_len=128),
        "migration_id": FieldSpec(str, required=True, min_len=1, max_len=200),
    }

    name: str
    uuid: str
    hostname: str
    host_uuid: str
    migration_id: str

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {
            "name": self.name,
            "uuid": self.uuid,
            "hostname": self.hostname,
            "host_uuid": self.host_uuid,
            "migration_id": self.migration_id,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Identity:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class Graphics:
    """Where the destination's display listens, so clients can be pointed there."""

    SECTION: ClassVar[str] = "graphics"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "type": FieldSpec(str, required=True, min_len=1, max_len=32),
        "port": _PORT,
        "tls_port": FieldSpec(int, nullable=True, ge=0, le=65535),
        "listen": FieldSpec(str, nullable=True, max_len=255),
    }

    type: str
    port: int
    tls_port: int | None = None
    listen: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {
            "type": self.type,
            "port": self.port,
            "tls_port": self.tls_port,
            "listen": self.listen,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Graphics:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class LockState:
    """The lock manager's view of the domain's leases, handed over to the destination."""

    SECTION: ClassVar[str] = "lockstate"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "driver": FieldSpec(str, required=True, min_len=1, max_len=64),
        "leases": FieldSpec(list, default=[], max_len=256, items=FieldSpec(str, max_len=1024)),
    }

    driver: str
    leases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "leases", tuple(self.leases))

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {"driver": self.driver, "leases": list(self.leases)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> LockState:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class Persistent:
    """The persistent definition to store on the destination (PERSIST_DEST)."""

    SECTION: ClassVar[str] = "persistent"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "xml": FieldSpec(str, required=True, min_len=1),
    }

    xml: str

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {"xml": self.xml}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Persistent:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class Statistics:
    """Counters of the finished transfer (bytes, downtime, ...): any name, any number."""

    SECTION: ClassVar[str] = "statistics"

    values: Mapping[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", dict(self.values))

    def to_wire(self) -> dict[str, Any]:
        """Return the section map (the counters themselves)."""
        return dict(self.values)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Statistics:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`
        for a name that is not a string or a value that is not a finite number.
        """
        values: dict[str, int | float] = {}
        for key, value in data.items():
            if not isinstance(key, str):
                raise CookieError(
                    "cookie section 'statistics': names must be strings", section="statistics"
                )
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise CookieError(
                    f"cookie section 'statistics': field {short_repr(key)} must be a number",
                    section="statistics",
                    field=key,
                )
            values[key] = value
        return cls(values)


@dataclass(frozen=True)
class Snapshots:
    """Names of the domain's snapshot metadata, recreated on the destination."""

    SECTION: ClassVar[str] = "snapshots"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "names": FieldSpec(
            list, required=True, max_len=4096, items=FieldSpec(str, min_len=1, max_len=200)
        ),
    }

    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {"names": list(self.names)}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Snapshots:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class StorageCopy:
    """Begin → Prepare: the disks the destination creates and exports (``--copy-storage-*``).

    Each disk is :meth:`ferry.storage_copy.DiskCopy.to_wire`; the destination
    checks every field (:meth:`~ferry.storage_copy.DiskCopy.from_wire`) before
    it creates anything. Sent mandatory: a destination that cannot copy
    storage refuses the migration instead of starting without the disks.
    """

    SECTION: ClassVar[str] = "storage"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "mode": FieldSpec(str, required=True, choices=frozenset({"all", "inc"})),
        "disks": FieldSpec(list, required=True, min_len=1, max_len=64, items=FieldSpec(dict)),
        #: The source's config allows the NBD stream without TLS
        #: (``[tls] allow_plaintext_nbd``); plaintext only if the destination's does too.
        "plaintext_ok": FieldSpec(bool, default=False),
    }

    mode: str
    disks: tuple[Mapping[str, Any], ...]
    plaintext_ok: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "disks", tuple(self.disks))

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {"mode": self.mode, "disks": [dict(d) for d in self.disks],
                "plaintext_ok": self.plaintext_ok}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> StorageCopy:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


@dataclass(frozen=True)
class Nbd:
    """Prepare → Perform: where the destination's NBD server takes the disks' mirrors.

    ``transport`` "tcp": the source's qemu connects to ``host:port``, with
    TLS checking ``tls_hostname`` unless ``tls`` is false (both hosts'
    ``[tls] allow_plaintext_nbd``). "tunnel" (``--tunnelled``): each disk's
    NBD connection is one more channel of the migration's tunnel, so there
    is no address here and qemu's own TLS is off (the tunnel encrypts).
    """

    SECTION: ClassVar[str] = "nbd"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "transport": FieldSpec(str, default="tcp", choices=frozenset({"tcp", "tunnel"})),
        "host": FieldSpec(str, nullable=True, min_len=1, max_len=255),
        "port": FieldSpec(int, nullable=True, ge=1, le=65535),
        #: The server's certificate name the source checks.
        "tls_hostname": FieldSpec(str, nullable=True, min_len=1, max_len=255),
        "tls": FieldSpec(bool, default=True),
        #: "tunnel": the first tunnel channel index of the disks (channel
        #: ``first_channel + i`` carries disk ``i`` of the plan).
        "first_channel": FieldSpec(int, nullable=True, ge=1, le=255),
    }

    host: str | None = None
    port: int | None = None
    tls_hostname: str | None = None
    transport: str = "tcp"
    tls: bool = True
    first_channel: int | None = None

    def __post_init__(self) -> None:
        if self.transport == "tcp" and (self.host is None or self.port is None
                                        or (self.tls and self.tls_hostname is None)):
            raise CookieError("cookie section 'nbd': a tcp transport needs host, port and "
                              "(with TLS) tls_hostname", section=self.SECTION)
        if self.transport == "tunnel" and self.first_channel is None:
            raise CookieError("cookie section 'nbd': a tunnel transport needs first_channel",
                              section=self.SECTION)

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        data: dict[str, Any] = {"transport": self.transport, "tls": self.tls}
        for key in ("host", "port", "tls_hostname", "first_channel"):
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Nbd:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        return cls(**_check(cls.SECTION, cls.SPECS, data))


_PROP_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class CpuSection:
    """The guest CPU the destination must give (Begin → Prepare).

    ``expansion`` (host-model): the CPU the source's qemu runs, as
    properties of qemu's ``base`` model (features that are on, and the
    vendor/family/model/stepping/model-id/levels). ``signature``
    (host-passthrough): the source host's CPU, which the destination's must
    equal. Property names go into qemu's ``-cpu`` option, so they are
    checked here: lower-case letters, digits, ``.``, ``_``, ``-``.
    """

    SECTION: ClassVar[str] = "cpu"
    SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "mode": FieldSpec(str, required=True, min_len=1, max_len=32),
        "expansion": FieldSpec(dict, nullable=True),
        "signature": FieldSpec(dict, nullable=True),
    }

    mode: str
    expansion: Mapping[str, bool | int | str] | None = None
    signature: Mapping[str, Any] | None = None

    def to_wire(self) -> dict[str, Any]:
        """Return the section map."""
        return {
            "mode": self.mode,
            "expansion": None if self.expansion is None else dict(self.expansion),
            "signature": None if self.signature is None else dict(self.signature),
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> CpuSection:
        """Build from a section map; raises :class:`~ferry.errors.CookieError`."""
        fields = _check(cls.SECTION, cls.SPECS, data)
        expansion = fields["expansion"]
        if expansion is not None:
            if len(expansion) > 1024:
                raise CookieError("cookie section 'cpu': too many CPU properties", section="cpu")
            for key, value in expansion.items():
                ok = isinstance(value, bool | int) or (
                    isinstance(value, str) and len(value) <= 64 and value.isprintable())
                if not isinstance(key, str) or not _PROP_NAME.fullmatch(key) or not ok:
                    raise CookieError(
                        f"cookie section 'cpu': bad CPU property {short_repr(key)}",
                        section="cpu", field=str(key)[:64],
                    )
        signature = fields["signature"]
        if signature is not None:
            check_fields("cookie section 'cpu' signature", _SIGNATURE_SPECS, signature,
                         CookieError, details={"section": "cpu"})
        return cls(mode=fields["mode"], expansion=expansion, signature=signature)


_SIGNATURE_SPECS: Mapping[str, FieldSpec] = {
    "vendor": FieldSpec(str, required=True, max_len=64),
    "family": FieldSpec(int, required=True, ge=0, le=1 << 16),
    "model": FieldSpec(int, required=True, ge=0, le=1 << 16),
    "stepping": FieldSpec(int, required=True, ge=0, le=1 << 16),
    "features": FieldSpec(list, default=[], max_len=1024,
                          items=FieldSpec(str, min_len=1, max_len=64)),
}


def _check(section: str, specs: Mapping[str, FieldSpec], data: Mapping[str, Any]) -> dict[str, Any]:
    return check_fields(
        f"cookie section {section!r}", specs, data, CookieError, details={"section": section}
    )


_SECTION_TYPES: dict[str, Any] = {
    cls.SECTION: cls for cls in (Identity, Graphics, LockState, Persistent, Statistics, Snapshots,
                                 StorageCopy, Nbd, CpuSection)
}

_S = TypeVar("_S", Identity, Graphics, LockState, Persistent, Statistics, Snapshots,
             StorageCopy, Nbd, CpuSection)


@dataclass
class Cookie:
    """Feature sections (name → map) plus the names the receiver must understand.

    Build one with the ``with_...`` methods (each returns a new cookie) and
    read it with the accessor properties, which return None for an absent
    section.
    """

    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    mandatory: frozenset[str] = frozenset()

    # -- codec -----------------------------------------------------------

    def encode(self) -> bytes:
        """Return the cookie's msgpack bytes (sections in name order).

        Raises :class:`~ferry.errors.CookieError` for a malformed section, a
        section called "mandatory", or a mandatory name with no section, and
        :class:`~ferry.errors.CookieTooLarge` above :data:`MAX_COOKIE` bytes.
        """
        wire: dict[str, Any] = {}
        for name in sorted(self.sections):
            check_value("cookie", "section name", _SECTION_NAME, name, CookieError)
            if name == _MANDATORY_KEY:
                raise CookieError("cookie: a section cannot be called 'mandatory'")
            data = self.sections[name]
            _check_section(name, data)
            wire[name] = dict(data)
        absent = self.mandatory - self.sections.keys()
        if absent:
            names = ", ".join(repr(n) for n in sorted(absent))
            raise CookieError(f"cookie: mandatory sections missing: {names}")
        wire[_MANDATORY_KEY] = sorted(self.mandatory)
        encoded = msgpack.packb(wire, use_bin_type=True)
        if len(encoded) > MAX_COOKIE:
            raise CookieTooLarge(
                f"cookie of {len(encoded)} bytes exceeds the limit of {MAX_COOKIE} bytes",
                size=len(encoded),
                limit=MAX_COOKIE,
            )
        return encoded

    @classmethod
    def decode(cls, data: bytes, *, known: frozenset[str] = KNOWN_SECTIONS) -> Cookie:
        """Rebuild a cookie from bytes received from the peer.

        Optional sections not in ``known`` are dropped. Raises
        :class:`~ferry.errors.CookieTooLarge` (checked before decoding) above
        :data:`MAX_COOKIE` bytes, and :class:`~ferry.errors.CookieError` for
        bytes that are not one msgpack map, a malformed known section (naming
        it), a ``mandatory`` name not in ``known`` (naming it), or a mandatory
        section that is absent.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise CookieError(f"cookie must be bytes, not {type(data).__name__}")
        if len(data) > MAX_COOKIE:
            raise CookieTooLarge(
                f"cookie of {len(data)} bytes exceeds the limit of {MAX_COOKIE} bytes",
                size=len(data),
                limit=MAX_COOKIE,
            )
        obj = decode_body(bytes(data), error=CookieError, what="cookie")
        mandatory = check_value(
            "cookie", _MANDATORY_KEY, _MANDATORY_SPEC, obj.pop(_MANDATORY_KEY, []), CookieError
        )
        for name in mandatory:
            if name not in known:
                raise CookieError(
                    f"cookie: mandatory section {short_repr(name)} is not supported here",
                    section=name,
                )
        sections: dict[str, dict[str, Any]] = {}
        for name, section in obj.items():
            if name not in known:
                continue
            _check_section(name, section)
            sections[name] = section
        for name in mandatory:
            if name not in sections:
                # Our encoder never writes this; accepting it would make a cookie
                # that cannot be re-encoded.
                raise CookieError(f"cookie: mandatory section {name!r} is absent", section=name)
        return cls(sections=sections, mandatory=frozenset(mandatory))

    # -- generic builders ------------------------------------------------

    def with_section(
        self, name: str, data: Mapping[str, Any], *, mandatory: bool = False
    ) -> Cookie:
        """Return a copy with section ``name`` set to ``data`` (and marked mandatory if asked).

        Raises :class:`~ferry.errors.CookieError` if ``data`` is not a valid
        section of that name.
        """
        check_value("cookie", "section name", _SECTION_NAME, name, CookieError)
        if name == _MANDATORY_KEY:
            raise CookieError("cookie: a section cannot be called 'mandatory'")
        _check_section(name, data)
        sections = dict(self.sections)
        sections[name] = dict(data)
        marked = self.mandatory | {name} if mandatory else self.mandatory - {name}
        return Cookie(sections=sections, mandatory=marked)

    def without(self, names: Iterable[str]) -> Cookie:
        """Return a copy without the named sections (nor their mandatory marks)."""
        drop = frozenset(names)
        return Cookie(
            sections={k: v for k, v in self.sections.items() if k not in drop},
            mandatory=self.mandatory - drop,
        )

    def _get(self, cls: type[_S]) -> _S | None:
        raw = self.sections.get(cls.SECTION)
        if raw is None:
            return None
        section: _S = cls.from_wire(raw)
        return section

    # -- typed accessors and builders -------------------------------------

    @property
    def identity(self) -> Identity | None:
        """The identity section, or None; CookieError if it was set malformed."""
        return self._get(Identity)

    @property
    def graphics(self) -> Graphics | None:
        """The graphics section, or None; CookieError if it was set malformed."""
        return self._get(Graphics)

    @property
    def lockstate(self) -> LockState | None:
        """The lock state section, or None; CookieError if it was set malformed."""
        return self._get(LockState)

    @property
    def persistent(self) -> Persistent | None:
        """The persistent definition section, or None; CookieError if it was set malformed."""
        return self._get(Persistent)

    @property
    def statistics(self) -> Statistics | None:
        """The statistics section, or None; CookieError if it was set malformed."""
        return self._get(Statistics)

    @property
    def snapshots(self) -> Snapshots | None:
        """The snapshots section, or None; CookieError if it was set malformed."""
        return self._get(Snapshots)

    @property
    def storage(self) -> StorageCopy | None:
        """The storage-copy plan, or None; CookieError if it was set malformed."""
        return self._get(StorageCopy)

    @property
    def nbd(self) -> Nbd | None:
        """The destination's NBD server, or None; CookieError if it was set malformed."""
        return self._get(Nbd)

    @property
    def cpu(self) -> CpuSection | None:
        """The guest CPU section, or None; CookieError if it was set malformed."""
        return self._get(CpuSection)

    def with_cpu(self, cpu: CpuSection, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``cpu``; raises CookieError if it is malformed."""
        return self.with_section(CpuSection.SECTION, cpu.to_wire(), mandatory=mandatory)

    def with_identity(self, identity: Identity, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``identity``; raises CookieError if it is malformed."""
        return self.with_section(Identity.SECTION, identity.to_wire(), mandatory=mandatory)

    def with_graphics(self, graphics: Graphics, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``graphics``; raises CookieError if it is malformed."""
        return self.with_section(Graphics.SECTION, graphics.to_wire(), mandatory=mandatory)

    def with_lockstate(self, lockstate: LockState, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``lockstate``; raises CookieError if it is malformed."""
        return self.with_section(LockState.SECTION, lockstate.to_wire(), mandatory=mandatory)

    def with_persistent(self, persistent: Persistent, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``persistent``; raises CookieError if it is malformed."""
        return self.with_section(Persistent.SECTION, persistent.to_wire(), mandatory=mandatory)

    def with_statistics(self, statistics: Statistics, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``statistics``; raises CookieError if it is malformed."""
        return self.with_section(Statistics.SECTION, statistics.to_wire(), mandatory=mandatory)

    def with_snapshots(self, snapshots: Snapshots, *, mandatory: bool = False) -> Cookie:
        """Return a copy carrying ``snapshots``; raises CookieError if it is malformed."""
        return self.with_section(Snapshots.SECTION, snapshots.to_wire(), mandatory=mandatory)


def _check_section(name: str, data: Any) -> None:
    """Check that ``data`` is a map with string keys and, for a known section, well formed."""
    if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
        raise CookieError(
            f"cookie section {short_repr(name)} must be a map with string keys", section=name
        )
    section_type = _SECTION_TYPES.get(name)
    if section_type is not None:
        section_type.from_wire(data)
