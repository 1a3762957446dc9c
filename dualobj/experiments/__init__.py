"""The miniature replication of the paper's α × repetition grid (``dualobj repro``), as a Python API."""

from dualobj.experiments._grid import (
    PAPER_ALPHAS,
    PRESETS,
    PROBE_MODES,
    Cell,
    GridConfig,
    cell_data,
    check_data,
    train_cell,
)
from dualobj.experiments._objectives import OBJECTIVES, dual_objective, forward, md_objective
from dualobj.experiments._report import METRICS, alpha_label, plot, render_table, row_label, summarize
from dualobj.experiments._runner import (
    RESULTS_FILE,
    cell_id,
    folder_lock,
    grid_cells,
    load_results,
    pending_cells,
    run_grid,
    write_json_atomic,
)

__all__ = [
    "METRICS",
    "OBJECTIVES",
    "PAPER_ALPHAS",
    "PRESETS",
    "PROBE_MODES",
    "RESULTS_FILE",
    "Cell",
    "GridConfig",
    "alpha_label",
    "cell_data",
    "cell_id",
    "check_data",
    "dual_objective",
    "folder_lock",
    "forward",
    "grid_cells",
    "load_results",
    "md_objective",
    "pending_cells",
    "plot",
    "render_table",
    "row_label",
    "run_grid",
    "summarize",
    "train_cell",
    "write_json_atomic",
]
