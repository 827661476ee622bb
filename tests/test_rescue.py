"""Rescue: the patches it applies are back-patching's, a no-op patch changes nothing, the statistics are right."""

import numpy as np
import pandas as pd
import pytest
import torch

from mhop_lens.analyses import rescue as R
from mhop_lens.analyses.backpatch import run_backpatch
from mhop_lens.data import organism_queries


@pytest.fixture(scope="module")
def feats(organism):
    qs = list({(q.e1, q.r1): q for q in organism_queries(None, "heldout")}.values())[:48]
    return R.collect(organism, qs, ("last", "t1"))


def test_own_activation_and_zero_map_change_nothing(organism, feats):
    for position in ("last", "t1"):
        p = feats.positions.index(position)
        for t in (0, 2):
            same = R.patched_correct(organism, feats, t, position, feats.resid[:, t, p])
            assert torch.equal(same, feats.correct)
    d = feats.resid.shape[-1]
    zero = R.AffineMap("last", 2, 1, torch.zeros(d, d), torch.zeros(d), 0)
    assert torch.equal(R.apply_map(organism, feats, zero), feats.correct)


def test_fixed_pair_is_back_patching(organism, feats):
    bp = run_backpatch(organism, feats.queries, ["last", "r1"], control=False, progress=False, reference=True)
    bp["position"] = bp["position"].replace({"r1": "t1"})  # the organism's t1 is r1
    got = R.pair_outcomes(organism, feats, [("last", 3, 0), ("t1", 2, 1)])
    for (position, s, t), correct in got.items():
        ref = bp[(bp["position"] == position) & (bp["s"] == s) & (bp["t"] == t)].set_index("qid")["correct"]
        assert ref.loc[[q.id for q in feats.queries]].to_numpy().tolist() == correct.tolist()
    assert bp.drop_duplicates("qid").set_index("qid")["clean_correct"].loc[
        [q.id for q in feats.queries]].tolist() == feats.correct.tolist()


def test_signals_need_no_answer(feats):
    assert {"entropy", "margin", "bridge_rank_l0"} <= set(feats.signals.columns)
    assert (feats.signals["entropy"] >= 0).all() and (feats.signals["margin"] >= 0).all()
    assert len(feats.signals) == len(feats.queries)


def test_statistics():
    before = np.array([1, 1, 0, 0, 0, 1], bool)
    after = np.array([1, 0, 1, 1, 0, 1], bool)
    o = R.outcome(before, after)
    assert (o["fixes"], o["breaks"]) == (2, 1) and o["net"] == pytest.approx(1 / 6)
    assert o["net_lo"] <= o["net"] <= o["net_hi"] and -1 <= o["net_lo"] and o["net_hi"] <= 1
    assert R.bootstrap_interval(np.zeros(50)) == (0.0, 0.0)
    delta = torch.randn(5, 8)
    assert torch.allclose(R.random_like(delta, 0).norm(dim=-1), delta.norm(dim=-1), atol=1e-5)
    x = np.linspace(0, 1, 100)
    gain_where_high = (x > 0.7).astype(int)
    g = R.select_gate(pd.DataFrame({"s": x, "noise": x[::-1] * 0 + 0.5}), np.zeros(100, bool),
                      gain_where_high.astype(bool), np.linspace(0.1, 0.9, 9))
    assert g["signal"] == "s" and g["direction"] == "above" and g["net"] == pytest.approx(0.3, abs=0.01)
    tr, te = R.split_indices(10, 0.5, 0)
    assert sorted(tr + te) == list(range(10)) and not set(tr) & set(te)


def test_run_rescue_table(organism, feats):
    table, details = R.run_rescue(organism, feats.queries, map_steps=4, map_candidates=1, progress=False)
    assert list(table["method"]) == ["fixed pair", "gated pair", "learned map", "oracle (answer known; not a fix)"]
    n = details["n_test"]
    for _, row in table.iloc[:3].iterrows():
        assert row["net"] == pytest.approx((row["fixes"] - row["breaks"]) / n)
        assert row["net_lo"] <= row["net"] + 1e-9 and row["net"] <= row["net_hi"] + 1e-9
        assert row["acc_after"] == pytest.approx(row["acc_before"] + row["net"])
    assert table["acc_before"].nunique() == 1
