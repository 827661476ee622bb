"""Activation patching: fast path == one-forward-per-site reference; patching a run with itself is the identity."""

from __future__ import annotations

import pytest
import torch

from mhop_lens.analyses import patching as ap

CLEAN = ["The spouse of the performer of Imagine is", "The author of Hamlet is"]
CORRUPT = ["The spouse of the performer of Hamlet is", "The author of Seattle is"]
ANSWERS = ([" Yoko", " William"], [" Mary", " Bill"])


def _aligned(model):
    """Keep only pairs whose prompts have equal token counts for this tokenizer."""
    keep = [i for i in range(len(CLEAN)) if len(model.tokenizer(CLEAN[i])["input_ids"])
            == len(model.tokenizer(CORRUPT[i])["input_ids"])]
    return [CLEAN[i] for i in keep], [CORRUPT[i] for i in keep]


@pytest.mark.parametrize("sites", ["resid_pre", "z"])
def test_fast_equals_reference(tiny_model, sites):
    """Single-position calls over a prefix cache (no call overhead), grouped positions (default), all positions in
    one call (a huge overhead), heads in 3-row calls."""
    clean, corrupt = _aligned(tiny_model)
    assert clean, "fixture prompts should align for every tiny tokenizer"
    c, x = ap.prepare(tiny_model, clean[-1:] * 2, corrupt[-1:] + clean[-1:], sites)
    layers = range(tiny_model.cfg.n_layers)
    ref = ap.patching_reference(tiny_model, c, x, sites, layers)
    for overhead in (0, ap.CALL_OVERHEAD, 10**6):
        for skip in (True, False):
            fast = ap.patch_logits(tiny_model, c, x, sites, layers, rows_per_call=3, overhead=overhead,
                                   skip_unchanged=skip)
            assert fast.keys() == ref.keys()
            assert max((fast[k] - ref[k]).abs().max() for k in ref) < 1e-4


@pytest.mark.parametrize("sites", ["resid_pre", "z"])
def test_sites_without_forward_match_the_reference(tiny_model, sites, monkeypatch):
    """One swapped middle token (pair 0) and an identical pair (pair 1). Sites equal in clean and corrupted, and at
    the embeddings the swapped token itself (patching it restores the clean run), need no forward; the rest
    recompute from the swapped position on. Everything equals the one-forward-per-site reference."""
    clean, corrupt = _aligned(tiny_model)
    c, x = ap.prepare(tiny_model, [clean[-1]] * 2, [corrupt[-1], clean[-1]], sites)
    swapped = int((c.enc.tokens[0] != x.enc.tokens[0]).nonzero()[0, 0])
    width = c.enc.tokens.shape[1]
    layers = range(tiny_model.cfg.n_layers)
    ref = ap.patching_reference(tiny_model, c, x, sites, layers)
    calls = []
    real = ap.run_from
    monkeypatch.setattr(ap, "run_from",
                        lambda m, resid, start, *a, **k: calls.append((start, resid.shape[1])) or real(m, resid, start,
                                                                                                       *a, **k))
    fast = ap.patch_logits(tiny_model, c, x, sites, layers)
    assert max((fast[k] - ref[k]).abs().max() for k in ref) < 1e-4
    assert calls and max(new for _, new in calls) <= width - swapped  # nothing before the swap is recomputed
    if sites == "resid_pre":
        assert 0 not in {start for start, _ in calls}  # the embeddings: every site is free
        assert (fast[(0, swapped)] - c.last_logits).abs().max() < 1e-4


def test_position_groups_minimise_calls_plus_tokens():
    """Groups partition the positions; no overhead -> one position per call, a huge one -> a single call; the
    chosen partition costs no more than either."""
    for n, width, overhead in ((1, 13, 32), (32, 6, 32), (4, 9, 100)):
        groups = ap.position_groups(n, width, overhead)
        assert torch.equal(torch.cat(groups), torch.arange(width))

        def cost(gs, n=n, width=width, overhead=overhead):
            return sum(overhead + n * len(g) * (width - int(g[0])) for g in gs)

        singles = [torch.tensor([p]) for p in range(width)]
        assert cost(groups) <= min(cost(singles), cost([torch.arange(width)]))
    assert len(ap.position_groups(8, 6, 0)) == 6 and len(ap.position_groups(8, 6, 10**6)) == 1
    assert len(ap.position_groups(8, 6, 10**6, max_tokens=100)) > 1


