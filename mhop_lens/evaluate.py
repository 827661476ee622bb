"""Does the model know each hop, the composition, or a shortcut? One row per query, plus the study's subsets.

For every query the five prompts of ``records.PROMPT_KINDS`` are scored against the label and aliases of their
answer (e2 for hop1, e3 otherwise). Two scorers:

- ``logprob`` (fast): one teacher-forced forward of prompt + answer per distinct (prompt, answer); an answer is
  correct when greedy decoding would produce all its tokens (every answer token is the top-1 next token), which
  for one-token answers is "the greedy next token is the answer token". Also reports the first token's rank and
  log-prob and the full answer's log-prob, best alias.
- ``gen``: greedy generation with KV cache (the HF model under the bridge, left padding + attention mask) of
  ``max_new_tokens`` tokens (default: as many as the longest alias has), decoded and matched case-insensitively on
  word boundaries ("US" does not match "thus").

Aliases of one character are not matched (as in the study). Prompts shared between queries and kinds are scored
once, all kinds together in length-sorted padded batches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens.analyses.hf_compat import ensure_cache_plumbing
from mhop_lens.data.records import PROMPT_KINDS, TwoHopQuery
from mhop_lens.errors import DataError, SpanError
from mhop_lens.tokens import encode, tokenize_one

Scorer = Literal["logprob", "gen"]
SCORERS = ("logprob", "gen")
HOPS = ("hop1", "hop2")
SHORTCUTS = ("entity_shortcut", "relation_shortcut")


@dataclass(frozen=True)
class AnswerScore:
    """Teacher-forced score of one answer after one prompt."""

    greedy: bool  # every answer token is the argmax of its next-token distribution
    rank: int  # rank of the answer's first token at the prompt's last position (0 = top-1)
    first_logprob: float
    logprob: float  # sum over the answer's tokens


def answer_texts(query: TwoHopQuery, kind: str) -> tuple[str, ...]:
    """Label and aliases (longer than one character) of the entity that answers ``kind``."""
    label, *aliases = (a.strip() for a in query.answers(query.expected(kind)))
    return tuple(dict.fromkeys([label, *(a for a in aliases if len(a) > 1)]))


def mentions(text: str, answers: Sequence[str]) -> bool:
    """Whether any answer occurs in ``text`` as whole words, ignoring case."""
    return any(_pattern(a).search(text) for a in answers if a.strip())


def _pattern(answer: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)", re.IGNORECASE)


def evaluate(
    model,
    queries: Sequence[TwoHopQuery],
    scorer: Scorer = "logprob",
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per query: correctness of every prompt kind, ``both_hops``, ``shortcut`` and the study's ``subset``.

    ``subset`` is 'correct' (composition right, both hops known, no shortcut), 'incorrect' (composition wrong,
    both hops known, no shortcut) or 'other'. ``max_new_tokens`` applies to the gen scorer only.
    """
    if scorer not in SCORERS:
        raise DataError(f"unknown scorer {scorer!r}; choose one of {list(SCORERS)}.")
    if not queries:
        raise DataError("no queries to evaluate; check --data, --limit and --shard.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, not {batch_size}.")
    requests = [(q.prompt_of(k), answer_texts(q, k), q.answer_prefix) for q in queries for k in PROMPT_KINDS]
    with torch.inference_mode():
        if scorer == "logprob":
            columns = _logprob_columns(model, requests, batch_size, progress)
        else:
            columns = _gen_columns(model, requests, batch_size, max_new_tokens, progress)
    n_kinds = len(PROMPT_KINDS)
    rows = []
    for i, q in enumerate(queries):
        row = {"qid": q.id, "split": q.split, "e1": q.e1, "r1": q.r1, "e2": q.e2, "r2": q.r2, "e3": q.e3}
        for j, kind in enumerate(PROMPT_KINDS):
            row |= {f"{kind}_{name}": values[i * n_kinds + j] for name, values in columns.items()}
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame["both_hops"] = frame["hop1_correct"] & frame["hop2_correct"]
    frame["shortcut"] = frame["entity_shortcut_correct"] | frame["relation_shortcut_correct"]
    clean = frame["both_hops"] & ~frame["shortcut"]
    frame["subset"] = "other"
    frame.loc[clean & frame["two_hop_correct"], "subset"] = "correct"
    frame.loc[clean & ~frame["two_hop_correct"], "subset"] = "incorrect"
    frame.attrs["scorer"] = scorer
    return frame


