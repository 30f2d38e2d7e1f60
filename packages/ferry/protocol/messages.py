"""The messages that travel in frames, as frozen dataclasses.

Every message has ``to_wire()`` (a plain map with a ``type`` key, ready for
:func:`~ferry.protocol.framing.encode_frame`) and is rebuilt from a received
map by :func:`parse_message`. Constructors validate too, so a message built
locally with a bad field fails here rather than on the peer.

Wire shapes::

    hello / welcome  {type, version: [major, minor], host_uuid, hostname, role,
                      features: [str], mandatory: [str]}
    request          {type, id, op, args: {}}
    reply            {type, id, result: {}}           (Reply)
    reply            {type, id|null, error: {code, message, details}}  (ErrorReply)
    event            {type, event, data: {}, id|null}
    tunnel           {type, token}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias, TypeVar

from ferry.errors import FerryError, MessageInvalid, from_wire

from .fields import FieldSpec, check_fields, check_value, short_repr

__all__ = [
    "MAX_REQUEST_ID",
    "PROTOCOL_VERSION",
    "ROLES",
    "ErrorReply",
    "Event",
    "Hello",
    "Message",
    "Reply",
    "Request",
    "Tunnel",
    "Welcome",
    "parse_message",
]

PROTOCOL_VERSION: tuple[int, int] = (1, 0)
ROLES: frozenset[str] = frozenset({"source", "destination", "client", "tunnel"})
TUNNEL_MODES: frozenset[str] = frozenset({"tls", "plain"})
# msgpack's largest signed integer: ids must survive any peer's decoder.
MAX_REQUEST_ID = 2**63 - 1

_ID = FieldSpec(int, required=True, ge=0, le=MAX_REQUEST_ID)
_OPTIONAL_ID = FieldSpec(int, nullable=True, ge=0, le=MAX_REQUEST_ID)
_FEATURE_LIST = FieldSpec(
    list, default=[], max_len=256, items=FieldSpec(str, min_len=1, max_len=64)
)

_GREETING_SPECS: Mapping[str, FieldSpec] = {
    "version": FieldSpec(
        list, required=True, min_len=2, max_len=2, items=FieldSpec(int, ge=0, le=0xFFFF)
    ),
    "host_uuid": FieldSpec(str, required=True, min_len=1, max_len=128),
    "hostname": FieldSpec(str, required=True, min_len=1, max_len=255),
    "role": FieldSpec(str, required=True, choices=ROLES),
    "features": _FEATURE_LIST,
    "mandatory": _FEATURE_LIST,
}

_ERROR_FIELDS: Mapping[str, FieldSpec] = {
    "code": FieldSpec(str, required=True, min_len=1, max_len=64),
    "message": FieldSpec(str, required=True),
    "details": FieldSpec(dict, default={}),
}


def _validate(obj: Any, specs: Mapping[str, FieldSpec]) -> None:
    """Check a locally built message with the same specs the wire uses."""
    for name, spec in specs.items():
        value = getattr(obj, name)
        # Python-side containers are checked in their wire form.
        if isinstance(value, tuple | set | frozenset):
            value = list(value)
        check_value(obj.TYPE, name, spec, value, MessageInvalid)


@dataclass(frozen=True)
class _Greeting:
    TYPE: ClassVar[str]

    version: tuple[int, int]
    host_uuid: str
    hostname: str
    role: str
    features: frozenset[str] = frozenset()
    mandatory: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """Validate and normalise (lists and sets become tuples and frozensets).

        Raises :class:`~ferry.errors.MessageInvalid` naming the bad field, or
        if ``mandatory`` names a feature absent from ``features`` (a side
        cannot require what it does not itself speak).
        """
        _validate(self, _GREETING_SPECS)
        object.__setattr__(self, "version", tuple(self.version))
        object.__setattr__(self, "features", frozenset(self.features))
        object.__setattr__(self, "mandatory", frozenset(self.mandatory))
        extra = self.mandatory - self.features
        if extra:
            names = ", ".join(repr(n) for n in sorted(extra))
            raise MessageInvalid(
                f"{self.TYPE}: field 'mandatory' names features missing from 'features': {names}",
                field="mandatory",
            )

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map (feature lists sorted, so encoding is deterministic)."""
        return {
            "type": self.TYPE,
            "version": list(self.version),
            "host_uuid": self.host_uuid,
            "hostname": self.hostname,
            "role": self.role,
            "features": sorted(self.features),
            "mandatory": sorted(self.mandatory),
        }


