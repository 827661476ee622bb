"""Queries from the user's own facts: explicit (e1, r1, e2, r2, e3) chains, or every chain of a knowledge graph."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from mhop_lens.data.issues import IssueCollector, OnError, QueryList
from mhop_lens.data.records import build_query
from mhop_lens.errors import DataError


def from_triples(
    chains: Iterable[Sequence[str]],
    templates: Mapping[str, str],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    suffix: str = " is",
    answer_prefix: str = " ",
    split: str = "",
    on_error: OnError = "raise",
) -> QueryList:
    """One query per (e1, r1, e2, r2, e3) chain; ``templates[r]`` renders relation r ("the spouse of {}").

    Ids are ``"e1|r1|r2"``. ``aliases`` maps an entity label to its other names. A chain with the wrong arity, a
    relation without a (valid) template, an empty entity or a repeated id is a malformed row.
    """
    aliases = aliases or {}
    issues = IssueCollector("chains", on_error)
    queries, seen = [], set()
    for i, chain in enumerate(chains):
        chain = tuple(chain)
        if len(chain) != 5:
            issues.add(f"#{i}", f"has {len(chain)} items {chain!r}; a chain is (e1, r1, e2, r2, e3)")
            continue
        e1, r1, e2, r2, e3 = chain
        qid = f"{e1}|{r1}|{r2}"
        if qid in seen:
            issues.add(qid, f"chain #{i} repeats (e1, r1, r2) of an earlier chain")
            continue
        seen.add(qid)
        missing = [r for r in (r1, r2) if r not in templates]
        if missing:
            issues.add(qid, f"no template for relation(s) {missing}; add templates[r] like 'the spouse of {{}}'")
            continue
        try:
            queries.append(build_query(
                qid, e1, r1, e2, r2, e3, templates[r1], templates[r2], suffix=suffix, answer_prefix=answer_prefix,
                split=split, e1_aliases=tuple(aliases.get(e1, ())), e2_aliases=tuple(aliases.get(e2, ())),
                e3_aliases=tuple(aliases.get(e3, ())),
            ))
        except DataError as e:
            issues.add(qid, str(e).removeprefix(f"query {qid}: "))
    return issues.finish(queries)


def from_knowledge_graph(
    facts: Iterable[Sequence[str]],
    templates: Mapping[str, str],
    *,
    relation_pairs: Iterable[tuple[str, str]] | None = None,
    on_error: OnError = "raise",
    **kw,
) -> QueryList:
    """Every two-hop chain of a graph of (subject, relation, object) facts whose relations have templates.

    A chain e1 -r1-> e2 -r2-> e3 needs a single object for (e1, r1) and for (e2, r2), and three distinct entities
    (as in the study). Subjects with several objects for one relation are reported (ambiguous answers); cycles
    (e3 == e1) are not queries and are not composed. ``relation_pairs`` keeps only those (r1, r2). Other keywords
    go to ``from_triples``.
    """
    issues = IssueCollector("knowledge graph", on_error)
    unique = unique_objects(facts, templates, issues)
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for (s, r), o in unique.items():
        by_subject.setdefault(s, []).append((r, o))
    pairs = None if relation_pairs is None else set(map(tuple, relation_pairs))
    chains = [
        (e1, r1, e2, r2, e3)
        for (e1, r1), e2 in unique.items()
        for r2, e3 in by_subject.get(e2, [])
        if len({e1, e2, e3}) == 3 and (pairs is None or (r1, r2) in pairs)
    ]
    queries = issues.finish([])
    built = from_triples(chains, templates, on_error=on_error, **kw)
    return QueryList(built, [*queries.issues, *built.issues])


def unique_objects(facts: Iterable, templates: Mapping[str, str], issues: IssueCollector) -> dict[tuple[str, str], str]:
    """(subject, relation) -> its single object, from (subject, relation, object) facts. Malformed facts, relations
    without a template and subjects with several objects for one relation (ambiguous answers) go to ``issues``."""
    objects: dict[tuple[str, str], list[str]] = {}
    for i, fact in enumerate(facts):
        fact = tuple(fact)
        if len(fact) != 3:
            issues.add(f"fact #{i}", f"has {len(fact)} items {fact!r}; a fact is (subject, relation, object)")
            continue
        s, r, o = fact
        if r not in templates:
            issues.add(f"fact #{i}", f"relation {r!r} has no template; add templates[{r!r}] like 'the spouse of {{}}'")
            continue
        known = objects.setdefault((s, r), [])
        if o not in known:
            known.append(o)
    unique = {}
    for (s, r), objs in objects.items():
        if len(objs) == 1:
            unique[(s, r)] = objs[0]
        else:
            issues.add(f"{s}|{r}", f"has {len(objs)} objects {objs[:4]}: an ambiguous answer, so no chain uses it")
    return unique
