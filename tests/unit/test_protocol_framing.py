"""Frames: encoding, incremental decoding over any split, limits and garbage."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import FrameGarbage, FrameTooLarge, FrameTruncated, ProtocolError
from ferry.protocol.framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame

# Values msgpack round-trips exactly (no NaN: NaN != NaN).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
maps = st.dictionaries(st.text(max_size=10), values, max_size=6)


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def drain(decoder: FrameDecoder) -> list[dict[str, Any]]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_encode_layout_is_length_then_msgpack_map() -> None:
    data = encode_frame({"type": "hello", "blob": b"\x00\x01"})
    body = msgpack.packb({"type": "hello", "blob": b"\x00\x01"}, use_bin_type=True)
    assert data == header(len(body)) + body
    # bin type: bytes are not confused with strings on the way back
    assert msgpack.unpackb(data[4:], raw=False) == {"type": "hello", "blob": b"\x00\x01"}


def test_round_trip_keeps_bytes_and_str_apart() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"s": "text", "b": b"text", "n": [1, 2.5, None, True]}))
    frame = decoder.next_frame()
    assert frame == {"s": "text", "b": b"text", "n": [1, 2.5, None, True]}
    assert isinstance(frame["b"], bytes) and isinstance(frame["s"], str)
    assert decoder.next_frame() is None


@settings(max_examples=150, deadline=None)
@given(msgs=st.lists(maps, max_size=6), data=st.data())
def test_any_split_yields_the_same_frames(msgs: list[dict[str, Any]], data: st.DataObject) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        decoder.feed(stream[start:cut])
        got += drain(decoder)
        start = cut
    decoder.eof()
    assert got == msgs
    assert decoder.buffered == 0


@settings(max_examples=40, deadline=None)
@given(msgs=st.lists(maps, min_size=1, max_size=4))
def test_one_byte_at_a_time_yields_the_same_frames(msgs: list[dict[str, Any]]) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for i in range(len(stream)):
        decoder.feed(stream[i : i + 1])
        got += drain(decoder)
    assert got == msgs


def test_frames_are_returned_only_when_complete() -> None:
    frame = encode_frame({"a": 1})
    decoder = FrameDecoder()
    decoder.feed(frame[:-1])
    assert decoder.next_frame() is None
    decoder.feed(frame[-1:])
    assert decoder.next_frame() == {"a": 1}


def test_oversized_header_refused_before_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header(101))  # only the header: no body was ever sent
    assert "101" in str(info.value) and "100" in str(info.value)
    assert decoder.buffered == 0


def test_oversized_header_refused_when_header_arrives_in_pieces() -> None:
    decoder = FrameDecoder()
    big = header(DEFAULT_MAX_FRAME + 1)
    decoder.feed(big[:3])
    assert decoder.next_frame() is None
    with pytest.raises(FrameTooLarge):
        decoder.feed(big[3:])


def test_oversized_header_after_a_good_frame_is_found_by_next_frame() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode_frame({"ok": True}) + header(10_000))
    assert decoder.next_frame() == {"ok": True}
    with pytest.raises(FrameTooLarge):
        decoder.next_frame()


def test_frame_of_exactly_max_size_is_accepted() -> None:
    body_len = len(encode_frame({"x": ""})) - 4
    limit = body_len + 20  # fixstr up to 31 chars: the header stays one byte
    msg = {"x": "y" * 20}
    frame = encode_frame(msg, max_frame=limit)
    assert len(frame) - 4 == limit
    decoder = FrameDecoder(max_frame=limit)
    decoder.feed(frame)
    assert decoder.next_frame() == msg


def test_encode_refuses_above_the_limit() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": "y" * 200}, max_frame=100)
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": b"\0" * DEFAULT_MAX_FRAME})


def test_decoder_is_poisoned_after_an_error() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(FrameTooLarge) as first:
        decoder.feed(header(11))
    for call in (decoder.next_frame, decoder.eof, decoder.take_buffered):
        with pytest.raises(FrameTooLarge) as again:
            call()
        assert again.value is first.value
    with pytest.raises(FrameTooLarge) as again:
        decoder.feed(encode_frame({}))
    assert again.value is first.value
    assert decoder.error is first.value


@pytest.mark.parametrize(
    "partial",
    [b"\x00", b"\x00\x00\x00", header(5), header(5) + b"\x81\xa1"],
    ids=["1-byte-header", "3-byte-header", "header-only", "half-body"],
)
def test_truncated_stream_raises_on_eof(partial: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(partial)
    assert decoder.next_frame() is None
    with pytest.raises(FrameTruncated):
        decoder.eof()
    with pytest.raises(FrameTruncated):
        decoder.next_frame()


def test_clean_eof_is_silent() -> None:
    decoder = FrameDecoder()
    decoder.eof()
    assert decoder.next_frame() is None
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"a": 1}))
    assert decoder.next_frame() == {"a": 1}
    decoder.eof()
    assert decoder.next_frame() is None


def test_complete_frames_before_a_truncated_one_are_still_returned() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"a": 1}) + encode_frame({"b": 2})[:-1])
    decoder.eof()  # a complete frame is waiting: it is delivered first
    assert decoder.next_frame() == {"a": 1}
    with pytest.raises(FrameTruncated):
        decoder.next_frame()


def test_feed_after_eof_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.eof()
    with pytest.raises(ProtocolError):
        decoder.feed(b"x")


def body_frame(body: bytes) -> bytes:
    return header(len(body)) + body


GARBAGE = {
    "empty-body": b"",
    "list": msgpack.packb([1, 2]),
    "int": msgpack.packb(7),
    "string": msgpack.packb("hello"),
    "two-maps": msgpack.packb({}) + msgpack.packb({}),
    "map-then-junk": msgpack.packb({"a": 1}) + b"\x00",
    "reserved-byte": b"\xc1",
    "truncated-map": b"\x82\xa1a\x01",
    "bad-utf8": b"\x81\xa1a\xa2\xff\xfe",
    "int-key-top": msgpack.packb({1: "x"}),
    "unhashable-key": b"\x81\x91\x01\x02",
    "map-key": b"\x81\x80\x01",
    "ext-type": b"\x81\xa1a\xd4\x05\x00",
    "timestamp": b"\x81\xa1a\xd6\xff\x00\x00\x00\x01",
    "deep-nesting": b"\x81\xa1a" + b"\x91" * 5000 + b"\x01",
    "huge-claimed-array": b"\x81\xa1a\xdd\xff\xff\xff\xff",
}


@pytest.mark.parametrize("body", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_bodies_raise_frame_garbage(body: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(body_frame(body))
    with pytest.raises(FrameGarbage):
        decoder.next_frame()
    with pytest.raises(FrameGarbage):
        decoder.next_frame()  # poisoned


def test_nested_non_string_keys_are_allowed() -> None:
    decoder = FrameDecoder()
    decoder.feed(body_frame(msgpack.packb({"m": {1: "one"}})))
    assert decoder.next_frame() == {"m": {1: "one"}}


def test_take_buffered_returns_bytes_after_the_last_frame() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"type": "tunnel", "token": "t"}) + b"RAW\x00\x00\x00\xff")
    assert decoder.next_frame() == {"type": "tunnel", "token": "t"}
    assert decoder.take_buffered() == b"RAW\x00\x00\x00\xff"
    assert decoder.take_buffered() == b""
    assert decoder.buffered == 0


def test_max_frame_must_fit_the_header() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=1 << 32)
