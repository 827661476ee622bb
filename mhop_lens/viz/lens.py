"""Logit lens / sublayer projection curves: how often e2 and e3 are the top-1 token of each layer's residual,
attention output and MLP output, correct vs incorrect queries."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mhop_lens.viz import style
from mhop_lens.viz._frames import groups, require, with_subset

SITE_TITLES = {"resid_post": "residual stream", "resid": "residual stream", "attn_out": "attention output",
               "mlp_out": "MLP output"}
METRICS = {"top1": "% queries with entity top-1", "prob": "mean probability", "rank": "median rank"}
DASH = {"correct": "solid", "incorrect": "dash", "other": "dot", "all": "solid"}


def _values(part: pd.DataFrame, entity: str, metric: str) -> pd.Series:
    g = part.groupby("layer")
    if metric == "top1":
        return 100 * g[f"{entity}_rank"].apply(lambda r: (r == 0).mean())
    if metric == "prob":
        return g[f"{entity}_prob"].mean()
    return g[f"{entity}_rank"].median()


def fig_lens(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None, position: str = "last",
             metric: str = "top1", entities: tuple[str, ...] = ("e2", "e3")) -> go.Figure:
    """One panel per site (resid / attn_out / mlp_out): ``metric`` of e2 and e3 by layer at ``position``;
    colour = entity, line style = correct / incorrect (from ``evaluation``, else the lens frame's ``correct``)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, not {metric!r}.")
    require(frame, ["qid", "layer", "site", "position", "e2_rank", "e3_rank"], "fig_lens")
    frame = with_subset(frame[frame["position"] == position], evaluation, fallback="correct")
    if frame.empty:
        return style.empty("Logit lens", f"no rows at position {position!r}")
    sites = [s for s in SITE_TITLES if s in set(frame["site"])]
    fig = make_subplots(1, len(sites), shared_yaxes=True, subplot_titles=[SITE_TITLES[s] for s in sites],
                        horizontal_spacing=0.04)
    for col, site in enumerate(sites, start=1):
        for subset in groups(frame):
            part = frame[(frame["site"] == site) & (frame["subset"] == subset)]
            n = part["qid"].nunique()
            for entity in entities:
                y = _values(part, entity, metric)
                fig.add_trace(go.Scatter(
                    x=y.index, y=y.values, mode="lines+markers", name=f"{entity}, {subset} (n={n})",
                    line=dict(color=style.ENTITY_COLORS[entity], dash=DASH.get(subset, "solid"), width=2.5),
                    legendgroup=f"{entity}{subset}", showlegend=col == 1,
                    hovertemplate=f"{entity} {subset}<br>layer %{{x}}: %{{y:.2f}}<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="layer", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text=METRICS[metric], row=1, col=1)
    if metric == "top1":
        fig.update_yaxes(range=[-3, 103])
    where = {"last": "the last token (t2)", "t1": "t1 (end of the first hop)"}.get(position, position)
    return style.apply(fig, f"Logit lens and sublayer projections at {where}", width=1100, height=450)