@pytest.mark.parametrize("sites", ["resid_pre", "z"])
def test_own_activation_is_identity(tiny_model, sites):
    """Computed, not skipped (``skip_unchanged=False``): every patched forward reproduces the corrupted run."""
    c, x = ap.prepare(tiny_model, CLEAN, CLEAN, sites)
    fast = ap.patch_logits(tiny_model, c, x, sites, range(tiny_model.cfg.n_layers), skip_unchanged=False)
    assert max((v - x.last_logits).abs().max() for v in fast.values()) < 1e-4


def test_run_frame_and_recovery(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    answers = (ANSWERS[0][: len(clean)], ANSWERS[1][: len(clean)])
    frame = ap.run_activation_patching(model, clean, corrupt, "resid_pre", answers=answers, progress=False)
    assert frame.attrs["path"] == "kv-partial"
    width = ap.prepare(model, clean, corrupt, "resid_pre")[0].enc.tokens.shape[1]
    assert len(frame) == len(clean) * model.cfg.n_layers * width
    c, x = ap.prepare(model, clean, corrupt, "resid_pre")
    for pair in range(len(clean)):
        differ = (c.enc.tokens[pair] != x.enc.tokens[pair]).nonzero()[:, 0].tolist()
        if len(differ) == 1:  # the only differing token, patched at the embeddings, restores the clean run
            row = frame[(frame.pair == pair) & (frame.layer == 0) & (frame.position == differ[0])]
            assert abs(float(row["recovered"].iloc[0]) - 1) < 1e-3
    assert width == c.enc.tokens.shape[1]
    ref = ap.run_activation_patching(model, clean, corrupt, "resid_pre", answers=answers, progress=False,
                                     reference=True)
    assert (frame["metric"] - ref["metric"]).abs().max() < 1e-4


def test_patching_on_organism(organism):
    from mhop_lens.data import load_queries

    pairs = ap.counterfactual_pairs(list(load_queries("organism:heldout", limit=40)))[:4]
    clean, corrupt = [p[0] for p in pairs], [p[1] for p in pairs]
    for sites in ap.SITES:
        c, x = ap.prepare(organism, [q.prompt for q in clean], [q.prompt for q in corrupt], sites)
        layers = [1, organism.cfg.n_layers - 1]
        fast = ap.patch_logits(organism, c, x, sites, layers, rows_per_call=8)
        ref = ap.patching_reference(organism, c, x, sites, layers)
        assert max((fast[k] - ref[k]).abs().max() for k in ref) < 1e-4
        assert max((ref[k] - x.last_logits).abs().max() for k in ref) > 1e-2, sites  # a trained model: sites matter


@pytest.mark.parametrize("sites", ["q", "k", "v", "pattern"])
def test_qkv_pattern_fast_equals_reference(tiny_model, sites):
    """q / k / v / pattern head sites (k, v per key/value head on the GQA Llama): the KV-reusing sweep equals one
    full forward per site, with and without the shortcuts; patching a run with itself is the identity."""
    clean, corrupt = _aligned(tiny_model)
    c, x = ap.prepare(tiny_model, clean[-1:] * 2, corrupt[-1:] + clean[-1:], sites)
    layers = range(tiny_model.cfg.n_layers)
    ref = ap.patching_reference(tiny_model, c, x, sites, layers)
    assert len(ref) == tiny_model.cfg.n_layers * ap.n_sites(tiny_model, sites)
    assert max((ref[k] - x.last_logits).abs().max() for k in ref) > 1e-6  # the patch arrives (random weights: small)
    for skip in (True, False):
        fast = ap.patch_logits(tiny_model, c, x, sites, layers, rows_per_call=3, skip_unchanged=skip)
        assert fast.keys() == ref.keys()
        assert max((fast[k] - ref[k]).abs().max() for k in ref) < 1e-4
    same_c, same_x = ap.prepare(tiny_model, clean, clean, sites)
    own = ap.patch_logits(tiny_model, same_c, same_x, sites, layers, skip_unchanged=False)
    assert max((v - same_x.last_logits).abs().max() for v in own.values()) < 1e-4


@pytest.mark.parametrize("sites", ["q", "k", "v", "pattern", "z"])
def test_head_sites_equal_transformer_lens_patching(tiny_models, sites):
    """Our reference against ``transformer_lens.patching`` itself (unpadded prompts, a model without GQA)."""
    import transformer_lens.patching as tlp

    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    clean, corrupt = clean[-1:], corrupt[-1:]
    answers = (ANSWERS[0][-1:], ANSWERS[1][-1:])
    ours = ap.run_activation_patching(model, clean, corrupt, sites, answers=answers, progress=False, reference=True)
    good = ap.first_token_ids(model, answers[0])
    bad = ap.first_token_ids(model, answers[1])
    c = ap.encode(model, clean)
    x = ap.encode(model, corrupt)
    with torch.no_grad():
        _, cache = model.run_with_cache(c.tokens)
    fn = getattr(tlp, f"get_act_patch_attn_head_{'out' if sites == 'z' else sites}_all_pos")

    def metric(logits):
        return logits[:, -1, good] - logits[:, -1, bad]

    with torch.no_grad():
        theirs = fn(model, x.tokens, cache, lambda logits: metric(logits)[0, 0])
    mine = torch.tensor(ours.sort_values(["layer", "head"])["metric"].to_numpy()).view_as(theirs)
    assert (mine - theirs.cpu()).abs().max() < 1e-5
    assert (theirs - float(ours["corrupt_metric"].iloc[0])).abs().max() > 1e-6  # not a no-op on either side


def test_old_site_names_warn_and_agree(tiny_models):
    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    answers = (ANSWERS[0][: len(clean)], ANSWERS[1][: len(clean)])
    new = ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False)
    with pytest.warns(DeprecationWarning, match="'z'"):
        old = ap.run_activation_patching(model, clean, corrupt, "heads", answers=answers, progress=False)
    assert set(old["site"]) == {"z"} and (old["metric"] - new["metric"]).abs().max() < 1e-6
    with pytest.raises(ap.MhopLensError, match=r"unknown activation patching site\(s\) \[.resid_prex.\]; choose"):
        ap.run_activation_patching(model, clean, corrupt, "resid_prex", answers=answers, progress=False)


