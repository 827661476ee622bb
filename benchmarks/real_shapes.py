"""Real model shapes for benchmarks: cached random-init checkpoints, anonymous-memory peaks, FLOP units.

Timing and memory do not depend on weight values, so a random model of Llama-3-8B's or Llama-2-7B's shape with the
depth this machine holds tells the cost per layer; full-depth figures scale from the forward-pass units.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from common import CACHE, sample_peak

#: Depths this 24 GiB, shared CPU machine holds in fp32 alongside the work (state them with every number).
CPU_LAYERS = {"llama3-8b": 3, "llama2-7b": 4, "tiny-llama": 2}
#: A small stand-in with the Llama layout (GQA, RoPE, a vocabulary past the tokenizer's) to test the scripts.
TEST_SHAPES = {"tiny-llama": dict(arch="llama", vocab_size=4096, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                                  d_mlp=128, n_ctx=256)}


def shaped_dir(shape: str, n_layers: int | None, weights: bool = True) -> Path:
    """A saved random model of ``shape`` (``tiny_models.REAL_SHAPES``) with ``n_layers`` layers, built once."""
    from mhop_lens.tiny_models import save_shaped_model

    path = CACHE / f"{shape}-L{n_layers or 'full'}{'' if weights else '-config'}"
    done = path / ("model.safetensors.index.json" if weights else "config.json")
    if not (path / "config.json").is_file() or not (
            done.is_file() or (path / "model.safetensors").is_file() or not weights):
        save_shaped_model(path, TEST_SHAPES.get(shape, shape), n_layers=n_layers, weights=weights)
    return path


def anon_bytes() -> int:
    """Anonymous resident memory of this process (heap, torch tensors; not the mapped weight files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_anon(fn: Callable[[], object]) -> tuple[object, int, int]:
    """Result of ``fn()``, the anonymous-memory peak (absolute, bytes) while it ran, and the value at the start."""
    return sample_peak(fn, anon_bytes, every=0.001)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.original_model.parameters())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "2"))
