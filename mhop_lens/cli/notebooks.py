"""`mhop-lens notebooks --html DIR`: execute the notebooks and write each as an HTML page with its outputs, for a
workshop room without Python.

The percent sources (``notebooks/*.py``, paired with the ``.ipynb`` by jupytext) are the truth: each is read with
jupytext, run top to bottom by nbclient in a scratch folder (its ``outputs/`` stay there) and exported by nbconvert.
The pages load nothing from the network: plotly.js is written once beside them (``plotly.min.js``) instead of
inlined per page, and the CDN scripts of nbconvert's template and plotly's notebook renderer (require.js, MathJax;
no figure here uses TeX) are dropped. ``index.html`` links the pages. Needs ``pip install -e .[notebooks]``.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from pathlib import Path

import click

from mhop_lens.cli.common import friendly_errors
from mhop_lens.errors import MhopLensError

PLOTLY_JS = "plotly.min.js"
ENV = {"PLOTLY_RENDERER": "notebook", "TQDM_DISABLE": "1"}
REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>')


def default_source() -> Path:
    """The repository's ``notebooks/`` folder (beside the package in an editable install)."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def _require_tools():
    try:
        import jupytext
        import nbclient
        import nbconvert
    except ImportError as e:
        raise MhopLensError(f"{e.name} is not installed: `pip install -e .[notebooks]` adds jupytext, nbclient and "
                            "nbconvert (and JupyterLab to open the notebooks).") from None
    return jupytext, nbclient, nbconvert


def _plain(text: str) -> str:
    """Text without terminal colour codes (tracebacks from the kernel carry them)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def offline_page(body: str) -> str:
    """The page with remote scripts removed and the inlined plotly.js bundle replaced by the shared file."""
    from plotly.offline import get_plotlyjs

    body = REMOTE_SCRIPT.sub("", body)
    return body.replace(f"<script>{get_plotlyjs()}</script>", f'<script src="{PLOTLY_JS}"></script>')


def render_notebooks(sources: list[Path], out_dir: Path, timeout: int = 900, echo=print) -> list[Path]:
    """Execute each percent source and write ``out_dir/<stem>.html``, ``plotly.min.js`` and ``index.html``.

    A notebook that fails is reported and skipped; the others are still written, then one error names the
    failures."""
    jupytext, nbclient, nbconvert = _require_tools()
    from plotly.offline import get_plotlyjs

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / PLOTLY_JS).write_text(get_plotlyjs(), encoding="utf-8")
    exporter = nbconvert.HTMLExporter(template_name="lab")
    pages, failures = [], []
    # the kernel inherits the environment: figures as text/html (which nbconvert renders), no widget progress bars
    # (their pages would need the jupyter-widgets manager from a CDN)
    previous = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        for src in sources:
            nb = jupytext.read(src)
            with tempfile.TemporaryDirectory(prefix=f"{src.stem}-") as work:
                client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                                 resources={"metadata": {"path": work}})
                try:
                    client.execute()
                except nbclient.exceptions.CellExecutionError as e:
                    lines = [_plain(line) for line in str(e).splitlines() if line.strip()]
                    failures.append(f"{src.name}: {lines[-1] if lines else type(e).__name__}")
                    echo(f"failed {failures[-1]}")
                    continue
            nb.metadata.pop("widgets", None)
            body, _ = exporter.from_notebook_node(nb)
            page = out_dir / f"{src.stem}.html"
            page.write_text(offline_page(body), encoding="utf-8")
            pages.append(page)
            echo(f"wrote {page}")
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    links = "\n".join(f'<li><a href="{p.name}">{html.escape(p.stem)}</a></li>' for p in pages)
    (out_dir / "index.html").write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>mhop_lens "
                                        f"notebooks</title></head>\n<body><h1>mhop_lens notebooks</h1>\n<ul>\n{links}"
                                        "\n</ul></body></html>\n", encoding="utf-8")
    if failures:
        raise MhopLensError(f"{len(failures)} of {len(sources)} notebooks failed while executing ("
                            + "; ".join(failures) + f"); the other pages are in {out_dir}.")
    return pages


@click.command()
@click.option("--html", "html_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the rendered pages (index.html, one page per notebook, plotly.min.js).")
@click.option("--source", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of the percent sources (default: the repository's notebooks/).")
@click.option("--only", multiple=True, help="Only these notebooks (name stem, e.g. 01_quickstart); repeatable.")
@click.option("--timeout", type=int, default=900, show_default=True, help="Seconds per cell.")
@friendly_errors
def notebooks(html_dir: str, source: str | None, only: tuple[str, ...], timeout: int) -> None:
    """Execute the notebooks and write them as HTML pages with their outputs (viewable with no Python, offline)."""
    folder = Path(source) if source else default_source()
    sources = sorted(p for p in folder.glob("*.py") if p.with_suffix(".ipynb").exists())
    if only:
        unknown = sorted(set(only) - {p.stem for p in sources})
        if unknown:
            raise MhopLensError(f"no notebook {unknown} in {folder}; choose from {[p.stem for p in sources]}.")
        sources = [p for p in sources if p.stem in only]
    if not sources:
        raise MhopLensError(f"no paired notebooks (NAME.py beside NAME.ipynb) in {folder}; pass --source.")
    render_notebooks(sources, Path(html_dir), timeout, echo=click.echo)


COMMANDS = [notebooks]
