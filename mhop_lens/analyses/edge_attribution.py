"""Edge-level attribution patching: how much each upstream node's output, read by one downstream head through its
query, key or value input, moves the metric.

Node-level AtP (:mod:`mhop_lens.analyses.attribution`) scores a head by everything its output does. An edge
u -> (d, side) keeps only the part that reaches head d through one of its q/k/v inputs:

    edge AtP = sum over positions of  delta_u . d metric / d x_side^d   (at the corrupted run)

with ``delta_u`` = u's contribution to the residual, clean minus corrupted (a head: ``W_O^h (z_clean - z_corrupt)``;
an MLP: ``mlp_out``; ``embed``: the block-0 input, split by role span with ``per_position``) and ``x_side^d`` =
head d's own copy of the pre-LN residual feeding its q/k/v projection. TransformerLens 4's bridge gives every head
such a copy when ``use_split_qkv_input`` is on (``blocks.{l}.hook_q_input`` [batch pos n_heads d_model],
``hook_k_input`` / ``hook_v_input`` [batch pos n_kv_heads d_model]); :func:`split_qkv_inputs` switches it on for
one call and always restores it. Under grouped-query attention k/v edges end at **kv heads** (``down`` =
``L2KV1``), which several query heads share. ``side="out"`` is the direct edge u -> final residual (the logits).

Cost: 2 forwards + 1 backward per batch for every edge, counted in ``frame.attrs``. :func:`exact_edge_patching`
is the reference (path patching: the corrupted run with ``delta_u`` added to only d's side input, everything
downstream of d recomputed), with ``alpha`` < 1 for the first-order check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mhop_lens import hooks
from mhop_lens.analyses.attribution import (
    Counter,
    PairBatch,
    SpanMap,
    capture_into,
    counting_hooks,
    end_logits,
    grad_root,
    pair_batches,
    pass_counts,
    role_index,
    span_roles,
    with_metrics,
)
from mhop_lens.analyses.metrics import Metric
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import run

SIDES = ("q", "k", "v")
MLP_SIDE = "mlp"
ALL_SIDES = SIDES + (MLP_SIDE,)
UPSTREAM = ("embed", "head", "mlp")
FINAL = "ln_final.hook_in"
EDGE_VALUES = ("atp", "eap_ig", "exact")
EDGE_KEYS = ["up", "down", "side", "up_kind", "up_layer", "up_head", "down_layer", "down_head"]


class Edge(NamedTuple):
    """Upstream node (kind "embed" | "head" | "mlp", layer, head or -1) -> downstream head (layer, head; a kv head
    for k/v under GQA) through ``side`` ("q" | "k" | "v" | "out"; "out": down_layer = n_layers, down_head = -1)."""

    up_kind: str
    up_layer: int
    up_head: int
    down_layer: int
    down_head: int
    side: str


def split_input(layer: int, side: str) -> str:
    """Hook of head-wise residual copies feeding block ``layer``'s q, k or v projection (split-input mode only), or
    of the MLP's own copy of its input (``side="mlp"``, ``blocks.{l}.hook_mlp_in``, with ``use_hook_mlp_in``)."""
    if side not in ALL_SIDES:
        raise MhopLensError(f"side must be one of {ALL_SIDES}, not {side!r}.")
    return f"blocks.{layer}.hook_mlp_in" if side == MLP_SIDE else f"blocks.{layer}.hook_{side}_input"


@contextmanager
def split_qkv_inputs(model, mlp: bool = False) -> Iterator:
    """Turn on ``use_split_qkv_input`` for the block (per-head q/k/v input copies; with ``mlp`` also
    ``use_hook_mlp_in``, the MLP's own input copy) and restore the previous values afterwards, also on exceptions.
    The logits do not change (the copies are identical until a hook edits one)."""
    previous = bool(getattr(model.cfg, "use_split_qkv_input", False))
    previous_mlp = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    model.set_use_split_qkv_input(True)
    if mlp:
        model.set_use_hook_mlp_in(True)
    try:
        yield model
    finally:
        model.set_use_split_qkv_input(previous)
        if mlp:
            model.set_use_hook_mlp_in(previous_mlp)


