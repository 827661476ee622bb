"""Head figures: attribution heat map (layer x head), circuit graph of the top heads with their roles, and the
accuracy bars of head interventions against random heads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mhop_lens.viz import style
from mhop_lens.viz._frames import require

VALUE_COLUMNS = ("score", "exact", "atp", "atp_ig")
TYPE_COLORS = {"true": "#0072B2", "false": "#D55E00"}
#: Node colours by head class (``heads.classify``: what the head writes on true / false rows and a truth probe).
CLASS_COLORS = {"True": "#0072B2", "False": "#D55E00", "mixed": "#CC79A7", "other": "#999999"}
CONDITION_COLORS = {"before": "#999999", "target": "#D55E00", "random": "#0072B2"}
EDGE_COLORS = {1: "#009E73", -1: "#CC79A7"}          # head -> head edge score > 0 / < 0
SIDE_DASH = {"q": "solid", "k": "dash", "v": "dot"}


def head_table(frame: pd.DataFrame, value: str | None = None) -> tuple[pd.DataFrame, str]:
    """(layer, head, value) per head from ``head_scores`` (one row per head) or a raw ``attribute`` /
    ``exact_patching`` frame (averaged over pairs, summed over spans, ``site == "z"``)."""
    value = value or next((c for c in VALUE_COLUMNS if c in frame.columns), None)
    if value is None:
        raise ValueError(f"no head score column among {VALUE_COLUMNS} in the frame ({list(frame.columns)[:12]}).")
    require(frame, ["layer", "head", value], "head_table")
    if "group" in frame.columns:
        frame = frame[frame["group"] == "all"] if (frame["group"] == "all").any() else frame
    if "site" in frame.columns:
        frame = frame[frame["site"] == "z"]
    if "pair" in frame.columns:
        per_pair = frame.groupby(["pair", "layer", "head"])[value].sum()
        frame = per_pair.groupby(["layer", "head"]).mean().reset_index()
    return frame.groupby(["layer", "head"], as_index=False)[value].mean(), value


def fig_head_heatmap(frame: pd.DataFrame, value: str | None = None, title: str | None = None) -> go.Figure:
    """Layer x head heat map of a signed head score (diverging, centred at 0); the top 5 by |score| labelled."""
    table, value = head_table(frame, value)
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    z[table["layer"].to_numpy(int), table["head"].to_numpy(int)] = table[value].to_numpy(float)
    bound = float(np.nanmax(np.abs(z))) or 1.0
    top = table.reindex(table[value].abs().sort_values(ascending=False).index).head(5)
    text = np.full(z.shape, "", dtype=object)
    for layer, head in zip(top["layer"], top["head"], strict=True):
        text[int(layer), int(head)] = f"L{int(layer)}H{int(head)}"
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(n_heads)), y=list(range(n_layers)), zmin=-bound, zmax=bound, zmid=0,
        colorscale=style.DIVERGING, text=text, texttemplate="%{text}", textfont=dict(size=11),
        colorbar=dict(title=value), hovertemplate="layer %{y}, head %{x}<br>%{z:.4f}<extra></extra>"))
    fig.update_xaxes(title_text="head", dtick=1, showgrid=False)
    fig.update_yaxes(title_text="layer", dtick=1, showgrid=False, autorange="reversed")
    title = title or f"Attribution per head ({value}: effect on logit(Yes) − logit(No))"
    return style.apply(fig, title, width=700, height=max(360, 60 * n_layers + 160))


def fig_circuit(scores: pd.DataFrame, top: pd.DataFrame | None = None, k: int = 6, value: str | None = None,
                roles: tuple[str, ...] | None = None, min_edge: float = 0.5, edges: pd.DataFrame | None = None,
                max_edges: int = 12) -> go.Figure:
    """Circuit graph: input role spans (left) -> the top-k heads (placed by layer) -> the output (right).

    Head nodes are coloured by head class when ``scores`` has ``head_class`` (True / False / mixed / other, from
    ``heads.classify``), else by the sign of the score ("true" heads push true statements to Yes, "false" heads to
    No), and sized by |score|. A role -> head edge is drawn where the head's attention from END to that span
    separates true from false rows (|Cohen's d| of ``attn_d_<role>`` >= ``min_edge``); its width is |d|. Head ->
    output edges carry the head's score. ``top``: a ``heads.select`` table (default: the k largest |score| of
    ``scores``).
    ``edges``: an ``attribute_edges`` / ``exact_edge_patching`` frame (or its ``aggregate_edges``); the
    ``max_edges`` strongest head -> head edges between the drawn heads are added, width by |mean score| and
    colour by sign, dash by the side read (q solid, k dashed, v dotted; a GQA kv head joins its query heads).
    """
    from mhop_lens.analyses.heads import select

    table = scores[scores["group"] == "all"] if "group" in scores.columns else scores
    value = value or next(c for c in VALUE_COLUMNS if c in table.columns)
    top = top if top is not None else select(table, k, by=value)
    nodes = top.merge(table, on=["layer", "head"], how="left", suffixes=("", "_s"))
    role_cols = [c for c in table.columns if c.startswith("attn_d_")]
    roles = roles or tuple(c.removeprefix("attn_d_") for c in role_cols)
    n_layers = int(table["layer"].max()) + 1
    fig = go.Figure()
    role_y = {r: i for i, r in enumerate(roles)}
    head_y = {}
    for _, g in nodes.groupby("layer"):
        for j, (_, row) in enumerate(g.iterrows()):
            head_y[(int(row["layer"]), int(row["head"]))] = (j + 0.5) * (len(roles) or 1) / len(g) - 0.5
    out_y = (len(roles) - 1) / 2 if roles else 0
    for _, row in nodes.iterrows():
        key = (int(row["layer"]), int(row["head"]))
        x, y = key[0] + 1, head_y[key]
        for role in roles:
            d = row.get(f"attn_d_{role}", np.nan)
            if pd.notna(d) and abs(d) >= min_edge:
                fig.add_trace(_edge(0, role_y[role], x, y, abs(d), "#56B4E9" if d > 0 else "#E69F00",
                                    f"{role} -> L{key[0]}H{key[1]}: attention d = {d:+.2f}"))
        v = float(row[value])
        fig.add_trace(_edge(x, y, n_layers + 1, out_y, 1 + 4 * abs(v) / (nodes[value].abs().max() or 1),
                            TYPE_COLORS[row["type"]], f"L{key[0]}H{key[1]} -> output: {value} = {v:+.3f}"))
    if edges is not None:
        for trace in _head_edges(edges, head_y, max_edges):
            fig.add_trace(trace)
    fig.add_trace(go.Scatter(
        x=[0] * len(roles), y=[role_y[r] for r in roles], mode="markers+text", text=list(roles),
        textposition="middle left", marker=dict(size=22, color="#DDDDDD", line=dict(color="#555555", width=1)),
        name="input span", hoverinfo="text"))
    by_class = "head_class" in nodes.columns
    colour_col, colours = ("head_class", CLASS_COLORS) if by_class else ("type", TYPE_COLORS)
    for kind in colours:
        part = nodes[nodes[colour_col] == kind]
        if part.empty:
            continue
        size = 18 + 22 * part[value].abs() / (nodes[value].abs().max() or 1)
        fig.add_trace(go.Scatter(
            x=part["layer"] + 1, y=[head_y[(int(a), int(b))] for a, b in zip(part["layer"], part["head"],
                                                                               strict=True)],
            mode="markers+text", text=[f"L{int(a)}H{int(b)}" for a, b in zip(part["layer"], part["head"],
                                                                               strict=True)],
            textposition="top center", marker=dict(size=size, color=colours[kind]),
            name=f"{kind} head" + (" (class)" if by_class else ""),
            hovertext=[f"{value} = {v:+.3f}" for v in part[value]], hoverinfo="text+name"))
    fig.add_trace(go.Scatter(x=[n_layers + 1], y=[out_y], mode="markers+text", text=["logit(Yes) − logit(No)"],
                             textposition="middle right", marker=dict(size=24, color="#000000", symbol="square"),
                             name="output", hoverinfo="text"))
    fig.update_xaxes(tickvals=list(range(n_layers + 2)),
                     ticktext=["input"] + [f"layer {i}" for i in range(n_layers)] + ["output"],
                     range=[-0.8, n_layers + 2.6], showgrid=False)
    fig.update_yaxes(visible=False, range=[-1, max(len(roles), 1)])
    fig.update_layout(legend=dict(orientation="h", y=-0.12))
    return style.apply(fig, f"Circuit of the top {len(nodes)} heads: role spans -> heads -> answer", width=1000,
                       height=520)


def _edge(x0: float, y0: float, x1: float, y1: float, width: float, color: str, hover: str,
          dash: str = "solid", name: str | None = None) -> go.Scatter:
    return go.Scatter(x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2, y1], mode="lines",
                      line=dict(width=min(width, 8), color=color, dash=dash), opacity=0.6, hoverinfo="text",
                      hovertext=hover, showlegend=name is not None, name=name)


def edge_table(edges: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Head -> head (q/k/v) edges with one mean score each, from a raw edge frame or ``aggregate_edges``."""
    need = ["up_kind", "up_layer", "up_head", "down_layer", "down_head", "side"]
    if "mean" not in edges.columns:
        value = next((c for c in ("exact", "atp") if c in edges.columns), None)
        if value is None:
            raise ValueError(f"no edge score column (atp / exact / mean) in the frame ({list(edges.columns)[:12]}).")
        require(edges, need + ["pair", value], "edge_table")
        edges = (edges.groupby(["pair"] + need)[value].sum().groupby(need).mean().rename("mean").reset_index())
    else:
        value = "mean"
        require(edges, need + ["mean"], "edge_table")
    table = edges[(edges["up_kind"] == "head") & edges["side"].isin(list(SIDE_DASH))]
    return table, value


