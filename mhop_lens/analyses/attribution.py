"""Attribution patching (AtP) over every head, MLP and residual site, with exact activation patching as reference.

AtP estimates, for each node, the metric change from patching its clean activation into the corrupted run:
``(act_clean - act_corrupt) . d metric / d act`` at the corrupted run. All nodes cost 2 forwards (clean with a
cache, corrupted with grad) + 1 backward per batch. The linearisation fails where downstream attention saturates
(docs/heads.md; shared/notes/organism-in-context.md), so ``ig_steps`` adds an integrated-gradients variant and
``exact_patching`` measures the real effect, many nodes per forward (patched copies along the batch dimension).

Sites: ``"z"`` = each head's ``hook_z`` (one node per layer x head), ``"mlp_out"`` and ``"resid"`` (= resid_post)
= one node per layer. Clean and corrupted prompts of a pair must have the same number of tokens (positions align).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses.metrics import Metric
from mhop_lens.errors import SpanError
from mhop_lens.forward import logits_at, run
from mhop_lens.positions import token_positions
from mhop_lens.tokens import Encoded, encode

SITES = ("z", "mlp_out", "resid")
OTHER = "other"
SpanMap = dict[str, list[tuple[int, int]]]


@dataclass
class Counter:
    """Forward and backward passes actually run (counted at the model's input and final residual)."""

    forward: int = 0
    backward: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def site_hooks(model, sites: Sequence[str]) -> list[tuple[str, int, str]]:
    """(site, layer, hook name) for every requested site of every layer."""
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"unknown attribution site(s) {bad}; choose from {SITES}.")
    names = {"z": lambda l: hooks.head(l, "z"), "mlp_out": hooks.mlp_out, "resid": lambda l: hooks.resid(l, "post")}
    out = [(s, l, names[s](l)) for l in range(model.cfg.n_layers) for s in sites]
    hooks.validate(model, [n for _, _, n in out])
    return out


def encode_pairs(model, clean: Sequence[str], corrupted: Sequence[str]) -> tuple[Encoded, Encoded]:
    """Encode clean and corrupted prompts to one padded width; raise if a pair's token counts differ."""
    if len(clean) != len(corrupted):
        raise SpanError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted ones; pass one corrupted "
                        "prompt per clean prompt.")
    enc = encode(model, list(clean) + list(corrupted))
    n = len(clean)
    bad = [i for i in range(n) if int(enc.lengths[i]) != int(enc.lengths[n + i])]
    if bad:
        i = bad[0]
        raise SpanError(f"{len(bad)} pair(s) have clean and corrupted prompts of different token counts "
                        f"(e.g. pair {i}: {int(enc.lengths[i])} vs {int(enc.lengths[n + i])} tokens, "
                        f"{clean[i]!r} / {corrupted[i]!r}); positions must align. Keep only aligned pairs "
                        "(mhop_lens.analyses.attribution.aligned_pairs) or use same-length distractors.")
    return enc.select(slice(0, n)), enc.select(slice(n, 2 * n))


class PairBatch(NamedTuple):
    start: int  # index of the batch's first pair
    rows: Int[Tensor, " b"]  # pair indices of the batch
    clean: Encoded
    corrupt: Encoded


def pair_batches(model, clean_prompts: Sequence[str], corrupted_prompts: Sequence[str], batch_size: int,
                 desc: str, progress: bool = False) -> Iterator[PairBatch]:
    """Consecutive batches of pairs, clean and corrupted encoded together (``encode_pairs``: positions align)."""
    for start in tqdm(range(0, len(clean_prompts), batch_size), desc=desc, disable=not progress):
        sl = slice(start, start + batch_size)
        clean, corrupt = encode_pairs(model, clean_prompts[sl], corrupted_prompts[sl])
        yield PairBatch(start, torch.arange(start, min(start + batch_size, len(clean_prompts))), clean, corrupt)


def with_metrics(frame: pd.DataFrame, batch: PairBatch, m_clean: Tensor, m_corrupt: Tensor) -> pd.DataFrame:
    """``frame`` (rows keyed by ``pair``) with each pair's clean and corrupted metric as columns."""
    at = frame["pair"].to_numpy() - batch.start
    frame["metric_clean"] = m_clean.detach().cpu().double().numpy()[at]
    frame["metric_corrupt"] = m_corrupt.detach().cpu().double().numpy()[at]
    return frame


