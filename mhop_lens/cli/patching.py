"""`mhop-lens backpatch | patch`: back-patching (with its shuffled-donor control) and activation patching.

Tables: ``backpatch`` -> backpatch.parquet (one row per qid x position x s x t x donor), backpatch_pairs.parquet
(fix / break rates per (s, t), control beside), backpatch_queries.parquet (fixed by any pair, which pairs),
backpatch_fixes.parquet + .md (fix rates per position x criterion x failure definition, ``fix_table``);
``patch`` -> patching.parquet (one row per pair x layer x position|head). Both resume by query id.
"""

from __future__ import annotations

import click

from mhop_lens.cli.common import friendly_errors, run_options, setup_sweep
from mhop_lens.cli.options import limit_too_small, site_list
from mhop_lens.errors import MhopLensError


def _shard(items: list, kw: dict) -> list:
    from mhop_lens.runs import parse_shard, shard_items

    return shard_items(items, parse_shard(kw["shard"]))


@click.command()
@run_options
@click.option("--positions", default="t1,last", show_default=True,
              help="Comma list: t1, last (the study's two), e1, r1, r2.")
@click.option("--criterion", type=click.Choice(["first-token", "generate", "both"]), default="first-token",
              show_default=True, help="'Fixed' = e3's first token is top-1 (first-token), or e3 / an alias is in "
                                      "10 greedily generated tokens (generate, the study's), or both side by side.")
@click.option("--failures", type=click.Choice(["clean-miss", "evaluate-subset", "both"]), default=None,
              help="Failures = clean misses under the criterion, or the evaluate subset 'incorrect' (both hops "
                   "known, no shortcut; from --evaluation, else evaluated here). Default: evaluate-subset with "
                   "--evaluation, else clean-miss.")
@click.option("--control/--no-control", default=True, show_default=True,
              help="Also run the shuffled-donor control (residual from another query, seeded by --seed).")
@click.option("--evaluation", type=click.Path(exists=True, dir_okay=False), default=None,
              help="evaluation.parquet from `mhop-lens evaluate`: failures/correct from its subset column "
                   "(default: the clean first-token answer).")
@click.option("--reference", is_flag=True, help="Use the slow per-pair full-forward implementation.")
@friendly_errors
def backpatch(**kw) -> None:
    """Back-patching: overwrite resid(t) with the clean resid(s > t) at a position; which failures get fixed?"""
    import pandas as pd

    from mhop_lens.analyses.backpatch import (
        derangement,
        fix_table,
        format_fix_table,
        run_backpatch,
        summarize_backpatch,
    )

    store, model, queries = setup_sweep("backpatch", kw, shard=False)
    positions = [p.strip() for p in kw["positions"].split(",") if p.strip()]
    donors = [queries[j] for j in derangement(len(queries), kw["seed"])] if kw["control"] else [None] * len(queries)
    items = _shard(list(zip(queries, donors, strict=True)), kw)

    def compute(chunk):
        qs = [q for q, _ in chunk]
        frame = run_backpatch(model, qs, positions=positions, control=kw["control"], batch_size=kw["batch_size"],
                              donors=[d for _, d in chunk] if kw["control"] else None, reference=kw["reference"],
                              criterion=kw["criterion"], progress=False)
        store.log(f"backpatch chunk of {len(qs)} queries: {frame.attrs['path']} path")
        return frame

    frame = store.sweep("backpatch", items, compute, key=lambda item: item[0].id, chunk_size=kw["batch_size"],
                        sort_by=["qid", "position", "t", "s", "donor"], desc="backpatch")
    failures = kw["failures"] or ("evaluate-subset" if kw["evaluation"] else "clean-miss")
    evaluation = pd.read_parquet(kw["evaluation"]) if kw["evaluation"] else None
    if evaluation is None and failures != "clean-miss":
        from mhop_lens.evaluate import evaluate

        evaluation = evaluate(model, [q for q, _ in items], batch_size=kw["batch_size"], progress=False)
        store.write("evaluation", evaluation, sort_by=["qid"])
    table = fix_table(frame, evaluation if failures != "clean-miss" else None)
    if failures == "evaluate-subset":
        table = table[table["failures"] == "evaluate-subset"]
    store.write("backpatch_fixes", table)
    store.path("backpatch_fixes.md").write_text(format_fix_table(table) + "\n")
    click.echo(format_fix_table(table))
    criterion = "first-token" if kw["criterion"] == "first-token" else "generate"
    evaluation = evaluation if failures != "clean-miss" else None
    pairs = summarize_backpatch(frame, evaluation, criterion=criterion)
    per_query = summarize_backpatch(frame, evaluation, by="query", criterion=criterion)
    store.write("backpatch_pairs", pairs, sort_by=["position", "t", "s"])
    store.write("backpatch_queries", per_query, sort_by=["qid", "position"])
    store.log(f"criterion {kw['criterion']}, failures {failures}\n{format_fix_table(table)}")
    click.echo(f"criterion: {kw['criterion']}; failures: {failures}; backpatch_pairs / backpatch_queries use "
               f"{criterion} and {'evaluate-subset' if evaluation is not None else 'clean-miss'}")
    for name in ("backpatch", "backpatch_pairs", "backpatch_queries", "backpatch_fixes"):
        click.echo(f"wrote {store.path(name + '.parquet')}")


