"""`mhop-lens bench`: run every benchmark script of the repository's benchmarks/ folder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click

#: Benchmarks at real model shapes (GiB of memory, minutes): run only when asked for with --only.
HEAVY = {"bench_width.py", "bench_memory.py"}


def benchmarks_dir() -> Path:
    """The checkout's benchmarks/ folder (benchmarks ship with the source tree, not the wheel)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


@click.command()
@click.option("--quick", is_flag=True, help="Small sizes and few repeats (< 5 min in all on a 2-core CPU).")
@click.option("--only", multiple=True, help="Run only these scripts (e.g. --only backpatch).")
@click.option("--study", is_flag=True, help="Print the two-hop study's cost (82,020 queries) on full-depth Llama "
              "shapes, in forward passes and GPU-hours, from the saved real-width measurements (bench_width.py).")
def bench(quick: bool, only: tuple[str, ...], study: bool) -> None:
    """Run each benchmarks/bench_*.py: baseline and ours in one process, results checked, ratios printed."""
    folder = benchmarks_dir()
    if study:
        script = folder / "study_estimate.py"
        if not script.is_file():
            raise click.ClickException(f"{script} not found; run from a source checkout (git clone).")
        code = subprocess.call([sys.executable, str(script)])
        if code:
            raise click.ClickException("the study estimate failed (see above).")
        return
    scripts = sorted(folder.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    else:
        heavy = [s for s in scripts if s.name in HEAVY]
        scripts = [s for s in scripts if s.name not in HEAVY]
        if heavy:
            click.echo(f"skipping {', '.join(s.name for s in heavy)} (real model shapes, several GiB and minutes "
                       "per shape): run them with --only width / --only memory")
    if not scripts:
        raise click.ClickException(f"no benchmark scripts found in {folder}; run from a source checkout "
                                   "(git clone) — benchmarks are not part of the installed wheel.")
    failed = []
    for script in scripts:
        click.echo(f"\n=== {script.name} ===")
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script)] + (["--quick"] if quick else []))
        click.echo(f"--- {script.name}: exit {code}, {time.perf_counter() - start:.0f} s")
        if code:
            failed.append(script.name)
    if failed:
        raise click.ClickException(f"benchmarks failed: {', '.join(failed)}")
