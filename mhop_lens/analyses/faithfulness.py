"""Faithfulness of circuits: keep a set of edges (or heads), ablate everything else, and measure how much of the
metric the circuit recovers, against random circuits of the same size.

Edge circuits (Hanna et al. 2024, "Have Faith in Faithfulness", section 2): the model runs on the clean prompt and
every reader of the residual stream (each head's q/k/v input copy, each MLP's input, the final residual) gets

    sum over upstream u with (u -> reader) in the circuit of u's output in this run
    + sum over the other upstream u of u's *ablated* output

where an output is the embeddings, a head's ``W_O z`` or an MLP's ``mlp_out`` (biases cancel). ``ablation="counter"``
takes the ablated output from the pair's corrupted run (counter-pair patching), ``"mean"`` from its mean over every
real position of all clean and corrupted prompts. Faithfulness of circuit C is

    F(C) = (m(C) - m(empty)) / (m(full) - m(empty))       (m = metric averaged over pairs)

so the full graph scores 1 and the empty circuit 0 by construction; what is tested is that the construction is
right: the full graph reproduces the clean run and, under counter ablation, the empty circuit the corrupted run.
Head circuits keep the listed heads' ``z`` and ablate every other head's (MLPs and embeddings untouched);
``m(empty)`` is then every head ablated. Many circuits run in one forward as copies along the batch (``max_rows``
rows per forward). Edges must come from the complete graph (:func:`graph_edges`; score them with
``attribute_edges(..., sides=ALL_SIDES)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mhop_lens import hooks
from mhop_lens.analyses.attribution import Counter, PairBatch, counting_hooks, end_logits, pair_batches, pass_counts
from mhop_lens.analyses.edge_attribution import (
    ALL_SIDES,
    FINAL,
    MLP_SIDE,
    SIDES,
    Edge,
    edges_from,
    feeds,
    split_input,
    split_qkv_inputs,
)
from mhop_lens.analyses.metrics import Metric
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import run

ABLATIONS = ("counter", "mean")
LEVELS = ("edges", "heads")
Up = tuple[str, int, int]  # (kind, layer, head); embed = ("embed", -1, -1), an MLP = ("mlp", l, -1)


def _up_nodes(model) -> list[Up]:
    nodes: list[Up] = [("embed", -1, -1)]
    for l in range(model.cfg.n_layers):
        nodes += [("head", l, h) for h in range(model.cfg.n_heads)] + [("mlp", l, -1)]
    return nodes


def _readers(model) -> list[tuple[int, str, int]]:
    """(layer, side, number of heads reading there) for every reader of the residual stream, the output last."""
    kv = hooks.n_kv_heads(model)
    out = [(l, s, {"q": model.cfg.n_heads, "k": kv, "v": kv, MLP_SIDE: 1}[s]) for l in range(model.cfg.n_layers)
           for s in ALL_SIDES]
    return out + [(model.cfg.n_layers, "out", 1)]


def _feeding(model, up: list[Up], layer: int, side: str) -> list[int]:
    return [i for i, (kind, lu, _) in enumerate(up) if side == "out" or feeds(model, kind, lu, layer, side)]


def graph_edges(model) -> list[Edge]:
    """Every edge of the complete graph: embeddings, heads and MLPs into each later head's q/k/v (kv heads under
    GQA), each MLP's input and the output; the order of :func:`attribute_edges` is not implied."""
    up = _up_nodes(model)
    edges = []
    for layer, side, n in _readers(model):
        for i in _feeding(model, up, layer, side):
            kind, lu, hu = up[i]
            edges += [Edge(kind, lu, hu, layer, h if side in SIDES else -1, side) for h in range(n)]
    return edges


def _node_outputs(model, store: dict) -> Callable:
    """Hooks' target: each upstream node's residual contribution, [batch pos node d_model] per (kind, layer)."""

    def capture(key):
        def hook(act, hook):
            if key[0] == "head":
                w_o = model.blocks[key[1]].attn.W_O.to(act.dtype)
                store[key] = torch.einsum("bphe,hed->bphd", act, w_o)
                store[("z", key[1])] = act
            else:
                store[key] = act.unsqueeze(2)
            return act

        return hook

    return capture


def _output_hooks(model, store: dict) -> list[tuple[str, Callable]]:
    capture = _node_outputs(model, store)
    fwd = [(hooks.resid(0, "pre"), capture(("embed", -1)))]
    for l in range(model.cfg.n_layers):
        fwd += [(hooks.head(l, "z"), capture(("head", l))), (hooks.mlp_out(l), capture(("mlp", l)))]
    return fwd


