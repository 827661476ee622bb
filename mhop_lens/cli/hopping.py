"""`mhop-lens describe | lens | knockout | stages`: the "Hopping Too Late" analyses, one parquet table each.

Tables (columns documented in ``docs/hopping.md`` and in each ``run_*`` docstring):
``describe`` -> patchscope.parquet, earliest.parquet; ``lens`` -> lens.parquet; ``knockout`` -> knockout.parquet;
``stages`` (reads earlier run directories) -> stages.parquet, stage_table.parquet.
"""

from __future__ import annotations

from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors, run_options, setup_sweep
from mhop_lens.cli.options import POSITIVE, check_generation_fits, check_top_k, site_list
from mhop_lens.errors import DataError


def _layers(spec: str | None, allow_same: bool = False):
    """'all' / None -> None (every layer), 'same' (target layers only), or a comma list of ints."""
    if spec in (None, "", "all"):
        return None
    if allow_same and spec == "same":
        return "same"
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected 'all'{', same' if allow_same else ''} or a comma list like 0,2,4, "
                                 f"not {spec!r}.") from None


def _csv(spec: str) -> list[str]:
    return [s.strip() for s in spec.split(",") if s.strip()]


def _done(store, tables: list[str]) -> None:
    for t in tables:
        click.echo(f"wrote {store.path(t + '.parquet')}")


@click.command()
@run_options
@click.option("--positions", default="t1,t2", show_default=True,
              help="Source positions: t1, t2, e1, r1, r2, last (see mhop_lens.analyses.sites).")
@click.option("--source-layers", default="all", show_default=True, help="'all' or a comma list of layers.")
@click.option("--target-layers", default="all", show_default=True,
              help="'all', 'same' (patch at t = s), or a comma list of layers.")
@click.option("--target-prompt", default="default", show_default=True,
              help="'default' / 'description' (the study's few-shot description), 'repeat' (the study's other), "
                   "'identity', or your own prompt ending in the placeholder.")
@click.option("--placeholder", default="x", show_default=True, help="Token of the target prompt that is patched.")
@click.option("--decoder", type=click.Choice(["auto", "generate", "lens", "one_hop"]), default="auto",
              show_default=True, help="auto: generate when the target prompt tokenises cleanly, else lens.")
@click.option("--max-new-tokens", type=POSITIVE, default=None,
              help="Tokens to generate (default 4; 10 with --protocol study).")
@click.option("--sample", is_flag=True, help="Sample (seeded by --seed) instead of greedy decoding.")
@click.option("--protocol", type=click.Choice(["default", "study"]), default="default", show_default=True,
              help="study: the study's generate protocol (10 sampled tokens, seeds 0-2, classes e1 > e2 > e3 by "
                   "colon patterns); applies to the generate decoder.")
@friendly_errors
def describe(**kw) -> None:
    """Patchscopes: decode which entity (e1/e2/e3/other) each layer's hidden state at t1 / t2 encodes."""
    from mhop_lens.analyses.patchscope import TARGET_PROMPTS, earliest_layers, resolve_decoder, run_patchscope

    store, model, queries = setup_sweep("describe", kw)
    target = TARGET_PROMPTS.get(kw["target_prompt"], kw["target_prompt"])
    if resolve_decoder(model, kw["decoder"], target) == "generate":
        check_generation_fits(model, [target], kw["max_new_tokens"])

    def compute(chunk):
        return run_patchscope(
            model, chunk, source_layers=_layers(kw["source_layers"]),
            target_layers=_layers(kw["target_layers"], allow_same=True), positions=_csv(kw["positions"]),
            target_prompt=kw["target_prompt"], decoder=kw["decoder"], max_new_tokens=kw["max_new_tokens"],
            seed=kw["seed"] if kw["sample"] else None, placeholder=kw["placeholder"],
            batch_size=kw["batch_size"], progress=False, protocol=kw["protocol"])

    frame = store.sweep("patchscope", queries, compute, key=lambda q: q.id, chunk_size=kw["batch_size"],
                        sort_by=["qid", "position", "source_layer", "target_layer", "seed"], desc="describe")
    early = earliest_layers(frame)
    store.write("earliest", early, sort_by=["qid"])
    click.echo(f"decoder: {frame['decoder'].iloc[0]}, protocol: {frame['protocol'].iloc[0]}; "
               + describe_line(early))
    _done(store, ["patchscope", "earliest"])


def describe_line(early) -> str:
    """'e2@t1 before e3@t2 in K of N queries where both were decoded (P%)', counts always, no NA."""
    known = early["first_before_second"].dropna()
    n, k = len(known), int(known.sum())
    share = f" ({k / n:.1%})" if n >= 10 else ""
    return (f"e2@t1 before e3@t2 in {k} of {n} queries where both were decoded{share}; "
            f"{len(early) - n} of {len(early)} queries lack one of the two")


@click.command()
@run_options
@click.option("--positions", default="t1,last", show_default=True,
              help="Comma list of positions (t1, last: the study's two; e1, r1, r2, t2).")
@click.option("--sites", default="resid_post,attn_out,mlp_out", show_default=True,
              help="Comma list of TransformerLens act names: resid_post, attn_out, mlp_out (resid: deprecated name "
                   "of resid_post).")
