"""Write figures as offline HTML and, where a Chromium browser is found, as PNG and PDF.

HTML pages load with no network either way: by default (``plotlyjs="shared"``) every page of a folder points to one
``plotly.min.js`` written beside it (4.8 MB once instead of per page; keep the file with the pages when copying
them); ``plotlyjs="inline"`` writes single-file pages with plotly.js embedded (``mhop-lens figures --self-contained``).

kaleido 1.x drives a Chromium-family browser through choreographer, which honours ``BROWSER_PATH`` and looks in the
usual places (``/usr/bin/chromium``). Starting the browser costs seconds, so ``save_figures`` renders every static
image of a batch in one kaleido session. Without a browser, or if rendering fails, HTML is still written and the
result carries one note line instead of raising.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go

FORMATS = ("html", "png", "pdf")
STATIC = ("png", "pdf", "svg", "jpeg", "webp")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
PNG_SCALE = 2  # 2x the layout size in pixels (1800 px across at 900): sharp on screen; papers take the PDF (vector)
PLOTLYJS = ("shared", "inline")
PLOTLY_FILE = "plotly.min.js"
HTML_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": PNG_SCALE}}


@dataclass
class Exported:
    """Paths written per figure name, and a note when static images could not be made."""

    paths: dict[str, list[Path]] = field(default_factory=dict)
    note: str | None = None


def find_browser() -> str | None:
    """A Chromium-family executable for kaleido: ``$BROWSER_PATH`` if it exists, else the first on PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).is_file():
        return env
    for name in BROWSER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def write_html(fig: go.Figure, path: Path, plotlyjs: str = "shared") -> Path:
    """Offline HTML: ``"shared"`` loads ``plotly.min.js`` from the page's folder (written there once, by plotly's
    ``include_plotlyjs="directory"``), ``"inline"`` embeds plotly.js; nothing is fetched when the file opens."""
    if plotlyjs not in PLOTLYJS:
        raise ValueError(f"plotlyjs must be one of {PLOTLYJS}, not {plotlyjs!r}.")
    fig.write_html(path, include_plotlyjs="directory" if plotlyjs == "shared" else True, full_html=True,
                   config=HTML_CONFIG)
    return path


def _write_static(jobs: list[tuple[go.Figure, Path]]) -> str | None:
    """Render all (figure, path) jobs in one kaleido session; a note on failure, None on success."""
    browser = find_browser()
    if browser is None:
        return "no Chromium browser found (install `chromium` or set BROWSER_PATH): wrote HTML only, no PNG/PDF."
    os.environ.setdefault("BROWSER_PATH", browser)
    import plotly.io as pio

    try:
        figs = [f for f, _ in jobs]
        pio.write_images(figs, [p for _, p in jobs], scale=PNG_SCALE, width=[f.layout.width or 900 for f in figs],
                         height=[f.layout.height or 450 for f in figs])
    except Exception as e:  # noqa: BLE001 - any renderer failure must leave the HTML and the run intact
        for _, p in jobs:
            p.unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"static export with {browser} failed ({first}): wrote HTML only, no PNG/PDF."
    return None


def save_figures(figs: Mapping[str, go.Figure], out_dir: str | os.PathLike,
                 formats: Iterable[str] = FORMATS, plotlyjs: str = "shared") -> Exported:
    """Write every figure as ``out_dir/<name>.<format>``; static formats share one browser session; HTML pages
    share one ``plotly.min.js`` (``plotlyjs="inline"``: single-file pages)."""
    formats = tuple(formats)
    bad = [f for f in formats if f != "html" and f not in STATIC]
    if bad:
        raise ValueError(f"unknown figure format(s) {bad}; choose from {('html',) + STATIC}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = Exported({name: [] for name in figs})
    jobs = []
    for name, fig in figs.items():
        if "html" in formats:
            result.paths[name].append(write_html(fig, out / f"{name}.html", plotlyjs))
        jobs += [(fig, out / f"{name}.{fmt}") for fmt in formats if fmt in STATIC]
    if jobs:
        result.note = _write_static(jobs)
        if result.note is None:
            for fig_name in figs:
                result.paths[fig_name] += [out / f"{fig_name}.{fmt}" for fmt in formats if fmt in STATIC]
    return result


def save_figure(fig: go.Figure, out_dir: str | os.PathLike, name: str, formats: Iterable[str] = FORMATS,
                plotlyjs: str = "shared") -> list[Path]:
    """Write one figure (see ``save_figures``); prints the note when PNG/PDF could not be made."""
    result = save_figures({name: fig}, out_dir, formats, plotlyjs)
    if result.note:
        print(f"note: {result.note}")
    return result.paths[name]