def _stack(store: dict, model, up: list[Up], idx: list[int]) -> Float[Tensor, "batch pos node d_model"]:
    parts = []
    for i in idx:
        kind, l, h = up[i]
        a = store[(kind, l)]
        parts.append(a[:, :, max(h, 0)])
    return torch.stack(parts, 2)


class _EdgeMasks:
    """Per reader, a [circuit, feeding node, reading head] 0/1 tensor: 1 where the edge is *not* in the circuit."""

    def __init__(self, model, circuits: Sequence[Sequence[Edge]]):
        self.up = _up_nodes(model)
        pos = {u: i for i, u in enumerate(self.up)}
        self.readers = {}
        for layer, side, n in _readers(model):
            idx = _feeding(model, self.up, layer, side)
            self.readers[(layer, side)] = (idx, torch.ones(len(circuits), len(idx), n))
        local = {key: {u: j for j, u in enumerate(idx)} for key, (idx, _) in self.readers.items()}
        for g, circuit in enumerate(circuits):
            for e in circuit:
                key = (e.down_layer, e.side)
                u = pos.get((e.up_kind, e.up_layer if e.up_kind != "embed" else -1, e.up_head))
                if key not in local or u not in local[key]:
                    raise MhopLensError(f"not an edge of the complete graph: {e}; build circuits from graph_edges() "
                                        "or an attribute_edges(..., sides=ALL_SIDES) frame.")
                self.readers[key][1][g, local[key][u], max(e.down_head, 0)] = 0.0


def _reader_hook(store: dict, ablated: dict, masks: _EdgeMasks, model, key, b: int) -> Callable:
    """Replace the non-circuit part of this reader's input by the ablated outputs: input -= sum (run - ablated)."""
    idx, notin = masks.readers[key]

    def hook(act, hook):
        diff = _stack(store, model, masks.up, idx) - _stack(ablated, model, masks.up, idx).to(act.dtype)
        w = notin.to(act.device, act.dtype).repeat_interleave(b, 0)
        corr = torch.einsum("bpud,buh->bphd", diff, w)
        return act - (corr if act.dim() == 4 else corr[:, :, 0])

    return hook


def _ablated(model, batch: PairBatch, ablation: str, means: dict | None, counter: Counter, k: int) -> dict:
    """Each node's ablated output for k copies of the batch: the corrupted run's, or the dataset mean."""
    if ablation == "mean":
        p = batch.clean.tokens.shape[1]
        return {key: v.expand(len(batch.rows) * k, p, *v.shape[2:]) for key, v in means.items()}
    store: dict = {}
    run(model, batch.corrupt, _output_hooks(model, store) + counting_hooks(counter))
    return {key: v.repeat(k, 1, 1, 1) for key, v in store.items()}


@torch.no_grad()
def _means(model, clean: Sequence[str], corrupted: Sequence[str], batch_size: int, counter: Counter) -> dict:
    """Mean output of every node over all real positions of the clean and corrupted prompts: [1 1 node d]."""
    sums: dict = {}
    count = 0
    for batch in pair_batches(model, clean, corrupted, batch_size, "mean outputs"):
        for enc in (batch.clean, batch.corrupt):
            store: dict = {}
            run(model, enc, _output_hooks(model, store) + counting_hooks(counter))
            mask = enc.attention_mask.to(next(iter(store.values())).dtype)
            for key, v in store.items():
                s = torch.einsum("bpnd,bp->nd", v, mask.to(v.device))
                sums[key] = sums[key] + s if key in sums else s
            count += int(mask.sum())
    return {key: (v / count)[None, None] for key, v in sums.items()}


