"""`mhop-lens rescue`: back-patching as a fix, selected on train queries and tested on held-out ones (one table).

`mhop-lens khop`: evaluation per depth and the lens of every bridge entity on k-hop chains (three-hop organism).
"""

from __future__ import annotations

import click

from mhop_lens.cli.common import friendly_errors, set_threads

TABLE_COLUMNS = ["method", "position", "s", "t", "gate", "n_test", "n_failures", "n_applied", "acc_before",
                 "acc_after", "fixes", "breaks", "net", "net_lo", "net_hi", "control_net", "control_net_lo",
                 "control_net_hi"]


def _queries(spec: str, limit: int | None):
    """Two-hop queries of ``spec``; a k-hop spec gives each chain's view at its last bridge."""
    from mhop_lens.data import load_queries
    from mhop_lens.data.khop import load_khop_queries

    if spec.startswith("organism-khop") or spec.endswith(".parquet"):
        return [q.view(q.k - 1) for q in load_khop_queries(spec, limit=limit)]
    return list(load_queries(spec, limit=limit))


def markdown(frame, columns) -> str:
    """A plain markdown table (numbers to 3 decimals), no extra dependency."""
    cols = [c for c in columns if c in frame.columns]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame[cols].itertuples(index=False)]
    return "\n".join(lines)


@click.command()
@click.option("--model", default="organism", show_default=True, help="'organism', 'organism-khop' or a model dir.")
@click.option("--data", default="organism:heldout", show_default=True,
              help="Two-hop queries (as --data of the other verbs) or k-hop ones ('organism-khop:heldout').")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--limit", type=int, default=None, help="Use only the first N queries.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the split, the map and the control.")
@click.option("--train-fraction", type=float, default=0.5, show_default=True,
              help="Share of queries the rescue is selected / trained on; the rest is the test split.")
@click.option("--positions", default="last,t1", show_default=True, help="Patch positions to select from.")
@click.option("--map-steps", type=int, default=120, show_default=True, help="Training steps of the learned map.")
@click.option("--map-candidates", type=int, default=2, show_default=True,
              help="(position, s, t) pairs the learned map is trained for (best train fix rates).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--threads", type=int, default=None)
@friendly_errors
def rescue(**kw) -> None:
    """Fixed pair, gated pair and learned map chosen on a train split; held-out net change with 95% intervals
    and a same-norm random-direction control (rescue.parquet, rescue.md, selection.json)."""
    from mhop_lens.analyses.rescue import run_rescue
    from mhop_lens.errors import DataError
    from mhop_lens.models import load_model, resolve
    from mhop_lens.runs import RunStore

    if not 0 < kw["train_fraction"] < 1:
        raise DataError(f"--train-fraction must be between 0 and 1 (exclusive), not {kw['train_fraction']}.")
    queries = _queries(kw["data"], kw["limit"])
    resolve(kw["model"])
    store = RunStore(kw["out"], "rescue", kw)
    model = load_model(kw["model"], device=kw["device"])
    store.log(f"torch threads: {set_threads(model, kw['threads'])}; {len(queries)} queries from {kw['data']!r}")
    positions = [p.strip() for p in kw["positions"].split(",") if p.strip()]
    table, details = run_rescue(model, queries, positions, kw["train_fraction"], map_steps=kw["map_steps"],
                                map_candidates=kw["map_candidates"], seed=kw["seed"], batch_size=kw["batch_size"])
    store.write("rescue", table)
    store.write_json("selection.json", details)
    text = markdown(table, TABLE_COLUMNS)
    store.path("rescue.md").write_text(text + "\n")
    click.echo(text)
    click.echo(f"wrote {store.path('rescue.parquet')}")


@click.command()
@click.option("--model", default="organism-khop", show_default=True)
@click.option("--data", default="organism-khop:heldout", show_default=True,
              help="k-hop queries: 'organism-khop[:heldout|:train]', a k-hop world.json, or two-hop data (k = 2).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--limit", type=int, default=None)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default=None)
@click.option("--threads", type=int, default=None)
@click.option("--figure/--no-figure", default=True, show_default=True, help="Draw khop_lens.html / .png.")
@friendly_errors
def khop(**kw) -> None:
    """Per-depth evaluation (khop_eval, khop_summary) and the logit lens of every bridge entity at every chain
    position (khop_lens, resolution) of k-hop queries."""
    from mhop_lens.analyses.khop import resolution_profile, run_khop_lens
    from mhop_lens.data.khop import load_khop_queries
    from mhop_lens.evaluate import evaluate_khop, summarize_khop
    from mhop_lens.models import load_model, resolve
    from mhop_lens.runs import RunStore

    queries = load_khop_queries(kw["data"], limit=kw["limit"])
    resolve(kw["model"])
    store = RunStore(kw["out"], "khop", kw)
    model = load_model(kw["model"], device=kw["device"])
    store.log(f"torch threads: {set_threads(model, kw['threads'])}; {len(queries)} queries from {kw['data']!r}")
    frame = evaluate_khop(model, queries, kw["batch_size"])
    summary = summarize_khop(frame)
    store.write("khop_eval", frame)
    store.write("khop_summary", summary)
    click.echo(markdown(summary, list(summary.columns)))
    by_k = {}
    for q in queries:
        by_k.setdefault(q.k, []).append(q)
    import pandas as pd

    lens = pd.concat([run_khop_lens(model, qs, batch_size=kw["batch_size"]) for qs in by_k.values()])
    profile = resolution_profile(lens)
    store.write("khop_lens", lens)
    store.write("resolution", profile)
    click.echo(markdown(profile, list(profile.columns)))
    if kw["figure"]:
        from mhop_lens.viz.export import save_figure
        from mhop_lens.viz.khop import fig_resolution

        for path in save_figure(fig_resolution(profile), store.dir, "khop_lens", ("html", "png")):
            click.echo(f"wrote {path}")
