"""The tunnel's opening exchange (sans-I/O) and its one-use tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferry.errors import (
    AccessDenied,
    AuthError,
    FrameGarbage,
    FrameTooLarge,
    FrameTruncated,
    MessageInvalid,
    ProtocolError,
)
from ferry.protocol.framing import FrameDecoder, encode_frame
from ferry.protocol.messages import Tunnel
from ferry.tunnel import (
    PREAMBLE,
    AnswerReader,
    TokenBook,
    encode_accept,
    encode_open,
    encode_refusal,
    parse_open,
)
from ferry.tunnel.wire import MAX_OPEN_FRAME


def decoder_with(data: bytes) -> FrameDecoder:
    decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)
    decoder.feed(data)
    return decoder


def test_preamble_cannot_be_mistaken_for_tls() -> None:
    # A TLS connection starts with a handshake record (0x16); the sniffer
    # decides on the first byte.
    assert len(PREAMBLE) == 8 and PREAMBLE[0] != 0x16


def test_open_round_trips_byte_by_byte() -> None:
    data = encode_open("tok", 3, "plain")
    decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)
    for i, byte in enumerate(data):
        decoder.feed(bytes([byte]))
        opening = parse_open(decoder)
        if i < len(data) - 1:
            assert opening is None
    assert opening == Tunnel("tok", 3, "plain")


def test_open_defaults_to_channel_zero_encrypted() -> None:
    # An older source that sends only the token means one encrypted channel.
    decoder = decoder_with(encode_frame({"type": "tunnel", "token": "t"}))
    assert parse_open(decoder) == Tunnel("t", 0, "tls")


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ({"type": "hello", "version": 1}, ProtocolError),
        ({"type": "tunnel", "token": ""}, MessageInvalid),
        ({"type": "tunnel", "token": "t", "channel": 256}, MessageInvalid),
        ({"type": "tunnel", "token": "t", "channel": -1}, MessageInvalid),
        ({"type": "tunnel", "token": "t", "channel": True}, MessageInvalid),
        ({"type": "tunnel", "token": "t", "mode": "rot13"}, MessageInvalid),
        ({"type": "tunnel", "token": 5}, MessageInvalid),
    ],
)
def test_bad_open_frames_are_refused(frame: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        parse_open(decoder_with(encode_frame(frame)))


def test_oversized_open_frame_is_refused_before_it_is_read() -> None:
    with pytest.raises(FrameTooLarge):
        parse_open(decoder_with((MAX_OPEN_FRAME + 1).to_bytes(4, "big") + b"\x80"))


def test_answer_accept_and_refusal() -> None:
    reader = AnswerReader()
    data = encode_accept(2)
    assert not reader.feed(data[:3])
    assert reader.feed(data[3:])
    assert reader.leftover() == 0

    refused = AnswerReader()
    with pytest.raises(AuthError, match="token unknown"):
        refused.feed(encode_refusal(AuthError("tunnel token unknown")))
    with pytest.raises(AccessDenied):
        AnswerReader().feed(encode_refusal(AccessDenied("no")))


def test_answer_eof_and_garbage() -> None:
    with pytest.raises(ProtocolError, match="without answering"):
        AnswerReader().feed(b"")
    with pytest.raises(FrameTruncated):
        reader = AnswerReader()
        reader.feed(encode_accept(0)[:5])
        reader.feed(b"")
    with pytest.raises(FrameGarbage):
        AnswerReader().feed(b"\x00\x00\x00\x02\xc1\xc1")
    with pytest.raises(ProtocolError, match="unexpected answer"):
        AnswerReader().feed(encode_frame({"type": "event", "event": "other", "data": {}}))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fuzzed_open_frames_never_crash(noise: bytes) -> None:
    decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)
    try:
        decoder.feed(noise)
        parse_open(decoder)
    except ProtocolError:
        pass


# -- tokens ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_admits_each_channel_once() -> None:
    book: TokenBook[str] = TokenBook()
    token = book.issue("g1", 3, 60, "sink")
    assert book.redeem(token, 0, "tls").sink == "sink"
    assert book.redeem(token, 2, "tls").name == "g1"
    with pytest.raises(AuthError, match="already used for channel 0"):
        book.redeem(token, 0, "tls")
    with pytest.raises(AuthError, match="channel 3 out of range"):
        book.redeem(token, 3, "tls")


def test_unknown_revoked_and_replaced_tokens() -> None:
    book: TokenBook[None] = TokenBook()
    with pytest.raises(AuthError, match="unknown"):
        book.redeem("forged", 0, "tls")
    first = book.issue("g1", 1, 60, None)
    second = book.issue("g1", 1, 60, None)
    assert first != second and len(book) == 1
    with pytest.raises(AuthError, match="unknown"):
        book.redeem(first, 0, "tls")
    book.revoke("g1")
    with pytest.raises(AuthError, match="unknown"):
        book.redeem(second, 0, "tls")


def test_expired_token() -> None:
    clock = Clock()
    book: TokenBook[None] = TokenBook(clock)
    token = book.issue("g1", 1, 5, None)
    clock.now += 6
    with pytest.raises(AuthError, match="expired"):
        book.redeem(token, 0, "tls")
    assert len(book) == 0


def test_plaintext_needs_the_hosts_permission() -> None:
    book: TokenBook[None] = TokenBook()
    token = book.issue("g1", 2, 60, None)
    with pytest.raises(AuthError, match="allow_plaintext_tunnel"):
        book.redeem(token, 0, "plain")
    # The refusal did not use up the channel.
    book.redeem(token, 0, "tls")
    allowed = book.issue("g2", 1, 60, None, allow_plaintext=True)
    assert book.redeem(allowed, 0, "plain").allow_plaintext


def test_token_is_not_in_the_repr() -> None:
    assert "secret" not in repr(Tunnel("secret", 0, "tls"))


def test_channel_count_is_checked() -> None:
    with pytest.raises(ValueError):
        TokenBook[None]().issue("g1", 0, 60, None)
