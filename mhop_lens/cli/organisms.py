"""`mhop-lens organism train|info` and `mhop-lens organism-gar train|info`: one group factory, two organisms.

Each organism package provides ``assets_dir()`` and ``train.TrainConfig`` / ``train.train``; only the summary
that ``info`` prints differs.
"""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Callable
from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors
from mhop_lens.cli.options import POSITIVE


def _print_two_hop(m: dict) -> None:
    w = m["world"]
    click.echo(f"world:           {w['n_entities']} entities, {w['n_relations']} relations, "
               f"{w['n_two_hop_train']} trained + {w['n_two_hop_heldout']} held-out two-hop triples")
    for split, acc in m["accuracy"].items():
        click.echo(f"{split + ':':<17}{acc:.4f}  (n={m['counts'][split]})")


def _print_gar(m: dict) -> None:
    click.echo(f"held-out:        {m['eval']['n_per_task']} per task, context length per form {m['eval']['cxt_len']}")
    for form, acc in m["accuracy"].items():
        sc = m["shortcuts"].get(form)
        extra = f"  chance {sc['chance']:.3f}, best single cue {sc['best']:.3f} ({sc['best_cue']})" if sc else ""
        click.echo(f"  {form + ':':<20}{acc:.4f}{extra}")
    for form, c in m["compositionality"].items():
        click.echo(f"  gap {form + ':':<20}{c['gap']}  (accuracy given both sub-questions right: "
                   f"{c['accuracy_given_subs_right']}, n={c['n']})")


def _print_common(m: dict, path: Path) -> None:
    click.echo(f"path:            {path}")
    click.echo(f"steps:           {m['steps']}" + ("  (stopped early by --seconds)" if m["stopped_early"] else ""))
    click.echo(f"seconds:         {m['seconds']} wall-clock, {m.get('cpu_seconds', '?')} CPU")
    click.echo(f"seed:            {m['seed']}")
    click.echo(f"command:         {m['command']}")
    click.echo(f"sha256:          {m['sha256']['model.safetensors']}")


def _read_metrics(path: Path, name: str) -> dict:
    """metrics.json of a training output directory, or one clean error naming what to pass instead."""
    file = path / "metrics.json"
    if not file.is_file():
        raise click.ClickException(f"{path} holds no metrics.json, so it is not a directory written by "
                                   f"`mhop-lens {name} train --out DIR`; pass such a directory, or leave --path out "
                                   "for the shipped checkpoint.")
    try:
        metrics = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise click.ClickException(f"{file} is not valid JSON ({str(e).splitlines()[0]}); retrain with "
                                   f"`mhop-lens {name} train --out {path}`.") from None
    if not isinstance(metrics, dict):
        raise click.ClickException(f"{file} holds a JSON {type(metrics).__name__}, not the metrics object of "
                                   f"`mhop-lens {name} train`.")
    return metrics


def organism_group(name: str, package: str, summary: str, train_help: str,
                   print_metrics: Callable[[dict], None]) -> click.Group:
    """The ``train`` / ``info`` group of the organism in ``package`` (e.g. ``mhop_lens.organism``)."""

    @click.group(name, help=summary)
    def group() -> None:
        pass

    @group.command("train", help=train_help)
    @click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output directory.")
    @click.option("--seed", default=0, show_default=True, help="Seeds the data, the initialisation and the batches.")
    @click.option("--steps", type=POSITIVE, default=None, help="Optimizer steps (default: the shipped recipe's).")
    @click.option("--seconds", type=float, default=None, help="Optional wall-clock cap for this session.")
    @click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.safetensors (same --seed).")
    @click.option("--overwrite", is_flag=True, help="Train a new model into an OUT that already holds one.")
    @friendly_errors
    def train_cmd(out: str, seed: int, steps: int | None, seconds: float | None, resume: bool,
                  overwrite: bool) -> None:
        trainer = importlib.import_module(f"{package}.train")
        cfg = trainer.TrainConfig(seed=seed, seconds=seconds, **({} if steps is None else {"steps": steps}))
        args = ["mhop-lens", name, "train", "--out", out, "--seed", str(seed)]
        args += ["--steps", str(steps)] if steps is not None else []
        args += ["--seconds", str(seconds)] if seconds is not None else []
        args += ["--resume"] if resume else []
        args += ["--overwrite"] if overwrite else []
        metrics = trainer.train(out, cfg, resume=resume, command=shlex.join(args), overwrite=overwrite)
        print_metrics(metrics)
        _print_common(metrics, Path(out))

    @group.command("info")
    @click.option("--path", type=click.Path(exists=True, file_okay=False), default=None,
                  help=f"A directory written by `{name} train` (default: the shipped checkpoint).")
    @click.option("--json", "as_json", is_flag=True, help="Print metrics.json instead of the summary.")
    def info_cmd(path: str | None, as_json: bool) -> None:
        """Accuracies, training time, steps, seed, the exact training command and the weights hash."""
        p = Path(path) if path else Path(importlib.import_module(package).assets_dir())
        metrics = _read_metrics(p, name)
        if as_json:
            click.echo(json.dumps(metrics, indent=1))
            return
        try:
            print_metrics(metrics)
            _print_common(metrics, p)
        except (KeyError, TypeError, AttributeError) as e:
            raise click.ClickException(f"{p / 'metrics.json'} is not the metrics of a `mhop-lens {name} train` run "
                                       f"(no {e}); pass such a directory, or the other organism's `info` verb."
                                       ) from None

    return group


organism = organism_group(
    "organism", "mhop_lens.organism",
    "The two-hop model organism: a small GPT-2 trained on a seeded world of made-up facts.",
    "Generate the world and train the two-hop organism into OUT (config, weights, tokenizer, world.json, "
    "metrics.json, and checkpoint.safetensors with the optimizer state for --resume).",
    _print_two_hop,
)
organism_gar = organism_group(
    "organism-gar", "mhop_lens.organism_gar",
    "The GAR organism: a small Llama that composes in-context recall with a kind relation.",
    "Train the GAR organism into OUT on GAR-generator prompts over the organism world.",
    _print_gar,
)