def _head_edges(edges: pd.DataFrame, head_y: dict[tuple[int, int], float], max_edges: int) -> list[go.Scatter]:
    """Lines between drawn heads for the strongest head -> head edges (kv-head edges fan out to their query heads)."""
    table, _ = edge_table(edges)
    n_q = int(table.loc[table["side"] == "q", "down_head"].max() + 1) if (table["side"] == "q").any() else 0
    n_kv = int(table.loc[table["side"] != "q", "down_head"].max() + 1) if (table["side"] != "q").any() else 0
    group = n_q // n_kv if n_q and n_kv and n_q > n_kv else 1
    drawn = []
    for row in table.itertuples(index=False):
        up = (int(row.up_layer), int(row.up_head))
        if up not in head_y:
            continue
        heads = [int(row.down_head)] if row.side == "q" else range(int(row.down_head) * group,
                                                                    (int(row.down_head) + 1) * group)
        drawn += [(row, up, (int(row.down_layer), h)) for h in heads if (int(row.down_layer), h) in head_y]
    drawn.sort(key=lambda t: -abs(t[0].mean))
    drawn = drawn[:max_edges]
    scale = max((abs(r.mean) for r, _, _ in drawn), default=1.0) or 1.0
    traces = []
    for row, up, down in drawn:
        sign = 1 if row.mean >= 0 else -1
        kv = f" (kv head {int(row.down_head)})" if group > 1 and row.side != "q" else ""
        traces.append(_edge(up[0] + 1, head_y[up], down[0] + 1, head_y[down], 1 + 5 * abs(row.mean) / scale,
                            EDGE_COLORS[sign], f"L{up[0]}H{up[1]} -> L{down[0]}H{down[1]}.{row.side}{kv}: "
                            f"edge = {row.mean:+.4g}", SIDE_DASH[row.side]))
    for sign, label in ((1, "edge > 0"), (-1, "edge < 0")):
        if any((r.mean >= 0) == (sign > 0) for r, _, _ in drawn):
            traces.append(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color=EDGE_COLORS[sign], width=3),
                                     name=f"head -> head {label} (q solid, k dash, v dot)"))
    return traces


