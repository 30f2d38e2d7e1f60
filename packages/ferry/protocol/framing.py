"""Frames: a 4-byte big-endian length, then one msgpack map.

Sans-I/O: :func:`encode_frame` turns a map into bytes, :class:`FrameDecoder`
turns any split of a byte stream back into maps. Neither touches a socket.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import msgpack

from ferry.errors import FrameGarbage, FrameTooLarge, FrameTruncated, ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "FrameDecoder",
    "decode_body",
    "encode_frame",
]

DEFAULT_MAX_FRAME = 1 << 20
HEADER_SIZE = 4

_HEADER = struct.Struct(">I")


def encode_frame(msg: Mapping[str, Any], *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Encode ``msg`` as one frame (header + msgpack map, bin type for bytes).

    Raises :class:`~ferry.errors.FrameTooLarge` if the body would exceed
    ``max_frame`` bytes (the peer would refuse it anyway). Values msgpack
    cannot encode raise its ``TypeError``/``ValueError``/``OverflowError``:
    that is a bug in the caller, not a protocol error.
    """
    body = msgpack.packb(dict(msg), use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(
            f"frame of {len(body)} bytes exceeds the limit of {max_frame} bytes",
            size=len(body),
            limit=max_frame,
        )
    return _HEADER.pack(len(body)) + body


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def decode_body(
    body: bytes, *, error: type[ProtocolError] = FrameGarbage, what: str = "frame body"
) -> dict[str, Any]:
    """Decode ``body`` as exactly one msgpack map with string keys at the top.

    Decoding is bounded: no container or string may claim more elements than
    the body has bytes, extension types (timestamps included) are refused, and
    nesting is limited by msgpack's own stack. Raises ``error`` (default
    :class:`~ferry.errors.FrameGarbage`) for anything else.
    """
    limit = len(body)
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    # msgpack signals bad input with a loose set of exceptions (ValueError
    # subclasses, TypeError for unhashable keys, UnicodeDecodeError, StackError,
    # RecursionError in its pure-Python fallback); all of them mean garbage.
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"[:120]
        raise error(f"{what} is not valid msgpack ({reason})") from exc
    if not isinstance(obj, dict):
        raise error(f"{what} is a msgpack {type(obj).__name__}, not a map")
    for key in obj:
        if not isinstance(key, str):
            raise error(f"{what}: top-level map keys must be strings")
    return obj


class FrameDecoder:
    """Incremental frame decoder: :meth:`feed` bytes, pull maps with :meth:`next_frame`.

    Any split of the stream, down to one byte at a time, yields the same
    frames. After a :class:`~ferry.errors.ProtocolError` the decoder is
    poisoned: every later call re-raises the same error, because a connection
    that sent garbage cannot be resynchronised and must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 0 or max_frame > 0xFFFFFFFF:
            raise ValueError("max_frame must be 0..2**32-1")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Number of bytes received but not yet returned as frames."""
        return len(self._buf)

    @property
    def error(self) -> ProtocolError | None:
        """The error that poisoned this decoder, or None."""
        return self._error

    def _poison(self, exc: ProtocolError) -> ProtocolError:
        self._error = exc
        self._buf.clear()
        return exc

    def _check_header(self) -> int | None:
        """Return the body length of the head frame, or None if its header is incomplete."""
        if len(self._buf) < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        if length > self.max_frame:
            raise self._poison(
                FrameTooLarge(
                    # Said so that a client sending a big domain XML learns
                    # why: the frame is refused before a byte of it is read.
                    f"frame of {length} bytes refused: the limit is {self.max_frame} bytes "
                    "([limits] max_frame); a request, such as a domain XML, must fit in one",
                    size=length,
                    limit=self.max_frame,
                )
            )
        length_: int = length
        return length_

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        Raises :class:`~ferry.errors.FrameTooLarge` as soon as the head frame's
        header is complete and announces more than ``max_frame`` bytes, so an
        oversized body is never buffered. Raises the poisoning error if the
        decoder already failed, and :class:`~ferry.errors.ProtocolError` for
        data fed after :meth:`eof`.
        """
        if self._error is not None:
            raise self._error
        if self._eof:
            raise self._poison(ProtocolError("data received after end of stream"))
        if not data:
            return
        self._buf += data
        self._check_header()

    def next_frame(self) -> dict[str, Any] | None:
        """Return the next complete frame's map, or None if more data is needed.

        Raises :class:`~ferry.errors.FrameTooLarge` (oversized header),
        :class:`~ferry.errors.FrameGarbage` (body not exactly one msgpack map
        with string keys), :class:`~ferry.errors.FrameTruncated` (stream ended
        inside this frame), or the poisoning error of an earlier failure.
        """
        if self._error is not None:
            raise self._error
        length = self._check_header()
        if length is None or len(self._buf) < HEADER_SIZE + length:
            if self._eof and self._buf:
                raise self._poison(self._truncated())
            return None
        body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        try:
            return decode_body(body)
        except FrameGarbage as exc:
            self._poison(exc)
            raise

    def _truncated(self) -> FrameTruncated:
        return FrameTruncated(
            f"stream ended inside a frame ({len(self._buf)} bytes buffered)",
            buffered=len(self._buf),
        )

    def _head_complete(self) -> bool:
        if len(self._buf) < HEADER_SIZE:
            return False
        (length,) = _HEADER.unpack_from(self._buf)
        complete: bool = len(self._buf) >= HEADER_SIZE + length
        return complete

    def eof(self) -> None:
        """Record the end of the stream.

        Raises :class:`~ferry.errors.FrameTruncated` if a partial frame is
        buffered. When complete frames are still waiting in front of it, they
        stay available and :meth:`next_frame` raises the truncation once they
        have been returned. Raises the poisoning error if already failed.
        """
        if self._error is not None:
            raise self._error
        self._eof = True
        if self._buf and not self._head_complete():
            raise self._poison(self._truncated())

    def take_buffered(self) -> bytes:
        """Return and clear the bytes buffered after the last returned frame.

        Used when the stream switches from frames to raw bytes (a tunnel):
        whatever arrived after the switching frame belongs to the raw stream.
        Raises the poisoning error if the decoder failed.
        """
        if self._error is not None:
            raise self._error
        data = bytes(self._buf)
        self._buf.clear()
        return data
