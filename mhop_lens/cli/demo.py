"""`mhop-lens demo`: evaluate the organism, run every analysis on a sample, write tables, figures and a report."""

from __future__ import annotations

import click

from mhop_lens.cli.common import friendly_errors
from mhop_lens.cli.options import POSITIVE, check_device_option


@click.command("demo")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run directory: parquet tables, figures/, report.md.")
@click.option("--model", default="organism", show_default=True, help="'organism' or a local HF model directory.")
@click.option("--data", default="organism", show_default=True,
              help="'organism' (both splits of its world) or another query spec, e.g. a two-hop CSV.")
@click.option("--gar-model", default="organism-gar", show_default=True,
              help="Model of the GAR / True/False-heads part (skipped with a note when it is not available).")
@click.option("--quick", is_flag=True, help="Smaller samples (about a third of the time).")
@click.option("--overwrite", is_flag=True,
              help="Replace a run of another command in --out (a previous demo there is always replaced).")
@click.option("--format", "formats", default="html,png,pdf", show_default=True,
              help="Figure formats (PNG/PDF need a Chromium browser; without one HTML only, with a note).")
@click.option("--figures", "figures_dir", default=None, type=click.Path(file_okay=False),
              help="Where to write the figures (default: OUT/figures).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None, callback=check_device_option,
              help="cpu, cuda, ... (default: cuda if available).")
@click.option("--threads", type=POSITIVE, default=None,
              help="CPU threads for torch (default: torch's own choice, one per core).")
@friendly_errors
def demo(out: str, model: str, data: str, gar_model: str, quick: bool, overwrite: bool, formats: str,
         figures_dir: str | None, seed: int, device: str | None, threads: int | None) -> None:
    """The main job: on the organism, evaluate, run every analysis on a sample, write tables, figures, report.

    Exits 1 when a step failed, after writing every other step's tables, the figures and the report (which marks
    the failed steps at its top).
    """
    import torch

    from mhop_lens.demo import QUICK, DemoSize, run_demo

    if threads is not None:
        torch.set_num_threads(threads)

    result = run_demo(out, model=model, data=data, size=QUICK if quick else DemoSize(), seed=seed, device=device,
                      formats=tuple(f.strip() for f in formats.split(",") if f.strip()), overwrite=overwrite,
                      figures_dir=figures_dir, gar_model=gar_model)
    for s in result.steps:
        click.echo(f"{s.name:<24}{s.status:<9}{s.seconds:6.1f}s  {s.note}")
    if result.figure_note:
        click.echo(f"note: {result.figure_note}")
    click.echo(f"demo finished in {result.seconds:.0f}s ({torch.get_num_threads()} torch threads): report "
               f"{result.report}, figures {result.figures_dir}")
    failed = [s.name for s in result.steps if s.status == "failed"]
    if failed:
        raise click.ClickException(f"step(s) failed: {', '.join(failed)} (details in {result.out / 'log.txt'}).")
