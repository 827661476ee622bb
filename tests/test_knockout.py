"""Attention knockout: an empty window is the clean run, batching is invisible, blocking really blocks."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _hopping import possessive_query, tiny_queries

from mhop_lens import hooks
from mhop_lens.analyses.knockout import edge_mask, parse_edge, run_knockout, window_layers
from mhop_lens.analyses.sites import entity_tokens
from mhop_lens.forward import last_logits
from mhop_lens.interventions import block_attention
from mhop_lens.tokens import encode


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_empty_window_is_the_clean_run(tiny_models, arch):
    frame = run_knockout(tiny_models[arch], tiny_queries(), window=-1, batch_size=7, progress=False)
    assert (frame.layer_lo == -1).all()
    assert (frame.e3_prob - frame.clean_e3_prob).abs().max() < 1e-6
    assert (frame.correct == frame.clean_correct).all()


def test_batched_equals_per_query(tiny_models):
    model, queries = tiny_models["llama"], tiny_queries()[:3]
    batched = run_knockout(model, queries, window=0, batch_size=64, progress=False)  # all queries in one forward
    single = pd.concat([run_knockout(model, [q], window=0, batch_size=64, progress=False) for q in queries])
    key = ["qid", "edge", "centre"]
    batched, single = batched.sort_values(key).reset_index(drop=True), single.sort_values(key).reset_index(drop=True)
    assert (batched[key] == single[key]).all().all()
    assert (batched.e3_prob - single.e3_prob).abs().max() < 1e-5


def test_full_window_equals_blocking_every_layer(tiny_models):
    """The batched per-row hooks equal one plain forward that blocks last->e1 in every layer."""
    model, queries = tiny_models["gpt2"], tiny_queries()
    n = model.cfg.n_layers
    frame = run_knockout(model, queries, edges=("last->e1",), window=n, centres=[0], progress=False)
    enc = encode(model, [q.prompt for q in queries])
    mask = edge_mask(enc, queries, "last->e1")
    fwd = [(hooks.head(layer, "attn_scores"), block_attention(mask)) for layer in range(n)]
    with torch.inference_mode():
        probs = last_logits(model, enc, fwd).softmax(-1)
        clean = last_logits(model, enc).softmax(-1)
    e3 = frame.set_index("qid").loc[[q.id for q in queries]]
    ids = entity_tokens(model, queries, "e3")
    expected = probs[torch.arange(len(queries)), ids]
    assert torch.allclose(torch.tensor(e3.e3_prob.to_numpy()).float(), expected, atol=1e-5)
    assert (expected - clean[torch.arange(len(queries)), ids]).abs().max() > 1e-6  # blocking changes the output


def test_edge_masks_and_windows(tiny_models):
    model, q = tiny_models["gpt2"], possessive_query()
    enc = encode(model, [q.prompt])
    e1 = enc.position(0, q.spans["e1"])
    r1 = [enc.position(0, q.spans["r1"], "first"), enc.position(0, q.spans["r1"])]
    last = enc.tokens.shape[1] - 1
    m = edge_mask(enc, [q], "last->r1")[0]
    assert m.sum() == len(set(range(r1[0], r1[1] + 1))) and m[last, r1[1]]
    a = edge_mask(enc, [q], "all->e1")[0]
    assert a[:, e1].sum() == last - e1 and not a[e1].any()  # every later position, not e1 itself
    assert edge_mask(enc, [q], "last->t1")[0].equal(m)  # t1 is r1 on possessive prompts
    assert list(window_layers(0, 1, 4)) == [0, 1] and list(window_layers(3, 2, 4)) == [1, 2, 3]
    assert list(window_layers(2, -1, 4)) == []
    with pytest.raises(ValueError, match="QUERY->KEY"):
        parse_edge("last-e1")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_fast_knockout_equals_full_forwards(tiny_models, arch):
    """The cached-prefix path (each centre's rows re-run from the window's first layer over the edited positions)
    gives the full-forward table: every edge kind, key definition and window, padded batches included."""
    model, queries = tiny_models[arch], tiny_queries()
    edges = ("last->e1", "last->r1", "all->e1", "r2->e1")
    for keys, window in (("span", 1), ("last", 0), ("word", 2), ("span", -1)):
        kw = dict(edges=edges, window=window, keys=keys, batch_size=5, progress=False)
        fast, ref = run_knockout(model, queries, **kw), run_knockout(model, queries, reference=True, **kw)
        assert fast.attrs["path"] == "kv-partial" and ref.attrs["path"] == "reference"
        text = ["qid", "edge", "centre", "layer_lo", "layer_hi", "pred_token", "correct", "clean_correct", "t1_key"]
        pd.testing.assert_frame_equal(fast[text], ref[text])
        for col in ("e3_prob", "clean_e3_prob", "pred_prob", "clean_pred_prob"):
            assert (fast[col] - ref[col]).abs().max() < 1e-5, (keys, window, col)
        if window >= 0:
            assert ref.e3_prob_change.abs().max() > 1e-3  # the knockouts act


def test_fast_knockout_equals_full_forwards_on_the_organism(organism):
    from mhop_lens.data import load_queries

    queries = load_queries("organism:heldout", limit=12)
    kw = dict(window=1, batch_size=16, progress=False)
    fast, ref = run_knockout(organism, queries, **kw), run_knockout(organism, queries, reference=True, **kw)
    assert fast.attrs["path"] == "kv-partial"
    assert (fast.correct == ref.correct).all() and (fast.pred_token == ref.pred_token).all()
    assert (fast.e3_prob - ref.e3_prob).abs().max() < 1e-5
    assert ref.e3_prob_change.abs().max() > 0.1  # the organism's knockouts act