def _circuit_metrics(model, clean, corrupted, metric: Metric, n_circuits: int, fwd_for: Callable, ablation: str,
                     batch_size: int, max_rows: int, counter: Counter, progress: bool, extra_ctx=None) -> np.ndarray:
    """Metric per (circuit, pair); ``fwd_for(batch, group, ablated, b)`` gives the hooks of one group of circuits."""
    means = _means(model, clean, corrupted, batch_size, counter) if ablation == "mean" else None
    out = np.zeros((n_circuits, len(clean)))
    for batch in pair_batches(model, clean, corrupted, batch_size, "circuits", progress):
        b = len(batch.rows)
        per_fwd = max(1, max_rows // b)
        for i in range(0, n_circuits, per_fwd):
            group = range(i, min(i + per_fwd, n_circuits))
            k = len(group)
            ablated = _ablated(model, batch, ablation, means, counter, k)
            logits = run(model, batch.clean.repeat(k), fwd_for(group, ablated, b) + counting_hooks(counter))
            m = metric(end_logits(logits, batch.clean, k), batch.rows.repeat(k)).view(k, b)
            out[i : i + k, batch.rows.numpy()] = m.detach().cpu().double().numpy()
    return out


def edge_circuit_metrics(model, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                         circuits: Sequence, ablation: str = "counter", batch_size: int = 16, max_rows: int = 256,
                         progress: bool = False) -> tuple[np.ndarray, dict]:
    """Metric of every pair under every edge circuit (a list of edges or an edge frame each): [circuit, pair]."""
    _check(ablation)
    circuits = [edges_from(c) for c in circuits]
    counter = Counter()
    t0 = time.perf_counter()
    with split_qkv_inputs(model, mlp=True):
        hooks.validate(model, [split_input(l, s) for l, s, _ in _readers(model)[:-1]])

        def fwd_for(group, ablated, b):
            masks = _EdgeMasks(model, [circuits[g] for g in group])
            store: dict = {}
            fwd = _output_hooks(model, store)
            for (layer, side), _ in masks.readers.items():
                name = FINAL if side == "out" else split_input(layer, side)
                fwd.append((name, _reader_hook(store, ablated, masks, model, (layer, side), b)))
            return fwd

        out = _circuit_metrics(model, clean_prompts, corrupted_prompts, metric, len(circuits), fwd_for, ablation,
                               batch_size, max_rows, counter, progress)
    counter.seconds = time.perf_counter() - t0
    return out, pass_counts(counter, 1)


def _head_hook(keep: Tensor, ablated_z: Tensor, b: int) -> Callable:
    def hook(act, hook):
        w = keep.to(act.device, act.dtype).repeat_interleave(b, 0)[:, None, :, None]
        return w * act + (1 - w) * ablated_z.to(act.dtype)

    return hook


def head_circuit_metrics(model, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                         circuits: Sequence[Sequence[tuple[int, int]]], ablation: str = "counter",
                         batch_size: int = 16, max_rows: int = 256, progress: bool = False
                         ) -> tuple[np.ndarray, dict]:
    """Metric of every pair when only each circuit's heads ((layer, head) pairs) keep their ``z``: [circuit, pair]."""
    _check(ablation)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    keep = torch.zeros(len(circuits), n_layers, n_heads)
    for g, circuit in enumerate(circuits):
        for layer, head in circuit:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise MhopLensError(f"no head L{layer}H{head} in a model of {n_layers} layers x {n_heads} heads.")
            keep[g, layer, head] = 1.0
    counter = Counter()
    t0 = time.perf_counter()
    z_names = [hooks.head(l, "z") for l in range(n_layers)]

    def fwd_for(group, ablated, b):
        idx = list(group)
        return [(z_names[l], _head_hook(keep[idx, l], ablated[("z", l)], b)) for l in range(n_layers)]

    out = _circuit_metrics(model, clean_prompts, corrupted_prompts, metric, len(circuits), fwd_for, ablation,
                           batch_size, max_rows, counter, progress)
    counter.seconds = time.perf_counter() - t0
    return out, pass_counts(counter, 1)


def _check(ablation: str) -> None:
    if ablation not in ABLATIONS:
        raise MhopLensError(f"ablation must be one of {ABLATIONS}, not {ablation!r}.")


def _faithfulness(m: np.ndarray, full: int, empty: int) -> np.ndarray:
    mean = m.mean(1)
    gap = mean[full] - mean[empty]
    if abs(gap) < 1e-9:
        raise MhopLensError(f"the full and the empty circuit give the same metric ({mean[full]:.4g}); faithfulness is "
                            "undefined. Use pairs whose clean and corrupted metric differ.")
    return (mean - mean[empty]) / gap


def ranked_edges(scores: pd.DataFrame, model) -> list[Edge]:
    """Every edge of the complete graph, by |mean score| descending (edges absent from ``scores`` last)."""
    from mhop_lens.analyses.edge_attribution import EDGE_VALUES, aggregate_edges

    table = scores if "mean" in scores.columns else aggregate_edges(scores, next(c for c in EDGE_VALUES
                                                                                 if c in scores.columns))
    order = table.reindex(table["mean"].abs().sort_values(ascending=False, kind="stable").index)
    ranked = edges_from(order)
    seen = set(ranked)
    return ranked + [e for e in graph_edges(model) if e not in seen]


def ranked_heads(scores: pd.DataFrame) -> list[tuple[int, int]]:
    """(layer, head) by |mean score| descending, from an ``aggregate`` / ``head_scores`` / raw ``z`` frame."""
    from mhop_lens.viz.heads import head_table

    table, value = head_table(scores)
    table = table.reindex(table[value].abs().sort_values(ascending=False, kind="stable").index)
    return [(int(a), int(b)) for a, b in zip(table["layer"], table["head"], strict=True)]


def faithfulness_curve(model, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], metric: Metric,
                       scores: pd.DataFrame, level: str = "edges", sizes: Sequence[int] | None = None,
                       n_random: int = 50, ablation: str = "counter", seed: int = 0, batch_size: int = 16,
                       max_rows: int = 256, progress: bool = False) -> pd.DataFrame:
    """Faithfulness of the top-n edges (or heads) of ``scores`` for every n in ``sizes``, and of ``n_random``
    random circuits of each size drawn uniformly from the same candidates (the null distribution).

    ``scores``: an ``attribute_edges`` frame (score it with ``sides=ALL_SIDES``) or its ``aggregate_edges`` for
    ``level="edges"``; an ``attribute`` / ``aggregate`` / ``head_scores`` frame for ``"heads"``. Default sizes:
    about 12 sizes from 1 to every candidate, log-spaced. One row per (circuit, n): ``level ablation n kind draw
    metric faithfulness`` (kind ``top`` | ``random`` | ``full`` | ``empty``); ``frame.attrs``: passes and the
    full / empty metric.
    """
    if level not in LEVELS:
        raise MhopLensError(f"level must be one of {LEVELS}, not {level!r}.")
    ranked = ranked_edges(scores, model) if level == "edges" else ranked_heads(scores)
    total = len(ranked)
    sizes = sorted({int(n) for n in (sizes if sizes is not None else
                                     np.unique(np.geomspace(1, total, 12).round().astype(int)))})
    bad = [n for n in sizes if not 0 <= n <= total]
    if bad:
        raise MhopLensError(f"circuit sizes {bad} out of range: the graph has {total} {level}.")
    rng = np.random.default_rng(seed)
    circuits, rows = [ranked, []], [("full", total, -1), ("empty", 0, -1)]
    for n in sizes:
        circuits.append(ranked[:n])
        rows.append(("top", n, -1))
        for d in range(n_random):
            circuits.append([ranked[i] for i in rng.choice(total, size=n, replace=False)])
            rows.append(("random", n, d))
    evaluate = edge_circuit_metrics if level == "edges" else head_circuit_metrics
    m, info = evaluate(model, clean_prompts, corrupted_prompts, metric, circuits, ablation=ablation,
                       batch_size=batch_size, max_rows=max_rows, progress=progress)
    out = pd.DataFrame(rows, columns=["kind", "n", "draw"])
    out.insert(0, "level", level)
    out.insert(1, "ablation", ablation)
    out["metric"] = m.mean(1)
    out["faithfulness"] = _faithfulness(m, 0, 1)
    out.attrs.update(info, metric_full=float(m[0].mean()), metric_empty=float(m[1].mean()), candidates=total,
                     n_random=n_random, seed=seed)
    return out


