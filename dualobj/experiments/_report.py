"""Summaries of a grid's results: mean ± std per (R, α), the best α per R, a rich table and two plots."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from dualobj._errors import check_probability

METRICS = ("ar_final", "ar_min", "ar_test_min", "md_elbo", "prefix", "prefix_causal", "probe_ar", "probe_prefix",
           "probe_md", "window_overlap", "bound_final", "bound_min")
"""Summarised values: test-split bits per byte (lower is better), probe accuracies (higher is better) and the share
of test windows found in the training subset. A row holds only the metrics its cells have (the probe modes are a
setting)."""


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ident(cell: dict) -> float | str:
    """A cell's point on its axis: α on the α axis, the objective's name on the objective axis."""
    objective = cell.get("objective", "dual")
    return cell["alpha"] if objective == "dual" else objective


def _value(cell: dict, metric: str) -> float | None:
    if metric.startswith("probe_"):
        return cell.get("probe", {}).get(metric.removeprefix("probe_"))
    return cell.get(metric)


def summarize(record: dict) -> dict:
    """Mean and standard deviation over seeds for every (R, α) and (R, objective) present, and the best per R.

    Args:
        record: ``{"cells": {key: result}}`` (the cells of one setting, e.g. from
            :func:`dualobj.experiments.grid_cells`).

    Returns:
        ``{"rows": [{"repetitions", "alpha", "objective", "seeds", "<metric>": [mean, std], "ar_rise": [...], ...}],
        "best": {R: {"ar_final": α or name, "ar_min": ..., "md_elbo": ...}}}``, rows sorted by R, then the α axis
        (α descending), then the objective axis by name. ``ar_rise`` is the final minus the early-stopped
        held-out AR loss (how far the curve climbed back). ``alpha`` is ``None`` on the objective axis.
    """
    groups: dict[tuple[int, float | str], list[dict]] = {}
    for cell in record.get("cells", {}).values():
        groups.setdefault((cell["repetitions"], _ident(cell)), []).append(cell)

    def order(item: tuple) -> tuple:
        (R, ident), _ = item
        return (R, 0, -ident, "") if not isinstance(ident, str) else (R, 1, 0.0, ident)

    rows = []
    for (R, ident), cells in sorted(groups.items(), key=order):
        row = {"repetitions": R, "alpha": None if isinstance(ident, str) else ident,
               "objective": ident if isinstance(ident, str) else "dual", "seeds": len(cells),
               "unique_tokens": cells[0]["unique_tokens"]}
        for m in METRICS:
            values = [_value(c, m) for c in cells]
            if values and all(v is not None for v in values):
                row[m] = list(_mean_std(values))
        row["ar_rise"] = list(_mean_std([c["ar_final"] - c["ar_min"] for c in cells]))
        if "bound_final" in row and "bound_min" in row:
            row["bound_rise"] = list(_mean_std([c["bound_final"] - c["bound_min"] for c in cells]))
        rows.append(row)
    best: dict[int, dict[str, float | str]] = {}
    for R in sorted({r["repetitions"] for r in rows}):
        at_r = [r for r in rows if r["repetitions"] == R]
        best[R] = {m: _row_ident(min(at_r, key=lambda r, m=m: r[m][0])) for m in ("ar_final", "ar_min", "md_elbo")}
    return {"rows": rows, "best": best}


def _row_ident(row: dict) -> float | str:
    return row["alpha"] if row["objective"] == "dual" else row["objective"]


def row_label(row: dict) -> str:
    """``"3/4"`` for a row of the α axis, the objective's name for a row of the objective axis."""
    return alpha_label(row["alpha"]) if row["objective"] == "dual" else row["objective"]


def alpha_label(alpha: float) -> str:
    """α as a short fraction where it is one (``"3/4"``, ``"1/64"``), else a decimal."""
    alpha = check_probability("alpha", alpha)
    for den in (1, 2, 4, 8, 16, 64, 256):
        num = alpha * den
        if abs(num - round(num)) < 1e-9:
            return f"{round(num)}/{den}" if den > 1 else str(round(num))
    return f"{alpha:.3g}"


