"""Circuit faithfulness: the full graph is the clean run and the empty circuit the corrupted run (so 1 and 0 hold
for the right reason), cutting every outgoing edge of a head is that head's ablation (edge and head machinery agree),
mean ablation feeds every pair the same input, the random-circuit null is drawn, and on the GAR organism the
EAP-IG circuit beats random circuits of its size."""

from __future__ import annotations

import numpy as np
import pytest

from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import aligned_pairs
from mhop_lens.analyses.edge_attribution import ALL_SIDES, attribute_edges
from mhop_lens.analyses.faithfulness import (
    edge_circuit_metrics,
    faithfulness_curve,
    faithfulness_summary,
    graph_edges,
    head_circuit_metrics,
    smallest_faithful,
)
from mhop_lens.errors import MhopLensError

CLEAN = ["The spouse of the performer of Imagine is", "The author of Hamlet is", "The capital of Japan is"]
CORRUPT = ["The spouse of the performer of Hamlet is", "The author of Imagine is", "The capital of Paris is"]


def _pairs(model):
    keep = aligned_pairs(model, CLEAN, CORRUPT)
    clean, corrupt = [CLEAN[i] for i in keep], [CORRUPT[i] for i in keep]
    return clean, corrupt, metrics.clean_vs_corrupt_answer(model, [" Yoko"] * len(clean), [" Paris"] * len(clean))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_full_graph_is_the_clean_run_and_empty_circuit_the_corrupted_run(tiny_models, arch):
    model = tiny_models[arch]
    clean, corrupt, metric = _pairs(model)
    edges = graph_edges(model)
    scored = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES)
    assert len(edges) == len(set(edges)) == scored.groupby(["up", "down", "side"]).ngroups
    m, info = edge_circuit_metrics(model, clean, corrupt, metric, [edges, []], max_rows=len(clean))
    per_pair = scored.groupby("pair")[["metric_clean", "metric_corrupt"]].first()
    assert np.allclose(m[0], per_pair["metric_clean"], atol=1e-5)
    assert np.allclose(m[1], per_pair["metric_corrupt"], atol=1e-5)
    assert np.abs(m[0] - m[1]).max() > 1e-3          # the two runs differ, so the checks above can fail
    assert info["forwards"] == 2 * 2                 # per circuit group: corrupted run + circuit run
    curve = faithfulness_curve(model, clean, corrupt, metric, scored, sizes=[0, len(edges)], n_random=3)
    top = curve[curve["kind"] == "top"].set_index("n")["faithfulness"]
    assert top[0] == pytest.approx(0.0, abs=1e-9) and top[len(edges)] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cutting_every_outgoing_edge_of_a_head_is_ablating_the_head(tiny_models, arch):
    """Two independent code paths: edge circuits (reader inputs rebuilt) and head circuits (z replaced)."""
    model = tiny_models[arch]
    clean, corrupt, metric = _pairs(model)
    edges = graph_edges(model)
    all_heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    for ablation in ("counter", "mean"):
        for layer, head in [(0, 1), (1, 2)]:
            cut = [e for e in edges if not (e.up_kind == "head" and (e.up_layer, e.up_head) == (layer, head))]
            by_edges, _ = edge_circuit_metrics(model, clean, corrupt, metric, [cut], ablation=ablation)
            by_heads, _ = head_circuit_metrics(model, clean, corrupt, metric,
                                               [[x for x in all_heads if x != (layer, head)]], ablation=ablation)
            assert np.allclose(by_edges, by_heads, atol=1e-5)


def test_mean_ablation_gives_every_pair_the_same_empty_circuit(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt, metric = _pairs(model)
    m, _ = edge_circuit_metrics(model, clean, corrupt, metric, [graph_edges(model), []], ablation="mean")
    heads, _ = head_circuit_metrics(model, clean, corrupt, metric, [[]], ablation="mean")
    counter, _ = head_circuit_metrics(model, clean, corrupt, metric, [[]])
    assert np.ptp(m[1]) < 1e-5 and np.ptp(m[0]) > 1e-3       # same answer logits whatever the prompt
    assert np.abs(heads - counter).max() > 1e-4                # mean and counter ablation differ


def test_random_null_is_drawn_and_summarised(tiny_models):
    model = tiny_models["llama"]
    clean, corrupt, metric = _pairs(model)
    scored = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, ig_steps=4)
    curve = faithfulness_curve(model, clean, corrupt, metric, scored, sizes=[2, 10, 30], n_random=7, seed=3)
    assert (curve.groupby(["kind", "n"]).size().loc["random"] == 7).all()
    again = faithfulness_curve(model, clean, corrupt, metric, scored, sizes=[2, 10, 30], n_random=7, seed=3)
    assert np.array_equal(curve["faithfulness"], again["faithfulness"])
    summary = faithfulness_summary(curve)
    assert list(summary["n"]) == [2, 10, 30]
    assert ((summary["p_random"] > 0) & (summary["p_random"] <= 1)).all()
    assert np.isfinite(summary["random_sd"]).all()
    assert smallest_faithful(curve, 2.0) is None or smallest_faithful(curve, 2.0) in (2, 10, 30)