def faithfulness_summary(curve: pd.DataFrame) -> pd.DataFrame:
    """Per size n: the top circuit's faithfulness, the random circuits' mean, sd and 95th percentile, and the share
    of random circuits at least as faithful as the top one (``p_random``: the null's p-value, (k + 1) / (R + 1))."""
    top = curve[curve["kind"] == "top"].set_index("n")["faithfulness"]
    rows = []
    for n, f in top.items():
        r = curve.loc[(curve["kind"] == "random") & (curve["n"] == n), "faithfulness"].to_numpy()
        rows.append({"n": int(n), "top": float(f), "random_mean": float(r.mean()) if len(r) else np.nan,
                     "random_sd": float(r.std(ddof=1)) if len(r) > 1 else np.nan,
                     "random_p95": float(np.quantile(r, 0.95)) if len(r) else np.nan,
                     "p_random": float((np.sum(r >= f) + 1) / (len(r) + 1)) if len(r) else np.nan})
    return pd.DataFrame(rows)


def smallest_faithful(curve: pd.DataFrame, target: float = 0.8) -> int | None:
    """The smallest size n whose top circuit reaches ``target`` faithfulness (None when none does)."""
    top = curve[(curve["kind"] == "top") & (curve["faithfulness"] >= target)]
    return int(top["n"].min()) if len(top) else None
