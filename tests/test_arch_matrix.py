"""Architecture matrix: every architecture the bridge boots from a tiny random model, fast path == reference.

Each model runs the logit lens, back-patching (e1 and last positions), activation patching (residual and heads),
attribution patching (AtP with its exact-patching reference) and greedy generation, first on prompts shorter than
the sliding windows of the windowed tiny models (``tiny_models.WINDOW``), then on the same model object on prompts
longer than them (a verdict cached on short prompts must not carry over). Fast and reference agree to < 1e-4 in
log-probs / logit differences with no rank disagreement; a path that turns itself off says so once, naming the
architecture. ``MHOP_ARCH_TABLE=path.json`` writes the per-architecture paths and largest differences.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

from mhop_lens.analyses import hf_compat
from mhop_lens.analyses.attribution import attribute, exact_patching
from mhop_lens.analyses.backpatch import run_backpatch
from mhop_lens.analyses.lens import run_lens
from mhop_lens.analyses.metrics import clean_vs_corrupt_answer
from mhop_lens.analyses.patching import run_activation_patching
from mhop_lens.data.records import build_query
from mhop_lens.evaluate import generate_greedy
from mhop_lens.forward import last_logits
from mhop_lens.tiny_models import MATRIX, WINDOW, load_tiny_model, make_tokenizer, save_tiny_model
from mhop_lens.tokens import encode

TOL = 1e-4
#: Architectures whose plain forward TransformerLens 4.3's bridge cannot run with some transformers versions:
#: arch -> text of the error it raises (skipped only when exactly that error occurs). transformers 5.24's
#: CodeGenAttention has no ``embed_positions``, which the bridge's CodeGen attention reads (5.23 runs it).
KNOWN_BRIDGE_FAILURES: dict[str, str] = {"codegen": "embed_positions"}
CONTEXT = "The river of London is the Thames. "
FACTS = [
    ("Imagine", "performer", "John Lennon", "spouse", "Yoko Ono"),
    ("Hamlet", "author", "William Shakespeare", "mother", "Mary Arden"),
    ("Microsoft", "founder", "Bill Gates", "birthplace", "Seattle"),
]
WORDS = ["Kyoto", "London", "Paris", "Japan", "Seattle", "Hamlet", "Imagine", "Microsoft", "Syria", "Samsung"]
RESULTS: dict[str, dict] = {}


def _queries(long: bool):
    head = CONTEXT if long else ""
    return [build_query(f"{'L' if long else 'S'}{i}", e1, r1, e2, r2, e3, f"the {r1} of {{}}",
                        f"{head}The {r2} of {{}}") for i, (e1, r1, e2, r2, e3) in enumerate(FACTS)]


def _pairs(model, long: bool):
    """Clean / corrupted prompts differing in one word of equal token count, with their answers."""
    counts: dict[int, list[str]] = {}
    for w in WORDS:
        counts.setdefault(len(model.tokenizer(" " + w, add_special_tokens=False)["input_ids"]), []).append(w)
    words = max(counts.values(), key=len)[:3]
    assert len(words) >= 2
    head = CONTEXT if long else ""
    prompts = [f"{head}The capital of the country of {w} is" for w in words]
    answers = [" " + w for w in words[1:] + words[:1]]
    return prompts, prompts[1:] + prompts[:1], answers, answers[1:] + answers[:1]


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("matrix")


@pytest.fixture(scope="module", autouse=True)
def _write_table():
    yield
    out = os.environ.get("MHOP_ARCH_TABLE")
    if out and RESULTS:
        with open(out, "w") as f:
            json.dump(RESULTS, f, indent=1, sort_keys=True)


def _max_logprob_diff(a, b) -> float:
    return float(np.abs(np.log(a["prob"].to_numpy()) - np.log(b["prob"].to_numpy())).max())


def _run_length(model, long: bool, info: dict) -> None:
    key = "long" if long else "short"
    qs = _queries(long)
    width = encode(model, [q.prompt for q in qs]).tokens.shape[1]
    assert (width > WINDOW) if long else (width < WINDOW), width
    # logit lens: the last layer's projection is the model's own output (read-out scale / soft cap included)
    lens = run_lens(model, qs, sites=("resid_post",), progress=False)
    last = lens[lens["layer"] == model.cfg.n_layers - 1]
    enc = encode(model, [q.prompt for q in qs])
    own = last_logits(model, enc).detach().log_softmax(-1)
    e3 = torch.tensor([model.tokenizer(q.answer_prefix + q.e3, add_special_tokens=False)["input_ids"][0] for q in qs])
    lens_diff = float(np.abs(np.log(last["e3_prob"].to_numpy()) - own[torch.arange(len(qs)), e3].numpy()).max())
    assert lens_diff < TOL, lens_diff
    info[f"lens_{key}"] = lens_diff
    # back-patching at e1 (t1) and the last position, fast vs reference
    fast = run_backpatch(model, qs, positions=("e1", "last"), batch_size=4, progress=False)
    ref = run_backpatch(model, qs, positions=("e1", "last"), batch_size=4, progress=False, reference=True)
    assert ref.attrs["path"] == "reference"
    assert (fast["rank"].to_numpy() == ref["rank"].to_numpy()).all()
    diff = _max_logprob_diff(fast, ref)
    assert diff < TOL, diff
    info[f"backpatch_{key}"], info[f"backpatch_{key}_path"] = diff, fast.attrs["path"]
    # activation patching, residual and heads; the heads against attribution's exact patching as well
    clean, corrupt, good, bad = _pairs(model, long)
    for sites in ("resid_pre", "z"):
        fast = run_activation_patching(model, clean, corrupt, sites, answers=(good, bad), progress=False)
        ref = run_activation_patching(model, clean, corrupt, sites, answers=(good, bad), progress=False,
                                      reference=True)
        diff = float(np.abs(fast["metric"].to_numpy() - ref["metric"].to_numpy()).max())
        assert diff < TOL, (sites, diff)
        info[f"patch_{sites}_{key}"], info[f"patch_{sites}_{key}_path"] = diff, fast.attrs["path"]
    metric = clean_vs_corrupt_answer(model, good, bad)
    exact = exact_patching(model, clean, corrupt, metric, sites=("z",))
    heads = fast.assign(effect=fast["metric"] - fast["corrupt_metric"]).sort_values(["pair", "layer", "head"])
    exact = exact.sort_values(["pair", "layer", "head"])
    diff = float(np.abs(exact["exact"].to_numpy() - heads["effect"].to_numpy()).max())
    assert diff < TOL, diff
    atp = attribute(model, clean, corrupt, metric, sites=("z",))
    assert np.isfinite(atp["atp"].to_numpy()).all()
    diff = float(np.abs(atp.groupby("pair")["metric_clean"].first().to_numpy() - fast.groupby("pair")[
        "clean_metric"].first().to_numpy()).max())
    assert diff < TOL, diff  # AtP's metric reads the same logits (soft cap included)
    info[f"atp_exact_{key}"] = diff
    # evaluation: greedy generation with the KV cache == greedy argmax of full forwards
    prompts = [q.prompt for q in qs]
    got = generate_greedy(model, {p: 3 for p in prompts})
    for p in prompts:
        ids = encode(model, p).tokens
        want = []
        for _ in range(3):
            with torch.no_grad():
                nxt = int(model(ids)[0, -1].argmax())
            want.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        eos = model.original_model.generation_config.eos_token_id
        eos = set(np.atleast_1d(eos).tolist()) if eos is not None else set()
        cut = next((j for j, t in enumerate(want) if t in eos), len(want))
        assert got[p] == want[:cut], (p, got[p], want)


@pytest.mark.parametrize("arch", MATRIX)
def test_fast_equals_reference(arch, matrix_dir):
    torch.manual_seed(0)
    path = save_tiny_model(matrix_dir / arch, arch, n_layers=3, seed=1, tokenizer=make_tokenizer())
    try:
        model = load_tiny_model(path)
        with torch.no_grad():
            model(torch.tensor([[0, 5, 6]]))
    except Exception as e:
        if arch in KNOWN_BRIDGE_FAILURES and KNOWN_BRIDGE_FAILURES[arch] in str(e):
            import transformers

            pytest.skip(f"the bridge cannot run {arch} with transformers {transformers.__version__}: {e}")
        raise
    info = {"architecture": hf_compat.architecture(model), "windows": list(hf_compat.attention_windows(model)),
            "readout": list(hf_compat.logit_readout(model))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_length(model, long=False, info=info)
        _run_length(model, long=True, info=info)  # the same model object: nothing decided on short prompts carries
    said = [str(w.message) for w in caught if " is off for this " in str(w.message)]
    assert len(said) == len(set(said)), said  # each path that turns itself off says so once
    assert all(info["architecture"] in m for m in said)
    for key, value in info.items():
        if key.endswith("_path") and value == "reference":
            assert said, f"{key} took the reference without saying why"
    if info["windows"]:  # prompts longer than a window never take a path checked below it
        assert {info[k] for k in info if k.endswith("long_path")} == {"reference"}
    info["warnings"] = said
    RESULTS[arch] = info