def render_table(summary: dict, *, title: str = "dualobj repro: test-split bits per byte (mean ± std over seeds)"):
    """A ``rich.table.Table`` of the summary; ★ marks the best α per R (lowest mean) for each loss column."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for name, justify in (("R", "right"), ("unique", "right"), ("α / objective", "right"), ("AR final", "right"),
                          ("AR min", "right"), ("rise", "right"), ("MD ELBO", "right"),
                          ("prefix / causal", "right"), ("probe ar/prefix/md", "right"), ("seeds", "right")):
        table.add_column(name, justify=justify)
    own = any("bound_final" in row for row in summary["rows"])
    if own:  # the objective axis: each model's own held-out bound (AR NLL, MD or BD NELBO), final (rise)
        table.add_column("own bound (rise)", justify="right")
    last_r = None
    for row in summary["rows"]:
        R = row["repetitions"]
        best = summary["best"][R]
        if last_r is not None and R != last_r:
            table.add_section()
        last_r = R

        def cell(metric: str, row: dict = row, best: dict = best) -> str:
            mean, std = row[metric]
            text = f"{mean:.3f} ± {std:.3f}" if row["seeds"] > 1 else f"{mean:.3f}"
            return f"[bold green]{text} ★[/]" if best.get(metric) == _row_ident(row) else text

        rise = row["ar_rise"][0]
        probe = "/".join(f"{row[m][0]:.2f}" if m in row else "–" for m in ("probe_ar", "probe_prefix", "probe_md"))
        values = [
            str(R), f"{row['unique_tokens'] / 1000:.0f}K", row_label(row), cell("ar_final"),
            cell("ar_min"), f"{rise:+.3f}", cell("md_elbo"), f"{row['prefix'][0]:.3f} / {row['prefix_causal'][0]:.3f}",
            probe, str(row["seeds"]),
        ]
        if own:
            values.append(f"{row['bound_final'][0]:.3f} ({row['bound_rise'][0]:+.3f})" if "bound_rise" in row else "–")
        table.add_row(*values)
    return table


def plot(record: dict, out: str | Path) -> list[Path]:
    """Write ``curves.png`` (held-out AR loss over training, one line per α, one panel per R) and
    ``final_vs_alpha.png`` (final and minimum AR loss and the MD ELBO against α, one line per R) into ``out``.

    Returns:
        The paths written (none when there are no results).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(record)
    if not summary["rows"]:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = list(record["cells"].values())
    reps = sorted({c["repetitions"] for c in cells})
    alphas = sorted({c["alpha"] for c in cells if c.get("objective", "dual") == "dual"}, reverse=True)
    names = sorted({c["objective"] for c in cells if c.get("objective", "dual") != "dual"})
    cmap = plt.get_cmap("viridis")
    ncmap = plt.get_cmap("tab10")
    color: dict = {a: cmap(0.9 * (1 - a)) for a in alphas}
    color.update({n: ncmap(3 + i) for i, n in enumerate(names)})

    fig, axes = plt.subplots(1, len(reps), figsize=(4.2 * len(reps), 3.6), squeeze=False, sharey=True)
    for ax, R in zip(axes[0], reps):
        for a in [*alphas, *names]:
            curves = [c["curve"] for c in cells if c["repetitions"] == R and _ident(c) == a]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            x = [curves[0][i][0] / 1e6 for i in range(n)]
            y = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
            label = a if isinstance(a, str) else f"α={alpha_label(a)}"
            ax.plot(x, y, marker=".", color=color[a], label=label, linestyle="--" if isinstance(a, str) else "-")
        ax.set_title(f"R = {R}")
        ax.set_xlabel("training tokens (M)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test AR loss (bits/byte)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    curves_path = out / "curves.png"
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rcmap = plt.get_cmap("plasma")
    for i, R in enumerate(reps):
        c = rcmap(0.85 * i / max(1, len(reps) - 1))
        for r in summary["rows"]:
            if r["repetitions"] == R and r["objective"] != "dual":
                ax.axhline(r["ar_final"][0], color=c, linestyle="-.", alpha=0.5, linewidth=1)
                ax.annotate(f"{r['objective']} (R={R})", (1.0, r["ar_final"][0]), fontsize=6, ha="right",
                            va="bottom", color=c)
        rows = sorted((r for r in summary["rows"] if r["repetitions"] == R and r["objective"] == "dual"),
                      key=lambda r: r["alpha"])
        if not rows:
            continue
        xs = [r["alpha"] for r in rows]
        ax.errorbar(xs, [r["ar_final"][0] for r in rows], yerr=[r["ar_final"][1] for r in rows], color=c,
                    marker="o", capsize=3, label=f"R={R} AR final")
        ax.plot(xs, [r["ar_min"][0] for r in rows], color=c, linestyle=":", marker="x",
                label=f"R={R} AR early-stopped")
        ax.plot(xs, [r["md_elbo"][0] for r in rows], color=c, linestyle="--", alpha=0.6, label=f"R={R} MD ELBO")
    ax.set_xlabel("α (AR weight)")
    ax.set_ylabel("test bits/byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(reps) // 2))
    fig.tight_layout()
    final_path = out / "final_vs_alpha.png"
    fig.savefig(final_path, dpi=110)
    plt.close(fig)
    return [curves_path, final_path]
