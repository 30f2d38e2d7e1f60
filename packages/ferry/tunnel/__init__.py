"""The tunnel of a tunnelled migration: qemu → ferry-source → peer → ferry-destination → qemu.

- :mod:`.wire`: the data connection's opening exchange, sans-I/O.
- :mod:`.tokens`: one-use, expiring tokens that bind a data connection to a
  prepared incoming migration (destination side).
- :mod:`.channel`: one data connection's blocking I/O (TLS handshake, token
  exchange, then the native relay) and the set of channels of one migration.
"""

from .tokens import TokenBook, TunnelGrant
from .wire import PREAMBLE, AnswerReader, encode_accept, encode_open, encode_refusal, parse_open

__all__ = [
    "PREAMBLE",
    "AnswerReader",
    "TokenBook",
    "TunnelGrant",
    "encode_accept",
    "encode_open",
    "encode_refusal",
    "parse_open",
]
