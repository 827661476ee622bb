"""Patchscopes: invariants of the patch (no-op, last-layer = lens), decoders, classes, the organism's hop order."""

from __future__ import annotations

import pandas as pd
import pytest
from _hopping import possessive_query, tiny_queries

from mhop_lens.analyses.lens import run_lens
from mhop_lens.analyses.patchscope import (
    DEFAULT,
    _generate,
    classify,
    earliest_layers,
    one_hop_prompt,
    resolve_decoder,
    run_patchscope,
)
from mhop_lens.tokens import encode


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_patch_at_last_layer_is_the_logit_lens(tiny_models, arch):
    """Patched into the last layer, a vector's first decoded token is its logit-lens top-1, whatever the prompt."""
    model, queries = tiny_models[arch], tiny_queries()
    last = model.cfg.n_layers - 1
    ps = run_patchscope(model, queries, target_layers=[last], positions=("last", "t1"), decoder="generate",
                        max_new_tokens=1, batch_size=4, progress=False)
    lens = run_lens(model, queries, positions=("last", "t1"), sites=("resid_post",), progress=False)
    merged = ps.merge(lens.rename(columns={"layer": "source_layer"}), on=["qid", "position", "source_layer"])
    assert len(merged) == len(ps) == len(queries) * 2 * model.cfg.n_layers
    assert (merged.first_token == merged.top1).all()
    own = merged[(merged.position == "last") & (merged.source_layer == last)]
    assert (own.first_token == own.pred_token).all()  # s = t = last at the last token: the model's own prediction


def test_patching_a_prompt_with_itself_is_a_no_op(tiny_models):
    """Target prompt = the source prompt, s = t, p = the placeholder: generation equals the clean continuation."""
    model, query = tiny_models["gpt2"], tiny_queries()[0]
    ps = run_patchscope(model, [query], target_layers="same", positions=("last",), target_prompt=query.prompt,
                        placeholder="is", decoder="generate", max_new_tokens=3, progress=False)
    clean = _generate(model, encode(model, [query.prompt]), [], 3, None)
    assert (ps.decoded == model.tokenizer.decode(clean[0].tolist())).all()


def test_batched_equals_per_query(tiny_models):
    model, queries = tiny_models["gpt2"], tiny_queries()[:3]
    kw = dict(target_layers=[1], decoder="generate", max_new_tokens=2, progress=False)
    batched = run_patchscope(model, queries, batch_size=16, **kw)
    single = pd.concat([run_patchscope(model, [q], batch_size=16, **kw) for q in queries], ignore_index=True)
    key = ["qid", "position", "source_layer", "target_layer"]
    pd.testing.assert_frame_equal(batched.sort_values(key).reset_index(drop=True),
                                  single.sort_values(key).reset_index(drop=True))


def test_decoders_and_rows(tiny_models):
    model, queries = tiny_models["llama"], tiny_queries()[:2]
    n = model.cfg.n_layers
    lens = run_patchscope(model, queries, decoder="lens", progress=False)
    assert len(lens) == 2 * 2 * n and (lens.target_layer == -1).all() and set(lens["class"]) <= set(
        ("e1", "e2", "e3", "other"))
    hop = run_patchscope(model, queries, decoder="one_hop", target_layers="same", progress=False)
    assert len(hop) == 2 * 2 * n and (hop.source_layer == hop.target_layer).all()
    assert resolve_decoder(model, "auto", "Syria: Syria is a country, x") == "generate"
    kw = dict(source_layers=[0], target_layers=[1], positions=("t2",), decoder="generate", max_new_tokens=3,
              progress=False)
    a, b = (run_patchscope(model, queries, seed=7, **kw) for _ in range(2))
    assert a.decoded.tolist() == b.decoded.tolist()  # seeded sampling is reproducible


def test_classify_and_one_hop_prompt():
    q = tiny_queries()[0]
    assert classify(" Yoko Ono is an artist", q) == "e3"
    assert classify(": John Lennon, husband of Yoko Ono", q) == "e2"
    assert classify(" Imagined things", q) == "other"  # whole words only
    assert classify(" imagine", q) == "e1"
    assert one_hop_prompt(q) == ("The spouse of x is", (14, 15))
    assert one_hop_prompt(possessive_query()) == ("x 's boss", (0, 1))


def test_earliest_layers():
    frame = pd.DataFrame({
        "qid": ["a"] * 4 + ["b"] * 2,
        "position": ["t1", "t1", "t2", "t2", "t1", "t2"],
        "source_layer": [2, 1, 3, 2, 0, 0],
        "class": ["e2", "e2", "e3", "other", "e1", "e3"],
    })
    early = earliest_layers(frame).set_index("qid")
    assert early.loc["a", "e2_t1_layer"] == 1 and early.loc["a", "e3_t2_layer"] == 3
    assert bool(early.loc["a", "first_before_second"])
    assert pd.isna(early.loc["b", "e2_t1_layer"]) and pd.isna(early.loc["b", "first_before_second"])


