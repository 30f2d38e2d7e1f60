"""The data connection's opening exchange, sans-I/O (bytes in, results out).

A data connection reaches the destination agent's peer port, where control
connections arrive too.  It is told apart before any TLS byte is read: a
control connection starts with a TLS record (``0x16``), a data connection
with the 8-byte :data:`PREAMBLE`.  Then::

    source                                   destination
      PREAMBLE ──────────────────────────────▶
      ◀──────────── TLS 1.3 handshake, mutual certificates ───────────▶
      tunnel {token, channel, mode} ─────────▶   token checked (one use)
      ◀──────────────────────────── event "tunnel-accepted" | error reply
      [mode "plain": close_notify both ways, TLS unwrapped]
      raw migration bytes ◀──────────────────▶

All frames are ordinary Ferry frames (:mod:`ferry.protocol.framing`), so the
limits and the error codes of the control protocol apply unchanged.
"""

from __future__ import annotations

from typing import Any

from ferry.errors import FerryError, ProtocolError
from ferry.protocol.framing import FrameDecoder, encode_frame
from ferry.protocol.messages import ErrorReply, Event, Tunnel, parse_message

__all__ = [
    "PREAMBLE",
    "AnswerReader",
    "encode_accept",
    "encode_open",
    "encode_refusal",
    "parse_open",
]

PREAMBLE = b"FERRYTN1"
TLS_HANDSHAKE_RECORD = 0x16
# An opening frame is a token and two small fields; anything bigger is not one.
MAX_OPEN_FRAME = 4096
ACCEPTED = "tunnel-accepted"


def encode_open(token: str, channel: int, mode: str) -> bytes:
    """Return the ``tunnel`` frame the source sends once TLS is up."""
    return encode_frame(Tunnel(token, channel, mode).to_wire(), max_frame=MAX_OPEN_FRAME)


def parse_open(decoder: FrameDecoder) -> Tunnel | None:
    """Return the ``tunnel`` frame once ``decoder`` holds it, else None.

    Raises :class:`~ferry.errors.ProtocolError` (or a subclass) for anything
    but a well-formed ``tunnel`` frame.
    """
    frame = decoder.next_frame()
    if frame is None:
        return None
    msg = parse_message(frame)
    if not isinstance(msg, Tunnel):
        raise ProtocolError(f"a data connection must open with 'tunnel', got {msg.TYPE!r}")
    return msg


def encode_accept(channel: int) -> bytes:
    """Return the destination's acceptance of a data connection."""
    return encode_frame(Event(ACCEPTED, {"channel": channel}).to_wire(), max_frame=MAX_OPEN_FRAME)


def encode_refusal(error: FerryError) -> bytes:
    """Return the destination's refusal, with the error's stable code."""
    return encode_frame(ErrorReply(None, error).to_wire(), max_frame=MAX_OPEN_FRAME)


class AnswerReader:
    """The source's side: feed bytes until :meth:`result` says accepted or raises."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(max_frame=MAX_OPEN_FRAME)

    def feed(self, data: bytes) -> bool:
        """Feed received bytes; True once the destination accepted.

        Raises the destination's error (same class and code as it raised) on
        a refusal, :class:`~ferry.errors.ProtocolError` for anything else,
        :class:`~ferry.errors.FrameTruncated` when ``data`` is ``b""`` (EOF)
        before an answer.
        """
        if not data:
            self._decoder.eof()
            raise ProtocolError("the destination closed the data connection without answering")
        self._decoder.feed(data)
        frame = self._decoder.next_frame()
        if frame is None:
            return False
        msg: Any = parse_message(frame)
        if isinstance(msg, ErrorReply):
            raise msg.error
        if isinstance(msg, Event) and msg.event == ACCEPTED:
            return True
        raise ProtocolError(f"unexpected answer to 'tunnel': {msg.TYPE!r}")

    def leftover(self) -> int:
        """Bytes received after the answer (must be none: raw data waits for it)."""
        return self._decoder.buffered
