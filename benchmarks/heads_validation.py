"""Validation numbers for docs/heads.md: AtP vs exact head patching and top-k vs random head ablation.

On the two-hop organism (counter-pairs differing in e1; metric logit clean answer - logit corrupt answer) and, when
it ships, on the in-context GAR organism (Yes/No counter-pairs; True/False heads and interventions).
Run: ``python benchmarks/heads_validation.py [--pairs 128] [--out validation.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import aggregate, attribute, exact_patching, rank_agreement
from mhop_lens.analyses.head_interventions import intervene, summarize
from mhop_lens.errors import ModelLoadError
from mhop_lens.gar.examples import GarExample
from mhop_lens.models import builtin_dir, load_model


def two_hop_examples(world, n: int, seed: int = 0) -> list[GarExample]:
    """Two-hop queries as generation examples (task = split), scored over the full vocabulary."""
    rng = random.Random(seed)
    out = []
    for split in ("train", "heldout"):
        for e1, r1, r2 in rng.sample(world.two_hop[split], n):
            q = world.query(e1, r1, r2)
            out.append(GarExample(id=f"{e1}|{r1}|{r2}", task=f"organism two-hop [{split}]", source="organism",
                                  kind="gen", negated=False, swap_qa=False, swap_kv=False, n_r=2, q_relation=r1,
                                  a_relation=r2, prompt=q["prompt"], answer=" " + q["e3"], target=" " + q["e3"],
                                  candidates=[" " + q["e3"]]))
    return out


def top_heads(frame, k: int, column: str) -> list[tuple[int, int]]:
    agg = aggregate(frame[frame["site"] == "z"], column)
    return [(int(l), int(h)) for l, h in zip(agg["layer"][:k], agg["head"][:k], strict=True)]


def ablation_rows(model, examples, heads, label: str, n_random: int, kinds=("mean", "zero")) -> list[dict]:
    rows = []
    for kind in kinds:
        frame = intervene(model, examples, heads, kind=kind, n_random=n_random, restrict="vocab")
        for task, grp in frame.groupby("task"):
            s = summarize(grp).set_index("condition")["accuracy"]
            rand = grp[grp["condition"] == "random"]["accuracy"]
            rows.append({"ranked_by": label, "k": len(heads), "heads": " ".join(f"L{l}H{h}" for l, h in heads),
                         "kind": kind, "task": task, "before": s["before"], "target": s["target"],
                         "random_mean": float(rand.mean()), "random_min": float(rand.min()),
                         "random_max": float(rand.max())})
            print(rows[-1], flush=True)
    return rows


def organism(n_pairs: int, n_eval: int, n_random: int, ig_steps: int) -> dict:
    from mhop_lens.analyses.pairs import two_hop_pairs
    from mhop_lens.organism.world import World

    model = load_model("organism", device="cpu")
    world = World.load(builtin_dir("organism") / "world.json")
    p = two_hop_pairs(world, n_pairs, split="train")
    metric = metrics.clean_vs_corrupt_answer(model, p.clean_answers, p.corrupt_answers)
    sites = ("z", "mlp_out", "resid_post")
    atp = attribute(model, p.clean, p.corrupted, metric, sites=sites, batch_size=32)
    ig = attribute(model, p.clean, p.corrupted, metric, sites=("z",), batch_size=32, ig_steps=ig_steps)
    exact = exact_patching(model, p.clean, p.corrupted, metric, sites=sites, batch_size=32)
    ig_sweep = {}
    for steps in (1, 2, 4, 8):
        f = attribute(model, p.clean, p.corrupted, metric, sites=("z",), batch_size=32, ig_steps=steps)
        ig_sweep[steps] = {"seconds": f.attrs["seconds"], **rank_agreement(f, exact)}
    spans = attribute(model, p.clean, p.corrupted, metric, sites=("z",), per_position=p.spans, batch_size=32)
    out = {"pairs": len(p), "metric_clean": float(atp["metric_clean"].mean()),
           "metric_corrupt": float(atp["metric_corrupt"].mean()),
           "agreement_z": rank_agreement(atp, exact, "z"), "agreement_z_ig": rank_agreement(ig, exact, "z"),
           "ig_sweep": ig_sweep, "seconds": {"atp": atp.attrs["seconds"], "ig": ig.attrs["seconds"],
                                             "exact": exact.attrs["seconds"]},
           "agreement_mlp": rank_agreement(atp, exact, "mlp_out"),
           "agreement_resid": rank_agreement(atp, exact, "resid_post"),
           "nodes_exact": aggregate(exact).head(8).to_dict("records"),
           "nodes_atp": aggregate(atp[atp["site"] == "z"]).head(8).to_dict("records"),
           "nodes_ig": aggregate(ig).head(8).to_dict("records"),
           "z_by_span": aggregate(spans).head(10).to_dict("records")}
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("agreement", "metric"))}, indent=1), flush=True)
    examples = two_hop_examples(world, n_eval)
    rows = []
    for k in (1, 3):
        for label, frame, column in (("atp", atp, "atp"), ("atp_ig", ig, "atp_ig"), ("exact", exact, "exact")):
            rows += ablation_rows(model, examples, top_heads(frame, k, column), label, n_random,
                                  kinds=("mean", "zero") if k == 3 else ("mean",))
    out["ablation"] = rows
    return out


def gar_organism_lookup(n_per_task: int, n_random: int, ig_steps: int) -> dict:
    """AtP vs exact and top-k vs random ablation on the GAR organism's in-context lookup (gen rows, Q swapped)."""
    from mhop_lens.analyses.pairs import gar_query_pairs
    from mhop_lens.organism_gar.evaluate import eval_examples
    from mhop_lens.organism_gar.world import build_world

    model = load_model("organism-gar", device="cpu")
    world = build_world()
    examples = eval_examples(world, n_per_task)
    p = gar_query_pairs(examples, world)
    metric = metrics.clean_vs_corrupt_answer(model, p.clean_answers, p.corrupt_answers)
    atp = attribute(model, p.clean, p.corrupted, metric, sites=("z", "mlp_out"), batch_size=32)
    exact = exact_patching(model, p.clean, p.corrupted, metric, sites=("z", "mlp_out"), batch_size=32)
    igs = {steps: attribute(model, p.clean, p.corrupted, metric, sites=("z",), batch_size=32, ig_steps=steps)
           for steps in (1, ig_steps)}
    spans = attribute(model, p.clean, p.corrupted, metric, sites=("z",), per_position=p.spans, batch_size=32)
    out = {"pairs": len(p), "metric_clean": float(atp["metric_clean"].mean()),
           "metric_corrupt": float(atp["metric_corrupt"].mean()),
           "agreement_z": rank_agreement(atp, exact, "z"),
           **{f"agreement_z_ig{s}": rank_agreement(f, exact, "z") for s, f in igs.items()},
           "agreement_mlp": rank_agreement(atp, exact, "mlp_out"),
           "seconds": {"atp": atp.attrs["seconds"], "exact": exact.attrs["seconds"],
                       **{f"ig{s}": f.attrs["seconds"] for s, f in igs.items()}},
           "nodes_exact": aggregate(exact[exact["site"] == "z"]).head(8).to_dict("records"),
           "nodes_atp": aggregate(atp[atp["site"] == "z"]).head(8).to_dict("records"),
           "z_by_span": aggregate(spans).head(10).to_dict("records")}
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("agreement", "metric", "pairs", "seconds"))},
                     indent=1), flush=True)
    gen = [e for e in examples if e.kind == "gen"]
    rows = []
    for k in (1, 3):
        for label, frame, column in (("atp", atp, "atp"), (f"atp_ig{ig_steps}", igs[ig_steps], "atp_ig"),
                                     ("exact", exact, "exact")):
            rows += ablation_rows(model, gen, top_heads(frame, k, column), label, n_random, kinds=("mean",))
    out["ablation"] = rows
    return out


