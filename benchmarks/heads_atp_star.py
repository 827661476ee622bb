"""AtP, AtP* and integrated gradients vs exact per-head patching on the GAR organism's held-out Yes/No counter-pairs.

Issue 15's acceptance setting: 400 held-out counter-pairs (``eval_examples(world, 100)``, the shipped seed-0
organism), metric logit(Yes) - logit(No), every head's ``hook_z``. Prints signed and |.| Spearman, how many of
exact patching's top 4 are in each method's top 6, the top exact head's estimate, and passes per batch.
``--diagnose L0H1 [--diagnose-pairs 64]`` instead adds the head's write (``delta z W_O``) to the attention input
of single later layers of the corrupted run and prints the metric change per route (why AtP* misses it).
AtP* runs with every QK fix (``atp-star:chained``, the library default, ``atp-star:exact``, the paper's one-softmax
depth, and ``atp-star:frozen-norm``; ``--methods``).
Run: ``python benchmarks/heads_atp_star.py [--pairs 400] [--model organism-gar] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import attribute, cost_line, exact_patching, rank_agreement
from mhop_lens.analyses.heads import counter_pairs
from mhop_lens.models import load_model
from mhop_lens.organism_gar.evaluate import eval_examples
from mhop_lens.organism_gar.world import build_world


@torch.no_grad()
def diagnose(model, pairs, metric, layer: int, head: int) -> dict[str, float]:
    """Metric change when the head's clean-minus-corrupted write enters only some later attention inputs (or the
    MLP inputs), against the head's full patching effect."""
    from mhop_lens.analyses.attribution import encode_pairs, end_logits
    from mhop_lens.forward import run, run_with_cache

    rows = torch.arange(len(pairs))
    clean, corrupt = encode_pairs(model, pairs.clean, pairs.corrupted)
    name = f"blocks.{layer}.attn.hook_z"
    _, c_cache = run_with_cache(model, clean, [name])
    _, k_cache = run_with_cache(model, corrupt, [name])
    write = (c_cache[name][:, :, head] - k_cache[name][:, :, head]) @ model.W_O[layer, head]
    base = metric(end_logits(run(model, corrupt), corrupt), rows).mean()

    def effect(hook_names: list[str]) -> float:
        edits = [(n, lambda a, hook: a + write) for n in hook_names]
        return float(metric(end_logits(run(model, corrupt, edits), corrupt), rows).mean() - base)

    def patch(a, hook):
        a = a.clone()
        a[:, :, head] = c_cache[name][:, :, head]
        return a

    later = list(range(layer + 1, model.cfg.n_layers))
    out = {"full_patch": float(metric(end_logits(run(model, corrupt, [(name, patch)]), corrupt), rows).mean() - base)}
    for l in later:
        out[f"attention_L{l}_only"] = effect([f"blocks.{l}.ln1.hook_in"])
    out["attention_all_later"] = effect([f"blocks.{l}.ln1.hook_in" for l in later])
    out["mlps_only"] = effect([f"blocks.{l}.ln2.hook_in" for l in range(layer, model.cfg.n_layers)])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400)
    parser.add_argument("--model", default="organism-gar")
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--out", default=None)
    parser.add_argument("--methods", default="atp,atp-star:chained,atp-star:exact,atp-star:frozen-norm,ig",
                        help="Comma list beside exact patching: atp, ig, atp-star:chained, atp-star:exact, "
                             "atp-star:frozen-norm.")
    parser.add_argument("--diagnose", default=None, help="A head, e.g. L0H1: print its routes instead.")
    parser.add_argument("--diagnose-pairs", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, device="cpu")
    pairs = counter_pairs(model, eval_examples(build_world(), n_per_task=-(-args.pairs // 4)))
    pairs = pairs.subset(range(min(args.pairs, len(pairs))))
    metric = metrics.yes_no(model, len(pairs))
    if args.diagnose:
        import re

        layer, head = map(int, re.fullmatch(r"L(\d+)H(\d+)", args.diagnose).groups())
        sub = pairs.subset(range(min(args.diagnose_pairs, len(pairs))))
        print(json.dumps(diagnose(model, sub, metrics.yes_no(model, len(sub)), layer, head), indent=1))
        return
    runs, rows = {}, []
    methods = ["exact"] + [m for m in args.methods.split(",") if m != "exact"]
    for method in methods:
        t0 = time.perf_counter()
        if method == "exact":
            runs[method] = exact_patching(model, pairs.clean, pairs.corrupted, metric, batch_size=args.batch_size)
        else:
            name, _, fix = method.partition(":")
            runs[method] = attribute(model, pairs.clean, pairs.corrupted, metric, sites=("z",), method=name,
                                     ig_steps=args.ig_steps if name == "ig" else 0, batch_size=args.batch_size,
                                     qk_fix=fix or "chained")
        seconds = time.perf_counter() - t0
        print(f"[{method}] {seconds:.1f}s; {cost_line(runs[method].attrs)}", flush=True)
        columns = {"atp": ["atp"], "ig": ["atp_ig"]}.get(method, ["atp_star", "atp_star_gd", "atp"]
                                                           if method.startswith("atp-star") else [])
        for col in columns:
            agree = rank_agreement(runs[method], runs["exact"], value=col)
            rows.append({**{k: v for k, v in runs[method].attrs.items() if isinstance(v, int | float | str)},
                         "method": method, "column": col, "pairs": len(pairs), "seconds": seconds, **agree})
            print(f"  {col}: Spearman {agree['spearman']:.3f} (|.| {agree['spearman_abs']:.3f}); exact top 4 in "
                  f"top 6: {agree['exact_top4_in_top6']}/4 (missed: {agree['exact_top4_missed'] or '-'}); "
                  f"top exact {agree['top_exact_node']} {agree['top_exact_effect']:+.2f} vs "
                  f"{agree['top_exact_atp']:+.2f}", flush=True)
    rows.append({"method": "exact", "pairs": len(pairs),
                 **{k: v for k, v in runs["exact"].attrs.items() if isinstance(v, int | float | str)}})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
