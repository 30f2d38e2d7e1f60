"""The authority part of Ferry's URIs (``HOST``, ``HOST:PORT``, ``[V6]:PORT``)."""

from __future__ import annotations

from ferry.errors import MigrationRefused

__all__ = ["DEFAULT_AGENT_PORT", "parse_dest_uri", "split_authority"]

#: The port both agents of a host listen on for peers (ferry://HOST means HOST:49160).
DEFAULT_AGENT_PORT = 49160


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


def parse_dest_uri(uri: str) -> tuple[str, int]:
    """``ferry://HOST[:PORT]`` → (host, port).

    Raises:
        MigrationRefused: for any other form.
    """
    prefix = "ferry://"
    if not uri.startswith(prefix):
        raise MigrationRefused(f"destination URI {uri!r} must look like ferry://HOST[:PORT]")
    rest = uri[len(prefix) :].rstrip("/")
    host, port_text = split_authority(rest)
    if not host:
        raise MigrationRefused(f"destination URI {uri!r} has no host")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise MigrationRefused(f"destination URI {uri!r}: bad port {port_text!r}")
        return host, int(port_text)
    return host, DEFAULT_AGENT_PORT
