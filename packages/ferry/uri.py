"""The authority part of Ferry's URIs (``HOST``, ``HOST:PORT``, ``[V6]:PORT``)."""

from __future__ import annotations

__all__ = ["split_authority"]


def split_authority(rest: str) -> tuple[str, str]:
    """``"h:1"`` → ``("h", "1")``; ``"[::1]:2"`` → ``("::1", "2")``; a bare IPv6 or host → no port.

    The port is returned as text (possibly empty) for the caller to check
    and word its own error.
    """
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        return host, tail[1:] if tail.startswith(":") else ""
    if rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        return host, port_text
    return rest, ""
