"""`mhop-lens gar generate | evaluate`: GAR examples to parquet, and their scores per form, n_r and task.

Tables: ``generate`` -> examples.parquet (``mhop_lens.gar.to_frame`` columns); ``evaluate`` -> scores.parquet (one
row per example), accuracy.parquet (per form x n_r), gap.parquet (per task: compositionality gap).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors
from mhop_lens.cli.options import POSITIVE, check_device_option
from mhop_lens.errors import DataError


def _csv(spec: str | None) -> list[str] | None:
    return [s.strip() for s in spec.split(",") if s.strip()] if spec else None


def load_examples(spec: str, limit: int | None = None) -> list:
    """Examples from a parquet file / run directory (examples.parquet), a published .jsonl, or 'organism-gar'."""
    import pandas as pd

    from mhop_lens.gar import from_frame

    path = Path(spec)
    if spec == "organism-gar":
        from mhop_lens.organism_gar.evaluate import eval_examples
        from mhop_lens.organism_gar.world import build_world

        examples = eval_examples(build_world(), n_per_task=16)
    elif path.is_dir():
        if not (path / "examples.parquet").is_file():
            raise DataError(f"{spec} is a directory without examples.parquet; pass a `mhop-lens gar generate` run "
                            "directory, an examples parquet file, or a published GAR .jsonl.")
        examples = from_frame(pd.read_parquet(path / "examples.parquet"))
    elif path.suffix == ".jsonl":
        from mhop_lens.gar.published import load_published

        examples = load_published(path)
    elif path.suffix in (".parquet", ".pq"):
        examples = from_frame(pd.read_parquet(path))
    else:
        raise DataError(f"--data {spec!r}: expected a .parquet of GAR examples, a run directory holding "
                        "examples.parquet, a published GAR .jsonl, or 'organism-gar'.")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1, not {limit}.")
    if not examples:
        raise DataError(f"--data {spec!r} holds no GAR examples; pass a non-empty examples file.")
    return examples[:limit] if limit is not None else examples


def gar_options(f: Callable) -> Callable:
    """--model --data --out --limit --seed --batch-size --device for verbs that read GAR examples."""
    options = [
        click.option("--model", default="organism-gar", show_default=True,
                     help="'organism-gar', 'organism', a local HF model directory, or a hub name."),
        click.option("--data", required=True,
                     help="GAR examples: parquet / run dir of `gar generate`, a published .jsonl, or 'organism-gar'."),
        click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory."),
        click.option("--limit", type=POSITIVE, default=None, help="Use only the first N examples."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=POSITIVE, default=32, show_default=True),
        click.option("--device", default=None, callback=check_device_option,
                     help="cpu, cuda, ... (default: cuda if available)."),
    ]
    return functools.reduce(lambda g, opt: opt(g), reversed(options), f)


@click.group()
def gar() -> None:
    """GAR benchmark: generate examples, evaluate a model on them."""


@gar.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--relation-sets", default=None, help="Comma list of built-in relation sets (default: all).")
@click.option("--forms", default=None, help="Comma list like gen,cls,cls+neg,gen+swap_qa (default: all 16).")
@click.option("--n-r", default="0,1,2", show_default=True, help="Comma list of difficulties (non-copy relations).")
@click.option("--n-per-task", type=POSITIVE, default=8, show_default=True)
@click.option("--cxt-len", type=POSITIVE, default=3, show_default=True)
@click.option("--n-demos", type=int, default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def generate(**kw) -> None:
    """Write examples.parquet: every (relation set, form, relation pair) with n_per_task examples / pairs."""
    from mhop_lens.gar import generate as gen
    from mhop_lens.gar import to_frame
    from mhop_lens.runs import RunStore

    store = RunStore(kw["out"], "gar generate", kw)
    examples = gen(_csv(kw["relation_sets"]), _csv(kw["forms"]), [int(x) for x in _csv(kw["n_r"])],
                   kw["n_per_task"], kw["cxt_len"], kw["n_demos"], kw["seed"])
    store.write("examples", to_frame(examples))
    store.log(f"{len(examples)} examples")
    click.echo(f"wrote {len(examples)} examples to {store.path('examples.parquet')}")


@gar.command()
@gar_options
@click.option("--restrict", type=click.Choice(["candidates", "vocab"]), default="candidates", show_default=True,
              help="Score among the example's candidates or over the whole vocabulary.")
@click.option("--scorer", type=click.Choice(["auto", "first-token", "full"]), default="auto", show_default=True,
              help="First answer token at END, or full answer log-prob (auto: full when first tokens collide).")
@click.option("--no-subquestions", is_flag=True, help="Skip sub-question scoring (no compositionality gap).")
@friendly_errors
def evaluate(**kw) -> None:
    """Write scores.parquet, accuracy.parquet (form x n_r) and gap.parquet (per task)."""
    from mhop_lens.gar.evaluate import accuracy, compositionality_gap
    from mhop_lens.gar.evaluate import evaluate as run_eval
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore

    examples = load_examples(kw["data"], kw["limit"])  # bad data fails before --out is written
    store = RunStore(kw["out"], "gar evaluate", kw)
    model = load_model(kw["model"], device=kw["device"])
    frame = run_eval(model, examples, kw["restrict"], kw["scorer"], not kw["no_subquestions"], kw["batch_size"],
                     progress=True)
    store.write("scores", frame)
    acc = accuracy(frame)
    store.write("accuracy", acc)
    if not kw["no_subquestions"]:
        store.write("gap", compositionality_gap(frame))
    store.log(f"{len(frame)} examples scored, accuracy {frame['correct'].mean():.3f}")
    click.echo(acc.to_string(index=False))
    click.echo(f"wrote {store.dir}")
