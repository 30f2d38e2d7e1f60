"""Connection state machine: handshake, requests, tunnels, errors, end of stream."""

from __future__ import annotations

import struct

import pytest

from ferry.errors import (
    AccessDenied,
    FeatureMissing,
    FrameTooLarge,
    FrameTruncated,
    MessageInvalid,
    NoDomain,
    ProtocolError,
    VersionMismatch,
)
from ferry.protocol.connection import Connection, ConnectionState
from ferry.protocol.framing import FrameDecoder, encode_frame
from ferry.protocol.messages import (
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

State = ConnectionState


def state(conn: Connection) -> ConnectionState:
    """Read the state through a call, so mypy does not pin it after a first check."""
    return conn.state


def hello(
    role: str = "source",
    features: frozenset[str] = frozenset({"tunnel"}),
    mandatory: frozenset[str] = frozenset(),
    version: tuple[int, int] = (1, 0),
    hostname: str = "alpha",
) -> Hello:
    return Hello(version, f"uuid-{hostname}", hostname, role, features, mandatory)


def events(conn: Connection) -> list[Message]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def pair(
    a: Hello | None = None, b: Hello | None = None, *, trickle: bool = False
) -> tuple[Connection, Connection]:
    """Run the handshake between a new initiator and responder; return both, OPEN."""
    client = Connection(a or hello(), initiator=True)
    server = Connection(b or hello("destination", hostname="beta"), initiator=False)
    deliver(client.start(), server, trickle)
    assert [type(e) for e in events(server)] == [Hello]
    deliver(server.data_to_send(), client, trickle)
    assert [type(e) for e in events(client)] == [Welcome]
    return client, server


def deliver(data: bytes, conn: Connection, trickle: bool = False) -> None:
    if trickle:
        for i in range(len(data)):
            conn.receive_data(data[i : i + 1])
    else:
        conn.receive_data(data)


def decode_all(data: bytes) -> list[Message]:
    decoder = FrameDecoder()
    decoder.feed(data)
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(parse_message(frame))
    return out


@pytest.mark.parametrize("trickle", [False, True], ids=["whole", "byte-by-byte"])
def test_handshake_negotiates_on_both_sides(trickle: bool) -> None:
    a = hello(features=frozenset({"tunnel", "postcopy"}))
    b = hello("destination", features=frozenset({"tunnel", "zerocopy"}), hostname="beta")
    client, server = pair(a, b, trickle=trickle)
    assert client.state is State.OPEN and server.state is State.OPEN
    assert client.negotiated is not None and server.negotiated is not None
    assert client.negotiated.features == server.negotiated.features == frozenset({"tunnel"})
    assert client.negotiated.peer_hostname == "beta"
    assert server.negotiated.peer_role == "source"


def test_request_reply_and_events_flow() -> None:
    client, server = pair()
    rid = client.next_request_id()
    deliver(client.send(Request(rid, "migrate", {"name": "vm1"})), server)
    [req] = events(server)
    assert req == Request(rid, "migrate", {"name": "vm1"})
    out = server.send(Event("migration-progress", {"remaining": 10}, id=rid))
    out += server.send(Reply(rid, {"ok": True}))
    deliver(out, client)
    assert events(client) == [
        Event("migration-progress", {"remaining": 10}, rid),
        Reply(rid, {"ok": True}),
    ]


def test_request_ids_increase() -> None:
    client, _ = pair()
    assert [client.next_request_id() for _ in range(3)] == [1, 2, 3]


def test_unknown_op_is_delivered_not_refused() -> None:
    client, server = pair()
    deliver(client.send(Request(1, "teleport", {})), server)
    assert events(server) == [Request(1, "teleport", {})]
    assert server.state is State.OPEN


def test_error_reply_reaches_the_client_as_the_same_class() -> None:
    client, server = pair()
    deliver(server.send(ErrorReply(5, NoDomain("no domain 'vm9'", name="vm9"))), client)
    [reply] = events(client)
    assert isinstance(reply, ErrorReply) and isinstance(reply.error, NoDomain)
    assert reply.error.details == {"name": "vm9"}


def test_responder_flushes_welcome_before_its_first_reply() -> None:
    client = Connection(hello(), initiator=True)
    server = Connection(hello("destination"), initiator=False)
    server.receive_data(client.start() + encode_frame(Request(1, "list", {}).to_wire()))
    assert [type(e) for e in events(server)] == [Hello, Request]
    # The caller forgot data_to_send(): send() still puts the welcome first.
    sent = decode_all(server.send(Reply(1, {"domains": []})))
    assert [type(m) for m in sent] == [Welcome, Reply]
    assert server.data_to_send() == b""


def test_cannot_send_before_the_handshake() -> None:
    client = Connection(hello(), initiator=True)
    with pytest.raises(ProtocolError, match="before the handshake"):
        client.send(Request(1, "list", {}))
    client.start()
    with pytest.raises(ProtocolError, match="before the handshake"):
        client.send(Event("x"))
    # refusing is allowed
    assert decode_all(client.send(ErrorReply(None, AccessDenied("no")))) != []


def test_greetings_are_not_sent_by_hand() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError):
        client.send(hello())
    with pytest.raises(ProtocolError):
        client.send(Welcome((1, 0), "u", "h", "client", frozenset(), frozenset()))


