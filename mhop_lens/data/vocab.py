"""Words a model cannot represent: one policy for every verb (docs/data.md, "Unknown words").

A word-level tokenizer (the organism's) turns a word it does not know into its unknown token, so a made-up or
real-world name would be scored, ranked or decoded as ``<unk>`` -- a silent wrong answer. A query with such a word
in any of its prompts, labels or aliases is a bad row: with ``on_error="raise"`` one ``DataError`` lists the rows,
with ``on_error="skip"`` they are dropped and counted in the result's ``.issues``, exactly like malformed rows.
Byte-level tokenizers (GPT-2, Llama) have no unknown words, so nothing is ever dropped for them.
"""

from __future__ import annotations

from collections.abc import Sequence

from mhop_lens.data.issues import DataIssue, IssueCollector, OnError, QueryList
from mhop_lens.data.records import PROMPT_KINDS, TwoHopQuery
from mhop_lens.errors import DataError


def query_texts(q: TwoHopQuery) -> list[str]:
    """Every text of a query a verb may tokenise: its prompts, and each entity's label and aliases as answers."""
    answers = [q.answer_prefix + a for e in ("e1", "e2", "e3") for a in q.answers(e)]
    return [q.prompt_of(k) for k in PROMPT_KINDS] + answers


def unknown_words(tokenizer, texts: Sequence[str]) -> dict[str, list[str]]:
    """For each text holding a word outside the tokenizer's vocabulary, those words (empty dict when none)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not texts:
        return {}
    from mhop_lens.tokens import _ids_and_offsets

    texts = list(dict.fromkeys(texts))
    out = {}
    for text, ids, offsets in zip(texts, *_ids_and_offsets(tokenizer, texts), strict=True):
        if unk in ids and str(tokenizer.unk_token) not in text:
            out[text] = [text[a:b].strip() or text[a:b] for i, (a, b) in zip(ids, offsets, strict=True) if i == unk]
    return out


def check_vocabulary(model, queries: Sequence[TwoHopQuery], on_error: OnError = "raise",
                     source: str = "queries") -> QueryList:
    """The queries whose every text the model's tokenizer knows; the others raise or are skipped and counted."""
    bad = unknown_words(model.tokenizer, [t for q in queries for t in query_texts(q)])
    issues = IssueCollector(source, on_error)
    kept = []
    for q in queries:
        words = sorted({w for t in query_texts(q) for w in bad.get(t, [])})
        if words:
            issues.add(q.id, f"words outside this model's vocabulary {words[:4]}")
        else:
            kept.append(q)
    if issues.issues and (on_error == "raise" or not kept):
        shown = "; ".join(str(i) for i in issues.issues[:3])
        raise DataError(f"{len(issues.issues)} of {len(queries)} queries have words outside this model's vocabulary "
                        f"(they would be scored as {model.tokenizer.unk_token}): {shown}. Use entities the model "
                        "knows (e.g. --data organism for the organism) or another model"
                        + (", or skip these rows with --on-error skip." if kept else "; no query would be left."))
    earlier = list(getattr(queries, "issues", []))
    return QueryList(issues.finish(kept), [*earlier, *issues.issues])


__all__ = ["DataIssue", "check_vocabulary", "query_texts", "unknown_words"]