def feeds(model, kind: str, up_layer: int, down_layer: int, side: str) -> bool:
    """Whether upstream node (kind, up_layer) is read by ``side`` of layer ``down_layer``: the embeddings feed
    everything, a head or MLP only later layers, except that a head also feeds its own layer's MLP (not in
    parallel attention/MLP blocks, GPT-NeoX / GPT-J, whose MLP reads resid_pre)."""
    if kind == "embed":
        return True
    if side == MLP_SIDE and kind == "head" and up_layer == down_layer:
        return hooks.has_resid_mid(model)
    return up_layer < down_layer


def up_label(kind: str, layer: int, head: int) -> str:
    return {"embed": "embed", "head": f"L{layer}H{head}", "mlp": f"L{layer} mlp"}[kind]


def down_label(model, layer: int, head: int, side: str) -> str:
    """"L2H3" (q side, or k/v without GQA), "L2KV1" (k/v side of a kv head under GQA), "output" (side out)."""
    if side == "out":
        return "output"
    if side == MLP_SIDE:
        return f"L{layer} mlp"
    gqa = hooks.n_kv_heads(model) != model.cfg.n_heads
    return f"L{layer}KV{head}" if gqa and side in ("k", "v") else f"L{layer}H{head}"


def _upstream_names(model) -> dict[tuple[str, int], str]:
    names = {("embed", 0): hooks.resid(0, "pre")}
    for l in range(model.cfg.n_layers):
        names[("head", l)] = hooks.head(l, "z")
        names[("mlp", l)] = hooks.mlp_out(l)
    hooks.validate(model, list(names.values()))
    return names


def _deltas(model, clean: dict, corrupt: dict, upstream: Sequence[str]
            ) -> dict[tuple[str, int], Float[Tensor, "batch pos node d_model"]]:
    """Each upstream node's residual contribution, clean minus corrupted (heads through their own W_O slice)."""
    out = {}
    for (kind, l), c in clean.items():
        if kind not in upstream:
            continue
        d = c - corrupt[(kind, l)]
        if kind == "head":
            w_o = model.blocks[l].attn.W_O.detach().to(d.dtype).to(d.device)
            out[(kind, l)] = torch.einsum("bphe,hed->bphd", d, w_o)
        else:
            out[(kind, l)] = d.unsqueeze(2)
    return out


def _onehot(role_idx: Int[Tensor, "batch pos"] | None, shape: tuple[int, int], n_roles: int
            ) -> Float[Tensor, "batch pos role"]:
    if role_idx is None:
        return torch.ones(*shape, 1)
    onehot = torch.zeros(*role_idx.shape, n_roles)
    keep = role_idx >= 0
    onehot[keep] = torch.nn.functional.one_hot(role_idx[keep], n_roles).float()
    return onehot


