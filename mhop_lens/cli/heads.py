"""`mhop-lens attribute` and `mhop-lens heads find | intervene`: AtP, True/False heads, head interventions.

Tables: ``attribute`` -> attribution.parquet (per pair x node[, span]), nodes.parquet (mean over pairs),
exact.parquet + agreement.json with ``--exact``, edges.parquet + edge_scores.parquet with ``--edges``
(``--edge-method eap-ig``: EAP-IG), faithfulness.parquet + faithfulness_summary.parquet with ``--faithfulness``;
``heads find`` -> head_scores.parquet (with the head classes and their evidence), top_heads.parquet, control.json,
consistency.parquet, null_sets.parquet + null.json (the top-k set among every / random k-head sets),
single_heads.parquet, truth_interventions.parquet (+ truth_interventions_random.parquet);
``heads intervene`` -> interventions.parquet (per condition x task), summary.parquet.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors
from mhop_lens.cli.gar import _csv, gar_options, load_examples
from mhop_lens.cli.options import limit_too_small, site_list
from mhop_lens.errors import DataError, MhopLensError

_NO_PAIRS = "no Yes/No counter-pair (a Yes and a No classification row sharing a pair_id)"


def _counter_pairs(model, examples: list, kw: dict):
    """Yes/No counter-pairs of the examples; a too-small --limit says how many examples hold the first pair."""
    from mhop_lens.analyses.heads import counter_pairs

    try:
        return counter_pairs(model, examples)
    except MhopLensError as e:
        raise limit_too_small(e, kw["limit"], kw["data"], _NO_PAIRS, lambda: load_examples(kw["data"]),
                              lambda exs: counter_pairs(model, exs)) from None


def _pairs(kw: dict, model):
    """(clean, corrupted, metric, spans, pair_ids) from GAR counter-pairs or the two-hop organism's world."""
    from mhop_lens.analyses import metrics

    if kw["data"] == "organism":
        from mhop_lens.analyses.pairs import two_hop_pairs
        from mhop_lens.models import builtin_dir
        from mhop_lens.organism.world import World

        world = World.load(builtin_dir("organism") / "world.json")
        p = two_hop_pairs(world, kw["limit"] or 64, seed=kw["seed"])
        metric = metrics.clean_vs_corrupt_answer(model, p.clean_answers, p.corrupt_answers)
        return p.clean, p.corrupted, metric, p.spans, p.pair_ids, 0
    examples = load_examples(kw["data"], kw["limit"])
    if kw["pairs"] == "query":
        from mhop_lens.analyses.attribution import aligned_pairs
        from mhop_lens.analyses.pairs import gar_query_pairs

        p = gar_query_pairs(examples, _world(examples))
        if not len(p):
            raise DataError("--pairs query needs non-negated gen rows with distractor keys (e.g. --forms gen).")
        keep = aligned_pairs(model, p.clean, p.corrupted)
        pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
        metric = metrics.clean_vs_corrupt_answer(model, pick(p.clean_answers), pick(p.corrupt_answers))
        return pick(p.clean), pick(p.corrupted), metric, pick(p.spans), pick(p.pair_ids), len(p) - len(keep)
    p = _counter_pairs(model, examples, kw)
    return p.clean, p.corrupted, metrics.yes_no(model, len(p)), p.spans, p.pair_ids, p.dropped


def _world(examples):
    """The GAR world of the examples' task names (gar[<world>]...): a built-in relation set or organism-gar."""
    from mhop_lens.gar import RELATION_SETS

    name = examples[0].task.split("]", 1)[0].removeprefix("gar[")
    if name in RELATION_SETS:
        return RELATION_SETS[name]
    if name == "organism-gar":
        from mhop_lens.organism_gar.world import build_world

        return build_world()
    raise DataError(f"unknown GAR world {name!r} in the task names; --pairs query needs a built-in relation set "
                    "or organism-gar data.")


@click.command()
@gar_options
@click.option("--sites", default="z,mlp_out,resid_post", show_default=True,
              help="Comma list of TransformerLens act names: z, mlp_out, resid_post (resid: deprecated name of "
                   "resid_post).")
