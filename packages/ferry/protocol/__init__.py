"""Ferry's wire protocol, sans-I/O: bytes in, messages and errors out; messages in, bytes out.

- :mod:`.framing`: 4-byte length + msgpack map frames, incremental decoder.
- :mod:`.messages`: hello/welcome, request, reply, error reply, event, tunnel.
- :mod:`.ops`: argument schemas of every request op.
- :mod:`.cookie`: the migration cookie and its sections.
- :mod:`.negotiation`: version and feature agreement.
- :mod:`.connection`: the handshake and frame flow of one connection.
- :mod:`.phases`: phase order of a migration on each side.

Nothing here opens a socket or touches asyncio.
"""

from .connection import Connection, ConnectionState
from .cookie import (
    KNOWN_SECTIONS,
    MAX_COOKIE,
    Cookie,
    Graphics,
    Identity,
    LockState,
    Persistent,
    Snapshots,
    Statistics,
)
from .fields import FieldSpec
from .framing import DEFAULT_MAX_FRAME, FrameDecoder, encode_frame
from .messages import (
    PROTOCOL_VERSION,
    ROLES,
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
from .negotiation import Negotiated, negotiate
from .ops import OPS, OpSpec, register_op, validate_args
from .phases import PHASES, DestinationPhases, SourcePhases

__all__ = [
    "DEFAULT_MAX_FRAME",
    "KNOWN_SECTIONS",
    "MAX_COOKIE",
    "OPS",
    "PHASES",
    "PROTOCOL_VERSION",
    "ROLES",
    "Connection",
    "ConnectionState",
    "Cookie",
    "DestinationPhases",
    "ErrorReply",
    "Event",
    "FieldSpec",
    "FrameDecoder",
    "Graphics",
    "Hello",
    "Identity",
    "LockState",
    "Message",
    "Negotiated",
    "OpSpec",
    "Persistent",
    "Reply",
    "Request",
    "Snapshots",
    "SourcePhases",
    "Statistics",
    "Tunnel",
    "Welcome",
    "encode_frame",
    "negotiate",
    "parse_message",
    "register_op",
    "validate_args",
]
