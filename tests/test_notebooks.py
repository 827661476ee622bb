"""Every notebook is a jupytext percent source (notebooks/NAME.py, linted by ruff) paired with its .ipynb, and the
two agree. That every notebook runs top to bottom on the shipped organisms (CPU) is tested by rendering them all
with `mhop-lens notebooks --html` (tests/test_notebooks_html.py), the workshop pages' own command.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: notebook -> built-in model it needs
NEEDS = {
    "01_quickstart.ipynb": "organism",
    "02_hopping_too_late.ipynb": "organism",
    "03_true_false_heads.ipynb": "organism-gar",
    "04_workshop.ipynb": "organism",
    "05_khop_and_rescue.ipynb": "organism-khop",
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NEEDS)


def test_notebooks_are_committed_without_outputs():
    for name in NEEDS:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type ==
                   "code"), f"{name} holds outputs; regenerate it from its source with `jupytext --sync notebooks/*.py`"


def test_every_notebook_has_its_percent_source_and_they_agree():
    jupytext = pytest.importorskip("jupytext")
    for name in NEEDS:
        source = (NOTEBOOKS / name).with_suffix(".py")
        assert source.exists(), f"{name} has no percent source {source.name}"
        assert source.read_text().startswith("# ---\n# jupyter:\n#   jupytext:\n#     formats: ipynb,py:percent")
        paired, nb = jupytext.read(source), nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [(c.cell_type, c.source) for c in paired.cells] == [(c.cell_type, c.source) for c in nb.cells], \
            f"{name} and {source.name} differ: run `jupytext --sync notebooks/{source.name}`"
        assert [c.metadata.get("tags") for c in paired.cells] == [c.metadata.get("tags") for c in nb.cells]


def test_workshop_solutions_are_hidden():
    nb = nbformat.read(NOTEBOOKS / "04_workshop.ipynb", as_version=4)
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == 4 and all(c.metadata["jupyter"]["source_hidden"] for c in solutions)
