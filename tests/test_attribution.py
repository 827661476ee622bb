"""AtP is zero without a perturbation, matches exact patching to first order, and costs 2 forwards + 1 backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _passes import independent_pass_count

from mhop_lens.analyses import metrics
from mhop_lens.analyses.atp_star import atp_star_batch
from mhop_lens.analyses.attribution import (
    aggregate,
    attribute,
    encode_pairs,
    exact_patching,
    forward_flops,
    rank_agreement,
    site_hooks,
)
from mhop_lens.errors import SpanError

CLEAN = ["The spouse of the performer of Imagine is", "The author of Hamlet is", "The capital of Japan is"]
CORRUPT = ["The spouse of the performer of Hamlet is", "The author of Imagine is", "The capital of Paris is"]


def _aligned(model):
    from mhop_lens.analyses.attribution import aligned_pairs

    keep = aligned_pairs(model, CLEAN, CORRUPT)
    assert len(keep) >= 2
    return [CLEAN[i] for i in keep], [CORRUPT[i] for i in keep]


def _metric(model, n):
    return metrics.clean_vs_corrupt_answer(model, [" Yoko"] * n, [" Paris"] * n)


def test_no_perturbation_gives_zero(tiny_model):
    frame = attribute(tiny_model, CLEAN, CLEAN, _metric(tiny_model, 3))
    assert set(frame["site"]) == {"z", "mlp_out", "resid_post"}
    assert len(frame) == 3 * tiny_model.cfg.n_layers * (tiny_model.cfg.n_heads + 2)
    assert frame["atp"].abs().max() == 0
    assert np.allclose(frame["metric_clean"], frame["metric_corrupt"])


def test_exact_patching_with_own_activation_changes_nothing(tiny_model):
    frame = exact_patching(tiny_model, CLEAN, CLEAN, _metric(tiny_model, 3), sites=("z", "mlp_out"))
    assert frame["exact"].abs().max() < 1e-5


def test_atp_is_the_first_order_term_of_exact_patching(tiny_models):
    """exact(alpha) / alpha -> AtP as alpha -> 0, for every head of a GPT-2 and a GQA Llama."""
    for arch in ("gpt2", "llama"):
        model = tiny_models[arch]
        clean, corrupt = _aligned(model)
        metric = _metric(model, len(clean))
        atp = attribute(model, clean, corrupt, metric, sites=("z", "mlp_out"))
        lin = exact_patching(model, clean, corrupt, metric, sites=("z", "mlp_out"), alpha=1e-3)
        m = atp.merge(lin, on=["pair", "site", "layer", "head"])
        scale = m["atp"].abs().max()
        assert scale > 0
        assert (m["atp"] - m["exact"] / 1e-3).abs().max() < 0.02 * scale, arch


def test_atp_ranks_heads_like_exact_patching_on_tiny_models(tiny_model):
    clean, corrupt = _aligned(tiny_model)
    metric = _metric(tiny_model, len(clean))
    atp = attribute(tiny_model, clean, corrupt, metric, sites=("z",))
    exact = exact_patching(tiny_model, clean, corrupt, metric, sites=("z",), max_rows=16)
    agreement = rank_agreement(atp, exact)
    assert agreement["spearman"] > 0.6 and agreement["spearman_abs"] > 0.6, agreement
    assert np.allclose(exact["metric_corrupt"], atp["metric_corrupt"], atol=1e-4)


def test_integrated_gradients_satisfy_completeness_on_the_residual(tiny_models):
    """One resid node per layer: IG over its straight path sums to the exact patching effect."""
    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    metric = _metric(model, len(clean))
    ig = attribute(model, clean, corrupt, metric, sites=("resid_post",), ig_steps=16)
    exact = exact_patching(model, clean, corrupt, metric, sites=("resid_post",))
    m = ig.merge(exact, on=["pair", "site", "layer", "head"])
    assert (m["atp_ig"] - m["exact"]).abs().max() < 0.02 * m["exact"].abs().max() + 1e-6


def test_two_forwards_one_backward_counted_by_independent_hooks(tiny_models):
    model = tiny_models["llama"]
    clean, corrupt = _aligned(model)
    with independent_pass_count(model) as counts:
        frame = attribute(model, clean, corrupt, _metric(model, len(clean)), batch_size=len(clean))
    assert counts == {"fwd": 2, "bwd": 1}
    assert frame.attrs["forwards_per_batch"] == 2 and frame.attrs["backwards_per_batch"] == 1
    assert all(p.grad is None for p in model.parameters())


def test_per_span_rows_sum_to_the_position_sum(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    spans = [{"subject": [(c.index(" of ") + 4, len(c) - 3)], "END": [(len(c) - 2, len(c))]} for c in clean]
    metric = _metric(model, len(clean))
    per = attribute(model, clean, corrupt, metric, sites=("z",), per_position=spans)
    assert set(per["span"]) == {"END", "subject", "other"}
    summed = per.groupby(["pair", "layer", "head"])["atp"].sum().to_numpy()
    total = attribute(model, clean, corrupt, metric, sites=("z",)).sort_values(["pair", "layer", "head"])["atp"]
    assert np.allclose(summed, total.to_numpy(), atol=1e-5)
    assert list(aggregate(per).columns[:4]) == ["site", "layer", "head", "span"]


def test_misaligned_pairs_raise_a_helpful_error(tiny_models):
    model = tiny_models["gpt2"]
    with pytest.raises(SpanError, match="token counts"):
        attribute(model, ["The author of Hamlet is"], ["The spouse of the performer of Imagine is"],
                  _metric(model, 1))


def test_hooks_do_not_leak(tiny_models):
    model = tiny_models["neox"]
    clean, corrupt = _aligned(model)
    tokens = torch.tensor([[0, 5, 6, 7]])
    before = model(tokens)
    attribute(model, clean, corrupt, _metric(model, len(clean)), sites=("z",), ig_steps=2)
    assert (model(tokens) - before).abs().max() == 0
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


def test_ig_recovers_exact_head_ranking_on_the_organism(organism):
    """On the trained two-hop organism plain AtP misranks heads (docs/heads.md); one IG midpoint per layer fixes it."""
    from mhop_lens.analyses.pairs import two_hop_pairs
    from mhop_lens.models import builtin_dir
    from mhop_lens.organism.world import World

    p = two_hop_pairs(World.load(builtin_dir("organism") / "world.json"), 24, seed=1)
    metric = metrics.clean_vs_corrupt_answer(organism, p.clean_answers, p.corrupt_answers)
    exact = exact_patching(organism, p.clean, p.corrupted, metric, batch_size=24)
    ig = attribute(organism, p.clean, p.corrupted, metric, sites=("z",), ig_steps=1, batch_size=24)
    assert exact["metric_clean"].mean() > 5 > -5 > exact["metric_corrupt"].mean()
    assert rank_agreement(ig, exact)["spearman"] > 0.8


@pytest.mark.parametrize("qk_fix", ["exact", "chained"])
def test_atp_star_passes_counted_by_independent_hooks(tiny_models, qk_fix):
    """AtP* (exact or chained recompute): 2 forwards + 1 full backward (seen by the test's own hooks), L-1 partial
    backwards (GradDrop) and L-1 recompute passes (block calls only, with each layer's own block arguments from the
    corrupted forward: no extra forward); without GradDrop no partial backward and no ``atp_star_gd`` column."""
    model = tiny_models["llama"]
    clean, corrupt = _aligned(model)
    with independent_pass_count(model) as counts:
        frame = attribute(model, clean, corrupt, _metric(model, len(clean)), sites=("z",), method="atp-star",
                          batch_size=len(clean), qk_fix=qk_fix)
    n_layers = model.cfg.n_layers
    assert "capture_forwards" not in frame.attrs
    assert counts == {"fwd": 2, "bwd": 1}
    assert frame.attrs["forwards_per_batch"] == 2 and frame.attrs["backwards_per_batch"] == 1
    assert frame.attrs["partial_backwards_per_batch"] == n_layers - 1
    assert frame.attrs["qk_passes_per_batch"] == n_layers - 1
    no_gd = attribute(model, clean, corrupt, _metric(model, len(clean)), sites=("z",), method="atp-star",
                      batch_size=len(clean), qk_fix=qk_fix, grad_drop=False)
    assert "atp_star_gd" not in no_gd and "partial_backwards" not in no_gd.attrs
    assert np.allclose(no_gd["atp_star"], frame["atp_star"], atol=1e-6)
    assert no_gd.attrs["forward_equivalents_per_batch"] < frame.attrs["forward_equivalents_per_batch"]
    exact = exact_patching(model, clean, corrupt, _metric(model, len(clean)), batch_size=len(clean))
    assert frame.attrs["forward_equivalents_per_batch"] < exact.attrs["forward_equivalents_per_batch"]
    assert all(p.grad is None for p in model.parameters())
    assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("qk_fix", ["chained", "exact", "frozen-norm"])
def test_atp_star_is_zero_without_perturbation_and_atp_in_the_last_layer(tiny_model, qk_fix):
    model = tiny_model
    clean, corrupt = _aligned(model)
    metric = _metric(model, len(clean))
    same = attribute(model, clean, clean, metric, sites=("z", "mlp_out"), method="atp-star", qk_fix=qk_fix)
    assert same[["atp_star", "atp_star_gd", "atp"]].abs().max().max() < 1e-6
    star = attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star", qk_fix=qk_fix)
    plain = attribute(model, clean, corrupt, metric, sites=("z",))
    last = star["layer"] == model.cfg.n_layers - 1
    assert np.allclose(star["atp"], plain["atp"], atol=1e-5)
    assert np.allclose(star.loc[last, "atp_star"], star.loc[last, "atp"], atol=1e-6)  # no later attention layer
    assert (star.loc[~last, "atp_star"] - star.loc[~last, "atp"]).abs().max() > 0  # the fix acts before it
    assert (star["atp_star_gd"] >= 0).all()


def test_atp_star_refuses_per_span_scores(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    with pytest.raises(SpanError, match="per-span"):
        attribute(model, clean, corrupt, _metric(model, len(clean)), per_position=[{}] * len(clean),
                  method="atp-star")


def test_resid_post_is_the_resid_site(tiny_models):
    """``resid``, the earlier name, is ``resid_post`` (TransformerLens's act name) with a deprecation warning."""
    from mhop_lens.analyses.metrics import clean_vs_corrupt_answer

    model = tiny_models["gpt2"]
    clean, corrupt = ["The author of Hamlet is"], ["The author of Seattle is"]
    if len(model.tokenizer(clean[0])["input_ids"]) != len(model.tokenizer(corrupt[0])["input_ids"]):
        pytest.skip("prompts do not align for this tokenizer")
    metric = clean_vs_corrupt_answer(model, [" William"], [" Bill"])
    with pytest.warns(DeprecationWarning, match="'resid' is deprecated; use 'resid_post'"):
        old = attribute(model, clean, corrupt, metric, sites=("resid",))
    new = attribute(model, clean, corrupt, metric, sites=("resid_post",))
    assert set(new["site"]) == set(old["site"]) == {"resid_post"}
    assert (old["atp"].to_numpy() == new["atp"].to_numpy()).all()


def test_atp_star_frozen_norm_passes_and_flops(tiny_models):
    """Frozen-norm AtP*: 2 forwards + 1 backward at the model's input / output (no block calls, no capture forward),
    L-1 partial backwards and L-1 fix passes. The claimed matmul FLOPs (``forward_equivalents`` x one forward) equal
    torch's own count of every matmul run (``FlopCounterMode``: forwards, activation-gradient backwards, fix
    passes), for both QK fixes, AtP and exact patching; the unit is torch's count of one forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from mhop_lens.forward import run

    def counted(fn, *args, **kw):
        with FlopCounterMode(display=False) as fc:
            frame = fn(*args, **kw)
        claimed = frame.attrs["forward_equivalents_per_batch"] * frame.attrs["flops_forward_unit"]
        return frame, fc.get_total_flops(), claimed

    for arch in ("gpt2", "llama", "neox"):
        model = tiny_models[arch]
        clean, corrupt = _aligned(model)
        metric = _metric(model, len(clean))
        enc, _ = encode_pairs(model, clean, corrupt)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            run(model, enc)
        assert fc.get_total_flops() == forward_flops(model, *enc.tokens.shape), arch
        args, kw = (model, clean, corrupt, metric), dict(sites=("z", "mlp_out"), batch_size=len(clean))
        with independent_pass_count(model) as counts:
            frame, measured, claimed = counted(attribute, *args, method="atp-star", qk_fix="frozen-norm", **kw)
        a = frame.attrs
        n_layers = model.cfg.n_layers
        assert a["qk_fix_used"] == "frozen-norm", (arch, a["qk_fix_used"])
        assert counts == {"fwd": 2, "bwd": 1}, arch
        assert a["partial_backwards_per_batch"] == n_layers - 1 and a["qk_passes_per_batch"] == n_layers - 1
        assert "capture_forwards" not in a
        assert a["flops_forward_unit"] == forward_flops(model, *enc.tokens.shape)
        assert measured == pytest.approx(claimed, rel=1e-9), (arch, measured, claimed)
        assert a["forward_equivalents_2x_backward_per_batch"] > a["forward_equivalents_per_batch"]
        for fn, extra in ((attribute, dict(method="atp-star", qk_fix="exact")),
                          (attribute, dict(method="atp-star", qk_fix="chained", grad_drop=False)), (attribute, {}),
                          (exact_patching, {})):
            other, measured, claimed = counted(fn, *args, **kw, **extra)
            assert measured == pytest.approx(claimed, rel=1e-9), (arch, other.attrs["method"], measured, claimed)
            if other.attrs["method"] == "exact":
                assert a["forward_equivalents_per_batch"] < other.attrs["forward_equivalents_per_batch"]
        assert all(p.grad is None for p in model.parameters())
        assert all(not hp._forward_hooks and not hp._backward_hooks for hp in model.hook_dict.values())


def _star(model, clean, corrupt, qk_fix, scale):
    enc_c, enc_k = encode_pairs(model, clean, corrupt)
    named = site_hooks(model, ("z", "mlp_out"))
    from mhop_lens.analyses.attribution import Counter

    (star, extra), _, _ = atp_star_batch(model, enc_c, enc_k, _metric(model, len(clean)),
                                         torch.arange(len(clean)), named, Counter(), 0, qk_fix=qk_fix,
                                          delta_scale=scale)
    cat = lambda d: torch.cat([d[k].flatten() for k in sorted(d)])  # noqa: E731
    return cat(star), cat(extra["atp"])


def test_atp_star_fixes_agree_to_first_order_with_small_writes(tiny_models):
    """Deltas scaled by alpha: both QK fixes replace a first-order term by its exact version, so AtP*/alpha -> AtP/alpha
    for both and frozen-norm - exact recompute shrinks like alpha^2 (the norm's scale is linear to first order)."""
    for arch in ("gpt2", "llama", "neox"):
        model = tiny_models[arch]
        clean, corrupt = _aligned(model)
        gaps = []
        for alpha in (1e-1, 1e-2):
            frozen, atp = _star(model, clean, corrupt, "frozen-norm", alpha)
            exact, _ = _star(model, clean, corrupt, "exact", alpha)
            scale = atp.abs().max()
            assert scale > 0
            assert (frozen - atp).abs().max() < 0.05 * scale and (exact - atp).abs().max() < 0.05 * scale, arch
            gaps.append(float((frozen - exact).abs().max() / scale))
        assert gaps[1] < 0.2 * gaps[0] + 1e-5, (arch, gaps)  # second order: 10x smaller alpha, ~10x smaller gap


def test_atp_star_frozen_norm_close_to_exact_recompute_on_real_pairs(tiny_models):
    """Full-size deltas on the fixtures' pairs: the frozen-norm AtP* stays within 20% of max |AtP| of the exact
    recompute's, and no further from it than 1.5x plain AtP is (on these random models the norm's scale change
    is most of the exact recompute's correction, which the frozen norm leaves first order)."""
    for arch in ("gpt2", "llama", "neox"):
        model = tiny_models[arch]
        clean, corrupt = _aligned(model)
        frozen, atp = _star(model, clean, corrupt, "frozen-norm", 1.0)
        exact, _ = _star(model, clean, corrupt, "exact", 1.0)
        gap = (frozen - exact).abs().max()
        assert gap < 0.2 * atp.abs().max(), arch
        assert gap <= 1.5 * (exact - atp).abs().max() + 1e-6, arch


def test_atp_star_frozen_norm_falls_back_where_unsupported(tiny_models, monkeypatch):
    from mhop_lens.analyses import atp_star

    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    monkeypatch.setattr(atp_star, "frozen_norm_support", lambda m: "ALiBi (test)")
    frame = attribute(model, clean, corrupt, _metric(model, len(clean)), sites=("z",), method="atp-star",
                      qk_fix="frozen-norm")
    assert frame.attrs["qk_fix_used"] == "exact (fallback: ALiBi (test))"
    monkeypatch.undo()

    def fail(*args, **kwargs):
        raise atp_star._Unsupported("layer 1: scores do not reproduce hook_z (test)")

    monkeypatch.setattr(atp_star, "_check_frozen_layer", fail)
    metric = _metric(model, len(clean))
    frame = attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star", batch_size=1,
                      qk_fix="frozen-norm")
    exact = attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star", qk_fix="exact", batch_size=1)
    assert frame.attrs["qk_fix_used"].startswith("exact (fallback: layer 1")
    assert np.allclose(frame["atp_star"], exact["atp_star"], atol=1e-6)
    assert frame.attrs["forwards"] == exact.attrs["forwards"] + 2  # only the first batch ran its forwards twice
    with pytest.raises(ValueError, match="QK fix"):
        attribute(model, clean, corrupt, _metric(model, len(clean)), method="atp-star", qk_fix="bogus")


def test_atp_star_on_shared_norm_parallel_blocks(tmp_path):
    """Phi (attention and MLP read one norm): both fixes still go to AtP as the writes shrink. The exact recompute
    reads the attention's own input there (a gradient at the shared norm's input would carry the MLP path too and
    leave a first-order error: 0.45 of max |AtP| at every scale before this was fixed)."""
    from mhop_lens.models import load_model
    from mhop_lens.tiny_models import save_tiny_model

    model = load_model(str(save_tiny_model(tmp_path / "phi", "phi", seed=1)), device="cpu")
    assert "blocks.1.ln2.hook_in" not in model.hook_dict
    clean, corrupt = _aligned(model)
    gaps = {}
    for fix in ("frozen-norm", "exact"):
        for alpha in (1e-1, 1e-2):
            star, atp = _star(model, clean, corrupt, fix, alpha)
            gaps[fix, alpha] = float((star - atp).abs().max() / atp.abs().max())
    for fix in ("frozen-norm", "exact"):
        assert gaps[fix, 1e-2] < 0.2 * gaps[fix, 1e-1] + 1e-5 and gaps[fix, 1e-2] < 0.01, gaps


#: MLP output projections by architecture family (zeroed: the MLPs then write a constant).
MLP_OUT = ("mlp.c_proj", "down_proj", "dense_4h_to_h", "fc_out")


def _mlp_free(path, arch: str, qk_gain: float = 1.0):
    """A 4-layer random ``arch`` model whose MLPs write nothing (output projections zero); GPT-2's q/k weights
    scaled by ``qk_gain`` (sharper, more saturated attention)."""
    from transformers import AutoModelForCausalLM

    from mhop_lens.tiny_models import load_tiny_model, save_tiny_model

    path = save_tiny_model(path, arch, n_layers=4, seed=3)
    hf = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        zeroed = [m.weight.zero_() for n, m in hf.named_modules() if n.endswith(MLP_OUT)]
        assert len(zeroed) == 4, arch
        if arch == "gpt2":
            for block in hf.transformer.h:
                block.attn.c_attn.weight[:, : 2 * hf.config.n_embd] *= qk_gain
    hf.save_pretrained(path)
    return load_tiny_model(path)


def _patching_readout(model, clean, corrupt, metric) -> dict:
    """Per (layer, head): gradient at the final residual . the residual change exact patching of the head makes
    (plain hooks, one head at a time)."""
    from mhop_lens.forward import last_logits

    rows = torch.arange(len(clean))
    enc_c, enc_k = encode_pairs(model, clean, corrupt)
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    store: dict = {}

    def keep_as(key):
        def hook(act, hook):
            store[key] = act
            return act

        return hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[(final, keep_as(final))]):
        grad = torch.autograd.grad(metric(last_logits(model, enc_k), rows).sum(), store[final])[0]
    base = store[final].detach()
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep_as(n)) for n in names]):
        last_logits(model, enc_c)
    clean_z = {n: store[n].clone() for n in names}
    expected = {}
    for layer, name in enumerate(names):
        for head in range(model.cfg.n_heads):
            def patch(act, hook, name=name, head=head):
                act = act.clone()
                act[:, :, head] = clean_z[name][:, :, head]
                return act

            with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch), (final, keep_as(final))]):
                last_logits(model, enc_k)
            expected[layer, head] = ((store[final] - base) * grad).sum((1, 2)).numpy()
    return expected


