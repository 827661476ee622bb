"""Run k alternative residuals of a row's last position side by side, as k query tokens over one shared prefix.

Back-patching at the last position gives every (query, target layer t) several variants of one residual (one per
source layer s) over the same clean prefix. ``partial_forward.run_from`` puts each variant in its own batch row,
so the prefix keys/values are copied once per variant. Here the variants of a row are k new tokens instead:
each attends to the prefix and to itself only (the block-diagonal part of the 4D attention mask) at the position
of the last token (position ids / rotary embeddings of that one position), so the prefix is held once per row.

The block arguments are the model's own (captured like ``run_from``'s) with only those two changes;
``variant_path_cause`` compares the result with ``run_from`` once per model and condition, and callers fall back
(with one warning naming the cause) when it differs: an architecture whose blocks ignore the 4D mask, or take
positions or a position bias (ALiBi) in a form this does not recognise.
"""

from __future__ import annotations

import torch
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from mhop_lens.analyses.hf_compat import cache_of, is_cache, kv_layers, seq_length
from mhop_lens.analyses.partial_forward import (
    BlockArgs,
    _verdicts,
    block_call,
    describe,
    kept_block_args,
    run_blocks,
    run_from,
    same_computation,
    stored,
)


class Unsupported(Exception):
    """The model's block arguments have a form ``variant_args`` cannot adapt."""


def _fold(one, many, k: int, prefix: int):
    """The argument for k variant tokens from the captures for 1 and for k new tokens (see the module doc)."""
    if is_cache(many) or many is None or isinstance(many, bool | int | float | str):
        return many
    if isinstance(many, tuple | list):
        return type(many)(_fold(a, b, k, prefix) for a, b in zip(one, many, strict=True))
    if not isinstance(many, Tensor):
        return many
    if one.shape == many.shape:
        return many
    if many.dim() == 4 and many.shape[-2:] == (k, prefix + k) and one.shape[-2:] == (1, prefix + 1):
        mask = many.clone()  # the 4D attention mask: the new x new block becomes the identity
        allowed, blocked = one[..., :, prefix : prefix + 1], many[..., 0:1, prefix + 1 : prefix + 2]
        eye = torch.eye(k, dtype=torch.bool, device=many.device)
        mask[..., :, prefix:] = torch.where(eye, allowed, blocked)
        return mask
    differ = [d for d in range(many.dim()) if one.shape[d] != many.shape[d]]
    if one.dim() == many.dim() and len(differ) == 1 and one.shape[differ[0]] == 1 and many.shape[differ[0]] == k:
        return one.expand(*many.shape)  # positions: every variant sits at the last token's position
    raise Unsupported(f"a block argument of shape {tuple(many.shape)} (vs {tuple(one.shape)} for one token)")


def variant_args(model, k: int, attention_mask: Int[Tensor, "n pos"], cache: DynamicCache) -> tuple[list, dict]:
    """Block arguments for k variant tokens after ``cache`` (``attention_mask`` covers prefix + the last token),
    in ``partial_forward.stored`` form."""
    prefix = seq_length(cache)
    one_args, one_kwargs = block_call(model, 1, attention_mask, cache)  # stops before block 0: cache untouched
    wide = torch.cat([attention_mask, attention_mask[:, -1:].expand(-1, k - 1)], dim=1)
    many_args, many_kwargs = block_call(model, k, wide, cache)
    args = [_fold(a, b, k, prefix) for a, b in zip(one_args, many_args, strict=True)]
    kwargs = {name: _fold(one_kwargs[name], value, k, prefix) for name, value in many_kwargs.items()}
    return stored(args, kwargs)


def run_variants(
    model,
    variants: Float[Tensor, "n k d_model"],
    start: int,
    attention_mask: Int[Tensor, "n pos"],
    cache: DynamicCache,
    block_args: BlockArgs | None = None,
    unembed: bool = True,
) -> Float[Tensor, "n k vocab"]:
    """Logits of each of the k variants of row i's last-position residual entering block ``start`` (their final
    residuals with ``unembed=False``).

    ``cache``: the prefix keys/values (every position but the last) of every layer >= ``start``, extended in place.
    ``block_args`` (a ``BlockArgs`` capturing with ``variant_args``) defaults to the one kept on the model.
    """
    args, kwargs = (block_args or kept_block_args(model, variant_args))(variants.shape[1], attention_mask, cache)
    return run_blocks(model, variants, start, args, kwargs, unembed=unembed)


def variant_path_cause(model, variants: Float[Tensor, "n k d_model"], start: int,
                       attention_mask: Int[Tensor, "n pos"], cache: DynamicCache) -> str | None:
    """None when ``run_variants`` equals one ``run_from`` row per variant on these inputs, else why not.

    Kept on the model per condition (k, prefix length, padding, dtype, device); any exception is a cause."""
    verdicts = _verdicts(model, "variant_path")
    n, k = variants.shape[:2]
    key = (k, seq_length(cache), bool((attention_mask == 0).any()), str(variants.dtype), str(variants.device))
    if key in verdicts:
        return verdicts[key]
    try:
        layers = kv_layers(cache)
        got = run_variants(model, variants, start, attention_mask, cache_of(layers),
                           BlockArgs(model, variant_args))  # a fresh capture: the check must not trust kept ones
        rows = torch.arange(n, device=variants.device).repeat(k)
        tiled = [(key_.index_select(0, rows), value.index_select(0, rows)) for key_, value in layers]
        want = run_from(model, rearrange(variants, "n k d -> (k n) 1 d"), start, attention_mask[rows],
                        cache_of(tiled))[:, -1]
        want = rearrange(want, "(k n) vocab -> n k vocab", k=k)
        diff = float((got.float() - want.float()).abs().max())
        same = same_computation(got, want)
        cause = None if same else f"variant tokens differ from one row per variant by {diff:.3g}"
    except Exception as e:  # noqa: BLE001 - Unsupported or any failure means: use one row per variant
        cause = describe(e)
    verdicts[key] = cause
    return cause


def check_variant_path(model, variants: Float[Tensor, "n k d_model"], start: int,
                       attention_mask: Int[Tensor, "n pos"], cache: DynamicCache) -> bool:
    """True when ``run_variants`` equals one ``run_from`` row per variant on these inputs (``variant_path_cause``)."""
    return variant_path_cause(model, variants, start, attention_mask, cache) is None
