"""`mhop-lens tuned-lens train`: fit a tuned lens for a model on its own prompts, compare it with the logit lens."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors


@click.group("tuned-lens")
def tuned_lens() -> None:
    """Tuned lens (per-layer affine translators before the readout); use it with `mhop-lens lens --tuned-lens DIR`."""


@tuned_lens.command()
@click.option("--model", default="organism", show_default=True, help="'organism', a local HF directory or hub name.")
@click.option("--data", default="organism:train", show_default=True,
              help="Training prompts (every position is used): a --data spec of the other verbs.")
@click.option("--compare-data", default="organism:heldout", show_default=True,
              help="Queries on which the logit and tuned lenses are compared (earliest decoding layer).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the lens and tables.")
@click.option("--limit", type=int, default=3000, show_default=True, help="Training prompts used.")
@click.option("--compare-limit", type=int, default=1000, show_default=True)
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True, help="Replace a tuned lens already in --out.")
@friendly_errors
def train(**kw) -> None:
    """Train a tuned lens and write tuned_lens.safetensors/.json and lens_comparison.csv in --out."""
    import random

    from mhop_lens.analyses.tuned_lens import compare_lenses, train_tuned_lens
    from mhop_lens.data import load_queries
    from mhop_lens.errors import DataError
    from mhop_lens.models import load_model

    out = Path(kw["out"])
    if (out / "tuned_lens.safetensors").exists() and not kw["overwrite"]:
        raise DataError(f"{out} already holds a tuned lens; pass --overwrite to replace it.")
    queries = list(load_queries(kw["data"]))
    random.Random(kw["seed"]).shuffle(queries)
    prompts = [q.prompt for q in queries[: kw["limit"]]]
    compare = load_queries(kw["compare_data"], limit=kw["compare_limit"])
    model = load_model(kw["model"], device=kw["device"])
    lens, record = train_tuned_lens(model, prompts, steps=kw["steps"], lr=kw["lr"], seed=kw["seed"])
    lens.save(out, {**record, "model": kw["model"], "data": kw["data"]})
    table = compare_lenses(model, compare, lens)
    table.to_csv(out / "lens_comparison.csv", index=False)
    click.echo("held-out KL to the model's output (nats), per layer:")
    click.echo(f"  logit lens {json.dumps([round(x, 3) for x in record['heldout_kl_logit_lens']])}")
    click.echo(f"  tuned lens {json.dumps([round(x, 3) for x in record['heldout_kl_tuned_lens']])}")
    click.echo(table.to_string(index=False))
    click.echo(f"wrote {out / 'tuned_lens.safetensors'} and {out / 'lens_comparison.csv'}")