@pytest.mark.parametrize("arch", ["gpt2", "gemma3", "bloom", "gpt-neo", "gemma3-long", "qwen2-sliding-long"])
def test_chained_atp_star_is_exact_up_to_the_readout_without_mlps(tmp_path, arch):
    """Without MLPs every path from a head runs through later attention layers (and, on Gemma, post-attention
    norms) and the residual, so the chained QK fix takes each of them exactly: AtP* (chained) = gradient at the
    final residual . the residual change that exact patching of the head makes. GPT-2 with 8x q/k gain, Gemma 3
    (post-attention norms, q/k norms, other rotary tables in its global layers), Bloom (ALiBi), GPT-Neo (local
    layers); ``-long``: prompts past the windowed models' 16-token window (each layer's own mask). The
    one-softmax-deep fix ("exact") does not (1e-2 of the scale on the GPT-2, against ~1e-6)."""
    from mhop_lens.tiny_models import WINDOW

    arch, long = arch.removesuffix("-long"), arch.endswith("-long")
    model = _mlp_free(tmp_path / arch, arch, qk_gain=8.0)
    clean, corrupt = _aligned(model)
    if long:
        pre = "Once upon a time there was a long story about many things and people. " * 2
        clean, corrupt = [pre + c for c in clean], [pre + c for c in corrupt]
        assert len(model.tokenizer(clean[0])["input_ids"]) > WINDOW
    metric = _metric(model, len(clean))
    expected = _patching_readout(model, clean, corrupt, metric)
    scale = max(np.abs(v).max() for v in expected.values())
    errors = {}
    for fix in ("chained", "exact"):
        frame = attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star", qk_fix=fix)
        got = {k: g.sort_values("pair")["atp_star"].to_numpy() for k, g in frame.groupby(["layer", "head"])}
        errors[fix] = max(np.abs(got[k] - v).max() for k, v in expected.items()) / scale
    assert errors["chained"] < 1e-4, errors
    if arch == "gpt2":
        assert errors["exact"] > 1e-3, errors  # the property is not met by construction
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:  # the chain's output projections are counted as run
            frame = attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star", batch_size=len(clean))
        assert frame.attrs["qk_fix_used"] == "chained"
        claimed = frame.attrs["forward_equivalents_per_batch"] * frame.attrs["flops_forward_unit"]
        assert fc.get_total_flops() == pytest.approx(claimed, rel=1e-9)