@click.option("--pairs", type=click.Choice(["yesno", "query"]), default="yesno", show_default=True,
              help="GAR pairs: Yes/No counter-pairs (metric Yes - No) or gen rows with the query key swapped for "
                   "another context key (metric clean - corrupt answer). Ignored for --data organism.")
@click.option("--per-span", is_flag=True, help="One score per role span (GAR roles / e1, r1, r2) instead of a sum.")
@click.option("--method", type=click.Choice(["atp", "atp-star", "ig"]), default=None,
              help="atp (2 forwards + 1 backward), atp-star (AtP*: exact softmax of later attention layers under "
                   "each node's write, see --qk-fix, + GradDrop, docs/heads.md) or ig (integrated gradients). "
                   "Default: ig if --ig-steps > 0, else atp.")
@click.option("--qk-fix", type=click.Choice(["chained", "exact", "frozen-norm"]), default="chained",
              show_default=True,
              help="AtP*'s recompute: chained (the model's own block per node copy, each recomputed attention change "
                   "carried into later layers), exact (the same, one softmax deep as in the paper) or frozen-norm "
                   "(q/k/v change through the corrupted run's norm scale, low-rank, cheaper from ~70 tokens per "
                   "batch; falls back to exact where unsupported).")
@click.option("--grad-drop/--no-grad-drop", default=True, show_default=True,
              help="AtP*'s GradDrop score (column atp_star_gd, L-1 partial backwards per batch).")
@click.option("--ig-steps", type=int, default=0, show_default=True,
              help="Integrated-gradients steps (0 = AtP; --method ig without it uses 8).")
@click.option("--exact", is_flag=True, help="Also run exact patching of every node and report rank agreement.")
@click.option("--edges", is_flag=True, help="Also score edges into the q/k/v inputs of later heads, the MLP inputs "
                                            "and the output: edges.parquet, edge_scores.parquet.")
@click.option("--edge-method", type=click.Choice(["atp", "eap-ig"]), default="atp", show_default=True,
              help="Edge scores: edge AtP, or EAP-IG (Hanna et al. 2024; --edge-steps input interpolations).")
@click.option("--edge-steps", type=int, default=5, show_default=True, help="EAP-IG steps (--edge-method eap-ig).")
@click.option("--faithfulness", is_flag=True,
              help="Faithfulness curve of the top-n edges (with --edges) and top-n heads vs random circuits of each "
                   "size: faithfulness.parquet, faithfulness_summary.parquet.")
@click.option("--ablation", type=click.Choice(["counter", "mean"]), default="counter", show_default=True,
              help="How --faithfulness ablates what is outside the circuit: the pair's corrupted run or the mean.")
@click.option("--random-circuits", type=int, default=50, show_default=True,
              help="Random circuits per size for the --faithfulness null distribution.")