# logprob scorer -------------------------------------------------------------------------------------------------
def _logprob_columns(model, requests, batch_size: int, progress: bool) -> dict[str, list]:
    pairs = list(dict.fromkeys((p, prefix + a) for p, answers, prefix in requests for a in answers))
    scores = score_answers(model, pairs, batch_size, progress)
    out: dict[str, list] = {"correct": [], "rank": [], "first_logprob": [], "logprob": []}
    for prompt, answers, prefix in requests:
        best = [scores[(prompt, prefix + a)] for a in answers]
        out["correct"].append(any(s.greedy for s in best))
        out["rank"].append(min(s.rank for s in best))
        out["first_logprob"].append(max(s.first_logprob for s in best))
        out["logprob"].append(max(s.logprob for s in best))
    return out


def score_answers(
    model, pairs: Sequence[tuple[str, str]], batch_size: int = 64, progress: bool = False
) -> dict[tuple[str, str], AnswerScore]:
    """Teacher-forced scores of (prompt, answer) pairs; the answer text includes its leading space.

    Prompt + answer is tokenised as one string (the tokens the model would read); the answer's tokens are those
    ending after the prompt's last character. A one-token answer is scored from the forward of its prompt alone,
    so answers and prompt kinds that share a prompt share one forward. Right padding keeps positions unchanged.
    """
    prompt_ids: dict[str, list[int]] = {}
    contexts: dict[str, list[tuple[tuple[str, str], list[int], list[int]]]] = {}
    for prompt, answer in dict.fromkeys(pairs):
        ids, offsets = tokenize_one(model, prompt + answer)
        pos = _answer_positions(offsets, len(prompt), prompt, answer)
        targets = [ids[p] for p in pos]
        if prompt not in prompt_ids:
            prompt_ids[prompt] = tokenize_one(model, prompt)[0]
        alone = len(pos) == 1 and prompt_ids[prompt] == ids[:-1]
        contexts.setdefault(prompt if alone else prompt + answer, []).append(((prompt, answer), pos, targets))
    order = sorted(contexts, key=len)
    out = {}
    for start in tqdm(range(0, len(order), batch_size), desc="logprob", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        enc = encode(model, batch, padding_side="right")
        logits = model(enc.tokens, attention_mask=enc.attention_mask)
        items = [item for context in batch for item in contexts[context]]
        rows = [i for i, context in enumerate(batch) for _, pos, _ in contexts[context] for _ in pos]
        before = [p - 1 for _, pos, _ in items for p in pos]
        index = torch.tensor([rows, before], device=logits.device)
        targets = torch.tensor([t for _, _, ts in items for t in ts], device=logits.device)
        scored = _token_scores(logits[index[0], index[1]].float(), targets)
        greedy, rank, logprob = (t.tolist() for t in scored)
        k = 0
        for pair, pos, _ in items:
            n = len(pos)
            out[pair] = AnswerScore(all(greedy[k : k + n]), rank[k], logprob[k], sum(logprob[k : k + n]))
            k += n
    return out


def _answer_positions(offsets, cut: int, prompt: str, answer: str) -> list[int]:
    """Token positions of the answer: tokens ending after character ``cut`` (the prompt's end)."""
    pos = [t for t, off in enumerate(offsets) if off is not None and off[1] > cut]
    if not pos:
        raise SpanError(f"the answer {answer!r} after {prompt!r} tokenises to nothing; give a non-empty answer.")
    if offsets[pos[0]][0] < cut:
        raise SpanError(f"the answer {answer!r} merges with the last token of the prompt {prompt!r}; end the prompt "
                        "on a word boundary or give the query an answer_prefix (usually ' ').")
    return pos


def _token_scores(
    logits: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"]
) -> tuple[Bool[Tensor, " n"], Int[Tensor, " n"], Float[Tensor, " n"]]:
    """Per answer token: is it the argmax, its rank, its log-prob."""
    target_logit = logits.gather(1, targets[:, None])
    greedy = logits.argmax(-1) == targets
    rank = (logits > target_logit).sum(-1)
    logprob = logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]
    return greedy.cpu(), rank.cpu(), logprob.cpu()


