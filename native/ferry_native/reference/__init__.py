"""Pure-Python reference of ferry_native: the same names and behaviour (``BACKEND == "reference"``).

For tests that run one suite against both backends and compare them, and as
the readable specification of the model.  Agents never use it: they refuse
to start without the compiled :mod:`ferry_native`.
"""

from __future__ import annotations

from ferry_native.reference.accounting import Sample, TransferAccount
from ferry_native.reference.relay import MAX_BUFFER_SIZE, Relay, relay
from ferry_native.reference.tls import TlsEndpoint, TlsError, TlsStream

__all__ = [
    "BACKEND",
    "MAX_BUFFER_SIZE",
    "Relay",
    "Sample",
    "TlsEndpoint",
    "TlsError",
    "TlsStream",
    "TransferAccount",
    "relay",
]

BACKEND = "reference"
