"""Back-patching with the study's criterion (greedy 10-token generation, alias substring) and its fix table."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from _hopping import tiny_queries

from mhop_lens import hooks
from mhop_lens.analyses import backpatch as bp
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.partial_forward import clean_run
from mhop_lens.analyses.patched_generation import decode_new, generate_patched, mentions_any
from mhop_lens.errors import MhopLensError
from mhop_lens.interventions import replace_positions
from mhop_lens.tokens import encode


def test_generate_verdicts_equal_an_independent_rerun(tiny_models):
    """Each (s, t, donor) verdict equals re-running the patched prompt at every generated token, row by row."""
    model, qs = tiny_models["gpt2"], tiny_queries()
    frame = bp.run_backpatch(model, qs, positions=("t1",), criterion="both", max_new_tokens=4, progress=False)
    assert frame.attrs["criterion"] == "both" and {"correct_generate", "generation"} <= set(frame.columns)
    byid = {q.id: q for q in qs}
    for row in frame.sample(6, random_state=0).itertuples():
        q, d = byid[row.qid], byid[row.donor_qid]
        denc = encode(model, [d.prompt])
        value = clean_run(model, denc).resid_post(row.s)[0, S.position(denc, 0, d, "t1")]
        enc = encode(model, [q.prompt])
        fn = replace_positions(value[None, None], torch.tensor([[S.position(enc, 0, q, "t1")]]))
        new = generate_patched(model, enc, [(hooks.resid(row.t, "post"), fn)], 4, cached=False)
        text = decode_new(model, new)[0]
        assert text == row.generation and mentions_any(text, bp.e3_answers(q)) == row.correct_generate


def test_same_layer_generation_is_the_clean_generation(tiny_models):
    model, qs = tiny_models["llama"], tiny_queries()
    pairs = [(layer, layer) for layer in range(model.cfg.n_layers)]
    frame = bp.run_backpatch(model, qs, pairs=pairs, criterion="generate", control=False, progress=False)
    assert (frame["correct_generate"] == frame["clean_correct_generate"]).all()


def test_organism_first_token_fix_implies_generate_fix(organism):
    """Single-token entities: a first-token hit starts the generation with e3, so the study's criterion agrees."""
    from mhop_lens.data import load_queries

    qs = list(load_queries("organism:heldout", limit=16))
    frame = bp.run_backpatch(organism, qs, positions=("t1", "last"), criterion="both", progress=False)
    assert not (frame["correct"] & ~frame["correct_generate"]).any()
    assert not (frame["clean_correct"] & ~frame["clean_correct_generate"]).any()
    # t1 is the r1 token of the possessive prompt ("Zapus 's spouse 's boss" -> "spouse")
    t1 = frame[frame.position == "t1"]
    assert len(t1) == len(frame) / 2


def test_fix_table_counts_and_definitions(tiny_models):
    model, qs = tiny_models["gpt2"], tiny_queries()
    frame = bp.run_backpatch(model, qs, positions=("t1", "last"), criterion="both", max_new_tokens=3,
                             progress=False)
    ev = pd.DataFrame({"qid": [q.id for q in qs], "subset": ["incorrect", "correct"] * (len(qs) // 2)
                       + ["other"] * (len(qs) % 2)})
    table = bp.fix_table(frame, ev)
    assert len(table) == 2 * 2 * 2  # position x criterion x failure definition
    assert table["position"].tolist()[:2] == ["t1", "last"]
    for r in table.itertuples():
        per_query = bp.summarize_backpatch(frame, ev if r.failures == "evaluate-subset" else None, "query",
                                           r.criterion)
        fail = per_query[(per_query.position == r.position) & (per_query.status == "incorrect")]
        assert r.n_failures == len(fail) and r.n_fixed == fail.fixed_by_any.sum()
        assert r.n_control_fixed == fail.control_fixed_by_any.sum()
    sub = table[table.failures == "evaluate-subset"]
    assert (sub.n_failures == (ev.subset == "incorrect").sum()).all()
    clean = table[(table.failures == "clean-miss") & (table.criterion == "first-token")]
    assert (clean.n_failures == (~frame.drop_duplicates("qid").clean_correct).sum()).all()
    assert "n = " in bp.format_fix_table(table)


def test_criterion_errors(tiny_models):
    model, qs = tiny_models["gpt2"], tiny_queries()
    with pytest.raises(MhopLensError, match="criterion"):
        bp.run_backpatch(model, qs, criterion="exact", progress=False)
    frame = bp.run_backpatch(model, qs, progress=False)
    with pytest.raises(MhopLensError, match="--criterion both"):
        bp.summarize_backpatch(frame, criterion="generate")
