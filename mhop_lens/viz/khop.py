"""Hop-by-hop resolution on k-hop chains: share of queries whose entity e_{j+1} is the logit-lens top-1 at its own
position r_j, by layer, successes vs failures (from ``analyses.khop.resolution_profile``)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mhop_lens.viz import style
from mhop_lens.viz._frames import require

DASH = {True: "solid", False: "dash"}


def fig_resolution(profile: pd.DataFrame) -> go.Figure:
    """One panel per entity (e2 at r1, e3 at r2, ...): % of queries with the entity top-1 after each block;
    solid = the chain's answer is right, dashed = wrong (n in the legend)."""
    require(profile, ["entity", "hop", "position", "layer", "correct", "top1_share", "n"], "fig_resolution")
    if profile.empty:
        return style.empty("Hop-by-hop resolution", "no lens rows")
    panels = profile[["hop", "entity", "position"]].drop_duplicates().sort_values("hop")
    titles = [f"{e} at {p} (hop {h})" for h, e, p in panels.itertuples(index=False)]
    fig = make_subplots(1, len(panels), shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.04)
    for col, (hop, _, _) in enumerate(panels.itertuples(index=False), start=1):
        part = profile[profile["hop"] == hop]
        for correct, g in part.groupby("correct"):
            g = g.sort_values("layer")
            label = f"{'answer right' if correct else 'answer wrong'} (n={int(g['n'].max())})"
            fig.add_trace(go.Scatter(x=g["layer"], y=100 * g["top1_share"], mode="lines+markers", name=label,
                                     legendgroup=label, showlegend=col == 1,
                                     line=dict(dash=DASH[bool(correct)], color=style.subset_color(
                                         "correct" if correct else "incorrect"))), 1, col)
        fig.update_xaxes(title_text="block", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="% top-1 at its own position", range=[0, 102], row=1, col=1)
    return style.apply(fig, "Hop-by-hop resolution (logit lens of resid_post)", width=320 * len(panels) + 120,
                       height=380)
