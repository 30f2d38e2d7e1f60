"""The client-driven variant of ``migration.py`` (issue 13) and its comparison with p2p.

``client-driven`` runs ``ferryctl migrate NAME ferry://PEER --live --json
--client-driven``: ferryctl itself runs Begin/Perform/Confirm on the source
agent's admin socket and Prepare/Finish on the destination agent's port
over TLS with an operator certificate (``Cluster.operator_pki()``; both
hosts get ``Cluster.operator_config()``).  It must dial the peer, so it runs
in the *source* host's network namespace: ``ip netns exec SRC env
FERRY_OPERATOR_PKI=DIR ferryctl ...``.

``ip netns exec`` costs a few ms of its own (``ip``'s start-up, setns, the
/sys remount, exec of ``env``), so the p2p ferryctl is launched the same way
when both variants run (``--p2p-launch auto``): the ratio compares like
with like.  With ``--p2p-launch direct`` (p2p outside the namespaces, as
when ``ferry`` runs alone) the comparison also gives the client-driven wall
time minus the median of ``ip netns exec SRC env true``, timed right before
every repetition of both variants.

The two variants are interleaved on the same guest (``schedule``): round
``r`` runs each variant once, in an order rotated every round (p2p, cd, cd,
p2p, ...), and the guest moves back and forth after every migration, so
both variants see both directions equally often (with an even ``--reps``)
and neither is always first after the memory warm-up.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cluster import Cluster, HostEnv

__all__ = [
    "FERRYCTL_VARIANTS",
    "VARIANTS",
    "comparison",
    "finite",
    "migrate_argv",
    "netns_probe_argv",
    "parse_variants",
    "print_comparison",
    "schedule",
]

P2P = "ferry"
CLIENT = "client-driven"
VARIANTS = (P2P, CLIENT, "minimal")
#: The variants that run ferryctl against the agents (interleaved in one phase).
FERRYCTL_VARIANTS = (P2P, CLIENT)


def parse_variants(text: str) -> list[str]:
    """``ferry,client-driven`` -> the known variant names, in canonical order.

    Raises:
        ValueError: an unknown or no name.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(VARIANTS)}"
        )
    return [v for v in VARIANTS if v in names]


def schedule(variants: Sequence[str], reps: int) -> list[tuple[int, str]]:
    """(round, variant) in run order: every round runs each variant once, rotated."""
    out: list[tuple[int, str]] = []
    for rnd in range(reps):
        k = rnd % len(variants)
        out += [(rnd, v) for v in [*variants[k:], *variants[:k]]]
    return out


def _env(cluster: Cluster) -> list[str]:
    return ["env", f"FERRY_OPERATOR_PKI={cluster.operator_pki()}"]


def migrate_argv(
    cluster: Cluster, src: HostEnv, dst: HostEnv, name: str, *, variant: str, via_netns: bool
) -> list[str]:
    """argv of one ``ferryctl migrate --live --json`` from ``src`` to ``dst``.

    client-driven always runs in ``src``'s namespace (it dials the peer); p2p
    does when ``via_netns``, through the same ``ip netns exec SRC env ...``
    launcher (the variable is only read with ``--client-driven``).
    """
    args = ["migrate", name, dst.uri, "--live", "--json"]
    if variant == CLIENT:
        args.append("--client-driven")
    elif variant != P2P:
        raise ValueError(f"not a ferryctl variant: {variant}")
    argv = src.ferryctl_argv(*args)
    if variant == CLIENT or via_netns:
        return src.ns.exec_argv([*_env(cluster), *argv])
    return argv


def netns_probe_argv(cluster: Cluster, src: HostEnv) -> list[str]:
    """The launcher alone: ``ip netns exec SRC env FERRY_OPERATOR_PKI=... true``."""
    return src.ns.exec_argv([*_env(cluster), "true"])


class Rep(Protocol):
    """What the comparison reads of a repetition (``migration.FerryRep``)."""

    rep: int
    cli_wall_ms: float
    agent_wall_ms: float
    total_time_ms: float
    netns_ms: float | None

    @property
    def cli_overhead_ms(self) -> float: ...

    @property
    def agent_overhead_ms(self) -> float: ...


