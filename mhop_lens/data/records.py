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
    distinct: bool = True,
) -> TwoHopQuery:
    """Render the two-hop, one-hop and shortcut prompts of (e1, r1, e2, r2, e3) and locate e1, r1, r2.

    Two-hop prompt: ``r2_template.format(r1_template.format(e1)) + suffix`` unless ``prompt`` is given.
    One-hop prompts: ``r1_template.format(e1) + suffix`` and ``r2_template.format(e2) + suffix``. Entity shortcut:
    ``r2_template.format(e1) + suffix``; relation shortcut: the composed relation phrase without e1 and without the
    suffix ("the spouse of the performer of"), so a model that answers it guesses from the relations alone.

    ``distinct=False`` accepts e1 == e2 or e2 == e3 (a k-hop chain's view where a relation returns to an earlier
    entity, e.g. the spouse of the spouse): readers that score entities by token rank need no told-apart answers.
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
        if distinct and x.strip() == y.strip():
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


# k hops ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KHopQuery:
    """A chain e1 -r1-> e2 -r2-> ... -rk-> e_{k+1} (k >= 2) and its prompt in composing order.

    ``entities`` holds e1..e_{k+1} (the last is the answer), ``relations`` r1..rk with their ``templates``;
    ``spans`` are character spans in ``prompt`` of e1 and of every relation (keys ``e1``, ``r1`` .. ``rk``).
    Prompts of the prefix chains and single hops are rendered from the templates; ``suffix`` ends every prompt.
    ``view(i)`` is the ``TwoHopQuery`` that splits the chain at the bridge entity e_{i+1}; for k = 2, ``view(1)``
    is exactly the two-hop record ``build_query`` makes, so every two-hop analysis runs on k-hop chains.
    """

    id: str
    entities: tuple[str, ...]
    relations: tuple[str, ...]
    templates: tuple[str, ...]
    prompt: str
    spans: dict[str, Span]
    suffix: str = " is"
    aliases: tuple[tuple[str, ...], ...] = ()
    answer_prefix: str = " "
    split: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.relations)

    @property
    def answer(self) -> str:
        return self.entities[-1]

    def entity(self, i: int) -> str:
        """e_i, 1-based (e1 is the subject, e_{k+1} the answer)."""
        return self.entities[i - 1]

    def entity_aliases(self, i: int) -> tuple[str, ...]:
        return self.aliases[i - 1] if self.aliases else ()

    def prefix_prompt(self, depth: int) -> str:
        """The chain of the first ``depth`` hops, e1 -> e_{depth+1}, in composing order, plus the suffix."""
        return _compose(self.templates[:depth], self.entities[0]) + self.suffix

    def hop_prompt(self, i: int) -> str:
        """Hop i asked alone: ``templates[i-1]`` applied to e_i (answer e_{i+1})."""
        return self.templates[i - 1].format(self.entities[i - 1]) + self.suffix

    def view(self, bridge: int) -> TwoHopQuery:
        """The two-hop query (e1, r1..r_bridge composed, e_{bridge+1}, the remaining relations composed, answer)
        on this prompt; spans ``hop1`` .. ``hopk`` locate every relation (as ``r1`` .. ``rk`` here). A chain may
        return to an earlier entity (the spouse of the spouse of e1 is e1), so the view's entities need not differ:
        the k-hop lens and back-patching score them by token rank, never by telling decoded answers apart."""
        if not 1 <= bridge < self.k:
            raise DataError(f"query {self.id}: bridge must be in 1..{self.k - 1}, not {bridge}.")
        first, rest = self.templates[:bridge], self.templates[bridge:]
        q = build_query(
            self.id, self.entities[0], "/".join(self.relations[:bridge]), self.entities[bridge],
            "/".join(self.relations[bridge:]), self.answer, _compose(first, "{}"), _compose(rest, "{}"),
            prompt=self.prompt, suffix=self.suffix, e1_aliases=self.entity_aliases(1),
            e2_aliases=self.entity_aliases(bridge + 1), e3_aliases=self.entity_aliases(self.k + 1),
            answer_prefix=self.answer_prefix, split=self.split, meta=self.meta, distinct=False,
        )
        hops = {f"hop{j}": self.spans[f"r{j}"] for j in range(1, self.k + 1)}
        return TwoHopQuery(**{**{f: getattr(q, f) for f in q.__dataclass_fields__}, "spans": {**q.spans, **hops}})

    @classmethod
    def from_two_hop(cls, q: TwoHopQuery, suffix: str | None = None) -> KHopQuery:
        """The k = 2 record of a two-hop query (e.g. a row of the study's CSV). ``suffix`` defaults to what
        follows the composed phrase in ``q.prompt``."""
        composed = q.r2_template.format(q.r1_template.format(q.e1))
        if suffix is None:
            at = q.prompt.lower().find(composed.lower())
            suffix = q.prompt[at + len(composed):] if at >= 0 else ""
        return cls(id=q.id, entities=(q.e1, q.e2, q.e3), relations=(q.r1, q.r2),
                   templates=(q.r1_template, q.r2_template), prompt=q.prompt, spans=dict(q.spans), suffix=suffix,
                   aliases=(q.e1_aliases, q.e2_aliases, q.e3_aliases), answer_prefix=q.answer_prefix,
                   split=q.split, meta=dict(q.meta))


def _compose(templates: tuple[str, ...] | list[str], inner: str) -> str:
    """Apply templates in hop order: r1's template first, so the last relation is outermost."""
    for t in templates:
        inner = t.format(inner)
    return inner


def build_khop_query(
    id: str,
    entities: tuple[str, ...] | list[str],
    relations: tuple[str, ...] | list[str],
    templates: tuple[str, ...] | list[str],
    *,
    suffix: str = " is",
    prompt: str | None = None,
    aliases: tuple[tuple[str, ...], ...] | list | None = None,
    answer_prefix: str = " ",
    split: str = "",
    meta: dict[str, Any] | None = None,
) -> KHopQuery:
    """Render the k-hop prompt of e1 -r1-> ... -rk-> e_{k+1} in composing order and locate e1 and every relation.

    The prompt is the templates applied in hop order to e1 (``"{} 's spouse"`` then ``"{} 's boss"`` gives
    "Mokar 's spouse 's boss") plus ``suffix``, unless ``prompt`` is given (it must contain the composed phrase).
    """
    entities, relations, templates = tuple(entities), tuple(relations), tuple(templates)
    k = len(relations)
    if k < 2 or len(entities) != k + 1 or len(templates) != k:
        raise DataError(f"query {id}: a k-hop chain needs k >= 2 relations, k templates and k + 1 entities; got "
                        f"{len(relations)} relations, {len(templates)} templates, {len(entities)} entities.")
    for i, value in enumerate(entities, start=1):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"query {id}: e{i} is empty; every query needs all k + 1 entity labels.")
    for t in templates:
        _phrase(t)
    aliases = tuple(tuple(a) for a in aliases) if aliases else ()
    if aliases and len(aliases) != k + 1:
        raise DataError(f"query {id}: aliases must give one list per entity ({k + 1}), not {len(aliases)}.")
    composed = _compose(templates, entities[0])
    prompt = prompt if prompt is not None else composed + suffix
    at = prompt.lower().find(composed.lower())
    if at < 0:
        raise DataError(f"query {id}: the prompt {prompt!r} does not contain the composed phrase {composed!r}; "
                        "fix the templates or the prompt so that e1 and the relations can be located.")
    spans = {name: (a + at, b + at) for name, (a, b) in _chain_spans(entities[0], templates).items()}
    return KHopQuery(id=str(id), entities=entities, relations=relations, templates=templates, prompt=prompt,
                     spans=spans, suffix=suffix, aliases=aliases, answer_prefix=answer_prefix, split=split,
                     meta=dict(meta or {}))


