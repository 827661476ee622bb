"""Options and plumbing shared by the CLI verbs: every sweep verb takes the same model/data/run options."""

from __future__ import annotations

import functools
from collections.abc import Callable

import click

from mhop_lens.cli.options import BATCH_SIZE, POSITIVE, check_device_option
from mhop_lens.errors import MhopLensError


def run_options(f: Callable) -> Callable:
    """--model --data --out --limit --resume --shard --seed --batch-size --device --device-map --dtype --threads
    --on-error --overwrite, and --executor --shards --executor-option (run the verb's shards through submitit)."""
    options = [
        click.option("--model", "model", default="organism", show_default=True,
                     help="'organism', a local HF model directory, or a hub name."),
        click.option("--data", "data", default="organism", show_default=True,
                     help="'organism' (held-out + trained two-hop queries of the shipped world) or a two-hop CSV "
                          "path."),
        click.option("--out", "out", required=True, type=click.Path(file_okay=False),
                     help="Run directory (config.json, log.txt, parquet tables)."),
        click.option("--limit", type=POSITIVE, default=None, help="Use only the first N queries."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --out, skipping finished queries."),
        click.option("--shard", default=None, metavar="I/N",
                     help="Process shard I of N (disjoint query subsets; combine with `mhop-lens merge`)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--batch-size", type=BATCH_SIZE, default="32", show_default=True,
                     help="Queries per batch, or 'auto' to size batches from the free memory (GPU or CPU RAM), "
                          "at most CAP (default 256)."),
        click.option("--device", default=None, callback=check_device_option,
                     help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
        click.option("--device-map", default=None,
                     help="Passed to the HF loader for models larger than one GPU, e.g. 'auto'."),
        click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
                     help="Weight precision (default: fp32). bf16 halves memory; results stay within the tolerance "
                          "stated in tests/test_width.py."),
        click.option("--threads", type=POSITIVE, default=None,
                     help="CPU threads for torch (default: 1 for models under 100M parameters on CPU, where thread "
                          "synchronisation costs more than it saves, especially on a shared machine)."),
        click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
                     help="Malformed data rows: stop with a list of them, or skip them (each is listed in log.txt)."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the run already in --out (its config, log, chunks and tables)."),
        click.option("--executor", type=click.Choice(["local", "slurm"]), default=None,
                     help="Run the verb as --shards N shard jobs through submitit (local: processes on this machine; "
                          "slurm: a job array), requeue pre-empted shards, and merge them into --out "
                          "(docs/scale-out.md)."),
        click.option("--shards", type=int, default=None, help="Number of shard jobs for --executor."),
        click.option("--executor-option", "executor_option", multiple=True, metavar="KEY=VALUE",
                     help="A submitit parameter for --executor (repeatable), e.g. slurm_partition=gpu, "
                          "gpus_per_node=1, timeout_min=720, slurm_array_parallelism=16."),
    ]
    f = _dispatch(f)
    for option in reversed(options):
        f = option(f)
    return f


def _dispatch(f: Callable) -> Callable:
    """With --executor, hand the verb to the submitit executor (mhop_lens.executor) instead of running it here."""

    @functools.wraps(f)
    def wrapper(**kw):
        if kw.get("executor") is None:
            if kw.get("shards") is not None or kw.get("executor_option"):
                raise click.UsageError("--shards and --executor-option need --executor local|slurm.")
            return f(**kw)
        return _submit(kw)

    return wrapper


_STORES = "mhop_lens.run_stores"  # click context meta: the run stores a verb opened (finished on success)


def friendly_errors(f: Callable) -> Callable:
    """Turn the suite's own errors into one clean CLI error line (exit 1), not a traceback.

    Run stores the verb opened through ``setup_sweep`` are marked finished (status.json) when it returns, and
    their directory locks released however it ends.
    """

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        stores = ctx.meta.setdefault(_STORES, []) if ctx is not None else []
        try:
            result = f(*args, **kwargs)
            for store in stores:
                store.finish()
            return result
        except MhopLensError as e:
            raise click.ClickException(str(e)) from None
        finally:
            for store in stores:
                store.close()
            stores.clear()

    return wrapper


@friendly_errors
def _submit(kw: dict) -> None:
    from mhop_lens.executor import submit_sweep

    queries, inputs = check_inputs(kw, shard=False)
    counts = submit_sweep(click.get_current_context().command, kw, inputs, len(queries))
    for name, n in sorted(counts.items()):
        click.echo(f"{name}: {n} rows")
    click.echo(f"merged {kw['shards']} shards into {kw['out']}")


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


def check_inputs(kw: dict, shard: bool = True):
    """Load the queries and check --shard and --model (before any directory is written); return the queries and
    the fingerprint of each input (resolved path and content hash of the data file, the model directory and
    ``--evaluation``) that config.json records and ``--resume`` / ``merge`` compare."""
    from mhop_lens.data import load_queries
    from mhop_lens.models import resolve
    from mhop_lens.runs import fingerprint_model, fingerprint_path, parse_shard

    queries = load_queries(kw["data"], limit=kw["limit"], shard=kw["shard"] if shard else None,
                           on_error=kw["on_error"])
    parse_shard(kw["shard"])
    model = resolve(kw["model"])
    data_path, split = data_file(kw["data"])
    inputs = {"data": {**fingerprint_path(data_path), "split": split}, "model": fingerprint_model(model)}
    if kw.get("evaluation"):
        inputs["evaluation"] = fingerprint_path(kw["evaluation"])
    return queries, inputs


def data_file(spec: str) -> tuple[str, str | None]:
    """The file a --data spec reads, and the organism split it names (``organism:heldout``) if any."""
    from pathlib import Path

    from mhop_lens.data.organism import organism_world_path

    name, _, split = str(spec).partition(":")
    if name == "organism":
        return str(organism_world_path()), split or None
    if not str(spec).endswith((".json", ".csv")) and (Path(spec) / "world.json").is_file():
        return str(Path(spec) / "world.json"), None
    return str(spec), None


def setup_sweep(verb: str, kw: dict, shard: bool = True, check: Callable | None = None):
    """Queries, run store and model of a sweep verb: inputs checked and fingerprinted, ``--out`` checked against an
    earlier run there (read-only), the model loaded, the queries checked against its vocabulary (docs/data.md,
    "Unknown words") and by the verb's own ``check(queries)``, and only then the run directory locked, checked
    again and written (a failed setup leaves nothing that blocks the corrected command).

    ``shard=False`` returns every query (verbs that draw donors or partners from all queries shard later with
    ``mhop_lens.runs.shard_items``). Skipped malformed rows (``--on-error skip``) are printed and logged.
    """
    from mhop_lens.budget import check_batch_size
    from mhop_lens.data.issues import describe
    from mhop_lens.data.vocab import check_vocabulary
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore

    requested = kw["batch_size"]
    check_batch_size(requested)
    queries, inputs = check_inputs(kw, shard)
    store_args = (kw["out"], verb, kw, kw["resume"])
    store_kw = {"inputs": inputs, "overwrite": kw.get("overwrite", False)}
    RunStore.precheck(*store_args, **store_kw)  # refuse at once, before loading a large model
    model = load_model(kw["model"], device=kw["device"], device_map=kw["device_map"], dtype=kw.get("dtype"))
    queries = check_vocabulary(model, queries, kw["on_error"], source=kw["data"])
    if check is not None:
        check(queries)
    threads = set_threads(model, kw["threads"])
    store = RunStore(*store_args, **store_kw)  # checks again under the directory lock, then writes config.json
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta.setdefault(_STORES, []).append(store)
    if queries.issues:
        message = f"skipped {describe(queries.issues)}"
        click.echo(message, err=True)
        store.log(message)
        for issue in queries.issues:
            store.log(f"skipped {issue}")
    store.log(f"torch threads: {threads}")
    kw["batch_size"] = batch_size(requested, model, queries)
    store.log(f"batch size: {kw['batch_size']} (--batch-size {requested})")
    store.log(f"{len(queries)} queries from {kw['data']!r}; model {kw['model']!r} ({model.cfg.n_layers} layers)")
    return store, model, queries
