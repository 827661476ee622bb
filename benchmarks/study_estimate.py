"""Cost of the full two-hop study (82,020 queries) on full-depth models, from measured forward-pass units.

Per analysis (evaluation, lens, entity decoding, knockout, back-patching) ``bench_width.py`` measured the cost per
query in units of one clean forward and the share of its FLOP floor it reaches, at some depth. Here each
analysis's FLOP floor is recomputed at full depth (32 layers for Llama-3-8B / Llama-2-7B; the counts of layer pairs
and centres grow with depth) and divided by the measured share: cost per query at full depth in forward units.
Evaluation has no floor here; its measured units are used as they are (they do not grow with depth). Times: the
forward units x the FLOPs of one query's clean forward / (the GPU's peak x a stated utilisation); where the JSON
comes from a GPU run, also at the forward's own measured throughput.

Run: ``python benchmarks/study_estimate.py [--json results.json ...] [--peak-tflops 989] [--utilisation 0.4]``
(``mhop-lens bench --study``).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_width import flops  # noqa: E402
from common import forward_flops  # noqa: E402

STUDY_QUERIES = 82_020
ANALYSES = ("evaluation", "lens", "entity decoding", "knockout", "back-patching")
GPU_JSON = HERE / "results" / "gpu" / "width_bf16.json"
CPU_JSON = "width_cpu_*.json"  # one per shape, from bench_width.py on this CPU machine
#: H200 dense bf16 tensor-core peak (TFLOP/s, no sparsity).
H200_PEAK = 989.0


def stub(shape: str, n_layers: int | None = None):
    """An object with the ``cfg`` and ``blocks[0].parameters()`` the FLOP counters read, for a real shape, on the
    meta device (no memory)."""
    from mhop_lens.tiny_models import REAL_SHAPES

    s = REAL_SHAPES[shape]
    d, h, kv, mlp = s["d_model"], s["n_heads"], s["n_kv_heads"], s["d_mlp"]
    d_head = d // h
    shapes = [(h * d_head, d), (kv * d_head, d), (kv * d_head, d), (d, h * d_head), (mlp, d), (mlp, d), (d, mlp)]
    params = [torch.empty(x, device="meta") for x in shapes]
    block = types.SimpleNamespace(parameters=lambda: iter(params))
    cfg = types.SimpleNamespace(n_layers=n_layers or s["n_layers"], n_heads=h, d_head=d_head, d_model=d,
                                d_vocab=s["vocab_size"])
    return types.SimpleNamespace(cfg=cfg, blocks=[block])


def estimate(result: dict, peak: float, utilisation: float) -> list[str]:
    shape, n, width = result["shape"], result["queries"], result["width"]
    full = stub(shape)
    floors = {k: v[0] for k, v in flops(full, n, width).items()}
    fwd = floors["clean forward"]
    per_query_flops = forward_flops(full, 1, width)
    lines = [f"\n## {shape}, full depth ({full.cfg.n_layers} layers), {width}-token prompts; measured at "
             f"{result['layers']} layers, {result['dtype']} on {result['device']}",
             "| analysis | measured cost / floor (forwards per query) | share of floor | full depth: floor | "
             "full depth: cost per query | study (82,020 queries) |", "|---|---|---|---|---|---|"]
    total, missing = 0.0, []
    for name in ANALYSES:
        m = result["analyses"].get(name)
        if m is None:
            lines.append(f"| {name} | not measured | | | | |")
            missing.append(name)
            continue
        if m.get("floor_units"):
            share = m["floor_units"] / m["units"]
            floor_full = floors[name] / fwd
            cost = floor_full / share
            lines.append(f"| {name} | {m['units']:.2f} / {m['floor_units']:.2f} | {share:.0%} | {floor_full:.2f} | "
                         f"{cost:.2f} | {cost * STUDY_QUERIES:,.0f} forwards |")
        else:
            cost = m["units"]
            lines.append(f"| {name} | {cost:.2f} / - | - | - | {cost:.2f} (as measured) | "
                         f"{cost * STUDY_QUERIES:,.0f} forwards |")
        total += cost
    study_flops = total * STUDY_QUERIES * per_query_flops
    seconds = study_flops / (peak * 1e12 * utilisation)
    label = "all five" if not missing else f"measured ones (WITHOUT {', '.join(missing)})"
    lines.append(f"| **{label}** | | | | **{total:.1f}** | **{total * STUDY_QUERIES:,.0f} forwards** |")
    lines.append(f"one clean forward of one {width}-token query at full depth: {per_query_flops / 1e12:.3f} TFLOP; "
                 f"{'study' if not missing else 'these analyses'}: {study_flops / 1e15:,.0f} PFLOP = "
                 f"**{seconds / 3600:.1f} GPU-hours** at {utilisation:.0%} "
                 f"of a {peak:.0f} TFLOP/s GPU (H200 bf16 dense)")
    if str(result["device"]).startswith("cuda") and result["layers"] == full.cfg.n_layers:
        measured = result["forward_tflops"]
        lines.append(f"at the clean forward's measured throughput in that run ({measured:.0f} TFLOP/s, "
                     f"{result['queries']} queries per batch): {study_flops / (measured * 1e12) / 3600:.1f} "
                     "GPU-hours")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", nargs="*", default=None, help="bench_width.py results (default: the newest "
                        "committed GPU run, else the CPU run)")
    parser.add_argument("--peak-tflops", type=float, default=H200_PEAK)
    parser.add_argument("--utilisation", type=float, default=0.4)
    args = parser.parse_args()
    if args.json:
        paths = [Path(p) for p in args.json]
    else:
        paths = [GPU_JSON] if GPU_JSON.is_file() else sorted((HERE / "results").glob(CPU_JSON))
    if not paths:
        print("Error: no bench_width.py results found; run `python benchmarks/bench_width.py --shapes llama3-8b "
              "--json benchmarks/results/width_cpu_llama3-8b.json` first.")
        return 1
    print(f"Two-hop study: {STUDY_QUERIES:,} queries x (evaluation, lens, entity decoding, knockout, back-patching); "
          f"from {', '.join(str(p) for p in paths)}")
    for path in paths:
        for result in json.loads(path.read_text()):
            if result["shape"] in ("llama3-8b", "llama2-7b", "llama2-13b"):
                print("\n".join(estimate(result, args.peak_tflops, args.utilisation)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
