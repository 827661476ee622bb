"""The demo's ``report.md``: headline numbers read back from the run's tables, step timings, figures, skips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from mhop_lens.runs import RunStore

#: Statistics on fewer queries than this are written as counts ("3 of 4"), never as percentages.
MIN_FOR_PERCENT = 10

#: Paper numbers quoted beside back-patching (Biran et al. 2024, as cited in issue 16; the study's models are
#: 7B-70B Llama models, so the organism's numbers are a comparison of method, not of models).
PAPER_BACKPATCH = ("up to 57% / 66% of previously incorrect queries have a fixing back-patch (the paper's shares "
                   "over each model's set of incorrect queries, quoted as cited in issue 16, not recomputed here)")

GLOSSARY = [
    ("e1, e2, e3", "the query's entities: e1 is named in the prompt, e2 = r1(e1) is the bridge entity, "
                   "e3 = r2(e2) is the answer (\"Mokar 's spouse 's boss\": e1 = Mokar, e2 = Mokar's spouse, "
                   "e3 = that spouse's boss)"),
    ("r1, r2", "the first and second relation; as token positions, the last token of that span of the prompt"),
    ("t1", "the last token of the first-hop phrase r1(e1), where the bridge e2 can first be complete (the "
           "organism's r1 token \"spouse\"; e1's last token in the study's \"the spouse of the performer of "
           "Imagine is\")"),
    ("t2, last", "the last prompt token, where e3 is predicted"),
    ("layer l", "the output of transformer block l (resid_post); s = source layer, t = target layer"),
    ("correct / incorrect / other", "evaluation subsets: both hops known and no shortcut answers, with the "
                                    "two-hop answer right (correct) or wrong (incorrect); other = a hop unknown "
                                    "or a shortcut answers"),
    ("compositionality gap", "share of queries with both hops known whose two-hop answer is wrong"),
    ("decoded", "an entity is decoded from a hidden state when its first token is the logit-lens top-1 (the "
                "organism's Patchscopes decoder)"),
    ("other (decoding)", "the hidden state decodes to none of e1, e2, e3"),
    ("first hop before second", "e2 is decoded at t1 from an earlier layer than e3 at t2 (over queries where both "
                                "are decoded)"),
    ("back-patching", "the residual of a later layer s overwrites that of an earlier layer t < s at the same "
                      "position; a failure is fixed when the answer becomes right"),
    ("criterion first-token / generate", "fixed = e3's first token is the top-1 next token / e3 (or an alias) is "
                                          "a substring of 10 greedily generated tokens (the study's)"),
    ("failures evaluate-subset / clean-miss", "the evaluation's incorrect subset / every query whose clean answer "
                                              "is wrong under the criterion (also those with a hop unknown)"),
    ("shuffled control", "the same patch with the residual of another query (a seeded derangement): what any "
                         "strong vector achieves"),
    ("knockout A->B", "attention from position(s) A to the key tokens B blocked in a window of layers; "
                      "all = every position after B; change of p(e3) is relative, (p - clean) / clean"),
    ("n", "number of queries (or GAR rows) a statistic is computed over"),
]

GAR_GLOSSARY = [
    ("gen", "generate the answer word after the prompt"),
    ("cls", "Yes/No classification of a statement about the context"),
    ("+neg / neg_", "negated query: the answer comes from the one item the query does not match"),
    ("+swap_qa, +swap_kv", "query and answer sides swapped / each item written value-first"),
    ("n_r", "number of knowledge relations composed with the in-context copy (0 = pure copy)"),
    ("composed, yesno, yesno_composed, neg_gen, neg_composed, neg_yesno, neg_yesno_composed",
     "the GAR organism's form names: gen with n_r = 0 is gen, with n_r = 1 composed; cls is yesno "
     "(n_r = 0) / yesno_composed (n_r = 1); the neg_ names are the negated versions"),
    ("copy, fact", "the GAR organism's sub-questions: the in-context copy alone, the relation fact alone"),
    ("True/False heads", "attention heads whose patching moves the Yes/No answer most (score = effect on the "
                         "Yes-No logit difference; + for True, - for False)"),
]


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:g}"


def frac(k: int, n: int) -> str:
    """``k`` out of ``n`` with its n: "k/n = p%" from ``MIN_FOR_PERCENT`` queries on, else "k of n"."""
    k, n = int(k), int(n)
    if n == 0:
        return "n/a (n = 0)"
    if n < MIN_FOR_PERCENT:
        return f"{k} of {n}"
    return f"{100 * k / n:.1f}% ({k}/{n})"


def share(x: float, n: int) -> str:
    """A share ``x`` of ``n`` items (``frac`` of the implied count)."""
    if x is None or n == 0 or (isinstance(x, float) and np.isnan(x)):
        return f"n/a (n = {int(n)})"
    return frac(round(x * n), n)


def relative_change(values: pd.Series) -> str:
    """Mean relative change of p(e3) with its n; under ``MIN_FOR_PERCENT`` queries: how many lose over half."""
    n = len(values)
    if n == 0:
        return "n/a (n = 0)"
    if n < MIN_FOR_PERCENT:
        return f"{int((values < -0.5).sum())} of {n} lose over half of p(e3)"
    return f"{100 * values.mean():+.1f}% (n = {n})"


def _table(path: Path) -> pd.DataFrame | None:
    return pd.read_parquet(path) if path.is_file() else None


def evaluation_lines(summary: dict) -> list[str]:
    kinds = ("two_hop", "hop1", "hop2", "entity_shortcut", "relation_shortcut")
    lines = ["| split | n | " + " | ".join(kinds) + " | correct / incorrect / other | compositionality gap |",
             "|---" * (len(kinds) + 4) + "|"]
    blocks = dict(summary.get("by_split", {}))
    blocks["all"] = summary
    for name, b in blocks.items():
        subsets = b["subsets"]
        lines.append(f"| {name} | {b['n']} | " + " | ".join(share(b["accuracy"][k], b["n"]) for k in kinds)
                     + f" | {subsets['correct']} / {subsets['incorrect']} / {subsets['other']}"
                     + f" | {share(b['compositionality_gap'], b.get('both_hops', 0))} |")
    return ["## Evaluation", "", "Accuracy per prompt kind, as share (count/n) of the split's queries.", "",
            *lines, "",
            "Compositionality gap: share of queries with both hops known whose composition fails (its n = the "
            "queries with both hops known).", ""]


def _stage_rows(stages: pd.DataFrame) -> list[str]:
    out = ["| subset | n | first hop resolved (e2 at t1): found, median layer | second hop resolved (e3 at t2): "
           "found, median layer | first hop before second |", "|---|---|---|---|---|"]
    for subset, g in stages.groupby("subset"):
        both = g["first_before_second"].dropna().astype(bool)
        out.append(f"| {subset} | {len(g)} | {frac(g['first_hop_layer'].notna().sum(), len(g))}, "
                   f"{_num(g['first_hop_layer'].median())} | {frac(g['second_hop_layer'].notna().sum(), len(g))}, "
                   f"{_num(g['second_hop_layer'].median())} | {frac(both.sum(), len(both))} |")
    return out


def backpatch_lines(run: Path) -> list[str]:
    fixes = _table(run / "backpatch_fixes.parquet")
    summary = _table(run / "backpatch_summary.parquet")
    if fixes is None and summary is None:
        return []
    out = ["## Back-patching", "",
           "Share of failures that some (source s > target t) pair fixes, at the study's two positions t1 and last, "
           "under both criteria and both failure definitions (glossary), with the shuffled-donor control beside. "
           f"Paper (Biran et al. 2024, Llama 2/3 models): {PAPER_BACKPATCH}.", ""]
    if fixes is not None and len(fixes):
        out += ["| position | criterion | failures | n | fixed by some pair | shuffled control | best pair "
                "(its control) |", "|---|---|---|---|---|---|---|"]
        for r in fixes.itertuples():
            best = (f"{r.best_pair}: {share(r.best_pair_fix_rate, r.n_failures)} "
                    f"({share(r.best_pair_control_fix_rate, r.n_failures)})" if r.best_pair else "-")
            out.append(f"| {r.position} | {r.criterion} | {r.failures} | {r.n_failures} | "
                       f"{frac(r.n_fixed, r.n_failures)} | {frac(r.n_control_fixed, r.n_failures)} | {best} |")
        out.append("")
    elif summary is not None:
        fix = summary.dropna(subset=["fix_rate"])
        out += (["No failures in the sample, so no fix rate (the sample had no incorrect queries).", ""] if fix.empty
                else [f"- {r.position} {int(r.s)}>{int(r.t)}: {share(r.fix_rate, r.n_failures)} fixed (control "
                      f"{share(r.control_fix_rate, r.n_failures)})" for r in fix.itertuples()] + [""])
    return out


def knockout_lines(run: Path) -> list[str]:
    ko = _table(run / "knockout.parquet")
    if ko is None:
        return []
    from mhop_lens.viz._frames import with_subset

    evaluation = _table(run / "evaluation.parquet")
    ko = with_subset(ko, evaluation, fallback="clean_correct")  # the subsets the knockout figure draws
    source = "the evaluation's subsets" if evaluation is not None else "the clean first-token answer"
    keys = ko["key_tokens"].iloc[0] if "key_tokens" in ko.columns else "span"
    out = ["## Attention knockout", "",
           f"Mean relative change of p(e3) when the edge is blocked in layers c-{int(ko['window'].iloc[0])}.."
           f"c+{int(ko['window'].iloc[0])} around the centre c where it hurts the correct queries most; correct "
           f"and incorrect from {source} (as in the knockout figure), kept apart because pooling them changes the "
           f"meaning; pooled = all queries of the sample. Key tokens: {keys}.", "",
           "| edge | centre c | correct | incorrect | pooled |", "|---|---|---|---|---|"]
    for edge, g in ko.groupby("edge", sort=False):
        ok = g[g["subset"] == "correct"]
        by = (ok if len(ok) else g).groupby("centre")["e3_prob_change"].mean()
        c = int(by.idxmin())
        at = g[g["centre"] == c]
        out.append(f"| {edge} | {c} | {relative_change(at.loc[at['subset'] == 'correct', 'e3_prob_change'])} | "
                   f"{relative_change(at.loc[at['subset'] == 'incorrect', 'e3_prob_change'])} | "
                   f"{relative_change(at['e3_prob_change'])} |")
    return out + [""]


def hopping_lines(run: Path) -> list[str]:
    out = []
    stages = _table(run / "stages.parquet")
    if stages is not None:
        out += ["## When are the hops resolved? (entity decoding)", "", *_stage_rows(stages), ""]
    return out + backpatch_lines(run) + knockout_lines(run)


def gar_lines(run: Path) -> list[str]:
    gar = _table(run / "scores.parquet")
    if gar is None:
        return []
    from mhop_lens.gar.evaluate import accuracy, compositionality_gap

    acc = accuracy(gar, by=("form", "n_r"))
    out = ["## GAR and True/False heads", "", "| form | n_r | n | accuracy |", "|---|---|---|---|"]
    out += [f"| {r.form} | {r.n_r} | {r.n} | {share(r.accuracy, r.n)} |" for r in acc.itertuples()]
    if "subs_correct" in gar.columns and (gar["n_r"] > 0).any():
        gap = compositionality_gap(gar[gar["n_r"] > 0], by=("form",))
        out += ["", "Compositionality gap per composed form (share of rows whose sub-questions are all right but "
                "the composition is wrong): " + ", ".join(f"{r.form} {share(r.gap, r.n_subs_correct)}"
                                                          for r in gap.itertuples())]
    top = _table(run / "top_heads.parquet")
    if top is not None:
        out += ["", "Top True/False heads: " + ", ".join(
            f"L{int(r.layer)}H{int(r.head)} ({r.type}, {r.score:+.3f})" for r in top.itertuples())]
        cls_acc = gar.loc[gar["kind"] == "cls", "correct"].mean() if "kind" in gar.columns else float("nan")
        n_cls = int((gar["kind"] == "cls").sum()) if "kind" in gar.columns else 0
        if cls_acc == cls_acc and abs(cls_acc - 0.5) < 0.1 and top["score"].abs().max() < 1e-2:
            out += ["", f"Caution: this model answers the Yes/No rows at chance ({share(cls_acc, n_cls)}) and the "
                    f"largest "
                    f"head score is {top['score'].abs().max():.1e}: these heads are noise, not True/False heads. "
                    "The tools are validated on tiny models and on the organisms' generation forms "
                    "(docs/heads.md)."]
    inter = _table(run / "interventions.parquet")
    if inter is not None:
        from mhop_lens.analyses.head_interventions import summarize

        s = summarize(inter).set_index("condition")["accuracy"]
        n_cls = int((gar["kind"] == "cls").sum()) if "kind" in gar.columns else 0
        n_tasks = inter["task"].nunique() if "task" in inter.columns else 0
        out += ["", f"Zero-ablating them (Yes/No accuracy, mean over {n_tasks} tasks of {n_cls} Yes/No rows; random "
                "= random head sets of the same size, mean over sets): " + " -> ".join(
                    f"{c} {share(s[c], n_cls) if n_cls else _num(s[c])}" for c in ("before", "target", "random")
                    if c in s)]
    out += _truth_lines(run, gar)
    return out + [""]


def _truth_lines(run: Path, gar: pd.DataFrame) -> list[str]:
    """Head classes, the top set's place in the null distribution, and the GAR paper's intervention (label-
    conditioned) beside the label-free ones: the tables ``heads find`` writes too."""
    out = []
    scores = _table(run / "head_scores.parquet")
    if scores is not None and "head_class" in scores.columns:
        pooled = scores[scores["group"] == "all"] if "group" in scores.columns else scores
        typed = pooled[pooled["head_class"].isin(["True", "False", "mixed"])]
        out += ["", "Head classes (what a head writes to logit(Yes) - logit(No) on true / false rows, and a held-out "
                "probe of its output for truth; rule in docs/heads.md): " + (", ".join(
                    f"L{int(r.layer)}H{int(r.head)} {r.head_class} ({r.direct_true:+.2f} / {r.direct_false:+.2f}, "
                    f"probe {r.probe_acc:.2f})" for r in typed.itertuples()) or "no head typed (all 'other')")]
    null_path = run / "null.json"
    if null_path.is_file():
        s = json.loads(null_path.read_text())
        out += ["", f"Null distribution: zeroing the top set takes Yes/No accuracy {s['accuracy_before']:.3f} -> "
                f"{s['chosen_accuracy']:.3f}; share of {s['n_sets']} random sets of the same size that hurt as "
                f"much or more (percentile) {s['percentile']:.3f}, {s['percentile_layer_matched']:.3f} of "
                f"{s['n_layer_matched']} layer-matched sets (small = the chosen heads are special)."]
    table = _table(run / "truth_interventions.parquet")
    typed = set() if scores is None or "head_class" not in scores.columns else set(scores["head_class"])
    if table is not None and len(table) and not typed & {"True", "False"}:
        out += ["", "No head was typed True or False on this sample, so the interventions below edit nothing here; "
                "docs/heads.md has the 400-pair run (L3H2 True, L3H1 False)."]
    if table is not None and len(table):
        out += ["", "Interventions on the True/False heads (label = the GAR paper's: gold Yes strengthens True heads "
                "and masks False heads, gold No the reverse; amplify and verdict need no label):", "",
                "| variant | rows | n | accuracy before | accuracy after | fixed | broken | net |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r.variant} | {r.rows} | {r.n} | {share(r.accuracy_before, r.n)} | {share(r.accuracy_after, r.n)} "
                f"| {r.fixed} | {r.broken} | {r.net:+d} |" for r in table.itertuples()]
    return out


def write_report(result, store: RunStore) -> Path:
    """Write ``report.md`` of a demo run (``result``: ``demo.DemoResult``)."""
    run = store.dir
    lines = ["# mhop_lens demo report", "",
             f"Model: `{store.args.get('model')}`. Total time: **{result.seconds:.0f} s**. "
             f"Tables: `{run}/*.parquet`; figures: `{result.figures_dir}/`.", ""]
    summary_path = run / "summary.json"
    if summary_path.is_file():
        lines += evaluation_lines(json.loads(summary_path.read_text()))
    lines += hopping_lines(run) + gar_lines(run)
    lines += ["## Terms", "", *(f"- **{k}**: {v}" for k, v in GLOSSARY)]
    if (run / "scores.parquet").is_file():
        lines += [*(f"- **{k}** (GAR): {v}" for k, v in GAR_GLOSSARY)]
    lines += [""]
    lines += ["## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.note.replace('|', '/')} |" for s in result.steps]
    lines += ["", "## Figures", ""]
    figs = Path(result.figures_dir)
    rel = Path(os.path.relpath(figs.resolve(), run.resolve())).as_posix()
    for name in result.figures:
        files = sorted(p.name for p in figs.glob(f"{name}.*"))
        lines.append(f"- {name}: " + ", ".join(f"[{f}]({rel}/{f})" for f in files))
    for page in sorted(figs.glob("attention_*.html")):
        lines.append(f"- {page.stem} (circuitsvis): [{page.name}]({rel}/{page.name})")
    if result.figure_note:
        lines += ["", f"Note: {result.figure_note}"]
    lines += ["", f"Rebuild the figures from the tables: `mhop-lens figures --run {run} --out {figs}` "
              "(the attention pages need the model: rerun the demo).", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
