"""Entity decoding (patchscopes): what each layer's hidden state at t1 / t2 decodes to, and the earliest layer
at which the first hop (e2 from t1) and the second hop (e3 from t2) resolve, correct vs incorrect queries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mhop_lens.viz import style
from mhop_lens.viz._frames import groups, require, with_subset

PANELS = (("t1", "e2", "e2 decoded from t1 (first hop)"), ("t2", "e3", "e3 decoded from t2 (second hop)"))
CLASSES = ("e1", "e2", "e3", "other")
EARLIEST = (("e2_t1_layer", "first hop: e2 from t1"), ("e3_t2_layer", "second hop: e3 from t2"))


def _share_grid(part: pd.DataFrame, entity: str, rows: str, row_values: list, layers: list[int]) -> np.ndarray:
    """% of queries decoding ``entity`` per (row value, source layer); a query counts once when any of its seeds
    (the study's protocol samples three) decodes the entity, as the study unions classes over seeds."""
    hit = part.assign(hit=part["class"] == entity).groupby([rows, "source_layer", "qid"])["hit"].any()
    share = hit.groupby(level=[0, 1]).mean()
    return np.array([[100 * share.get((r, s), np.nan) for s in layers] for r in row_values])


def fig_decoding_heatmap(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None) -> go.Figure:
    """Heat maps of the share of queries whose state decodes e2 at t1 and e3 at t2, per source layer.

    With several target layers the y axis is the target layer (the study's layout); with one (the lens decoder)
    it is the correct / incorrect subset.
    """
    require(frame, ["qid", "position", "source_layer", "target_layer", "class"], "fig_decoding_heatmap")
    frame = with_subset(frame, evaluation)
    panels = [p for p in PANELS if p[0] in set(frame["position"])]
    if not panels:
        return style.empty("Entity decoding", "the patchscope table has no t1 / t2 rows")
    layers = sorted(frame["source_layer"].unique())
    by_target = frame["target_layer"].nunique() > 1
    fig = make_subplots(1, len(panels), subplot_titles=[p[2] for p in panels], shared_yaxes=not by_target,
                        horizontal_spacing=0.12 if by_target else 0.04)
    for col, (position, entity, _) in enumerate(panels, start=1):
        part = frame[frame["position"] == position]
        if by_target:
            rows, values = "target_layer", sorted(part["target_layer"].unique())
        else:
            rows, values = "subset", groups(part)
        z = _share_grid(part, entity, rows, values, layers)
        counts = part.groupby(rows)["qid"].nunique()
        labels = values if by_target else [f"{v}<br>(n={counts.get(v, 0)})" for v in values]
        fig.add_trace(go.Heatmap(
            z=z, x=layers, y=[str(v) for v in labels], zmin=0, zmax=100, colorscale=style.SEQUENTIAL,
            showscale=col == len(panels), colorbar=dict(title="% queries", ticksuffix="%"),
            texttemplate="%{z:.0f}", textfont=dict(size=11),
            hovertemplate="source layer %{x}<br>%{y}<br>%{z:.1f}%<extra></extra>"), 1, col)
        fig.update_xaxes(title_text="source layer", dtick=1, showgrid=False, row=1, col=col)
        fig.update_yaxes(title_text="target layer" if by_target else "", showgrid=False, row=1, col=col,
                         **({"dtick": 1} if by_target else {"type": "category", "autorange": "reversed"}))
    decoder = str(frame["decoder"].iloc[0]) if "decoder" in frame.columns else "patchscope"
    if "protocol" in frame.columns and frame["protocol"].iloc[0] == "study":
        decoder += ", study protocol"
    height = 470 if by_target else 320
    return style.apply(fig, f"Entity decoding by layer ({decoder} decoder; n = {frame['qid'].nunique()} queries)",
                       width=1000, height=height)


def fig_earliest_layers(earliest: pd.DataFrame, evaluation: pd.DataFrame | None = None,
                        n_layers: int | None = None) -> go.Figure:
    """Histograms of the earliest layer decoding e2 from t1 and e3 from t2, correct vs incorrect (% of queries,
    with the share never decoded in the legend)."""
    require(earliest, ["qid", "e2_t1_layer", "e3_t2_layer"], "fig_earliest_layers")
    frame = with_subset(earliest, evaluation)
    top = n_layers - 1 if n_layers else int(np.nanmax(frame[["e2_t1_layer", "e3_t2_layer"]].to_numpy(float),
                                                      initial=0))
    layers = list(range(top + 1))
    titles = []
    for column, title in EARLIEST:
        never = ", ".join(f"{s} {100 * frame.loc[frame['subset'] == s, column].isna().mean():.0f}%"
                          for s in groups(frame))
        titles.append(f"{title}<br><sup>never decoded: {never}</sup>")
    fig = make_subplots(1, 2, shared_yaxes=True, subplot_titles=titles, horizontal_spacing=0.06)
    for col, (column, _) in enumerate(EARLIEST, start=1):
        for subset in groups(frame):
            part = frame[frame["subset"] == subset][column]
            if not len(part):
                continue
            counts = part.value_counts()
            share = [100 * counts.get(float(layer), 0) / len(part) for layer in layers]
            fig.add_trace(go.Bar(
                x=layers, y=share, name=f"{subset} (n={len(part)})", marker_color=style.subset_color(subset),
                legendgroup=subset, showlegend=col == 1, opacity=0.85,
                hovertemplate="layer %{x}: %{y:.1f}%<extra>" + subset + "</extra>"), 1, col)
        fig.update_xaxes(title_text="earliest layer", dtick=1, range=[-0.5, top + 0.5], row=1, col=col)
    fig.update_yaxes(title_text="% of queries", rangemode="tozero", row=1, col=1)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.22), margin=dict(t=100))
    return style.apply(fig, "Earliest layer at which each hop is resolved", width=1000, height=470)
