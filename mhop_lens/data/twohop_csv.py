"""The public two-hop CSV of "Hopping Too Late" (Biran et al. 2024): read it into queries, write queries back.

One row per query: Wikidata ids ``e1 r1 e2 r2 e3``, labels ``e*_label``, Python-literal alias lists
``e*_aliases``, types ``e*_type r*_type``, ``e*_popularity``, ``r1_template r2_template`` ("the spouse of {}") and
the two-hop prompt ``source_prompt`` (``prompt`` in some releases). An unnamed pandas index column may come first.
Rows are read with the csv module (not pandas) so that a short or long row is reported with its id. Every column is
described in docs/data.md.

One-hop and shortcut prompts are not in the file: like the study's ``evaluate_dataset.py`` they are a template
filled with an entity plus ``suffix`` (the study's " is"). The study appends " is" to its relation-before-entity
two-hop prompts only, so a file whose prompts end otherwise (relation-after-entity "... has a spouse named") gets
a warning naming how many rows do not end in the suffix.
"""

from __future__ import annotations

import ast
import csv
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from mhop_lens.data.issues import IssueCollector, OnError, QueryList
from mhop_lens.data.records import TwoHopQuery, build_query, find_casefree
from mhop_lens.errors import DataError, not_utf8

ENTITIES = ("e1", "e2", "e3")
RELATIONS = ("r1", "r2")
REQUIRED = ("id", "e1", "r1", "e2", "r2", "e3", "e1_label", "e2_label", "e3_label", "e1_aliases", "e2_aliases",
            "e3_aliases", "r1_template", "r2_template")
PROMPT_COLUMNS = ("source_prompt", "prompt")
#: Column order written by ``write_twohop_csv`` (the study's, with ``source_prompt``).
COLUMNS = ("id", "e1", "r1", "e2", "r2", "e3", "e1_label", "e2_label", "e3_label", "e1_aliases", "e2_aliases",
           "e3_aliases", "e1_type", "r1_type", "e2_type", "r2_type", "e3_type", "e1_popularity", "e2_popularity",
           "e3_popularity", "r1_template", "r2_template", "source_prompt")
#: Columns kept verbatim in ``TwoHopQuery.meta`` (Wikidata ids under ``<col>_id``) so a read row writes back.
#: What the study appends to a filled template to make a one-hop / entity-shortcut prompt ("... of X" + " is").
STUDY_SUFFIX = " is"
META = ("e1_type", "r1_type", "e2_type", "r2_type", "e3_type", "e1_popularity", "e2_popularity", "e3_popularity")


def read_twohop_csv(path: str | os.PathLike, *, on_error: OnError = "raise", split: str = "",
                    suffix: str = STUDY_SUFFIX) -> QueryList:
    """Queries of a two-hop CSV, in file order. Relation names are ``r*_type`` when present, else ``r*``.

    Malformed rows (missing value or field, unparseable alias list, empty alias, e2 equal to e1 or e3, bad
    template, prompt without e1, duplicate id) raise one ``DataError`` listing every bad row id, or with
    ``on_error="skip"`` are skipped and listed in the returned list's ``.issues``. A file without a required column,
    not in UTF-8, or not parseable as CSV is always an error. ``suffix`` ends the one-hop and entity-shortcut
    prompts (default the study's " is"); a warning counts the prompts whose text after the composed relation
    phrase is not ``suffix``, because their one-hop prompts would then not match the two-hop one.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"two-hop CSV {str(path)!r} does not exist. Download the study's two_hop.csv "
                        "(github.com/edenbiran/HoppingTooLate) or pass --data organism.")
    rows = _csv_rows(path)
    if not rows:
        raise DataError(f"{path} is empty; a two-hop CSV needs a header row and one row per query.")
    header = rows[0]
    missing = [c for c in REQUIRED if c not in header]
    prompt_col = next((c for c in PROMPT_COLUMNS if c in header), None)
    if missing or prompt_col is None:
        missing += [] if prompt_col else ["source_prompt"]
        raise DataError(f"{path} lacks the column(s) {missing}; the two-hop CSV format needs {list(REQUIRED)} "
                        "and source_prompt (see mhop_lens/data/fixtures/two_hop_sample.csv).")
    issues = IssueCollector(str(path), on_error)
    queries, seen = [], {}
    for line, values in enumerate(rows[1:], start=2):
        if not any(v.strip() for v in values):
            continue
        row = dict(zip(header, values, strict=False))
        row_id = row.get("id", "").strip() or f"line {line}"
        if len(values) != len(header):
            issues.add(row_id, f"has {len(values)} fields but the header has {len(header)} (line {line}); "
                               "a field is missing or an unquoted comma split one")
            continue
        if row_id in seen:
            issues.add(row_id, f"duplicate id (first on line {seen[row_id]}, again on line {line})")
            continue
        seen[row_id] = line
        try:
            queries.append(_row_query(row, row_id, prompt_col, split, suffix))
        except DataError as e:
            issues.add(row_id, str(e).removeprefix(f"query {row_id}: "))
    _warn_suffix(path, queries, suffix)
    return issues.finish(queries)


def _csv_rows(path: Path) -> list[list[str]]:
    """Every row of the file; a non-UTF-8 file or a CSV syntax error (e.g. an unclosed quote swallowing the rest
    of the file into one oversized field) is a ``DataError`` naming the line."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            return list(reader)
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        except csv.Error as e:
            raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({e}); an unclosed quote makes the "
                            "rest of the file one field. Quote fields that hold commas and close every quote."
                            ) from None


