"""Attention knockout curves: relative change of p(e3) when an edge is blocked in a window around each layer."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from mhop_lens.viz import style
from mhop_lens.viz._frames import groups, require, with_subset

DASH = {"correct": "solid", "incorrect": "dash", "other": "dot", "all": "solid"}


def fig_knockout(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None) -> go.Figure:
    """Mean relative change of p(e3) (%) per window centre; colour = edge, line style = correct / incorrect
    (from ``evaluation``, else the clean run's first-token correctness)."""
    require(frame, ["qid", "edge", "centre", "e3_prob_change"], "fig_knockout")
    frame = with_subset(frame, evaluation, fallback="clean_correct")
    fig = go.Figure()
    edges = list(pd.unique(frame["edge"]))
    for i, edge in enumerate(edges):
        color = style.PALETTE[i % len(style.PALETTE)]
        for subset in groups(frame):
            part = frame[(frame["edge"] == edge) & (frame["subset"] == subset)]
            if part.empty:
                continue
            g = part.groupby("centre")["e3_prob_change"]
            mean, sem = 100 * g.mean(), 100 * g.sem().fillna(0)
            fig.add_trace(go.Scatter(
                x=mean.index, y=mean.values, error_y=dict(type="data", array=sem.values, thickness=1, width=3),
                mode="lines+markers", name=f"{edge}, {subset} (n={part['qid'].nunique()})",
                line=dict(color=color, dash=DASH.get(subset, "solid"), width=2.5),
                hovertemplate=f"{edge} {subset}<br>centre %{{x}}: %{{y:.1f}}%<extra></extra>"))
    fig.add_hline(y=0, line=dict(color="#888888", width=1))
    window = int(frame["window"].iloc[0]) if "window" in frame.columns else None
    fig.update_xaxes(title_text="centre layer of the blocked window" + (f" (±{window})" if window else ""), dtick=1)
    fig.update_yaxes(title_text="change in p(e3) (%)")
    keys = str(frame["key_tokens"].iloc[0]) if "key_tokens" in frame.columns else "span"
    return style.apply(fig, f"Attention knockout: where does the last position read the query? (key tokens: {keys})",
                       width=900, height=470)