@click.option("--top-k", type=POSITIVE, default=5, show_default=True)
@click.option("--tuned-lens", "tuned_lens", default=None, type=click.Path(exists=True),
              help="Read the residual through a tuned lens trained by `mhop-lens tuned-lens train` (a directory).")
@friendly_errors
def lens(**kw) -> None:
    """Logit lens of the residual, attention and MLP outputs of every layer: ranks of e2, e3 and the prediction."""
    from mhop_lens.analyses.lens import OLD_SITES, run_lens, site_names
    from mhop_lens.analyses.tuned_lens import TunedLens

    kw["sites"] = site_list(kw["sites"], OLD_SITES)
    site_names(_csv(kw["sites"]))  # a typo fails before anything is written
    store, model, queries = setup_sweep("lens", kw)
    check_top_k(model, kw["top_k"])
    translator = TunedLens.load(kw["tuned_lens"], model) if kw["tuned_lens"] else None

    def compute(chunk):
        return run_lens(model, chunk, positions=_csv(kw["positions"]), sites=_csv(kw["sites"]), top_k=kw["top_k"],
                        batch_size=kw["batch_size"], progress=False, translator=translator)

    store.sweep("lens", queries, compute, key=lambda q: q.id, chunk_size=kw["batch_size"],
                sort_by=["qid", "position", "site", "layer"], desc="lens")
    _done(store, ["lens"])


@click.command()
@run_options
@click.option("--edges", default="last->e1,last->r1,all->e1", show_default=True,
              help="Comma list of QUERY->KEY edges; QUERY: last, all, or a span; KEY: e1, r1, r2, t1, last.")
@click.option("--window", type=int, default=1, show_default=True,
              help="Half-width k of the blocked layer window [c-k, c+k] (-1: empty window = clean run).")
@click.option("--centres", default="all", show_default=True, help="'all' or a comma list of centre layers.")
@click.option("--criterion", type=click.Choice(["first-token", "generate", "both"]), default="first-token",
              show_default=True, help="correct = e3's first token top-1, or e3 in 10 greedy tokens (the study's; "
                                      "knockout in the prompt pass), or both.")
@click.option("--key-tokens", type=click.Choice(["span", "last", "word"]), default="span", show_default=True,
              help="Tokens of a key span blocked: span = all (r1 = \"'s spouse\"), last = its last token, word = "
                   "the study's relation word (r1 = \"spouse\").")
@friendly_errors
def knockout(**kw) -> None:
    """Attention knockout: block query->key edges in a window of layers; effect on p(e3) per window centre."""
    from mhop_lens.analyses.knockout import run_knockout

    store, model, queries = setup_sweep("knockout", kw)

    def compute(chunk):
        return run_knockout(model, chunk, edges=_csv(kw["edges"]), window=kw["window"],
                            centres=_layers(kw["centres"]), batch_size=kw["batch_size"], progress=False,
                            keys=kw["key_tokens"], criterion=kw["criterion"])

    frame = store.sweep("knockout", queries, compute, key=lambda q: q.id, chunk_size=kw["batch_size"],
                        sort_by=["qid", "edge", "centre"], desc="knockout")
    summary = frame.groupby(["edge", "centre"])["e3_prob_change"].mean().unstack("centre")
    click.echo(f"mean relative change of p(e3) by edge x centre:\n{summary.round(3).to_string()}")
    _done(store, ["knockout"])


def _find(runs: tuple[str, ...], name: str):
    import pandas as pd

    hits = [Path(r) / f"{name}.parquet" for r in runs if (Path(r) / f"{name}.parquet").is_file()]
    return pd.read_parquet(hits[0]) if hits else None


@click.command()
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(exists=True, file_okay=False),
              help="Run directories of `lens`, `describe` and (optionally) `knockout`; repeat the option.")
@click.option("--evaluation", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Parquet table of `evaluate` (qid, subset); default: correct = greedy first token is e3's.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory for the summary.")
@click.option("--min-drop", type=float, default=0.5, show_default=True,
              help="Relative drop of p(e3) a knockout must reach to mark the propagation layer.")
@click.option("--resume", is_flag=True, help="Overwrite the summary in an existing --out of `stages`.")
@friendly_errors
def stages(runs: tuple[str, ...], evaluation: str | None, out: str, min_drop: float, resume: bool) -> None:
    """Per-query stage summary (first hop, propagation, second hop, extraction) for correct vs incorrect queries."""
    import pandas as pd

    from mhop_lens.analyses.stages import stage_summary, stage_table
    from mhop_lens.runs import RunStore

    lens_frame, ps_frame = _find(runs, "lens"), _find(runs, "patchscope")
    if lens_frame is None or ps_frame is None:
        raise DataError("stages needs a `lens` run and a `describe` run among --run (lens.parquet and "
                        "patchscope.parquet); run `mhop-lens lens` and `mhop-lens describe` first.")
    ev = pd.read_parquet(evaluation) if evaluation else None
    store = RunStore(out, "stages", {"runs": list(runs), "evaluation": evaluation, "min_drop": min_drop}, resume)
    summary = stage_summary(lens_frame, ps_frame, _find(runs, "knockout"), ev, min_drop=min_drop)
    table = stage_table(summary)
    store.write("stages", summary, sort_by=["qid"])
    store.write("stage_table", table)
    click.echo(table.T.to_string())
    _done(store, ["stages", "stage_table"])


COMMANDS = (describe, lens, knockout, stages)