def pass_counts(counter: Counter, n_batches: int) -> dict:
    """``frame.attrs`` entries: passes run, per batch, and seconds."""
    return dict(forwards=counter.forward, backwards=counter.backward, batches=n_batches,
                forwards_per_batch=counter.forward / n_batches, backwards_per_batch=counter.backward / n_batches,
                seconds=counter.seconds)


def aligned_pairs(model, clean: Sequence[str], corrupted: Sequence[str]) -> list[int]:
    """Indices of the pairs whose clean and corrupted prompts have the same number of tokens."""
    enc = encode(model, list(clean) + list(corrupted))
    n = len(clean)
    return [i for i in range(n) if int(enc.lengths[i]) == int(enc.lengths[n + i])]


def end_logits(logits: Float[Tensor, "batch pos vocab"], enc: Encoded, repeat: int = 1) -> Float[Tensor, "b vocab"]:
    last = enc.last.to(logits.device).repeat(repeat)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


def counting_hooks(counter: Counter) -> list[tuple[str, Callable]]:
    """Count forwards at the embedding and backwards at the final residual (via a tensor hook)."""

    def fwd(act, hook):
        counter.forward += 1
        return act

    def final(act, hook):
        if act.requires_grad:
            act.register_hook(lambda g: _count_backward(counter, g))
        return act

    return [("hook_embed", fwd), ("ln_final.hook_in", final)]


def _count_backward(counter: Counter, grad: Tensor) -> Tensor:
    counter.backward += 1
    return grad


def role_index(enc: Encoded, spans: Sequence[SpanMap] | None, roles: Sequence[str]) -> Int[Tensor, "batch pos"]:
    """Role id per token (index into ``roles``; the last entry = OTHER; -1 for BOS/padding)."""
    idx = torch.full(enc.tokens.shape, -1, dtype=torch.long)
    for b, offsets in enumerate(enc.offsets):
        for p, off in enumerate(offsets):
            if off is not None:
                idx[b, p] = len(roles) - 1
        for r, role in enumerate(roles[:-1]):
            for span in (spans[b].get(role, []) if spans else []):
                for p in token_positions(offsets, tuple(span)):
                    idx[b, p] = r
    return idx


def _reduce(per_pos: Float[Tensor, "batch pos node"], role_idx: Int[Tensor, "batch pos"] | None, n_roles: int
            ) -> Float[Tensor, "batch role node"]:
    """Sum node scores over positions (role_idx None) or within each role."""
    if role_idx is None:
        return per_pos.sum(1, keepdim=True)
    onehot = torch.zeros(*role_idx.shape, n_roles, dtype=per_pos.dtype, device=per_pos.device)
    keep = role_idx >= 0
    onehot[keep] = torch.nn.functional.one_hot(role_idx[keep], n_roles).to(per_pos.dtype).to(per_pos.device)
    return torch.einsum("bpr,bpn->brn", onehot, per_pos)


def _node_scores(site: str, delta: Tensor, grad: Tensor) -> Float[Tensor, "batch pos node"]:
    """Per-position dot products: per head for z, one node for mlp_out / resid."""
    prod = delta * grad
    return prod.sum(-1) if site == "z" else prod.sum(-1, keepdim=True)


def _frame(scores: dict[tuple[str, int], Tensor], rows: Tensor, pair_ids, roles: Sequence[str] | None,
           column: str) -> pd.DataFrame:
    """Long table: one row per (pair, site, layer, head, [role])."""
    frames = []
    for (site, layer), s in scores.items():
        b, r, n = s.shape
        arr = s.detach().cpu().double().numpy()
        grid = np.stack(np.meshgrid(np.arange(b), np.arange(r), np.arange(n), indexing="ij"), -1).reshape(-1, 3)
        frame = pd.DataFrame({
            "pair": rows.cpu().numpy()[grid[:, 0]],
            "site": site,
            "layer": layer,
            "head": grid[:, 2] if site == "z" else -1,
            column: arr.reshape(-1),
        })
        if roles is not None:
            frame.insert(4, "span", np.asarray(roles, dtype=object)[grid[:, 1]])
        frames.append(frame)
    out = pd.concat(frames, ignore_index=True)
    if pair_ids is not None:
        out.insert(1, "pair_id", np.asarray(pair_ids, dtype=object)[out["pair"].to_numpy()])
    return out


