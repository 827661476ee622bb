"""Attribution patching (AtP) over every head, MLP and residual site, with exact activation patching as reference.

AtP estimates, for each node, the metric change from patching its clean activation into the corrupted run:
``(act_clean - act_corrupt) . d metric / d act`` at the corrupted run. All nodes cost 2 forwards (clean with a
cache, corrupted with grad) + 1 backward per batch. The linearisation fails where downstream attention saturates
(docs/heads.md; shared/notes/organism-in-context.md), so ``method="ig"`` adds an integrated-gradients variant,
``method="atp-star"`` AtP* (Kramár et al. 2024: exact attention-softmax recompute on the query/key side and
GradDrop; see :func:`_atp_star_batch` for the definition used here), and ``exact_patching`` measures the real
effect, many nodes per forward (patched copies along the batch dimension).

Sites (TransformerLens act names): ``"z"`` = each head's ``hook_z`` (one node per layer x head), ``"mlp_out"`` and
``"resid_post"`` = one node per layer (``"resid"``, the earlier name of ``resid_post``, is deprecated). Clean and
corrupted prompts of a pair must have the same number of tokens (positions align).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from einops import rearrange, reduce
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses.hf_compat import architecture
from mhop_lens.analyses.metrics import Metric
from mhop_lens.errors import DataError, SpanError
from mhop_lens.forward import logits_at, run
from mhop_lens.positions import token_positions
from mhop_lens.tokens import Encoded, encode

SITES = ("z", "mlp_out", "resid_post")
#: Names of earlier releases -> act names (accepted with a deprecation warning).
OLD_SITES = {"resid": "resid_post"}
METHODS = ("atp", "atp-star", "ig")
OTHER = "other"
#: Score column of each method.
COLUMN = {"atp": "atp", "atp-star": "atp_star", "ig": "atp_ig"}
#: Rows per batched QK-recompute pass (copies x pairs); larger passes are split.
QK_ROWS = 1024
#: AtP*'s query-key fix: "frozen-norm" (cheap, default) or "exact" (the model's own block per copy).
QK_FIXES = ("frozen-norm", "exact")
#: Largest |z| mismatch (share of max |z|, plus this absolute) between the frozen-norm path's own attention at the
#: corrupted run and the model's ``hook_z`` (or its q/k/v and ``hook_q/k/v``) that still counts as the same
#: computation; above it the batch falls back to the exact recompute.
FROZEN_NORM_TOL = 1e-3
SpanMap = dict[str, list[tuple[int, int]]]


@dataclass
class Counter:
    """Forward and backward passes actually run (counted at the model's input and final residual)."""

    forward: int = 0
    backward: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # e.g. why a batch fell back to another path


def site_hooks(model, sites: Sequence[str]) -> list[tuple[str, int, str]]:
    """(site, layer, hook name) for every requested site of every layer."""
    sites = hooks.act_names(sites, SITES, OLD_SITES, "attribution", DataError, stacklevel=4)
    names = {"z": lambda l: hooks.head(l, "z"), "mlp_out": hooks.mlp_out,
             "resid_post": lambda l: hooks.resid(l, "post")}
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
    """``frame.attrs`` entries: passes run, per batch, and seconds (plus ``counter.extra`` totals and per batch)."""
    out = dict(forwards=counter.forward, backwards=counter.backward, batches=n_batches,
               forwards_per_batch=counter.forward / n_batches, backwards_per_batch=counter.backward / n_batches,
               seconds=counter.seconds)
    for k, v in counter.extra.items():
        out[k] = v
        out[f"{k}_per_batch"] = v / n_batches
    return out


def cost_line(attrs: dict) -> str:
    """One line of passes per batch from a frame's ``attrs`` (AtP, AtP*, IG or exact patching)."""
    line = f"{attrs['forwards_per_batch']:.0f} forwards + {attrs['backwards_per_batch']:.0f} backward"
    if attrs.get("partial_backwards"):
        line += (f" + {attrs['partial_backwards_per_batch']:.0f} partial backwards (GradDrop, "
                 f"{attrs['partial_backward_layers_per_batch']:.0f} layer-backwards)")
    if attrs.get("qk_passes"):
        line += (f" + {attrs['qk_passes_per_batch']:.0f} QK-fix passes ({attrs.get('qk_fix_used', 'exact')}, "
                 f"{attrs['qk_copies_per_batch']:.0f} copies")
        if attrs.get("capture_forwards"):
            line += f", + {attrs['capture_forwards_per_batch']:.0f} forward stopped at block 0"
        line += ")"
    line += f" per batch = {attrs['forward_equivalents_per_batch']:.1f} forward-equivalents"
    if attrs.get("flops_forward_unit"):
        unit = attrs["flops_forward_unit"]
        partial = attrs.get("flops_partial_backward_per_batch", 0.0)
        fix = sum(attrs.get(f"flops_{k}_per_batch", 0.0) for k in ("qkv", "attention", "check", "writes",
                                                                   "score_terms", "precompute"))
        parts = {"forwards": attrs["flops_forward_per_batch"] - fix, "backward": attrs["flops_backward_per_batch"]
                 - partial, "GradDrop": partial, "QK fix": fix - attrs.get("flops_precompute_per_batch", 0.0),
                 "W_O W_QKV": attrs.get("flops_precompute_per_batch", 0.0)}
        line += " (matmul FLOPs / one forward: " + ", ".join(f"{k} {v / unit:.2f}" for k, v in parts.items() if v)
        if attrs["flops_backward_per_batch"]:
            line += f"; {attrs['forward_equivalents_2x_backward_per_batch']:.1f} with backwards at 2x a forward"
        line += ")"
    return line


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
    method: str | None = None,
    qk_fix: str = "frozen-norm",
) -> pd.DataFrame:
    """AtP score of every node for every pair: one row per (pair, site, layer, head[, span]).

    ``per_position=False`` sums over positions; a list of role spans (one ``{role: [(start, end)]}`` per pair,
    character spans of the clean prompt, e.g. a GAR example's ``spans``) gives one row per role (``roles``, default:
    all roles present) plus ``"other"`` for the remaining real tokens. ``ig_steps > 0`` replaces the gradient at the
    corrupted run by its mean along the straight path corrupted -> clean of that node's site in that layer
    (midpoint rule; ``ig_steps`` interpolation points per (layer, site), batched). Columns ``metric_clean`` /
    ``metric_corrupt`` hold the pair's metric; ``frame.attrs`` holds pass counts and time per batch.

    ``method``: ``"atp"`` (default), ``"ig"`` (default when ``ig_steps > 0``; ``ig_steps`` defaults to 8 then) or
    ``"atp-star"``: column ``atp_star`` (signed AtP with the QK fix), ``atp_star_gd`` (the paper's GradDrop score,
    a magnitude) and ``atp`` (plain AtP, free from the same passes); sums over positions only. ``qk_fix``:
    AtP*'s attention recompute, ``"frozen-norm"`` (default, low-rank through the corrupted run's norm scale) or
    ``"exact"`` (the model's own block per copy); see :func:`_atp_star_batch`. ``frame.attrs["qk_fix_used"]`` says
    which ran (frozen-norm falls back to exact, with the reason, where the architecture is not supported).
    """
    method = method or ("ig" if ig_steps > 0 else "atp")
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {METHODS}.")
    if method == "ig" and ig_steps <= 0:
        ig_steps = 8
    if method == "atp-star" and not isinstance(per_position, bool):
        raise SpanError("AtP* scores whole nodes (its attention recompute moves every position at once); "
                        "per-span scores need method 'atp' or 'ig'.")
    spans, roles = span_roles(per_position, len(clean_prompts), roles)
    named = site_hooks(model, sites)
    counter = Counter()
    frames = []
    if qk_fix not in QK_FIXES:
        raise ValueError(f"unknown AtP* QK fix {qk_fix!r}; choose from {QK_FIXES}.")
    if method == "atp-star" and model.cfg.n_layers > 1 and "blocks.1.ln1.hook_in" not in model.hook_dict:
        raise DataError(f"AtP* needs a norm in front of each attention layer (blocks.N.ln1); "
                        f"{architecture(model)} has none (post-norm blocks). Use method 'atp' or 'ig'.")
    if method == "atp-star" and qk_fix == "frozen-norm" and (why := frozen_norm_support(model)):
        counter.notes.append(why)
        qk_fix_run = "exact"
    else:
        qk_fix_run = qk_fix
    step = {"atp": _atp_batch, "ig": _ig_batch,
            "atp-star": functools.partial(_atp_star_batch, qk_fix=qk_fix_run, cache={})}[method]
    for batch in pair_batches(model, clean_prompts, corrupted_prompts, batch_size, "attribution", progress):
        sl = slice(batch.start, batch.start + batch_size)
        role_idx = role_index(batch.clean, spans[sl], roles) if spans is not None else None
        t0 = time.perf_counter()
        scores, m_clean, m_corrupt = step(model, batch.clean, batch.corrupt, metric, batch.rows, named, counter,
                                          ig_steps)
        counter.seconds += time.perf_counter() - t0
        if method == "atp-star":
            scores, extra = scores
            frame = _frame({k: _reduce(v, None, 1) for k, v in scores.items()}, batch.rows, pair_ids, None,
                           "atp_star")
            for col, val in extra.items():
                frame[col] = _frame({k: _reduce(v, None, 1) for k, v in val.items()}, batch.rows, None, None,
                                    col)[col].to_numpy()
        else:
            reduced = {k: _reduce(v, None if role_idx is None else role_idx.to(v.device), len(roles or [0]))
                       for k, v in scores.items()}
            frame = _frame(reduced, batch.rows, pair_ids, roles if spans is not None else None, COLUMN[method])
        frames.append(with_metrics(frame, batch, m_clean, m_corrupt))
    out = pd.concat(frames, ignore_index=True)
    # matmul FLOPs over one forward of the same batch: what runs (activation-gradient backwards), and the usual
    # 2x-backward convention beside it
    unit = counter.extra.pop("flops_unit") / len(frames)
    run_flops = counter.extra["flops_forward"] + counter.extra["flops_backward"]
    counter.extra["forward_equivalents"] = run_flops / unit
    counter.extra["forward_equivalents_2x_backward"] = (counter.extra["flops_forward"]
                                                        + counter.extra.pop("flops_backward_2x")) / unit
    extra = dict(flops_forward_unit=unit)
    if method == "atp-star":
        used = "exact" if qk_fix == "exact" else "frozen-norm"
        extra.update(qk_fix=qk_fix, qk_fix_used=("exact (fallback: " + counter.notes[0] + ")") if counter.notes
                     else used)
    out.attrs.update(pass_counts(counter, len(frames)), ig_steps=ig_steps if method == "ig" else 0, method=method,
                     **extra)
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
    last = logits_at(model, enc, fwd)  # unembeds only the read position
    return {k: v.detach() for k, v in store.items()}, metric(last, rows)


