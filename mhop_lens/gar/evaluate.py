"""GAR evaluation: next-token prediction at END, accuracy per form and n_r, compositionality gap per task.

Scoring (one row per example):
- ``scorer="first-token"``: the answer's first token vs the other candidates' first tokens (``restrict=
  "candidates"``) or vs the whole vocabulary (``restrict="vocab"``), from one forward of the prompt.
- ``scorer="full"``: every candidate's full log-prob (sum over its tokens, one forward per prompt+candidate);
  with ``restrict="vocab"`` the answer must be the greedy continuation token by token.
- ``scorer="auto"`` (default): first-token when the candidates' first tokens are distinct, else full.
Sub-questions (copy, key fact, value fact) have no candidate set and are scored greedily over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mhop_lens.errors import DataError
from mhop_lens.forward import last_logits, run
from mhop_lens.gar.examples import GarExample
from mhop_lens.gar.generate import Form
from mhop_lens.tokens import Encoded, encode, first_token_id, first_token_ids

Scorer = Literal["auto", "first-token", "full"]
Restrict = Literal["candidates", "vocab"]
#: Forward hooks active while scoring: a fixed list, or a function of (batch encoding, the batch's examples) for
#: interventions that depend on each row's positions (e.g. an attention rewrite at END).
Hooks = Sequence | Callable[[Encoded, list[GarExample]], Sequence]


def _hooks_for(hooks: Hooks | None, enc: Encoded, chunk: list[GarExample]) -> list:
    if hooks is None:
        return []
    return list(hooks(enc, chunk) if callable(hooks) else hooks)


def form_name(ex: GarExample) -> str:
    """"cls+neg", "gen+swap_qa", ... of an example."""
    return str(Form(ex.kind, ex.negated, ex.swap_qa, ex.swap_kv))


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield i, items[i : i + size]


@torch.no_grad()
def continuation_scores(model, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 32,
                        hooks: Hooks | None = None, examples: Sequence[GarExample] | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Sum log-prob of each continuation after its prompt, and whether it is the greedy continuation.

    ``examples`` (one per prompt) are handed to a callable ``hooks`` with each batch.
    """
    logp = np.zeros(len(prompts))
    greedy = np.zeros(len(prompts), dtype=bool)
    for start, chunk in _batches(list(zip(prompts, continuations, strict=True)), batch_size):
        enc = encode(model, [p + c for p, c in chunk])
        batch_examples = list(examples[start : start + len(chunk)]) if examples is not None else []
        lp = run(model, enc, _hooks_for(hooks, enc, batch_examples)).float().log_softmax(-1)
        for j, (p, _) in enumerate(chunk):
            pos = [i for i, off in enumerate(enc.offsets[j]) if off is not None and off[1] > len(p)]
            if not pos or pos[0] == 0:
                raise DataError(f"continuation {chunk[j][1]!r} adds no token after {p[-40:]!r}; answers must be "
                                "non-empty and start with a space (' Yes').")
            idx = torch.tensor(pos)
            targets = enc.tokens[j, idx]
            rows = lp[j, idx - 1]
            logp[start + j] = float(rows.gather(1, targets[:, None].to(rows.device)).sum())
            greedy[start + j] = bool((rows.argmax(-1).cpu() == targets.cpu()).all())
    return logp, greedy


def _first_ids(model, texts: Sequence[str]) -> list[int]:
    return first_token_ids(model, texts).tolist()


def _decode(model, token: int) -> str:
    return model.tokenizer.decode([token])


@torch.no_grad()
def _first_token_rows(model, examples: Sequence[GarExample], restrict: Restrict, batch_size: int,
                      progress: bool, hooks: Hooks | None) -> list[dict]:
    rows = []
    for _, chunk in tqdm(list(_batches(examples, batch_size)), desc="gar eval", disable=not progress):
        enc = encode(model, [ex.prompt for ex in chunk])
        lp = last_logits(model, enc, _hooks_for(hooks, enc, list(chunk))).float().log_softmax(-1).cpu()
        for j, ex in enumerate(chunk):
            ans = first_token_id(model, ex.answer)
            if restrict == "candidates":
                ids = _first_ids(model, ex.candidates)
                scores = lp[j, ids]
                best = int(scores.argmax())
                pred_id, pred = ids[best], ex.candidates[best]
                others = [s for i, s in zip(ids, scores.tolist(), strict=True) if i != ans]
            else:
                pred_id = int(lp[j].argmax())
                pred = _decode(model, pred_id)
                others = [float(lp[j].clone().index_fill_(0, torch.tensor([ans]), -torch.inf).max())]
            rows.append(dict(pred=pred, correct=pred_id == ans, answer_logprob=float(lp[j, ans]),
                             margin=float(lp[j, ans]) - max(others) if others else np.inf))
    return rows


def _full_rows(model, examples: Sequence[GarExample], restrict: Restrict, batch_size: int,
               hooks: Hooks | None) -> list[dict]:
    pairs = [(i, c) for i, ex in enumerate(examples) for c in dict.fromkeys([ex.answer, *ex.candidates])]
    logp, greedy = continuation_scores(model, [examples[i].prompt for i, _ in pairs], [c for _, c in pairs],
                                       batch_size, hooks, [examples[i] for i, _ in pairs])
    per: dict[int, dict[str, tuple[float, bool]]] = {}
    for (i, c), s, g in zip(pairs, logp, greedy, strict=True):
        per.setdefault(i, {})[c] = (float(s), bool(g))
    rows = []
    for i, ex in enumerate(examples):
        scores = per[i]
        pred = max(scores, key=lambda c: scores[c][0])
        others = [s for c, (s, _) in scores.items() if c != ex.answer]
        correct = scores[ex.answer][1] if restrict == "vocab" else pred == ex.answer
        rows.append(dict(pred=pred, correct=bool(correct), answer_logprob=scores[ex.answer][0],
                         margin=scores[ex.answer][0] - max(others) if others else np.inf))
    return rows


