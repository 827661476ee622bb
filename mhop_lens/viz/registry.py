"""Which tables of a run directory make which figures, so ``mhop-lens figures --run DIR`` rebuilds every figure
whose input tables exist (a run of one verb, or the demo's run holding them all)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

Tables = dict[str, pd.DataFrame]


@dataclass(frozen=True)
class FigureSpec:
    """A figure: its file name, the tables it needs (each entry: one name, or a tuple of alternatives), the
    optional ones it uses when present, and its builder."""

    name: str
    needs: tuple[str | tuple[str, ...], ...]
    build: Callable[[Tables], go.Figure]
    uses: tuple[str, ...] = ("evaluation",)

    def ready(self, tables: Tables) -> bool:
        return all(any(n in tables for n in ((need,) if isinstance(need, str) else need)) for need in self.needs)


#: Columns a table must have to be taken for what its name says (``scores`` is the GAR verb's per-example table).
CONTRACTS = {"scores": {"form", "n_r", "correct"}, "interventions": {"condition", "set_index", "accuracy"},
             "attribution": {"site", "layer", "head"}}


def _backpatch(t: Tables) -> go.Figure:
    from mhop_lens.viz.backpatch import fig_backpatch

    if "backpatch_summary" in t:
        return fig_backpatch(t["backpatch_summary"])
    return fig_backpatch(t["backpatch"], t.get("evaluation"))


def _decoding(t: Tables) -> go.Figure:
    from mhop_lens.viz.decoding import fig_decoding_heatmap

    return fig_decoding_heatmap(t["patchscope"], t.get("evaluation"))


def _earliest(t: Tables) -> go.Figure:
    from mhop_lens.analyses.patchscope import earliest_layers
    from mhop_lens.viz.decoding import fig_earliest_layers

    earliest = t["earliest"] if "earliest" in t else earliest_layers(t["patchscope"])
    n_layers = int(t["patchscope"]["source_layer"].max()) + 1 if "patchscope" in t else None
    return fig_earliest_layers(earliest, t.get("evaluation"), n_layers)


def _lens(t: Tables) -> go.Figure:
    from mhop_lens.viz.lens import fig_lens

    return fig_lens(t["lens"], t.get("evaluation"))


def _lens_t1(t: Tables) -> go.Figure:
    from mhop_lens.viz.lens import fig_lens

    return fig_lens(t["lens"], t.get("evaluation"), position="t1")


def _knockout(t: Tables) -> go.Figure:
    from mhop_lens.viz.knockout import fig_knockout

    return fig_knockout(t["knockout"], t.get("evaluation"))


def _stages(t: Tables) -> go.Figure:
    from mhop_lens.viz.stages import fig_stages

    return fig_stages(t["stages"])


def _head_heatmap(t: Tables) -> go.Figure:
    from mhop_lens.viz.heads import fig_head_heatmap

    return fig_head_heatmap(t["head_scores"] if "head_scores" in t else t["attribution"],
                            label=t["top_heads"] if "top_heads" in t else None)


def _circuit(t: Tables) -> go.Figure:
    from mhop_lens.viz.heads import fig_circuit

    return fig_circuit(t["head_scores"], t.get("top_heads"), edges=t.get("edge_scores"))


def _interventions(t: Tables) -> go.Figure:
    from mhop_lens.viz.heads import fig_intervention_bars

    return fig_intervention_bars(t["interventions"])


def _gar(t: Tables) -> go.Figure:
    from mhop_lens.viz.gar import fig_gar_accuracy

    return fig_gar_accuracy(t["scores"])


FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("backpatch", ("backpatch",), _backpatch, ("backpatch_summary", "evaluation")),
    FigureSpec("decoding_heatmap", ("patchscope",), _decoding),
    FigureSpec("earliest_layers", ("patchscope",), _earliest, ("earliest", "evaluation")),
    FigureSpec("lens_last", ("lens",), _lens),
    FigureSpec("lens_t1", ("lens",), _lens_t1),
    FigureSpec("knockout", ("knockout",), _knockout),
    FigureSpec("stages", ("stages",), _stages, ()),
    FigureSpec("attribution_heads", (("head_scores", "attribution"),), _head_heatmap, ("top_heads",)),
    FigureSpec("circuit", ("head_scores",), _circuit, ("top_heads", "edge_scores")),
    FigureSpec("head_interventions", ("interventions",), _interventions, ()),
    FigureSpec("gar_accuracy", ("scores",), _gar, ()),
)


def read_tables(run_dir: str | os.PathLike) -> Tables:
    """Every consolidated ``<table>.parquet`` of a run directory, by table name."""
    return {p.stem: pd.read_parquet(p) for p in sorted(Path(run_dir).glob("*.parquet"))}


def _honours_contract(name: str, frame: pd.DataFrame) -> bool:
    return CONTRACTS.get(name, set()) <= set(frame.columns)


def applicable(tables: Tables) -> list[FigureSpec]:
    """The figures whose required tables are all present (``lens_t1`` only when the lens has t1 rows)."""
    tables = {n: f for n, f in tables.items() if _honours_contract(n, f)}
    out = [f for f in FIGURES if f.ready(tables)]
    if "lens" in tables and "t1" not in set(tables["lens"]["position"]):
        out = [f for f in out if f.name != "lens_t1"]
    return out


def build_figures(tables: Tables) -> dict[str, go.Figure]:
    """name -> figure for every applicable figure of ``tables``."""
    return {spec.name: spec.build(tables) for spec in applicable(tables)}