def test_start_rules() -> None:
    server = Connection(hello(), initiator=False)
    with pytest.raises(ProtocolError):
        server.start()
    client = Connection(hello(), initiator=True)
    client.start()
    with pytest.raises(ProtocolError, match="already"):
        client.start()


def test_initiator_requires_welcome_first() -> None:
    client = Connection(hello(), initiator=True)
    client.start()
    client.receive_data(encode_frame(Request(1, "list", {}).to_wire()))
    with pytest.raises(ProtocolError, match="expected 'welcome'"):
        client.next_event()
    assert client.state is State.ERROR
    [reply] = decode_all(client.data_to_send())
    assert isinstance(reply, ErrorReply) and reply.id is None


def test_initiator_must_start_before_receiving() -> None:
    client = Connection(hello(), initiator=True)
    client.receive_data(
        encode_frame(
            Welcome((1, 0), "u", "beta", "destination", frozenset(), frozenset()).to_wire()
        )
    )
    with pytest.raises(ProtocolError, match="before sending hello"):
        client.next_event()


@pytest.mark.parametrize(
    "first",
    [
        Request(1, "list", {}),
        Reply(1, {}),
        Event("e"),
        Welcome((1, 0), "u", "h", "client", frozenset(), frozenset()),
    ],
    ids=lambda m: type(m).__name__,
)
def test_responder_requires_hello_or_tunnel_first(first: Message) -> None:
    server = Connection(hello("destination"), initiator=False)
    server.receive_data(encode_frame(first.to_wire()))
    with pytest.raises(ProtocolError, match="expected 'hello' or 'tunnel'"):
        server.next_event()
    assert server.state is State.ERROR


def test_responder_refuses_missing_mandatory_feature_and_tells_the_peer() -> None:
    client = Connection(
        hello(features=frozenset({"tunnel", "lockd"}), mandatory=frozenset({"lockd"})),
        initiator=True,
    )
    server = Connection(hello("destination", hostname="beta"), initiator=False)
    server.receive_data(client.start())
    with pytest.raises(FeatureMissing, match="'lockd'"):
        server.next_event()
    assert server.state is State.ERROR
    refusal = server.data_to_send()
    assert refusal
    # The initiator learns why, as the same error class, and does not answer back.
    client.receive_data(refusal)
    with pytest.raises(FeatureMissing, match="'lockd'"):
        client.next_event()
    assert client.state is State.ERROR
    assert client.data_to_send() == b""


def test_responder_refuses_other_major_version() -> None:
    client = Connection(hello(version=(2, 0)), initiator=True)
    server = Connection(hello("destination"), initiator=False)
    server.receive_data(client.start())
    with pytest.raises(VersionMismatch):
        server.next_event()
    client.receive_data(server.data_to_send())
    with pytest.raises(VersionMismatch, match=r"2\.0"):
        client.next_event()


def test_initiator_also_checks_the_welcome() -> None:
    client = Connection(hello(), initiator=True)
    client.start()
    welcome = Welcome((1, 0), "u", "beta", "destination", frozenset({"x"}), frozenset({"x"}))
    client.receive_data(encode_frame(welcome.to_wire()))
    with pytest.raises(FeatureMissing):
        client.next_event()
    assert isinstance(decode_all(client.data_to_send())[0], ErrorReply)


def test_peer_refusal_with_a_non_protocol_error_is_wrapped() -> None:
    client = Connection(hello(), initiator=True)
    client.start()
    refusal = AccessDenied("go away", user="mallory")
    refusal.details["message"] = "detail named like an argument"
    client.receive_data(encode_frame(ErrorReply(None, refusal).to_wire()))
    with pytest.raises(ProtocolError, match="go away") as info:
        client.next_event()
    assert type(info.value) is ProtocolError
    assert info.value.details["remote_code"] == "access-denied"
    assert info.value.details["user"] == "mallory"
    assert isinstance(info.value.__cause__, AccessDenied)


def test_greeting_after_handshake_is_a_protocol_error() -> None:
    _, server = pair()
    server.receive_data(encode_frame(hello().to_wire()))
    with pytest.raises(ProtocolError, match="unexpected 'hello'"):
        server.next_event()


