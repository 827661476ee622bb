"""Real widths: lean weight processing, real-vocabulary fixtures, bounded lens memory, logits at read positions,
reduced precision within a stated tolerance of fp32, automatic batch sizes."""

from __future__ import annotations

import pytest
import torch

#: Stated tolerances of reduced precision against fp32 on the organism's held-out queries (last position):
#: share of equal top-1 tokens, largest |p - p_fp32| over the vocabulary, largest |log p - log p_fp32| of the fp32
#: top token. Measured: bf16 0.995 / 0.023 / 0.082, fp16 1.0 / 0.003 / 0.008.
TOLERANCE = {"bf16": (0.98, 0.05, 0.15), "fp16": (0.99, 0.01, 0.03)}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_lean_processing_equals_the_library(tiny_dirs, arch):
    """Block-by-block processing (with vocabulary chunks of 100 rows) gives the library's processed weights."""
    import functools
    import types

    from transformer_lens.model_bridge import TransformerBridge

    from mhop_lens import lean_weights

    ref = TransformerBridge.boot_transformers(tiny_dirs[arch], device="cpu")
    ref.enable_compatibility_mode(disable_warnings=True)
    lean = TransformerBridge.boot_transformers(tiny_dirs[arch], device="cpu")
    assert lean_weights.install(lean) is None
    lean.process_weights = types.MethodType(functools.partial(lean_weights.lean_process_weights, vocab_chunk=100),
                                            lean)
    lean.enable_compatibility_mode(disable_warnings=True)
    a, b = ref.state_dict(), lean.state_dict()
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    raw = TransformerBridge.boot_transformers(tiny_dirs[arch], device="cpu").state_dict()
    assert any((raw[k] - b[k]).abs().max() > 1e-3 for k in raw), "nothing was processed"
    tokens = torch.randint(3, 500, (2, 7))
    torch.testing.assert_close(ref(tokens), lean(tokens), rtol=0, atol=1e-5)


def test_load_model_uses_the_lean_path(tiny_models):
    assert all(m.mhop_weight_processing == "lean" for m in tiny_models.values())


def test_vocab_chunks_avoid_d_model_rows():
    from mhop_lens.lean_weights import _chunks

    for n, size, d in [(512, 100, 64), (164, 100, 64), (128_256, 8192, 4096), (4096, 8192, 4096)]:
        bounds = _chunks(n, size, d)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(b - a != d and 0 < b - a <= size for a, b in bounds)
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))


@pytest.fixture(scope="module")
def wide_vocab_dir(tmp_path_factory):
    """A Llama-3-vocabulary model (128,256 logits) of tiny width, and its padded tokenizer, saved."""
    from mhop_lens.tiny_models import save_shaped_model

    shape = dict(arch="llama", vocab_size=128_256, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64,
                 n_ctx=128)
    return save_shaped_model(tmp_path_factory.mktemp("wide") / "m", shape)


@pytest.fixture(scope="module")
def wide_vocab(wide_vocab_dir):
    from mhop_lens.models import load_model

    return load_model(str(wide_vocab_dir), device="cpu")


def test_real_vocabulary_fixture(wide_vocab):
    from mhop_lens.analyses.lens import decode_ids
    from mhop_lens.tiny_models import make_tokenizer

    model = wide_vocab
    assert model.cfg.d_vocab == 128_256 == len(model.tokenizer)
    plain = make_tokenizer()
    text = " The spouse of John Lennon is"
    assert model.tokenizer(text, add_special_tokens=False)["input_ids"] == plain(text)["input_ids"]  # unchanged
    words = decode_ids(model, torch.tensor([100_000, 128_255, 300]))
    assert words[:2] == ["<unused100000>", "<unused128255>"] and words[2] == plain.decode([300])


def test_ids_past_the_tokenizer_never_decode_empty(tiny_models):
    from mhop_lens.analyses.lens import decode_ids

    model = tiny_models["gpt2"]
    n = len(model.tokenizer)
    assert decode_ids(model, torch.tensor([n, n + 7])) == [f"<id {n}>", f"<id {n + 7}>"]


def test_real_shape_configs():
    from mhop_lens.tiny_models import shaped_config

    cfg = shaped_config("llama3-8b", n_layers=2)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.num_hidden_layers) == (4096, 32, 8, 14_336, 128_256, 2)
    cfg = shaped_config("llama2-7b")
    assert (cfg.num_key_value_heads, cfg.vocab_size, cfg.num_hidden_layers) == (32, 32_000, 32)