def _edge_frame(model, scores: list[tuple[tuple[str, int], int, str, Tensor]], rows: Tensor,
                roles: Sequence[str] | None, value: str = "atp") -> pd.DataFrame:
    """Long table from blocks of scores [batch, role, up node, down head] per (upstream key, down layer, side)."""
    frames = []
    for (kind, lu), ld, side, s in scores:
        b, r, nu, nd = s.shape
        grid = np.stack(np.meshgrid(np.arange(b), np.arange(r), np.arange(nu), np.arange(nd), indexing="ij"),
                        -1).reshape(-1, 4)
        up_heads = grid[:, 2] if kind == "head" else np.full(len(grid), -1)
        down_heads = grid[:, 3] if side in SIDES else np.full(len(grid), -1)
        ups = np.asarray([up_label(kind, lu, h if kind == "head" else -1) for h in range(nu)], dtype=object)
        downs = np.asarray([down_label(model, ld, h, side) for h in range(nd)], dtype=object)
        frame = pd.DataFrame({
            "pair": rows.numpy()[grid[:, 0]],
            "up": ups[grid[:, 2]],
            "down": downs[grid[:, 3]],
            "side": side,
            "up_kind": kind, "up_layer": lu if kind != "embed" else -1, "up_head": up_heads,
            "down_layer": ld, "down_head": down_heads,
            value: s.detach().double().numpy().reshape(-1),
        })
        if roles is not None:
            frame["span"] = np.asarray(roles, dtype=object)[grid[:, 1]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def attribute_edges(
    model,
    clean_prompts: Sequence[str],
    corrupted_prompts: Sequence[str],
    metric: Metric,
    sides: Sequence[str] = SIDES,
    upstream: Sequence[str] = UPSTREAM,
    output: bool = True,
    per_position: bool | Sequence[SpanMap] = False,
    roles: Sequence[str] | None = None,
    ig_steps: int = 0,
    batch_size: int = 16,
    max_rows: int = 256,
    pair_ids: Sequence | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Edge AtP (or EAP-IG) for every (upstream node, later head, side): one row per (pair, edge[, span]).

    Upstream nodes: ``"embed"`` (block-0 input), every ``"head"`` (its W_O-projected output) and every ``"mlp"``;
    downstream: each head of a later layer (any layer for ``embed``) through each of ``sides`` (kv heads for k/v
    under GQA; ``"mlp"`` adds each MLP's input, :data:`ALL_SIDES` is the complete graph) and, with ``output``, the
    final residual (``side == "out"``, the direct path to the logits).
    ``per_position`` (one ``{role: [(start, end)]}`` per pair) splits every edge by the role of the position where
    it is read (column ``span``, plus ``"other"``); for ``embed`` that gives role span -> head edges. Summed over
    all upstream nodes, a head side's incoming edges equal ``(resid_pre_clean - resid_pre_corrupt) . grad`` of
    that side input (tested).

    ``ig_steps > 0`` is EAP-IG (Hanna et al. 2024, "Have Faith in Faithfulness"): the gradient at every side input
    is averaged over ``ig_steps`` runs whose input embeddings sit at ``corrupt + k/ig_steps (clean - corrupt)``,
    k = 0 .. ig_steps - 1 (their left Riemann sum; value column ``eap_ig``). One step is the corrupted run itself,
    so ``ig_steps=1`` equals edge AtP. The steps run as copies along the batch (``max_rows`` rows per forward).
    Columns: ``pair [pair_id] up down side up_kind up_layer up_head down_layer down_head [span] atp|eap_ig
    metric_clean metric_corrupt``; ``frame.attrs``: passes, seconds, ig_steps.
    """
    bad = [s for s in sides if s not in ALL_SIDES] + [u for u in upstream if u not in UPSTREAM]
    if bad or not sides or not upstream:
        raise MhopLensError(f"bad or empty sides/upstream ({bad or 'empty'}); sides from {ALL_SIDES}, upstream "
                            f"from {UPSTREAM}.")
    if ig_steps < 0:
        raise MhopLensError(f"ig_steps must be >= 0 (0 = edge AtP), not {ig_steps}.")
    spans, roles = span_roles(per_position, len(clean_prompts), roles)
    up_names = _upstream_names(model)
    down_names = [(l, s, split_input(l, s)) for l in range(model.cfg.n_layers) for s in sides]
    counter = Counter()
    frames = []
    with split_qkv_inputs(model, mlp=MLP_SIDE in sides):
        hooks.validate(model, [n for _, _, n in down_names])
        for batch in pair_batches(model, clean_prompts, corrupted_prompts, batch_size, "edge attribution", progress):
            sl = slice(batch.start, batch.start + batch_size)
            role_idx = role_index(batch.clean, spans[sl], roles) if spans is not None else None
            t0 = time.perf_counter()
            scores, m_clean, m_corrupt = _edge_batch(model, batch, metric, up_names, down_names, upstream, output,
                                                     role_idx, len(roles or [0]), counter, ig_steps, max_rows)
            counter.seconds += time.perf_counter() - t0
            frame = _edge_frame(model, scores, batch.rows, roles if spans is not None else None,
                                "eap_ig" if ig_steps > 0 else "atp")
            frames.append(with_metrics(frame, batch, m_clean, m_corrupt))
    out = _with_pair_ids(pd.concat(frames, ignore_index=True), pair_ids)
    out.attrs.update(pass_counts(counter, len(frames)), ig_steps=ig_steps)
    return out


def _with_pair_ids(frame: pd.DataFrame, pair_ids: Sequence | None) -> pd.DataFrame:
    if pair_ids is not None:
        frame.insert(1, "pair_id", np.asarray(pair_ids, dtype=object)[frame["pair"].to_numpy()])
    return frame


def _capture_copy(store: dict, key) -> Callable:
    """Keep (and pass on) a copy of the hook's input, so its gradient is that of this reader only: the bridge
    hands ``hook_mlp_in`` the residual tensor itself, whose gradient also carries every later layer's use."""

    def hook(act, hook):
        store[key] = act.clone()
        return store[key]

    return hook


def _interpolate_input(clean_embed: Tensor, alphas: Tensor) -> Callable:
    """Block-0 input of copy k of the corrupted batch moved to ``corrupt + alphas[k] (clean - corrupt)``."""

    def hook(act, hook):
        k = len(alphas)
        a = alphas.to(act.device, act.dtype).repeat_interleave(act.shape[0] // k).view(-1, 1, 1)
        return act + a * (clean_embed.to(act.dtype).repeat(k, 1, 1) - act)

    return hook


def _edge_batch(model, batch: PairBatch, metric: Metric, up_names, down_names, upstream, output: bool, role_idx,
                n_roles: int, counter: Counter, ig_steps: int, max_rows: int):
    """Clean forward (cache), then the corrupted run (AtP) or its ``ig_steps`` input interpolations (EAP-IG,
    copies along the batch), each with grad at every split input; gradients summed over copies, one backward per
    forward of copies. The corrupted upstream activations are the alpha = 0 copy's."""
    clean, corrupt, rows = batch.clean, batch.corrupt, batch.rows
    b = len(rows)
    clean_acts: dict = {}
    with torch.no_grad():
        fwd = [(n, capture_into(clean_acts, k)) for k, n in up_names.items()] + counting_hooks(counter)
        m_clean = metric(end_logits(run(model, clean, fwd), clean), rows)
    alphas = torch.arange(max(ig_steps, 1), dtype=torch.float32) / max(ig_steps, 1)
    per_fwd = max(1, max_rows // b)
    grad_sum: dict = {}
    corrupt_acts: dict = {}
    m_corrupt = None
    keys = [(l, s) for l, s, _ in down_names] + ([(model.cfg.n_layers, "out")] if output else [])
    for i in range(0, len(alphas), per_fwd):
        chunk = alphas[i : i + per_fwd]
        k = len(chunk)
        acts: dict = {}
        grads_at: dict = {}
        _, root = grad_root()
        fwd = [("hook_embed", root)]
        if ig_steps > 0:
            fwd.append((up_names[("embed", 0)], _interpolate_input(clean_acts[("embed", 0)], chunk)))
        fwd += [(n, capture_into(acts, key)) for key, n in up_names.items()] if i == 0 else []
        fwd += [(n, _capture_copy(grads_at, (l, s))) for l, s, n in down_names]
        if output:
            fwd.append((FINAL, _capture_copy(grads_at, (model.cfg.n_layers, "out"))))
        fwd += counting_hooks(counter)
        with torch.enable_grad():
            m = metric(end_logits(run(model, corrupt.repeat(k), fwd), corrupt, k), rows.repeat(k))
            grads = torch.autograd.grad(m.sum(), [grads_at[key] for key in keys], allow_unused=True)
        if i == 0:
            m_corrupt = m[:b].detach()
            corrupt_acts = {key: v[:b].detach() for key, v in acts.items()}
        for key, g in zip(keys, grads, strict=True):
            g = torch.zeros_like(grads_at[key]) if g is None else g.detach()
            g = g.view(k, b, *g.shape[1:]).sum(0)
            grad_sum[key] = grad_sum[key] + g if key in grad_sum else g
    model.zero_grad(set_to_none=True)
    deltas = _deltas(model, {key: v.detach() for key, v in clean_acts.items()}, corrupt_acts, upstream)
    some = next(iter(deltas.values()))
    onehot = _onehot(role_idx, tuple(some.shape[:2]), n_roles).to(some)
    scores = []
    for (ld, side) in keys:
        g = grad_sum[(ld, side)] / len(alphas)
        if side in ("out", MLP_SIDE):
            g = g.unsqueeze(2)
        for (kind, lu), delta in deltas.items():
            if side != "out" and not feeds(model, kind, lu, ld, side):
                continue
            s = torch.einsum("bpr,bpud,bpgd->brug", onehot, delta.to(g.dtype), g).cpu()
            scores.append(((kind, lu), ld, side, s))
    return scores, m_clean.detach(), m_corrupt


def edges_from(frame_or_edges) -> list[Edge]:
    """Edges from a frame with the ``Edge`` columns (e.g. ``aggregate_edges(...).head(20)``) or from tuples."""
    if isinstance(frame_or_edges, pd.DataFrame):
        cols = list(Edge._fields)
        unique = frame_or_edges[cols].drop_duplicates()
        return [Edge(str(r[0]), *(int(x) for x in r[1:5]), str(r[5])) for r in unique.itertuples(index=False)]
    return [Edge(*e) for e in frame_or_edges]


def _edge_hook(edge_rows: list[tuple[int, int, Tensor]], batch: int, alpha: float):
    """Add ``alpha * delta`` to head ``h``'s copy (or the MLP input / final residual, h = -1) in copy ``g`` of the
    batch."""

    def hook(act, hook):
        act = act.clone()
        for g, h, delta in edge_rows:
            rows = slice(g * batch, (g + 1) * batch)
            d = alpha * delta.to(act.dtype).to(act.device)
            if h < 0:
                act[rows] = act[rows] + d
            else:
                act[rows, :, h] = act[rows, :, h] + d
        return act

    return hook


@torch.no_grad()
def exact_edge_patching(
    model,
    clean_prompts: Sequence[str],
    corrupted_prompts: Sequence[str],
    metric: Metric,
    edges,
    batch_size: int = 16,
    max_rows: int = 256,
    pair_ids: Sequence | None = None,
    alpha: float = 1.0,
    progress: bool = False,
) -> pd.DataFrame:
    """Path patching of each edge (all positions): metric(corrupted run with ``alpha * delta_u`` added to only
    head d's ``side`` input copy) - metric(corrupted run). The rest of the residual stays corrupted; everything
    downstream of d is recomputed. Edges are patched in copies of the corrupted batch (``max_rows`` rows per
    forward). ``edges``: see :func:`edges_from`. Same edge columns as :func:`attribute_edges` with ``exact``.
    """
    edges = edges_from(edges)
    for e in edges:
        if e.side not in ALL_SIDES + ("out",) or (e.side != "out" and not feeds(model, e.up_kind, e.up_layer,
                                                                                  e.down_layer, e.side)):
            raise MhopLensError(f"not an edge: {e} (upstream must be in an earlier layer; side in q/k/v/mlp/out).")
    up_names = _upstream_names(model)
    counter = Counter()
    frames = []
    with split_qkv_inputs(model, mlp=any(e.side == MLP_SIDE for e in edges)):
        for batch in pair_batches(model, clean_prompts, corrupted_prompts, batch_size, "exact edge patching",
                                  progress):
            rows, clean, corrupt = batch.rows, batch.clean, batch.corrupt
            t0 = time.perf_counter()
            acts: list[dict] = [{}, {}]
            ms = []
            for enc, store in ((clean, acts[0]), (corrupt, acts[1])):
                fwd = [(n, capture_into(store, k)) for k, n in up_names.items()] + counting_hooks(counter)
                ms.append(metric(end_logits(run(model, enc, fwd), enc), rows))
            deltas = _deltas(model, acts[0], acts[1], UPSTREAM)
            b = len(rows)
            per_fwd = max(1, max_rows // b)
            effects = np.zeros((len(edges), b))
            for i in range(0, len(edges), per_fwd):
                group = edges[i : i + per_fwd]
                by_hook: dict[str, list] = {}
                for g, e in enumerate(group):
                    delta = deltas[(e.up_kind, e.up_layer if e.up_kind != "embed" else 0)]
                    delta = delta[:, :, max(e.up_head, 0)]
                    name = FINAL if e.side == "out" else split_input(e.down_layer, e.side)
                    by_hook.setdefault(name, []).append((g, e.down_head if e.side in SIDES else -1, delta))
                fwd = [(n, _edge_hook(v, b, alpha)) for n, v in by_hook.items()] + counting_hooks(counter)
                k = len(group)
                m = metric(end_logits(run(model, corrupt.repeat(k), fwd), corrupt, k), rows.repeat(k)).view(k, b)
                effects[i : i + k] = (m - ms[1]).cpu().double().numpy()
            counter.seconds += time.perf_counter() - t0
            frame = pd.DataFrame([
                {"pair": int(rows[j]), "up": up_label(e.up_kind, e.up_layer, e.up_head),
                 "down": down_label(model, e.down_layer, e.down_head, e.side), **e._asdict(), "exact": effects[g, j],
                 "metric_clean": float(ms[0][j]), "metric_corrupt": float(ms[1][j])}
                for g, e in enumerate(edges) for j in range(b)])
            frames.append(frame)
    out = _with_pair_ids(pd.concat(frames, ignore_index=True), pair_ids)
    out.attrs.update(pass_counts(counter, len(frames)), alpha=alpha)
    return out


def aggregate_edges(frame: pd.DataFrame, value: str | None = None) -> pd.DataFrame:
    """Mean, mean |.| and sd over pairs per edge (summed over spans within a pair), sorted by |mean| descending."""
    value = value or next(c for c in EDGE_VALUES if c in frame.columns)
    keys = [c for c in EDGE_KEYS if c in frame.columns]
    per_pair = frame.groupby(["pair"] + keys, sort=False)[value].sum().reset_index()
    g = per_pair.groupby(keys, sort=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "abs_mean": g.apply(lambda s: s.abs().mean()), "std": g.std(),
                        "n": g.size()}).reset_index()
    return out.reindex(out["mean"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def edge_agreement(atp: pd.DataFrame, exact: pd.DataFrame) -> dict:
    """Spearman (signed, |.|) and Pearson of per-edge mean AtP (or EAP-IG) vs exact edge patching over the edges in
    both."""
    from scipy.stats import pearsonr, spearmanr

    a, e = aggregate_edges(atp), aggregate_edges(exact, "exact")
    m = a.merge(e, on=[k for k in EDGE_KEYS if k in a.columns and k in e.columns], suffixes=("_atp", "_exact"))
    if len(m) < 3:
        raise MhopLensError(f"need >= 3 common edges to correlate, got {len(m)}.")
    top = m["mean_exact"].abs().idxmax()
    return {"n_edges": len(m),
            "spearman": float(spearmanr(m["mean_atp"], m["mean_exact"]).statistic),
            "spearman_abs": float(spearmanr(m["mean_atp"].abs(), m["mean_exact"].abs()).statistic),
            "pearson": float(pearsonr(m["mean_atp"], m["mean_exact"]).statistic),
            "top_exact_edge": f"{m.at[top, 'up']} -> {m.at[top, 'down']}.{m.at[top, 'side']}",
            "top_exact_effect": float(m.at[top, "mean_exact"]), "top_exact_atp": float(m.at[top, "mean_atp"])}
