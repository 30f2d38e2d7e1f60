"""One-use tunnel tokens (destination side).

Prepare of a tunnelled migration issues one token; it admits exactly one data
connection per channel (0 for qemu's main stream, 1..N for multifd), until
the incoming migration ends or the token expires.  A token is a credential:
only its SHA-256 is kept, and it never appears in a log.

Thread-safe: data connections are authenticated on relay threads while the
event loop issues and revokes tokens.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ferry.errors import AuthError

__all__ = ["TokenBook", "TunnelGrant"]

T = TypeVar("T")


@dataclass
class TunnelGrant(Generic[T]):
    """What one token admits: which migration, how many channels, until when."""

    name: str
    channels: int
    expires_at: float
    allow_plaintext: bool
    sink: T
    used: set[int] = field(default_factory=set)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook(Generic[T]):
    """Issued tokens, keyed by their digest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: dict[bytes, TunnelGrant[T]] = {}

    def issue(
        self, name: str, channels: int, ttl_s: float, sink: T, *, allow_plaintext: bool = False
    ) -> str:
        """Return a fresh token admitting ``channels`` data connections for ``name``.

        Any earlier token of ``name`` is revoked: one migration in at a time.
        """
        if not 1 <= channels <= 256:
            raise ValueError(f"channels must be 1..256, not {channels}")
        token = secrets.token_urlsafe(32)
        grant = TunnelGrant(name, channels, self._clock() + ttl_s, allow_plaintext, sink)
        with self._lock:
            self._drop(name)
            self._grants[_digest(token)] = grant
        return token

    def redeem(self, token: str, channel: int, mode: str) -> TunnelGrant[T]:
        """Admit one data connection; raise :class:`~ferry.errors.AuthError` saying why not."""
        key = _digest(token)
        with self._lock:
            grant = self._grants.get(key)
            if grant is None:
                raise AuthError("tunnel token unknown (never issued, revoked, or already ended)")
            if self._clock() > grant.expires_at:
                del self._grants[key]
                raise AuthError(f"tunnel token for '{grant.name}' expired")
            if not 0 <= channel < grant.channels:
                raise AuthError(
                    f"tunnel channel {channel} out of range: '{grant.name}' has "
                    f"{grant.channels} channel(s)"
                )
            if channel in grant.used:
                raise AuthError(
                    f"tunnel token already used for channel {channel} of '{grant.name}'"
                )
            if mode == "plain" and not grant.allow_plaintext:
                raise AuthError(
                    "plaintext tunnel refused: this host's config does not allow it "
                    "([tls] allow_plaintext_tunnel)"
                )
            grant.used.add(channel)
            return grant

    def revoke(self, name: str) -> None:
        """Forget ``name``'s token (its migration ended, either way)."""
        with self._lock:
            self._drop(name)

    def _drop(self, name: str) -> None:
        for key in [k for k, g in self._grants.items() if g.name == name]:
            del self._grants[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._grants)
