"""k-hop chains as ``KHopQuery`` records: from explicit chains, from a graph of facts, from a k-hop world, from
two-hop queries (the k = 2 case, e.g. rows of the study's CSV).

``load_khop_queries(spec)``: ``"organism-khop"`` (held-out then trained depth-k chains of the shipped three-hop
organism), ``"organism-khop:heldout"`` / ``":train"``, a k-hop world.json (or a directory holding one), a
two-hop spec ``load_queries`` reads (``"organism"``, a two-hop CSV, ...: k = 2), or a ``.parquet`` written by
``khop_to_frame``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from mhop_lens.data.builder import unique_objects
from mhop_lens.data.issues import IssueCollector, OnError
from mhop_lens.data.records import KHopQuery, build_khop_query, khop_from_frame
from mhop_lens.errors import DataError

SPLITS = ("heldout", "train")


def from_chains(
    chains: Iterable[Sequence[str]],
    templates: Mapping[str, str],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    suffix: str = " is",
    answer_prefix: str = " ",
    split: str = "",
    on_error: OnError = "raise",
) -> list[KHopQuery]:
    """One query per chain (e1, r1, e2, r2, ..., rk, e_{k+1}) (odd length >= 5); ids are ``"e1|r1|...|rk"``.

    A chain of the wrong shape, a relation without a template, an empty entity or a repeated id is a malformed row.
    """
    aliases = aliases or {}
    issues = IssueCollector("chains", on_error)
    out, seen = [], set()
    for i, chain in enumerate(chains):
        chain = tuple(chain)
        if len(chain) < 5 or len(chain) % 2 == 0:
            issues.add(f"#{i}", f"has {len(chain)} items; a k-hop chain is (e1, r1, e2, ..., rk, e_(k+1)), k >= 2")
            continue
        entities, relations = chain[0::2], chain[1::2]
        qid = "|".join((entities[0], *relations))
        if qid in seen:
            issues.add(qid, f"chain #{i} repeats (e1, r1, ..., rk) of an earlier chain")
            continue
        seen.add(qid)
        missing = sorted({r for r in relations if r not in templates})
        if missing:
            issues.add(qid, f"no template for relation(s) {missing}; add templates[r] like 'the spouse of {{}}'")
            continue
        try:
            out.append(build_khop_query(
                qid, entities, relations, [templates[r] for r in relations], suffix=suffix,
                answer_prefix=answer_prefix, split=split, aliases=[tuple(aliases.get(e, ())) for e in entities]))
        except DataError as e:
            issues.add(qid, str(e).removeprefix(f"query {qid}: "))
    return list(issues.finish(out))


def from_facts(
    facts: Iterable[Sequence[str]],
    templates: Mapping[str, str],
    depth: int,
    *,
    on_error: OnError = "raise",
    **kw,
) -> list[KHopQuery]:
    """Every depth-``depth`` chain of a graph of (subject, relation, object) facts whose relations have templates.

    As ``from_knowledge_graph`` for two hops: a (subject, relation) with several objects is ambiguous and unused;
    a chain's entities are all distinct (no cycles). Other keywords go to ``from_chains``.
    """
    if depth < 2:
        raise DataError(f"depth must be at least 2, not {depth}.")
    issues = IssueCollector("knowledge graph", on_error)
    by_subject: dict[str, list[tuple[str, str]]] = {}
    for (s, r), o in unique_objects(facts, templates, issues).items():
        by_subject.setdefault(s, []).append((r, o))
    issues.finish([])
    chains = [(s,) for s in by_subject]
    for _ in range(depth):
        chains = [(*c, r, o) for c in chains for r, o in by_subject.get(c[-1], []) if o not in c[0::2]]
    return from_chains(chains, templates, on_error=on_error, **kw)


def world_queries(world, split: str | None = None) -> list[KHopQuery]:
    """Depth-k chains of a ``KHopWorld`` (held-out first, then trained), prompts as the organism renders them."""
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown k-hop organism split {split!r}; choose one of {list(SPLITS)}.")
    templates = {r["name"]: r["template"] for r in world.relations}
    out = []
    for name in SPLITS if split is None else (split,):
        for chain in world.chains.get(name, []):
            ents = world.entities_of(tuple(chain))
            out.append(build_khop_query("|".join(chain), ents, chain[1:], [templates[r] for r in chain[1:]],
                                        suffix="", split=name))
    return out


def prefix_queries(queries: Sequence[KHopQuery], depth: int) -> list[KHopQuery]:
    """The distinct depth-``depth`` prefix chains (depth >= 2) of ``queries``, in first-seen order."""
    out = {}
    for q in queries:
        qid = "|".join((q.entities[0], *q.relations[:depth]))
        if qid not in out:
            out[qid] = build_khop_query(qid, q.entities[:depth + 1], q.relations[:depth], q.templates[:depth],
                                        suffix=q.suffix, answer_prefix=q.answer_prefix, split=q.split,
                                        aliases=q.aliases[:depth + 1] if q.aliases else None)
    return list(out.values())


def organism_khop_world(path: str | os.PathLike | None = None):
    """The shipped three-hop organism's world (or the k-hop world.json at ``path``)."""
    from mhop_lens.organism_khop import assets_dir
    from mhop_lens.organism_khop.world import KHopWorld

    path = Path(path) if path is not None else Path(assets_dir()) / "world.json"
    if not path.is_file():
        raise DataError(f"no k-hop world at {path}; train one with `mhop-lens organism-khop train --out DIR` and "
                        "pass DIR/world.json.")
    if "depth" not in json.loads(path.read_text()):
        raise DataError(f"{path} is a two-hop world (no 'depth'); pass it as two-hop data or a k-hop world.json.")
    return KHopWorld.load(path)


def load_khop_queries(spec: str, *, limit: int | None = None, split: str | None = None,
                      on_error: OnError = "raise") -> list[KHopQuery]:
    """k-hop queries named by ``spec`` (see the module docstring): keep ``split``, then the first ``limit``."""
    spec = str(spec)
    name, _, spec_split = spec.partition(":")
    path = Path(spec)
    if name == "organism-khop":
        queries = world_queries(organism_khop_world(), spec_split or None)
    elif spec.endswith(".parquet"):
        if not path.is_file():
            raise DataError(f"--data {spec!r} does not exist; write k-hop queries with khop_to_frame(...).to_parquet.")
        queries = khop_from_frame(pd.read_parquet(path))
    elif (spec.endswith(".json") or (path / "world.json").is_file()) and _is_khop_world(path):
        queries = world_queries(organism_khop_world(path if spec.endswith(".json") else path / "world.json"))
    else:
        from mhop_lens.data import load_queries

        queries = [KHopQuery.from_two_hop(q) for q in load_queries(spec, on_error=on_error)]
    if split is not None:
        queries = [q for q in queries if q.split == split]
    if limit is not None:
        queries = queries[:limit]
    if not queries:
        raise DataError(f"--data {spec!r} gave no k-hop queries (split={split!r}, limit={limit}); check the split "
                        "name or raise --limit.")
    return queries


def _is_khop_world(path: Path) -> bool:
    p = path if path.suffix == ".json" else path / "world.json"
    return p.is_file() and "depth" in json.loads(p.read_text())
