"""Logit lens: the last layer's projection is the model's output; batching does not change results."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _hopping import possessive_query, tiny_queries

from mhop_lens import hooks
from mhop_lens.analyses import sites
from mhop_lens.analyses.lens import project, run_lens
from mhop_lens.forward import run_with_cache
from mhop_lens.tokens import encode


def test_last_layer_projection_is_model_logits(tiny_model):
    enc = encode(tiny_model, [q.prompt for q in tiny_queries()])
    last = hooks.resid(tiny_model.cfg.n_layers - 1, "post")
    with torch.inference_mode():
        logits, cache = run_with_cache(tiny_model, enc, [last])
        torch.testing.assert_close(project(tiny_model, cache[last]), logits, atol=1e-5, rtol=1e-5)


def test_lens_frame_last_layer_matches_prediction(tiny_model):
    queries = tiny_queries()
    frame = run_lens(tiny_model, queries, positions=("last", "t1"), top_k=3, batch_size=2, progress=False)
    n = tiny_model.cfg.n_layers
    assert len(frame) == len(queries) * 2 * 3 * n
    final = frame[(frame.site == "resid_post") & (frame.layer == n - 1)]
    assert (final.pred_rank == 0).all() and (final.top1 == final.pred_token).all()
    enc = encode(tiny_model, [q.prompt for q in queries])
    with torch.inference_mode():
        logits = tiny_model(enc.tokens, attention_mask=enc.attention_mask)[:, -1].softmax(-1)
    e3 = sites.entity_tokens(tiny_model, queries, "e3")
    got = final[final.position == "last"].set_index("qid").loc[[q.id for q in queries], "e3_prob"].to_numpy()
    torch.testing.assert_close(torch.tensor(got), logits[torch.arange(len(queries)), e3], atol=1e-5,
                               rtol=1e-4)
    assert final.groupby("qid").correct.first().tolist() == (logits.argmax(-1) == e3).tolist()


def test_batched_equals_per_query(tiny_models):
    model, queries = tiny_models["llama"], tiny_queries()[:3]
    batched = run_lens(model, queries, positions=("last", "e1"), batch_size=3, progress=False)
    single = run_lens(model, queries, positions=("last", "e1"), batch_size=1, progress=False)
    key = ["qid", "position", "site", "layer"]
    batched, single = batched.sort_values(key).reset_index(drop=True), single.sort_values(key).reset_index(drop=True)
    for col in ("e2_rank", "e3_rank", "pred_rank", "top1"):
        assert (batched[col] == single[col]).all(), col
    assert (batched.e3_prob - single.e3_prob).abs().max() < 1e-5


def test_t1_is_the_end_of_the_first_hop_phrase(tiny_models):
    model = tiny_models["gpt2"]
    csv_q, pos_q = tiny_queries()[0], possessive_query()
    assert sites.span_of(csv_q, "t1") == csv_q.spans["e1"]  # "the spouse of the performer of Imagine"
    assert sites.span_of(pos_q, "t1") == pos_q.spans["r1"]  # "Mokar 's spouse 's boss"
    enc = encode(model, [csv_q.prompt])
    assert sites.position(enc, 0, csv_q, "t2") == enc.tokens.shape[1] - 1
    assert model.tokenizer.decode(enc.tokens[0, sites.position(enc, 0, csv_q, "t1")]).strip() in "Imagine"
    with pytest.raises(ValueError, match="unknown position"):
        sites.span_of(csv_q, "e9")


def test_old_resid_name_is_resid_post_with_a_warning(tiny_models):
    model, qs = tiny_models["gpt2"], tiny_queries()[:2]
    with pytest.warns(DeprecationWarning, match="lens site 'resid' is deprecated; use 'resid_post'"):
        old = run_lens(model, qs, sites=("resid",), progress=False)
    new = run_lens(model, qs, sites=("resid_post",), progress=False)
    assert set(old["site"]) == {"resid_post"}
    pd.testing.assert_frame_equal(old, new)


def test_unknown_site_is_refused(tiny_models):
    with pytest.raises(ValueError, match="unknown lens site"):
        run_lens(tiny_models["gpt2"], tiny_queries()[:1], sites=("resid_post", "attn"), progress=False)
