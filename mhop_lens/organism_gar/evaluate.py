"""Held-out scoring of the GAR organism: accuracy per form, counter-pair accuracy, compositionality gap, and the
single-cue shortcut baselines of the evaluation set.

The balanced evaluation scores non-negated forms on 3-item contexts and negated forms on 2-item contexts: in GAR's
negated contexts of 3+ items the query key fills all but one item, so "the item whose key occurs once" answers
without reading the query; with 2 items that cue is at chance.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import pandas as pd

from mhop_lens.gar import GarExample
from mhop_lens.organism_gar.predict import predict
from mhop_lens.organism_gar.splits import EVAL_SEED, FIT_SEED, exclude_trained, held_out_contexts, training_contexts
from mhop_lens.organism_gar.world import KIND_RELATION, Row, examples, fact_rows, form_name, rows_of

__all__ = ["EVAL_SEED", "FIT_SEED", "eval_examples", "held_out_contexts", "held_out_examples", "score"]

#: (cxt_len of the balanced evaluation) per form.
BALANCED_CXT = {"gen": 3, "composed": 3, "yesno": 3, "yesno_composed": 3,
                "neg_gen": 2, "neg_composed": 2, "neg_yesno": 2, "neg_yesno_composed": 2}
_ITEM = re.compile(r"(\w+) has (\w+)\.")


def _balanced(world, n_per_task: int, seed: int) -> list[GarExample]:
    out = []
    for cxt in sorted(set(BALANCED_CXT.values())):
        out += [e for e in examples(world, seed, n_per_task, cxt) if BALANCED_CXT[form_name(e)] == cxt]
    return out


def held_out_examples(world, n_per_task: int, seed: int = EVAL_SEED) -> tuple[list[GarExample], int]:
    """The balanced examples of ``seed`` whose contexts the shipped recipe never trained on, and how many were
    dropped: none for ``EVAL_SEED`` (held out of training by construction); for any other seed, every example
    (and its counter-pair partner) whose context occurs in the training stream (``splits.training_contexts``)."""
    exs = _balanced(world, n_per_task, seed)
    if seed == EVAL_SEED:
        return exs, 0
    return exclude_trained(exs, training_contexts(world))


def eval_examples(world, n_per_task: int, seed: int = EVAL_SEED) -> list[GarExample]:
    """The balanced held-out examples: every form at its BALANCED_CXT context length, minus any whose context was
    trained on (only possible for a seed other than ``EVAL_SEED``; :func:`held_out_examples` gives the count)."""
    return held_out_examples(world, n_per_task, seed)[0]


def eval_set(world, n_per_task: int, seed: int = EVAL_SEED) -> list[Row]:
    """Rows of :func:`eval_examples` with their sub-questions, plus every fact."""
    return rows_of(eval_examples(world, n_per_task, seed)) + fact_rows(world)


def score(model, tok, rows: list[Row]) -> pd.DataFrame:
    """One line per row: form, prompt, answer, greedy prediction (whole vocabulary), correct."""
    pred = predict(model, tok, rows).tolist()
    inv = {i: w for w, i in tok.get_vocab().items()}
    df = pd.DataFrame([r.__dict__ for r in rows])
    df["pred"] = [inv[i] for i in pred]
    df["correct"] = df["pred"] == df["answer"]
    return df


def pair_accuracy(df: pd.DataFrame) -> dict[str, float]:
    """Per Yes/No form: fraction of counter-pairs with both rows right."""
    cls = df[df["pair_id"].notna()]
    return {f: float(g.groupby("pair_id")["correct"].all().mean()) for f, g in cls.groupby("form")}


def compositionality(df: pd.DataFrame, exs: list[GarExample]) -> dict[str, dict]:
    """Per composed form: accuracy, P(both sub-questions right), accuracy given both right, and the gap.

    Sub-questions are the copy ("So K has" -> thing) and the fact ("thing is a kind of" -> kind). For Yes/No forms
    the unit is the counter-pair (both rows right). gap = 1 - accuracy given both sub-questions right.
    """
    right = dict(zip(df["prompt"], df["correct"], strict=True))
    units: dict[str, dict[str, dict]] = defaultdict(dict)
    for e in exs:
        if e.n_r:
            unit = units[form_name(e)].setdefault(e.pair_id or e.id, {"ok": [], "subs": []})
            unit["ok"].append(right[e.prompt])
            unit["subs"] = [right[q["prompt"]] for q in e.subquestions]
    out = {}
    for form, us in sorted(units.items()):
        ok = [all(u["ok"]) for u in us.values()]
        sub = [all(u["subs"]) for u in us.values()]
        given = [o for o, s in zip(ok, sub, strict=True) if s]
        acc_given = sum(given) / len(given) if given else None
        out[form] = {"accuracy": round(sum(ok) / len(ok), 4), "n": len(ok), "subs_right": round(sum(sub) / len(sub), 4),
                     "accuracy_given_subs_right": None if acc_given is None else round(acc_given, 4),
                     "gap": None if acc_given is None else round(1 - acc_given, 4)}
    return out


def _items(ex: GarExample) -> list[tuple[str, str]]:
    return _ITEM.findall(ex.prompt[ex.prompt.index("< "):ex.prompt.index(">.")])


def _cues(ex: GarExample, kinds: dict[str, str]) -> dict[str, object]:
    """Single cues of an example that do not solve the task by themselves unless the data is unbalanced."""
    items = _items(ex)
    keys = [k for k, _ in items]
    query = ex.span_text("Q")[0]
    cues: dict[str, object] = {"constant": 0, "query_key": query, "n_items": len(items),
                               "query_position": keys.index(query)}
    if ex.kind == "cls":
        stated = ex.span_text("A")[0].split()[-1]
        owner = [i for i, (_, v) in enumerate(items) if stated in (v, kinds[v])][0]
        cues |= {"stated_item": stated, "stated_position": owner,
                 "stated_key_count": keys.count(keys[owner]), "stated_key": keys[owner]}
    return cues


def _gen_guesses(ex: GarExample, kinds: dict[str, str]) -> dict[str, Callable[[], str]]:
    items = _items(ex)
    keys = [k for k, _ in items]
    ans = [kinds[v] if ex.n_r else v for _, v in items]
    unique = [a for (k, _), a in zip(items, ans, strict=True) if keys.count(k) == 1]
    return {"first_item": ans[0], "last_item": ans[-1], "unique_key_item": unique}


def _tie_credit(counts: Counter, gold: str, labels: Sequence[str]) -> float:
    """Expected accuracy of answering a majority label of ``counts`` chosen uniformly among the tied ones (all of
    ``labels`` tie when ``counts`` is empty)."""
    top = max(counts.values(), default=0)
    tied = [k for k, v in counts.items() if v == top] if top else list(labels)
    return (gold in tied) / len(tied) if tied else 0.0


def shortcut_baselines(world, exs: list[GarExample], fit: list[GarExample]) -> dict[str, dict]:
    """Best single-cue predictor per form, fitted on ``fit`` (fresh examples) and scored on ``exs``.

    Yes/No forms: for each cue, the majority label per cue value. Generation forms: answering the first / last
    context item, the item whose key occurs once (random among several), a uniformly random context candidate
    (expected accuracy), and the most frequent fitted answer. ``chance`` is 0.5 for Yes/No and
    E[1/#candidates] for generation. Independent of tie order: where several labels / answers tie for the majority
    (or a cue value never occurs in ``fit``: all labels tie), the predictor is credited 1/#tied when gold is among
    them (its expected accuracy choosing uniformly among the tied ones).
    """
    kinds = dict(world.value_relations[KIND_RELATION].facts)
    by_form: dict[str, list[GarExample]] = defaultdict(list)
    fit_by_form: dict[str, list[GarExample]] = defaultdict(list)
    for e in exs:
        by_form[form_name(e)].append(e)
    for e in fit:
        fit_by_form[form_name(e)].append(e)
    out = {}
    for form, es in sorted(by_form.items()):
        gold = [e.answer.strip() for e in es]
        if es[0].kind == "cls":
            res = {}
            for cue in _cues(es[0], kinds):
                table: dict[object, Counter] = defaultdict(Counter)
                for e in fit_by_form[form]:
                    table[_cues(e, kinds)[cue]][e.answer.strip()] += 1
                labels = sorted({e.answer.strip() for e in fit_by_form[form]} | set(gold))
                res[cue] = sum(_tie_credit(table[_cues(e, kinds)[cue]], a, labels)
                               for e, a in zip(es, gold, strict=True)) / len(es)
            chance = 0.5
        else:
            guesses = [_gen_guesses(e, kinds) for e in es]
            res = {name: sum(g[name] == a for g, a in zip(guesses, gold, strict=True)) / len(es)
                   for name in ("first_item", "last_item")}
            res["unique_key_item"] = sum(g["unique_key_item"].count(a) / max(1, len(g["unique_key_item"]))
                                         for g, a in zip(guesses, gold, strict=True)) / len(es)
            res["random_candidate"] = sum(1 / len(e.candidates) for e in es) / len(es)
            prior = Counter(e.answer.strip() for e in fit_by_form[form])
            res["prior_majority"] = sum(_tie_credit(prior, a, sorted(prior)) for a in gold) / len(es)
            chance = res["random_candidate"]
        best = max(res, key=res.get)
        out[form] = {"chance": round(chance, 4), "best_cue": best, "best": round(res[best], 4),
                     "margin_over_chance": round(res[best] - chance, 4),
                     "cues": {k: round(v, 4) for k, v in res.items()}}
    return out


def full_metrics(model, tok, world, n_per_task: int, check_per_task: int = 20) -> dict:
    """Everything metrics.json reports about held-out behaviour (balanced set, ``n_per_task`` per task)."""
    exs = eval_examples(world, n_per_task)
    df = score(model, tok, rows_of(exs) + fact_rows(world))
    check = score(model, tok, eval_set(world, check_per_task))
    unbalanced = score(model, tok, rows_of([e for e in examples(world, EVAL_SEED, n_per_task, 3)
                                            if e.negated]))
    return {
        "eval": {"seed": EVAL_SEED, "n_per_task": n_per_task, "cxt_len": BALANCED_CXT,
                 "rows": df.groupby("form").size().to_dict()},
        "accuracy": df.groupby("form")["correct"].mean().round(4).to_dict(),
        "pair_accuracy": {k: round(v, 4) for k, v in pair_accuracy(df).items()},
        "compositionality": compositionality(df, exs),
        "shortcuts": shortcut_baselines(world, exs, _balanced(world, n_per_task, FIT_SEED)),
        "negation_cxt3_accuracy": unbalanced.groupby("form")["correct"].mean().round(4).to_dict(),
        "check": {"n_per_task": check_per_task,
                  "accuracy": check.groupby("form")["correct"].mean().round(4).to_dict()},
    }
