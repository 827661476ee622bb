"""`mhop-lens evaluate`: score one-hop, two-hop and shortcut prompts; write evaluation.parquet and summary.json."""

from __future__ import annotations

import time

import click

from mhop_lens.cli.common import friendly_errors, run_options, setup_sweep
from mhop_lens.cli.options import POSITIVE, check_generation_fits


@click.command("evaluate")
@run_options
@click.option("--scorer", type=click.Choice(["logprob", "gen"]), default="logprob", show_default=True,
              help="logprob: teacher-forced greedy check of each answer (fast); gen: greedy generation + alias match.")
@click.option("--max-new-tokens", type=POSITIVE, default=None,
              help="gen scorer: tokens to generate (default: as many as the longest alias; the study used 10).")
@friendly_errors
def evaluate(**args) -> None:
    """Which hops, compositions and shortcuts does the model know? One row per query in OUT/evaluation.parquet."""
    from mhop_lens.evaluate import evaluate as run_evaluation
    from mhop_lens.evaluate import summarize

    store, model, queries = setup_sweep("evaluate", args)
    if args["scorer"] == "gen" and args["max_new_tokens"] is not None:
        from mhop_lens.data import PROMPT_KINDS

        check_generation_fits(model, [q.prompt_of(k) for q in queries for k in PROMPT_KINDS], args["max_new_tokens"])
    start = time.perf_counter()
    frame = store.sweep(
        "evaluation", queries,
        lambda chunk: run_evaluation(model, chunk, scorer=args["scorer"], batch_size=args["batch_size"],
                                     max_new_tokens=args["max_new_tokens"], progress=False),
        key=lambda q: q.id, chunk_size=1024, desc="evaluate",
    )
    seconds = time.perf_counter() - start
    summary = {"model": args["model"], "data": args["data"], "scorer": args["scorer"], "seconds": round(seconds, 2),
               "skipped_rows": len(queries.issues)} | summarize(frame)
    store.write_json("summary.json", summary)
    store.log(f"evaluated {len(frame)} queries in {seconds:.1f} s")
    _headline(summary, store.dir)


def _headline(summary: dict, out) -> None:
    acc = summary["accuracy"]
    gap = summary["compositionality_gap"]
    click.echo(f"{summary['n_queries']} queries ({summary['scorer']} scorer, {summary['seconds']} s)")
    click.echo("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    for split, block in summary.get("by_split", {}).items():
        click.echo(f"  {split}: two_hop {block['accuracy']['two_hop']:.3f} (n={block['n']})")
    click.echo(f"compositionality gap: {'n/a' if gap is None else f'{gap:.3f}'} "
               f"(of {summary['both_hops']} queries with both hops known); subsets {summary['subsets']}")
    click.echo(f"wrote {out / 'evaluation.parquet'} and {out / 'summary.json'}")