@friendly_errors
def attribute(**kw) -> None:
    """Attribution patching of every head / MLP / residual node on counter-paired prompts.

    --data 'organism' pairs two-hop queries differing in e1 (metric: logit clean answer - logit corrupt answer);
    GAR data uses its Yes/No counter-pairs (metric: logit Yes - logit No) or, with --pairs query, generation rows
    whose query key is swapped for another context key.
    """
    from mhop_lens import hooks
    from mhop_lens.analyses.attribution import (
        COLUMN,
        OLD_SITES,
        SITES,
        aggregate,
        cost_line,
        exact_patching,
        rank_agreement,
    )
    from mhop_lens.analyses.attribution import attribute as run_atp
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore

    kw["sites"] = site_list(kw["sites"], OLD_SITES)
    hooks.act_names(_csv(kw["sites"]), SITES, OLD_SITES, "attribution", DataError)  # fails before --out is written
    method = kw["method"] or ("ig" if kw["ig_steps"] > 0 else "atp")
    if method == "atp-star" and kw["per_span"]:
        raise DataError("--method atp-star scores whole nodes; drop --per-span or use --method atp / ig.")
    ctx = click.get_current_context()
    given = {n: ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE for n in ("qk_fix", "grad_drop")}
    star_only = ([f"--qk-fix {kw['qk_fix']}"] if given["qk_fix"] else []) + (
        ["--grad-drop" if kw["grad_drop"] else "--no-grad-drop"] if given["grad_drop"] else [])
    if star_only and method != "atp-star":
        raise DataError(f"{' and '.join(star_only)} {'apply' if len(star_only) > 1 else 'applies'} only to --method "
                        f"atp-star (this run's method is {method}); add --method atp-star or drop "
                        f"{'them' if len(star_only) > 1 else 'it'}.")
    model = load_model(kw["model"], device=kw["device"])
    clean, corrupt, metric, spans, ids, dropped = _pairs(kw, model)  # fails before --out is written
    store = RunStore(kw["out"], "attribute", kw)
    store.log(f"{len(clean)} pairs ({dropped} dropped: clean/corrupted token counts differ)")
    sites = _csv(kw["sites"])
    frame = run_atp(model, clean, corrupt, metric, sites=sites, per_position=spans if kw["per_span"] else False,
                    ig_steps=kw["ig_steps"], batch_size=kw["batch_size"], pair_ids=ids, progress=True,
                    method=method, qk_fix=kw["qk_fix"], grad_drop=kw["grad_drop"])
    store.write("attribution", frame)
    store.write("nodes", aggregate(frame))
    info = dict(frame.attrs, pairs=len(clean), dropped=dropped)
    if kw["exact"]:
        exact = exact_patching(model, clean, corrupt, metric, sites=sites, batch_size=kw["batch_size"],
                               pair_ids=ids, progress=True)
        store.write("exact", exact)
        col = COLUMN[method]
        summed = frame.groupby(["pair", "site", "layer", "head"], as_index=False)[col].sum() if kw["per_span"] \
            else frame
        info["agreement"] = {s: rank_agreement(summed, exact, s, col) for s in sites
                             if (exact["site"] == s).sum() >= 3 * len(clean)}
        info["exact"] = exact.attrs
        click.echo(f"rank agreement {method} vs exact: {info['agreement']}")
        click.echo(f"exact patching: {cost_line(exact.attrs)}")
    edges = None
    if kw["edges"]:
        from mhop_lens.analyses.edge_attribution import ALL_SIDES, aggregate_edges, attribute_edges

        steps = kw["edge_steps"] if kw["edge_method"] == "eap-ig" else 0
        if kw["edge_method"] == "eap-ig" and steps < 1:
            raise click.UsageError(f"--edge-steps must be >= 1 for EAP-IG, not {steps}.")
        edges = attribute_edges(model, clean, corrupt, metric, sides=ALL_SIDES, ig_steps=steps,
                                per_position=spans if kw["per_span"] else False, batch_size=kw["batch_size"],
                                pair_ids=ids, progress=True)
        store.write("edges", edges)
        store.write("edge_scores", aggregate_edges(edges))
        info["edges"] = edges.attrs
    if kw["faithfulness"]:
        info["faithfulness"] = _faithfulness(kw, store, model, clean, corrupt, metric, frame, edges)
    store.write_json("attribution.json", info)
    click.echo(f"{method}: {cost_line(frame.attrs)}")
    click.echo(f"wrote {store.dir}")


def _faithfulness(kw: dict, store, model, clean, corrupt, metric, nodes, edges) -> dict:
    """Faithfulness curves (heads from the z scores; edges when scored) with their random-circuit null."""
    import pandas as pd

    from mhop_lens.analyses.faithfulness import faithfulness_curve, faithfulness_summary, smallest_faithful

    curves, summaries, info = [], [], {}
    levels = [("heads", nodes[nodes["site"] == "z"])] + ([("edges", edges)] if edges is not None else [])
    for level, scores in levels:
        if scores.empty:
            raise click.UsageError("--faithfulness needs head scores: include z in --sites.")
        curve = faithfulness_curve(model, clean, corrupt, metric, scores, level=level, n_random=kw["random_circuits"],
                                   ablation=kw["ablation"], seed=kw["seed"], batch_size=kw["batch_size"],
                                   progress=True)
        summary = faithfulness_summary(curve).assign(level=level)
        curves.append(curve)
        summaries.append(summary)
        info[level] = dict(curve.attrs, smallest_n_at_0_8=smallest_faithful(curve, 0.8))
        click.echo(f"faithfulness of the top-n {level} ({kw['ablation']} ablation) vs {kw['random_circuits']} random "
                   f"circuits per n:\n{summary.drop(columns='level').round(3).to_string(index=False)}")
    store.write("faithfulness", pd.concat(curves, ignore_index=True))
    store.write("faithfulness_summary", pd.concat(summaries, ignore_index=True))
    return info


