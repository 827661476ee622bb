"""True/False-head scoring, controls and consistency; head interventions during evaluation; the CLI verbs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mhop_lens.analyses import head_interventions as hi
from mhop_lens.analyses import heads as hd
from mhop_lens.gar import generate


@pytest.fixture(scope="module")
def gar_dir(tmp_path_factory, cls_examples):
    """A tiny GPT-2 with a word-level vocabulary covering the GAR words (so counter-pairs align)."""
    from mhop_lens.tiny_models import make_tokenizer, save_tiny_model

    cli_data = generate(["things"], forms=["cls", "gen"], n_r=(0,), n_per_task=4, n_demos=0)  # as the CLI test
    texts = [t for ex in [*cls_examples, *cli_data] for t in [ex.prompt, *ex.candidates]
             + [a for sq in ex.subquestions for a in [sq["prompt"], *sq["answers"]]]]
    words = sorted({w for t in texts for w in t.split()})
    return save_tiny_model(tmp_path_factory.mktemp("heads_tiny"), "gpt2", n_ctx=256, d_model=32, seed=5,
                           tokenizer=make_tokenizer("word", words=words))


@pytest.fixture(scope="module")
def gar_model(gar_dir):
    from mhop_lens.models import load_model

    return load_model(gar_dir, device="cpu")


@pytest.fixture(scope="module")
def cls_examples():
    return generate(["things"], forms=["cls"], n_r=(0,), n_per_task=8, n_demos=0, seed=2)


def test_counter_pairs_put_true_rows_first(gar_model, cls_examples):
    pairs = hd.counter_pairs(gar_model, cls_examples)
    assert len(pairs) == 8 and pairs.dropped == 0
    by_id = {ex.id: ex for ex in cls_examples}
    for pid, clean, corrupt in zip(pairs.pair_ids, pairs.clean, pairs.corrupted, strict=True):
        assert by_id[f"{pid}/yes"].prompt == clean and by_id[f"{pid}/no"].prompt == corrupt


def test_cohens_d_and_held_out_separation():
    assert hd.cohens_d(np.array([1.0, 2, 3]), np.array([1.0, 2, 3])) == 0
    assert hd.cohens_d(np.array([2.0, 3, 4]), np.array([1.0, 2, 3])) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    shift = torch.zeros(16)
    shift[3] = 3.0
    assert abs(hd._held_out_d(*noise)) < 0.8
    assert hd._held_out_d(noise[0] + shift, noise[1]) > 2


def _synthetic_scores(seed: int, n_layers: int = 3, n_heads: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.normal(0, 0.1, n_layers * n_heads)
    score[5], score[9] = 3.0, -2.0
    return pd.DataFrame({"layer": np.repeat(range(n_layers), n_heads), "head": np.tile(range(n_heads), n_layers),
                         "score": score})


def test_select_types_and_random_control():
    scores = _synthetic_scores(0)
    top = hd.select(scores, 2)
    assert list(zip(top["layer"], top["head"], top["type"], strict=True)) == [(1, 1, "true"), (2, 1, "false")]
    ctl = hd.control(scores, 2, n_random=500)
    assert ctl["top_mean_abs"] == pytest.approx(2.5) and ctl["ratio"] > 2 and ctl["p_random_ge_top"] < 0.05


def test_consistency_across_groups():
    frames = {"a": _synthetic_scores(0), "b": _synthetic_scores(1)}
    out = hd.consistency(frames, k=2).iloc[0]
    assert out["top_k_overlap"] == 2 and out["random_overlap"] == pytest.approx(4 / 12) and out["spearman"] > 0


def test_head_scores_on_a_tiny_model(gar_model, cls_examples):
    scores, top = hd.find_heads(gar_model, cls_examples, k=3, group_by="relation_set")
    pooled = scores[scores["group"] == "all"]
    assert len(pooled) == gar_model.cfg.n_layers * gar_model.cfg.n_heads
    assert {"atp", "exact", "act_d", "attn_d_A", "attn_d_V"} <= set(scores.columns)
    assert np.allclose(pooled["score"], pooled["exact"]) and len(top) == 3
    assert np.corrcoef(pooled["atp"], pooled["exact"])[0, 1] > 0.8  # near-linear random model
    assert set(scores["group"]) == {"all", "things"}


def test_interventions_before_equals_plain_evaluation_and_controls_differ(gar_model, cls_examples):
    from mhop_lens.gar.evaluate import score

    exs = cls_examples[:8]
    frame = hi.intervene(gar_model, exs, [(1, 0), (0, 2)], kind="zero", n_random=2, seed=1)
    plain = score(gar_model, exs).groupby("task")["correct"].mean()
    before = frame[frame["condition"] == "before"].set_index("task")["accuracy"]
    assert np.allclose(before.loc[plain.index], plain)
    randoms = frame[frame["condition"] == "random"]["heads"].unique()
    assert len(randoms) == 2 and all("L1H0" not in h and "L0H2" not in h for h in randoms)
    summary = hi.summarize(frame)
    assert list(summary["condition"]) == ["before", "target", "random"]


def test_each_intervention_kind_changes_the_logits(gar_model, cls_examples):
    from mhop_lens.gar.evaluate import score

    exs = cls_examples[:4]
    base = score(gar_model, exs)["answer_logprob"].to_numpy()
    means = hi.mean_z(gar_model, [ex.prompt for ex in exs])
    for kind, kw in [("zero", {}), ("scale", {"factor": 3.0}), ("mean", {"means": means}),
                     ("attend", {"attend_role": "V"})]:
        hooks_ = hi.head_hooks(gar_model, [(1, 1), (1, 2)], kind, **kw)
        out = score(gar_model, exs, hooks=hooks_)["answer_logprob"].to_numpy()
        assert not np.allclose(out, base, atol=1e-6), kind
    assert np.allclose(score(gar_model, exs)["answer_logprob"].to_numpy(), base)


def test_cli_generate_evaluate_find_intervene(tmp_path, gar_dir):
    from mhop_lens.cli import main
    from mhop_lens.cli.heads import parse_heads

    model_dir = gar_dir
    runner = CliRunner()
    data = tmp_path / "data"
    calls = [["gar", "generate", "--out", str(data), "--relation-sets", "things", "--forms", "cls,gen", "--n-r", "0",
              "--n-per-task", "4", "--n-demos", "0"],
             ["gar", "evaluate", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ev")],
             ["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "at"),
              "--sites", "z", "--exact", "--edges"],
             ["attribute", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "as"),
              "--sites", "z", "--method", "atp-star", "--exact"],
             ["heads", "find", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "hf"),
              "--k", "2", "--group-by", "none"],
             ["heads", "intervene", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "hi"),
              "--heads", str(tmp_path / "hf"), "--n-random", "1", "--limit", "8"]]
    for args in calls:
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (args[:2], result.output)
    for table in ("ev/scores", "ev/accuracy", "ev/gap", "at/attribution", "at/exact", "at/edge_scores",
                  "hf/head_scores", "hi/interventions", "hi/summary"):
        assert len(pd.read_parquet(tmp_path / f"{table}.parquet"))
    assert len(parse_heads(str(tmp_path / "hf"))) == 2 and parse_heads("L1H2,0.3") == [(1, 2), (0, 3)]


def _hand_built_truth_model(tmp_path):
    """A 1-layer, 2-head Llama with weights set by hand: prompts "<bos> T ?" (true) and "<bos> F ?" (false).

    Attention is uniform (W_Q = W_K = 0). Head 0's value reads the T-indicator and its output writes along W_U[Yes];
    head 1's value reads the F-indicator and writes along W_U[No]. The MLP is zero.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from mhop_lens.models import load_model
    from mhop_lens.tiny_models import make_tokenizer

    tok = make_tokenizer("word", words=["T", "F", "?", "Yes", "No"])
    vocab = tok.get_vocab()
    d = 8
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=4, max_position_embeddings=16,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm,
                     model.model.norm):
            norm.weight.fill_(1.0)
        emb = model.model.embed_tokens.weight
        emb[:, 7] = 1.0  # a constant dimension keeps every norm finite
        emb[vocab["T"], 0] = 3.0
        emb[vocab["F"], 1] = 3.0
        attn = model.model.layers[0].self_attn
        attn.v_proj.weight[0, 0] = 1.0  # head 0 (rows 0..3) reads T
        attn.v_proj.weight[4, 1] = 1.0  # head 1 (rows 4..7) reads F
        attn.o_proj.weight[5, 0] = 4.0  # head 0 writes dim 5 (Yes)
        attn.o_proj.weight[6, 4] = 4.0  # head 1 writes dim 6 (No)
        model.lm_head.weight[vocab["Yes"], 5] = 1.0
        model.lm_head.weight[vocab["No"], 6] = 1.0
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_model(str(tmp_path), device="cpu")