@dataclass(frozen=True)
class Hello(_Greeting):
    """First message of a connection, sent by the side that opened it."""

    TYPE: ClassVar[str] = "hello"


@dataclass(frozen=True)
class Welcome(_Greeting):
    """The answer to :class:`Hello`: the responder's own version and features."""

    TYPE: ClassVar[str] = "welcome"


@dataclass(frozen=True)
class Request:
    """Ask the peer to run ``op`` with ``args``; answered by a reply with the same ``id``.

    ``args`` are checked per op by :func:`ferry.protocol.ops.validate_args`,
    not here: an unknown op is the agent's to answer, not a broken envelope.
    """

    TYPE: ClassVar[str] = "request"
    _SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "id": _ID,
        "op": FieldSpec(str, required=True, min_len=1, max_len=64),
        "args": FieldSpec(dict, default={}),
    }

    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.MessageInvalid` naming a bad field."""
        _validate(self, self._SPECS)

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map."""
        return {"type": self.TYPE, "id": self.id, "op": self.op, "args": dict(self.args)}


@dataclass(frozen=True)
class Reply:
    """The successful answer to the request with the same ``id``."""

    TYPE: ClassVar[str] = "reply"
    _SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "id": _ID,
        "result": FieldSpec(dict, required=True),
    }

    id: int
    result: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.MessageInvalid` naming a bad field."""
        _validate(self, self._SPECS)

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map."""
        return {"type": self.TYPE, "id": self.id, "result": dict(self.result)}


