"""Tuned lens: starts as the logit lens, lowers the KL to the model's output on held-out positions, round-trips."""

from __future__ import annotations

import pytest
import torch

from mhop_lens.analyses.lens import run_lens
from mhop_lens.analyses.tuned_lens import TunedLens, compare_lenses, earliest_decoding, train_tuned_lens
from mhop_lens.data import load_queries
from mhop_lens.errors import DataError

RANKS = ["e2_rank", "e3_rank", "pred_rank"]


@pytest.fixture(scope="module")
def queries():
    return list(load_queries("organism:heldout", limit=24))


@pytest.fixture(scope="module")
def trained(organism):
    prompts = [q.prompt for q in load_queries("organism:train", limit=600)]
    return train_tuned_lens(organism, prompts, steps=100, lr=3e-3)


def test_untrained_lens_is_the_logit_lens(organism, queries):
    lens = TunedLens(organism.cfg.n_layers, organism.cfg.d_model)
    plain = run_lens(organism, queries, positions=("t1", "last"), sites=("resid_post",), progress=False)
    tuned = run_lens(organism, queries, positions=("t1", "last"), sites=("resid_post",), progress=False,
                     translator=lens)
    assert (plain["lens"] == "logit").all() and (tuned["lens"] == "tuned").all()
    assert plain[RANKS].equals(tuned[RANKS])
    assert (plain["e3_prob"] - tuned["e3_prob"]).abs().max() < 1e-6


def test_training_lowers_heldout_kl_and_keeps_the_last_layer(trained):
    _, record = trained
    logit, tuned = record["heldout_kl_logit_lens"], record["heldout_kl_tuned_lens"]
    assert logit[-1] < 1e-5 and tuned[-1] < 1e-5  # the last layer's readout is the model's output
    for layer in range(len(logit) - 1):
        assert tuned[layer] < 0.9 * logit[layer], (layer, logit, tuned)


def test_save_load_round_trip_and_shape_check(trained, organism, tmp_path):
    lens, record = trained
    lens.save(tmp_path / "good", record)
    back = TunedLens.load(tmp_path / "good", organism)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    TunedLens(organism.cfg.n_layers, organism.cfg.d_model // 2).save(tmp_path / "other")
    with pytest.raises(DataError, match="train one for this model"):
        TunedLens.load(tmp_path / "other", organism)
    with pytest.raises(DataError, match="tuned-lens train"):
        TunedLens.load(tmp_path / "missing")


def test_earliest_decoding_counts(trained, organism, queries):
    table = compare_lenses(organism, queries, trained[0])
    assert set(table["lens"]) == {"logit", "tuned"} and set(table["position"]) == {"t1", "last"}
    n = table.groupby(["lens", "position", "entity"])["n"].sum()
    assert (n == len(queries)).all()
    frame = run_lens(organism, queries, positions=("last",), sites=("resid_post",), progress=False)
    e3 = earliest_decoding(frame).query("entity == 'e3' and correct")
    # a correct query's last layer reads e3 top-1 by definition of "correct"
    assert int(e3["decoded"].sum()) == int(e3["n"].sum())