def test_atp_star_refuses_a_recompute_that_does_not_reproduce_the_model(tmp_path, monkeypatch):
    """Every layer's recompute is checked with nothing patched against the corrupted run: giving Gemma 3's global
    layers the block arguments of its first (local) layer, as AtP* did before, is refused with a clear error."""
    from mhop_lens.analyses import atp_star
    from mhop_lens.errors import DataError
    from mhop_lens.tiny_models import load_tiny_model, save_tiny_model

    model = load_tiny_model(save_tiny_model(tmp_path / "g3", "gemma3", n_layers=3, seed=3))
    clean, corrupt = _aligned(model)
    metric = _metric(model, len(clean))
    attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star")
    first = atp_star._LayerArgs.__call__
    monkeypatch.setattr(atp_star._LayerArgs, "__call__", lambda self, layer, reps: first(self, 1, reps))
    with pytest.raises(DataError, match="does not reproduce layer 2 of gemma3"):
        attribute(model, clean, corrupt, metric, sites=("z",), method="atp-star")


def test_atp_star_head_write_passes_the_post_attention_norm(tmp_path):
    """Gemma 2 normalises the attention output before the residual (``ln1_post``): a head's write, as AtP* adds it
    to later layers' inputs, is the residual change that patching the head makes (to first order), not
    ``delta_z @ W_O`` (which is off by the norm's scale)."""
    from mhop_lens.analyses.atp_star import _node_write, has_post_attention_norm
    from mhop_lens.forward import last_logits
    from mhop_lens.tiny_models import load_tiny_model, save_tiny_model

    model = load_tiny_model(save_tiny_model(tmp_path / "g2", "gemma2-nocap", seed=2))
    assert has_post_attention_norm(model, 0)
    clean, corrupt = _aligned(model)
    enc_c, enc_k = encode_pairs(model, clean, corrupt)
    store: dict = {}

    def keep_as(key):
        def hook(act, hook):
            store[key] = act.detach().clone()
            return act

        return hook

    names = {"z": "blocks.0.attn.hook_z", "post_in": "blocks.0.ln1_post.hook_in", "out": "blocks.0.hook_attn_out"}
    with torch.no_grad(), model.hooks(fwd_hooks=[(names["z"], keep_as("clean_z"))]):
        last_logits(model, enc_c)
    with torch.no_grad(), model.hooks(fwd_hooks=[(n, keep_as(k)) for k, n in names.items()]):
        last_logits(model, enc_k)
    base, alpha, head = store["out"], 1e-3, 1
    delta = alpha * (store["clean_z"] - store["z"])

    def patch(act, hook):
        act = act.clone()
        act[:, :, head] += delta[:, :, head]
        return act

    with torch.no_grad(), model.hooks(fwd_hooks=[(names["z"], patch), (names["out"], keep_as("out"))]):
        last_logits(model, enc_k)
    real = store["out"] - base
    with torch.no_grad():
        write = _node_write(model, "z", 0, delta, post_in=store["post_in"])[head]
        raw = _node_write(model, "z", 0, delta)[head]
    scale = real.abs().max()
    assert (write - real).abs().max() < 0.02 * scale
    assert (raw - real).abs().max() > 0.2 * scale
