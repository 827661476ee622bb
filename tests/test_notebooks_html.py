"""`mhop-lens notebooks --html DIR` executes the percent sources and writes pages with their outputs that load with
no network: plotly.js once beside the pages, no CDN script (checked in headless Chromium when one is installed)."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from mhop_lens.cli import main


def test_unknown_notebook_is_one_error_line(tmp_path):
    result = CliRunner().invoke(main, ["notebooks", "--html", str(tmp_path), "--only", "99_nope"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no notebook ['99_nope']") and "Traceback" not in result.output


@pytest.mark.slow
def test_every_notebook_renders_with_outputs_and_loads_offline(tmp_path):
    """The workshop pages in one command: every notebook executes top to bottom (a cell error fails it) and its page
    holds the outputs, shares one plotly.js and loads with no network."""
    pytest.importorskip("nbconvert")
    pytest.importorskip("jupytext")
    from test_notebooks import NEEDS

    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import builtin_dir

    only = []
    for name, model in sorted(NEEDS.items()):
        try:
            builtin_dir(model)
        except ModelLoadError:
            continue
        only += ["--only", name.removesuffix(".ipynb")]
    if not only:
        pytest.skip("no shipped organism in this installation")
    result = CliRunner().invoke(main, ["notebooks", "--html", str(tmp_path), *only])
    assert result.exit_code == 0, result.output
    pages = sorted(tmp_path.glob("0*.html"))
    assert [p.stem for p in pages] == only[1::2]
    body = (tmp_path / "01_quickstart.html").read_text()
    assert re.search(r"\d+ layers, \d+ heads", body)   # the first cell's output
    for page in pages:
        body = page.read_text()
        assert "jp-OutputArea-output" in body, f"{page.name} has no outputs"
        assert not re.search(r'<script[^>]*src="https?://', body)
        assert page.stat().st_size < 2_000_000 < 3_000_000 < (tmp_path / "plotly.min.js").stat().st_size
        assert page.name in (tmp_path / "index.html").read_text()
    assert any("plotly-graph-div" in p.read_text() and '<script src="plotly.min.js"></script>' in p.read_text()
               for p in pages)
    from mhop_lens.viz.export import find_browser

    if find_browser() is None:
        pytest.skip("no Chromium browser: the offline render check needs one")
    from mhop_lens.viz.offline_check import check_pages

    checks = check_pages(pages)
    assert all(c.ok for c in checks), checks
