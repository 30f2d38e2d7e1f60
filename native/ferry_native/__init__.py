"""ferry_native: the tunnel's byte relay, its TLS stream and the transfer accounting, compiled.

This package exposes the Cython build (``BACKEND == "native"``), which is what
the agents run::

    from ferry_native import Relay, Sample, TlsEndpoint, TlsStream, TransferAccount, relay

:mod:`ferry_native.reference` has the same names in pure Python
(``BACKEND == "reference"``), for tests that compare the two and as the
readable specification.  There is deliberately no silent fall back: when the
extension was not built, importing this package raises :class:`ImportError`
(the agents turn that into ``ferry.errors.NativeError`` and refuse to start).

Raises:
    ImportError: the compiled extension modules are missing or do not load.
"""

from __future__ import annotations

try:
    from ferry_native._accounting import Sample, TransferAccount
    from ferry_native._relay import MAX_BUFFER_SIZE, Relay, relay
    from ferry_native._tls import TlsEndpoint, TlsError, TlsStream
except ImportError as exc:  # pragma: no cover - exercised only on a broken build
    raise ImportError(
        "ferry_native: the compiled extension (ferry_native._relay / "
        "ferry_native._accounting / ferry_native._tls) is missing or broken "
        f"({exc}); build it with "
        "`make build` (or `pip install --no-build-isolation -e .`). "
        "ferry_native.reference is the pure-Python reference for tests, "
        "not a fallback."
    ) from exc

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

BACKEND = "native"