# gen scorer ------------------------------------------------------------------------------------------------------
def _gen_columns(model, requests, batch_size: int, max_new_tokens: int | None, progress: bool) -> dict[str, list]:
    tok = model.tokenizer
    if max_new_tokens is None:
        budget = [max(len(tok(prefix + a, add_special_tokens=False)["input_ids"]) for a in answers)
                  for _, answers, prefix in requests]
    else:
        budget = [max_new_tokens] * len(requests)
    need: dict[str, int] = {}
    for (prompt, _, _), n in zip(requests, budget, strict=True):
        need[prompt] = max(need.get(prompt, 0), n)
    generated = generate_greedy(model, need, batch_size, progress)
    out: dict[str, list] = {"correct": [], "output": []}
    for (prompt, answers, _), n in zip(requests, budget, strict=True):
        text = tok.decode(generated[prompt][:n], skip_special_tokens=True)
        out["correct"].append(mentions(text, answers))
        out["output"].append(text)
    return out


def generate_greedy(model, need: dict[str, int], batch_size: int = 64, progress: bool = False) -> dict[str, list[int]]:
    """Greedy continuation ids of each prompt, ``need[prompt]`` tokens at most (cut at end-of-sequence).

    Uses the HF model under the bridge with left padding and the attention mask, so a batched row equals the
    one-by-one generation.
    """
    ensure_cache_plumbing(model)  # else transformers >= 5.24 generates from an empty KV cache under TL 4.3
    hf = model.original_model
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    order = sorted(need, key=len)
    out = {}
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = order[start : start + batch_size]
        enc = encode(model, batch, padding_side="left")
        new = hf.generate(
            input_ids=enc.tokens, attention_mask=enc.attention_mask, max_new_tokens=max(need[p] for p in batch),
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            pad_token_id=_pad_id(model),
        )[:, enc.tokens.shape[1] :]
        for prompt, ids in zip(batch, new.tolist(), strict=True):
            ids = ids[: need[prompt]]
            cut = next((j for j, t in enumerate(ids) if t in eos), len(ids))
            out[prompt] = ids[:cut]
    return out


def _pad_id(model) -> int:
    tok = model.tokenizer
    return next(t for t in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0) if t is not None)


# summary ---------------------------------------------------------------------------------------------------------
def summarize(frame: pd.DataFrame) -> dict:
    """Accuracies (overall, per split, per relation pair), distinct one-hop facts, subsets, compositionality gap.

    The compositionality gap is the share of queries with both hops known whose composition fails;
    ``compositionality_gap_no_shortcut`` also drops queries a shortcut answers (incorrect / (correct + incorrect)).
    """
    out = {"n_queries": len(frame)}
    if "scorer" in frame.attrs:
        out["scorer"] = frame.attrs["scorer"]
    out |= _block(frame)
    out["one_hop_facts"] = one_hop_facts(frame)
    splits = sorted(s for s in frame["split"].unique() if s)
    if splits:
        out["by_split"] = {s: _block(part) | {"one_hop_facts": one_hop_facts(part)}
                           for s, part in frame[frame["split"].isin(splits)].groupby("split")}
    out["by_relation_pair"] = [{"r1": r1, "r2": r2} | _block(part)
                               for (r1, r2), part in frame.groupby(["r1", "r2"], sort=True)]
    return out


def _block(frame: pd.DataFrame) -> dict:
    both = frame["both_hops"]
    counts = frame["subset"].value_counts()
    clean = int(counts.get("correct", 0) + counts.get("incorrect", 0))
    return {
        "n": len(frame),
        "accuracy": {k: float(frame[f"{k}_correct"].mean()) for k in PROMPT_KINDS},
        "both_hops": int(both.sum()),
        "shortcut": int(frame["shortcut"].sum()),
        "subsets": {s: int(counts.get(s, 0)) for s in ("correct", "incorrect", "other")},
        "compositionality_gap": float((~frame.loc[both, "two_hop_correct"]).mean()) if both.any() else None,
        "compositionality_gap_no_shortcut": int(counts.get("incorrect", 0)) / clean if clean else None,
    }


def one_hop_facts(frame: pd.DataFrame) -> dict:
    """Accuracy over the distinct one-hop facts ((e1, r1) of hop1 and (e2, r2) of hop2), each counted once."""
    facts = pd.concat([
        frame[["e1", "r1", "hop1_correct"]].set_axis(["subject", "relation", "correct"], axis=1),
        frame[["e2", "r2", "hop2_correct"]].set_axis(["subject", "relation", "correct"], axis=1),
    ]).drop_duplicates(["subject", "relation"])
    return {"n": len(facts), "accuracy": float(facts["correct"].mean())}


