"""True/False heads of the GAR organism end to end: classes, the paper's intervention, and the set controls.

Split of the held-out counter-pairs (``eval_examples(world, n_per_task)``; contexts never trained on): the first
``--select`` pairs choose the heads (exact per-head patching: top k; head classes from direct effects and a probe),
the remaining pairs are the null's rows (the chosen top-k ablated vs every k-head set, single-head table). The
interventions run on every Yes/No row (the True/False heads are fixed before they run).
Run: ``python benchmarks/heads_truth.py [--model organism-gar] [--n-per-task 100] [--select 300]
[--null-pairs 100] [--n-random 50] [--out r.json]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mhop_lens.analyses import head_interventions as hi
from mhop_lens.analyses import heads as hd
from mhop_lens.models import load_model
from mhop_lens.organism_gar.evaluate import eval_examples
from mhop_lens.organism_gar.world import build_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-gar")
    parser.add_argument("--n-per-task", type=int, default=100)
    parser.add_argument("--select", type=int, default=300, help="Counter-pairs that choose the heads.")
    parser.add_argument("--null-pairs", type=int, default=100,
                        help="Held-out counter-pairs after the selection ones whose rows the null is scored on.")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n-random", type=int, default=50, help="Random head sets for the intervention control.")
    parser.add_argument("--min-probe", type=float, default=hd.MIN_PROBE,
                        help="classify's probe threshold (a sensitivity run; the documented rule uses the default).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_model(args.model, device="cpu")
    examples = eval_examples(build_world(), n_per_task=args.n_per_task)
    pairs = hd.counter_pairs(model, examples)
    sel = pairs.subset(range(min(args.select, len(pairs))))
    scores = hd.head_scores(model, sel, exact=True, batch_size=50)
    if args.min_probe != hd.MIN_PROBE:
        scores = hd.classify(scores.drop(columns=["head_class", "yes_on_true", "no_on_false"], errors="ignore"),
                             min_probe=args.min_probe)
    top = hd.select(scores, args.k)
    chosen = [(int(l), int(h)) for l, h in zip(top["layer"], top["head"], strict=True)]
    cls = scores[["layer", "head", "exact", "direct_true", "direct_false", "probe_acc", "act_d", "head_class"]]
    print(cls.round(3).to_string(index=False), flush=True)
    true_heads = [(int(r.layer), int(r.head)) for r in scores.itertuples() if r.head_class == "True"]
    false_heads = [(int(r.layer), int(r.head)) for r in scores.itertuples() if r.head_class == "False"]
    held = set(pairs.pair_ids[len(sel):len(sel) + args.null_pairs])
    null_rows = [ex for ex in examples if ex.pair_id in held]
    frame, summary = hi.null_sets(model, null_rows, chosen)
    print(json.dumps(summary, indent=1), flush=True)
    single = hi.single_head_table(model, null_rows)
    print(single.round(3).to_string(index=False), flush=True)
    table, rand = hi.truth_interventions(model, examples, true_heads, false_heads, n_random=args.n_random)
    print(table.round(3).to_string(index=False), flush=True)
    r_all = rand[rand["rows"] == "all"]
    lab = table[(table["variant"] == "label") & (table["rows"] == "all")].iloc[0]
    control = {"n_random": len(r_all), "net_mean": float(r_all["net"].mean()), "net_max": int(r_all["net"].max()),
               "fixed_share_failures_mean": float(rand[rand["rows"] == "failures"]["fixed_share"].mean()),
               "share_random_net_ge_label": float((r_all["net"] >= lab["net"]).mean())}
    print(json.dumps(control), flush=True)
    out = {"model": args.model, "min_probe": args.min_probe,
           "pairs": len(pairs), "select_pairs": len(sel), "null_rows": len(null_rows),
           "chosen_top_k": [f"L{l}H{h}" for l, h in chosen], "true_heads": [f"L{l}H{h}" for l, h in true_heads],
           "false_heads": [f"L{l}H{h}" for l, h in false_heads], "head_classes": cls.to_dict("records"),
           "null": summary, "null_accuracy_quantiles": frame["accuracy"].quantile([0, .05, .25, .5, .75, 1]).to_dict(),
           "single_head": single.to_dict("records"), "interventions": table.to_dict("records"),
           "intervention_random_control": control, "seconds": time.perf_counter() - t0}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