def _plain(value: Any, depth: int = 0) -> Any:
    """Return ``value`` reduced to what msgpack encodes; anything else becomes its str.

    Error details are filled by code all over Ferry (paths, enums, exceptions);
    reporting an error must never fail because one detail is not encodable.
    """
    if value is None or isinstance(value, bool | str | bytes | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if depth < 16:
        if isinstance(value, list | tuple):
            return [_plain(v, depth + 1) for v in value]
        if isinstance(value, frozenset | set):
            return sorted((_plain(v, depth + 1) for v in value), key=repr)
        if isinstance(value, Mapping):
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return str(value)


@dataclass(frozen=True)
class ErrorReply:
    """A failed request (``id``), or a connection-level error (``id`` None).

    On the wire it is a ``reply`` carrying ``error {code, message, details}``;
    the receiver gets back the same :class:`~ferry.errors.FerryError` class
    (see :func:`ferry.errors.from_wire`).
    """

    TYPE: ClassVar[str] = "reply"

    id: int | None
    error: FerryError

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.MessageInvalid` for a bad id or a non-Ferry error."""
        check_value(self.TYPE, "id", _OPTIONAL_ID, self.id, MessageInvalid)
        if not isinstance(self.error, FerryError):
            raise MessageInvalid(f"{self.TYPE}: field 'error' must be a FerryError", field="error")

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map; details that msgpack cannot encode are sent as strings."""
        error = self.error.to_wire()
        error["details"] = _plain(error.get("details", {}))
        return {"type": self.TYPE, "id": self.id, "error": error}


@dataclass(frozen=True)
class Event:
    """An unsolicited notice (job progress...); ``id`` names the request it belongs to."""

    TYPE: ClassVar[str] = "event"
    _SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "event": FieldSpec(str, required=True, min_len=1, max_len=64),
        "data": FieldSpec(dict, default={}),
        "id": _OPTIONAL_ID,
    }

    event: str
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.MessageInvalid` naming a bad field."""
        _validate(self, self._SPECS)

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map."""
        return {"type": self.TYPE, "event": self.event, "data": dict(self.data), "id": self.id}


@dataclass(frozen=True)
class Tunnel:
    """Opens a tunnel connection: after this frame the stream carries raw migration bytes."""

    TYPE: ClassVar[str] = "tunnel"
    _SPECS: ClassVar[Mapping[str, FieldSpec]] = {
        "token": FieldSpec(str, required=True, min_len=1, max_len=512),
        "channel": FieldSpec(int, default=0, ge=0, le=255),
        "mode": FieldSpec(str, default="tls", choices=TUNNEL_MODES),
    }

    token: str
    # Which of qemu's connections this is: 0 the main stream, 1.. multifd.
    channel: int = 0
    # "tls": the bytes stay inside TLS; "plain": TLS only authenticates, then
    # both ends unwrap it (allowed only where the operators' configs say so).
    mode: str = "tls"

    def __post_init__(self) -> None:
        """Raises :class:`~ferry.errors.MessageInvalid` for a bad token, channel or mode."""
        _validate(self, self._SPECS)

    def __repr__(self) -> str:
        # The token is a credential: keep it out of logs.
        return "Tunnel(token=<hidden>)"

    def to_wire(self) -> dict[str, Any]:
        """Return the wire map."""
        return {"type": self.TYPE, "token": self.token, "channel": self.channel,
                "mode": self.mode}  # fmt: skip


Message: TypeAlias = Hello | Welcome | Request | Reply | ErrorReply | Event | Tunnel


_G = TypeVar("_G", bound=_Greeting)


def _parse_greeting(cls: type[_G], obj: Mapping[str, Any]) -> _G:
    return cls(**check_fields(cls.TYPE, _GREETING_SPECS, obj, MessageInvalid))


_ERROR_REPLY_SPECS: Mapping[str, FieldSpec] = {
    "id": _OPTIONAL_ID,
    "error": FieldSpec(dict, required=True),
}
# Named "error.code" etc. so a bad field is reported with its full path.
_ERROR_SPECS = {f"error.{name}": spec for name, spec in _ERROR_FIELDS.items()}


def _parse_reply(obj: Mapping[str, Any]) -> Reply | ErrorReply:
    if "error" not in obj:
        return Reply(**check_fields("reply", Reply._SPECS, obj, MessageInvalid))
    if "result" in obj:
        raise MessageInvalid("reply: has both 'result' and 'error'", field="result")
    head = check_fields("reply", _ERROR_REPLY_SPECS, obj, MessageInvalid)
    prefixed = {f"error.{key}": value for key, value in head["error"].items()}
    error = check_fields("reply", _ERROR_SPECS, prefixed, MessageInvalid)
    rebuilt = from_wire({"code": error["error.code"], "message": error["error.message"]})
    # Details are merged after construction: passed as keyword arguments, a
    # peer's detail named "message" or "self" would be a TypeError.
    rebuilt.details.update({str(k): v for k, v in error["error.details"].items()})
    return ErrorReply(id=head["id"], error=rebuilt)


def parse_message(obj: Mapping[str, Any]) -> Message:
    """Build the message a received map describes.

    Unknown keys are ignored. Raises :class:`~ferry.errors.MessageInvalid`
    for a map without a string ``type``, an unknown type (naming it), or a
    field of the wrong type or range (naming the field).
    """
    if not isinstance(obj, Mapping):
        raise MessageInvalid(f"message must be a map, not {type(obj).__name__}")
    kind = obj.get("type")
    if kind is None:
        raise MessageInvalid("message: field 'type' is required", field="type")
    if not isinstance(kind, str):
        raise MessageInvalid("message: field 'type' must be a string", field="type")
    if kind == "hello":
        return _parse_greeting(Hello, obj)
    if kind == "welcome":
        return _parse_greeting(Welcome, obj)
    if kind == "request":
        return Request(**check_fields(kind, Request._SPECS, obj, MessageInvalid))
    if kind == "reply":
        return _parse_reply(obj)
    if kind == "event":
        return Event(**check_fields(kind, Event._SPECS, obj, MessageInvalid))
    if kind == "tunnel":
        return Tunnel(**check_fields(kind, Tunnel._SPECS, obj, MessageInvalid))
    raise MessageInvalid(f"unknown message type {short_repr(kind)}", field="type", type=kind[:64])
