"""tools/bench/storage.py's figures: ratios to the floor, the report, variant names."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import storage  # noqa: E402
from storage_report import (  # noqa: E402
    MIB,
    StorageRep,
    VariantStatus,
    build_report,
    print_report,
    ratio_summary,
)

CONFIG = {"disk_mib": 64, "mem_mib": 256, "virt": "kvm", "reps": 3, "cpus": 2,
          "guest_write_mib_s": 20}  # fmt: skip


def rep(variant: str, rnd: int, wall: float, *, workload: str = "idle",
        disk_ms: float | None = 500.0) -> StorageRep:  # fmt: skip
    agent = wall - 200 if variant.startswith("ferry") else None
    return StorageRep(variant=variant, workload=workload, round=rnd, wall_ms=wall,
                      disk_ms=disk_ms, memory_ms=200.0, downtime_ms=50.0,
                      disk_bytes=64 * MIB, steps={"launch": 100.0}, agent_ms=agent)  # fmt: skip


def test_ratio_is_of_the_medians_and_min_max_of_the_per_round_pairs() -> None:
    floor = [rep("floor-tls", 1, 1000), rep("floor-tls", 2, 2000), rep("floor-tls", 3, 1500)]
    ferry = [rep("ferry", 1, 1100), rep("ferry", 2, 2000), rep("ferry", 3, 1800)]
    r = ratio_summary(ferry, floor)
    assert r is not None
    assert r["median"] == pytest.approx(1800 / 1500)
    assert r["min"] == pytest.approx(1.0)
    assert r["max"] == pytest.approx(1.2)


def test_ratio_without_a_usable_floor_is_none() -> None:
    assert ratio_summary([rep("ferry", 1, 1000)], []) is None
    assert ratio_summary([rep("ferry", 1, 1000)], [rep("floor-tls", 1, 0)]) is None
    # A floor from another round only: the median ratio, no pairs.
    r = ratio_summary([rep("ferry", 1, 1000)], [rep("floor-tls", 2, 500)])
    assert r == {"median": 2.0, "min": None, "max": None}


def test_report_rows_ratios_refusals_and_verdict() -> None:
    reps = [rep("floor-tls", 1, 1000), rep("ferry", 1, 1050), rep("floor-tls", 2, 1000),
            rep("ferry", 2, 1300), rep("ferry-sync", 1, 1500, workload="busy"),
            rep("floor-tls", 1, 1000, workload="busy", disk_ms=0.0)]  # fmt: skip
    status = {"idle": {"ferry-tunnelled": VariantStatus(refused="--tunnelled cannot copy",
                                                        attempts=1),
                       "ferry": VariantStatus(attempts=2),
                       "floor-tls": VariantStatus(attempts=2)},
              "busy": {"ferry-sync": VariantStatus(attempts=2, not_converged=1,
                                                   failures=["round 2: cut off"])}}  # fmt: skip
    variants = {"idle": ["floor-tls", "ferry", "ferry-tunnelled"],
                "busy": ["floor-tls", "ferry-sync"]}  # fmt: skip
    report = build_report(CONFIG, reps, status, variants)
    idle = report["tables"]["idle"]
    assert idle["rows"]["ferry"]["ratio_to_floor"]["median"] == pytest.approx(1175 / 1000)
    assert idle["rows"]["ferry"]["floor"] == "floor-tls"
    assert idle["rows"]["ferry"]["disk_mib_s"]["median"] == pytest.approx(128.0)
    assert idle["rows"]["ferry"]["agent_ratio_to_floor"] == pytest.approx(975 / 1000)
    assert idle["rows"]["floor-tls"]["agent_ratio_to_floor"] is None
    assert idle["rows"]["ferry-tunnelled"]["refused"] == "--tunnelled cannot copy"
    assert idle["rows"]["ferry-tunnelled"]["wall_ms"] is None
    assert idle["verdict"] == {"ferry_over_floor": pytest.approx(1.175), "target": 1.10,
                               "met": False}  # fmt: skip
    busy = report["tables"]["busy"]
    # No floor-tls-sync ran: ferry-sync is compared with floor-tls.
    assert busy["rows"]["ferry-sync"]["floor"] == "floor-tls"
    assert busy["rows"]["ferry-sync"]["ratio_to_floor"]["median"] == pytest.approx(1.5)
    assert busy["rows"]["floor-tls"]["disk_mib_s"] is None  # no disk time: no throughput
    assert busy["verdict"] is None
    json.dumps(report, allow_nan=False)  # valid JSON: no Infinity/NaN anywhere
    out = io.StringIO()
    with redirect_stdout(out):
        print_report(report)
    text = out.getvalue()
    assert "refused: --tunnelled cannot copy" in text
    assert "converged 1/2, did not converge 1/2" in text
    assert "NOT MET" in text


def test_variant_names_are_checked() -> None:
    assert storage.parse_variants("ferry, floor-tls,ferry", "--variants") == ["ferry", "floor-tls"]
    with pytest.raises(ValueError, match="ferry-fast"):
        storage.parse_variants("ferry,ferry-fast", "--variants")
    with pytest.raises(ValueError, match="none given"):
        storage.parse_variants(" , ", "--variants")