def test_organism_first_hop_before_second(organism):
    """Acceptance: on held-out queries the organism answers, e2 appears at t1 before e3 appears at t2."""
    from mhop_lens.data import load_queries

    queries = list(load_queries("organism:heldout", limit=100))
    assert resolve_decoder(organism, "auto", DEFAULT) == "lens"  # the organism's vocabulary lacks those words
    ps = run_patchscope(organism, queries, decoder="auto", batch_size=100, progress=False)
    assert (ps.decoder == "lens").all() and set(ps.position) == {"t1", "t2"}
    early = earliest_layers(ps).set_index("qid")
    lens = run_lens(organism, queries, sites=("resid_post",), batch_size=100, progress=False)
    correct = lens.groupby("qid").correct.first()
    ordered = early.loc[correct[correct].index, "first_before_second"].fillna(False)
    assert correct.sum() >= 50  # the organism answers ~75% of held-out queries
    assert ordered.mean() > 0.8, f"only {ordered.mean():.2f} of correct queries resolve e2@t1 before e3@t2"


def _patched_batch(model, prompts, layer=0):
    """A left-padded batch and a hook overwriting resid_post(layer) one token before each row's last."""
    import torch

    from mhop_lens import hooks
    from mhop_lens.interventions import replace_positions

    enc = encode(model, prompts, padding_side="left")
    values = torch.randn(len(prompts), 1, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 3
    return enc, [(hooks.resid(layer, "post"), replace_positions(values, enc.last[:, None] - 1))]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_kv_cached_patched_generation_equals_rerun(tiny_models, arch):
    """Patch once in the prompt pass + cached steps == the patch re-applied while re-running every step."""
    from mhop_lens.analyses.patched_generation import Sampling, generate_patched

    model = tiny_models[arch]
    enc, fwd = _patched_batch(model, ["The spouse of the performer of Imagine is", "hello world x", "a b"])
    for sampling in (None, Sampling(), Sampling(temperature=0.7, top_k=5, top_p=0.9)):
        cached = generate_patched(model, enc, fwd, 6, sampling, seed=3)
        rerun = generate_patched(model, enc, fwd, 6, sampling, seed=3, cached=False)
        assert cached.tolist() == rerun.tolist()
        assert cached.tolist() != generate_patched(model, enc, [], 6, sampling, seed=3).tolist()  # the patch acts


def test_kv_cached_patched_generation_equals_rerun_on_organism(organism):
    from mhop_lens.analyses.patched_generation import Sampling, generate_patched
    from mhop_lens.data import load_queries

    prompts = [q.prompt for q in load_queries("organism:heldout", limit=8)] + ["Zapus 's boss"]
    enc, fwd = _patched_batch(organism, prompts)
    for sampling in (None, Sampling()):
        cached = generate_patched(organism, enc, fwd, 10, sampling, seed=1)
        assert cached.tolist() == generate_patched(organism, enc, fwd, 10, sampling, seed=1, cached=False).tolist()


def test_unpatched_cached_generation_is_hf_greedy(tiny_models):
    """With no hook, the cached loop is HF's greedy generate (evaluate.generate_greedy) on a padded batch."""
    from mhop_lens.analyses.patched_generation import _cache_filled, generate_patched
    from mhop_lens.evaluate import generate_greedy

    model = tiny_models["llama"]
    prompts = ["The spouse of the performer of Imagine is", "hello world x"]
    enc = encode(model, prompts, padding_side="left")
    _, kv = model.run_with_hooks(enc.tokens, attention_mask=enc.attention_mask, fwd_hooks=[],
                                 return_type="logits_and_cache", use_cache=True)
    if not _cache_filled(kv, enc.tokens.shape[1]):
        pytest.skip("this transformers release fills no KV cache through the bridge (issue 14), which also breaks "
                    "HF generate on the bridged model: nothing to compare with")
    ours = generate_patched(model, enc, [], 5)
    hf = generate_greedy(model, dict.fromkeys(prompts, 5))
    eos = model.tokenizer.eos_token_id
    for row, p in zip(ours.tolist(), prompts, strict=True):
        cut = row[: row.index(eos)] if eos in row else row
        assert cut == hf[p]


def test_study_classifier_priority_and_colon_patterns():
    from mhop_lens.analyses.patchscope import classify_study

    q = tiny_queries()[0]  # e1 Imagine, e2 John Lennon, e3 Yoko Ono
    assert classify_study(": John Lennon, husband of Yoko Ono", q) == "e2"
    assert classify_study(": Yoko Ono is an artist, Imagine: a song", q) == "e1"  # e1 first, whatever the order
    assert classify_study("Yoko Ono is an artist", q) == "other"  # no colon pattern
    assert classify_study(": yoko ono.", q) == "e3"  # case-insensitive


def test_study_protocol_rows(tiny_models):
    """Three seeds (0, 1, 2), 10 tokens, reproducible; the classes come from the study's classifier."""
    from mhop_lens.analyses.patchscope import REPEAT, classify_study

    model, queries = tiny_models["gpt2"], tiny_queries()[:2]
    kw = dict(source_layers=[0], target_layers=[1], positions=("t1",), decoder="generate", protocol="study",
              target_prompt="repeat", progress=False)
    a, b = (run_patchscope(model, queries, **kw) for _ in range(2))
    assert sorted(a.seed.unique().tolist()) == [0, 1, 2] and len(a) == 2 * 3
    assert a.decoded.tolist() == b.decoded.tolist() and (a.protocol == "study").all()
    byid = {q.id: q for q in queries}
    assert [classify_study(t, byid[i]) for t, i in zip(a.decoded, a.qid, strict=True)] == a["class"].tolist()
    assert REPEAT.endswith(", x")
    cached = run_patchscope(model, queries, seed=5, **{**kw, "protocol": "default", "max_new_tokens": 10})
    rerun = run_patchscope(model, queries, seed=5, cached=False, **{**kw, "protocol": "default", "max_new_tokens": 10})
    assert cached.decoded.tolist() == rerun.decoded.tolist()


def test_describe_line_counts_without_na():
    """`describe` prints counts (and a share from 10 queries on), never '<NA>'."""
    from mhop_lens.cli.hopping import describe_line

    early = pd.DataFrame({"first_before_second": pd.array([True, pd.NA, False, pd.NA], dtype="boolean")})
    line = describe_line(early)
    assert "<NA>" not in line and "nan" not in line
    assert line.startswith("e2@t1 before e3@t2 in 1 of 2 queries") and "2 of 4 queries lack" in line
    many = pd.DataFrame({"first_before_second": pd.array([True] * 9 + [False] * 3, dtype="boolean")})
    assert "(75.0%)" in describe_line(many)


def test_cached_generation_really_uses_the_cache(tiny_models):
    """Where the bridge returns a filled KV cache, generation steps run one token each (not a silent re-run)."""
    from mhop_lens.analyses.patched_generation import _cache_filled

    model = tiny_models["gpt2"]
    enc = encode(model, ["hello world x"], padding_side="left")
    _, kv = model.run_with_hooks(enc.tokens, attention_mask=enc.attention_mask, fwd_hooks=[],
                                 return_type="logits_and_cache", use_cache=True)
    if not _cache_filled(kv, enc.tokens.shape[1]):
        pytest.skip("this transformers release returns no KV cache through the bridge (issue 14): generation "
                    "falls back to re-running every step")
    assert kv.get_seq_length() == enc.tokens.shape[1]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_shared_target_prefix_gives_the_same_rows(tiny_models, arch, monkeypatch):
    """The target prompt's tokens before the placeholder are computed once per chunk and shared by its rows: the
    table (greedy and seeded sampling) equals the one from running the whole target prompt per row, and the
    prompt pass really starts at the placeholder (tokens seen at the embedding counted)."""
    from mhop_lens.analyses import patchscope
    from mhop_lens.model_state import model_state

    model, queries = tiny_models[arch], tiny_queries()[:3]
    model_state(model).pop("prefix_generation", None)  # the model's check of the shortcut runs in this test
    kw = dict(source_layers=[0, 1], target_layers="same", decoder="generate", max_new_tokens=4, progress=False)
    seen: list[int] = []
    handle = model.hook_dict["hook_embed"].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    try:
        shared = [run_patchscope(model, queries, seed=seed, **kw) for seed in (None, 7)]
    finally:
        handle.remove()
    width = encode(model, [DEFAULT]).tokens.shape[1]
    # the check once (whole prompt, prefix, placeholder), then per chunk (one per seed) the prefix once, the
    # placeholder and three one-token steps
    target = [w for w in seen if w != seen[0]]  # seen[0]: the source prompts' forward (once per call)
    assert target == [width, width - 1, 1] + 2 * [width - 1, 1, 1, 1, 1], seen
    monkeypatch.setattr(patchscope, "_shared_prefix", lambda model, enc, at: 0)
    plain = [run_patchscope(model, queries, seed=seed, **kw) for seed in (None, 7)]
    for a, b in zip(shared, plain, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_cached_generation_hands_the_cache_over_by_the_forwards_own_keyword(tiny_models):
    """transformers 5.24 takes ``cache=`` and deprecates ``past_key_values`` (removal announced for 5.40); 5.23 takes
    only ``past_key_values`` and silently ignores ``cache``. The keyword comes from the HF forward's signature:
    no deprecation warning, and the prefix really reaches the model (the shared-prefix check agrees)."""
    import inspect
    import warnings

    from mhop_lens.analyses.hf_compat import cache_kwarg
    from mhop_lens.analyses.patched_generation import generate_patched, prefix_keys_values, prefix_sharing_cause
    from mhop_lens.model_state import model_state

    model = tiny_models["llama"]
    assert cache_kwarg(model) in inspect.signature(model.original_model.forward).parameters
    enc = encode(model, [DEFAULT] * 2, padding_side="left")
    model_state(model).pop("prefix_generation", None)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*deprecated")
        assert prefix_sharing_cause(model, enc, enc.tokens.shape[1] - 1) is None
        generate_patched(model, enc, [], 3, prefix_kv=prefix_keys_values(model, enc, enc.tokens.shape[1] - 1))