def _chain_spans(e1: str, templates: tuple[str, ...]) -> dict[str, Span]:
    """Spans of e1 and r1..rk in the composed phrase (as ``_composed_spans``, one relation at a time)."""
    spans = {"e1": (0, len(e1))}
    inner_len = len(e1)
    for j, t in enumerate(templates, start=1):
        before, after = t.split("{}")
        spans = {name: (a + len(before), b + len(before)) for name, (a, b) in spans.items()}
        spans[f"r{j}"] = _words_span(after, len(before) + inner_len) if after.strip() else _words_span(before, 0)
        inner_len += len(before) + len(after)
    return spans


def khop_to_frame(queries: list[KHopQuery]) -> pd.DataFrame:
    """One row per k-hop query; tuples, spans and meta as JSON strings so the frame survives parquet."""
    rows = []
    for q in queries:
        row = asdict(q)
        for key in ("entities", "relations", "templates", "spans", "aliases", "meta"):
            row[key] = json.dumps(row[key])
        rows.append(row)
    return pd.DataFrame(rows)


def khop_from_frame(frame: pd.DataFrame) -> list[KHopQuery]:
    """Inverse of ``khop_to_frame``."""
    out = []
    for row in frame.to_dict("records"):
        for key in ("entities", "relations", "templates"):
            row[key] = tuple(json.loads(row[key]))
        row["aliases"] = tuple(tuple(a) for a in json.loads(row["aliases"]))
        row["spans"] = {k: tuple(v) for k, v in json.loads(row["spans"]).items()}
        row["meta"] = json.loads(row["meta"])
        out.append(KHopQuery(**row))
    return out
