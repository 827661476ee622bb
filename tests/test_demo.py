"""The demo on a reduced sample: tables, figures and report.md are written, skipped pieces are reported, and the
`demo` command refuses to clobber a previous run without --overwrite. (The full demo is timed separately.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from mhop_lens.data import FIXTURE_CSV
from mhop_lens.demo import DemoSize, run_demo
from mhop_lens.viz import export

TINY = DemoSize(n_eval=20, n_per_subset=4, gar_per_task=1, gar_random_sets=1)
HOPPING_TABLES = {"evaluation", "lens", "patchscope", "earliest", "knockout", "stages", "stage_table", "backpatch",
                  "backpatch_summary", "backpatch_queries"}


def test_demo_on_the_organism(organism, tmp_path):
    result = run_demo(tmp_path / "demo", size=TINY, formats=("html", "png"), progress=False)
    out = result.out
    assert not [s for s in result.steps if s.status == "failed"], result.steps
    assert HOPPING_TABLES <= {p.stem for p in out.glob("*.parquet")}
    ev = pd.read_parquet(out / "evaluation.parquet")
    assert set(ev["split"]) == {"heldout", "train"} and len(ev) == 2 * TINY.n_eval
    report = (out / "report.md").read_text()
    for heading in ("## Evaluation", "## When are the hops resolved?", "## Back-patching", "## Steps"):
        assert heading in report
    summary = json.loads((out / "summary.json").read_text())
    assert f"{100 * summary['accuracy']['two_hop']:.1f}%" in report  # headline numbers come from the tables
    figs = out / "figures"
    assert (figs / "plotly.min.js").stat().st_size > 1_000_000  # one shared copy of plotly.js beside the pages
    for name in ("backpatch", "decoding_heatmap", "earliest_layers", "lens_last", "knockout", "stages"):
        page = (figs / f"{name}.html").read_text()
        assert 'src="plotly.min.js"' in page and "Plotly.newPlot" in page  # loads the local copy, no network
        if export.find_browser():
            assert (figs / f"{name}.png").stat().st_size > 10_000
    assert (figs / "attention_two_hop.html").is_file()
    gar = next(s for s in result.steps if s.name.startswith("GAR"))
    assert gar.status == "done" or (gar.status == "skipped" and gar.note in report)


def test_demo_command_on_another_model(tiny_dirs, tmp_path):
    from mhop_lens.cli.demo import demo

    out = tmp_path / "demo"
    args = ["--out", str(out), "--model", tiny_dirs["gpt2"], "--data", str(FIXTURE_CSV), "--gar-model",
            tiny_dirs["gpt2"], "--quick", "--format", "html"]
    res = CliRunner().invoke(demo, args)
    assert res.exit_code == 0, res.output
    assert "demo finished" in res.output and (out / "report.md").is_file()
    html = {p.name for p in (out / "figures").glob("*.html")}
    assert html >= {"lens_last.html", "knockout.html", "gar_accuracy.html", "attribution_heads.html",
                    "circuit.html", "head_interventions.html", "attention_gar_heads.html"}
    assert "## GAR" in (out / "report.md").read_text()


def test_demo_replaces_a_demo_but_not_another_run(tmp_path):
    from mhop_lens.demo import _prepare
    from mhop_lens.errors import MhopLensError

    (tmp_path / "config.json").write_text('{"command": "lens"}')
    with pytest.raises(MhopLensError, match="--overwrite"):
        _prepare(tmp_path, overwrite=False)
    (tmp_path / "config.json").write_text('{"command": "demo"}')
    for name in ("report.md", "lens.parquet", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "lens_last.png").write_text("x")
    _prepare(tmp_path, overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad", ["tiff"])
def test_unknown_format_is_an_error(tmp_path, bad):
    with pytest.raises(ValueError, match="unknown figure format"):
        export.save_figures({}, tmp_path, ("html", bad))