def _needs_full(model, ex: GarExample) -> bool:
    ids = _first_ids(model, dict.fromkeys([ex.answer, *ex.candidates]))
    return len(set(ids)) < len(ids)


def score(model, examples: Sequence[GarExample], restrict: Restrict = "candidates", scorer: Scorer = "auto",
          batch_size: int = 32, progress: bool = False, hooks: Hooks | None = None) -> pd.DataFrame:
    """One row per example: its form, n_r, prediction, correctness, answer log-prob and margin to the best rival.

    ``hooks`` (forward hooks, or a function of the batch returning them) run during scoring: interventions.
    """
    examples = list(examples)
    use_full = [scorer == "full" or (scorer == "auto" and _needs_full(model, ex)) for ex in examples]
    first = [ex for ex, f in zip(examples, use_full, strict=True) if not f]
    full = [ex for ex, f in zip(examples, use_full, strict=True) if f]
    rows_first = iter(_first_token_rows(model, first, restrict, batch_size, progress, hooks) if first else [])
    rows_full = iter(_full_rows(model, full, restrict, batch_size, hooks) if full else [])
    out = []
    for ex, f in zip(examples, use_full, strict=True):
        row = next(rows_full) if f else next(rows_first)
        out.append(dict(id=ex.id, task=ex.task, form=form_name(ex), kind=ex.kind, n_r=ex.n_r,
                        q_relation=ex.q_relation, a_relation=ex.a_relation, label=ex.label, pair_id=ex.pair_id,
                        answer=ex.answer, scorer="full" if f else "first-token", restrict=restrict, **row))
    return pd.DataFrame(out)


def score_subquestions(model, examples: Sequence[GarExample], batch_size: int = 32) -> pd.DataFrame:
    """Greedy correctness of each example's sub-questions: one row per example, one column per sub-question."""
    unique: dict[tuple[str, str], None] = {}
    for ex in examples:
        for sq in ex.subquestions:
            for a in sq["answers"]:
                unique[(sq["prompt"], a)] = None
    keys = list(unique)
    if not keys:
        return pd.DataFrame({"id": [ex.id for ex in examples], "subs_correct": True})
    _, greedy = continuation_scores(model, [p for p, _ in keys], [a for _, a in keys], batch_size)
    ok = dict(zip(keys, greedy, strict=True))
    rows = []
    for ex in examples:
        row = {"id": ex.id}
        for sq in ex.subquestions:
            row[f"sub_{sq['name']}"] = any(ok[(sq["prompt"], a)] for a in sq["answers"])
        rows.append(row)
    frame = pd.DataFrame(rows)
    sub_cols = [c for c in frame.columns if c.startswith("sub_")]
    frame["subs_correct"] = frame[sub_cols].fillna(True).all(axis=1) if sub_cols else True
    return frame


def evaluate(model, examples: Sequence[GarExample], restrict: Restrict = "candidates", scorer: Scorer = "auto",
             subquestions: bool = True, batch_size: int = 32, progress: bool = False, hooks: Hooks | None = None
             ) -> pd.DataFrame:
    """Per-example scores joined with sub-question correctness (columns ``sub_*`` and ``subs_correct``)."""
    frame = score(model, examples, restrict, scorer, batch_size, progress, hooks)
    if subquestions:
        frame = frame.merge(score_subquestions(model, examples, batch_size), on="id", how="left")
    return frame


def accuracy(frame: pd.DataFrame, by: Sequence[str] = ("form", "n_r")) -> pd.DataFrame:
    """Accuracy, count and (cls) pair accuracy per group; pair accuracy = both rows of a counter-pair right."""
    g = frame.groupby(list(by), sort=True)
    out = pd.DataFrame({"accuracy": g["correct"].mean(), "n": g.size()})
    pairs = frame.dropna(subset=["pair_id"])
    if len(pairs):
        both = pairs.groupby([*by, "pair_id"])["correct"].all().groupby(list(by)).mean()
        out["pair_accuracy"] = both
    return out.reset_index()


def compositionality_gap(frame: pd.DataFrame, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Per task: accuracy, sub-question accuracy, composed accuracy among rows whose sub-questions are all right,
    and the gap = 1 - that conditional accuracy (the share of "knows the steps, fails the composition")."""
    if "subs_correct" not in frame.columns:
        raise ValueError("the frame has no sub-question scores; run evaluate(..., subquestions=True).")
    rows = []
    for key, grp in frame.groupby(list(by), sort=True):
        ok = grp[grp["subs_correct"].astype(bool)]
        cond = float(ok["correct"].mean()) if len(ok) else np.nan
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)),
                     "form": grp["form"].iloc[0], "n_r": int(grp["n_r"].iloc[0]), "n": len(grp),
                     "accuracy": float(grp["correct"].mean()), "subs_accuracy": float(grp["subs_correct"].mean()),
                     "n_subs_correct": len(ok), "accuracy_given_subs": cond, "gap": 1 - cond})
    return pd.DataFrame(rows)