def fig_intervention_bars(frame: pd.DataFrame, by: str = "form") -> go.Figure:
    """Accuracy before, with the target heads intervened on, and with random heads (mean ± sd over the random
    sets), per ``by`` (form) and intervention kind; the ``intervene`` table."""
    require(frame, ["condition", "set_index", "accuracy", by], "fig_intervention_bars")
    kinds = frame["kind"].fillna("").unique() if "kind" in frame.columns else [""]
    frame = frame.assign(kind=frame["kind"].fillna("") if "kind" in frame.columns else "")
    per_set = frame.groupby(["kind", by, "condition", "set_index"])["accuracy"].mean().reset_index()
    agg = per_set.groupby(["kind", by, "condition"])["accuracy"].agg(["mean", "std"]).reset_index()
    fig = go.Figure()
    for condition in ("before", "target", "random"):
        part = agg[agg["condition"] == condition]
        if part.empty:
            continue
        x = [[k or "intervention" for k in part["kind"]], list(part[by])] if len(kinds) > 1 else list(part[by])
        fig.add_trace(go.Bar(
            x=x, y=100 * part["mean"], name={"target": "target heads", "random": "random heads"}.get(condition,
                                                                                                    condition),
            marker_color=CONDITION_COLORS[condition],
            error_y=dict(type="data", array=100 * part["std"].fillna(0), visible=condition == "random"),
            hovertemplate="%{x}: %{y:.1f}%<extra>" + condition + "</extra>"))
    heads = frame.loc[frame["condition"] == "target", "heads"].iloc[0] if "heads" in frame.columns else ""
    kind = ", ".join(k for k in kinds if k)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.2))
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 105])
    return style.apply(fig, f"Head intervention ({kind}) on {heads}", width=950, height=480)
