"""The miniature replication of the paper's α × repetition grid (``dualobj repro``), as a Python API."""

from dualobj.experiments._grid import PAPER_ALPHAS, PRESETS, Cell, GridConfig, train_cell
from dualobj.experiments._report import METRICS, alpha_label, plot, render_table, summarize
from dualobj.experiments._runner import RESULTS_FILE, load_results, pending_cells, run_grid, write_json_atomic

__all__ = [
    "METRICS",
    "PAPER_ALPHAS",
    "PRESETS",
    "RESULTS_FILE",
    "Cell",
    "GridConfig",
    "alpha_label",
    "load_results",
    "pending_cells",
    "plot",
    "render_table",
    "run_grid",
    "summarize",
    "train_cell",
    "write_json_atomic",
]