@click.group()
def heads() -> None:
    """True/False heads: find them on counter-paired data, intervene on them during evaluation."""


@heads.command()
@gar_options
@click.option("--k", type=int, default=5, show_default=True, help="Number of heads to select.")
@click.option("--no-exact", is_flag=True, help="Rank by AtP only (skip exact per-head patching).")
@click.option("--ig-steps", type=int, default=0, show_default=True,
              help="Integrated-gradients steps for the atp column (0 = plain AtP; see docs/heads.md).")
@click.option("--group-by", default="relation_set", show_default=True,
              help="Score groups separately for consistency: relation_set, task, a_relation, ... or 'none'.")
@click.option("--null-max", type=int, default=5000, show_default=True,
              help="Ablate every k-head set when there are at most this many, else --null-random random sets plus "
                   "as many layer-matched ones; 0 skips the null distribution.")
@click.option("--null-random", type=int, default=500, show_default=True)
@click.option("--strengthen", type=float, default=2.0, show_default=True,
              help="Factor on the strengthened class in the True/False-head interventions (the other is zeroed).")
@click.option("--n-random", type=int, default=50, show_default=True,
              help="Random head sets for the intervention control (0 skips the interventions).")
@friendly_errors
def find(**kw) -> None:
    """Score every head on Yes/No counter-pairs; select the top-k; type True/False heads; controls; interventions.

    Prints the top-k, the True and False heads with their evidence (direct effect on true / false rows, probe),
    the top-k set's percentile among every (or random and layer-matched) k-head set, and the intervention table
    (label-conditioned as the GAR paper, and two label-free variants; all rows and failures).
    """
    from mhop_lens.analyses.head_interventions import null_sets, single_head_table, truth_interventions
    from mhop_lens.analyses.heads import consistency, control, find_heads
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore

    examples = load_examples(kw["data"], kw["limit"])
    model = load_model(kw["model"], device=kw["device"])
    _counter_pairs(model, examples, kw)  # bad data or a too-small --limit fails before --out is written
    store = RunStore(kw["out"], "heads find", kw)
    scores, top = find_heads(model, examples, kw["k"], exact=not kw["no_exact"], batch_size=kw["batch_size"],
                             group_by=None if kw["group_by"] == "none" else kw["group_by"], ig_steps=kw["ig_steps"])
    store.write("head_scores", scores)
    store.write("top_heads", top)
    pooled = scores[scores["group"] == "all"]
    ctl = control(pooled, kw["k"])
    store.write_json("control.json", ctl)
    if scores["group"].nunique() > 2:
        store.write("consistency", consistency(scores[scores["group"] != "all"], kw["k"]))
    click.echo(top[["layer", "head", "type", "score", "atp", "act_d", "head_class"]].to_string(index=False))
    click.echo(f"top-{kw['k']} mean |score| {ctl['top_mean_abs']:.4g} vs random {ctl['random_mean_abs']:.4g} "
               f"(sd {ctl['random_sd']:.2g})")
    evidence = ["layer", "head", "head_class", "direct_true", "direct_false", "probe_acc", "score"]
    typed = pooled[pooled["head_class"] != "other"][evidence]
    click.echo("head classes (direct effect on logit(Yes) - logit(No) on true / false rows; held-out truth probe):")
    click.echo(typed.to_string(index=False) if len(typed) else "  none typed (every head 'other')")
    chosen = [(int(l), int(h)) for l, h in zip(top["layer"], top["head"], strict=True)]
    if kw["null_max"] > 0:
        frame, summary = null_sets(model, examples, chosen, max_exhaustive=kw["null_max"],
                                   n_random=kw["null_random"], seed=kw["seed"], batch_size=kw["batch_size"] * 16)
        store.write("null_sets", frame)
        store.write_json("null.json", summary)
        store.write("single_heads", single_head_table(model, examples, batch_size=kw["batch_size"] * 16))
        click.echo(f"null: top-{len(chosen)} ablated -> accuracy {summary['chosen_accuracy']:.3f} (before "
                   f"{summary['accuracy_before']:.3f}); percentile {summary['percentile']:.3f} of "
                   f"{summary['n_sets']} {'(every)' if summary['exhaustive'] else 'random'} {len(chosen)}-head sets, "
                   f"{summary['percentile_layer_matched']:.3f} of {summary['n_layer_matched']} layer-matched")
    if kw["n_random"] > 0:
        cls = lambda c: [(int(l), int(h)) for l, h in pooled[pooled["head_class"] == c][["layer", "head"]].to_numpy()]  # noqa: E731
        table, rand = truth_interventions(model, examples, cls("True"), cls("False"), kw["strengthen"],
                                          kw["n_random"], kw["seed"], kw["batch_size"] * 8)
        store.write("truth_interventions", table)
        store.write("truth_interventions_random", rand)
        click.echo(table[["variant", "rows", "n", "accuracy_before", "accuracy_after", "fixed", "broken", "net"]]
                   .to_string(index=False))
        if len(rand):
            r = rand[rand["rows"] == "all"]
            click.echo(f"label edit with {len(r)} random head sets of the same sizes: net {r['net'].mean():+.1f} "
                       f"(max {r['net'].max():+d})")
    click.echo(f"wrote {store.dir}")


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """'L1H2,L0H3' or '1.2,0.3', or a run directory / parquet with layer and head columns (top_heads)."""
    import pandas as pd

    path = Path(spec)
    if path.exists():
        frame = pd.read_parquet(path / "top_heads.parquet" if path.is_dir() else path)
        return [(int(l), int(h)) for l, h in zip(frame["layer"], frame["head"], strict=True)]
    out = []
    for item in _csv(spec) or []:
        m = re.fullmatch(r"L?(\d+)[H.](\d+)", item, flags=re.IGNORECASE)
        if not m:
            raise DataError(f"bad head {item!r}: write heads as L1H2 or 1.2, comma-separated, or pass a "
                            "`heads find` run directory.")
        out.append((int(m[1]), int(m[2])))
    return out


