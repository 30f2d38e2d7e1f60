"""Dst ``link_probe``: the receiving end of the source's pre-flight link probe.

The source sends frames of random bytes for about half a second and takes
bytes acknowledged over time as the data path's speed
(:mod:`ferry_source.preflight`).  Here they are counted and dropped:
nothing is stored, so a probe costs no memory beyond the frame being read.
Peers need the ``link_probe`` op in the ACL (when rules name peers); no
domain is involved.
"""

from __future__ import annotations

from typing import Any

from ferry.acl import check_access
from ferry.errors import MessageInvalid
from ferry.rpc import RequestContext
from ferry_destination.context import DestinationContext

__all__ = ["MAX_PROBE_BYTES", "link_probe"]

#: The most one probe request may carry (the frame limit's default).
MAX_PROBE_BYTES = 1 << 20


async def link_probe(
    dst: DestinationContext, ctx: RequestContext, args: dict[str, Any]
) -> dict[str, Any]:
    """Count ``data`` and drop it: ``{"bytes": len(data)}``.

    Raises:
        AccessDenied: the caller may not run ``link_probe``.
        MessageInvalid: ``data`` is over :data:`MAX_PROBE_BYTES`.
    """
    # Peers were checked before the handler; local non-root callers are not.
    check_access(dst.config.acl, ctx.subject, "link_probe")
    data = args["data"]
    if len(data) > MAX_PROBE_BYTES:
        raise MessageInvalid(
            f"link_probe: {len(data)} bytes in one request, over the {MAX_PROBE_BYTES} "
            "a probe may carry; send smaller chunks",
            op="link_probe", field="data",
        )  # fmt: skip
    return {"bytes": len(data)}
