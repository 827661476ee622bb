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


def fig_head_heatmap(frame: pd.DataFrame, value: str | None = None, title: str | None = None,
                     label: pd.DataFrame | None = None, k: int = 4) -> go.Figure:
    """Layer x head heat map of a signed head score (diverging, centred at 0). Labelled: the heads of ``label``
    (e.g. the run's ``top_heads`` table, so the figure names the heads the report names), else the top ``k`` by
    |score|."""
    table, value = head_table(frame, value)
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    z = np.full((n_layers, n_heads), np.nan)
    z[table["layer"].to_numpy(int), table["head"].to_numpy(int)] = table[value].to_numpy(float)
    bound = float(np.nanmax(np.abs(z))) or 1.0
    top = label if label is not None else table.reindex(table[value].abs().sort_values(ascending=False).index).head(k)
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
                max_edges: int = 12, curve: pd.DataFrame | None = None, target: float = 0.8) -> go.Figure:
    """Circuit graph: input role spans (left) -> the top-k heads (placed by layer) -> the output (right).

    Head nodes are coloured by head class when ``scores`` has ``head_class`` (True / False / mixed / other, from
    ``heads.classify``), else by the sign of the score ("true" heads push true statements to Yes, "false" heads to
    No), and sized by |score|. A role -> head edge is drawn where the head's attention from END to that span
    separates true from false rows (|Cohen's d| of ``attn_d_<role>`` >= ``min_edge``; width |d|) or, when ``edges``
    holds per-span embedding edges (``attribute_edges(..., per_position=spans)``, column ``span``), from the span's
    edge score; a span with no drawn edge is not drawn. Head -> output edges carry the head's score. ``top``: a
    ``heads.select`` table (default: the k largest |score| of ``scores``).
    ``edges``: an ``attribute_edges`` / ``exact_edge_patching`` frame (or its ``aggregate_edges``); the
    ``max_edges`` strongest head -> head edges between the drawn heads are added, width by |mean score| and
    colour by sign, dash by the side read (q solid, k dashed, v dotted; a GQA kv head joins its query heads).
    ``curve``: a ``faithfulness_curve`` of those edges; only the smallest top-n edge circuit reaching ``target``
    faithfulness is drawn (the most faithful one if none does), named in the title with its faithfulness.
    """
    from mhop_lens.analyses.heads import select

    table = scores[scores["group"] == "all"] if "group" in scores.columns else scores
    value = value or next(c for c in VALUE_COLUMNS if c in table.columns)
    top = top if top is not None else select(table, k, by=value)
    n_layers = int(table["layer"].max()) + 1
    title = f"Circuit of the top {len(top)} heads: role spans -> heads -> answer"
    out_edges = None
    if edges is not None and curve is not None:
        edges, n, faith = _at_faithfulness(edges, curve, target)
        max_edges = n
        top = _circuit_heads(select(table, len(table), by=value), edges)
        out_edges = _output_edges(edges)
        title = (f"Circuit of the top {n} edges (faithfulness {faith:.2f}, target {target:.2f}): its heads and "
                 "their edges; MLPs not drawn")
    nodes = top.merge(table, on=["layer", "head"], how="left", suffixes=("", "_s"))
    role_cols = [c for c in table.columns if c.startswith("attn_d_")]
    attn_roles = roles or tuple(c.removeprefix("attn_d_") for c in role_cols)
    head_y = {}
    n_rows = max(len(attn_roles), 1)
    for _, g in nodes.groupby("layer"):
        for j, (_, row) in enumerate(g.iterrows()):
            head_y[(int(row["layer"]), int(row["head"]))] = (j + 0.5) * n_rows / len(g) - 0.5
    span_edges = []
    for _, row in nodes.iterrows():
        key = (int(row["layer"]), int(row["head"]))
        for role in attn_roles:
            d = row.get(f"attn_d_{role}", np.nan)
            if pd.notna(d) and abs(d) >= min_edge:
                span_edges.append((role, key, abs(d), "#56B4E9" if d > 0 else "#E69F00",
                                   f"{role} -> L{key[0]}H{key[1]}: attention d = {d:+.2f}"))
    if edges is not None and ("span" in edges.columns or curve is not None):
        span_edges += _span_edges(edges, head_y, max_edges)
    roles_drawn = [r for r in dict.fromkeys(e[0] for e in span_edges)]
    role_y = {r: i * (n_rows - 1) / max(len(roles_drawn) - 1, 1) for i, r in enumerate(roles_drawn)}
    out_y = (n_rows - 1) / 2
    fig = go.Figure()
    for role, key, width, color, hover in span_edges:
        fig.add_trace(_edge(0, role_y[role], key[0] + 1, head_y[key], width, color, hover))
    for _, row in nodes.iterrows():
        key = (int(row["layer"]), int(row["head"]))
        v = float(row[value])
        if out_edges is None:
            fig.add_trace(_edge(key[0] + 1, head_y[key], n_layers + 1, out_y,
                                1 + 4 * abs(v) / (nodes[value].abs().max() or 1),
                                TYPE_COLORS[row["type"]], f"L{key[0]}H{key[1]} -> output: {value} = {v:+.3f}"))
        elif key in out_edges:
            e = out_edges[key]
            fig.add_trace(_edge(key[0] + 1, head_y[key], n_layers + 1, out_y,
                                1 + 5 * abs(e) / (max(abs(x) for x in out_edges.values()) or 1),
                                EDGE_COLORS[1 if e >= 0 else -1], f"L{key[0]}H{key[1]} -> output: edge = {e:+.4g}"))
    if edges is not None:
        for trace in _head_edges(edges, head_y, max_edges):
            fig.add_trace(trace)
    if roles_drawn:
        fig.add_trace(go.Scatter(
            x=[0] * len(roles_drawn), y=[role_y[r] for r in roles_drawn], mode="markers+text", text=roles_drawn,
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
    fig.update_yaxes(visible=False, range=[-1, n_rows])
    fig.update_layout(legend=dict(orientation="h", y=-0.12))
    return style.apply(fig, title, width=1000, height=520)


def _at_faithfulness(edges: pd.DataFrame, curve: pd.DataFrame, target: float) -> tuple[pd.DataFrame, int, float]:
    """The rows of ``edges`` in the smallest top-n circuit of ``curve`` reaching ``target`` (else the best one)."""
    from mhop_lens.analyses.edge_attribution import EDGE_KEYS, aggregate_edges
    from mhop_lens.analyses.faithfulness import smallest_faithful

    require(curve, ["kind", "n", "faithfulness"], "fig_circuit(curve=...)")
    top = curve[curve["kind"] == "top"].set_index("n")["faithfulness"]
    n = smallest_faithful(curve, target)
    n = int(top.idxmax()) if n is None else n
    table = edges if "mean" in edges.columns else aggregate_edges(edges)
    keep = table.reindex(table["mean"].abs().sort_values(ascending=False, kind="stable").index).head(n)
    keys = [c for c in EDGE_KEYS if c in keep.columns and c in edges.columns]
    inside = edges.merge(keep[keys].drop_duplicates(), on=keys, how="inner")
    return inside, n, float(top[n])


def _circuit_heads(typed: pd.DataFrame, edges: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``typed`` (a ``heads.select`` table of every head) for heads that send or receive a circuit edge
    (a kv head's k/v edge counts for every query head reading it)."""
    n_heads = int(typed["head"].max()) + 1
    kv = edges.loc[edges["side"].isin(["k", "v"]), "down_head"]
    group = n_heads // (int(kv.max()) + 1) if len(kv) and edges["down"].astype(str).str.contains("KV").any() else 1
    keys = {(int(a), int(b)) for a, b in edges.loc[edges["up_kind"] == "head", ["up_layer", "up_head"]].to_numpy()}
    for layer, head, side in edges.loc[edges["side"].isin(list(SIDE_DASH)),
                                       ["down_layer", "down_head", "side"]].itertuples(index=False):
        heads = [head] if side == "q" or group == 1 else range(head * group, (head + 1) * group)
        keys |= {(int(layer), int(h)) for h in heads}
    keep = [(int(a), int(b)) in keys for a, b in zip(typed["layer"], typed["head"], strict=True)]
    return typed[keep]


def _output_edges(edges: pd.DataFrame) -> dict[tuple[int, int], float]:
    """Mean score of each head -> output edge of the frame, by (layer, head)."""
    out = edges[(edges["up_kind"] == "head") & (edges["side"] == "out")]
    if out.empty:
        return {}
    value = next(c for c in ("exact", "eap_ig", "atp", "mean") if c in out.columns)
    if "pair" in out.columns:
        out = out.groupby(["pair", "up_layer", "up_head"])[value].sum().groupby(["up_layer", "up_head"]).mean()
    else:
        out = out.set_index(["up_layer", "up_head"])[value]
    return {(int(a), int(b)): float(v) for (a, b), v in out.items()}


def _span_edges(edges: pd.DataFrame, head_y: dict[tuple[int, int], float], max_edges: int) -> list[tuple]:
    """(span, head, width, colour, hover) for the strongest span -> drawn head edges of per-span embedding edges
    (without a ``span`` column, one input node "embeddings")."""
    value = next(c for c in ("exact", "eap_ig", "atp", "mean") if c in edges.columns)
    edges = edges if "span" in edges.columns else edges.assign(span="embeddings")
    part = edges[(edges["up_kind"] == "embed") & edges["side"].isin(list(SIDE_DASH)) & (edges["span"] != "other")]
    if "down" in part.columns:  # a GQA kv head is not one drawn head: its span edges are left out
        part = part[~part["down"].astype(str).str.contains("KV")]
    if part.empty:
        return []
    if "pair" in part.columns:
        part = part.groupby(["pair", "span", "down_layer", "down_head", "side"])[value].sum()
        part = part.groupby(["span", "down_layer", "down_head", "side"]).mean().reset_index()
    part = part.reindex(part[value].abs().sort_values(ascending=False).index)
    part = part[[(int(a), int(b)) in head_y for a, b in zip(part["down_layer"], part["down_head"], strict=True)]]
    part = part.head(max_edges)
    scale = part[value].abs().max() or 1.0
    return [(row.span, (int(row.down_layer), int(row.down_head)), 1 + 5 * abs(getattr(row, value)) / scale,
             EDGE_COLORS[1 if getattr(row, value) >= 0 else -1],
             f"{row.span} -> L{int(row.down_layer)}H{int(row.down_head)}.{row.side}: edge = {getattr(row, value):+.4g}")
            for row in part.itertuples(index=False)]


def _edge(x0: float, y0: float, x1: float, y1: float, width: float, color: str, hover: str,
          dash: str = "solid", name: str | None = None) -> go.Scatter:
    return go.Scatter(x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2, y1], mode="lines",
                      line=dict(width=min(width, 8), color=color, dash=dash), opacity=0.6, hoverinfo="text",
                      hovertext=hover, showlegend=name is not None, name=name)


def edge_table(edges: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Head -> head (q/k/v) edges with one mean score each, from a raw edge frame or ``aggregate_edges``."""
    need = ["up_kind", "up_layer", "up_head", "down_layer", "down_head", "side"]
    if "mean" not in edges.columns:
        value = next((c for c in ("exact", "eap_ig", "atp") if c in edges.columns), None)
        if value is None:
            raise ValueError(f"no edge score column (atp / eap_ig / exact / mean) in the frame "
                             f"({list(edges.columns)[:12]}).")
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