def _warn_suffix(path: Path, queries: list[TwoHopQuery], suffix: str) -> None:
    """Warn when two-hop prompts do not end with ``suffix`` after the composed phrase (the one-hop prompts do)."""
    odd = []
    for q in queries:
        composed = q.r2_template.format(q.r1_template.format(q.e1))
        tail = q.prompt[find_casefree(q.prompt, composed) + len(composed):]
        if tail != suffix:
            odd.append((q.id, tail))
    if odd:
        qid, tail = odd[0]
        warnings.warn(f"{path}: {len(odd)} of {len(queries)} two-hop prompts do not end in {suffix!r} after the "
                      f"relation phrase (row {qid} ends in {tail!r}), but their one-hop and entity-shortcut prompts "
                      f"get {suffix!r} appended; pass the matching suffix (read_twohop_csv / load_queries "
                      "suffix=...) or those prompts score against a different question.", stacklevel=3)


def _row_query(row: dict[str, str], row_id: str, prompt_col: str, split: str, suffix: str) -> TwoHopQuery:
    for col in (*REQUIRED, prompt_col):
        if col not in ("e1_aliases", "e2_aliases", "e3_aliases") and not row[col].strip():
            raise DataError(f"missing value in column {col}")
    aliases = {e: _aliases(row[f"{e}_aliases"], f"{e}_aliases") for e in ENTITIES}
    names = {r: row.get(f"{r}_type", "").strip() or row[r] for r in RELATIONS}
    meta = {f"{c}_id": row[c] for c in (*ENTITIES, *RELATIONS)}
    meta |= {c: row[c] for c in META if c in row}
    return build_query(
        row_id, row["e1_label"], names["r1"], row["e2_label"], names["r2"], row["e3_label"],
        row["r1_template"], row["r2_template"], suffix=suffix, prompt=row[prompt_col], split=split, meta=meta,
        e1_aliases=aliases["e1"], e2_aliases=aliases["e2"], e3_aliases=aliases["e3"],
    )


def _aliases(text: str, column: str) -> tuple[str, ...]:
    """A Python-literal list of strings (empty cell = no aliases)."""
    if not text.strip():
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise DataError(f"{column} is not a Python list literal: {text[:60]!r}") from None
    if not isinstance(value, list | tuple) or not all(isinstance(a, str) for a in value):
        raise DataError(f"{column} must be a list of strings, got {text[:60]!r}")
    return tuple(value)


def write_twohop_csv(queries: Iterable[TwoHopQuery], path: str | os.PathLike) -> Path:
    """Write queries in the study's format (with its leading unnamed index column); inverse of the reader.

    Wikidata ids, types and popularity come from ``meta`` when the query was read from such a file, otherwise
    labels stand in for ids and relation names for types.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["", *COLUMNS])
        for i, q in enumerate(queries):
            writer.writerow([i, *(_cell(q, c) for c in COLUMNS)])
    return path


def _cell(q: TwoHopQuery, column: str) -> str:
    if column == "id":
        return q.id
    if column == "source_prompt":
        return q.prompt
    if column in (*ENTITIES, *RELATIONS):
        return str(q.meta.get(f"{column}_id", getattr(q, column)))
    name, _, attr = column.partition("_")
    if attr == "label":
        return getattr(q, name)
    if attr == "aliases":
        return repr(list(getattr(q, column)))
    if attr == "template":
        return getattr(q, column)
    default = getattr(q, name) if column in ("r1_type", "r2_type") else ""
    return str(q.meta.get(column, default))
