"""`mhop-lens merge`: combine shard runs into one run directory."""

from __future__ import annotations

import click

from mhop_lens.cli.common import friendly_errors


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Merged run directory.")
@click.option("--overwrite", is_flag=True, help="Replace a run already in OUT (never one of RUNS).")
@friendly_errors
def merge(runs: tuple[str, ...], out: str, overwrite: bool) -> None:
    """Merge the n finished shard runs (``--shard i/n``) of one study into OUT.

    Refused before anything is written: unfinished runs, configs that differ in more than the shard (arguments,
    input fingerprints, package version), a missing or repeated shard, and an OUT that is one of RUNS.
    """
    from mhop_lens.runs import merge as merge_runs

    counts = merge_runs(runs, out, overwrite=overwrite)
    for name, n in sorted(counts.items()):
        click.echo(f"{name}: {n} rows")