def span_roles(per_position: bool | Sequence[SpanMap], n_pairs: int, roles: Sequence[str] | None
               ) -> tuple[list[SpanMap] | None, list[str] | None]:
    """The span maps of ``per_position`` (None when it is a bool) and the role order: ``roles`` (default: every role
    present, sorted) with ``OTHER`` last."""
    if isinstance(per_position, bool):
        return None, None if roles is None else list(roles)
    spans = list(per_position)
    if len(spans) != n_pairs:
        raise SpanError(f"{len(spans)} span maps for {n_pairs} pairs; pass one per pair.")
    roles = list(roles) if roles else sorted({r for s in spans for r in s})
    return spans, [r for r in roles if r != OTHER] + [OTHER]


def attribute(
    model,
    clean_prompts: Sequence[str],
    corrupted_prompts: Sequence[str],
    metric: Metric,
    sites: Sequence[str] = SITES,
    per_position: bool | Sequence[SpanMap] = False,
    roles: Sequence[str] | None = None,
    ig_steps: int = 0,
    batch_size: int = 16,
    pair_ids: Sequence | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """AtP score of every node for every pair: one row per (pair, site, layer, head[, span]).

    ``per_position=False`` sums over positions; a list of role spans (one ``{role: [(start, end)]}`` per pair,
    character spans of the clean prompt, e.g. a GAR example's ``spans``) gives one row per role (``roles``, default:
    all roles present) plus ``"other"`` for the remaining real tokens. ``ig_steps > 0`` replaces the gradient at the
    corrupted run by its mean along the straight path corrupted -> clean of that node's site in that layer
    (midpoint rule; ``ig_steps`` interpolation points per (layer, site), batched). Columns ``metric_clean`` /
    ``metric_corrupt`` hold the pair's metric; ``frame.attrs`` holds pass counts and time per batch.
    """
    spans, roles = span_roles(per_position, len(clean_prompts), roles)
    named = site_hooks(model, sites)
    counter = Counter()
    frames = []
    for batch in pair_batches(model, clean_prompts, corrupted_prompts, batch_size, "attribution", progress):
        sl = slice(batch.start, batch.start + batch_size)
        role_idx = role_index(batch.clean, spans[sl], roles) if spans is not None else None
        t0 = time.perf_counter()
        step = _atp_batch if ig_steps <= 0 else _ig_batch
        scores, m_clean, m_corrupt = step(model, batch.clean, batch.corrupt, metric, batch.rows, named, counter,
                                          ig_steps)
        counter.seconds += time.perf_counter() - t0
        reduced = {k: _reduce(v, None if role_idx is None else role_idx.to(v.device), len(roles or [0]))
                   for k, v in scores.items()}
        frame = _frame(reduced, batch.rows, pair_ids, roles if spans is not None else None,
                       "atp" if ig_steps <= 0 else "atp_ig")
        frames.append(with_metrics(frame, batch, m_clean, m_corrupt))
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(pass_counts(counter, len(frames)), ig_steps=ig_steps)
    return out


def capture_into(store: dict, key) -> Callable:
    """A hook keeping its activation (still in the autograd graph) in ``store[key]``."""

    def hook(act, hook):
        store[key] = act
        return act

    return hook


def grad_root() -> tuple[Tensor, Callable]:
    """A zero leaf added to the embeddings, so activations carry grad even when parameters are frozen."""
    leaf = torch.zeros((), requires_grad=True)

    def hook(act, hook):
        return act + leaf.to(act.dtype).to(act.device)

    return leaf, hook


@torch.no_grad()
def _clean_cache(model, enc: Encoded, named, counter: Counter, metric: Metric, rows: Tensor):
    store: dict = {}
    fwd = [(name, capture_into(store, (site, layer))) for site, layer, name in named] + counting_hooks(counter)
    logits = run(model, enc, fwd)
    return {k: v.detach() for k, v in store.items()}, metric(end_logits(logits, enc), rows)


def _atp_batch(model, clean: Encoded, corrupt: Encoded, metric: Metric, rows: Tensor, named, counter: Counter,
               _ig_steps: int):
    """2 forwards + 1 backward: clean cache, corrupted forward with grad, one backward of the summed metric."""
    clean_acts, m_clean = _clean_cache(model, clean, named, counter, metric, rows)
    store: dict = {}
    _, root = grad_root()
    fwd = [("hook_embed", root)] + [(name, capture_into(store, (s, l))) for s, l, name in named]
    fwd += counting_hooks(counter)
    with torch.enable_grad():
        logits = run(model, corrupt, fwd)
        m_corrupt = metric(end_logits(logits, corrupt), rows)
        keys = list(store)
        grads = torch.autograd.grad(m_corrupt.sum(), [store[k] for k in keys], allow_unused=True)
    scores = {}
    for key, g in zip(keys, grads, strict=True):
        act = store[key].detach()
        g = torch.zeros_like(act) if g is None else g
        scores[key] = _node_scores(key[0], clean_acts[key] - act, g)
    model.zero_grad(set_to_none=True)
    return scores, m_clean, m_corrupt.detach()


def _interpolate(clean_act: Tensor, corrupt_act: Tensor, alphas: Tensor, store: dict, key) -> Callable:
    """Replace the site by corrupt + alpha (clean - corrupt), one alpha per copy of the batch; keep it for grad."""

    def hook(act, hook):
        shape = (-1,) + (1,) * (act.dim() - 1)
        a = alphas.to(act.device, act.dtype).repeat_interleave(corrupt_act.shape[0]).view(shape)
        base = corrupt_act.repeat(len(alphas), *([1] * (act.dim() - 1)))
        delta = (clean_act - corrupt_act).repeat(len(alphas), *([1] * (act.dim() - 1)))
        x = (base + a * delta).detach().requires_grad_(True)
        store[key] = x
        return x

    return hook


def _ig_batch(model, clean: Encoded, corrupt: Encoded, metric: Metric, rows: Tensor, named, counter: Counter,
              ig_steps: int):
    """Integrated gradients per (layer, site): 2 + n_sites forwards, n_sites backwards on ig_steps x batch rows."""
    clean_acts, m_clean = _clean_cache(model, clean, named, counter, metric, rows)
    corrupt_acts, m_corrupt = _clean_cache(model, corrupt, named, counter, metric, rows)
    alphas = (torch.arange(ig_steps, dtype=torch.float32) + 0.5) / ig_steps
    tokens = corrupt.repeat(ig_steps)
    b = corrupt.tokens.shape[0]
    scores = {}
    for site, layer, name in named:
        key = (site, layer)
        store: dict = {}
        fwd = [(name, _interpolate(clean_acts[key], corrupt_acts[key], alphas, store, key))]
        with torch.enable_grad():
            logits = run(model, tokens, fwd + counting_hooks(counter))
            m = metric(end_logits(logits, corrupt, ig_steps), rows.repeat(ig_steps))
            (g,) = torch.autograd.grad(m.sum(), [store[key]])
        mean_grad = g.view(ig_steps, b, *g.shape[1:]).mean(0)
        scores[key] = _node_scores(site, clean_acts[key] - corrupt_acts[key], mean_grad)
    model.zero_grad(set_to_none=True)
    return scores, m_clean, m_corrupt


def _patch_hook(site: str, nodes: list[tuple[int, int]], clean_act: Tensor, batch: int, alpha: float) -> Callable:
    """In copy g of the batch, move node ``nodes[g]`` (head index or -1 = whole site) a fraction ``alpha`` of the
    way to its clean value (alpha = 1: activation patching)."""

    def hook(act, hook):
        act = act.clone()
        clean = clean_act.to(act.dtype)
        for g, h in nodes:
            rows = slice(g * batch, (g + 1) * batch)
            if site == "z":
                act[rows, :, h] = act[rows, :, h] + alpha * (clean[:, :, h] - act[rows, :, h])
            else:
                act[rows] = act[rows] + alpha * (clean - act[rows])
        return act

    return hook


@torch.no_grad()
def exact_patching(
    model,
    clean_prompts: Sequence[str],
    corrupted_prompts: Sequence[str],
    metric: Metric,
    sites: Sequence[str] = ("z",),
    batch_size: int = 16,
    max_rows: int = 256,
    pair_ids: Sequence | None = None,
    progress: bool = False,
    alpha: float = 1.0,
) -> pd.DataFrame:
    """Exact activation patching of every node (all positions), the reference AtP approximates.

    Effect = metric(corrupted run with the node's clean activation) - metric(corrupted run). Many nodes are
    patched in one forward: the corrupted batch is repeated, copy g carrying node g's patch (``max_rows`` rows
    per forward). Same columns as :func:`attribute`, with ``exact`` in place of ``atp``. ``alpha`` < 1 patches
    only that fraction of the way (effect / alpha -> AtP as alpha -> 0: the linearisation check).
    """
    named = site_hooks(model, sites)
    nodes = [(s, l, h) for s, l, _ in named for h in (range(model.cfg.n_heads) if s == "z" else [-1])]
    name_of = {(s, l): n for s, l, n in named}
    counter = Counter()
    frames = []
    for batch in pair_batches(model, clean_prompts, corrupted_prompts, batch_size, "exact patching", progress):
        rows, clean, corrupt = batch.rows, batch.clean, batch.corrupt
        t0 = time.perf_counter()
        clean_acts, m_clean = _clean_cache(model, clean, named, counter, metric, rows)
        m_corrupt = metric(logits_at(model, corrupt, counting_hooks(counter)), rows)
        b = len(rows)
        per_fwd = max(1, max_rows // b)
        effects: dict[tuple[str, int], Tensor] = {}
        for i in range(0, len(nodes), per_fwd):
            group = nodes[i : i + per_fwd]
            by_site: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for g, (s, l, h) in enumerate(group):
                by_site.setdefault((s, l), []).append((g, h))
            fwd = [(name_of[k], _patch_hook(k[0], v, clean_acts[k], b, alpha)) for k, v in by_site.items()]
            logits = logits_at(model, corrupt.repeat(len(group)), fwd + counting_hooks(counter))
            m = metric(logits, rows.repeat(len(group))).view(len(group), b)
            for g, (s, l, h) in enumerate(group):
                col = effects.setdefault((s, l), torch.zeros(b, 1, model.cfg.n_heads if s == "z" else 1))
                col[:, 0, max(h, 0)] = (m[g] - m_corrupt).cpu()
        counter.seconds += time.perf_counter() - t0
        frames.append(with_metrics(_frame(effects, rows, pair_ids, None, "exact"), batch, m_clean, m_corrupt))
    out = pd.concat(frames, ignore_index=True)
    out.attrs.update(pass_counts(counter, len(frames)), rows_per_forward=max_rows)
    return out


def aggregate(frame: pd.DataFrame, value: str | None = None) -> pd.DataFrame:
    """Mean and mean |.| over pairs per node (site, layer, head[, span]), sorted by |mean| descending."""
    value = value or next(c for c in ("atp", "atp_ig", "exact") if c in frame.columns)
    keys = [c for c in ("site", "layer", "head", "span") if c in frame.columns]
    g = frame.groupby(keys, sort=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "abs_mean": g.apply(lambda s: s.abs().mean()), "std": g.std(),
                        "n": g.size()}).reset_index()
    return out.reindex(out["mean"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def node_label(site: str, layer: int, head: int = -1) -> str:
    """"L1H2" for a head, "L1 mlp_out" / "L1 resid" for a layer site."""
    return f"L{layer}H{head}" if site == "z" else f"L{layer} {site}"


def rank_agreement(approx: pd.DataFrame, exact: pd.DataFrame, site: str = "z") -> dict[str, float]:
    """Spearman / Pearson of per-node mean scores (signed and absolute) between an AtP frame and exact patching."""
    from scipy.stats import pearsonr, spearmanr

    a = aggregate(approx[approx["site"] == site])
    e = aggregate(exact[exact["site"] == site])
    m = a.merge(e, on=["site", "layer", "head"], suffixes=("_atp", "_exact"))
    if len(m) < 3:
        raise ValueError(f"need >= 3 common {site} nodes to correlate, got {len(m)}.")
    top = m["mean_exact"].abs().idxmax()
    return {
        "n_nodes": len(m),
        "spearman": float(spearmanr(m["mean_atp"], m["mean_exact"]).statistic),
        "spearman_abs": float(spearmanr(m["mean_atp"].abs(), m["mean_exact"].abs()).statistic),
        "pearson": float(pearsonr(m["mean_atp"], m["mean_exact"]).statistic),
        "top_exact_node": node_label(site, int(m.at[top, "layer"]), int(m.at[top, "head"])),
        "top_exact_effect": float(m.at[top, "mean_exact"]),
        "top_exact_atp": float(m.at[top, "mean_atp"]),
    }
