"""The fault matrix's bookkeeping: one record per cell, the matrix printed at the end.

Each cell fills a :class:`fault_matrix.CellRecord` (fixture ``cell_record``);
the pass/fail verdict comes from pytest's own report.  At the end of the
session the matrix (fault x phase → outcome, settle time; then the client-driven
column of issue 13, one line per cell) is printed in the
terminal summary and written as JSON to ``.pytest_cache/d/ferry-faults/
matrix.json`` and ``/tmp/ferry-fault-matrix.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_matrix import (
    CLIENT_GRACE_S,
    FAULT_TITLES,
    FAULTS,
    NOT_APPLICABLE,
    PHASES,
    CellRecord,
)

JSON_COPY = Path(os.environ.get("FERRY_FAULT_MATRIX_JSON", "/tmp/ferry-fault-matrix.json"))

_RECORDS: dict[str, CellRecord] = {}
CLIENT_TITLES = {**FAULT_TITLES, "kill-client": "kill -9 ferryctl"}
#: A ferryctl migrate that reports later than this after the fault is listed.
SLOW_EXIT_S = 10.0


@pytest.fixture
def cell_record(request: pytest.FixtureRequest) -> Iterator[CellRecord]:
    """The record of the running cell (the test fills it; the verdict is added here)."""
    cell = request.node.callspec.params["cell"]
    record = CellRecord.for_cell(cell)
    _RECORDS[record.id] = record
    yield record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Copy the verdict of each cell into its record."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    callspec = getattr(item, "callspec", None)
    if callspec is None or "cell" not in callspec.params:
        return
    record = _RECORDS.get(callspec.params["cell"].id)
    if record is None:
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        if hasattr(rep, "wasxfail") and rep.skipped:
            # A known agent bug (fault_matrix.KNOWN_BUGS): failed as expected.
            record.status = "xfail"
            text = str(rep.longrepr) if rep.longrepr is not None else ""
            record.error = _first_error_line(call.excinfo.value if call.excinfo else None, text)
        elif rep.passed:
            record.status = "passed"
        elif rep.skipped:
            record.status = "skipped"
        else:
            record.status = "failed"
            text = str(rep.longrepr) if rep.longrepr is not None else ""
            record.error = _first_error_line(call.excinfo.value if call.excinfo else None, text)


def _first_error_line(exc: BaseException | None, longrepr: str) -> str:
    text = f"{type(exc).__name__}: {exc}" if exc is not None else longrepr
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[:4])[:400]


def _cell_text(record: CellRecord | None) -> str:
    if record is None:
        return "-"
    if record.status == "passed":
        text = (
            (record.outcome or "?")
            .replace(" (unknown → recovered)", ", recovered")
            .replace(" (post-copy → resumed)", ", pc-resumed")
            .replace(" (post-copy VM lost, reported)", ", lost")
        )
    elif record.status == "skipped":
        text = "skipped"
    elif record.status == "xfail":
        text = f"XFAIL@{record.stage}"
    elif record.status == "failed":
        text = f"FAIL@{record.stage}"
        if record.outcome:
            text += f" ({record.outcome})"
    else:
        text = record.status
    if record.settle_s is not None:
        text += f" {record.settle_s:.0f}s"
    return text


def _table(leased: bool) -> list[str]:
    by_key = {
        (r.fault, r.phase): r
        for r in _RECORDS.values()
        if r.leased == leased and not r.variant and r.mode == "p2p"
    }
    if not by_key:
        return []
    # The post-copy column (issue 12) only where a post-copy cell ran.
    phases = [p for p in PHASES if p != "postcopy" or any(ph == p for _, ph in by_key)]
    width = 26
    head = f"{'':<30}" + "".join(f"{p:<{width}}" for p in phases)
    lines = [head]
    for fault in FAULTS:
        row = f"{FAULT_TITLES[fault]:<30}"
        for phase in phases:
            if (fault, phase) in NOT_APPLICABLE:
                cell = "n/a"
            else:
                cell = _cell_text(by_key.get((fault, phase)))
            row += f"{cell[: width - 1]:<{width}}"
        lines.append(row)
    return lines


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    """Print the matrix and save it as JSON."""
    if not _RECORDS:
        return
    tr = terminalreporter
    tr.section("fault matrix (outcome, seconds from the fault to settled)")
    for leased in (False, True):
        lines = _table(leased)
        if lines:
            tr.write_line("leased disk:" if leased else "plain guest:")
            for line in lines:
                tr.write_line("  " + line)
    extras = [r for r in _RECORDS.values() if r.variant and r.mode == "p2p"]
    if extras:
        tr.write_line("beside the matrix:")
        for r in extras:
            tr.write_line(f"  {r.id} ({r.point}): {_cell_text(r)}")
    client = [r for r in _RECORDS.values() if r.mode == "client"]
    if client:
        tr.write_line(f"client-driven column (ferryctl migrate --client-driven, "
                      f"grace {CLIENT_GRACE_S}s):")  # fmt: skip
        for r in client:
            what = CLIENT_TITLES.get(r.fault, r.fault)
            line = f"  {f'{what} @{r.point}':<48}{_cell_text(r)}"
            if r.orphan_end_s is not None:
                line += f" (A ended it at +{r.orphan_end_s}s"
                gone = r.b_discard_s
                line += f", B's qemu gone at +{gone}s)" if gone is not None else ")"
            tr.write_line(line)
    tr.write_line(
        "  (seconds: from the fault to everything settled; 'recovered': A reported the "
        "outcome unknown and 'ferryctl migrate-recover' settled it; 'pc-resumed': A fenced "
        "its copy as paused in post-copy and 'ferryctl migrate --postcopy --postcopy-resume' "
        "finished the move; 'lost': a qemu of the post-copy VM was killed, the loss was "
        "reported, resuming failed, both halves were destroyed)"
    )
    records = sorted(_RECORDS.values(), key=lambda r: (r.mode, r.leased, r.phase, r.fault))
    slow = [r for r in records if r.exit_s is not None and r.exit_s > SLOW_EXIT_S]
    if slow:
        tr.write_line(f"ferryctl migrate took more than {SLOW_EXIT_S:.0f}s after the fault in:")
        for r in slow:
            tr.write_line(f"  {r.id}: {r.exit_s}s: {r.migrate_error}")
    known = [r for r in records if r.status == "xfail"]
    if known:
        tr.write_line("known agent bugs (xfail, strict):")
        for r in known:
            tr.write_line(f"  {r.id} @{r.stage}: {r.error}")
    failed = [r for r in records if r.status == "failed"]
    if failed:
        tr.write_line("failed cells:")
        for r in failed:
            tr.write_line(f"  {r.id} @{r.stage}: {r.error}")
    timed = [r for r in records if r.total_s is not None]
    if timed:
        line = (
            f"cells: {len(records)}, passed {sum(r.status == 'passed' for r in records)}, "
            f"total {sum(r.total_s or 0 for r in timed):.0f}s"
        )
        settled = [r for r in timed if r.settle_s is not None]
        if settled:
            slowest = max(settled, key=lambda r: r.settle_s or 0.0)
            line += f"; slowest to settle: {slowest.id} {slowest.settle_s}s"
        longest = max(timed, key=lambda r: r.total_s or 0.0)
        line += f"; longest cell: {longest.id} {longest.total_s}s"
        tr.write_line(line)
    payload: dict[str, Any] = {
        "not_applicable": {f"{f}-{p}": why for (f, p), why in NOT_APPLICABLE.items()},
        "cells": [r.to_json() for r in records],
    }
    text = json.dumps(payload, indent=1, default=str)
    targets = [JSON_COPY]
    cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider
    if cache is not None:
        targets.append(cache.mkdir("ferry-faults") / "matrix.json")
    for target in targets:
        try:
            target.write_text(text)
        except OSError as exc:
            tr.write_line(f"could not write {target}: {exc}")
        else:
            tr.write_line(f"matrix written to {target}")
