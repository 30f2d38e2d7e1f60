"""Messages: wire round trips, validation naming the field, errors across the wire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferry import errors
from ferry.errors import FerryError, MessageInvalid, NoDomain, PhaseError
from ferry.protocol.framing import FrameDecoder, encode_frame
from ferry.protocol.messages import (
    PROTOCOL_VERSION,
    ErrorReply,
    Event,
    Hello,
    Message,
    Reply,
    Request,
    Tunnel,
    Welcome,
    parse_message,
)


def wire_trip(msg: Message) -> Message:
    """Encode to a frame, decode it, parse it: what the peer sees."""
    decoder = FrameDecoder()
    decoder.feed(encode_frame(msg.to_wire()))
    frame = decoder.next_frame()
    assert frame is not None
    return parse_message(frame)


HELLO = Hello(
    version=PROTOCOL_VERSION,
    host_uuid="0f7c3c4e-5a1b-4c1e-9c55-2b8f0d4a9e11",
    hostname="alpha",
    role="source",
    features=frozenset({"tunnel", "postcopy", "snapshots"}),
    mandatory=frozenset({"tunnel"}),
)

ROUND_TRIP: list[Message] = [
    HELLO,
    Welcome(
        version=(1, 3),
        host_uuid="u2",
        hostname="beta",
        role="destination",
        features=frozenset(),
        mandatory=frozenset(),
    ),
    Request(id=7, op="start", args={"name": "vm1", "paused": True}),
    Request(id=0, op="prepare", args={"cookie": b"\x00\xff", "xml": "<domain/>"}),
    Reply(id=7, result={"state": "running", "nested": {"a": [1, 2.5, None]}}),
    Event(event="migration-progress", data={"remaining": 1024}, id=9),
    Event(event="domain-stopped"),
    Tunnel(token="secret-token"),
]


@pytest.mark.parametrize("msg", ROUND_TRIP, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    back = wire_trip(msg)
    assert type(back) is type(msg)
    assert back == msg


def test_every_message_has_a_type_key() -> None:
    for msg in ROUND_TRIP:
        assert msg.to_wire()["type"] == msg.TYPE


def test_hello_wire_form_is_plain_and_sorted() -> None:
    wire = HELLO.to_wire()
    assert wire["version"] == [1, 0]
    assert wire["features"] == ["postcopy", "snapshots", "tunnel"]
    assert wire["mandatory"] == ["tunnel"]


def test_unknown_keys_are_ignored() -> None:
    wire = {**Request(id=1, op="list", args={}).to_wire(), "future_field": {"x": 1}}
    assert parse_message(wire) == Request(id=1, op="list", args={})


def test_optional_fields_default() -> None:
    assert parse_message({"type": "request", "id": 3, "op": "list"}) == Request(3, "list", {})
    assert parse_message({"type": "event", "event": "e"}) == Event("e", {}, None)
    hello = parse_message(
        {"type": "hello", "version": [1, 0], "host_uuid": "u", "hostname": "h", "role": "client"}
    )
    assert isinstance(hello, Hello) and hello.features == frozenset()


def test_unknown_type_is_named() -> None:
    with pytest.raises(MessageInvalid, match="unknown message type 'teleport'"):
        parse_message({"type": "teleport"})


@pytest.mark.parametrize("obj", [{}, {"type": None}, {"type": 5}, {"type": b"hello"}])
def test_type_must_be_a_string(obj: dict[str, Any]) -> None:
    with pytest.raises(MessageInvalid, match="field 'type'"):
        parse_message(obj)


def test_non_map_is_invalid() -> None:
    with pytest.raises(MessageInvalid):
        parse_message([("type", "hello")])  # type: ignore[arg-type]


GOOD_HELLO = HELLO.to_wire()

BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({**GOOD_HELLO, "version": [1]}, "version"),
    ({**GOOD_HELLO, "version": "1.0"}, "version"),
    ({**GOOD_HELLO, "version": [1, -1]}, "version[1]"),
    ({**GOOD_HELLO, "version": [True, 0]}, "version[0]"),
    ({**GOOD_HELLO, "host_uuid": 5}, "host_uuid"),
    ({**GOOD_HELLO, "host_uuid": ""}, "host_uuid"),
    ({k: v for k, v in GOOD_HELLO.items() if k != "hostname"}, "hostname"),
    ({**GOOD_HELLO, "role": "attacker"}, "role"),
    ({**GOOD_HELLO, "features": "tunnel"}, "features"),
    ({**GOOD_HELLO, "features": ["tunnel", 3]}, "features[1]"),
    ({**GOOD_HELLO, "mandatory": [{}]}, "mandatory[0]"),
    ({**GOOD_HELLO, "mandatory": ["not-offered"]}, "mandatory"),
    ({"type": "request", "id": "1", "op": "list"}, "id"),
    ({"type": "request", "id": -1, "op": "list"}, "id"),
    ({"type": "request", "id": 2**63, "op": "list"}, "id"),
    ({"type": "request", "id": True, "op": "list"}, "id"),
    ({"type": "request", "id": 1}, "op"),
    ({"type": "request", "id": 1, "op": ""}, "op"),
    ({"type": "request", "id": 1, "op": "list", "args": [1]}, "args"),
    ({"type": "request", "id": 1, "op": "list", "args": {1: 2}}, "args"),
    ({"type": "reply", "id": 1}, "result"),
    ({"type": "reply", "id": None, "result": {}}, "id"),
    ({"type": "reply", "id": 1, "result": "ok"}, "result"),
    ({"type": "reply", "id": 1, "result": {}, "error": {}}, "result"),
    ({"type": "reply", "id": 1, "error": "boom"}, "error"),
    ({"type": "reply", "id": 1, "error": {"message": "m"}}, "error.code"),
    ({"type": "reply", "id": 1, "error": {"code": 1, "message": "m"}}, "error.code"),
    ({"type": "reply", "id": 1, "error": {"code": "c"}}, "error.message"),
    (
        {"type": "reply", "id": 1, "error": {"code": "c", "message": "m", "details": 1}},
        "error.details",
    ),
    ({"type": "event"}, "event"),
    ({"type": "event", "event": "e", "data": None}, "data"),
    ({"type": "event", "event": "e", "id": "x"}, "id"),
    ({"type": "tunnel"}, "token"),
    ({"type": "tunnel", "token": b"bytes"}, "token"),
]


@pytest.mark.parametrize(("obj", "field"), BAD_FIELDS)
def test_bad_field_is_named(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(MessageInvalid) as info:
        parse_message(obj)
    assert f"'{field}'" in str(info.value)
    assert str(info.value).startswith(obj["type"])


def test_local_construction_is_validated_too() -> None:
    with pytest.raises(MessageInvalid, match="role"):
        Hello((1, 0), "u", "h", "nobody", frozenset(), frozenset())
    with pytest.raises(MessageInvalid, match="mandatory"):
        Hello((1, 0), "u", "h", "client", frozenset(), frozenset({"x"}))
    with pytest.raises(MessageInvalid, match="'id'"):
        Request(id=-5, op="list", args={})
    with pytest.raises(MessageInvalid, match="'error'"):
        ErrorReply(id=1, error=ValueError("x"))  # type: ignore[arg-type]


def test_hello_normalises_python_containers() -> None:
    hello = Hello([1, 0], "u", "h", "client", {"a"}, ["a"])  # type: ignore[arg-type]
    assert hello.version == (1, 0)
    assert hello.features == frozenset({"a"}) and hello.mandatory == frozenset({"a"})
    assert isinstance(hello.features, frozenset)


def test_tunnel_repr_hides_the_token() -> None:
    assert "secret" not in repr(Tunnel("secret"))


ALL_ERROR_CLASSES = sorted(
    {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, FerryError)},
    key=lambda c: c.code,
)


@pytest.mark.parametrize("cls", ALL_ERROR_CLASSES, ids=lambda c: c.code)
def test_every_error_survives_a_wire_round_trip(cls: type[FerryError]) -> None:
    sent = ErrorReply(id=42, error=cls(f"{cls.__name__} happened", domain="vm1", attempt=3))
    back = wire_trip(sent)
    assert isinstance(back, ErrorReply)
    assert back.id == 42
    assert type(back.error) is cls
    assert back.error.code == cls.code
    assert back.error.message == f"{cls.__name__} happened"
    assert back.error.details == {"domain": "vm1", "attempt": 3}


def test_connection_level_error_has_no_id() -> None:
    back = wire_trip(ErrorReply(id=None, error=PhaseError("late finish")))
    assert isinstance(back, ErrorReply) and back.id is None
    assert isinstance(back.error, PhaseError)


def test_unknown_error_code_from_newer_peer_is_kept() -> None:
    msg = parse_message(
        {"type": "reply", "id": 1, "error": {"code": "quantum-flux", "message": "odd"}}
    )
    assert isinstance(msg, ErrorReply)
    assert type(msg.error) is FerryError
    assert msg.error.message == "odd"
    assert msg.error.details["remote_code"] == "quantum-flux"


def test_unencodable_error_details_are_sent_as_strings() -> None:
    err = NoDomain("gone", path=Path("/var/lib/ferry/vm1"), nested={"when": object, 5: (1, 2)})
    back = wire_trip(ErrorReply(id=1, error=err))
    assert isinstance(back, ErrorReply) and isinstance(back.error, NoDomain)
    assert back.error.details["path"] == "/var/lib/ferry/vm1"
    assert back.error.details["nested"]["5"] == [1, 2]
    assert back.error.details["nested"]["when"] == str(object)


def test_peer_details_named_like_constructor_arguments_are_kept() -> None:
    msg = parse_message(
        {
            "type": "reply",
            "id": 1,
            "error": {
                "code": "no-domain",
                "message": "gone",
                "details": {"message": "m", "self": 1},
            },
        }
    )
    assert isinstance(msg, ErrorReply) and isinstance(msg.error, NoDomain)
    assert msg.error.message == "gone"
    assert msg.error.details == {"message": "m", "self": 1}