def test_hand_built_true_and_false_heads_are_typed(tmp_path):
    model = _hand_built_truth_model(tmp_path)
    n = 12
    pairs = hd.PairSet(["T ?"] * n, ["F ?"] * n, [str(i) for i in range(n)], ["toy"] * n, [{}] * n)
    # the model says Yes on the true statement and No on the false one
    from mhop_lens.analyses import metrics
    from mhop_lens.forward import last_logits
    from mhop_lens.tokens import encode

    metric = metrics.yes_no(model, 2)
    m = metric(last_logits(model, encode(model, ["T ?", "F ?"])), torch.arange(2))
    assert m[0] > 0 > m[1]
    prof = hd.classify(hd.head_profiles(model, pairs, batch_size=8))
    by_head = prof.set_index("head")
    assert by_head.at[0, "direct_true"] > 0.5 and abs(by_head.at[0, "direct_false"]) < 1e-6
    assert by_head.at[1, "direct_false"] < -0.5 and abs(by_head.at[1, "direct_true"]) < 1e-6
    assert (prof["probe_acc"] == 1.0).all()
    assert list(prof.sort_values("head")["head_class"]) == ["True", "False"]
    # swap the roles (true rows become the corrupted side): the classes swap
    swapped = hd.classify(hd.head_profiles(model, hd.PairSet(pairs.corrupted, pairs.clean, pairs.pair_ids,
                                                             pairs.tasks, pairs.spans), batch_size=8))
    assert list(swapped.sort_values("head")["head_class"]) == ["other", "other"]


def test_classify_rule_on_synthetic_profiles():
    prof = pd.DataFrame({"layer": 0, "head": range(6),
                         "direct_true": [2.0, 0.1, 1.5, 0.2, 3.0, 2.0],
                         "direct_false": [0.0, -2.0, -1.5, -0.1, 3.0, 0.0],
                         "probe_acc": [0.9, 0.9, 0.9, 0.9, 0.9, 0.6]})
    out = hd.classify(prof)
    assert list(out["head_class"]) == ["True", "False", "mixed", "other", "other", "other"]


def test_circuit_figure_colours_head_classes():
    from mhop_lens.viz.heads import CLASS_COLORS, fig_circuit

    scores = pd.DataFrame({"layer": [0, 1, 1, 2], "head": [0, 0, 1, 1], "score": [3.0, 2.0, -1.5, 1.0],
                           "head_class": ["other", "True", "False", "mixed"], "attn_d_A": [0.1, 1.2, -0.8, 0.0]})
    fig = fig_circuit(scores, k=4)
    nodes = {t.name: t.marker.color for t in fig.data if t.name and t.name.endswith("head (class)")}
    assert nodes == {f"{c} head (class)": CLASS_COLORS[c] for c in ("True", "False", "mixed", "other")}