def _atp_batch(model, clean: Encoded, corrupt: Encoded, metric: Metric, rows: Tensor, named, counter: Counter,
               _ig_steps: int):
    """2 forwards + 1 backward: clean cache, corrupted forward with grad, one backward of the summed metric (both
    forwards unembed only the read position)."""
    clean_acts, m_clean = _clean_cache(model, clean, named, counter, metric, rows)
    store: dict = {}
    _, root = grad_root()
    fwd = [("hook_embed", root)] + [(name, capture_into(store, (s, l))) for s, l, name in named]
    fwd += counting_hooks(counter)
    with torch.enable_grad():
        m_corrupt = metric(logits_at(model, corrupt, fwd), rows)
        keys = list(store)
        grads = torch.autograd.grad(m_corrupt.sum(), [store[k] for k in keys], allow_unused=True)
    b, pos = corrupt.tokens.shape
    unit = forward_flops(model, b, pos)
    _add_flops(counter, 2 * unit, backward_flops(model, b, pos, _earliest(keys)), unit, BACKWARD_FACTOR * unit)
    scores = {}
    for key, g in zip(keys, grads, strict=True):
        act = store[key].detach()
        g = torch.zeros_like(act) if g is None else g
        scores[key] = _node_scores(key[0], clean_acts[key] - act, g)
    model.zero_grad(set_to_none=True)
    return scores, m_clean, m_corrupt.detach()


