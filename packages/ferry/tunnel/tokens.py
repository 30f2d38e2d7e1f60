"""One-use tunnel tokens (destination side).

Prepare of a tunnelled migration issues one token; it admits exactly one data
connection per channel (0 for qemu's main stream, 1..N for multifd), until
the incoming migration ends or the token expires.  A token is a credential:
only its SHA-256 is kept, and it never appears in a log.

A token may also name its *redeemer*, the one host whose certificate may
present it (:meth:`TunnelGrant.check_redeemer`): in a client-driven
migration the token travels through the client (ferryctl), and a token that
leaked on the way must not let another host of the CA, or the client's own
operator certificate, feed the incoming qemu.

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

from ferry.acl import Subject
from ferry.errors import AuthError

__all__ = ["TokenBook", "TunnelGrant"]

T = TypeVar("T")


@dataclass
class TunnelGrant(Generic[T]):
    """What one token admits: which migration, how many channels, until when, and who.

    ``redeemer`` is the host name a redeeming certificate must carry (its
    common name or a DNS subjectAltName, compared case-insensitively);
    None admits any certificate that passed the agent's other checks.
    """

    name: str
    channels: int
    expires_at: float
    allow_plaintext: bool
    sink: T
    redeemer: str | None = None
    used: set[int] = field(default_factory=set)

    def check_redeemer(self, subject: Subject) -> None:
        """Refuse a data connection whose certificate is not the token's host.

        An operator certificate never redeems a token that names a host:
        only a host's agent carries a migration stream.

        Raises:
            AuthError: naming the token's host and what the certificate says.
        """
        if self.redeemer is None:
            return
        wanted = self.redeemer.casefold()
        if subject.kind == "peer":
            names = [n for n in (subject.peer, *subject.peer_names) if n]
            if any(n.casefold() == wanted for n in names):
                return
            who = " ".join([f"CN={subject.peer or '<none>'}"]
                           + [f"DNS={n}" for n in subject.peer_names])  # fmt: skip
        elif subject.kind == "operator":
            who = (f"operator certificate {subject.operator!r} (only the source host's "
                   "agent carries the stream)")  # fmt: skip
        else:
            who = subject.describe()
        raise AuthError(f"tunnel token of '{self.name}' is for host {self.redeemer}; "
                        f"refused for {who}")  # fmt: skip


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenBook(Generic[T]):
    """Issued tokens, keyed by their digest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._grants: dict[bytes, TunnelGrant[T]] = {}

    def issue(
        self,
        name: str,
        channels: int,
        ttl_s: float,
        sink: T,
        *,
        allow_plaintext: bool = False,
        redeemer: str | None = None,
    ) -> str:
        """Return a fresh token admitting ``channels`` data connections for ``name``.

        Any earlier token of ``name`` is revoked: one migration in at a time.
        ``redeemer``: the only host that may present it
        (:meth:`TunnelGrant.check_redeemer`); None, any.
        """
        if not 1 <= channels <= 256:
            raise ValueError(f"channels must be 1..256, not {channels}")
        if redeemer is not None and not redeemer:
            raise ValueError("redeemer must be a host name or None")
        token = secrets.token_urlsafe(32)
        grant = TunnelGrant(name, channels, self._clock() + ttl_s, allow_plaintext, sink,
                            redeemer=redeemer)  # fmt: skip
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

    def spent(self, name: str) -> int:
        """How many data connections ``name``'s token has admitted (0 when it has none)."""
        with self._lock:
            return sum(len(g.used) for g in self._grants.values() if g.name == name)

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