def test_one_metric_form_and_the_old_one(tiny_models):
    """Patching takes ``metric(last_logits, rows)`` like attribution and heads; the old three-argument form gives the
    same table with a deprecation warning; a custom metric sees the rows of the pairs it scores."""
    from mhop_lens.analyses.metrics import clean_vs_corrupt_answer

    model = tiny_models["gpt2"]
    clean, corrupt = _aligned(model)
    answers = (ANSWERS[0][: len(clean)], ANSWERS[1][: len(clean)])
    default = ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False)
    shared = ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False,
                                        metric=clean_vs_corrupt_answer(model, *answers))
    with pytest.warns(DeprecationWarning, match="last_logits, rows"):
        old = ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False,
                                         metric=ap.logit_diff)
    assert (default["metric"] - shared["metric"]).abs().max() < 1e-6
    assert (default["metric"] - old["metric"]).abs().max() < 1e-6
    good, bad = ap.first_token_ids(model, answers[0]), ap.first_token_ids(model, answers[1])
    rows = torch.arange(len(clean))
    tl = ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False, batch_size=1,
                                    metric=lambda logits: logits[rows, -1, good] - logits[rows, -1, bad])
    assert (default["metric"] - tl["metric"]).abs().max() < 1e-6  # TransformerLens's metric(logits) form
    seen = []
    ap.run_activation_patching(model, clean, corrupt, "z", answers=answers, progress=False, batch_size=1,
                               metric=lambda logits, rows: seen.append(rows.tolist()) or logits[:, 0])
    assert {r for call in seen for r in call} == set(range(len(clean)))
