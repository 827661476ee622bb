"""Options and plumbing shared by the CLI verbs: every sweep verb takes the same model/data/run options."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from mhop_lens.errors import MhopLensError


def run_options(f: Callable) -> Callable:
    """--model --data --out --limit --resume --shard --seed --batch-size --device --device-map --dtype --threads
    --on-error."""
    options = [
        click.option("--model", "model", default="organism", show_default=True,
                     help="'organism', a local HF model directory, or a hub name."),
        click.option("--data", "data", default="organism", show_default=True,
                     help="'organism' (held-out + trained two-hop queries of the shipped world) or a two-hop CSV "
                          "path."),
        click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                     help="Run directory (config.json, log.txt, parquet tables)."),
        click.option("--limit", type=int, default=None, help="Use only the first N queries."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out, skipping finished queries."),
        click.option("--shard", default=None, metavar="I/N",
                     help="Process shard I of N (disjoint query subsets; combine with `mhop-lens merge`)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", default="32", show_default=True, metavar="N|auto|auto:CAP",
                     help="Queries per batch, or 'auto' to size batches from the free memory (GPU or CPU RAM), "
                          "at most CAP (default 256)."),
        click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--device-map", default=None,
                     help="Passed to the HF loader for models larger than one GPU, e.g. 'auto'."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Weight precision (default: fp32). bf16 halves memory; results stay within the tolerance "
                          "stated in tests/test_width.py."),
        click.option("--threads", type=int, default=None,
                     help="CPU threads for torch (default: 1 for models under 100M parameters on CPU, where thread "
                          "synchronisation costs more than it saves, especially on a shared machine)."),
        click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
                     help="Malformed data rows: stop with a list of them, or skip them (each is listed in log.txt)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def friendly_errors(f: Callable) -> Callable:
    """Turn the suite's own errors into one clean CLI error line (exit 1), not a traceback."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except MhopLensError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def not_implemented(verb: str, issue: int) -> Callable:
    """A verb whose implementation lands with another issue: says so, exits 2, never pretends to work."""

    def run(**_):
        raise click.UsageError(f"`mhop-lens {verb}` is not implemented yet (tracked in issue {issue}).")

    return run


SMALL_MODEL = 100_000_000  # parameters; below this a CPU run defaults to one torch thread


def set_threads(model, threads: int | None) -> int:
    """Apply --threads (see its help); return the number of threads torch now uses."""
    import torch

    if threads is None:
        on_cpu = str(model.cfg.device).startswith("cpu")
        small = sum(p.numel() for p in model.original_model.parameters()) < SMALL_MODEL
        threads = 1 if on_cpu and small else None
    if threads is not None:
        if threads < 1:
            raise click.BadParameter(f"--threads must be at least 1, not {threads}.")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def batch_size(value, model, queries) -> int:
    """--batch-size as a number of rows: given, or from the free memory and the longest prompt (``budget``)."""
    from mhop_lens.budget import resolve_batch_size
    from mhop_lens.tokens import encode

    if str(value).strip().isdigit():
        return int(value)
    longest = max((q.prompt for q in queries[:1000]), key=len, default="")
    return resolve_batch_size(value, model, int(encode(model, [longest]).tokens.shape[1]) + 8)


def setup_sweep(verb: str, kw: dict, shard: bool = True):
    """Queries, run store and model of a sweep verb, in the order that fails before ``--out`` is created.

    ``shard=False`` returns every query (verbs that draw donors or partners from all queries shard later with
    ``mhop_lens.runs.shard_items``). Skipped malformed rows (``--on-error skip``) are printed and logged.
    """
    from mhop_lens.budget import check_batch_size
    from mhop_lens.data import load_queries
    from mhop_lens.data.issues import describe
    from mhop_lens.models import load_model, resolve
    from mhop_lens.runs import RunStore, parse_shard

    queries = load_queries(kw["data"], limit=kw["limit"], shard=kw["shard"] if shard else None,
                           on_error=kw["on_error"])
    parse_shard(kw["shard"])
    requested = kw["batch_size"]
    check_batch_size(requested)
    resolve(kw["model"])  # a bad --data, --shard or --model fails before the run directory is created
    store = RunStore(kw["out"], verb, kw, kw["resume"])
    if queries.issues:
        message = f"skipped {describe(queries.issues)}"
        click.echo(message, err=True)
        store.log(message)
        for issue in queries.issues:
            store.log(f"skipped {issue}")
    model = load_model(kw["model"], device=kw["device"], device_map=kw["device_map"], dtype=kw.get("dtype"))
    store.log(f"torch threads: {set_threads(model, kw['threads'])}")
    kw["batch_size"] = batch_size(kw["batch_size"], model, queries)
    store.log(f"batch size: {kw['batch_size']} (--batch-size {requested})")
    store.log(f"{len(queries)} queries from {kw['data']!r}; model {kw['model']!r} ({model.cfg.n_layers} layers)")
    return store, model, queries
