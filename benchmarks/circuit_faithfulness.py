"""Circuit numbers for docs/patterns/find-a-faithful-circuit.md, on the in-context GAR organism (Yes/No counter-pairs
of the held-out classification rows; metric logit(Yes) - logit(No)).

1. Edge AtP and EAP-IG (1, 2, 5, 10, 30 steps) against exact path patching of every edge of the complete graph:
   Spearman (signed, |.|) and Pearson over all edges, the strongest exact edge, and the top-20 edges by |exact|.
2. Faithfulness curves (counter-pair and mean ablation) of the top-n edges by AtP and by EAP-IG, and of the top-n
   heads by exact patching and by AtP, each against random circuits of the same size.

Run: ``python benchmarks/circuit_faithfulness.py [--pairs 32] [--random 20] [--out results/circuit_faithfulness.json]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scipy.stats import spearmanr

from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import attribute, exact_patching
from mhop_lens.analyses.edge_attribution import (
    ALL_SIDES,
    EDGE_KEYS,
    aggregate_edges,
    attribute_edges,
    edge_agreement,
    exact_edge_patching,
)
from mhop_lens.analyses.faithfulness import faithfulness_curve, faithfulness_summary, smallest_faithful
from mhop_lens.analyses.heads import counter_pairs
from mhop_lens.models import load_model
from mhop_lens.organism_gar.evaluate import eval_examples
from mhop_lens.organism_gar.world import build_world


def top_edges(scores, exact, k: int = 20) -> dict:
    """Spearman over the k strongest exact edges and how many of them the method also ranks in its top k."""
    m = aggregate_edges(scores).merge(aggregate_edges(exact, "exact"), on=EDGE_KEYS, suffixes=("", "_exact"))
    strongest = m.reindex(m["mean_exact"].abs().sort_values(ascending=False).index).head(k)
    own = set(m.reindex(m["mean"].abs().sort_values(ascending=False).index).head(k).index)
    return {f"top{k}_spearman": float(spearmanr(strongest["mean"], strongest["mean_exact"]).statistic),
            f"top{k}_overlap": len(own & set(strongest.index))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--random", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "circuit_faithfulness.json"))
    args = parser.parse_args()
    model = load_model("organism-gar", device="cpu")
    cls = [e for e in eval_examples(build_world(), 8) if e.kind == "cls"]
    pairs = counter_pairs(model, cls).subset(range(args.pairs))
    metric = metrics.yes_no(model, len(pairs))
    clean, corrupt = pairs.clean, pairs.corrupted
    out: dict = {"pairs": len(pairs), "agreement": {}, "faithfulness": {}}
    t0 = time.perf_counter()
    scored = {"atp": attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES)}
    exact = exact_edge_patching(model, clean, corrupt, metric, scored["atp"])
    out["exact_seconds"] = time.perf_counter() - t0
    for steps in (1, 2, 5, 10, 30):
        t0 = time.perf_counter()
        scored[f"eap-ig {steps}"] = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, ig_steps=steps)
        scored[f"eap-ig {steps}"].attrs["wall"] = time.perf_counter() - t0
    for name, frame in scored.items():
        out["agreement"][name] = {**edge_agreement(frame, exact), **top_edges(frame, exact),
                                  "forwards_per_batch": frame.attrs["forwards_per_batch"]}
        print(name, json.dumps(out["agreement"][name]), flush=True)
    heads = {"exact": exact_patching(model, clean, corrupt, metric, sites=("z",)),
             "atp": attribute(model, clean, corrupt, metric, sites=("z",))}
    runs = [("edges", "atp", scored["atp"], [5, 10, 20, 40, 80, 160, 320]),
            ("edges", "eap-ig 5", scored["eap-ig 5"], [5, 10, 20, 40, 80, 160, 320]),
            ("heads", "exact", heads["exact"], [1, 2, 4, 6, 8, 12]),
            ("heads", "atp", heads["atp"], [1, 2, 4, 6, 8, 12])]
    for level, name, scores, sizes in runs:
        for ablation in ("counter", "mean"):
            curve = faithfulness_curve(model, clean, corrupt, metric, scores, level=level, sizes=sizes,
                                       n_random=args.random if level == "edges" else 2 * args.random + 10,
                                       ablation=ablation)
            summary = faithfulness_summary(curve)
            key = f"{level} {name} {ablation}"
            out["faithfulness"][key] = {"summary": summary.round(4).to_dict("records"),
                                        "smallest_n_at_0.8": smallest_faithful(curve, 0.8),
                                        "metric_full": curve.attrs["metric_full"],
                                        "metric_empty": curve.attrs["metric_empty"]}
            print(key, f"(full {curve.attrs['metric_full']:.2f}, empty {curve.attrs['metric_empty']:.2f})")
            print(summary.round(3).to_string(index=False), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
