"""The demo: on the organism, evaluate, run every analysis on a small balanced sample, write the tables, the
figures and a short markdown report with the headline numbers (``mhop-lens demo``).

Each step is timed and logged. A step whose pieces are not part of this installation (the GAR organism, say) is
skipped with its reason in the report; nothing is ever filled in by hand. Figures are rebuilt from the written
tables by the same registry ``mhop-lens figures`` uses, so the demo's figures are exactly what a user gets.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from mhop_lens.demo_report import write_report
from mhop_lens.errors import MhopLensError
from mhop_lens.runs import RunStore

#: Files and folders a demo run writes (removed by ``overwrite=True``, nothing else is touched).
OUTPUTS = ("config.json", "log.txt", "report.md", "summary.json", "figures", "parts")


@dataclass(frozen=True)
class DemoSize:
    """Sample sizes; the defaults keep the whole demo within 3 minutes on 2 shared CPU cores."""

    n_eval: int = 1000  # queries evaluated per organism split
    n_per_subset: int = 100  # correct and incorrect queries each, for the per-query analyses
    gar_per_task: int = 8  # GAR examples (cls: counter-pairs) per task
    gar_random_sets: int = 3  # random head sets of the intervention control
    gar_null_sets: int = 100  # random (and as many layer-matched) 4-head sets of the null distribution


QUICK = DemoSize(n_eval=40, n_per_subset=6, gar_per_task=2, gar_random_sets=1, gar_null_sets=20)


@dataclass
class Step:
    name: str
    status: str = "done"  # done | skipped | failed
    seconds: float = 0.0
    note: str = ""


@dataclass
class DemoResult:
    out: Path
    figures_dir: Path
    steps: list[Step] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    figure_note: str | None = None
    seconds: float = 0.0

    @property
    def report(self) -> Path:
        return self.out / "report.md"


class Skip(Exception):
    """A step cannot run here; the message says why (it goes into the report)."""


def _prepare(out: Path, overwrite: bool) -> None:
    """Clear a previous demo in ``out`` (a run of another command only with ``overwrite``)."""
    config = out / "config.json"
    if not config.exists():
        return
    command = json.loads(config.read_text()).get("command")
    if command != "demo" and not overwrite:
        raise MhopLensError(f"{out} holds a run of `{command}`, not a demo; pass --overwrite to replace it, or "
                            "choose another --out.")
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for table in out.glob("*.parquet"):
        table.unlink()


def _balanced_sample(evaluation: pd.DataFrame, queries: list, n: int, seed: int) -> list:
    """Up to ``n`` correct and ``n`` incorrect queries (seeded); the whole list if neither subset has two."""
    rng = random.Random(seed)
    by_id = {q.id: q for q in queries}
    chosen = []
    for subset in ("correct", "incorrect"):
        ids = evaluation.loc[evaluation["subset"] == subset, "qid"].tolist()
        chosen += rng.sample(ids, min(n, len(ids)))
    if len(chosen) < 2:
        chosen = [q.id for q in queries[: 2 * n]]
    return [by_id[i] for i in chosen]


def run_demo(out: str | os.PathLike = "runs/demo", model: str = "organism", size: DemoSize = DemoSize(),
             data: str = "organism", seed: int = 0, device: str | None = None,
             formats: tuple[str, ...] = ("html", "png", "pdf"), overwrite: bool = False,
             figures_dir: str | os.PathLike | None = None, gar_model: str = "organism-gar",
             progress: bool = True) -> DemoResult:
    """Run the demo into ``out``: tables (parquet), ``figures/``, ``report.md``; returns what ran and how long.

    ``data``: "organism" (both splits of the organism's world, ``size.n_eval`` each) or any other
    ``load_queries`` spec (e.g. a two-hop CSV for another model). ``figures_dir``: where the figures go (default
    ``out/figures``; the repository's ``figures/`` is made with ``figures_dir="figures"``). ``gar_model``: the model
    of the GAR / True/False-heads part (skipped with a note when it cannot be loaded).
    """
    import torch

    from mhop_lens.models import load_model

    start = time.perf_counter()
    out = Path(out)
    _prepare(out, overwrite)
    store = RunStore(out, "demo", {"model": model, "data": data, "seed": seed, "device": device, **size.__dict__,
                                   "formats": list(formats)})
    result = DemoResult(out, Path(figures_dir) if figures_dir is not None else out / "figures")
    state: dict = {"figures_dir": result.figures_dir, "seed": seed}
    torch.manual_seed(seed)

    def step(name: str, fn: Callable[[], str | None]) -> None:
        t0 = time.perf_counter()
        try:
            note = fn() or ""
            status = "done"
        except Skip as e:
            status, note = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 - one broken analysis must not hide the others' results
            status, note = "failed", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            store.log(traceback.format_exc())
        s = Step(name, status, time.perf_counter() - t0, note)
        result.steps.append(s)
        store.log(f"{name}: {status} in {s.seconds:.1f}s {note}")
        if status != "done":
            tqdm.write(f"[demo] {name}: {status}: {note}")

    t0 = time.perf_counter()
    state["model"] = load_model(model, device=device)
    result.steps.append(Step("load model", "done", time.perf_counter() - t0, f"{model}, "
                             f"{state['model'].cfg.n_layers} layers x {state['model'].cfg.n_heads} heads"))
    plan = [
        ("evaluate", lambda: _evaluate(store, state, data, size, progress)),
        ("logit lens", lambda: _lens(store, state, progress)),
        ("entity decoding", lambda: _describe(store, state, progress)),
        ("attention knockout", lambda: _knockout(store, state, progress)),
        ("stages", lambda: _stages(store, state)),
        ("back-patching", lambda: _backpatch(store, state, seed, progress)),
        ("GAR + True/False heads", lambda: _gar(store, state, gar_model, size, seed, progress)),
        ("attention patterns", lambda: _attention(store, state)),
    ]
    for name, fn in tqdm(plan, desc="demo", unit="step", disable=not progress):
        step(name, fn)
    step("figures", lambda: _figures(store, result, formats))
    result.seconds = time.perf_counter() - start
    write_report(result, store)
    _mark_failures(result)
    store.log(f"demo finished in {result.seconds:.1f}s")
    return result


def _mark_failures(result: DemoResult) -> None:
    """Put the failed steps at the top of report.md, under its title (the Steps table at the end has the rest)."""
    failed = [s for s in result.steps if s.status == "failed"]
    if not failed:
        return
    title, _, rest = result.report.read_text().partition("\n")
    lines = [f"> **FAILED: {len(failed)} step(s)** -- their tables and figures are missing from this report; "
             "the traceback is in log.txt.", ">"]
    lines += [f"> - {s.name}: {s.note}" for s in failed]
    result.report.write_text("\n".join([title, "", *lines, rest]))


# steps ----------------------------------------------------------------------------------------------------------
def _evaluate(store: RunStore, state: dict, data: str, size: DemoSize, progress: bool) -> str:
    from mhop_lens.data import load_queries
    from mhop_lens.data.vocab import check_vocabulary
    from mhop_lens.evaluate import evaluate, summarize

    specs = [f"organism:{split}" for split in ("heldout", "train")] if data == "organism" else [data]
    queries = [q for spec in specs for q in load_queries(spec, limit=size.n_eval)]
    queries = check_vocabulary(state["model"], queries, source=data)  # one unknown-word policy (docs/data.md)
    frame = evaluate(state["model"], queries, progress=progress)
    store.write("evaluation", frame, sort_by=["qid"])
    store.write_json("summary.json", summarize(frame))
    state["evaluation"] = frame
    state["sample"] = _balanced_sample(frame, queries, size.n_per_subset, state["seed"])
    counts = frame["subset"].value_counts().to_dict()
    return f"{len(frame)} queries ({counts}); analysis sample: {len(state['sample'])} queries"


def _need_sample(state: dict) -> list:
    if "sample" not in state:
        raise Skip("no evaluated sample (the evaluate step did not run)")
    return state["sample"]


def _lens(store: RunStore, state: dict, progress: bool) -> None:
    from mhop_lens.analyses.lens import run_lens

    frame = run_lens(state["model"], _need_sample(state), positions=("last", "t1"), progress=progress)
    store.write("lens", frame, sort_by=["qid", "position", "site", "layer"])
    state["lens"] = frame


def _describe(store: RunStore, state: dict, progress: bool) -> str:
    from mhop_lens.analyses.patchscope import earliest_layers, run_patchscope

    frame = run_patchscope(state["model"], _need_sample(state), positions=("t1", "t2"), progress=progress)
    store.write("patchscope", frame, sort_by=["qid", "position", "source_layer", "target_layer"])
    store.write("earliest", earliest_layers(frame), sort_by=["qid"])
    state["patchscope"] = frame
    return f"decoder: {frame['decoder'].iloc[0]}"


def _knockout(store: RunStore, state: dict, progress: bool) -> None:
    from mhop_lens.analyses.knockout import run_knockout

    frame = run_knockout(state["model"], _need_sample(state), progress=progress)
    store.write("knockout", frame, sort_by=["qid", "edge", "centre"])
    state["knockout"] = frame


def _stages(store: RunStore, state: dict) -> None:
    from mhop_lens.analyses.stages import stage_summary, stage_table

    if "lens" not in state or "patchscope" not in state:
        raise Skip("needs the logit lens and entity decoding tables")
    summary = stage_summary(state["lens"], state["patchscope"], state.get("knockout"), state.get("evaluation"))
    store.write("stages", summary, sort_by=["qid"])
    store.write("stage_table", stage_table(summary))


def _backpatch(store: RunStore, state: dict, seed: int, progress: bool) -> None:
    from mhop_lens.analyses.backpatch import fix_table, run_backpatch, summarize_backpatch

    frame = run_backpatch(state["model"], _need_sample(state), positions=("t1", "last"), criterion="both",
                          seed=seed, progress=progress)
    store.write("backpatch", frame, sort_by=["qid", "position", "s", "t", "donor"])
    ev = state.get("evaluation")
    store.write("backpatch_summary", summarize_backpatch(frame, ev, by="pair"))
    store.write("backpatch_queries", summarize_backpatch(frame, ev, by="query"))
    store.write("backpatch_fixes", fix_table(frame, ev))


def _gar(store: RunStore, state: dict, gar_model: str, size: DemoSize, seed: int, progress: bool) -> str:
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import load_model

    try:
        from mhop_lens.analyses import metrics
        from mhop_lens.analyses.edge_attribution import aggregate_edges, attribute_edges
        from mhop_lens.analyses.head_interventions import intervene, null_sets, truth_interventions
        from mhop_lens.analyses.heads import counter_pairs, find_heads
        from mhop_lens.gar.evaluate import evaluate as gar_evaluate
        from mhop_lens.organism_gar.world import build_world, examples
    except ImportError as e:
        raise Skip(f"the GAR pieces are not part of this installation ({e})") from None
    try:
        model = load_model(gar_model, device=state["model"].cfg.device)
    except ModelLoadError as e:
        raise Skip(f"no GAR model: {str(e).splitlines()[0]}") from None
    world = build_world()
    exs = examples(world, 1_000_003, size.gar_per_task, 2)
    frame = gar_evaluate(model, exs, progress=progress)
    store.write("scores", frame, sort_by=["id"])
    scores, top = find_heads(model, exs, k=4)
    store.write("head_scores", scores)
    store.write("top_heads", top)
    cls = [e for e in exs if e.kind == "cls"]
    pairs = counter_pairs(model, cls)  # edge AtP (2 fwd + 1 bwd per batch) for the circuit figure's head -> head edges
    edges = attribute_edges(model, pairs.clean, pairs.corrupted, metrics.yes_no(model, len(pairs)), batch_size=32)
    store.write("edge_scores", aggregate_edges(edges, "atp"))
    heads = list(zip(top["layer"], top["head"], strict=True))
    store.write("interventions", intervene(model, cls, heads, kind="zero", n_random=size.gar_random_sets,
                                                seed=seed))
    null, summary = null_sets(model, cls, heads, max_exhaustive=0, n_random=size.gar_null_sets, seed=seed)
    store.write("null_sets", null)
    store.write_json("null.json", summary)
    pooled = scores[scores["group"] == "all"]
    typed = {c: [(int(a), int(b)) for a, b in pooled.loc[pooled["head_class"] == c, ["layer", "head"]].to_numpy()]
             for c in ("True", "False")}
    table, _ = truth_interventions(model, cls, typed["True"], typed["False"], n_random=size.gar_random_sets, seed=seed)
    store.write("truth_interventions", table)
    state["gar"] = (model, cls[0].prompt, heads)
    return (f"{len(exs)} GAR examples; top heads {', '.join(f'L{l}H{h}' for l, h in heads)}; "
            f"True heads {typed['True'] or 'none'}, False heads {typed['False'] or 'none'}")


def _attention(store: RunStore, state: dict) -> str:
    from mhop_lens.viz.attention import save_attention

    pages = []
    if "knockout" in state and "sample" in state:
        ko = state["knockout"]
        ko = ko[ko["t1_key"]] if ko["t1_key"].any() else ko
        layer = int(ko.groupby("centre")["e3_prob_change"].mean().idxmin())
        model = state["model"]
        heads = [(layer, h) for h in range(model.cfg.n_heads)]
        query = state["sample"][0]
        save_attention(model, query.prompt, heads, state["figures_dir"] / "attention_two_hop.html",
                       f"Layer {layer} (largest knockout drop of p(e3)): attention on {query.prompt!r}")
        pages.append(f"two-hop query, layer {layer}")
    if "gar" in state:
        model, prompt, heads = state["gar"]
        save_attention(model, prompt, heads, state["figures_dir"] / "attention_gar_heads.html",
                       "GAR: attention of the top True/False heads")
        pages.append("GAR top heads")
    if not pages:
        raise Skip("no knockout table or GAR heads to choose heads from")
    return "; ".join(pages)


def _figures(store: RunStore, result: DemoResult, formats: tuple[str, ...]) -> str:
    from mhop_lens.viz.export import save_figures
    from mhop_lens.viz.registry import build_figures, read_tables

    figs = build_figures(read_tables(store.dir))
    exported = save_figures(figs, result.figures_dir, formats)
    result.figures = list(figs)
    result.figure_note = exported.note
    return f"{len(figs)} figures" + (f"; {exported.note}" if exported.note else "")
