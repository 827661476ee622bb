"""Consistency of the True/False heads of a GAR organism across data seeds and Yes/No tasks (and vs another model).

For each data seed: the Yes/No (cls) rows of ``organism_gar.world.examples(build_world(), seed, n_per_task, 2)``
(the builder docs/organism-gar.md uses; 4 Yes/No tasks x n_per_task counter-pairs, 2-item contexts), then
``find_heads(model, cls, k, exact=True, group_by="task")`` (pooled scores + one score table per task) and, scored
the same way on subsets of the same pairs, the groups "a_relation" (plain ``value.equal`` vs composed
``kinds_of_things.child``: the organism's world has one relation set and one knowledge relation, so this is the
only relation split) and "negated". Reported:

- per seed: the top-k heads with their effect sizes (exact patching mean / std over pairs, mean/std, AtP, held-out
  act_d, attention d) and ``control`` (top-k mean |score| vs random k-head sets);
- ``consistency`` (Spearman of the signed per-head scores, top-k overlap vs the k^2/n_heads two random k-sets would
  share, plus the hypergeometric p of an overlap at least that large) between seeds (pooled), between tasks /
  relations / negation within each seed, and for each task between seeds (the sampling noise floor of a task);
- whether the top-k set (and its true/false typing) is the same for every seed.

``--model`` (default ``organism-gar``, the shipped checkpoint) takes anything ``load_model`` loads, e.g. the
directory ``mhop-lens organism-gar train --out DIR --seed S`` writes; ``--seeds`` picks the data seeds. Head indices
are not comparable between models trained from different seeds (the heads of a layer are interchangeable under
random initialisation), so ``--compare OTHER.json`` (an earlier output of this script, e.g. the shipped model's)
adds an index-free ``compare`` entry for both models: per data seed the layers of the top-k heads, the top-1 and
top-k shares of the summed |score|, the true/false typing counts, the control ratio and p; per task the layers of
its top k; the heads (own indices) in the top 2 of every group in every seed; and, for the data seeds both results
share, the Spearman between the two models of the per-layer sorted |score| profiles (each layer's heads sorted by
|score|, layers in order; pooled and per task), with the same Spearman between the data seeds of each model as its
within-model reference. Without ``--compare`` the output is unchanged.

Run (one thread, a few minutes on a quiet 2-core machine):
``OMP_NUM_THREADS=1 python benchmarks/heads_consistency.py --out benchmarks/results/heads_consistency.json``;
another checkpoint: ``... --model DIR --compare benchmarks/results/heads_consistency.json --out OTHER.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import hypergeom, spearmanr

from mhop_lens.analyses.heads import consistency, control, counter_pairs, find_heads, group_key, head_scores, select
from mhop_lens.models import load_model
from mhop_lens.organism_gar.evaluate import EVAL_SEED, FIT_SEED
from mhop_lens.organism_gar.world import build_world, examples, form_name

EFFECT_COLUMNS = ("score", "exact_std", "exact_d", "atp", "act_d", "act_rel_diff", "attn_d_A", "attn_d_V")
EXTRA_GROUPS = ("a_relation", "negated")


def label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def top_set(frame: pd.DataFrame, k: int) -> list[str]:
    return [label(int(r.layer), int(r.head)) for r in select(frame, k).itertuples()]


def with_p(table: pd.DataFrame, groups: dict[str, pd.DataFrame], k: int, n_heads: int) -> list[dict]:
    """``consistency`` rows plus the Spearman p and the chance of a top-k overlap at least as large."""
    rows = []
    for row in table.to_dict("records"):
        a, b = groups[row["group_a"]], groups[row["group_b"]]
        m = a.merge(b, on=["layer", "head"], suffixes=("_a", "_b"))
        row["spearman_p"] = float(spearmanr(m["score_a"], m["score_b"]).pvalue)
        row["p_overlap_ge"] = float(hypergeom.sf(row["top_k_overlap"] - 1, n_heads, k, k))
        row["top_a"], row["top_b"] = top_set(a, k), top_set(b, k)
        rows.append(row)
    return rows


def grouped_scores(model, cls: list, by: str, batch_size: int) -> dict[str, pd.DataFrame]:
    """Head scores per group of ``by``, exactly as ``find_heads(group_by=by)`` computes its groups (without
    recomputing the pooled table)."""
    pairs = counter_pairs(model, cls)
    by_id = {ex.pair_id: ex for ex in cls if ex.pair_id}
    keys = [group_key(by_id[p], by) for p in pairs.pair_ids]
    out = {}
    for key in sorted(set(keys)):
        idx = [i for i, g in enumerate(keys) if g == key]
        out[f"{by}={key}"] = head_scores(model, pairs.subset(idx), exact=True, batch_size=batch_size)
    return out


def run_seed(model, world, seed: int, n_per_task: int, k: int, batch_size: int, n_random: int) -> dict:
    t0 = time.time()
    cls = [e for e in examples(world, seed, n_per_task, 2) if e.kind == "cls"]
    short = {e.task: form_name(e) for e in cls}
    scores, top = find_heads(model, cls, k, exact=True, group_by="task", batch_size=batch_size)
    scores["exact_d"] = scores["score"] / scores["exact_std"]
    pooled = scores[scores["group"] == "all"].reset_index(drop=True)
    tasks = {short[g]: f.reset_index(drop=True) for g, f in scores.groupby("group") if g != "all"}
    extra = {}
    for by in EXTRA_GROUPS:
        extra.update(grouped_scores(model, cls, by, batch_size))
    top = top.assign(exact_d=top["score"] / top["exact_std"])
    out = {"seed": seed, "rows": len(cls), "pairs": int(pooled["n_pairs"].iloc[0]),
           "dropped": int(pooled["n_dropped"].iloc[0]),
           "metric_true": float(pooled["metric_true"].iloc[0]), "metric_false": float(pooled["metric_false"].iloc[0]),
           "top": [{"head": label(int(r["layer"]), int(r["head"])), "type": r["type"],
                    **{c: float(r[c]) for c in EFFECT_COLUMNS if c in r}} for r in top.to_dict("records")],
           "control": control(pooled, k, n_random=n_random, seed=seed),
           "control_per_task": {t: control(f, k, n_random=n_random, seed=seed) for t, f in tasks.items()},
           "top_per_group": {g: top_set(f, k) for g, f in {**tasks, **extra}.items()},
           "heads": [{"head": label(int(r["layer"]), int(r["head"])), **{c: float(r[c]) for c in EFFECT_COLUMNS}}
                     for r in pooled.to_dict("records")],
           "group_scores": {g: {label(int(r["layer"]), int(r["head"])): round(float(r["score"]), 4)
                                for r in f.to_dict("records")} for g, f in {**tasks, **extra}.items()},
           "seconds": None}
    out["seconds"] = round(time.time() - t0, 1)
    return out, pooled, tasks, extra


def layer_of(head: str) -> int:
    return int(head[1:head.index("H")])


def profile(scores: dict[str, float]) -> list[float]:
    """Per-layer sorted |score| (each layer's heads by decreasing |score|, layers in order): index-free."""
    layers = sorted({layer_of(h) for h in scores})
    return [v for layer in layers for v in sorted((abs(s) for h, s in scores.items() if layer_of(h) == layer),
                                                  reverse=True)]


def index_free(result: dict) -> dict:
    """Summary of one result that does not depend on head indices within a layer (plus its own top-2 heads)."""
    k, per = result["k"], {}
    for r in result["per_seed"]:
        total = sum(abs(h["score"]) for h in r["heads"])
        top = sorted((abs(h["score"]) for h in r["heads"]), reverse=True)
        tasks = {g: v for g, v in r["top_per_group"].items() if "=" not in g}
        per[str(r["seed"])] = {
            "top_layers": [layer_of(t["head"]) for t in r["top"]],
            "top1_share": top[0] / total, f"top{k}_share": sum(top[:k]) / total,
            "types": {t: sum(x["type"] == t for x in r["top"]) for t in ("true", "false")},
            "control_ratio": r["control"]["ratio"], "control_p": r["control"]["p_random_ge_top"],
            "layer_share": [sum(abs(h["score"]) for h in r["heads"] if layer_of(h["head"]) == layer) / total
                            for layer in sorted({layer_of(h["head"]) for h in r["heads"]})],
            "task_top_layers": {t: [layer_of(h) for h in v] for t, v in sorted(tasks.items())}}
    top2 = [frozenset(v[:2]) for r in result["per_seed"] for v in r["top_per_group"].values()]
    profiles = {r["seed"]: profile({h["head"]: h["score"] for h in r["heads"]}) for r in result["per_seed"]}
    between = [float(spearmanr(profiles[a], profiles[b]).statistic) for i, a in enumerate(profiles)
               for b in list(profiles)[i + 1:]]
    return {"model": result["model"], "per_seed": per, "top2_of_every_group": sorted(frozenset.intersection(*top2)),
            "profile_spearman_between_seeds": between}


def compare(result: dict, other: dict) -> dict:
    """Index-free comparison of two results (two models): summaries and profile Spearman per shared data seed."""
    mine = {r["seed"]: r for r in result["per_seed"]}
    theirs = {r["seed"]: r for r in other["per_seed"]}
    spearman = {}
    for seed in [s for s in result["seeds"] if s in theirs]:
        a, b = mine[seed], theirs[seed]
        groups = {"all": ({h["head"]: h["score"] for h in a["heads"]}, {h["head"]: h["score"] for h in b["heads"]}),
                  **{g: (a["group_scores"][g], b["group_scores"][g]) for g in sorted(a["group_scores"])
                     if "=" not in g and g in b["group_scores"]}}
        spearman[str(seed)] = {g: float(spearmanr(profile(x), profile(y)).statistic) for g, (x, y) in groups.items()}
    return {"this": index_free(result), "other": index_free(other), "profile_spearman": spearman}


def print_compare(cmp: dict, k: int) -> None:
    for who in ("this", "other"):
        c = cmp[who]
        print(f"{who} ({c['model']}): in the top 2 of every group in every seed: {c['top2_of_every_group']}")
        if c["profile_spearman_between_seeds"]:
            sp = c["profile_spearman_between_seeds"]
            print(f"  profile Spearman between its data seeds (pooled): {min(sp):+.3f} to {max(sp):+.3f}")
        for seed, r in c["per_seed"].items():
            print(f"  seed {seed}: top-{k} layers {r['top_layers']}, top-1 share {r['top1_share']:.2f}, top-{k} "
                  f"share {r[f'top{k}_share']:.2f}, types {r['types']}, control ratio {r['control_ratio']:.2f} "
                  f"(p {r['control_p']:.3f}), layer shares " + " ".join(f"{x:.2f}" for x in r["layer_share"]))
            print("    task top layers: " + "  ".join(f"{t} {v}" for t, v in r["task_top_layers"].items()))
    for seed, sp in cmp["profile_spearman"].items():
        print(f"per-layer sorted |score| profile Spearman, seed {seed}: "
              + "  ".join(f"{g} {v:+.2f}" for g, v in sp.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-per-task", type=int, default=100, help="Counter-pairs per Yes/No task and seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[EVAL_SEED, 7, FIT_SEED, 11, 13],
                        help="Data seeds of the example builder (default: evaluation seed, 7, fit seed, 11, 13).")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n-random", type=int, default=1000, help="Random k-head sets of the control.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON file for the results.")
    parser.add_argument("--model", default="organism-gar",
                        help="Model name or checkpoint directory (default: the shipped organism).")
    parser.add_argument("--compare", default=None,
                        help="Results JSON of another model (this script's output): add an index-free comparison.")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.time()
    model = load_model(args.model, device="cpu")
    world = build_world()
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    k = args.k
    per_seed, pooled, tasks, extra = [], {}, {}, {}
    for seed in args.seeds:
        res, pooled[seed], tasks[seed], extra[seed] = run_seed(model, world, seed, args.n_per_task, k,
                                                               args.batch_size, args.n_random)
        per_seed.append(res)
        print(f"seed {seed}: {res['pairs']} pairs ({res['dropped']} dropped), true {res['metric_true']:+.2f} / "
              f"false {res['metric_false']:+.2f}, {res['seconds']} s", flush=True)
        print("  " + "  ".join(f"{t['head']}({t['type'][0]}) {t['score']:.2f}+-{t['exact_std']:.2f} "
                               f"act_d {t['act_d']:.2f}" for t in res["top"]), flush=True)
        c = res["control"]
        print(f"  control: top-{k} mean |score| {c['top_mean_abs']:.2f} vs random {c['random_mean_abs']:.2f} "
              f"(sd {c['random_sd']:.2f}), ratio {c['ratio']:.2f}, p {c['p_random_ge_top']:.3f}", flush=True)

    seeds_named = {f"seed_{s}": f for s, f in pooled.items()}
    result = {"model": args.model, "builder": "organism_gar.world.examples(build_world(), seed, n, 2), cls rows",
              "n_per_task": args.n_per_task, "seeds": args.seeds, "k": k, "n_heads": n_heads,
              "random_overlap": k * k / n_heads, "per_seed": per_seed,
              "between_seeds": with_p(consistency(seeds_named, k), seeds_named, k, n_heads)}
    tops = {s: r["top"] for s, r in zip(args.seeds, per_seed, strict=True)}
    sets = {s: frozenset(t["head"] for t in top) for s, top in tops.items()}
    typed = {s: frozenset((t["head"], t["type"]) for t in top) for s, top in tops.items()}
    result["top_k_same_all_seeds"] = len(set(sets.values())) == 1
    result["top_k_typed_same_all_seeds"] = len(set(typed.values())) == 1
    result["top_k_order_per_seed"] = {str(s): [t["head"] for t in top] for s, top in tops.items()}
    result["top_k_in_every_seed"] = sorted(frozenset.intersection(*sets.values()))
    counts = pd.Series([h for st in sets.values() for h in st]).value_counts()
    result["top_k_seed_count"] = {h: int(c) for h, c in counts.items()}
    result["within_seed"] = {}
    for seed in args.seeds:
        groups = {**tasks[seed], **extra[seed]}
        task_g = tasks[seed]
        result["within_seed"][str(seed)] = {
            "tasks": with_p(consistency(task_g, k), task_g, k, n_heads),
            **{by: with_p(consistency(sub := {g: f for g, f in groups.items() if g.startswith(by + "=")}, k),
                          sub, k, n_heads) for by in EXTRA_GROUPS}}
    result["task_between_seeds"] = {}
    for task in sorted(tasks[args.seeds[0]]):
        named = {f"seed_{s}": tasks[s][task] for s in args.seeds}
        result["task_between_seeds"][task] = with_p(consistency(named, k), named, k, n_heads)
    if args.compare:
        result["compare"] = compare(result, json.loads(Path(args.compare).read_text()))
    result["seconds"] = round(time.time() - start, 1)

    def summary(rows: list[dict]) -> str:
        sp = [r["spearman"] for r in rows]
        ov = [r["top_k_overlap"] for r in rows]
        return (f"Spearman {np.mean(sp):+.2f} [{min(sp):+.2f}, {max(sp):+.2f}], top-{k} overlap {np.mean(ov):.2f} "
                f"[{min(ov)}-{max(ov)}] (random {k * k / n_heads:.2f})")

    print(f"\nbetween seeds (pooled): {summary(result['between_seeds'])}")
    for r in result["between_seeds"]:
        print(f"  {r['group_a']} vs {r['group_b']}: Spearman {r['spearman']:+.3f} (p {r['spearman_p']:.1e}), "
              f"overlap {r['top_k_overlap']}/{k} (p {r['p_overlap_ge']:.3f})")
    print(f"top-{k} set same for every seed: {result['top_k_same_all_seeds']} "
          f"(typed: {result['top_k_typed_same_all_seeds']}); in every seed: {result['top_k_in_every_seed']}; "
          f"seeds with the head in the top {k}: {result['top_k_seed_count']}")
    for what in ("tasks", *EXTRA_GROUPS):
        rows = [r for s in args.seeds for r in result["within_seed"][str(s)][what]]
        print(f"within seed, between {what}: {summary(rows)}")
    for task, rows in result["task_between_seeds"].items():
        print(f"{task} between seeds: {summary(rows)}")
    print("\ntop heads per group:")
    table = pd.DataFrame({str(s): r["top_per_group"] for s, r in zip(args.seeds, per_seed, strict=True)})
    print(table.map(" ".join).to_string())
    print("\nSpearman / top-k overlap between groups, per seed (" + ", ".join(map(str, args.seeds)) + "):")
    for what in ("tasks", *EXTRA_GROUPS):
        per = [result["within_seed"][str(s)][what] for s in args.seeds]
        for i, r in enumerate(per[0]):
            cells = "  ".join(f"{p[i]['spearman']:+.2f}/{p[i]['top_k_overlap']}" for p in per)
            print(f"  {r['group_a']} vs {r['group_b']}: {cells}")
    if args.compare:
        print(f"\ncompared with {args.compare} (index-free):")
        print_compare(result["compare"], k)
    print(f"\ntotal {result['seconds']} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