def _node_write(model, site: str, layer: int, delta: Tensor, w_o_all: Tensor | None = None
                ) -> Float[Tensor, "node batch pos d_model"]:
    """What a node's patch adds to the residual stream directly: per head ``delta_z @ W_O``, else ``delta``."""
    if site == "z":
        w_o = (model.W_O if w_o_all is None else w_o_all)[layer].to(delta.device, delta.dtype)  # [h, d_head, d]
        return torch.einsum("bphd,hdm->hbpm", delta, w_o)
    return delta.unsqueeze(0)


def _keep(store: dict, key: str, stop: bool = False) -> Callable:
    def hook(act, hook):
        store[key] = act.detach()
        if stop:
            raise _StopBlock
        return act

    return hook


class _StopBlock(Exception):
    """Raised at a block's ``hook_z`` once a recompute pass has what it needs."""


def _attention_input(store: dict, key) -> Callable:
    """Keep a copy of the attention sublayer's input (the norm's input) that only the attention path reads, so its
    gradient is the gradient through this layer's attention alone."""

    def hook(act, hook):
        store[key] = act.clone()
        return store[key]

    return hook


@torch.no_grad()
def _block_args(model, width: int, attention_mask: Tensor, copies: int) -> tuple[list, dict, int]:
    """Block-call arguments for ``copies`` copies of the batch, captured by one forward stopped at block 0
    (``partial_forward.block_call``); smaller calls cut them (``for_call``). Returns (args, kwargs, rows)."""
    from mhop_lens.analyses.partial_forward import block_call, stored

    mask = attention_mask.repeat(copies, 1)
    args, kwargs = stored(*block_call(model, width, mask, None))
    return args, kwargs, mask.shape[0]


@torch.no_grad()
def _attention_with_writes(model, layer: int, resid_pre: Tensor, writes: Tensor, attention_mask: Tensor,
                           captured: tuple[list, dict, int]) -> Float[Tensor, "node batch pos head d_head"]:
    """Head outputs ``z`` of ``layer`` when each node's write is added to the residual entering it.

    One batched pass per layer through the model's own block, stopped at ``hook_z`` (norm, q/k/v projections,
    scores, softmax, pattern @ v; no output projection, no MLP): copies along the batch dimension, ``QK_ROWS`` rows
    at a time, with the block arguments ``captured`` once per batch (:func:`_block_args`).
    """
    from mhop_lens.analyses.partial_forward import block_call, for_call, stored

    n, b = writes.shape[0], resid_pre.shape[0]
    out = []
    per = max(1, QK_ROWS // b)
    cap_args, cap_kwargs, cap_rows = captured
    for i in range(0, n, per):
        w = writes[i : i + per]
        hidden = (resid_pre.unsqueeze(0) + w).reshape(-1, *resid_pre.shape[1:])
        rows = hidden.shape[0]
        if rows <= cap_rows and cap_rows not in (hidden.shape[1],):
            args, kwargs = for_call(cap_args, cap_kwargs, None, cap_rows, rows)
        else:  # rare: cutting would be ambiguous; capture for this call
            args, kwargs = for_call(*stored(*block_call(model, hidden.shape[1], attention_mask.repeat(w.shape[0], 1),
                                                        None)), None)
        if args:
            args[0] = hidden
        else:
            kwargs["hidden_states"] = hidden
        store: dict = {}
        with model.hooks(fwd_hooks=[(hooks.head(layer, "z"), _keep(store, "z", True))]):
            try:
                model.blocks[layer](*args, **kwargs)
            except _StopBlock:
                pass
        out.append(rearrange(store["z"], "(w b) ... -> w b ...", w=w.shape[0]))
    return torch.cat(out)


class _Unsupported(Exception):
    """The frozen-norm QK fix cannot reproduce this model's attention; the exact recompute is used instead."""


def frozen_norm_support(model) -> str | None:
    """Why the frozen-norm QK fix does not apply to ``model`` (None when it does, subject to the per-batch check).

    Supported: LayerNorm / RMSNorm before attention, learned absolute or rotary (rotate-half, full or partial)
    positions, multi-head or grouped-query attention, optional tanh score soft cap. ALiBi, sliding / local windows
    and other position schemes use the exact recompute."""
    from mhop_lens.analyses.hf_compat import attention_windows

    cfg = model.cfg
    if cfg.normalization_type not in ("LN", "RMS"):
        return f"normalization {cfg.normalization_type!r} (frozen-norm handles LN / RMS)"
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        return f"positional embedding {cfg.positional_embedding_type!r} (frozen-norm handles standard / rotary)"
    if attention_windows(model):
        return "sliding / local attention windows"
    needed = ["ln1.hook_scale"] + [f"attn.hook_{x}" for x in "qkv"]
    if cfg.positional_embedding_type == "rotary":
        needed += ["attn.hook_cos", "attn.hook_sin"]
    missing = [n for l in range(1, cfg.n_layers) for n in needed if f"blocks.{l}.{n}" not in model.hook_dict]
    if missing:
        return f"no hook {missing[0]} (pre-attention norm scale, q/k/v or rotary cos/sin)"
    return None


def _weights(model, cache: dict) -> dict:
    """W_Q/W_K/W_V/W_O and q/k/v biases of every layer, detached, read once per ``attribute`` call (the bridge
    rebuilds the stacked weights on every access)."""
    if "weights" not in cache:
        out = {name: getattr(model, name).detach() for name in ("W_Q", "W_K", "W_V", "W_O")}
        for name in ("b_Q", "b_K", "b_V"):
            try:
                b = getattr(model, name)
            except (AttributeError, TypeError):
                b = None
            out[name] = None if b is None or b.numel() == 0 else b.detach()
        cache["weights"] = out
    return cache["weights"]


def _flat_qkv(model, layer: int, cache: dict) -> tuple[Tensor, Tensor, int, int]:
    """Layer's q/k/v projections side by side: W [d_model, (n_heads + 2 n_kv) d_head], bias [(...)], n_heads, n_kv."""
    key = ("qkv", layer)
    if key not in cache:
        w = _weights(model, cache)
        ws = [w["W_Q"][layer], w["W_K"][layer], w["W_V"][layer]]  # [heads, d_model, d_head]
        bias = [torch.zeros(x.shape[0], x.shape[2]) if w[n] is None else w[n][layer]
                for n, x in zip(("b_Q", "b_K", "b_V"), ws, strict=True)]
        flat = torch.cat([rearrange(x, "h m d -> m (h d)") for x in ws], -1)
        cache[key] = (flat, torch.cat([x.reshape(-1) for x in bias]), ws[0].shape[0], ws[1].shape[0])
    return cache[key]


def _norm_params(model, layer: int) -> tuple[Tensor, Tensor | None, bool]:
    """ln1 weight, bias (None for RMSNorm) and whether it centres (LayerNorm)."""
    ln = model.blocks[layer].ln1.original_component
    w = ln.weight.detach()
    b = getattr(ln, "bias", None)
    return w, None if b is None else b.detach(), model.cfg.normalization_type == "LN"


def _rotate(x: Tensor, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    """Rotate-half rotary on the first ``cos.shape[-1]`` dims of ``x`` [..., pos, head, d_head] (cos [b, pos, r])."""
    if cos is None:
        return x
    r = cos.shape[-1]
    c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., : r // 2]], -1)
    return torch.cat([rot * c + half * s, rest], -1)


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scaling: float, cap: float
            ) -> Float[Tensor, "n batch pos head d_head"]:
    """z from rotated q [n b pos h d], k / v [n b pos kv d] (GQA: kv heads repeated), ``allowed`` [b q k]."""
    rep = q.shape[-2] // k.shape[-2]
    if rep > 1:
        k, v = k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2)
    scores = torch.einsum("nbqhd,nbkhd->nbhqk", q, k) * scaling
    if cap > 0:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~allowed[None, :, None], float("-inf"))
    pattern = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("nbhqk,nbkhd->nbqhd", pattern, v)


