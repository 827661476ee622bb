"""Two-hop query data: the record (``records``), the study's CSV, the organism's world, the user's own facts.

``load_queries(spec)`` is the one entry point of the CLI: ``"organism"`` (held-out then trained queries of the
shipped organism), ``"organism:heldout"`` / ``"organism:train"``, a world.json path (or a trained organism's
directory holding one), or a two-hop CSV path.
"""

from __future__ import annotations

from pathlib import Path

from mhop_lens.data.builder import from_knowledge_graph, from_triples
from mhop_lens.data.issues import DataIssue, OnError, QueryList
from mhop_lens.data.organism import organism_queries
from mhop_lens.data.records import PROMPT_KINDS, TwoHopQuery, build_query, from_frame, to_frame
from mhop_lens.data.twohop_csv import read_twohop_csv, write_twohop_csv
from mhop_lens.errors import DataError
from mhop_lens.runs import parse_shard, shard_items

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "two_hop_sample.csv"


def load_queries(
    spec: str,
    *,
    limit: int | None = None,
    shard: str | tuple[int, int] | None = None,
    split: str | None = None,
    on_error: OnError = "raise",
    suffix: str | None = None,
) -> QueryList:
    """Queries named by ``spec``: keep ``split``, then the first ``limit``, then shard ``i/n`` of those.

    Limiting before sharding makes the shards of one ``--limit`` run partition exactly the queries an unsharded
    run with that limit would see. Malformed rows raise (``on_error="raise"``) or are skipped and listed in the
    result's ``.issues``. An empty result is a ``DataError``. ``suffix`` ends a two-hop CSV's one-hop and shortcut
    prompts (default the study's " is"; see ``read_twohop_csv``).
    """
    spec = str(spec)
    name, _, spec_split = spec.partition(":")
    if name == "organism":
        queries = organism_queries(None, spec_split or None, on_error=on_error)
    elif spec.endswith(".json") or (Path(spec) / "world.json").is_file():
        path = Path(spec) if spec.endswith(".json") else Path(spec) / "world.json"
        queries = organism_queries(path, None, on_error=on_error)
    elif spec.endswith(".csv"):
        queries = read_twohop_csv(spec, on_error=on_error, **({} if suffix is None else {"suffix": suffix}))
    else:
        raise DataError(f"--data {spec!r}: expected 'organism', 'organism:heldout', 'organism:train', an organism "
                        "world.json (or a directory holding one), or a two-hop CSV file (*.csv).")
    issues = queries.issues
    if split is not None:
        queries = [q for q in queries if q.split == split]
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, not {limit}.")
        queries = queries[:limit]
    queries = shard_items(queries, parse_shard(shard) if isinstance(shard, str) else shard)
    if not queries:
        raise DataError(f"--data {spec!r} gave no queries (split={split!r}, limit={limit}, shard={shard}); "
                        "check the split name, raise --limit, or use fewer shards.")
    return QueryList(queries, issues)


__all__ = [
    "FIXTURE_CSV", "PROMPT_KINDS", "DataIssue", "QueryList", "TwoHopQuery", "build_query", "from_frame",
    "from_knowledge_graph", "from_triples", "load_queries", "organism_queries", "read_twohop_csv", "to_frame",
    "write_twohop_csv",
]