@click.command()
@run_options
@click.option("--sites", type=click.Choice(["resid_pre", "z", "q", "k", "v", "pattern", "resid", "heads"]),
              default="resid_pre", show_default=True,
              help="TransformerLens act names: resid_pre by layer x position; z / q / k / v / pattern: one head's "
                   "activation at every position (k, v: key/value heads on GQA models). resid and heads are the "
                   "deprecated names of resid_pre and z.")
@click.option("--reference", is_flag=True, help="Use the slow one-forward-per-site implementation.")
@friendly_errors
def patch(**kw) -> None:
    """Activation patching clean -> corrupted; pairs share (r1, r2) and differ in e1 (metric: logit difference)."""
    from mhop_lens.analyses.patching import OLD_SITES, counterfactual_pairs, run_activation_patching
    from mhop_lens.data import load_queries

    kw["sites"] = site_list(kw["sites"], OLD_SITES)

    def check(queries) -> None:
        try:
            counterfactual_pairs(queries, kw["seed"])
        except MhopLensError as e:
            raise limit_too_small(e, kw["limit"], kw["data"], "no counterfactual pair (two queries with the same "
                                  "r1 and r2 but different e1 and e3)",
                                  lambda: load_queries(kw["data"], on_error=kw["on_error"]),
                                  lambda qs: counterfactual_pairs(qs, kw["seed"])) from None

    store, model, queries = setup_sweep("patch", kw, shard=False, check=check)
    pairs = _shard(counterfactual_pairs(queries, kw["seed"]), kw)
    store.log(f"{len(pairs)} clean/corrupted pairs")

    def compute(chunk):
        frame = run_activation_patching(model, [c for c, _ in chunk], [x for _, x in chunk], sites=kw["sites"],
                                        batch_size=kw["batch_size"], reference=kw["reference"], progress=False)
        return frame.drop(columns="pair")

    index = "position" if kw["sites"] == "resid_pre" else "head"
    frame = store.sweep("patching", pairs, compute, key=lambda pair: pair[0].id, chunk_size=kw["batch_size"],
                        sort_by=["qid", "layer", index], desc=f"patch {kw['sites']}")
    summary = frame.groupby(["layer", index])["recovered"].mean().unstack(index)
    click.echo(f"mean recovered logit difference by layer x {index}:\n{summary.round(2).to_string()}")
    click.echo(f"wrote {store.path('patching.parquet')}")


COMMANDS = [backpatch, patch]
