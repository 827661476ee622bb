"""Attribution patching (AtP) over every head, MLP and residual site, with exact activation patching as reference.

AtP estimates, for each node, the metric change from patching its clean activation into the corrupted run:
``(act_clean - act_corrupt) . d metric / d act`` at the corrupted run. All nodes cost 2 forwards (clean with a
cache, corrupted with grad) + 1 backward per batch. The linearisation fails where downstream attention saturates
(docs/heads.md; shared/notes/organism-in-context.md), so ``method="ig"`` adds an integrated-gradients variant,
``method="atp-star"`` AtP* (Kramár et al. 2024: exact attention-softmax recompute on the query/key side and
GradDrop; ``atp_star.py``), and ``exact_patching`` measures the real
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
    qk_fix: str = "chained",
    grad_drop: bool = True,
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
    a magnitude; ``grad_drop=False`` skips it and its L - 1 partial backwards) and ``atp`` (plain AtP, free from the
    same passes); sums over positions only. ``qk_fix``: AtP*'s attention recompute, ``"chained"`` (default: the
    model's own block per copy, each recomputed attention change carried into the later layers), ``"exact"`` (the
    same one softmax deep, as in the paper) or ``"frozen-norm"`` (low-rank through the corrupted run's norm scale;
    cheaper from ~70 tokens per batch); docs/heads.md compares them; see :func:`atp_star.atp_star_batch`.
    ``frame.attrs["qk_fix_used"]`` says which ran (frozen-norm falls back to exact, with the reason, where the
    architecture is not supported).
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
    from mhop_lens.analyses.atp_star import QK_FIXES, atp_star_batch, frozen_norm_support  # it imports this module

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
            "atp-star": functools.partial(atp_star_batch, qk_fix=qk_fix_run, cache={}, grad_drop=grad_drop)}[method]
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
        used = f"exact (fallback: {counter.notes[0]})" if counter.notes else qk_fix
        extra.update(qk_fix=qk_fix, grad_drop=grad_drop, qk_fix_used=used)
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
    _add_flops(counter, 2 * forward_flops(model, b, pos, last_only=True),
               backward_flops(model, b, pos, _earliest(keys), last_only=True), unit, BACKWARD_FACTOR * unit)
    scores = {}
    for key, g in zip(keys, grads, strict=True):
        act = store[key].detach()
        g = torch.zeros_like(act) if g is None else g
        scores[key] = _node_scores(key[0], clean_acts[key] - act, g)
    model.zero_grad(set_to_none=True)
    return scores, m_clean, m_corrupt.detach()


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


def backward_flops(model, batch: int, pos: int, earliest: tuple[str, int], top: int | None = None,
                   last_only: bool = False) -> float:
    """Matmul FLOPs of a backward computing activation gradients only (weights get none): from the logits
    (``top=None``, through the unembedding) or from ``resid_pre`` of block ``top``, down to the earliest requested
    node ``earliest = (site, layer)``. A block fully run through costs 1x the forward FLOPs of its linear maps
    (gradient wrt their input) and 2x its attention products (wrt both operands); the earliest node's own block
    only what lies after the node (``z``: output projection, and the MLP unless attention and MLP run in parallel;
    ``mlp_out`` / ``resid_post``: nothing). ``last_only``: the logits were read at one position per row
    (``forward.logits_at``), so only that row of the unembedding is differentiated."""
    parts = layer_flops(model, batch, pos)
    full = parts["qkv"] + parts["o"] + parts["mlp"] + 2 * parts["attention"]
    site, first = earliest
    top = model.cfg.n_layers if top is None else top
    if top <= first:
        return 0.0
    after_z = parts["o"] + (0.0 if getattr(model.cfg, "parallel_attn_mlp", False) else parts["mlp"])
    out = max(0, top - first - 1) * full + (after_z if site == "z" else 0.0)
    if top == model.cfg.n_layers:
        out += 2.0 * batch * (1 if last_only else pos) * model.cfg.d_model * model.cfg.d_vocab
    return out


def _earliest(keys) -> tuple[str, int]:
    return min(((s, l) for s, l in keys), key=lambda k: (k[1], _SITE_ORDER.get(k[0], 3)))


def _add_flops(counter: Counter, forward: float, backward: float, unit: float, backward_2x: float) -> None:
    """Accumulate a batch's forward / backward matmul FLOPs, its unit (one forward) and the 2x-convention backward."""
    for k, v in (("forward", forward), ("backward", backward), ("unit", unit), ("backward_2x", backward_2x)):
        counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v


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
    _add_flops(counter, 2 * forward_flops(model, *corrupt.tokens.shape, last_only=True), 0.0, unit, 0.0)
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
        _add_flops(counter, (2 + len(nodes)) * forward_flops(model, b, width, last_only=True), 0.0, unit, 0.0)
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
    and how many of exact patching's top ``k`` (by |mean|) are in the approximation's top ``within`` (and which are
    not)."""
    from scipy.stats import pearsonr, spearmanr

    a = aggregate(approx[approx["site"] == site], value)
    e = aggregate(exact[exact["site"] == site])
    m = a.merge(e, on=["site", "layer", "head"], suffixes=("_atp", "_exact"))
    if len(m) < 3:
        raise ValueError(f"need >= 3 common {site} nodes to correlate, got {len(m)}.")
    top = m["mean_exact"].abs().idxmax()
    top_k, top_within = set(m["mean_exact"].abs().nlargest(k).index), set(m["mean_atp"].abs().nlargest(within).index)

    def label(i) -> str:
        return node_label(site, int(m.at[i, "layer"]), int(m.at[i, "head"]))

    return {
        "n_nodes": len(m),
        "spearman": float(spearmanr(m["mean_atp"], m["mean_exact"]).statistic),
        "spearman_abs": float(spearmanr(m["mean_atp"].abs(), m["mean_exact"].abs()).statistic),
        "pearson": float(pearsonr(m["mean_atp"], m["mean_exact"]).statistic),
        "top_exact_node": node_label(site, int(m.at[top, "layer"]), int(m.at[top, "head"])),
        "top_exact_effect": float(m.at[top, "mean_exact"]),
        "top_exact_atp": float(m.at[top, "mean_atp"]),
        f"exact_top{k}_in_top{within}": len(top_k & top_within),
        f"exact_top{k}_missed": " ".join(label(i) for i in sorted(top_k - top_within)),
        "k": k,
    }