def gar_organism(k: int, n_per_task: int, n_random: int, ig_steps: int) -> dict:
    """True/False heads on the GAR organism's Yes/No counter-pairs, their controls, consistency, interventions."""
    from mhop_lens.analyses.heads import consistency, control, counter_pairs, find_heads
    from mhop_lens.organism_gar.evaluate import eval_examples
    from mhop_lens.organism_gar.world import build_world

    model = load_model("organism-gar", device="cpu")
    world = build_world()
    examples = eval_examples(world, n_per_task)
    cls = [e for e in examples if e.kind == "cls"]
    scores, top = find_heads(model, cls, k, exact=True, group_by="task", batch_size=32)
    pooled = scores[scores["group"] == "all"]
    pairs = counter_pairs(model, cls)
    metric = metrics.yes_no(model, len(pairs))
    exact = exact_patching(model, pairs.clean, pairs.corrupted, metric, batch_size=32)
    atp = attribute(model, pairs.clean, pairs.corrupted, metric, sites=("z",), batch_size=32)
    ig = attribute(model, pairs.clean, pairs.corrupted, metric, sites=("z",), batch_size=32, ig_steps=ig_steps)
    other_seed = [e for e in eval_examples(world, n_per_task, seed=7) if e.kind == "cls"]
    scores_seed, _ = find_heads(model, other_seed, k, exact=True, batch_size=32)
    out = {"pairs": len(pairs), "dropped": pairs.dropped, "agreement_atp": rank_agreement(atp, exact),
           "agreement_ig": rank_agreement(ig, exact), "top": top.to_dict("records"),
           "control": control(pooled, k), "consistency_tasks": consistency(scores[scores["group"] != "all"], k)
           .to_dict("records"),
           "consistency_seeds": consistency({"seed_eval": pooled, "seed_7": scores_seed}, k).to_dict("records")}
    print(json.dumps({k_: out[k_] for k_ in ("pairs", "agreement_atp", "agreement_ig", "control")}, indent=1,
                     default=str), flush=True)
    print(top[["layer", "head", "type", "score", "atp", "act_d"]].to_string(), flush=True)
    heads = [(int(l), int(h)) for l, h in zip(top["layer"], top["head"], strict=True)]
    rows = []
    for kind, kw in (("mean", {}), ("zero", {}), ("attend", {"attend_role": "A"})):
        frame = intervene(model, cls, heads, kind=kind, n_random=n_random, **kw)
        for cond, grp in frame.groupby("condition"):
            rows.append({"kind": kind, "condition": cond, "accuracy": float(grp["accuracy"].mean()),
                         "accuracy_yes": float(grp["accuracy_yes"].mean()) if "accuracy_yes" in grp else None,
                         "margin": float(grp["margin"].mean())})
            print(rows[-1], flush=True)
    out["interventions"] = rows
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--eval", type=int, default=200, help="Two-hop queries per split for ablations.")
    parser.add_argument("--n-random", type=int, default=10)
    parser.add_argument("--ig-steps", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", choices=["organism", "organism-gar", "organism-gar-lookup"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    results = {}
    if args.only in (None, "organism"):
        try:
            results["organism"] = organism(args.pairs, args.eval, args.n_random, args.ig_steps)
        except ModelLoadError as e:
            print(f"organism skipped: {e}")
    if args.only in (None, "organism-gar-lookup"):
        try:
            results["organism-gar-lookup"] = gar_organism_lookup(48, args.n_random, args.ig_steps)
        except ModelLoadError as e:
            print(f"organism-gar skipped: {e}")
    if args.only in (None, "organism-gar"):
        try:
            results["organism-gar"] = gar_organism(3, 16, args.n_random, args.ig_steps)
        except ModelLoadError as e:
            print(f"organism-gar skipped: {e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
