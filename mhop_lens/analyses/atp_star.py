"""AtP* (Kramár et al. 2024) for whole nodes: attribution patching with the query-key fix at every later attention
layer and GradDrop, selected by ``attribution.attribute(method="atp-star")``.

Use it when plain AtP may miss heads whose effect runs through saturated attention downstream and exact patching of
every node is too expensive; compare with ``exact_patching`` on a sample before trusting a ranking (docs/heads.md
has the measured agreement on the GAR organism). The definition used, and where it departs from the paper, is in
:func:`atp_star_batch`. Three QK fixes: ``"chained"`` (default) runs the model's own block for every node's write
and carries each recomputed attention change into the layers after it, so chains of saturated attention layers are
taken exactly; ``"exact"`` is the same recompute one softmax deep, as in the paper (cheaper by one output projection
per copy); ``"frozen-norm"`` treats the norm as linear at the corrupted run and projects head writes through
precomputed ``W_O W_QKV`` products (cheaper from ~70 tokens per batch; self-checked against the model's own hooks,
falling back to ``"exact"`` where the check fails). The shared pass machinery (counters, capture hooks, FLOP
counts) is in :mod:`mhop_lens.analyses.attribution`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from mhop_lens import hooks
from mhop_lens.analyses.attribution import (
    BACKWARD_FACTOR,
    Counter,
    _add_flops,
    _clean_cache,
    _earliest,
    _node_scores,
    backward_flops,
    capture_into,
    counting_hooks,
    forward_flops,
    grad_root,
    layer_flops,
)
from mhop_lens.analyses.metrics import Metric
from mhop_lens.forward import logits_at
from mhop_lens.tokens import Encoded

#: Rows per batched QK-recompute pass (copies x pairs); larger passes are split.
QK_ROWS = 1024
#: AtP*'s query-key fix: "chained" (default: the model's own block per copy, attention changes carried into later
#: layers), "exact" (the same, one softmax deep as in the paper) or "frozen-norm" (cheaper at larger batches).
QK_FIXES = ("chained", "exact", "frozen-norm")
#: Largest |z| mismatch (share of max |z|, plus this absolute) between the frozen-norm path's own attention at the
#: corrupted run and the model's ``hook_z`` (or its q/k/v and ``hook_q/k/v``) that still counts as the same
#: computation; above it the batch falls back to the exact recompute.
FROZEN_NORM_TOL = 1e-3


def _node_write(model, site: str, layer: int, delta: Tensor, w_o_all: Tensor | None = None,
                post_in: Tensor | None = None, exact_post: bool = False) -> Float[Tensor, "node batch pos d_model"]:
    """What a node's patch adds to the residual stream directly: per head ``delta_z @ W_O`` (through the
    post-attention norm at the corrupted run's ``post_in`` where the block has one: linearised, or exactly with
    ``exact_post``), else ``delta``."""
    if site == "z":
        w_o = (model.W_O if w_o_all is None else w_o_all)[layer].to(delta.device, delta.dtype)  # [h, d_head, d]
        return _through_post_norm(model, layer, torch.einsum("bphd,hdm->hbpm", delta, w_o), post_in, exact_post)
    return delta.unsqueeze(0)


def has_post_attention_norm(model, layer: int) -> bool:
    """The attention output passes a norm before the residual (Gemma 2/3: ``ln1_post``)."""
    return f"blocks.{layer}.ln1_post.hook_in" in model.hook_dict


def _through_post_norm(model, layer: int, change: Tensor, post_in: Tensor | None, exact: bool = False) -> Tensor:
    """A change of the attention output (before any post-attention norm) as the residual stream sees it: the norm's
    Jacobian at the corrupted run applied to it (first order, like the MLP paths), ``exact``ly ``norm(x + change) -
    norm(x)``, or the change itself where the block has no such norm (``post_in`` None)."""
    if post_in is None:
        return change
    norm = model.blocks[layer].ln1_post.original_component
    x = post_in.to(change.dtype).expand_as(change).contiguous()
    if exact:
        return norm(x + change) - norm(x)
    return torch.func.jvp(norm, (x,), (change,))[1]


def _keep(store: dict, key, stop: bool = False) -> Callable:
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


def _grab_block_args(store: dict, layer: int) -> Callable:
    """A forward pre-hook keeping the arguments the model passes to block ``layer`` (without hidden states and
    cache): each layer's own mask and position embeddings (Gemma 3's global layers use other rotary tables than
    its local ones; windowed models use other masks)."""
    from mhop_lens.analyses.partial_forward import stored

    def hook(module, args, kwargs):
        store[layer] = stored(list(args), dict(kwargs))

    return hook


def _tile(value, rows: int, reps: int):
    """A captured block argument for ``reps`` copies of a ``rows``-row batch (row-batched tensors repeated)."""
    if isinstance(value, Tensor):
        return value.repeat(reps, *[1] * (value.dim() - 1)) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, tuple | list):
        return type(value)(_tile(v, rows, reps) for v in value)
    if isinstance(value, dict):
        return {k: _tile(v, rows, reps) for k, v in value.items()}
    return value


class _LayerArgs:
    """Block-call arguments for ``copies x batch`` rows of one layer: the layer's own arguments from the corrupted
    run, tiled; where they fold the rows with something else (Bloom's ALiBi bias: rows x heads) those of one forward
    stopped at block 0 per call size (Bloom's layers share them; ``capture_forwards`` counts them)."""

    def __init__(self, model, grabbed: dict, attention_mask: Tensor, counter: Counter):
        self.model, self.grabbed, self.mask, self.counter = model, grabbed, attention_mask, counter
        self.block0: dict[int, tuple[list, dict]] = {}

    def __call__(self, layer: int, reps: int) -> tuple[list, dict]:
        from mhop_lens.analyses.partial_forward import _cuttable, block_call, for_call, stored

        args, kwargs = self.grabbed[layer]
        b, width = self.mask.shape
        if _cuttable([*args, *kwargs.values()], b):
            return for_call(_tile(args, b, reps), _tile(kwargs, b, reps), None)
        if reps not in self.block0:
            self.block0[reps] = stored(*block_call(self.model, width, self.mask.repeat(reps, 1), None))
            self.counter.extra["capture_forwards"] = self.counter.extra.get("capture_forwards", 0) + 1
        return for_call(*self.block0[reps], None)


@torch.no_grad()
def _attention_with_writes(model, layer: int, resid_pre: Tensor, writes: Tensor, layer_args: _LayerArgs
                           ) -> Float[Tensor, "node batch pos head d_head"]:
    """Head outputs ``z`` of ``layer`` when each node's write is added to the residual entering it.

    One batched pass per layer through the model's own block, stopped at ``hook_z`` (norm, q/k/v projections,
    scores, softmax, pattern @ v; no output projection, no MLP): copies along the batch dimension, ``QK_ROWS`` rows
    at a time, with the layer's own block arguments (:class:`_LayerArgs`).
    """
    from mhop_lens.analyses.partial_forward import call_block

    n, b = writes.shape[0], resid_pre.shape[0]
    out = []
    per = max(1, QK_ROWS // b)
    for i in range(0, n, per):
        w = writes[i : i + per]
        hidden = (resid_pre.unsqueeze(0) + w).reshape(-1, *resid_pre.shape[1:])
        args, kwargs = layer_args(layer, w.shape[0])
        store: dict = {}
        with model.hooks(fwd_hooks=[(hooks.head(layer, "z"), _keep(store, "z", True))]):
            try:
                call_block(model, layer, hidden, args, kwargs)
            except _StopBlock:
                pass
        out.append(rearrange(store["z"], "(w b) ... -> w b ...", w=w.shape[0]))
    return torch.cat(out)


def _check_recompute(model, layer: int, store: dict, corrupt: Encoded, layer_args: _LayerArgs, flops: dict,
                     parts: dict) -> None:
    """The recompute with no write must give the corrupted run's own ``hook_z`` (real positions); else a clear
    error instead of silently wrong fixes (one extra copy per layer and batch)."""
    from mhop_lens.analyses.hf_compat import architecture
    from mhop_lens.analyses.partial_forward import describe
    from mhop_lens.errors import DataError

    z = store[("zall", layer)].detach()
    zero = torch.zeros(1, *store[("pre", layer)].shape, dtype=z.dtype, device=z.device)
    try:
        got = _attention_with_writes(model, layer, store[("pre", layer)].detach(), zero, layer_args)[0]
    except Exception as e:  # noqa: BLE001 - any failure of the block called alone means no exact fix here
        raise DataError(f"AtP*'s attention recompute cannot call layer {layer} of {architecture(model)} alone "
                        f"({describe(e)}). Use method 'atp' or 'ig'.") from e
    flops["check"] += parts["qkv"] + parts["attention"]
    real = corrupt.attention_mask.bool().to(z.device)
    diff = float((got - z)[real].abs().max())
    if diff > FROZEN_NORM_TOL * (1 + float(z[real].abs().max())):
        raise DataError(f"AtP*'s attention recompute does not reproduce layer {layer} of {architecture(model)} "
                        f"(max |z| difference {diff:.3g} with nothing patched): its exact fix cannot be trusted "
                        f"here. Use method 'atp' or 'ig', or qk_fix='frozen-norm' where supported.")


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
    if any(has_post_attention_norm(model, l) for l in range(cfg.n_layers)):
        return "a norm after attention (ln1_post)"
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


def atp_star_batch(model, clean: Encoded, corrupt: Encoded, metric: Metric, rows: Tensor, named,
                    counter: Counter, _ig_steps: int, qk_fix: str = "chained", cache: dict | None = None,
                    delta_scale: float = 1.0, grad_drop: bool = True):
    """AtP* for whole nodes (head z, MLP out, resid_post): QK fix at every later attention layer, then GradDrop.

    Definition used (departures from the paper, docs/heads.md): Kramár et al. apply the QK fix to query/key nodes
    themselves (exact softmax of the patched scores, times the gradient wrt the pattern). Our nodes are heads'
    ``z``, whose own attention change AtP already takes exactly; a head hidden by saturation (the organism's L0H1)
    is hidden by the *later* heads whose queries and keys it writes to. So for each later layer l', the node's
    direct write (``delta_z @ W_O``, ``delta mlp_out``, ``delta resid``) enters l''s attention and that layer's
    attention softmax is taken exactly (one batched pass per layer, all earlier nodes as copies):

    - ``qk_fix="frozen-norm"``: the norm in front of l' is the linear map it is at the corrupted run's
      per-position scale, so the write changes q/k/v linearly (low-rank for head writes,
      :func:`_frozen_norm_fix`); new scores (rotary, GQA, soft cap as the model), exact softmax, pattern @ (v + dv).
      The first-order term of the same path, grad(q/k/v) . (dq, dk, dv), is replaced by grad(z_l') . (z_l'(write)
      - z_l'): only the softmax is taken beyond first order, as in the paper; the norm's scale path stays in AtP.
      Checked per batch against the model's own ``hook_q/k/v`` and ``hook_z``; unsupported architectures
      (:func:`frozen_norm_support`) or a failed check use ``"exact"`` (``frame.attrs["qk_fix"]`` says which).
    - ``qk_fix="exact"``: the write is added to the residual entering l' and the model's own block runs to
      ``hook_z`` (true norm, q/k/v, softmax); its first-order term (gradient wrt l''s attention input . write) is
      replaced by grad(z_l') . (z_l'(write) - z_l').
    - ``qk_fix="chained"`` (default): as ``"exact"``, with later layers in order and the write entering l'
      including every earlier recomputed change ``(z_m(write_m) - z_m) @ W_O`` (l < m < l'); the subtracted
      first-order term is taken on that same write, so the sum telescopes: on a model without MLPs it is exactly
      the first-order readout (final norm and unembedding) of the node's true patching effect (test). It recovers
      a head hidden behind two saturated attention steps (the organism's L0H1: docs/heads.md) at one more output
      projection per copy. Post-attention norms (Gemma 2/3) are taken exactly along the chain (the ``exact`` fix
      passes writes through their Jacobian). GradDrop drops layer l's own fix term, but the later recomputes keep
      the chain through l (a chain per dropped layer would cost L - 1 more recomputes).

    AtP* = AtP + sum over later l' of that difference; paths through MLPs stay first order, and so does everything
    after l' except (``"chained"``) the attention of the layers after it. GradDrop (paper eq. 11): I_l = the same
    estimate with the gradient through layer l's residual contribution dropped (a backward from resid_pre_l seeded
    with dmetric/dresid_post_l, over layers < l only); ``atp_star_gd`` = sum_l |I_l| / (L - 1), a magnitude as in
    the paper (``grad_drop=False`` skips it and its L - 1 partial backwards). ``delta_scale`` scales every node's
    clean-minus-corrupted delta (1 = AtP*; tests take it to 0). Cost: 2 forwards, 1 backward, L-1 partial backwards,
    the per-layer fixes; matmul FLOPs in ``counter.extra`` (``flops_*``).
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
    post_layers = [l for l in range(n_layers) if has_post_attention_norm(model, l)]
    exact_post = qk_fix == "chained"  # the chain takes post-attention norms exactly too (Gemma 2/3)
    fwd += [(f"blocks.{l}.ln1_post.hook_in", _keep(store, ("post_in", l))) for l in post_layers]
    if exact_post:
        fwd += [(f"blocks.{l}.hook_attn_out", capture_into(store, ("attn_out", l))) for l in post_layers]
    fwd += [(hooks.resid(l, "pre"), capture_into(store, ("pre", l))) for l in range(n_layers)]
    fwd += [(hooks.resid(l, "post"), capture_into(store, ("post", l))) for l in range(n_layers)]
    fwd += counting_hooks(counter)
    node_keys = [(s, l) for s, l, _ in named]
    lin_names = ("q", "k", "v") if frozen else ("attn_in",)
    layer_keys = [(k, l) for l in later for k in ("zall", *lin_names)]
    layer_keys += [("attn_out", l) for l in post_layers if exact_post]
    b, pos = corrupt.tokens.shape
    unit = forward_flops(model, b, pos)
    read = forward_flops(model, b, pos, last_only=True)  # both forwards unembed only the read position
    per_layer = sum(layer_flops(model, b, pos).values())
    flops = {k: 0.0 for k in ("partial_backward", "qkv", "attention", "precompute", "check", "writes",
                              "score_terms")}
    earliest = _earliest(node_keys)
    backward_2x = BACKWARD_FACTOR * unit
    grabbed: dict = {}
    handles = [] if frozen else [model.blocks[l].register_forward_pre_hook(_grab_block_args(grabbed, l),
                                                                            with_kwargs=True) for l in later]
    with torch.enable_grad():
        try:
            m_corrupt = metric(logits_at(model, corrupt, fwd), rows)
        finally:
            for h in handles:
                h.remove()
        keys = node_keys + layer_keys + [("post", l) for l in range(n_layers)]
        grads = dict(zip(keys, torch.autograd.grad(m_corrupt.sum(), [store[k] for k in keys], allow_unused=True,
                                                   retain_graph=True), strict=True))
        grads = {k: torch.zeros_like(store[k]) if g is None else g for k, g in grads.items()}
        deltas = {k: delta_scale * (clean_acts[k] - store[k].detach()) for k in node_keys}
        plain = {k: _node_scores(k[0], deltas[k], grads[k]) for k in node_keys}
        # per later layer: each earlier node's exact change of that layer's head outputs, and the first-order
        # change of the same path's input(s)
        fixes: dict = {}
        if frozen:
            try:
                fixes = _frozen_fixes(model, store, corrupt, node_keys, deltas, later, cache, flops)
            except _Unsupported as e:  # this batch's passes are run again by the exact recompute
                counter.notes.append(str(e))
                cache["unsupported"] = str(e)
                for k, v in flops.items():
                    counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v
                _add_flops(counter, 2 * read + sum(v for k, v in flops.items() if k != "partial_backward"),
                           backward_flops(model, b, pos, earliest, last_only=True), 0.0, backward_2x)
                return atp_star_batch(model, clean, corrupt, metric, rows, named, counter, _ig_steps, "exact",
                                       cache, delta_scale, grad_drop)
        else:
            fixes = _exact_fixes(model, store, corrupt, named, deltas, later, counter, flops, grabbed,
                                 qk_fix == "chained")
        for layer in later:
            if layer in fixes:
                counter.extra["qk_passes"] = counter.extra.get("qk_passes", 0) + 1
                counter.extra["qk_copies"] = counter.extra.get("qk_copies", 0) + len(fixes[layer][0])
        own = [k for k in fixes if isinstance(k, tuple)]  # ("own", l): a node's own post-norm taken exactly

        def corrected(node_grads: dict, g: dict, layers) -> dict:
            """Per node [batch, 1, n]: AtP with the given grads plus the fix terms of every key in ``layers``
            (sum of change . gradient over ``plus``, minus the same over ``minus``)."""
            out = {k: _node_scores(k[0], deltas[k], node_grads[k]).sum(1, keepdim=True) for k in node_keys}
            for layer in layers:
                if layer not in fixes:
                    continue
                ids, plus, minus = fixes[layer]
                extra = 0.0
                for sign, terms in ((1.0, plus), (-1.0, minus)):
                    for key, change in terms.items():
                        extra = extra + sign * torch.einsum("nb...,b...->nb", change, g[key])
                        flops["score_terms"] += 2.0 * change.numel()
                for i, (site, l, h) in enumerate(ids):
                    out[(site, l)][:, 0, max(h, 0)] += extra[i]
            return out

        star = corrected(grads, grads, [*later, *own])
        gd = {k: torch.zeros_like(v) for k, v in star.items()}
        for drop in range(n_layers if grad_drop else 0):
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
            dropped = corrected({k: g[k] for k in node_keys}, g,
                                [l for l in later if l != drop] + [k for k in own if k[1] != drop])
            for k in node_keys:
                if k[0] != "resid_post" and k[1] == drop:
                    continue  # the node's own layer dropped: all its paths are cut, I_l = 0
                gd[k] += dropped[k].abs()
        gd = {k: v / max(1, n_layers - 1) for k, v in gd.items()}
    model.zero_grad(set_to_none=True)
    for k, v in flops.items():
        counter.extra[f"flops_{k}"] = counter.extra.get(f"flops_{k}", 0.0) + v
    fixes_total = sum(v for k, v in flops.items() if k != "partial_backward")
    _add_flops(counter, 2 * read + fixes_total,
               backward_flops(model, b, pos, earliest, last_only=True) + flops["partial_backward"], unit, backward_2x)
    extra = {"atp_star_gd": gd} if grad_drop else {}
    return (star, {**extra, "atp": {k: v.sum(1, keepdim=True) for k, v in plain.items()}}), m_clean, \
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
            fixes[layer] = (ids, {("zall", layer): dz}, lin)
    return fixes


def _shared_norm(model, layer: int) -> bool:
    """Attention and MLP read one norm's output (parallel blocks without ``ln2``: Phi, Falcon, GPT-J, Cohere): the
    gradient at ``ln1``'s input would carry the MLP's path too, so the exact fix reads the attention's own input."""
    return f"blocks.{layer}.ln2.hook_in" not in model.hook_dict


@torch.no_grad()
def _exact_fixes(model, store: dict, corrupt: Encoded, named, deltas: dict, later, counter: Counter, flops: dict,
                 grabbed: dict, chain: bool = False) -> dict:
    """Exact-recompute fix of every later layer: the model's own block to ``hook_z`` on write-shifted copies.

    ``grabbed``: each layer's block arguments from the corrupted run (:func:`_grab_block_args`); every layer's
    recompute is first checked against that run (:func:`_check_recompute`).
    Returns {layer: (node ids, {key: change} added, {key: change} subtracted)}, each change dotted with the
    corrupted run's gradient at ``key``. ``chain``: layers in order, and each layer's recomputed head-output
    change (``dz @ W_O``, through a post-attention norm exactly) joins the node's write into every layer after it,
    so a chain of attention layers is taken exactly end to end. Where a block normalises its attention output
    (Gemma 2/3), the chain's terms are taken at that norm's output (``hook_attn_out``), and a head node's own
    write through it gets a term ``("own", layer)``: its exact write minus AtP's linearised one."""
    n_layers = model.cfg.n_layers
    b, pos = corrupt.tokens.shape
    parts = layer_flops(model, b, pos)
    w_o = model.W_O.detach()
    post = {l: store.get(("post_in", l)) for l in range(n_layers)}
    exact_post = chain
    writes_of = {(s, l): _node_write(model, s, l, deltas[(s, l)], w_o, post[l], exact_post)
                 for s, l, _ in named if l < n_layers - 1}
    flops["writes"] += sum(parts["o"] for s, l, _ in named if s == "z" and (s, l) in writes_of)
    fixes: dict = {}
    if exact_post:
        for s, l, _ in named:
            if s == "z" and post[l] is not None:
                write = writes_of[(s, l)] if (s, l) in writes_of else _node_write(model, s, l, deltas[(s, l)], w_o,
                                                                                   post[l], True)
                h = write.shape[0]
                own_delta = torch.zeros(h, *deltas[(s, l)].shape, dtype=write.dtype, device=write.device)
                own_delta[torch.arange(h), :, :, torch.arange(h)] = deltas[(s, l)].permute(2, 0, 1, 3)
                fixes[("own", l)] = ([(s, l, i) for i in range(h)], {("attn_out", l): write}, {(s, l): own_delta})
    layer_args = _LayerArgs(model, grabbed, corrupt.attention_mask, counter)
    for layer in later:
        ids = [(s, l, h if s == "z" else -1) for s, l, _ in named if l < layer
               for h in range(writes_of[(s, l)].shape[0])]
        if not ids:
            continue
        keys = [(s, l) for s, l, _ in named if l < layer]
        writes = torch.cat([writes_of[k] for k in keys])
        _check_recompute(model, layer, store, corrupt, layer_args, flops, parts)
        z_new = _attention_with_writes(model, layer, store[("pre", layer)].detach(), writes, layer_args)
        dz = z_new - store[("zall", layer)].detach()
        counter.extra["qk_block_rows"] = counter.extra.get("qk_block_rows", 0) + len(ids)
        flops["qkv"] += len(ids) * parts["qkv"]
        flops["attention"] += len(ids) * parts["attention"]
        plus = {("zall", layer): dz}
        at_post = exact_post and post[layer] is not None
        if chain and (layer < n_layers - 1 or at_post):
            out = _through_post_norm(model, layer, torch.einsum("nbphd,hdm->nbpm", dz, w_o[layer]), post[layer],
                                     exact_post)
            flops["writes"] += len(ids) * parts["o"]
            if at_post:
                plus = {("attn_out", layer): out}
            if layer < n_layers - 1:
                for k, part in zip(keys, out.split([writes_of[k].shape[0] for k in keys]), strict=True):
                    writes_of[k] = writes_of[k] + part
        if _shared_norm(model, layer):  # the attention's own (normed) input: the write through ln1, linearised
            norm = model.blocks[layer].ln1.original_component
            x = store[("pre", layer)].detach().expand_as(writes).contiguous()
            writes = torch.func.jvp(norm, (x,), (writes,))[1]
        fixes[layer] = (ids, plus, {("attn_in", layer): writes})
    return fixes
