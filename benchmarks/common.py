"""Benchmark plumbing: interleaved median timing, peak memory of a call, analytic FLOP counts, test inputs.

Timings on a shared CPU are noisy, so every benchmark runs baseline and ours alternately in one process on the
same inputs and reports medians. Peak memory is the resident-set growth during a call (sampled every 2 ms;
torch's CPU allocator is invisible to tracemalloc).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

CACHE = Path(os.environ.get("MHOP_BENCH_CACHE", Path.home() / ".cache" / "mhop_lens" / "bench"))


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (well under 2 minutes)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sample_peak(fn: Callable[[], object], read: Callable[[], int], every: float = 0.002) -> tuple[object, int, int]:
    """Result of ``fn()``, the largest value of ``read()`` (bytes) while it ran, and ``read()`` at the start."""
    start, peak, done = read(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], read())
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], read()), start


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """Result of ``fn()`` and the peak growth of the resident set (bytes) while it ran."""
    result, peak, start = sample_peak(fn, _rss)
    return result, max(0, peak - start)


def compare(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object],
                                                                         dict[str, int]]:
    """Median seconds per function (run alternately, ``repeats`` rounds), last results, peak memory (first round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    memory: dict[str, int] = {}
    for r in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            if r == 0:
                results[name], memory[name] = peak_memory(fn)
            else:
                results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results, memory


def block_flops(model, n_tokens: int, ctx: int) -> float:
    """Multiply-add FLOPs (x2) of one block on ``n_tokens`` new tokens attending over ``ctx`` keys each."""
    weights = sum(p.numel() for p in model.blocks[0].parameters() if p.dim() >= 2)
    attn = 2 * model.cfg.n_heads * model.cfg.d_head * ctx  # scores + weighted sum
    return 2.0 * n_tokens * (weights + attn)


def unembed_flops(model, n_tokens: int) -> float:
    return 2.0 * n_tokens * model.cfg.d_model * model.cfg.d_vocab


def forward_flops(model, batch: int, width: int) -> float:
    """A full forward of ``batch`` rows of ``width`` tokens (causal attention: position i sees i+1 keys)."""
    per_row = sum(block_flops(model, 1, i + 1) for i in range(width)) * model.cfg.n_layers
    return batch * (per_row + unembed_flops(model, width))


def gpt2_small_dir() -> Path:
    """A randomly initialised GPT-2-small-shaped model (12 layers, d_model 768, 12 heads), saved once."""
    from mhop_lens.tiny_models import save_tiny_model

    path = CACHE / "gpt2-small-random"
    if not (path / "config.json").is_file():
        save_tiny_model(path, "gpt2", n_layers=12, d_model=768, n_heads=12, n_ctx=256, seed=0)
    return path


def random_queries(model, n: int, n_words: int = 5, seed: int = 0):
    """Two-hop-shaped queries over corpus words for random models (about ``3 + 2 * n_words`` tokens each)."""
    import random

    from mhop_lens.data.records import build_query
    from mhop_lens.tiny_models import CORPUS

    words = sorted({w.strip(".,:") for w in CORPUS.split() if w.strip(".,:").isalpha()})
    rng = random.Random(seed)
    out = []
    for i in range(n):
        e1, e2, e3 = (" ".join(rng.sample(words, 2)) for _ in range(3))
        r1, r2 = (" ".join(rng.sample(words, n_words - 2)) for _ in range(2))
        out.append(build_query(f"r{i}", e1, "r1", e2, "r2", e3, r1 + " of {}", r2 + " of {}"))
    return out


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def report(title: str, seconds: dict[str, float], memory: dict[str, int], ours: str, floor: float | None = None
           ) -> dict[str, float]:
    """Print one table: median time, peak memory and speedup of ``ours`` over every other entry."""
    print(f"\n{title}")
    ratios = {}
    for name, sec in seconds.items():
        ratio = sec / seconds[ours]
        ratios[name] = ratio
        mark = "" if name == ours else f"  ours is {ratio:.1f}x faster"
        print(f"  {name:<28} {sec:8.3f} s  peak +{fmt_bytes(memory.get(name, 0)):>9}{mark}")
    if floor is not None:
        print(f"  FLOP-floor ratio (reference / only-changed-positions): {floor:.1f}x")
    return ratios


def load_organism():
    """The shipped organism and its held-out queries, else a trained checkpoint in ./runs/organism, else None."""
    from mhop_lens.data import load_queries
    from mhop_lens.models import load_model

    try:
        return load_model("organism", device="cpu"), list(load_queries("organism:heldout"))
    except Exception as e:  # noqa: BLE001 - fall back below
        local = Path(__file__).resolve().parents[1] / "runs" / "organism"
        if not (local / "config.json").is_file():
            print(f"organism not available ({e}); skipping it")
            return None, None
        print(f"organism not shipped yet; using {local}")
        return load_model(str(local), device="cpu"), list(load_queries(str(local / "world.json"), split="heldout"))