def test_bad_inputs_raise_one_clear_error(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt, metric = _pairs(model)
    with pytest.raises(MhopLensError, match="ablation"):
        edge_circuit_metrics(model, clean, corrupt, metric, [[]], ablation="zero")
    with pytest.raises(MhopLensError, match="complete graph"):
        edge_circuit_metrics(model, clean, corrupt, metric, [[("head", 1, 0, 0, 0, "q")]])
    with pytest.raises(MhopLensError, match="no head"):
        head_circuit_metrics(model, clean, corrupt, metric, [[(5, 0)]])


def test_eap_ig_circuit_on_the_gar_organism_beats_random_circuits():
    """The 160 strongest EAP-IG edges (of 479) of the GAR organism recover most of logit(Yes) - logit(No) under
    counter-pair ablation; no random 160-edge circuit comes close (the null can fail: AtP-ranked heads do no better
    than random heads on this organism)."""
    from mhop_lens.analyses.heads import counter_pairs
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import load_model
    from mhop_lens.organism_gar.evaluate import eval_examples
    from mhop_lens.organism_gar.world import build_world

    try:
        model = load_model("organism-gar", device="cpu")
    except ModelLoadError as e:
        pytest.skip(f"organism-gar checkpoint not available: {e}")
    pairs = counter_pairs(model, [e for e in eval_examples(build_world(), 4) if e.kind == "cls"]).subset(range(16))
    metric = metrics.yes_no(model, len(pairs))
    scored = attribute_edges(model, pairs.clean, pairs.corrupted, metric, sides=ALL_SIDES, ig_steps=5)
    curve = faithfulness_curve(model, pairs.clean, pairs.corrupted, metric, scored, sizes=[160], n_random=30)
    s = faithfulness_summary(curve).iloc[0]
    assert s["top"] > 0.6 and s["top"] > s["random_p95"] + 0.3 and s["p_random"] < 0.05


def test_circuit_figure_draws_the_circuit_at_the_chosen_faithfulness_and_only_spans_with_edges(tiny_models):
    from mhop_lens.analyses.attribution import aggregate, attribute
    from mhop_lens.viz.heads import fig_circuit

    model = tiny_models["gpt2"]
    clean, corrupt, metric = _pairs(model)
    nodes = aggregate(attribute(model, clean, corrupt, metric, sites=("z",))).rename(columns={"mean": "score"})
    plain = fig_circuit(nodes, k=8)
    assert not [t for t in plain.data if t.name == "input span"]          # no span edges -> no spans drawn
    spans = [{"subject": [(c.index(" of ") + 4, len(c) - 3)], "END": [(len(c) - 2, len(c))]} for c in clean]
    edges = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, per_position=spans)
    curve = faithfulness_curve(model, clean, corrupt, metric, edges, n_random=2)
    fig = fig_circuit(nodes, k=8, edges=edges, curve=curve, target=0.5)
    n = smallest_faithful(curve, 0.5)
    assert f"top {n} edges" in fig.layout.title.text
    drawn = [t for t in fig.data if isinstance(t.hovertext, str) and "edge = " in t.hovertext]
    from_heads = [t for t in drawn if t.hovertext.startswith("L")]
    into = {t.hovertext.split(" -> ")[1].split(":")[0] for t in drawn if not t.hovertext.startswith("L")}
    assert 0 < len(from_heads) + len(into) <= n        # circuit edges only (a span edge is a part of one)
    span_traces = [t for t in fig.data if t.name == "input span"]
    if span_traces:
        shown = set(span_traces[0].text)
        with_edges = {t.hovertext.split(" -> ")[0] for t in drawn}
        assert shown <= with_edges and "other" not in shown


def test_attribute_command_writes_eap_ig_edges_and_faithfulness(organism, tmp_path):
    import pandas as pd
    from click.testing import CliRunner

    from mhop_lens.cli import main

    out = tmp_path / "run"
    args = ["attribute", "--model", "organism", "--data", "organism", "--limit", "8", "--sites", "z", "--edges",
            "--edge-method", "eap-ig", "--edge-steps", "2", "--faithfulness", "--random-circuits", "3", "--out",
            str(out), "--device", "cpu"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    edges = pd.read_parquet(out / "edges.parquet")
    assert "eap_ig" in edges.columns and "mlp" in set(edges["side"])
    summary = pd.read_parquet(out / "faithfulness_summary.parquet")
    assert set(summary["level"]) == {"heads", "edges"}
    curve = pd.read_parquet(out / "faithfulness.parquet")
    full = curve[curve["kind"] == "full"]
    assert np.allclose(full["faithfulness"], 1.0) and "faithfulness of the top-n edges" in result.output
    bad = CliRunner().invoke(main, args[:-4] + ["--edge-steps", "0", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--edge-steps must be >= 1" in bad.output
