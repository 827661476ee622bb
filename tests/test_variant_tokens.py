"""Variant tokens (several last-position residuals of a row side by side) equal one run_from row per variant."""

from __future__ import annotations

import torch

from mhop_lens.analyses import variant_tokens as vt
from mhop_lens.analyses.backpatch import backpatch_logits, backpatch_reference_logits
from mhop_lens.analyses.partial_forward import clean_run, prefix_cache, run_from
from mhop_lens.model_state import model_state
from mhop_lens.tokens import encode

PROMPTS = ["The spouse of the performer of Imagine is", "The author of Hamlet is", "Paris"]


def _inputs(model, sources=(1, 2, 0)):
    enc = encode(model, PROMPTS)  # left padded: the prefix mask differs per row
    clean = clean_run(model, enc)
    last = enc.tokens.shape[1] - 1
    variants = torch.stack([clean.streams[s][:, last] for s in sources], 1)
    return enc, clean, last, variants


def test_variants_equal_one_row_per_variant(tiny_model):
    enc, clean, last, variants = _inputs(tiny_model)
    rows = torch.arange(len(PROMPTS))
    got = vt.run_variants(tiny_model, variants, 1, enc.attention_mask, prefix_cache(clean.kv, rows, last, 1))
    for j in range(variants.shape[1]):
        cache = prefix_cache(clean.kv, rows, last, 1)
        want = run_from(tiny_model, variants[:, j : j + 1], 1, enc.attention_mask, cache)
        assert (got[:, j] - want[:, 0]).abs().max() < 1e-4
    # the variant taken from layer 1 itself reproduces the clean last-position logits
    assert (got[:, 0] - clean.last_logits).abs().max() < 1e-4
    assert vt.check_variant_path(tiny_model, variants, 1, enc.attention_mask, prefix_cache(clean.kv, rows, last, 1))


def test_variants_that_see_each_other_fail_the_check_and_backpatch_falls_back(tiny_models, monkeypatch):
    """Without the block-diagonal mask the variants attend to one another: the check must catch it, and
    back-patching must then take the one-row-per-variant path and still match the reference."""
    model = tiny_models["gpt2"]
    real = vt._fold

    def causal_only(one, many, k, prefix):
        if isinstance(many, torch.Tensor) and many.dim() == 4:
            return many  # the plain causal mask: variant j sees variants < j
        return real(one, many, k, prefix)

    monkeypatch.setattr(vt, "_fold", causal_only)
    monkeypatch.setitem(model_state(model), "variant_path", {})
    enc, clean, last, variants = _inputs(model)
    rows = torch.arange(len(PROMPTS))
    assert not vt.check_variant_path(model, variants, 1, enc.attention_mask, prefix_cache(clean.kv, rows, last, 1))
    pos = torch.full((len(PROMPTS),), last)
    pairs = [(s, t) for t in range(model.cfg.n_layers) for s in range(t + 1, model.cfg.n_layers)]
    fast = backpatch_logits(model, clean, rows, pos, pairs, rows.flip(0), pos)
    ref = backpatch_reference_logits(model, clean, rows, pos, pairs, rows.flip(0), pos)
    assert (fast - ref).abs().max() < 1e-4
