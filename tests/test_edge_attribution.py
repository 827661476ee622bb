"""Edge AtP: the split-input flag is harmless and restored, edge AtP is the first-order exact edge effect, incoming
edges of a head side sum to its whole-input AtP, and the cost is 2 forwards + 1 backward. EAP-IG: one step is edge
AtP, and with many steps the embeddings' edges sum to the whole metric change (integrated gradients' completeness)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from _passes import independent_pass_count

from mhop_lens import hooks
from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import aligned_pairs
from mhop_lens.analyses.edge_attribution import (
    ALL_SIDES,
    EDGE_KEYS,
    aggregate_edges,
    attribute_edges,
    exact_edge_patching,
    split_input,
    split_qkv_inputs,
)
from mhop_lens.forward import run
from mhop_lens.tokens import encode

CLEAN = ["The spouse of the performer of Imagine is", "The author of Hamlet is", "The capital of Japan is"]
CORRUPT = ["The spouse of the performer of Hamlet is", "The author of Imagine is", "The capital of Paris is"]
ALPHA = 1e-3


def _pairs(model):
    keep = aligned_pairs(model, CLEAN, CORRUPT)
    assert len(keep) >= 2
    clean, corrupt = [CLEAN[i] for i in keep], [CORRUPT[i] for i in keep]
    return clean, corrupt, metrics.clean_vs_corrupt_answer(model, [" Yoko"] * len(clean), [" Paris"] * len(clean))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_split_flag_keeps_logits_and_is_restored_after_an_exception(tiny_models, arch):
    model = tiny_models[arch]
    enc = encode(model, CLEAN)
    before = run(model, enc)
    shapes = {}

    def grab(act, hook):
        shapes[hook.name] = tuple(act.shape)
        return act

    names = [split_input(1, s) for s in ("q", "k", "v")]
    with pytest.raises(RuntimeError, match="boom"), split_qkv_inputs(model):
        assert model.cfg.use_split_qkv_input
        split = run(model, enc, [(n, grab) for n in names])
        raise RuntimeError("boom")
    assert not model.cfg.use_split_qkv_input
    assert all(not getattr(b.attn.config, "use_split_qkv_input", False) for b in model.blocks)
    assert torch.allclose(split, before, atol=1e-5)
    assert (run(model, enc) - before).abs().max() == 0
    b, p = enc.tokens.shape
    kv = hooks.n_kv_heads(model)
    assert [shapes[n] for n in names] == [(b, p, model.cfg.n_heads, model.cfg.d_model), (b, p, kv, model.cfg.d_model),
                                          (b, p, kv, model.cfg.d_model)]
    assert kv < model.cfg.n_heads if arch == "llama" else kv == model.cfg.n_heads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edge_atp_is_the_first_order_exact_edge_effect(tiny_models, arch):
    model = tiny_models[arch]
    clean, corrupt, metric = _pairs(model)
    atp = attribute_edges(model, clean, corrupt, metric)
    lin = exact_edge_patching(model, clean, corrupt, metric, atp, alpha=ALPHA)
    m = atp.merge(lin, on=["pair"] + EDGE_KEYS)
    assert len(m) == len(atp) == len(lin)
    assert set(m["side"]) == {"q", "k", "v", "out"} and set(m["up_kind"]) == {"embed", "head", "mlp"}
    assert (m["up_layer"] < m["down_layer"]).all()
    scale = m["atp"].abs().max()
    assert scale > 0
    assert (m["atp"] - m["exact"] / ALPHA).abs().max() < 0.02 * scale
    if arch == "llama":   # GQA: k/v edges end at the 2 kv heads, q edges at the 4 query heads
        kv = m[m["side"].isin(["k", "v"])]
        assert kv["down"].str.contains("KV").all() and kv["down_head"].max() == hooks.n_kv_heads(model) - 1
        assert m.loc[m["side"] == "q", "down_head"].max() == model.cfg.n_heads - 1


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_mlp_input_edges_are_first_order_exact(tiny_models, arch):
    """MLP-input edges (hook_mlp_in; same-layer heads feed the MLP except in parallel blocks, neox)."""
    model = tiny_models[arch]
    clean, corrupt, metric = _pairs(model)
    atp = attribute_edges(model, clean, corrupt, metric, sides=("mlp",), output=False)
    same_layer = atp[(atp["up_kind"] == "head") & (atp["up_layer"] == atp["down_layer"])]
    assert len(same_layer) > 0 if arch == "gpt2" else len(same_layer) == 0
    lin = exact_edge_patching(model, clean, corrupt, metric, atp, alpha=ALPHA)
    m = atp.merge(lin, on=["pair"] + EDGE_KEYS)
    assert len(m) == len(atp) and set(m["down"]) == {"L0 mlp", "L1 mlp"}
    scale = m["atp"].abs().max()
    assert scale > 0 and (m["atp"] - m["exact"] / ALPHA).abs().max() < 0.02 * scale


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_eap_ig_one_step_is_edge_atp_and_many_steps_are_complete(tiny_models, arch):
    """ig_steps=1 interpolates at alpha = 0 only: the corrupted run, so the scores and the passes are AtP's. Over
    the complete graph the embeddings' edges carry every path from the input, so their EAP-IG sum tends to
    metric(clean) - metric(corrupted) as the steps grow (left Riemann sum: error ~ 1/steps); AtP's does not."""
    model = tiny_models[arch]
    clean, corrupt, metric = _pairs(model)
    atp = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES)
    one = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, ig_steps=1)
    assert np.array_equal(one["eap_ig"].to_numpy(), atp["atp"].to_numpy())
    assert one.attrs["forwards_per_batch"] == 2 and one.attrs["backwards_per_batch"] == 1
    many = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, ig_steps=64, max_rows=64)
    chunks = -(-64 // (64 // len(clean)))   # steps run as copies, 64 rows per forward
    assert many.attrs["forwards_per_batch"] == 1 + chunks and many.attrs["backwards_per_batch"] == chunks
    gap = (many.groupby("pair")["metric_clean"].first() - many.groupby("pair")["metric_corrupt"].first()).to_numpy()
    err_ig = np.abs(many[many["up_kind"] == "embed"].groupby("pair")["eap_ig"].sum().to_numpy() - gap)
    err_atp = np.abs(atp[atp["up_kind"] == "embed"].groupby("pair")["atp"].sum().to_numpy() - gap)
    assert err_ig.max() < 0.05 * np.abs(gap).max() and err_ig.sum() < 0.5 * err_atp.sum()


def test_incoming_edges_sum_to_the_whole_side_input(tiny_models):
    """embed + every earlier head + every earlier MLP = resid_pre - biases, so their edges into one head side sum to
    the first-order effect of patching that side's whole clean input (measured here with a hand-written hook)."""
    model = tiny_models["llama"]
    clean, corrupt, metric = _pairs(model)
    atp = attribute_edges(model, clean, corrupt, metric, sides=("q", "k"), output=False)
    incoming = atp[atp["down_layer"] == 1].groupby(["side", "down_head", "pair"])["atp"].sum()
    side, head = incoming.abs().groupby(["side", "down_head"]).sum().idxmax()   # the strongest side input
    summed = incoming.loc[(side, head)]
    enc_c, enc_x = encode(model, clean), encode(model, corrupt)
    name = hooks.resid(1, "pre")
    delta = model.run_with_cache(enc_c.tokens, attention_mask=enc_c.attention_mask, names_filter=[name])[1][name] - \
        model.run_with_cache(enc_x.tokens, attention_mask=enc_x.attention_mask, names_filter=[name])[1][name]

    def nudge(act, hook):
        act = act.clone()
        act[:, :, head] += 1e-2 * delta
        return act

    rows, last = torch.arange(len(clean)), enc_x.last
    with split_qkv_inputs(model):
        base = metric(run(model, enc_x)[rows, last], rows)
        moved = metric(run(model, enc_x, [(split_input(1, side), nudge)])[rows, last], rows)
    expected = ((moved - base) / 1e-2).detach().numpy()
    assert np.abs(expected).max() > 0
    assert np.allclose(summed.to_numpy(), expected, atol=0.02 * np.abs(expected).max())


def test_two_forwards_one_backward_counted_by_independent_hooks(tiny_models):
    model = tiny_models["llama"]
    clean, corrupt, metric = _pairs(model)
    with independent_pass_count(model) as counts:
        frame = attribute_edges(model, clean, corrupt, metric, batch_size=len(clean))
    assert counts == {"fwd": 2, "bwd": 1}
    assert frame.attrs["forwards_per_batch"] == 2 and frame.attrs["backwards_per_batch"] == 1
    assert all(p.grad is None for p in model.parameters())
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


def test_role_span_edges_split_the_position_sum(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt, metric = _pairs(model)
    spans = [{"subject": [(c.index(" of ") + 4, len(c) - 3)], "END": [(len(c) - 2, len(c))]} for c in clean]
    per = attribute_edges(model, clean, corrupt, metric, per_position=spans)
    assert set(per["span"]) == {"END", "subject", "other"}
    total = attribute_edges(model, clean, corrupt, metric)
    summed = per.groupby(["pair"] + EDGE_KEYS, sort=False)["atp"].sum().reset_index()
    m = summed.merge(total, on=["pair"] + EDGE_KEYS, suffixes=("_span", ""))
    assert len(m) == len(total)
    assert np.allclose(m["atp_span"], m["atp"], atol=1e-6)
    assert per.loc[(per["up"] == "embed") & (per["span"] == "subject"), "atp"].abs().max() > 0


def test_exact_edge_patching_on_the_gar_organism():
    """On the trained GAR organism the split flag leaves the logits unchanged and edge AtP of its strongest edges
    still equals the exact edge effect to first order (the full-size effect can differ: docs/heads.md)."""
    from mhop_lens.analyses.heads import counter_pairs
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import load_model
    from mhop_lens.organism_gar.evaluate import eval_examples
    from mhop_lens.organism_gar.world import build_world

    try:
        model = load_model("organism-gar", device="cpu")
    except ModelLoadError as e:
        pytest.skip(f"organism-gar checkpoint not available: {e}")
    pairs = counter_pairs(model, [e for e in eval_examples(build_world(), 2) if e.kind == "cls"]).subset(range(6))
    metric = metrics.yes_no(model, len(pairs))
    enc = encode(model, pairs.clean)
    before = run(model, enc)
    with split_qkv_inputs(model):
        assert torch.allclose(run(model, enc), before, atol=1e-4)
    atp = attribute_edges(model, pairs.clean, pairs.corrupted, metric, batch_size=len(pairs))
    top = aggregate_edges(atp).head(24)
    lin = exact_edge_patching(model, pairs.clean, pairs.corrupted, metric, top, alpha=ALPHA)
    m = atp.merge(lin, on=["pair"] + EDGE_KEYS)
    assert len(m) == 24 * len(pairs)
    assert (m["atp"] - m["exact"] / ALPHA).abs().max() < 0.05 * m["atp"].abs().max()
    assert np.allclose(m["metric_corrupt_x"], m["metric_corrupt_y"], atol=1e-3)


def test_circuit_figure_draws_head_to_head_edges_by_size_and_sign(tiny_models):
    from mhop_lens.analyses.attribution import aggregate, attribute
    from mhop_lens.viz.heads import EDGE_COLORS, fig_circuit

    model = tiny_models["llama"]
    clean, corrupt, metric = _pairs(model)
    nodes = aggregate(attribute(model, clean, corrupt, metric, sites=("z",))).rename(columns={"mean": "score"})
    edges = attribute_edges(model, clean, corrupt, metric)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    plain = fig_circuit(nodes, k=n_heads)
    fig = fig_circuit(nodes, k=n_heads, edges=edges, max_edges=5)
    drawn = [t for t in fig.data if isinstance(t.hovertext, str) and "edge = " in t.hovertext]
    assert len(plain.data) + len(drawn) + 1 <= len(fig.data) <= len(plain.data) + len(drawn) + 2
    assert len(drawn) == 5
    table = aggregate_edges(edges)
    table = table[(table["up_kind"] == "head") & (table["side"] != "out")]
    values = [float(t.hovertext.rsplit("= ", 1)[1]) for t in drawn]
    assert abs(values[0]) == pytest.approx(table["mean"].abs().max(), rel=1e-3)
    widths = [t.line.width for t in drawn]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]
    assert all(t.line.color == EDGE_COLORS[1 if v >= 0 else -1] for t, v in zip(drawn, values, strict=True))


def test_eap_ig_moves_the_strong_edges_toward_exact_path_patching_on_the_gar_organism():
    """Plain edge AtP misses the saturated embed -> L0H1.v edge (exact +6.5, AtP +1.1 on these pairs); EAP-IG with
    10 steps recovers it and correlates better with exact path patching over the edges either method nominates.
    (Over all 479 edges the signed Spearman does not improve: measured in docs/patterns/find-a-faithful-circuit.md.)"""
    from scipy.stats import pearsonr

    from mhop_lens.analyses.heads import counter_pairs
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import load_model
    from mhop_lens.organism_gar.evaluate import eval_examples
    from mhop_lens.organism_gar.world import build_world

    try:
        model = load_model("organism-gar", device="cpu")
    except ModelLoadError as e:
        pytest.skip(f"organism-gar checkpoint not available: {e}")
    pairs = counter_pairs(model, [e for e in eval_examples(build_world(), 2) if e.kind == "cls"]).subset(range(8))
    metric = metrics.yes_no(model, len(pairs))
    atp = aggregate_edges(attribute_edges(model, pairs.clean, pairs.corrupted, metric, sides=ALL_SIDES))
    ig = aggregate_edges(attribute_edges(model, pairs.clean, pairs.corrupted, metric, sides=ALL_SIDES, ig_steps=10))
    nominated = pd.concat([atp.head(30), ig.head(30)])[EDGE_KEYS].drop_duplicates()
    exact = aggregate_edges(exact_edge_patching(model, pairs.clean, pairs.corrupted, metric, nominated), "exact")
    m = exact.merge(atp, on=EDGE_KEYS, suffixes=("_exact", "")).merge(ig, on=EDGE_KEYS, suffixes=("_atp", "_ig"))
    assert len(m) == len(nominated)
    r_atp, r_ig = (pearsonr(m[f"mean_{c}"], m["mean_exact"]).statistic for c in ("atp", "ig"))
    assert r_ig > r_atp + 0.05
    top = m.loc[m["mean_exact"].abs().idxmax()]
    assert (top["up"], top["down"], top["side"]) == ("embed", "L0H1", "v")
    assert abs(top["mean_ig"] - top["mean_exact"]) < 0.5 * abs(top["mean_exact"]) < abs(top["mean_atp"] -
                                                                                           top["mean_exact"])
