"""Every analysis at real model widths, in units of one clean forward of the same model and batch.

Models: random-init Llama-3-8B shape (d_model 4096, 32 heads, 8 kv heads, d_mlp 14336, vocab 128,256, RoPE) and
Llama-2-7B shape (32 heads, no GQA, vocab 32,000), at the depth the machine holds (``--layers``; CPU default:
``real_shapes.CPU_LAYERS``; ``--layers full`` = 32). Timing does not depend on weight values.

For each analysis: seconds per batch, **cost per query in clean-forward units** (its time / the time of one clean
forward of the same batch), its **FLOP floor** in the same units (the FLOPs an exact method must spend / the
clean forward's FLOPs; how each floor is counted is printed beside it), the share of the floor reached
(floor / cost) and the peak memory per query (CPU: anonymous-RSS growth; GPU: CUDA allocator peak growth).
Baselines with a target (back-patching's per-pair reference, ``transformer_lens.patching``) are timed in the same
run. Results go to ``--json`` for ``study_estimate.py`` (``mhop-lens bench --study``).

Run: ``python benchmarks/bench_width.py [--quick] [--shapes llama3-8b,llama2-7b] [--layers N|full]
[--device cuda --dtype bf16] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import block_flops, forward_flops, random_queries, unembed_flops  # noqa: E402
from real_shapes import CPU_LAYERS, anon_bytes, gib, shaped_dir  # noqa: E402

from mhop_lens.analyses.backpatch import all_pairs, run_backpatch  # noqa: E402
from mhop_lens.models import load_model  # noqa: E402
from mhop_lens.tokens import encode  # noqa: E402


class Meter:
    """Wall time (synchronised on CUDA) and peak memory growth of a call."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __call__(self, fn, repeats: int = 1):
        times, peak = [], 0
        result = None
        for r in range(repeats):
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            if self.cuda:
                result = fn()
                torch.cuda.synchronize()
                if r == 0:
                    peak = torch.cuda.max_memory_allocated() - base
            elif r == 0:
                from real_shapes import peak_anon

                result, top, base = peak_anon(fn)
                peak = top - base
            else:
                result = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), peak, result


def build(shape: str, layers: int | None, device: str, dtype: str):
    """Load the shape: from a saved random checkpoint (CPU), or built on the device from its config (GPU)."""
    if device.startswith("cuda"):
        from mhop_lens.tiny_models import build_shaped_model

        path = shaped_dir(shape, layers, weights=False)
        hf = build_shaped_model(path, device=device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16,
                                                            "fp32": torch.float32}[dtype])
        return load_model(str(path), device=device, dtype=dtype, hf_model=hf)
    return load_model(str(shaped_dir(shape, layers)), device=device, dtype=dtype)


def flops(model, n: int, width: int) -> dict[str, tuple[float, str]]:
    """FLOP floors of each analysis for ``n`` queries of ``width`` tokens (FLOPs, how counted)."""
    L = model.cfg.n_layers
    fwd = forward_flops(model, n, width)
    one = lambda start: (L - start) * block_flops(model, 1, width) + unembed_flops(model, 1)  # noqa: E731
    blocks_only = fwd - n * unembed_flops(model, width) + n * unembed_flops(model, 1)
    lens = blocks_only + n * 3 * L * unembed_flops(model, 1)
    pairs = all_pairs(L)
    backpatch = blocks_only + n * sum(one(t + 1) for _, t in pairs)
    knockout = blocks_only + n * 3 * sum(one(max(0, c - 1)) for c in range(L))
    target = 40  # tokens of the few-shot target prompt, shared prefix computed once
    decode = blocks_only + n * 2 * sum((L - s) * block_flops(model, 1, target) + unembed_flops(model, 1)
                                       + 3 * (L * block_flops(model, 1, target) + unembed_flops(model, 1))
                                       for s in range(L))
    return {
        "clean forward": (fwd, "itself"),
        "lens": (lens, "blocks once + 3 sites x L layers of unembedding at the last position"),
        "entity decoding": (decode, "source forward + per (position, layer s): the target's last token from s "
                                    "up, 3 greedy tokens (target prefix shared)"),
        "knockout": (knockout, "clean forward + per (edge, centre): the last position from layer c-1 up "
                               "(lower bound for all->e1)"),
        "back-patching": (backpatch, "clean forward + per (s, t): the last position from t+1 up"),
    }