@dataclass
class _FrozenLayer:
    """What the frozen-norm fix reads of one later layer of the corrupted run (all detached)."""

    q: Tensor  # [b pos h d] pre-rotary
    k: Tensor  # [b pos kv d]
    v: Tensor
    scale: Tensor  # [b pos 1] the norm's scale at the corrupted run
    cos: Tensor | None
    sin: Tensor | None


def _attention_setup(model, layer: int) -> tuple[float, float]:
    """(score scaling, soft cap or 0) of ``layer``'s attention."""
    orig = model.blocks[layer].attn.original_component
    scaling = getattr(orig, "scaling", None)
    scaling = float(scaling) if isinstance(scaling, int | float) else model.cfg.d_head ** -0.5
    cap = getattr(model.cfg, "attn_scores_soft_cap", -1.0) or -1.0
    return scaling, float(cap)


def _check_frozen_layer(model, layer: int, fl: _FrozenLayer, resid_pre: Tensor, z: Tensor, allowed: Tensor,
                        real: Tensor, cache: dict, flops: dict) -> Tensor:
    """Recompute q/k/v from ``resid_pre`` through the norm and the flat projection and z from them; raise
    ``_Unsupported`` unless both match the model's own hooks on real positions. Returns the base z (own path)."""
    w_ln, b_ln, centre = _norm_params(model, layer)
    flat, bias, _, _ = _flat_qkv(model, layer, cache)
    x = resid_pre - resid_pre.mean(-1, keepdim=True) if centre else resid_pre
    normed = x / fl.scale * w_ln + (b_ln if b_ln is not None else 0)
    qkv = normed @ flat + bias
    flops["check"] += 2.0 * qkv.shape[0] * qkv.shape[1] * flat.shape[0] * flat.shape[1]
    mine = torch.cat([fl.q.flatten(-2), fl.k.flatten(-2), fl.v.flatten(-2)], -1)
    tol = FROZEN_NORM_TOL * (1 + float(mine[real].abs().max()))
    if float((qkv - mine)[real].abs().max()) > tol:
        raise _Unsupported(f"layer {layer}: norm / q,k,v projection do not reproduce hook_q/k/v")
    base = _attend(_rotate(fl.q, fl.cos, fl.sin)[None], _rotate(fl.k, fl.cos, fl.sin)[None], fl.v[None], allowed,
                   *_attention_setup(model, layer))[0]
    flops["check"] += 4.0 * fl.q.shape[0] * fl.q.shape[1] ** 2 * fl.q.shape[2] * fl.q.shape[3]
    tol = FROZEN_NORM_TOL * (1 + float(z[real].abs().max()))
    if float((base - z)[real].abs().max()) > tol:
        raise _Unsupported(f"layer {layer}: scores / softmax / rotary do not reproduce hook_z")
    return base