def _med(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den; None when either is missing or den is not positive (no inf/NaN)."""
    if num is None or den is None or den <= 0:
        return None
    return num / den


def comparison(p2p: Sequence[Rep], client: Sequence[Rep], p2p_via_netns: bool) -> dict[str, Any]:
    """client-driven against p2p of the same run: ratios of medians and added ms."""
    figures: dict[str, Callable[[Rep], float]] = {
        "ferryctl wall": lambda r: r.cli_wall_ms,
        "agent wall_time_ms": lambda r: r.agent_wall_ms,
        "overhead (ferryctl wall - qemu total)": lambda r: r.cli_overhead_ms,
        "overhead (agent wall - qemu total)": lambda r: r.agent_overhead_ms,
    }
    ratios: dict[str, float | None] = {}
    added: dict[str, float | None] = {}
    for label, get in figures.items():
        mp, mc = _med([get(r) for r in p2p]), _med([get(r) for r in client])
        ratios[f"{label}: client-driven / p2p"] = _ratio(mc, mp)
        added[f"{label}: client-driven - p2p"] = None if mc is None or mp is None else mc - mp
    # Per round (the two ran next to each other): robust against drifting load.
    by_round = {r.rep: r for r in p2p}
    pairs = [(c, by_round[c.rep]) for c in client if c.rep in by_round]
    for label in ("ferryctl wall", "agent wall_time_ms"):
        get = figures[label]
        added[f"{label}: client-driven - p2p, median of per-round pairs"] = _med(
            [get(c) - get(p) for c, p in pairs]
        )
    netns = _med([r.netns_ms for r in [*p2p, *client] if r.netns_ms is not None])
    if p2p_via_netns:
        launch = "both ferryctl runs launched via 'ip netns exec SRC env ...' (like with like)"
    else:
        launch = (
            "p2p ferryctl launched directly, client-driven via 'ip netns exec SRC env ...'; "
            "the corrected ratio subtracts the median 'ip netns exec SRC env true'"
        )
        corrected = [c.cli_wall_ms - netns for c in client] if netns is not None else []
        ratios["ferryctl wall minus ip netns exec: client-driven / p2p"] = _ratio(
            _med(corrected), _med([r.cli_wall_ms for r in p2p])
        )
    wall = "ferryctl wall" if p2p_via_netns else "ferryctl wall minus ip netns exec"
    ovh = "overhead ({} wall - qemu total): client-driven / p2p"
    return {
        "p2p_reps": len(p2p),
        "client_driven_reps": len(client),
        "launch": launch,
        "p2p_via_netns": p2p_via_netns,
        "netns_exec_median_ms": netns,
        "ratios": ratios,
        "added_ms": added,
        "headline": {
            "wall_ratio": ratios[f"{wall}: client-driven / p2p"],
            "overhead_ratio_agent": ratios[ovh.format("agent")],
            "overhead_ratio_cli": ratios[ovh.format("ferryctl")],
            "added_wall_ms_paired": added[
                "ferryctl wall: client-driven - p2p, median of per-round pairs"
            ],
        },
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if unit == "x" else f"{value:+.0f}"


def print_comparison(cmp: dict[str, Any], width: int) -> None:
    """The comparison block of the table (labels at least ``width`` wide)."""
    width = max(width, *(len(k) + 7 for k in cmp["added_ms"]), *(len(k) + 2 for k in cmp["ratios"]))
    print(
        f"\nclient-driven vs p2p ({cmp['client_driven_reps']} / {cmp['p2p_reps']} reps, "
        f"interleaved): {cmp['launch']}"
    )
    if cmp["netns_exec_median_ms"] is not None:
        label = "ip netns exec SRC env true (median)"
        print(f"{label:<{width}}{cmp['netns_exec_median_ms']:>9.0f}")
    for label, value in cmp["ratios"].items():
        print(f"{label:<{width}}{_fmt(value, 'x'):>9}")
    for label, value in cmp["added_ms"].items():
        print(f"{label + ' (ms)':<{width}}{_fmt(value, 'ms'):>9}")
    h = cmp["headline"]
    print(
        f"client-driven / p2p: wall {_fmt(h['wall_ratio'], 'x')}, overhead over qemu total "
        f"{_fmt(h['overhead_ratio_agent'], 'x')} (agent) / {_fmt(h['overhead_ratio_cli'], 'x')} "
        f"(ferryctl); adds {_fmt(h['added_wall_ms_paired'], 'ms')} ms wall (median of pairs)"
    )


def finite(value: Any) -> Any:
    """``value`` with infinite/NaN floats as None, so the report is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