@heads.command()
@gar_options
@click.option("--heads", "head_spec", required=True,
              help="Heads as L1H2,L0H3, or a `heads find` run directory / top_heads.parquet.")
@click.option("--kind", type=click.Choice(["zero", "mean", "scale", "attend"]), default="zero", show_default=True)
@click.option("--factor", type=float, default=0.0, show_default=True, help="Scale factor for --kind scale.")
@click.option("--attend-role", default="A", show_default=True, help="Role whose last token END attends to (attend).")
@click.option("--n-random", type=int, default=5, show_default=True, help="Random head sets of the same size.")
@click.option("--restrict", type=click.Choice(["candidates", "vocab"]), default="candidates", show_default=True)
@friendly_errors
def intervene(**kw) -> None:
    """Accuracy per task before -> after intervening on the heads, and on random heads of the same number."""
    from mhop_lens.analyses.head_interventions import intervene as run_intervene
    from mhop_lens.analyses.head_interventions import summarize
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore

    examples = load_examples(kw["data"], kw["limit"])  # bad data fails before --out is written
    store = RunStore(kw["out"], "heads intervene", kw)
    model = load_model(kw["model"], device=kw["device"])
    frame = run_intervene(model, examples, parse_heads(kw["head_spec"]), kw["kind"], kw["factor"], kw["attend_role"],
                          kw["n_random"], kw["seed"], kw["restrict"], batch_size=kw["batch_size"])
    store.write("interventions", frame)
    summary = summarize(frame)
    store.write("summary", summary)
    click.echo(summary.to_string(index=False))
    click.echo(f"wrote {store.dir}")


COMMANDS = (attribute, heads)