def _frozen_norm_fix(model, layer: int, fl: _FrozenLayer, base_z: Tensor, nodes: list[tuple[str, int]],
                     deltas: dict, allowed: Tensor, cache: dict, flops: dict
                     ) -> tuple[list[tuple[str, int, int]], Tensor, dict]:
    """Exact attention of ``layer`` with every earlier node's write entering its q/k/v through the frozen norm.

    A write w changes the norm's output by ``centre(w) * w_ln / scale`` (scale of the corrupted run; centring for
    LayerNorm only), so q/k/v by that @ W_QKV. For a head write ``delta_z_h W_O[h]`` this is ``delta_z_h @ A_h /
    scale`` with ``A_h = centre(W_O[h]) * w_ln @ W_QKV`` (d_head x (n_heads + 2 n_kv) d_head, computed once per
    (earlier layer, layer) and kept in ``cache``) when the batch has enough tokens to repay it, else through the
    d_model write. Rotary is linear per position: applied to q + dq and k + dk. Returns (node ids, dz [n b pos h d],
    {("q"|"k"|"v", layer): change [n b pos ...]}) and adds the matmul FLOPs to ``flops``."""
    w_ln, _, centre = _norm_params(model, layer)
    flat, _, h, kv = _flat_qkv(model, layer, cache)
    w_o_all = _weights(model, cache)["W_O"]
    d_model, dh = flat.shape[0], model.cfg.d_head
    width = flat.shape[1]
    b, pos = fl.q.shape[:2]
    n_tok = b * pos
    ids, changes = [], []
    for site, l in nodes:
        if l >= layer:
            continue
        delta = deltas[(site, l)]
        if site == "z":
            key = (l, layer)
            low_rank = key in cache or n_tok * (dh * d_model + d_model * width - dh * width) > dh * d_model * width
            if low_rank:
                if key not in cache:
                    w_o = w_o_all[l]  # [h, d_head, d_model]
                    w_o = w_o - w_o.mean(-1, keepdim=True) if centre else w_o
                    cache[key] = torch.einsum("hdm,mp->hdp", w_o * w_ln, flat)
                    flops["precompute"] += 2 * w_o.shape[0] * dh * d_model * width
                change = torch.einsum("bphd,hdw->hbpw", delta, cache[key])
                flops["qkv"] += 2 * delta.shape[2] * n_tok * dh * width
            else:
                write = torch.einsum("bphd,hdm->hbpm", delta, w_o_all[l].to(delta.dtype))
                write = write - write.mean(-1, keepdim=True) if centre else write
                change = (write * w_ln) @ flat
                flops["qkv"] += 2 * write.shape[0] * n_tok * (dh * d_model + d_model * width)
            ids += [(site, l, i) for i in range(delta.shape[2])]
        else:
            write = delta - delta.mean(-1, keepdim=True) if centre else delta
            change = ((write * w_ln) @ flat).unsqueeze(0)
            flops["qkv"] += 2 * n_tok * d_model * width
            ids.append((site, l, -1))
        changes.append(change / fl.scale)
    if not ids:
        return ids, torch.zeros(0), {}
    change = torch.cat(changes)
    dq, dk, dv = change.split([h * dh, kv * dh, kv * dh], -1)
    dq = dq.unflatten(-1, (h, dh))
    dk, dv = dk.unflatten(-1, (kv, dh)), dv.unflatten(-1, (kv, dh))
    scaling, cap = _attention_setup(model, layer)
    dz = []
    per = max(1, QK_ROWS // b)
    for i in range(0, len(ids), per):
        sl = slice(i, i + per)
        q = _rotate(fl.q + dq[sl], fl.cos, fl.sin)
        k = _rotate(fl.k + dk[sl], fl.cos, fl.sin)
        dz.append(_attend(q, k, fl.v + dv[sl], allowed, scaling, cap) - base_z)
    flops["attention"] += 4 * len(ids) * b * pos * pos * h * dh
    return ids, torch.cat(dz), {("q", layer): dq, ("k", layer): dk, ("v", layer): dv}


def layer_flops(model, batch: int, pos: int) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one block on ``batch`` x ``pos`` tokens, by part: q/k/v, output
    projection, attention (scores and pattern @ v over all pos x pos), MLP."""
    cfg = model.cfg
    n_tok, d, dh, h = batch * pos, cfg.d_model, cfg.d_head, cfg.n_heads
    width = (h + 2 * model.W_K.shape[1]) * dh
    return {"qkv": 2.0 * n_tok * d * width, "o": 2.0 * n_tok * h * dh * d,
            "attention": 4.0 * batch * pos * pos * h * dh,
            "mlp": 2.0 * n_tok * d * cfg.d_mlp * (3 if getattr(cfg, "gated_mlp", False) else 2)}


def forward_flops(model, batch: int, pos: int, last_only: bool = False) -> float:
    """Matmul FLOPs of one forward on ``batch`` x ``pos`` tokens (every block and the unembedding of every position,
    or of one per row with ``last_only``, as ``forward.logits_at``): the unit of ``forward_equivalents`` (all
    positions unembedded)."""
    return model.cfg.n_layers * sum(layer_flops(model, batch, pos).values()) \
        + 2.0 * batch * (1 if last_only else pos) * model.cfg.d_model * model.cfg.d_vocab


#: The usual convention: a backward (gradients wrt activations and weights) costs 2x the forward FLOPs of the blocks
#: it runs through. Reported beside the count of what runs (``forward_equivalents_2x_backward``).
BACKWARD_FACTOR = 2.0
_SITE_ORDER = {"z": 0, "mlp_out": 1, "resid_post": 2}


def backward_flops(model, batch: int, pos: int, earliest: tuple[str, int], top: int | None = None) -> float:
    """Matmul FLOPs of a backward computing activation gradients only (weights get none): from the logits
    (``top=None``, through the unembedding) or from ``resid_pre`` of block ``top``, down to the earliest requested
    node ``earliest = (site, layer)``. A block fully run through costs 1x the forward FLOPs of its linear maps
    (gradient wrt their input) and 2x its attention products (wrt both operands); the earliest node's own block
    only what lies after the node (``z``: output projection, and the MLP unless attention and MLP run in parallel;
    ``mlp_out`` / ``resid_post``: nothing)."""
    parts = layer_flops(model, batch, pos)
    full = parts["qkv"] + parts["o"] + parts["mlp"] + 2 * parts["attention"]
    site, first = earliest
    top = model.cfg.n_layers if top is None else top
    if top <= first:
        return 0.0
    after_z = parts["o"] + (0.0 if getattr(model.cfg, "parallel_attn_mlp", False) else parts["mlp"])
    out = max(0, top - first - 1) * full + (after_z if site == "z" else 0.0)
    if top == model.cfg.n_layers:
        out += 2.0 * batch * pos * model.cfg.d_model * model.cfg.d_vocab
    return out


def _earliest(keys) -> tuple[str, int]:
    return min(((s, l) for s, l in keys), key=lambda k: (k[1], _SITE_ORDER.get(k[0], 3)))


def _add_flops(counter: Counter, forward: float, backward: float, unit: float, backward_2x: float) -> None:
    """Accumulate a batch's forward / backward matmul FLOPs, its unit (one forward) and the 2x-convention backward."""
    for k, v in (("forward", forward), ("backward", backward), ("unit", unit), ("backward_2x", backward_2x)):
        counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v


def _atp_star_batch(model, clean: Encoded, corrupt: Encoded, metric: Metric, rows: Tensor, named,
                    counter: Counter, _ig_steps: int, qk_fix: str = "frozen-norm", cache: dict | None = None,
                    delta_scale: float = 1.0):
    """AtP* for whole nodes (head z, MLP out, resid_post): QK fix at every later attention layer, then GradDrop.

    Definition used (departure from the paper, docs/heads.md): Kramár et al. apply the QK fix to query/key nodes
    themselves (exact softmax of the patched scores, times the gradient wrt the pattern). Our nodes are heads'
    ``z``, whose own attention change AtP already takes exactly; a head hidden by saturation (the organism's L0H1)
    is hidden by the *later* heads whose queries and keys it writes to. So for each later layer l', the node's
    direct write (``delta_z @ W_O``, ``delta mlp_out``, ``delta resid``) enters l''s attention and that layer's
    attention softmax is taken exactly (one batched pass per layer, all earlier nodes as copies):

    - ``qk_fix="frozen-norm"`` (default): the norm in front of l' is the linear map it is at the corrupted run's
      per-position scale, so the write changes q/k/v linearly (low-rank for head writes,
      :func:`_frozen_norm_fix`); new scores (rotary, GQA, soft cap as the model), exact softmax, pattern @ (v + dv).
      The first-order term of the same path, grad(q/k/v) . (dq, dk, dv), is replaced by grad(z_l') . (z_l'(write)
      - z_l'): only the softmax is taken beyond first order, as in the paper; the norm's scale path stays in AtP.
      Checked per batch against the model's own ``hook_q/k/v`` and ``hook_z``; unsupported architectures
      (:func:`frozen_norm_support`) or a failed check use ``"exact"`` (``frame.attrs["qk_fix"]`` says which).
    - ``qk_fix="exact"``: the write is added to the residual entering l' and the model's own block runs to
      ``hook_z`` (true norm, q/k/v, softmax); its first-order term (gradient wrt l''s attention input . write) is
      replaced by grad(z_l') . (z_l'(write) - z_l').

    AtP* = AtP + sum over later l' of that difference; paths through MLPs before l' and everything after l' stay
    first order. GradDrop (paper eq. 11): I_l = the same estimate with the gradient through layer l's residual
    contribution dropped (a backward from resid_pre_l seeded with dmetric/dresid_post_l, over layers < l only);
    ``atp_star_gd`` = sum_l |I_l| / (L - 1), a magnitude as in the paper. ``delta_scale`` scales every node's
    clean-minus-corrupted delta (1 = AtP*; tests take it to 0). Cost: 2 forwards, 1 backward, L-1 partial
    backwards, the per-layer fixes; matmul FLOPs in ``counter.extra`` (``flops_*``).
    """
    n_layers = model.cfg.n_layers
    cache = {} if cache is None else cache
    if "unsupported" in cache:  # an earlier batch of this call failed the check: no second try
        qk_fix = "exact"
    clean_acts, m_clean = _clean_cache(model, clean, named, counter, metric, rows)
    store: dict = {}
    _, root = grad_root()
    later = range(1, n_layers)
    frozen = qk_fix == "frozen-norm"
    fwd = [("hook_embed", root)] + [(name, capture_into(store, (s, l))) for s, l, name in named]
    fwd += [(hooks.head(l, "z"), capture_into(store, ("zall", l))) for l in later]
    if frozen:
        fwd += [(hooks.head(l, x), capture_into(store, (x, l))) for l in later for x in "qkv"]
        fwd += [(f"blocks.{l}.ln1.hook_scale", capture_into(store, ("scale", l))) for l in later]
        if model.cfg.positional_embedding_type == "rotary":
            fwd += [(f"blocks.{l}.attn.hook_{x}", capture_into(store, (x, l))) for l in later for x in ("cos", "sin")]
    else:
        fwd += [(f"blocks.{l}.attn.hook_in" if _shared_norm(model, l) else f"blocks.{l}.ln1.hook_in",
                 _attention_input(store, ("attn_in", l))) for l in later]
    fwd += [(hooks.resid(l, "pre"), capture_into(store, ("pre", l))) for l in range(n_layers)]
    fwd += [(hooks.resid(l, "post"), capture_into(store, ("post", l))) for l in range(n_layers)]
    fwd += counting_hooks(counter)
    node_keys = [(s, l) for s, l, _ in named]
    lin_names = ("q", "k", "v") if frozen else ("attn_in",)
    layer_keys = [(k, l) for l in later for k in ("zall", *lin_names)]
    b, pos = corrupt.tokens.shape
    unit = forward_flops(model, b, pos)
    per_layer = sum(layer_flops(model, b, pos).values())
    flops = {k: 0.0 for k in ("partial_backward", "qkv", "attention", "precompute", "check", "writes",
                              "score_terms")}
    earliest = _earliest(node_keys)
    backward_2x = BACKWARD_FACTOR * unit
    with torch.enable_grad():
        logits = run(model, corrupt, fwd)
        m_corrupt = metric(end_logits(logits, corrupt), rows)
        keys = node_keys + layer_keys + [("post", l) for l in range(n_layers)]
        grads = dict(zip(keys, torch.autograd.grad(m_corrupt.sum(), [store[k] for k in keys], allow_unused=True,
                                                   retain_graph=True), strict=True))
        grads = {k: torch.zeros_like(store[k]) if g is None else g for k, g in grads.items()}
        deltas = {k: delta_scale * (clean_acts[k] - store[k].detach()) for k in node_keys}
        plain = {k: _node_scores(k[0], deltas[k], grads[k]) for k in node_keys}
        # per later layer: each earlier node's exact change of that layer's head outputs, and the first-order
        # change of the same path's input(s)
        fixes: dict[int, tuple[list, Tensor, dict]] = {}
        if frozen:
            try:
                fixes = _frozen_fixes(model, store, corrupt, node_keys, deltas, later, cache, flops)
            except _Unsupported as e:  # this batch's passes are run again by the exact recompute
                counter.notes.append(str(e))
                cache["unsupported"] = str(e)
                for k, v in flops.items():
                    counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v
                _add_flops(counter, 2 * unit + sum(v for k, v in flops.items() if k != "partial_backward"),
                           backward_flops(model, b, pos, earliest), 0.0, backward_2x)
                return _atp_star_batch(model, clean, corrupt, metric, rows, named, counter, _ig_steps, "exact",
                                       cache, delta_scale)
        else:
            fixes = _exact_fixes(model, store, corrupt, named, deltas, later, counter, flops)
        for layer in fixes:
            counter.extra["qk_passes"] = counter.extra.get("qk_passes", 0) + 1
            counter.extra["qk_copies"] = counter.extra.get("qk_copies", 0) + len(fixes[layer][0])

        def corrected(node_grads: dict, g: dict, layers) -> dict:
            """Per node [batch, 1, n]: AtP with the given grads plus the fix of every layer in ``layers``."""
            out = {k: _node_scores(k[0], deltas[k], node_grads[k]).sum(1, keepdim=True) for k in node_keys}
            for layer in layers:
                if layer not in fixes:
                    continue
                ids, dz, lin = fixes[layer]
                extra = torch.einsum("nbphd,bphd->nb", dz, g[("zall", layer)])
                flops["score_terms"] += 2.0 * dz.numel()
                for key, change in lin.items():
                    extra = extra - torch.einsum("nb...,b...->nb", change, g[key])
                    flops["score_terms"] += 2.0 * change.numel()
                for i, (site, l, h) in enumerate(ids):
                    out[(site, l)][:, 0, max(h, 0)] += extra[i]
            return out

        star = corrected(grads, grads, later)
        gd = {k: torch.zeros_like(v) for k, v in star.items()}
        for drop in range(n_layers):
            below = [k for k in node_keys if k[1] < drop] + [k for k in layer_keys if k[1] < drop]
            partial: dict = {}
            if any(k in node_keys for k in below):
                got = torch.autograd.grad(store[("pre", drop)], [store[k] for k in below],
                                          grad_outputs=grads[("post", drop)], allow_unused=True, retain_graph=True)
                partial = {k: torch.zeros_like(store[k]) if g is None else g for k, g in zip(below, got, strict=True)}
                counter.extra["partial_backwards"] = counter.extra.get("partial_backwards", 0) + 1
                counter.extra["partial_backward_layers"] = counter.extra.get("partial_backward_layers", 0) + drop
                flops["partial_backward"] += backward_flops(model, b, pos, earliest, top=drop)
                backward_2x += BACKWARD_FACTOR * drop * per_layer
            g = {**grads, **partial}
            dropped = corrected({k: g[k] for k in node_keys}, g, [l for l in later if l != drop])
            for k in node_keys:
                if k[0] != "resid_post" and k[1] == drop:
                    continue  # the node's own layer dropped: all its paths are cut, I_l = 0
                gd[k] += dropped[k].abs()
        gd = {k: v / max(1, n_layers - 1) for k, v in gd.items()}
    model.zero_grad(set_to_none=True)
    for k, v in flops.items():
        counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v
    fixes_total = sum(v for k, v in flops.items() if k != "partial_backward")
    _add_flops(counter, 2 * unit + fixes_total, backward_flops(model, b, pos, earliest) + flops["partial_backward"],
               unit, backward_2x)
    return (star, {"atp_star_gd": gd, "atp": {k: v.sum(1, keepdim=True) for k, v in plain.items()}}), m_clean, \
        m_corrupt.detach()


def _allowed(corrupt: Encoded) -> Tensor:
    """[b, q, k]: causal and key not padding."""
    mask = corrupt.attention_mask.bool()
    pos = mask.shape[1]
    causal = torch.ones(pos, pos, dtype=torch.bool).tril()
    return causal[None] & mask[:, None, :]


@torch.no_grad()
def _frozen_fixes(model, store: dict, corrupt: Encoded, node_keys, deltas: dict, later, cache: dict, flops: dict
                  ) -> dict:
    """Frozen-norm fix of every later layer (after checking the layer's own path against the model's hooks)."""
    allowed = _allowed(corrupt).to(store[("zall", 1)].device)
    real = corrupt.attention_mask.bool().to(allowed.device)
    rotary = model.cfg.positional_embedding_type == "rotary"
    b, pos = corrupt.tokens.shape
    fixes = {}
    for layer in later:
        fl = _FrozenLayer(*(store[(x, layer)].detach() for x in ("q", "k", "v", "scale")),
                          *((store[(x, layer)].detach() for x in ("cos", "sin")) if rotary else (None, None)))
        z = store[("zall", layer)].detach()
        base = _check_frozen_layer(model, layer, fl, store[("pre", layer)].detach(), z, allowed, real, cache, flops)
        ids, dz, lin = _frozen_norm_fix(model, layer, fl, base, node_keys, deltas, allowed, cache, flops)
        if ids:
            fixes[layer] = (ids, dz, lin)
    return fixes


def _shared_norm(model, layer: int) -> bool:
    """Attention and MLP read one norm's output (parallel blocks without ``ln2``: Phi, Falcon, GPT-J, Cohere): the
    gradient at ``ln1``'s input would carry the MLP's path too, so the exact fix reads the attention's own input."""
    return f"blocks.{layer}.ln2.hook_in" not in model.hook_dict


@torch.no_grad()
def _exact_fixes(model, store: dict, corrupt: Encoded, named, deltas: dict, later, counter: Counter, flops: dict
                 ) -> dict:
    """Exact-recompute fix of every later layer: the model's own block to ``hook_z`` on write-shifted copies."""
    b, pos = corrupt.tokens.shape
    parts = layer_flops(model, b, pos)
    w_o = model.W_O.detach()
    writes_of = {(s, l): _node_write(model, s, l, deltas[(s, l)], w_o) for s, l, _ in named
                 if l < model.cfg.n_layers - 1}
    flops["writes"] += sum(parts["o"] for s, l, _ in named if s == "z" and (s, l) in writes_of)
    copies = min(sum(w.shape[0] for w in writes_of.values()), max(1, QK_ROWS // b))
    captured = _block_args(model, corrupt.tokens.shape[1], corrupt.attention_mask, max(1, copies))
    counter.extra["capture_forwards"] = counter.extra.get("capture_forwards", 0) + 1
    fixes = {}
    for layer in later:
        ids = [(s, l, h if s == "z" else -1) for s, l, _ in named if l < layer
               for h in range(writes_of[(s, l)].shape[0])]
        if not ids:
            continue
        writes = torch.cat([writes_of[(s, l)] for s, l, _ in named if l < layer])
        z_new = _attention_with_writes(model, layer, store[("pre", layer)].detach(), writes,
                                       corrupt.attention_mask, captured)
        counter.extra["qk_block_rows"] = counter.extra.get("qk_block_rows", 0) + len(ids)
        flops["qkv"] += len(ids) * parts["qkv"]
        flops["attention"] += len(ids) * parts["attention"]
        if _shared_norm(model, layer):  # the attention's own (normed) input: the write through ln1, linearised
            norm = model.blocks[layer].ln1.original_component
            x = store[("pre", layer)].detach().expand_as(writes).contiguous()
            writes = torch.func.jvp(norm, (x,), (writes,))[1]
        fixes[layer] = (ids, z_new - store[("zall", layer)].detach(), {("attn_in", layer): writes})
    return fixes


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
    unit = forward_flops(model, *corrupt.tokens.shape)
    _add_flops(counter, 2 * unit, 0.0, unit, 0.0)
    alphas = (torch.arange(ig_steps, dtype=torch.float32) + 0.5) / ig_steps
    tokens = corrupt.repeat(ig_steps)
    scores = {}
    for site, layer, name in named:
        key = (site, layer)
        store: dict = {}
        fwd = [(name, _interpolate(clean_acts[key], corrupt_acts[key], alphas, store, key))]
        with torch.enable_grad():
            logits = run(model, tokens, fwd + counting_hooks(counter))
            m = metric(end_logits(logits, corrupt, ig_steps), rows.repeat(ig_steps))
            (g,) = torch.autograd.grad(m.sum(), [store[key]])
        b, pos = corrupt.tokens.shape
        unit = forward_flops(model, b, pos)
        _add_flops(counter, ig_steps * unit, ig_steps * backward_flops(model, b, pos, key), 0.0,
                   BACKWARD_FACTOR * ig_steps * unit)
        mean_grad = reduce(g, "(step b) ... -> b ...", "mean", step=ig_steps)
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
        width = corrupt.tokens.shape[1]
        unit = forward_flops(model, b, width)
        _add_flops(counter, unit + (1 + len(nodes)) * forward_flops(model, b, width, last_only=True), 0.0, unit, 0.0)
        per_fwd = max(1, max_rows // b)
        effects: dict[tuple[str, int], Tensor] = {}
        for i in range(0, len(nodes), per_fwd):
            group = nodes[i : i + per_fwd]
            by_site: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for g, (s, l, h) in enumerate(group):
                by_site.setdefault((s, l), []).append((g, h))
            fwd = [(name_of[k], _patch_hook(k[0], v, clean_acts[k], b, alpha)) for k, v in by_site.items()]
            logits = logits_at(model, corrupt.repeat(len(group)), fwd + counting_hooks(counter))
            m = rearrange(metric(logits, rows.repeat(len(group))), "(node b) -> node b", b=b)
            for g, (s, l, h) in enumerate(group):
                col = effects.setdefault((s, l), torch.zeros(b, 1, model.cfg.n_heads if s == "z" else 1))
                col[:, 0, max(h, 0)] = (m[g] - m_corrupt).cpu()
        counter.seconds += time.perf_counter() - t0
        frames.append(with_metrics(_frame(effects, rows, pair_ids, None, "exact"), batch, m_clean, m_corrupt))
    out = pd.concat(frames, ignore_index=True)
    unit = counter.extra.pop("flops_unit") / len(frames)  # matmul FLOPs over one (all-position) forward
    counter.extra.pop("flops_backward_2x")
    counter.extra["forward_equivalents"] = counter.extra["flops_forward"] / unit
    counter.extra["forward_equivalents_2x_backward"] = counter.extra["forward_equivalents"]  # no backward
    out.attrs.update(pass_counts(counter, len(frames)), rows_per_forward=max_rows, method="exact",
                     flops_forward_unit=unit, forward_passes_per_batch=2 + len(nodes))
    return out


def aggregate(frame: pd.DataFrame, value: str | None = None) -> pd.DataFrame:
    """Mean and mean |.| over pairs per node (site, layer, head[, span]), sorted by |mean| descending."""
    value = value or next(c for c in ("atp_star", "atp_ig", "atp", "atp_star_gd", "exact") if c in frame.columns)
    keys = [c for c in ("site", "layer", "head", "span") if c in frame.columns]
    g = frame.groupby(keys, sort=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "abs_mean": g.apply(lambda s: s.abs().mean()), "std": g.std(),
                        "n": g.size()}).reset_index()
    return out.reindex(out["mean"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def node_label(site: str, layer: int, head: int = -1) -> str:
    """"L1H2" for a head, "L1 mlp_out" / "L1 resid" for a layer site."""
    return f"L{layer}H{head}" if site == "z" else f"L{layer} {site}"


def rank_agreement(approx: pd.DataFrame, exact: pd.DataFrame, site: str = "z", value: str | None = None,
                   k: int = 4, within: int = 6) -> dict[str, float]:
    """Spearman / Pearson of per-node mean scores (signed and absolute) between an AtP frame and exact patching,
    and how many of exact patching's top ``k`` (by |mean|) are in the approximation's top ``within``."""
    from scipy.stats import pearsonr, spearmanr

    a = aggregate(approx[approx["site"] == site], value)
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
        f"exact_top{k}_in_top{within}": int(len(set(m["mean_exact"].abs().nlargest(k).index)
                                                & set(m["mean_atp"].abs().nlargest(within).index))),
        "k": k,
    }
