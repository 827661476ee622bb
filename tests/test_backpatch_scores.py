"""Back-patching scored in chunks (``backpatch_scores``): the ranks / probabilities of the full logits, with extra
memory bounded by the read-out chunk whatever the number of pairs, rows and vocabulary (issue 19)."""

from __future__ import annotations

import pytest
import torch
from _hopping import tiny_queries
from test_backpatch import _inputs as sweep_inputs

from mhop_lens.analyses import backpatch as bp
from mhop_lens.tokens import first_token_ids


def _inputs(model, qs, position):
    """Clean run, (rows, pos, donor, donor_pos) with self + shuffled donors, and each row's e3 target."""
    clean, rows, pos, donor, donor_pos = sweep_inputs(model, qs, position)
    targets = first_token_ids(model, [q.answer_prefix + q.e3 for q in qs])
    return clean, (rows, pos, donor, donor_pos), targets[rows]


def _assert_same(got, want):
    rank, prob = got
    assert torch.equal(rank, want[0])
    torch.testing.assert_close(prob, want[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("position", ["last", "r1"])
def test_scores_equal_the_scored_logits(tiny_model, position):
    """Every fast path (all targets in one pass at the last position, per-t loop elsewhere) and the reference,
    in one chunk and in chunks of 3 rows, give ``_score`` of the full logits; the control donors are included."""
    qs = tiny_queries()
    clean, args, targets = _inputs(tiny_model, qs, position)
    pairs = bp.all_pairs(tiny_model.cfg.n_layers)
    small = 3 * 4 * tiny_model.cfg.d_vocab  # 3 rows of logits per chunk: 2 x 5 rows x pairs -> many chunks
    want = bp._score(bp.backpatch_logits(tiny_model, clean, *args[:2], pairs, *args[2:]), targets)
    for chunk in (bp.READOUT_CHUNK_BYTES, small):
        _assert_same(bp.backpatch_scores(tiny_model, clean, *args[:2], pairs, *args[2:], targets, chunk_bytes=chunk),
                     want)
    ref_want = bp._score(bp.backpatch_reference_logits(tiny_model, clean, *args[:2], pairs, *args[2:]), targets)
    _assert_same(bp.backpatch_scores(tiny_model, clean, *args[:2], pairs, *args[2:], targets, reference=True,
                                     chunk_bytes=small), ref_want)
    assert (want[0] == ref_want[0]).float().mean() > 0.99  # the fast path and the reference agree on ranks
    assert (want[0][:, : len(qs)] != want[0][:, len(qs) :]).any()  # the shuffled donor changes something


def test_each_fast_path_scores_like_its_logits(tiny_models, monkeypatch):
    """The per-t variant path and the one-row-per-variant path (taken where the variant check fails) also
    score like the logits: layer-wise pass and variant tokens turned off in turn."""
    model = tiny_models["llama"]
    qs = tiny_queries()
    clean, args, targets = _inputs(model, qs, "last")
    pairs = bp.all_pairs(model.cfg.n_layers)
    small = 4 * 4 * model.cfg.d_vocab
    ref = bp._score(bp.backpatch_reference_logits(model, clean, *args[:2], pairs, *args[2:]), targets)
    monkeypatch.setattr(bp, "_layerwise", lambda *a, **k: False)
    want = bp._score(bp.backpatch_logits(model, clean, *args[:2], pairs, *args[2:]), targets)
    _assert_same(bp.backpatch_scores(model, clean, *args[:2], pairs, *args[2:], targets, chunk_bytes=small), want)
    monkeypatch.setattr(bp, "_variants", lambda *a, **k: False)
    want = bp._score(bp.backpatch_logits(model, clean, *args[:2], pairs, *args[2:]), targets)
    _assert_same(bp.backpatch_scores(model, clean, *args[:2], pairs, *args[2:], targets, chunk_bytes=small), want)
    assert (want[0] == ref[0]).float().mean() > 0.99


def test_scores_on_organism(organism):
    from mhop_lens.data import load_queries

    qs = list(load_queries("organism:heldout", limit=12))
    for position in ("last", "t1"):
        clean, args, targets = _inputs(organism, qs, position)
        pairs = bp.all_pairs(organism.cfg.n_layers)
        want = bp._score(bp.backpatch_logits(organism, clean, *args[:2], pairs, *args[2:]), targets)
        small = 5 * 4 * organism.cfg.d_vocab
        _assert_same(bp.backpatch_scores(organism, clean, *args[:2], pairs, *args[2:], targets, chunk_bytes=small),
                     want)


def test_last_target_layer_joins_the_layerwise_pass(tmp_path):
    """A pair with t = L-1 (only s = t is possible) among others: the one-pass sweep gives it its own column."""
    from mhop_lens.models import load_model
    from mhop_lens.tiny_models import save_tiny_model

    model = load_model(str(save_tiny_model(tmp_path / "m", "llama", n_layers=3, seed=2)), device="cpu")
    qs = tiny_queries()
    clean, args, _ = _inputs(model, qs, "last")
    pairs = [(1, 0), (2, 0), (2, 1), (2, 2)]
    fast = bp.backpatch_logits(model, clean, *args[:2], pairs, *args[2:])
    ref = bp.backpatch_reference_logits(model, clean, *args[:2], pairs, *args[2:])
    assert (fast - ref).abs().max() < 1e-4
    assert (fast[3, : len(qs)] - clean.last_logits).abs().max() < 1e-4  # (L-1, L-1) with its own residual


SWEEP_PEAK = """
import sys, torch
from pathlib import Path
from mhop_lens.models import load_model
from mhop_lens.analyses import backpatch as bp
from mhop_lens.analyses.partial_forward import clean_run
from mhop_lens.tokens import encode
sys.path[:0] = [sys.argv[3], str(Path(sys.argv[3]).parent / "benchmarks")]
from _hopping import tiny_queries
from real_shapes import peak_anon
model = load_model(sys.argv[1], device="cpu")
qs = tiny_queries() * 4
enc = encode(model, [q.prompt for q in qs])
rows = torch.arange(len(qs)).repeat(2)
donor = torch.cat([torch.arange(len(qs)), torch.arange(len(qs)).roll(1)])
pos = enc.last[rows]
targets = torch.randint(0, model.cfg.d_vocab, (len(rows),))
pairs = bp.all_pairs(model.cfg.n_layers)
chunk, how = int(sys.argv[2]), sys.argv[4]
sweep = {"scores": lambda: bp.backpatch_scores(model, clean, rows, pos, pairs, donor, pos, targets, chunk_bytes=chunk),
         "logits": lambda: bp._score(bp.backpatch_logits(model, clean, rows, pos, pairs, donor, pos, chunk), targets)}
with torch.no_grad():
    clean = clean_run(model, enc)
    bp.backpatch_scores(model, clean, rows[:4], pos[:4], pairs, donor[:4], pos[:4], targets[:4], chunk_bytes=chunk)
    _, peak, start = peak_anon(sweep[how])
print(len(pairs) * len(rows), peak - start)
"""


@pytest.fixture(scope="module")
def deep_wide_vocab_dir(tmp_path_factory):
    """A Llama-3-vocabulary model (128,256 logits) of tiny width with 6 layers (15 (s, t) pairs), saved."""
    from mhop_lens.tiny_models import save_shaped_model

    shape = dict(arch="llama", vocab_size=128_256, n_layers=6, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                 n_ctx=128)
    return save_shaped_model(tmp_path_factory.mktemp("deep_wide") / "m", shape)


def _sweep_growth(path, chunk: int, how: str) -> tuple[int, int]:
    """(pairs x rows, peak anonymous-memory growth) of a back-patching sweep (15 pairs x 40 rows, the clean run
    already held) in a fresh process whose allocator returns large blocks at once (MALLOC_MMAP_THRESHOLD_)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SWEEP_PEAK, str(path), str(chunk), str(Path(__file__).parent), how],
                         capture_output=True, text=True, env=env, check=True)
    entries, growth = out.stdout.strip().splitlines()[-1].split()
    return int(entries), int(growth)


def test_sweep_memory_is_bounded_by_the_chunk(deep_wide_vocab_dir):
    """600 (pair, row) entries of 128k logits take 294 MiB at once; scored in 8 MiB chunks the sweep's peak stays
    a few chunks, while the logits path grows by at least pairs x rows x vocabulary x 4 bytes."""
    chunk = 8 * 2**20
    entries, growth = _sweep_growth(deep_wide_vocab_dir, chunk, "scores")
    assert growth < 6 * chunk, f"peak grew {growth / 2**20:.0f} MiB with {chunk / 2**20:.0f} MiB chunks"
    _, whole = _sweep_growth(deep_wide_vocab_dir, chunk, "logits")
    assert whole >= entries * 128_256 * 4 > 6 * growth, "the measurement cannot tell scores from full logits"
