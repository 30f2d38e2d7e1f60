"""Fuzz the protocol's entry points: whatever a peer sends, only ProtocolError comes out.

Each test lets any exception other than a :class:`~ferry.errors.ProtocolError`
subclass escape, which fails it: a hostile or broken peer must never be able to
crash an agent with a TypeError, KeyError, RecursionError...
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ferry.errors import FerryError, ProtocolError
from ferry.flags import MigrationParams
from ferry.protocol.connection import Connection, ConnectionState
from ferry.protocol.cookie import KNOWN_SECTIONS, Cookie
from ferry.protocol.framing import FrameDecoder, encode_frame
from ferry.protocol.messages import Hello, Welcome, parse_message
from ferry.protocol.ops import OPS, validate_args

# Fast by default; FERRY_FUZZ_EXAMPLES=20000 for a long run.
FUZZ = settings(
    max_examples=int(os.environ.get("FERRY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
# "message" and "self" collide with FerryError's own arguments if ever passed as keywords.
keys = st.text(max_size=10) | st.integers(-3, 3) | st.sampled_from(["message", "self", "code"])
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=15,
)

MESSAGE_TYPES = ["hello", "welcome", "request", "reply", "event", "tunnel", "nonsense"]
FIELD_NAMES = [
    "type",
    "version",
    "host_uuid",
    "hostname",
    "role",
    "features",
    "mandatory",
    "id",
    "op",
    "args",
    "result",
    "error",
    "event",
    "data",
    "token",
]
# Values close to valid ones, so the fuzzer reaches deep into validation.
near_valid = (
    values
    | st.sampled_from(["source", "destination", "client", "tunnel", "x"])
    | st.lists(st.integers(-1, 3), min_size=0, max_size=3)
    | st.lists(st.text(max_size=5), max_size=3)
    | st.fixed_dictionaries(
        {
            "code": st.sampled_from(["no-domain", "protocol", "x", ""]) | values,
            "message": st.text(max_size=5) | values,
        },
        optional={"details": values},
    )
)
message_maps = st.fixed_dictionaries(
    {"type": st.sampled_from(MESSAGE_TYPES)},
    optional={name: near_valid for name in FIELD_NAMES if name != "type"},
)
any_maps = st.dictionaries(st.text(max_size=8), values, max_size=6)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# Streams: raw noise, frames with noisy bodies, and frames of near-valid messages.
frames = (
    st.binary(max_size=40).map(frame_of)
    | any_maps.map(pack).map(frame_of)
    | message_maps.map(pack).map(frame_of)
)
streams = (
    st.binary(max_size=200)
    | st.lists(frames, max_size=5).map(b"".join)
    | st.builds(
        lambda a, b: a + b, st.lists(frames, max_size=3).map(b"".join), st.binary(max_size=30)
    )
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


def protocol_errors_only(fn: Callable[[], object]) -> ProtocolError | None:
    try:
        fn()
    except ProtocolError as exc:
        return exc
    return None


@FUZZ
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 250), max_size=6),
    max_frame=st.sampled_from([0, 16, 1 << 20]),
)
def test_frame_decoder_raises_only_protocol_errors(
    data: bytes, cuts: list[int], max_frame: int
) -> None:
    decoder = FrameDecoder(max_frame=max_frame)

    def run() -> None:
        for piece in split(data, cuts):
            decoder.feed(piece)
            while decoder.next_frame() is not None:
                pass
        decoder.eof()
        while decoder.next_frame() is not None:
            pass

    error = protocol_errors_only(run)
    if error is not None:
        assert decoder.error is error


@FUZZ
@given(obj=message_maps | any_maps)
def test_parse_message_raises_only_protocol_errors(obj: dict[str, Any]) -> None:
    error = protocol_errors_only(lambda: parse_message(obj))
    if error is None:
        # A map that parses re-encodes to a map that parses to the same message.
        msg = parse_message(obj)
        decoder = FrameDecoder()
        decoder.feed(encode_frame(msg.to_wire()))
        frame = decoder.next_frame()
        assert frame is not None
        again = parse_message(frame)
        assert type(again) is type(msg)


cookie_maps = st.dictionaries(
    st.sampled_from([*sorted(KNOWN_SECTIONS), "mandatory", "future"]) | st.text(max_size=6),
    values
    | st.dictionaries(st.text(max_size=8), values, max_size=5)
    | st.lists(st.sampled_from([*sorted(KNOWN_SECTIONS), "future"]), max_size=3),
    max_size=5,
)


@FUZZ
@given(data=st.binary(max_size=120) | cookie_maps.map(pack))
def test_cookie_decode_raises_only_protocol_errors(data: bytes) -> None:
    error = protocol_errors_only(lambda: Cookie.decode(data))
    if error is None:
        cookie = Cookie.decode(data)
        assert Cookie.decode(cookie.encode()) == cookie


HELLO = Hello((1, 0), "uuid-a", "alpha", "source", frozenset({"tunnel"}), frozenset())
PEER = Welcome((1, 0), "uuid-b", "beta", "destination", frozenset({"tunnel"}), frozenset())


@FUZZ
@given(
    data=streams,
    cuts=st.lists(st.integers(0, 250), max_size=6),
    initiator=st.booleans(),
    eof=st.booleans(),
    greeted=st.booleans(),
)
def test_connection_raises_only_protocol_errors(
    data: bytes, cuts: list[int], initiator: bool, eof: bool, greeted: bool
) -> None:
    conn = Connection(HELLO, initiator=initiator, max_frame=4096)
    if initiator:
        conn.start()
    if greeted:
        # A valid greeting first, so the noise also reaches the OPEN state.
        greeting = PEER if initiator else Hello(**{**vars(PEER)})
        data = encode_frame(greeting.to_wire()) + data

    def run() -> None:
        for piece in split(data, cuts):
            conn.receive_data(piece)
            while conn.next_event() is not None:
                pass
            conn.data_to_send()
        if eof:
            conn.receive_eof()
            while conn.next_event() is not None:
                pass

    error = protocol_errors_only(run)
    if error is not None:
        assert conn.state is ConnectionState.ERROR
        assert conn.error is error


@FUZZ
@given(
    op=st.sampled_from(sorted(OPS)) | st.text(max_size=8),
    args=st.dictionaries(
        st.text(max_size=12)
        | st.sampled_from(["name", "flags", "params", "cookie", "xml", "timeout", "ms", "since"]),
        values,
        max_size=5,
    ),
)
def test_validate_args_raises_only_protocol_errors(op: str, args: dict[str, Any]) -> None:
    protocol_errors_only(lambda: validate_args(op, args))


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(
            [
                "dest_name",
                "timeout_s",
                "parallel_connections",
                "migrate_uri",
                "auto_converge_initial",
            ]
        )
        | st.text(max_size=6),
        values,
        max_size=4,
    )
)
def test_params_from_wire_raises_only_ferry_errors(params: dict[str, Any]) -> None:
    with contextlib.suppress(FerryError):
        MigrationParams.from_wire(params)