def acceptance(model, queries, t_fwd: float, meter: Meter, quick: bool) -> dict:
    """The issue's ratios at this shape, each against its baseline in this run: back-patching sweep vs the
    per-pair reference (and its FLOP floor), activation patching vs ``transformer_lens.patching`` (residual and
    heads), AtP over all heads in forward-equivalents per batch."""
    import bench_backpatch
    import bench_patching
    from bench_attribution import _synthetic_pairs

    from mhop_lens.analyses.attribution import attribute, exact_patching, rank_agreement

    out = {}
    r = bench_backpatch.bench("back-patching", model, queries, repeats=1, study_n=1, batch_size=len(queries),
                              ref_pairs=3 if quick else 6)
    out["backpatch_sweep"], out["backpatch_floor"] = r["sweep"], r["floor"]
    out["backpatch_share"] = r["sweep"] / r["floor"]
    print(f"  back-patching sweep {r['sweep']:.1f}x the per-pair reference, FLOP floor {r['floor']:.1f}x: "
          f"{out['backpatch_share']:.0%} of the floor (target >= 50%)", flush=True)
    pairs = bench_patching.same_length_pairs(model, random_queries(model, 60, seed=1), 1 if quick else 4)
    L = model.cfg.n_layers
    for sites, key in (("resid_pre", "resid"), ("z", "heads")):
        r = bench_patching.bench("activation patching", model, pairs, sites, repeats=1,
                                 site_subset=2 if quick else 4, layers=None if L <= 4 else [0, L // 2, L - 1])
        speed = r["transformer_lens.patching"]
        out[f"patching_{key}"], out[f"patching_{key}_floor"] = speed, r["floor"]
        target = "5x" if r["floor"] >= 5 else f"70% of the floor ({0.7 * r['floor']:.1f}x)"
        print(f"  activation patching {sites}: {speed:.1f}x transformer_lens.patching, floor {r['floor']:.1f}x "
              f"(target {target})", flush=True)
    clean, corrupt, metric = _synthetic_pairs(model, 4 if quick else 8)
    enc = encode(model, clean)
    with torch.no_grad():
        t_batch, _, _ = meter(lambda: model(enc.tokens, attention_mask=enc.attention_mask), 2)
    t_atp, m_atp, atp = meter(lambda: attribute(model, clean, corrupt, metric, sites=("z",), batch_size=len(clean)))
    out["atp_forwards"] = t_atp / t_batch
    out["atp_passes"] = {k: atp.attrs.get(k) for k in ("forwards_per_batch", "backwards_per_batch")}
    print(f"  AtP over all heads: {t_atp:.2f} s = {out['atp_forwards']:.2f} clean forwards of its batch "
          f"({len(clean)} pairs; target <= 3); passes {out['atp_passes']}", flush=True)
    if not quick:
        t_exact, _, exact = meter(lambda: exact_patching(model, clean, corrupt, metric, sites=("z",),
                                                         batch_size=len(clean)))
        agree = rank_agreement(atp, exact)
        out["atp_vs_exact"], out["atp_spearman"] = t_exact / t_atp, agree.get("spearman")
        print(f"  exact head patching {t_exact:.1f} s: AtP {t_exact / t_atp:.1f}x faster, Spearman "
              f"{agree.get('spearman'):.2f}", flush=True)
    return out


def run(shape: str, layers: int | None, device: str, dtype: str, n: int, quick: bool, accept: bool,
        only: set[str] | None = None) -> dict:
    meter = Meter(device)
    anon0 = anon_bytes()
    start = time.perf_counter()
    model = build(shape, layers, device, dtype)
    load_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.original_model.parameters())
    queries = random_queries(model, n, seed=1)
    enc = encode(model, [q.prompt for q in queries])
    width = enc.tokens.shape[1]
    L = model.cfg.n_layers
    print(f"\n## {shape}: {L} layers, d_model {model.cfg.d_model}, vocab {model.cfg.d_vocab}, {params / 1e9:.2f} B "
          f"params, {dtype} on {device}; {n} queries x {width} tokens; loaded in {load_s:.0f} s"
          + ("" if device.startswith("cuda") else f" (anonymous memory +{gib(anon_bytes() - anon0)})"), flush=True)
    floor = flops(model, n, width)
    fwd_flops = floor["clean forward"][0]
    repeats = 3 if device.startswith("cuda") else 1
    with torch.no_grad():
        model(enc.tokens, attention_mask=enc.attention_mask)  # warm-up
        t_fwd, m_fwd, _ = meter(lambda: model(enc.tokens, attention_mask=enc.attention_mask), repeats + 1)
    rows = {"clean forward": (t_fwd, m_fwd)}
    from mhop_lens.analyses.knockout import run_knockout
    from mhop_lens.analyses.lens import run_lens
    from mhop_lens.analyses.patchscope import run_patchscope
    from mhop_lens.evaluate import evaluate

    analyses = {
        "evaluation": lambda: evaluate(model, queries, batch_size=n, progress=False),
        "lens": lambda: run_lens(model, queries, batch_size=n, progress=False),
        "entity decoding": lambda: run_patchscope(model, queries, target_layers="same", batch_size=n * 2 * L,
                                                  progress=False),
        "knockout": lambda: run_knockout(model, queries, batch_size=n * 3 * L, progress=False),
        "back-patching": lambda: run_backpatch(model, queries, control=False, batch_size=n, progress=False),
    }
    results: dict[str, dict] = {}
    if only is not None:
        analyses = {k: v for k, v in analyses.items() if k in only}
    for name, fn in analyses.items():
        try:
            small = queries[:2]
            if name == "back-patching":
                run_backpatch(model, small, control=False, progress=False)  # fast-path check + captures
            t, m, out = meter(fn, repeats)
        except Exception as e:  # noqa: BLE001 - report and go on: one analysis must not hide the others
            print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            continue
        rows[name] = (t, m)
        if name == "back-patching":
            results[name] = {"path": out.attrs.get("path")}
    print(f"  unit: one clean forward of the batch = {t_fwd * 1e3:.0f} ms ({fwd_flops / t_fwd / 1e12:.2f} TFLOP/s); "
          f"peak memory per query: forward {m_fwd / n / 2**20:.0f} MiB")
    print("| analysis | s / batch | cost per query (forwards) | FLOP floor (forwards) | floor / cost | "
          "peak MiB / query | floor counted as |")
    print("|---|---|---|---|---|---|---|")
    for name, (t, m) in rows.items():
        units = t / t_fwd
        fl, how = floor.get(name, (None, "-"))
        f_units = fl / fwd_flops if fl else None
        share = f"{f_units / units:.0%}" if f_units else "-"
        fcol = f"{f_units:.2f}" if f_units else "-"
        print(f"| {name} | {t:.3f} | {units:.2f} | {fcol} | {share} | {m / n / 2**20:.0f} | {how} |", flush=True)
        results.setdefault(name, {}).update(seconds=t, units=units, floor_units=f_units, peak_per_query=m / n)
    if "back-patching" in results:
        print(f"  back-patching ran the {results['back-patching'].get('path')} path", flush=True)
    if accept:
        results["acceptance"] = acceptance(model, queries, t_fwd, meter, quick)
    return {"shape": shape, "layers": L, "d_model": model.cfg.d_model, "vocab": model.cfg.d_vocab, "params": params,
            "dtype": dtype, "device": device, "queries": n, "width": width, "forward_seconds": t_fwd,
            "forward_flops": fwd_flops, "forward_tflops": fwd_flops / t_fwd / 1e12, "analyses": results,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shapes", default="llama3-8b,llama2-7b")
    parser.add_argument("--layers", default=None, help="N, or 'full' (default: the CPU depths of real_shapes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--json", default=None)
    parser.add_argument("--analyses", default=None, help="comma-separated subset of: evaluation, lens, entity "
                        "decoding, knockout, back-patching ('' = none: only the clean forward and the acceptance)")
    parser.add_argument("--no-accept", action="store_true", help="skip the baselines (back-patching reference, "
                        "transformer_lens.patching, exact head patching)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for shape in args.shapes.split(","):
        layers = None if args.layers == "full" else int(args.layers) if args.layers else CPU_LAYERS[shape]
        only = None if args.analyses is None else {a.strip() for a in args.analyses.split(",") if a.strip()}
        out.append(run(shape, layers, args.device, args.dtype, args.queries, args.quick, not args.no_accept, only))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
