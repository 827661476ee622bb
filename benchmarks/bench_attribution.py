"""AtP and AtP* over all heads vs exact per-head patching: time, passes per batch, Spearman rank agreement.

Settings (each skipped with a note when its model is missing):
- ``organism-gar``: the in-context GAR organism on its lookup: generation rows with the query key swapped for
  another context key (metric logit clean answer - logit corrupt answer; its Yes/No forms are at chance);
- ``organism``: the two-hop organism on pairs differing in e1 (metric logit clean answer - logit corrupt answer);
- ``tiny``: a tiny random GPT-2 (word vocabulary) on GAR Yes/No counter-pairs (mechanics only);
- ``gpt2-small-shape``: a random 12-layer, 768-d, 12-head GPT-2 on two-hop-style prompts (cost at real width).

AtP* (``method="atp-star"``) is timed beside AtP with every QK fix (``exact``, ``frozen-norm``, ``chained``;
columns ``star_<fix>_*``; the chained fix also without GradDrop, ``star_chained_no_grad_drop_*``), each with its
passes per batch and forward-equivalents (matmul FLOPs actually run over one forward of the batch,
activation-gradient backwards included; equal to torch's ``FlopCounterMode``, tests/test_attribution.py);
``star_<fix>_flop_ratio`` = exact patching's forward-equivalents / AtP*'s (the cost acceptance),
``star_<fix>_flop_ratio_2x_backward`` the same with backwards counted at 2x a forward, ``star_<fix>_speedup`` =
exact time / AtP* time in the same run.
Run: ``python benchmarks/bench_attribution.py [--quick] [--settings gpt2-small-shape]
[--out results.json]``. Ratios compare runs made here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from mhop_lens.analyses import metrics
from mhop_lens.analyses.atp_star import QK_FIXES
from mhop_lens.analyses.attribution import attribute, cost_line, exact_patching, rank_agreement
from mhop_lens.errors import ModelLoadError
from mhop_lens.models import load_model


def _gar_pairs(model, examples, n):
    from mhop_lens.analyses.heads import counter_pairs

    p = counter_pairs(model, examples)
    idx = list(range(min(n, len(p))))
    p = p.subset(idx)
    return p.clean, p.corrupted, metrics.yes_no(model, len(p))


def _organism_pairs(model, n):
    from mhop_lens.analyses.pairs import two_hop_pairs
    from mhop_lens.models import builtin_dir
    from mhop_lens.organism.world import World

    p = two_hop_pairs(World.load(builtin_dir("organism") / "world.json"), n)
    return p.clean, p.corrupted, metrics.clean_vs_corrupt_answer(model, p.clean_answers, p.corrupt_answers)


def _synthetic_pairs(model, n):
    """Two-hop-style prompts differing in one word, kept where the two have equal token counts."""
    from mhop_lens.analyses.attribution import aligned_pairs

    words = ["Mary", "John", "Paris", "Rome", "Hamlet", "Imagine", "Japan", "London", "David", "Sharon", "Yoko",
             "Kyoto", "Seattle", "Microsoft", "Lennon", "Thames"]
    cand = [(a, b) for a in words for b in words if a != b]
    clean = [f"The spouse of the author of {a} is" for a, _ in cand]
    corrupt = [f"The spouse of the author of {b} is" for _, b in cand]
    keep = aligned_pairs(model, clean, corrupt)[:n]
    clean, corrupt = [clean[i] for i in keep], [corrupt[i] for i in keep]
    return clean, corrupt, metrics.clean_vs_corrupt_answer(model, [" Yoko"] * len(keep), [" Paris"] * len(keep))


def measure(name, model, clean, corrupt, metric, batch_size, ig_steps=0):
    """AtP (and optional IG) vs exact patching of every head on the same pairs (after one warm-up pass)."""
    attribute(model, clean[:1], corrupt[:1], metric, sites=("z",))
    t0 = time.perf_counter()
    atp = attribute(model, clean, corrupt, metric, sites=("z",), batch_size=batch_size)
    t_atp = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = exact_patching(model, clean, corrupt, metric, sites=("z",), batch_size=batch_size)
    t_exact = time.perf_counter() - t0
    agree = rank_agreement(atp, exact)
    row = {"setting": name, "pairs": len(clean), "heads": model.cfg.n_layers * model.cfg.n_heads,
           "atp_s": t_atp, "atp_forwards_per_batch": atp.attrs["forwards_per_batch"],
           "atp_backwards_per_batch": atp.attrs["backwards_per_batch"], "exact_s": t_exact,
           "exact_forwards_per_batch": exact.attrs["forwards_per_batch"], "speedup": t_exact / t_atp,
           "metric_clean": float(atp["metric_clean"].mean()), "metric_corrupt": float(atp["metric_corrupt"].mean()),
           **agree, "exact_forward_equivalents_per_batch": exact.attrs["forward_equivalents_per_batch"],
           "atp_forward_equivalents_per_batch": atp.attrs["forward_equivalents_per_batch"],
           "exact_cost": cost_line(exact.attrs)}
    for fix, grad_drop in [(f, True) for f in QK_FIXES] + [("chained", False)]:
        kw = dict(sites=("z",), method="atp-star", qk_fix=fix, grad_drop=grad_drop)
        attribute(model, clean[:1], corrupt[:1], metric, **kw)
        t0 = time.perf_counter()
        star = attribute(model, clean, corrupt, metric, batch_size=batch_size, **kw)
        t_star = time.perf_counter() - t0
        star_agree = rank_agreement(star, exact, value="atp_star")
        key = "star_" + fix.replace("-", "_") + ("" if grad_drop else "_no_grad_drop")
        row.update({f"{key}_s": t_star, f"{key}_speedup": t_exact / t_star, f"{key}_cost": cost_line(star.attrs),
                    f"{key}_qk_fix_used": star.attrs["qk_fix_used"],
                    f"{key}_forward_equivalents_per_batch": star.attrs["forward_equivalents_per_batch"],
                    f"{key}_flop_ratio": exact.attrs["forward_equivalents_per_batch"]
                    / star.attrs["forward_equivalents_per_batch"],
                    f"{key}_flop_ratio_2x_backward": exact.attrs["forward_equivalents_per_batch"]
                    / star.attrs["forward_equivalents_2x_backward_per_batch"],
                    f"{key}_spearman": star_agree["spearman"], f"{key}_spearman_abs": star_agree["spearman_abs"],
                    f"{key}_top_exact_atp": star_agree["top_exact_atp"]})
        print(f"[{name}] AtP* qk_fix={fix}{'' if grad_drop else ' without GradDrop'} {t_star:.2f}s "
              f"({row[f'{key}_cost']}; {row[f'{key}_qk_fix_used']}): "
              f"{row[f'{key}_flop_ratio']:.1f}x cheaper than exact patching by FLOPs "
              f"({row[f'{key}_flop_ratio_2x_backward']:.1f}x with backwards at 2x), {row[f'{key}_speedup']:.1f}x "
              f"faster; Spearman {row[f'{key}_spearman']:.3f} (|.| {row[f'{key}_spearman_abs']:.3f})", flush=True)
    if ig_steps:
        t0 = time.perf_counter()
        ig = attribute(model, clean, corrupt, metric, sites=("z",), batch_size=batch_size, ig_steps=ig_steps)
        ig_agree = rank_agreement(ig, exact)
        row.update(ig_steps=ig_steps, ig_s=time.perf_counter() - t0, ig_spearman=ig_agree["spearman"],
                   ig_spearman_abs=ig_agree["spearman_abs"], ig_top_exact_atp=ig_agree["top_exact_atp"])
    print(f"[{name}] {row['pairs']} pairs x {row['heads']} heads: AtP {t_atp:.2f}s "
          f"({row['atp_forwards_per_batch']:.0f} fwd + {row['atp_backwards_per_batch']:.0f} bwd per batch) vs exact "
          f"{t_exact:.2f}s ({row['exact_forwards_per_batch']:.0f} fwd per batch): {row['speedup']:.1f}x; Spearman "
          f"{agree['spearman']:.3f} (|.| {agree['spearman_abs']:.3f}); top exact {agree['top_exact_node']} "
          f"{agree['top_exact_effect']:+.3f} vs AtP {agree['top_exact_atp']:+.3f}"
          + (f"; IG({ig_steps}) Spearman {row['ig_spearman']:.3f}" if ig_steps else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Few pairs, smaller settings (a minute on a laptop).")
    parser.add_argument("--out", default=None, help="Write the rows as JSON here.")
    parser.add_argument("--ig-steps", type=int, default=8)
    parser.add_argument("--settings", default="organism-gar,organism,tiny,gpt2-small-shape",
                        help="Comma list of settings to run.")
    args = parser.parse_args()
    settings = args.settings.split(",")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    n = 8 if args.quick else 64
    rows = []
    for name in [s for s in ("organism-gar", "organism") if s in settings]:
        try:
            model = load_model(name, device="cpu")
        except ModelLoadError as e:
            print(f"[{name}] skipped: {str(e).splitlines()[0]}")
            continue
        if name == "organism-gar":
            from mhop_lens.analyses.pairs import gar_query_pairs
            from mhop_lens.organism_gar.evaluate import eval_examples
            from mhop_lens.organism_gar.world import build_world

            world = build_world()
            p = gar_query_pairs(eval_examples(world, n_per_task=max(4, n // 2)), world, n)
            clean, corrupt = p.clean, p.corrupted
            metric = metrics.clean_vs_corrupt_answer(model, p.clean_answers, p.corrupt_answers)
        else:
            clean, corrupt, metric = _organism_pairs(model, n)
        rows.append(measure(name, model, clean, corrupt, metric, batch_size=16, ig_steps=args.ig_steps))
    with tempfile.TemporaryDirectory() as tmp:
        from mhop_lens.gar import generate
        from mhop_lens.tiny_models import make_tokenizer, save_tiny_model

        exs = generate(["things"], forms=["cls"], n_r=(0, 1), n_per_task=max(2, n // 8), n_demos=0)
        words = sorted({w for e in exs for w in e.prompt.split()} | {"Yes", "No"})
        tiny = load_model(save_tiny_model(f"{tmp}/tiny", "gpt2", n_layers=4, d_model=64, n_heads=4, n_ctx=256,
                                          tokenizer=make_tokenizer("word", words=words)), device="cpu")
        if "tiny" in settings:
            rows.append(measure("tiny", tiny, *_gar_pairs(tiny, exs, n), batch_size=16, ig_steps=args.ig_steps))
        if "gpt2-small-shape" not in settings:
            return _write(rows, args.out)
        big = load_model(save_tiny_model(f"{tmp}/gpt2s", "gpt2", n_layers=12, d_model=768, n_heads=12),
                         device="cpu")
        m = 4 if args.quick else 16
        rows.append(measure("gpt2-small-shape", big, *_synthetic_pairs(big, m), batch_size=m))
    _write(rows, args.out)


def _write(rows: list, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
