"""Stage summary from the lens / patchscope / knockout tables, and the CLI verbs end to end."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner

from mhop_lens.analyses.stages import stage_summary, stage_table


def _lens(qid: str, correct: bool, e3_ranks: list[int], pred_ranks: list[int], attn_e3: list[int]) -> pd.DataFrame:
    n = len(e3_ranks)
    resid = pd.DataFrame({"qid": qid, "layer": range(n), "site": "resid_post", "position": "last", "e3_rank": e3_ranks,
                          "pred_rank": pred_ranks, "correct": correct})
    attn = resid.assign(site="attn_out", e3_rank=attn_e3)
    return pd.concat([resid, attn])


def _frames():
    lens = pd.concat([_lens("a", True, [5, 3, 0, 0], [4, 0, 0, 0], [9, 0, 9, 9]),
                      _lens("b", False, [9, 9, 9, 9], [2, 0, 1, 0], [9, 9, 9, 9])])
    ps = pd.DataFrame({"qid": ["a", "a", "a", "b"], "position": ["t1", "t2", "t2", "t1"],
                       "source_layer": [1, 2, 3, 2], "class": ["e2", "e3", "e3", "e2"]})
    ko = pd.DataFrame({"qid": ["a", "a", "a", "b"], "edge": ["last->r1", "last->r1", "last->e1", "last->r1"],
                       "centre": [0, 1, 1, 0], "e3_prob_change": [-0.2, -0.8, -0.9, -0.1],
                       "t1_key": [True, True, False, True]})
    return lens, ps, ko


def test_stage_summary_reads_each_stage():
    lens, ps, ko = _frames()
    s = stage_summary(lens, ps, ko).set_index("qid")
    a, b = s.loc["a"], s.loc["b"]
    assert a.subset == "correct" and b.subset == "incorrect" and "greedy" in a.correct_source
    assert (a.first_hop_layer, a.second_hop_layer, bool(a.first_before_second)) == (1, 2, True)
    assert a.propagation_layer == 1 and a.propagation_edge == "last->r1"  # the t1 edge, not the larger e1 drop
    assert pd.isna(b.propagation_layer) and b.propagation_drop == pytest.approx(-0.1)  # below --min-drop
    assert (a.attn_e3_layer, a.resid_e3_layer, a.extraction_layer) == (1, 2, 1)
    assert b.extraction_layer == 3 and pd.isna(b.second_hop_layer) and pd.isna(b.first_before_second)
    table = stage_table(s.reset_index()).set_index("subset")
    assert table.loc["correct", "share_first_before_second"] == 1.0
    assert table.loc["incorrect", "n_both_hops"] == 0


def test_stage_summary_uses_an_evaluation_frame():
    lens, ps, ko = _frames()
    ev = pd.DataFrame({"qid": ["a"], "subset": ["incorrect"]})
    s = stage_summary(lens, ps, None, ev).set_index("qid")
    assert s.loc["a", "subset"] == "incorrect" and s.loc["b", "subset"] == "other"
    assert s["propagation_layer"].isna().all()


def test_cli_verbs_end_to_end(tiny_dirs, tmp_path):
    from mhop_lens.cli import main
    from mhop_lens.data import FIXTURE_CSV

    runner = CliRunner()
    common = ["--model", tiny_dirs["gpt2"], "--data", str(FIXTURE_CSV), "--limit", "2", "--batch-size", "4"]
    verbs = {"lens": ["--positions", "last,t1"], "describe": ["--decoder", "lens"],
             "knockout": ["--centres", "0", "--window", "0"]}
    for verb, extra in verbs.items():
        result = runner.invoke(main, [verb, *common, "--out", str(tmp_path / verb), *extra])
        assert result.exit_code == 0, result.output
    again = runner.invoke(main, ["lens", *common, "--out", str(tmp_path / "lens"), "--positions", "last,t1"])
    assert again.exit_code != 0 and "--resume" in again.output
    resumed = runner.invoke(main, ["lens", *common, "--out", str(tmp_path / "lens"), "--positions", "last,t1",
                                   "--resume"])
    assert resumed.exit_code == 0, resumed.output
    lens = pd.read_parquet(tmp_path / "lens" / "lens.parquet")
    assert lens.qid.nunique() == 2 and not lens.duplicated(["qid", "position", "site", "layer"]).any()
    runs = [a for verb in verbs for a in ("--run", str(tmp_path / verb))]
    result = runner.invoke(main, ["stages", *runs, "--out", str(tmp_path / "stages")])
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "stages" / "stages.parquet")) == 2
    missing = runner.invoke(main, ["stages", "--run", str(tmp_path / "knockout"), "--out", str(tmp_path / "s2")])
    assert missing.exit_code == 1 and "needs a `lens` run" in missing.output
