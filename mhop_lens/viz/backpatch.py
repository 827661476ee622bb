"""Back-patching heat map: source layer x target layer, % of failures fixed, with the shuffled-donor control beside."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mhop_lens.viz import style
from mhop_lens.viz._frames import require

METRICS = {"fix_rate": "% of failures fixed", "break_rate": "% of correct answers broken"}


def _summary(frame: pd.DataFrame, evaluation: pd.DataFrame | None) -> pd.DataFrame:
    if "fix_rate" in frame.columns:
        return frame
    from mhop_lens.analyses.backpatch import summarize_backpatch

    require(frame, ["qid", "position", "s", "t", "donor", "correct"], "fig_backpatch")
    return summarize_backpatch(frame, evaluation, by="pair")


def _grid(part: pd.DataFrame, column: str, n: int) -> np.ndarray:
    """% per (target t in 0..n-2, source s in 1..n-1); NaN where s <= t."""
    z = np.full((n - 1, n - 1), np.nan)
    for s, t, v in zip(part["s"], part["t"], part[column], strict=True):
        z[int(t), int(s) - 1] = 100 * v
    return z


def fig_backpatch(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None, position: str | None = None,
                  metric: str = "fix_rate") -> go.Figure:
    """Heat maps of the back-patching ``metric`` per (source s, target t), real donors left, shuffled right, one
    row per patched position (t1 above last).

    ``frame``: the raw ``run_backpatch`` table (summarised here with ``evaluation``'s subsets) or the
    ``summarize_backpatch(by="pair")`` table. ``position``: draw only that position (default: every one).
    The title names the criterion ("fixed" = e3's first token top-1, or e3 in the generated text) and the
    failure definition (evaluate subset or clean misses) recorded in the summary.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, not {metric!r}.")
    summary = _summary(frame, evaluation)
    require(summary, ["position", "s", "t", metric, f"control_{metric}"], "fig_backpatch")
    order = sorted(pd.unique(summary["position"]), key=lambda p: (p != "t1", p != "last", str(p)))
    positions = [position] if position else order
    criterion = summary["criterion"].iloc[0] if "criterion" in summary.columns else "first-token"
    failures = summary["failures"].iloc[0] if "failures" in summary.columns else (
        "evaluate-subset" if evaluation is not None else "clean-miss")
    what = {"first-token": "e3's first token top-1", "generate": "e3 in 10 generated tokens"}.get(criterion, criterion)
    title = (f"Back-patching: {METRICS[metric]} (fixed = {what}; "
             f"{'failures' if metric == 'fix_rate' else 'correct'}: {failures})")
    parts = [summary[summary["position"] == p] for p in positions]
    if all(part[metric].isna().all() for part in parts):
        none = "failures" if metric == "fix_rate" else "correct queries"
        return style.empty(title, f"no {none} in this sample: nothing to fix (raise the sample size)")
    n = int(max(summary["s"].max(), summary["t"].max())) + 1
    count_col = "n_failures" if metric == "fix_rate" else "n_correct"
    titles = []
    for p, part in zip(positions, parts, strict=True):
        count = int(part[count_col].max()) if len(part) else 0
        titles += [f"{p}: back-patched (n={count})", f"{p}: control, shuffled donor (n={count})"]
    fig = make_subplots(len(positions), 2, shared_yaxes=True, horizontal_spacing=0.06, vertical_spacing=0.14,
                        subplot_titles=titles)
    for row, part in enumerate(parts, start=1):
        for col, column in ((1, metric), (2, f"control_{metric}")):
            z = _grid(part, column, n)
            fig.add_trace(go.Heatmap(
                z=z, x=list(range(1, n)), y=list(range(n - 1)), zmin=0, zmax=100, colorscale=style.SEQUENTIAL,
                showscale=col == 2 and row == 1, colorbar=dict(title="%", ticksuffix="%"),
                hovertemplate="source s=%{x}<br>target t=%{y}<br>%{z:.1f}%<extra></extra>",
                texttemplate="%{z:.0f}", textfont=dict(size=11)), row, col)
            fig.update_xaxes(title_text="source layer s", dtick=1, row=row, col=col, showgrid=False)
        fig.update_yaxes(title_text="target layer t", row=row, col=1)
    fig.update_yaxes(dtick=1, showgrid=False)
    return style.apply(fig, title, width=950, height=120 + 350 * len(positions))
