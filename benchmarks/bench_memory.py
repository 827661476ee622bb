"""Loading memory at real shapes: anonymous-memory peak of ``load_model`` / the library's weight processing.

``TransformerBridge.enable_compatibility_mode`` processes a whole copy of the state dict (issue 19: ~2.2x the
weights); ``load_model`` now processes one block at a time (``mhop_lens.lean_weights``). Each measurement runs in
its own process (a fresh allocator), samples RssAnon every millisecond (the memory-mapped weight file is not
anonymous), and reports the peak over the fp32 weights. Both paths' processed weights are checked equal on the
small shapes. Acceptance: peak <= 1.3x the weights at both shapes.

Run: ``python benchmarks/bench_memory.py [--quick] [--library]`` (``--library`` also measures the library's own
path, ~2.2x: at 1 layer on the Llama-3 shape so it fits beside other jobs).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(shape: str, n_layers: int, lean: bool, dtype: str = "fp32") -> dict:
    """Load in a child process and return its numbers."""
    code = f"""
import json, sys
sys.path.insert(0, {str(HERE)!r})
import torch
from real_shapes import shaped_dir, peak_anon, weight_bytes
from mhop_lens.models import load_model
from mhop_lens import lean_weights
path = shaped_dir({shape!r}, {n_layers})
if not {lean}:
    lean_weights.install = lambda bridge: "library path requested"
model, peak, start = peak_anon(lambda: load_model(str(path), device="cpu", dtype={dtype!r}))
print(json.dumps(dict(peak=peak, start=start, weights=weight_bytes(model), path=model.mhop_weight_processing,
                      params=sum(p.numel() for p in model.original_model.parameters()))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    import argparse

    sys.path.insert(0, str(HERE))
    from real_shapes import CPU_LAYERS, gib, shaped_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--library", action="store_true", help="also measure the library's whole-dict path")
    args = parser.parse_args()
    ok = True
    print("| shape | layers | params | fp32 weights | path | anonymous peak (growth) | peak / weights |")
    print("|---|---|---|---|---|---|---|")
    runs = [(shape, layers, True) for shape, layers in CPU_LAYERS.items()]
    if args.library:
        runs += [("llama3-8b", 1, False), ("llama3-8b", 1, True), ("llama2-7b", 2, False), ("llama2-7b", 2, True)]
    for shape, layers, lean in runs:
        shaped_dir(shape, layers)
        r = measure(shape, layers, lean)
        growth = r["peak"] - r["start"]
        ratio = growth / r["weights"]
        if lean:
            ok &= ratio <= 1.3
        print(f"| {shape} | {layers} | {r['params'] / 1e9:.2f} B | {gib(r['weights'])} | {r['path']} | "
              f"{gib(growth)} | **{ratio:.2f}x** |", flush=True)
    print(f"\nacceptance (lean path <= 1.3x the weights): {'OK' if ok else 'NOT MET'}")
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
