"""The two-hop query record: e1 -r1-> e2 -r2-> e3, its prompts, and where e1, r1, r2 sit in the prompt.

Every two-hop data source (the study's CSV, the organism's world, a user's triples) becomes a list of
``TwoHopQuery``; analyses and evaluation read nothing else.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from mhop_lens.errors import DataError
from mhop_lens.positions import Span

#: The prompts derived from a query, by name (evaluation scores each).
PROMPT_KINDS = ("two_hop", "hop1", "hop2", "entity_shortcut", "relation_shortcut")


@dataclass(frozen=True)
class TwoHopQuery:
    """One two-hop query. Answers follow their prompt after ``answer_prefix`` (a space for word-level text)."""

    id: str
    e1: str
    e2: str
    e3: str
    r1: str
    r2: str
    r1_template: str
    r2_template: str
    prompt: str
    hop1_prompt: str
    hop2_prompt: str
    entity_shortcut_prompt: str
    relation_shortcut_prompt: str
    spans: dict[str, Span]  # character spans in ``prompt``: e1, r1, r2
    e1_aliases: tuple[str, ...] = ()
    e2_aliases: tuple[str, ...] = ()
    e3_aliases: tuple[str, ...] = ()
    answer_prefix: str = " "
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def answers(self, entity: str) -> tuple[str, ...]:
        """Label + aliases of ``entity`` ('e1', 'e2' or 'e3'), label first, duplicates removed."""
        label = getattr(self, entity)
        return tuple(dict.fromkeys((label, *getattr(self, f"{entity}_aliases"))))

    def prompt_of(self, kind: str) -> str:
        """Prompt of a kind in ``PROMPT_KINDS``."""
        return self.prompt if kind == "two_hop" else getattr(self, f"{kind}_prompt")

    def expected(self, kind: str) -> str:
        """Entity that answers the prompt of ``kind``: hop1 -> e2, everything else -> e3."""
        return "e2" if kind == "hop1" else "e3"


def _phrase(template: str) -> str:
    """The relation words of a template, e.g. 'the spouse of {}' -> 'the spouse of'."""
    if template.count("{}") != 1:
        raise DataError(f"template {template!r} must contain exactly one '{{}}' placeholder for the entity.")
    return " ".join(template.replace("{}", " ").split())


def build_query(
    id: str,
    e1: str,
    r1: str,
    e2: str,
    r2: str,
    e3: str,
    r1_template: str,
    r2_template: str,
    *,
    suffix: str = " is",
    prompt: str | None = None,
    e1_aliases: tuple[str, ...] | list[str] = (),
    e2_aliases: tuple[str, ...] | list[str] = (),
    e3_aliases: tuple[str, ...] | list[str] = (),
    answer_prefix: str = " ",
    split: str = "",
    meta: dict[str, Any] | None = None,
) -> TwoHopQuery:
    """Render the two-hop, one-hop and shortcut prompts of (e1, r1, e2, r2, e3) and locate e1, r1, r2.

    Two-hop prompt: ``r2_template.format(r1_template.format(e1)) + suffix`` unless ``prompt`` is given.
    One-hop prompts: ``r1_template.format(e1) + suffix`` and ``r2_template.format(e2) + suffix``. Entity shortcut:
    ``r2_template.format(e1) + suffix``; relation shortcut: the composed relation phrase without e1 and without the
    suffix ("the spouse of the performer of"), so a model that answers it guesses from the relations alone.
    """
    for name, value in (("e1", e1), ("e2", e2), ("e3", e3)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"query {id}: {name} is empty; every query needs e1, e2 and e3 labels.")
    for name, value in (("e1_aliases", e1_aliases), ("e2_aliases", e2_aliases), ("e3_aliases", e3_aliases)):
        if isinstance(value, str) or not all(isinstance(a, str) for a in value):
            raise DataError(f"query {id}: {name} must be a list of strings, not {value!r}; "
                            f"write [{value!r}] for a single alias.")
        if any(not a.strip() for a in value):
            raise DataError(f"query {id}: {name} {list(value)!r} holds an empty alias, which every decoded text "
                            "would match; remove it (an empty list means no aliases).")
    for (a, x), (b, y) in ((("e1", e1), ("e2", e2)), (("e2", e2), ("e3", e3))):
        if x.strip() == y.strip():
            raise DataError(f"query {id}: {a} and {b} are both {x!r}, so a decoded answer can never be told "
                            f"apart as {a} or {b} (one of them would never be reported); drop or fix this row.")
    _phrase(r1_template), _phrase(r2_template)
    composed = r2_template.format(r1_template.format(e1))
    prompt = prompt if prompt is not None else composed + suffix
    at = find_casefree(prompt, composed)
    if at < 0:
        raise DataError(f"query {id}: the prompt {prompt!r} does not contain the composed phrase {composed!r}; "
                        "fix the templates or the prompt so that e1, r1 and r2 can be located.")
    spans = {k: (a + at, b + at) for k, (a, b) in _composed_spans(e1, r1_template, r2_template).items()}
    relation_shortcut = " ".join(r2_template.format(r1_template.format("")).split())
    return TwoHopQuery(
        id=str(id), e1=e1, e2=e2, e3=e3, r1=r1, r2=r2, r1_template=r1_template, r2_template=r2_template,
        prompt=prompt,
        hop1_prompt=r1_template.format(e1) + suffix,
        hop2_prompt=r2_template.format(e2) + suffix,
        entity_shortcut_prompt=r2_template.format(e1) + suffix,
        relation_shortcut_prompt=relation_shortcut,
        spans=spans,
        e1_aliases=tuple(e1_aliases), e2_aliases=tuple(e2_aliases), e3_aliases=tuple(e3_aliases),
        answer_prefix=answer_prefix, split=split, meta=dict(meta or {}),
    )


def find_casefree(text: str, phrase: str) -> int:
    """Start of the first case-insensitive occurrence of ``phrase`` in ``text`` (-1 if none), as an index into
    ``text`` itself: unlike ``text.lower().find(...)`` it is not shifted by characters whose lower case is longer
    ("İ" lower-cases to two code points)."""
    m = re.search(re.escape(phrase), text, flags=re.IGNORECASE)
    return m.start() if m else -1


def _composed_spans(e1: str, r1_template: str, r2_template: str) -> dict[str, Span]:
    """Spans of e1, r1, r2 in ``r2_template.format(r1_template.format(e1))``, from the template structure.

    A relation's span is its words after the entity slot when it has any (possessive "{} 's spouse"), else its
    words before it ("the spouse of {}"), so r1 == r2 and entities that contain relation words stay unambiguous.
    """
    c, d = r1_template.split("{}")
    a, b = r2_template.split("{}")
    e1_start = len(a) + len(c)
    spans = {"e1": (e1_start, e1_start + len(e1))}
    spans["r1"] = _words_span(d, e1_start + len(e1)) if d.strip() else _words_span(c, len(a))
    inner_end = len(a) + len(c) + len(e1) + len(d)
    spans["r2"] = _words_span(b, inner_end) if b.strip() else _words_span(a, 0)
    return spans


def _words_span(piece: str, offset: int) -> Span:
    """Span of ``piece`` without its surrounding whitespace, shifted by ``offset``."""
    lead = len(piece) - len(piece.lstrip())
    return offset + lead, offset + len(piece.rstrip())


def to_frame(queries: list[TwoHopQuery]) -> pd.DataFrame:
    """One row per query; spans, aliases and meta as JSON strings so the frame survives parquet."""
    rows = []
    for q in queries:
        row = asdict(q)
        for key in ("spans", "meta", "e1_aliases", "e2_aliases", "e3_aliases"):
            row[key] = json.dumps(row[key])
        rows.append(row)
    return pd.DataFrame(rows)


def from_frame(frame: pd.DataFrame) -> list[TwoHopQuery]:
    """Inverse of ``to_frame``."""
    out = []
    for row in frame.to_dict("records"):
        for key in ("e1_aliases", "e2_aliases", "e3_aliases"):
            row[key] = tuple(json.loads(row[key]))
        row["spans"] = {k: tuple(v) for k, v in json.loads(row["spans"]).items()}
        row["meta"] = json.loads(row["meta"])
        out.append(TwoHopQuery(**row))
    return out