def test_unknown_message_type_fails_the_connection_and_is_answered() -> None:
    _, server = pair()
    server.receive_data(encode_frame({"type": "teleport", "id": 3}))
    with pytest.raises(MessageInvalid, match="'teleport'") as info:
        server.next_event()
    assert server.state is State.ERROR
    [reply] = decode_all(server.data_to_send())
    assert isinstance(reply, ErrorReply) and isinstance(reply.error, MessageInvalid)
    # the connection is dead: the same error again, and no sending
    with pytest.raises(MessageInvalid) as again:
        server.next_event()
    assert again.value is info.value
    with pytest.raises(MessageInvalid):
        server.receive_data(b"more")
    with pytest.raises(ProtocolError, match="failed connection"):
        server.send(Reply(1, {}))


def test_oversized_frame_header_fails_on_receive() -> None:
    client = Connection(hello(), initiator=True, max_frame=1000)
    client.start()
    with pytest.raises(FrameTooLarge):
        client.receive_data(struct.pack(">I", 1001))
    assert client.state is State.ERROR


def test_send_refuses_a_frame_over_the_limit_but_stays_open() -> None:
    client, _ = pair()
    with pytest.raises(FrameTooLarge):
        client.send(Request(1, "define", {"xml": "x" * (2 << 20)}))
    assert client.state is State.OPEN


def test_clean_eof_closes() -> None:
    client, server = pair()
    deliver(client.send(Request(1, "list", {})), server)
    server.receive_eof()
    assert state(server) is State.OPEN  # a message is still waiting
    assert [type(e) for e in events(server)] == [Request]
    assert state(server) is State.CLOSED
    # a half-closed peer may still read our answer
    assert decode_all(server.send(Reply(1, {}))) == [Reply(1, {})]
    with pytest.raises(ProtocolError):
        server.receive_data(b"late")


def test_eof_inside_a_frame_is_truncation() -> None:
    client, server = pair()
    frame = client.send(Request(1, "list", {}))
    server.receive_data(frame[:-2])
    assert events(server) == []
    with pytest.raises(FrameTruncated):
        server.receive_eof()
    assert server.state is State.ERROR


def test_eof_after_complete_frames_then_partial() -> None:
    client, server = pair()
    first, second = client.send(Request(1, "list", {})), client.send(Request(2, "list", {}))
    server.receive_data(first + second[:3])
    server.receive_eof()
    assert server.next_event() == Request(1, "list", {})
    with pytest.raises(FrameTruncated):
        server.next_event()


def test_responder_tunnel_hands_over_raw_bytes() -> None:
    server = Connection(hello("destination"), initiator=False)
    raw = b"QEVM\x00\x00\x00\x03" + encode_frame({"type": "hello"})  # looks like a frame: is not
    server.receive_data(encode_frame(Tunnel("tok-123").to_wire()) + raw[:5])
    [event] = events(server)
    assert event == Tunnel("tok-123")
    assert server.state is State.TUNNEL
    server.receive_data(raw[5:])
    assert server.next_event() is None  # no frames are parsed any more
    assert server.take_buffered() == raw
    assert server.take_buffered() == b""
    with pytest.raises(ProtocolError):
        server.send(Reply(1, {}))
    server.receive_eof()
    assert state(server) is State.CLOSED


def test_responder_tunnel_byte_by_byte() -> None:
    server = Connection(hello("destination"), initiator=False)
    stream = encode_frame(Tunnel("t").to_wire()) + b"\x00\x01\x02"
    got: list[Message | bytes] = []
    for i in range(len(stream)):
        server.receive_data(stream[i : i + 1])
        got += events(server)
        if server.state is State.TUNNEL:
            got.append(server.take_buffered())
    assert got[0] == Tunnel("t")
    assert b"".join(x for x in got[1:] if isinstance(x, bytes)) == b"\x00\x01\x02"


def test_initiator_tunnel() -> None:
    client = Connection(hello("tunnel"), initiator=True)
    frame = client.send(Tunnel("tok"))
    assert decode_all(frame) == [Tunnel("tok")]
    assert client.state is State.TUNNEL
    client.receive_data(b"\xff\xff\xff\xff")  # would be an oversized header: it is raw data
    assert client.take_buffered() == b"\xff\xff\xff\xff"
    with pytest.raises(ProtocolError):
        client.start()


def test_take_buffered_only_on_tunnels() -> None:
    client, _ = pair()
    with pytest.raises(ProtocolError):
        client.take_buffered()


def test_tunnel_after_handshake_is_refused() -> None:
    _, server = pair()
    server.receive_data(encode_frame(Tunnel("t").to_wire()))
    with pytest.raises(ProtocolError, match="unexpected 'tunnel'"):
        server.next_event()


def test_local_must_be_a_hello() -> None:
    with pytest.raises(TypeError):
        Connection(
            Welcome((1, 0), "u", "h", "client", frozenset(), frozenset()),  # type: ignore[arg-type]
            initiator=True,
        )
