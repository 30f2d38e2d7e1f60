"""Version and feature negotiation between the two ends of a connection.

Both sides send their version and feature lists (``hello`` / ``welcome``) and
compute the same result: the common major version, the lower minor version,
and the intersection of features. A feature one side marks mandatory must be
spoken by the other, otherwise the connection is refused with an error that
names it: the explicit handshake libvirt's v3 migration protocol lacked.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import FeatureMissing, VersionMismatch

from .messages import Hello, Welcome

__all__ = ["Negotiated", "negotiate"]


@dataclass(frozen=True)
class Negotiated:
    """What both sides agreed on, and who the peer is."""

    version: tuple[int, int]
    features: frozenset[str]
    peer_host_uuid: str
    peer_hostname: str
    peer_role: str


def _names(features: frozenset[str]) -> str:
    return ", ".join(repr(f) for f in sorted(features))


def negotiate(local: Hello | Welcome, remote: Hello | Welcome) -> Negotiated:
    """Agree on version and features with the peer whose greeting is ``remote``.

    Raises :class:`~ferry.errors.VersionMismatch` if the major versions
    differ (naming both), and :class:`~ferry.errors.FeatureMissing` if either
    side marks mandatory a feature the other lacks (naming the features and
    which side lacks them; ``details["missing"]`` lists them).
    """
    if local.version[0] != remote.version[0]:
        lv = f"{local.version[0]}.{local.version[1]}"
        rv = f"{remote.version[0]}.{remote.version[1]}"
        raise VersionMismatch(
            f"protocol version mismatch: host {local.hostname!r} speaks {lv}, "
            f"host {remote.hostname!r} speaks {rv}",
            local_version=list(local.version),
            remote_version=list(remote.version),
        )
    missing_here = remote.mandatory - local.features
    if missing_here:
        raise FeatureMissing(
            f"host {remote.hostname!r} requires feature(s) {_names(missing_here)} "
            f"that host {local.hostname!r} lacks",
            missing=sorted(missing_here),
            required_by=remote.hostname,
            lacking=local.hostname,
        )
    missing_there = local.mandatory - remote.features
    if missing_there:
        raise FeatureMissing(
            f"host {local.hostname!r} requires feature(s) {_names(missing_there)} "
            f"that host {remote.hostname!r} lacks",
            missing=sorted(missing_there),
            required_by=local.hostname,
            lacking=remote.hostname,
        )
    return Negotiated(
        version=(local.version[0], min(local.version[1], remote.version[1])),
        features=local.features & remote.features,
        peer_host_uuid=remote.host_uuid,
        peer_hostname=remote.hostname,
        peer_role=remote.role,
    )
