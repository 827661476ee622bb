"""Figures: every figure function on frames made by the real analyses (tiny GPT-2, and the organism when shipped),
offline HTML (no remote script), PNG/PDF written and non-empty when a Chromium browser is present, the registry,
the `figures` command, and the offline circuitsvis page."""

from __future__ import annotations

import re
import struct

import plotly.graph_objects as go
import pytest
from _hopping import tiny_queries
from click.testing import CliRunner

from mhop_lens import viz
from mhop_lens.viz import attention, export, registry

REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)


@pytest.fixture(scope="module")
def hop_tables(tiny_models) -> dict:
    """The hopping analyses' tables on the tiny GPT-2 (5 queries), as a run directory would hold them."""
    from mhop_lens.analyses.backpatch import run_backpatch, summarize_backpatch
    from mhop_lens.analyses.knockout import run_knockout
    from mhop_lens.analyses.lens import run_lens
    from mhop_lens.analyses.patchscope import earliest_layers, run_patchscope
    from mhop_lens.analyses.stages import stage_summary
    from mhop_lens.evaluate import evaluate

    model, qs = tiny_models["gpt2"], tiny_queries()
    ev = evaluate(model, qs, progress=False)
    ev.loc[ev.index[:2], "subset"] = "correct"  # the random model knows nothing: label a contrast to draw it
    ev.loc[ev.index[2:], "subset"] = "incorrect"
    lens = run_lens(model, qs, positions=("last", "t1"), progress=False)
    ps = run_patchscope(model, qs, decoder="lens", progress=False)
    ko = run_knockout(model, qs, progress=False)
    bp = run_backpatch(model, qs, progress=False)
    return {"evaluation": ev, "lens": lens, "patchscope": ps, "earliest": earliest_layers(ps), "knockout": ko,
            "stages": stage_summary(lens, ps, ko, ev), "backpatch": bp,
            "backpatch_summary": summarize_backpatch(bp, ev)}


@pytest.fixture(scope="module")
def gar_tables(tiny_models) -> dict:
    """GAR evaluation, True/False head scores and a head intervention on the tiny GPT-2."""
    from mhop_lens.analyses.heads import find_heads
    from mhop_lens.gar import generate
    from mhop_lens.gar.evaluate import evaluate

    model = tiny_models["gpt2"]
    exs = generate(["things"], forms=["gen", "cls"], n_r=(0, 1), n_per_task=2, n_demos=0)
    tables = {"scores": evaluate(model, exs)}
    tables["head_scores"], tables["top_heads"] = find_heads(model, exs, k=3, batch_size=8)
    try:
        from mhop_lens.analyses.head_interventions import intervene

        heads = list(zip(tables["top_heads"]["layer"], tables["top_heads"]["head"], strict=True))
        tables["interventions"] = intervene(model, [e for e in exs if e.kind == "cls"], heads, n_random=2)
    except TypeError as e:  # the scorer does not take hooks yet
        pytest.skip(f"head interventions unavailable: {e}")
    return tables


def _has_data(fig: go.Figure) -> bool:
    return any(len(getattr(t, "z", None) if getattr(t, "z", None) is not None else (t.y if t.y is not None else []))
               for t in fig.data)


def test_hopping_figures(hop_tables):
    t = hop_tables
    figs = {
        "backpatch": viz.fig_backpatch(t["backpatch"], t["evaluation"]),
        "backpatch_summary": viz.fig_backpatch(t["backpatch_summary"]),
        "decoding": viz.fig_decoding_heatmap(t["patchscope"], t["evaluation"]),
        "earliest": viz.fig_earliest_layers(t["earliest"], t["evaluation"], n_layers=2),
        "lens": viz.fig_lens(t["lens"], t["evaluation"]),
        "lens_prob": viz.fig_lens(t["lens"], position="t1", metric="prob"),
        "knockout": viz.fig_knockout(t["knockout"], t["evaluation"]),
        "stages": viz.fig_stages(t["stages"]),
    }
    for name, fig in figs.items():
        assert isinstance(fig, go.Figure), name
        assert fig.layout.title.text, name
    assert _has_data(figs["backpatch"]) and len(figs["backpatch"].data) == 2  # patched + control side by side
    assert figs["backpatch"].data[0].z.shape == (1, 1)  # the one pair (s=1, t=0) of the 2-layer model
    assert {tr.name.split(",")[-1].split(" (")[0].strip() for tr in figs["lens"].data} == {"correct", "incorrect"}
    assert {tr.name.split(" (")[0] for tr in figs["earliest"].data} == {"correct", "incorrect"}
    assert len(figs["knockout"].data) == 3 * 2  # 3 default edges x correct/incorrect


def test_backpatch_without_failures_says_so(hop_tables):
    ev = hop_tables["evaluation"].assign(subset="correct")
    fig = viz.fig_backpatch(hop_tables["backpatch"], ev)
    assert "no failures" in fig.layout.annotations[0].text


