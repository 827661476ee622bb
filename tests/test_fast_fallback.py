"""The fast path's fallback cannot crash: any failure in its machinery gives the reference with one warning naming
the cause; ``reference=True`` never enters it; a user's hook error is not recorded as the fast path's fault."""

from __future__ import annotations

import warnings

import pytest
import torch
from _hopping import tiny_queries

from mhop_lens.analyses import backpatch as bp
from mhop_lens.analyses import hf_compat
from mhop_lens.analyses import partial_forward as pf
from mhop_lens.analyses import patching as ap
from mhop_lens.model_state import model_state
from mhop_lens.tokens import encode

CLEAN = ["The capital of the country of Kyoto is", "The capital of the country of Paris is"]
CORRUPT = CLEAN[::-1]
ANSWERS = ([" Kyoto", " Paris"], [" Paris", " Kyoto"])


@pytest.fixture
def model(tiny_models, monkeypatch):
    """The tiny GPT-2 with its verdicts and warnings cleared for this test (restored afterwards)."""
    m = tiny_models["gpt2"]
    for name, empty in (("fast_path", {}), ("prefix_share", {}), ("variant_path", {}), ("warned", set())):
        monkeypatch.setitem(model_state(m), name, empty)
    return m


def _said(caught) -> list[str]:
    return [str(w.message) for w in caught if " is off for this " in str(w.message)]


def test_exception_in_fast_sweep_falls_back_once(model, monkeypatch):
    qs = tiny_queries()
    ref = bp.run_backpatch(model, qs, batch_size=5, progress=False, reference=True)

    def boom(*a, **k):
        raise RuntimeError("boom in kept block args")

    monkeypatch.setattr(bp, "kept_block_args", boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = bp.run_backpatch(model, qs, batch_size=5, progress=False)
        again = bp.run_backpatch(model, qs, batch_size=5, progress=False)
    said = _said(caught)
    assert len(said) == 1 and "boom in kept block args" in said[0] and "gpt2" in said[0], said
    for frame in (first, again):
        assert frame.attrs["path"] == "reference"
        assert (frame["rank"].to_numpy() == ref["rank"].to_numpy()).all()
        assert abs(frame["prob"].to_numpy() - ref["prob"].to_numpy()).max() < 1e-6


def test_failing_shared_prefix_run_gives_the_plain_run(model, monkeypatch):
    prompts = ["The spouse of the performer of Imagine is", "The spouse of the performer of Imagine the",
               "The author of Hamlet is", "The author of Hamlet the"]
    enc = encode(model, prompts)
    assert pf._prefix_groups(enc) is not None
    plain = pf.reference_run(model, enc)

    def broken(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'index_select'")

    monkeypatch.setattr(pf, "_shared_clean_run", broken)
    got = pf.clean_run(model, enc)
    assert (got.last_logits - plain.last_logits).abs().max() < 1e-4
    assert (got.streams - plain.streams).abs().max() < 1e-4
    assert model_state(model)["prefix_share"][pf.condition(model, enc)] is False


def test_empty_cache_is_a_named_cause():
    from transformers import DynamicCache

    with pytest.raises(hf_compat.FastPathError, match="no layers"):
        hf_compat.kv_layers(DynamicCache())
    with pytest.raises(hf_compat.FastPathError, match="no KV cache"):
        hf_compat.kv_layers(None)


def test_reference_never_enters_the_fast_machinery(model, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("the reference entered the fast machinery")

    for module, name in ((pf, "fast_path_cause"), (pf, "clean_run"), (pf, "run_from"), (pf, "block_call"),
                         (pf, "ensure_cache_plumbing"), (bp, "clean_run"), (bp, "backpatch_logits"),
                         (bp, "_fast_sweep"), (ap, "clean_run"), (ap, "patch_logits")):
        monkeypatch.setattr(module, name, forbidden)
    frame = bp.run_backpatch(model, tiny_queries(), batch_size=5, progress=False, reference=True)
    assert frame.attrs["path"] == "reference"
    for sites in ("resid_pre", "z"):
        frame = ap.run_activation_patching(model, CLEAN, CORRUPT, sites, answers=ANSWERS, progress=False,
                                           reference=True)
        assert frame.attrs["path"] == "reference"


def test_user_hook_error_is_not_the_fast_paths_fault(model):
    def user_hook(module, args, out):
        raise ValueError("a user's hook failed")

    handle = model.blocks[0].register_forward_hook(user_hook)
    try:
        with pytest.raises(ValueError, match="a user's hook failed"):
            ap.run_activation_patching(model, CLEAN, CORRUPT, "resid_pre", answers=ANSWERS, progress=False)
    finally:
        handle.remove()
    assert not model_state(model).get("fast_path")  # nothing recorded against the fast path
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = ap.run_activation_patching(model, CLEAN, CORRUPT, "resid_pre", answers=ANSWERS, progress=False)
    assert frame.attrs["path"] == "kv-partial" and not _said(caught)


def test_verdict_is_per_condition(model, monkeypatch):
    """A window the short prompts do not reach leaves them on the fast path; longer prompts of the same model
    take the reference with one warning naming the window, and the short verdict is not reused for them."""
    qs = tiny_queries()
    short = max(len(encode(model, q.prompt).tokens[0]) for q in qs)
    monkeypatch.setattr(pf, "attention_windows", lambda m: (short + 2,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = bp.run_backpatch(model, qs, batch_size=5, progress=False)
        assert fast.attrs["path"] == "kv-partial" and not _said(caught)
        prompts = ["The river of London is the Thames. The country of Kyoto is " + c for c in CLEAN]
        frame = ap.run_activation_patching(model, prompts, prompts[::-1], "resid_pre", answers=ANSWERS, progress=False)
        ref = ap.run_activation_patching(model, prompts, prompts[::-1], "resid_pre", answers=ANSWERS, progress=False,
                                         reference=True)
    said = _said(caught)
    assert frame.attrs["path"] == "reference" and len(said) == 1 and "sliding" in said[0], said
    assert torch.allclose(torch.tensor(frame["metric"].to_numpy()), torch.tensor(ref["metric"].to_numpy()))
    assert len(model_state(model)["fast_path"]) >= 2  # one verdict per condition
