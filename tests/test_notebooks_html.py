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
def test_rendered_pages_have_outputs_and_load_offline(tmp_path):
    pytest.importorskip("nbconvert")
    pytest.importorskip("jupytext")
    from mhop_lens.models import builtin_dir

    builtin_dir("organism")
    result = CliRunner().invoke(main, ["notebooks", "--html", str(tmp_path), "--only", "01_quickstart"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "01_quickstart.html"
    body = page.read_text()
    assert "4 layers, 4 heads" in body or re.search(r"\d+ layers, \d+ heads", body)   # the first cell's output
    assert "plotly-graph-div" in body and '<script src="plotly.min.js"></script>' in body
    assert not re.search(r'<script[^>]*src="https?://', body)
    assert page.stat().st_size < 1_000_000 < (tmp_path / "plotly.min.js").stat().st_size
    assert "01_quickstart.html" in (tmp_path / "index.html").read_text()
    from mhop_lens.viz.export import find_browser

    if find_browser() is None:
        pytest.skip("no Chromium browser: the offline render check needs one")
    from mhop_lens.viz.offline_check import check_pages

    (check,) = check_pages([page])
    assert check.ok and check.drawn >= 1, check