def test_head_and_gar_figures(gar_tables):
    heat = viz.fig_head_heatmap(gar_tables["head_scores"])
    assert heat.data[0].z.shape == (2, 4)
    circuit = viz.fig_circuit(gar_tables["head_scores"], gar_tables["top_heads"])
    labels = {t for tr in circuit.data if tr.text is not None for t in tr.text}
    assert {f"L{r.layer}H{r.head}" for r in gar_tables["top_heads"].itertuples()} <= labels
    bars = viz.fig_intervention_bars(gar_tables["interventions"])
    assert {tr.name for tr in bars.data} == {"before", "target heads", "random heads"}
    gar = viz.fig_gar_accuracy(gar_tables["scores"])
    assert {tr.name for tr in gar.data} >= {"n_r = 0", "n_r = 1"}


def test_registry_builds_every_figure_of_the_tables(hop_tables, gar_tables):
    figs = registry.build_figures({**hop_tables, **gar_tables})
    assert set(figs) == {spec.name for spec in registry.FIGURES}
    only_lens = registry.build_figures({"lens": hop_tables["lens"]})
    assert set(only_lens) == {"lens_last", "lens_t1"}
    not_gar = registry.build_figures({"scores": hop_tables["evaluation"]})  # a "scores" table of another kind
    assert not not_gar


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_export_offline_html_and_static(hop_tables, tmp_path):
    fig = viz.fig_knockout(hop_tables["knockout"], hop_tables["evaluation"])
    result = export.save_figures({"knockout": fig}, tmp_path, plotlyjs="inline")
    html = (tmp_path / "knockout.html").read_text()
    assert not REMOTE_SCRIPT.search(html) and "require.config" not in html
    assert len(html) > 1_000_000  # plotly.js is inlined
    assert not (tmp_path / export.PLOTLY_FILE).exists()
    if export.find_browser() is None:
        assert result.note and "no Chromium" in result.note
        return
    assert result.note is None, result.note
    w, h = _png_size(tmp_path / "knockout.png")
    assert (w, h) == (900 * export.PNG_SCALE, 470 * export.PNG_SCALE)
    assert (tmp_path / "knockout.pdf").read_bytes()[:5] == b"%PDF-"


def test_html_pages_share_one_plotly_js_beside_them(hop_tables, tmp_path):
    figs = {"knockout": viz.fig_knockout(hop_tables["knockout"], hop_tables["evaluation"]),
            "stages": viz.fig_stages(hop_tables["stages"])}
    export.save_figures(figs, tmp_path, ("html",))
    bundle = tmp_path / export.PLOTLY_FILE
    assert bundle.stat().st_size > 1_000_000
    for name in figs:
        html = (tmp_path / f"{name}.html").read_text()
        assert len(html) < 200_000 and f'src="{export.PLOTLY_FILE}"' in html
        assert not REMOTE_SCRIPT.search(html) and "require.config" not in html
    with pytest.raises(ValueError, match="plotlyjs"):
        export.write_html(figs["stages"], tmp_path / "x.html", plotlyjs="cdn")


def test_export_without_browser_is_a_note(hop_tables, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "find_browser", lambda: None)
    result = export.save_figures({"stages": viz.fig_stages(hop_tables["stages"])}, tmp_path)
    assert result.note.startswith("no Chromium")
    assert [p.name for p in result.paths["stages"]] == ["stages.html"]
    assert not (tmp_path / "stages.png").exists()


def test_attention_page_is_offline(tiny_models, tmp_path):
    model = tiny_models["gpt2"]
    q = tiny_queries()[0]
    tokens, pats, names = attention.attention_patterns(model, q.prompt, [(0, 1), (1, 3)])
    assert pats.shape == (2, len(tokens), len(tokens)) and names == ["L0H1", "L1H3"]
    assert abs(pats.sum(-1) - 1).max() < 1e-4
    path = attention.save_attention(model, q.prompt, [(0, 1), (1, 3)], tmp_path / "att.html")
    page = path.read_text()
    assert "CircuitsVis.render" in page and "unpkg.com" not in page and "sourceMappingURL" not in page
    assert not REMOTE_SCRIPT.search(page)


def test_figures_command(hop_tables, tmp_path):
    from mhop_lens.cli.figures import figures

    for name in ("lens", "knockout", "evaluation"):
        hop_tables[name].to_parquet(tmp_path / f"{name}.parquet")
    res = CliRunner().invoke(figures, ["--run", str(tmp_path), "--format", "html"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["knockout.html", "lens_last.html",
                                                                        "lens_t1.html", "plotly.min.js"]
    res = CliRunner().invoke(figures, ["--run", str(tmp_path), "--format", "html", "--self-contained",
                                       "--out", str(tmp_path / "single")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["knockout.html", "lens_last.html",
                                                                       "lens_t1.html"]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(figures, ["--run", str(empty)])
    assert res.exit_code != 0 and "no parquet tables" in res.output


def test_pages_render_with_the_network_off(hop_tables, tiny_models, tmp_path):
    from mhop_lens.viz.offline_check import check_pages

    if export.find_browser() is None:
        pytest.skip("no Chromium browser to render the pages in")
    export.save_figures({"stages": viz.fig_stages(hop_tables["stages"])}, tmp_path, ("html",))
    attention.save_attention(tiny_models["gpt2"], tiny_queries()[0].prompt, [(0, 0)], tmp_path / "att.html")
    checks = check_pages([tmp_path / "stages.html", tmp_path / "att.html"])
    for c in checks:
        assert c.ok, (c.path.name, c.remote_requests, c.failed, c.drawn)