READOUT_PEAK = """
import sys, torch
from mhop_lens.models import load_model
from mhop_lens.analyses.lens import read_stats as readout
sys.path.insert(0, sys.argv[3])
from real_shapes import peak_anon
model = load_model(sys.argv[1], device="cpu")
torch.manual_seed(0)
x = torch.randn(16, 128, model.cfg.d_model)
ids = {"a": torch.randint(0, model.cfg.d_vocab, (16, 128))}
chunk = int(sys.argv[2])
with torch.no_grad():
    readout(model, x[:1], {"a": ids["a"][:1]}, chunk_bytes=chunk)
    _, peak, start = peak_anon(lambda: readout(model, x, ids, chunk_bytes=chunk))
print(peak - start)
"""


def _readout_growth(path, chunk: int) -> int:
    """Peak anonymous-memory growth of a readout of 2048 rows in a fresh process whose allocator returns large
    blocks to the system at once (MALLOC_MMAP_THRESHOLD_), so the peak is that of the live tensors."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"  # real_shapes.peak_anon: the benchmarks' sampler
    out = subprocess.run([sys.executable, "-c", READOUT_PEAK, str(path), str(chunk), str(benchmarks)],
                         capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_lens_readout_memory_is_bounded_by_the_chunk(wide_vocab_dir, wide_vocab):
    """2048 rows over 128k logits take 1 GiB at once; in 8 MiB chunks the peak stays a few chunks."""
    from mhop_lens.analyses.lens import project, ranks
    from mhop_lens.analyses.lens import read_stats as readout

    chunk = 8 * 2**20
    growth = _readout_growth(wide_vocab_dir, chunk)
    assert growth < 12 * chunk, f"peak grew {growth / 2**20:.0f} MiB with {chunk / 2**20:.0f} MiB chunks"
    whole = _readout_growth(wide_vocab_dir, 2048 * 4 * 128_256)  # one chunk: the unbounded read-out
    assert whole > 4 * growth, "the measurement cannot tell chunked from unchunked"
    model = wide_vocab
    torch.manual_seed(0)
    x = torch.randn(2, 128, model.cfg.d_model)
    ids = torch.randint(0, model.cfg.d_vocab, (2, 128))
    with torch.no_grad():  # equal to the unchunked projection
        got = readout(model, x, {"a": ids}, top_k=3, chunk_bytes=chunk)
        proj = project(model, x).float()
        assert torch.equal(got["a_rank"], ranks(proj, ids).cpu())
        torch.testing.assert_close(got["a_prob"], proj.softmax(-1).gather(-1, ids[:, :, None])[..., 0])
        assert torch.equal(got["top"], proj.topk(3, dim=-1).indices)


def test_logits_at_equals_the_full_forward(tiny_model):
    from mhop_lens.forward import last_logits, logits_at
    from mhop_lens.tokens import encode

    enc = encode(tiny_model, [" The spouse of John", " The river of London is the"])
    with torch.no_grad():
        torch.testing.assert_close(logits_at(tiny_model, enc), last_logits(tiny_model, enc), rtol=0, atol=1e-5)
        first = torch.full((2,), enc.tokens.shape[1] - 2)
        full = tiny_model(enc.tokens, attention_mask=enc.attention_mask)
        torch.testing.assert_close(logits_at(tiny_model, enc, positions=first), full[:, -2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reduced_precision_within_tolerance(organism, dtype):
    """bf16 / fp16 end to end (weights, processing, forward) against fp32 on the organism's held-out queries."""
    from mhop_lens.data import load_queries
    from mhop_lens.forward import logits_at
    from mhop_lens.models import load_model
    from mhop_lens.tokens import encode

    queries = list(load_queries("organism:heldout"))[:200]
    low = load_model("organism", device="cpu", dtype=dtype)
    assert next(low.original_model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    with torch.no_grad():
        ref = logits_at(organism, encode(organism, [q.prompt for q in queries])).float().log_softmax(-1)
        got = logits_at(low, encode(low, [q.prompt for q in queries])).float().log_softmax(-1)
    top = ref.argmax(-1)
    agree, prob_tol, logp_tol = TOLERANCE[dtype]
    assert (got.argmax(-1) == top).float().mean() >= agree
    assert (got.exp() - ref.exp()).abs().max() <= prob_tol
    assert (got - ref).gather(-1, top[:, None]).abs().max() <= logp_tol


def test_dtype_names():
    from mhop_lens.budget import parse_dtype
    from mhop_lens.errors import MhopLensError

    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(None) is None
    with pytest.raises(MhopLensError, match="fp32, bf16, fp16"):
        parse_dtype("int8")


def test_auto_batch_size_follows_memory_and_cap(tiny_models):
    from mhop_lens.budget import auto_batch_size, resolve_batch_size, row_bytes
    from mhop_lens.errors import MhopLensError

    model = tiny_models["llama"]
    per_row = row_bytes(model, 20)
    assert auto_batch_size(model, 20, cap=10_000, available=per_row * 3 * 2 * 40) == 40
    assert auto_batch_size(model, 20, cap=16, available=per_row * 3 * 2 * 40) == 16
    assert auto_batch_size(model, 20, available=1) == 1
    assert resolve_batch_size(12, model, 20) == 12 and resolve_batch_size("12", model, 20) == 12
    assert 1 <= resolve_batch_size("auto:8", model, 20) <= 8
    with pytest.raises(MhopLensError, match="auto:CAP"):
        resolve_batch_size("lots", model, 20)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_layerwise_backpatch_equals_the_reference(tmp_path, arch):
    """All targets t in one pass over the layers (4 layers: t = 0, 1, 2 join at blocks 1, 2, 3) gives the
    per-pair reference's logits, and is the path taken."""
    from _hopping import tiny_queries

    from mhop_lens.analyses import backpatch as bp
    from mhop_lens.analyses.partial_forward import check_fast_path, clean_run
    from mhop_lens.models import load_model
    from mhop_lens.tiny_models import save_tiny_model
    from mhop_lens.tokens import encode

    model = load_model(str(save_tiny_model(tmp_path / arch, arch, n_layers=4, seed=2)), device="cpu")
    qs = tiny_queries()
    enc = encode(model, [q.prompt for q in qs])
    assert check_fast_path(model, enc), "the KV-reusing path does not hold (transformers 5.24: issue 14)"
    clean = clean_run(model, enc)
    n = len(qs)
    rows = torch.arange(n).repeat(2)
    donor = torch.cat([torch.arange(n), torch.tensor(bp.derangement(n, 0))])
    pos = bp.positions_of(enc, qs, "last")
    pairs = bp.all_pairs(4)
    by_t: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(pairs):
        by_t.setdefault(t, []).append(i)
    out = torch.empty(len(pairs), len(rows), model.cfg.d_vocab)
    assert bp._layerwise(model, clean, rows, donor, pos[donor], pairs, by_t, bp._keep(out), bp.READOUT_CHUNK_BYTES)
    ref = bp.backpatch_reference_logits(model, clean, rows, pos[rows], pairs, donor, pos[donor])
    assert (out - ref).abs().max() < 1e-4
    fast = bp.backpatch_logits(model, clean, rows, pos[rows], pairs, donor, pos[donor])
    assert (fast - ref).abs().max() < 1e-4


def test_study_estimate_scales_to_full_depth():
    """The study estimate recomputes each floor at 32 layers and keeps the measured share of the floor."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from study_estimate import estimate

    result = {"shape": "llama3-8b", "layers": 3, "queries": 8, "width": 17, "dtype": "fp32", "device": "cpu",
              "forward_tflops": 0.1, "analyses": {
                  "evaluation": {"units": 3.0, "floor_units": None},
                  "lens": {"units": 1.2, "floor_units": 0.6},
                  "back-patching": {"units": 1.0, "floor_units": 0.5}}}
    text = "\n".join(estimate(result, 989.0, 0.4))
    assert "| evaluation | 3.00 / - |" in text and "GPU-hours" in text
    assert "| entity decoding | not measured |" in text
    line = next(x for x in text.splitlines() if x.startswith("| back-patching"))
    floor_full, cost = (float(v) for v in line.split("|")[4:6])
    assert cost == pytest.approx(2 * floor_full, rel=0.01) and floor_full > 0.5  # 50% share kept; 496 pairs
