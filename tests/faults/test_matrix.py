"""Never two copies, never none: every fault x phase cell of issue 10, end to end.

See fault_matrix.py for how a cell runs and what it asserts; the matrix of
outcomes is printed at the end of the run (conftest.py).  One fresh two-host
test bed per cell, torn down even when the cell fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fault_matrix import CELLS, KNOWN_BUGS, Cell, CellRecord, run_cell

from cluster import Cluster

pytestmark = [pytest.mark.faults, pytest.mark.e2e]

PARAMS = [
    pytest.param(
        c,
        id=c.id,
        marks=[pytest.mark.xfail(reason=KNOWN_BUGS[c.id], strict=True)]
        if c.id in KNOWN_BUGS
        else [],
    )
    for c in CELLS
]


@pytest.mark.parametrize("cell", PARAMS)
def test_cell(
    cell: Cell,
    cell_record: CellRecord,
    cluster: Cluster,
    guest_kernel: Path,
    virt_type: str,
    tmp_path: Path,
) -> None:
    run_cell(cluster, cell, cell_record, guest_kernel, virt_type, tmp_path)
