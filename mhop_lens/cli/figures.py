"""`mhop-lens figures --run DIR`: rebuild every figure whose input tables exist in a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors


@click.command("figures")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run directory (of the demo or of any analysis verb).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Where to write the figures (default: RUN/figures).")
@click.option("--format", "formats", default="html,png,pdf", show_default=True,
              help="Comma list of html, png, pdf, svg (PNG/PDF need a Chromium browser).")
@click.option("--self-contained", is_flag=True,
              help="Embed plotly.js in every HTML page (single files, 4.8 MB each) instead of one shared "
                   "plotly.min.js beside them.")
@friendly_errors
def figures(run_dir: str, out: str | None, formats: str, self_contained: bool) -> None:
    """Rebuild the figures of a run from its parquet tables (nothing is recomputed)."""
    from mhop_lens.viz.export import save_figures
    from mhop_lens.viz.registry import build_figures, read_tables

    tables = read_tables(run_dir)
    if not tables:
        raise click.ClickException(f"{run_dir} holds no parquet tables; is it a run directory?")
    figs = build_figures(tables)
    if not figs:
        raise click.ClickException(f"none of the tables in {run_dir} ({', '.join(sorted(tables))}) makes a figure.")
    out_dir = Path(out) if out else Path(run_dir) / "figures"
    result = save_figures(figs, out_dir, [f.strip() for f in formats.split(",") if f.strip()],
                          "inline" if self_contained else "shared")
    for name, paths in result.paths.items():
        click.echo(f"{name}: {', '.join(p.name for p in paths)}")
    if result.note:
        click.echo(f"note: {result.note}")
    click.echo(f"wrote {len(figs)} figures to {out_dir}")