# k hops ----------------------------------------------------------------------------------------------------------
def khop_answer_texts(query, i: int) -> tuple[str, ...]:
    """Label and aliases (longer than one character) of entity e_i of a ``KHopQuery``."""
    label, *aliases = (a.strip() for a in dict.fromkeys((query.entity(i), *query.entity_aliases(i))))
    return tuple(dict.fromkeys([label, *(a for a in aliases if len(a) > 1)]))


def evaluate_khop(model, queries, batch_size: int = 64, progress: bool = True) -> pd.DataFrame:
    """One row per ``KHopQuery``: every prefix chain (``prefix{d}``: e1 -> e_{d+1}, d = 1..k; ``prefix{k}`` is the
    full chain) and every single hop (``hop{j}``: e_j -r_j-> e_{j+1}) scored with the logprob scorer.

    Columns per prompt ``X``: ``X_correct, X_rank, X_first_logprob, X_logprob`` (as ``evaluate``), plus
    ``hops_known_{d}`` (hops 1..d all correct). For k = 2, ``prefix1 / prefix2 / hop2`` are ``evaluate``'s
    ``hop1 / two_hop / hop2`` (organism prompts: ``prefix1`` and ``hop1`` are the same prompt).
    """
    queries = list(queries)
    if not queries:
        raise DataError("no k-hop queries to evaluate; check --data and --limit.")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, not {batch_size}.")
    k_max = max(q.k for q in queries)
    requests, keys = [], []
    for qi, q in enumerate(queries):
        for d in range(1, q.k + 1):
            requests.append((q.prefix_prompt(d), khop_answer_texts(q, d + 1), q.answer_prefix))
            keys.append((qi, f"prefix{d}"))
        for j in range(1, q.k + 1):
            requests.append((q.hop_prompt(j), khop_answer_texts(q, j + 1), q.answer_prefix))
            keys.append((qi, f"hop{j}"))
    with torch.inference_mode():
        columns = _logprob_columns(model, requests, batch_size, progress)
    rows = [{"qid": q.id, "split": q.split, "k": q.k}
            | {f"e{i}": q.entity(i) for i in range(1, q.k + 2)}
            | {f"r{j}": r for j, r in enumerate(q.relations, start=1)} for q in queries]
    for n, (qi, kind) in enumerate(keys):
        rows[qi] |= {f"{kind}_{name}": values[n] for name, values in columns.items()}
    frame = pd.DataFrame(rows)
    for d in range(1, k_max + 1):
        frame[f"hops_known_{d}"] = frame[[f"hop{j}_correct" for j in range(1, d + 1)]].fillna(False).all(axis=1)
    frame.attrs["scorer"] = "logprob"
    return frame


def summarize_khop(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (split, depth d): accuracy of the depth-d prefix chain and of hop d alone, and the
    compositionality gap per depth.

    ``gap``: share of chains with hops 1..d all known whose depth-d chain fails (the two-hop definition for d = 2).
    ``step_gap``: share of chains whose depth-(d-1) prefix is right and hop d is known, yet the depth-d chain
    fails: the failures that first appear at hop d.
    """
    out = []
    splits = [("all", frame)] + [(s, g) for s, g in frame.groupby("split", sort=True) if s]
    for split, g in splits:
        for d in range(1, int(g["k"].max()) + 1):
            g_d = g[g["k"] >= d]
            chain = g_d[f"prefix{d}_correct"].astype(bool)
            known = g_d[f"hops_known_{d}"].astype(bool)
            row = {"split": split, "depth": d, "n": len(g_d), "chain_accuracy": chain.mean(),
                   "hop_accuracy": g_d[f"hop{d}_correct"].astype(bool).mean(), "n_hops_known": int(known.sum()),
                   "gap": float((~chain[known]).mean()) if known.any() else float("nan")}
            if d > 1:
                ready = g_d[f"prefix{d - 1}_correct"].astype(bool) & g_d[f"hop{d}_correct"].astype(bool)
                row |= {"n_prefix_and_hop_right": int(ready.sum()),
                        "step_gap": float((~chain[ready]).mean()) if ready.any() else float("nan")}
            out.append(row)
    return pd.DataFrame(out)
