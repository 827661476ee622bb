"""run_from over a cached prefix reproduces the full forward, from any layer and prefix length."""

from __future__ import annotations

import pytest
import torch

from mhop_lens.analyses.partial_forward import BlockArgs, check_fast_path, clean_run, prefix_cache, run_from
from mhop_lens.forward import run
from mhop_lens.model_state import model_state
from mhop_lens.tokens import encode

PROMPTS = ["The spouse of the performer of Imagine is", "The author of Hamlet is", "Paris"]


@pytest.mark.parametrize("start", [0, 1])
def test_run_from_equals_full_forward(tiny_model, start):
    enc = encode(tiny_model, PROMPTS)  # left padded: rows of different lengths
    full = run(tiny_model, enc)
    clean = clean_run(tiny_model, enc)
    width = enc.tokens.shape[1]
    rows = torch.arange(len(PROMPTS))
    for end in (0, width - 3, width - 1):
        got = run_from(tiny_model, clean.streams[start][:, end:], start, enc.attention_mask,
                       prefix_cache(clean.kv, rows, end, start))
        assert (got - full[:, end:]).abs().max() < 1e-4


def test_repeated_rows_and_clean_stream(tiny_model):
    enc = encode(tiny_model, PROMPTS)
    clean = clean_run(tiny_model, enc)
    rows = torch.tensor([2, 0, 0, 1])
    width = enc.tokens.shape[1]
    got = run_from(tiny_model, clean.streams[1][rows, width - 1 :], 1, enc.attention_mask[rows],
                   prefix_cache(clean.kv, rows, width - 1, 1))[:, -1]
    assert (got - clean.last_logits[rows]).abs().max() < 1e-4
    assert torch.equal(clean.resid_post(0), clean.streams[1])
    assert check_fast_path(tiny_model, enc)


def test_reused_block_args_equal_fresh_captures(tiny_model, monkeypatch):
    """One BlockArgs across calls (row tiles cut to fewer rows, with and without a prefix cache) gives the same
    logits as a fresh capture per call; a mask that is not a prefix of the captured one is captured anew."""
    from mhop_lens.analyses import partial_forward

    captures = []
    real = partial_forward.block_call
    monkeypatch.setattr(partial_forward, "block_call", lambda *a: captures.append(1) or real(*a))
    enc = encode(tiny_model, PROMPTS)
    clean = clean_run(tiny_model, enc)
    width, n = enc.tokens.shape[1], len(PROMPTS)
    calls = BlockArgs(tiny_model)
    for tiles, rows in ((4, None), (2, None), (1, None), (2, torch.tensor([1, 2, 0, 2, 1, 0]))):
        rows = torch.arange(n).repeat(tiles) if rows is None else rows
        for end, start in ((width - 1, 1), (0, 0), (width - 2, 1)):
            resid = clean.streams[start][rows, end:]
            fresh = run_from(tiny_model, resid, start, enc.attention_mask[rows],
                             prefix_cache(clean.kv, rows, end, start), block_args=BlockArgs(tiny_model))
            reused = run_from(tiny_model, resid, start, enc.attention_mask[rows],
                              prefix_cache(clean.kv, rows, end, start), block_args=calls)
            assert (reused - fresh).abs().max() < 1e-5
            assert (reused[:, -1] - clean.last_logits[rows]).abs().max() < 1e-4
    assert width not in (12, 6, 3), "row counts must differ from the sizes (else no reuse, by design)"
    assert len(captures) == 12 + 3 + 3  # fresh: one per call; reused: 3 shapes, then 3 for the shuffled rows


def test_shared_prefix_clean_run_equals_plain(tiny_model):
    """Rows that differ only in the last token share their prefix's forward; results equal the plain forward."""
    from mhop_lens.analyses.hf_compat import kv_layers
    from mhop_lens.analyses.partial_forward import _prefix_groups, _shared_clean_run

    prompts = ["The spouse of the performer of Imagine is", "The spouse of the performer of Imagine the",
               "The author of Hamlet is", "The author of Hamlet the"]
    enc = encode(tiny_model, prompts)
    group = _prefix_groups(enc)
    assert group is not None and int(group.max()) + 1 < len(prompts)
    shared = _shared_clean_run(tiny_model, enc, group)
    plain = clean_run(tiny_model, enc, share_prefixes=False)
    assert (shared.streams - plain.streams).abs().max() < 1e-4
    assert (shared.last_logits - plain.last_logits).abs().max() < 1e-4
    for (ka, va), (kb, vb) in zip(kv_layers(shared.kv), kv_layers(plain.kv), strict=True):
        assert (ka - kb).abs().max() < 1e-4 and (va - vb).abs().max() < 1e-4


def test_kept_block_args_outlive_a_call(tiny_model, monkeypatch):
    """``run_from`` without ``block_args`` uses the model's kept captures: a second call of the same shape and mask
    captures nothing and gives the same logits; another mask (padding) is captured anew."""
    from mhop_lens.analyses import partial_forward

    monkeypatch.setitem(model_state(tiny_model), "block_args", None)  # start from no captures
    captures = []
    real = partial_forward.block_call
    monkeypatch.setattr(partial_forward, "block_call", lambda *a: captures.append(1) or real(*a))
    enc = encode(tiny_model, PROMPTS)
    clean = clean_run(tiny_model, enc)
    rows, end = torch.arange(len(PROMPTS)), enc.tokens.shape[1] - 1

    def call(mask):
        return run_from(tiny_model, clean.streams[1][:, end:], 1, mask, prefix_cache(clean.kv, rows, end, 1))

    first, again = call(enc.attention_mask), call(enc.attention_mask)
    assert len(captures) == 1 and torch.equal(first, again)
    assert (first[:, -1] - clean.last_logits).abs().max() < 1e-4
    other = enc.attention_mask.clone()
    other[:, 0] = 0  # a different padding pattern must not reuse the capture
    call(other)
    assert len(captures) == 2
