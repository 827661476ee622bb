"""Two-hop query data: the study's CSV (round trip, malformed rows), builders, the organism's world, load_queries."""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import pandas as pd
import pytest

from mhop_lens.data import (
    FIXTURE_CSV,
    build_query,
    from_knowledge_graph,
    from_triples,
    load_queries,
    organism_queries,
    read_twohop_csv,
    write_twohop_csv,
)
from mhop_lens.errors import DataError
from mhop_lens.tokens import encode

TEMPLATES = {"performer": "the performer of {}", "spouse": "the spouse of {}", "capital": "the capital of {}",
             "country": "the country of {}"}


def _rows() -> list[list[str]]:
    return list(csv.reader(io.StringIO(FIXTURE_CSV.read_text(encoding="utf-8"))))


def _write(tmp_path, rows, name="bad.csv"):
    path = tmp_path / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return path


def test_csv_round_trip(tmp_path):
    queries = read_twohop_csv(FIXTURE_CSV)
    assert len(queries) == 12 and not queries.issues
    out = write_twohop_csv(queries, tmp_path / "again.csv")
    assert out.read_bytes() == FIXTURE_CSV.read_bytes()
    assert read_twohop_csv(out) == queries
    original = pd.read_csv(FIXTURE_CSV, index_col=0, dtype=str, keep_default_na=False)
    assert original.equals(pd.read_csv(out, index_col=0, dtype=str, keep_default_na=False))


def test_csv_query_fields():
    q = read_twohop_csv(FIXTURE_CSV)[0]
    assert (q.id, q.e1, q.e2, q.e3, q.r1, q.r2) == ("0", "Imagine", "John Lennon", "Yoko Ono", "performer", "spouse")
    assert q.prompt == "the spouse of the performer of Imagine is"
    assert q.hop1_prompt == "the performer of Imagine is"
    assert q.hop2_prompt == "the spouse of John Lennon is"
    assert q.entity_shortcut_prompt == "the spouse of Imagine is"
    assert "Imagine" not in q.relation_shortcut_prompt and q.relation_shortcut_prompt.startswith("the spouse of the")
    assert {k: q.prompt[a:b] for k, (a, b) in q.spans.items()} == {
        "e1": "Imagine", "r1": "the performer of", "r2": "the spouse of"}
    assert q.e3_aliases == ("Ono Yoko", "Yoko Ono Lennon")
    assert q.meta["e1_id"] == "Q165498" and q.meta["r2_id"] == "P26" and q.meta["e3_popularity"] == "20133"


def test_csv_without_index_column_and_with_prompt_column(tmp_path):
    rows = [r[1:] for r in _rows()]
    rows[0] = ["prompt" if c == "source_prompt" else c for c in rows[0]]
    queries = read_twohop_csv(_write(tmp_path, rows))
    assert queries == read_twohop_csv(FIXTURE_CSV)


def _break(rows, kind):
    header = rows[0]
    row = rows[8]  # id 7
    col = header.index
    if kind == "missing value":
        row[col("e2_label")] = ""
    elif kind == "missing field":
        rows[8] = row[:-2]
    elif kind == "alias list":
        row[col("e3_aliases")] = "['Emma Thomas Nolan'"
    elif kind == "alias type":
        row[col("e1_aliases")] = "[1, 2]"
    elif kind == "e1 not in prompt":
        row[col("source_prompt")] = "the spouse of the director of Memento is"
    elif kind == "template":
        row[col("r1_template")] = "the director of"
    elif kind == "duplicate id":
        row[col("id")] = "3"
    elif kind == "empty alias":
        row[col("e2_aliases")] = "['Nolan', '']"
    elif kind == "e2 is e3":
        row[col("e3_label")] = row[col("e2_label")]
    return rows


KINDS = {"missing value": "missing value in column e2_label", "missing field": "fields but the header has",
         "alias list": "e3_aliases is not a Python list", "alias type": "e1_aliases must be a list of strings",
         "e1 not in prompt": "does not contain the composed phrase", "template": "exactly one '{}'",
         "duplicate id": "duplicate id", "empty alias": "holds an empty alias", "e2 is e3": "e2 and e3 are both"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_malformed_row_is_reported_with_its_id(tmp_path, kind):
    path = _write(tmp_path, _break(_rows(), kind))
    bad_id = "3" if kind == "duplicate id" else "7"
    with pytest.raises(DataError, match=rf"1 malformed row \(row {bad_id}: .*{KINDS[kind][:20]}"):
        read_twohop_csv(path)
    queries = read_twohop_csv(path, on_error="skip")
    assert len(queries) == 11 and [i.row_id for i in queries.issues] == [bad_id]
    assert KINDS[kind] in queries.issues[0].problem
    assert load_queries(str(path), on_error="skip").issues == queries.issues


def test_missing_column_is_a_file_error(tmp_path):
    rows = _rows()
    drop = rows[0].index("e3_aliases")
    path = _write(tmp_path, [r[:drop] + r[drop + 1 :] for r in rows])
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError, match="lacks the column.*e3_aliases"):
            read_twohop_csv(path, on_error=on_error)


def test_many_issues_are_all_counted(tmp_path):
    rows = _rows()
    for row in rows[1:]:
        row[rows[0].index("e1_aliases")] = "not a list"
    with pytest.raises(DataError, match=r"12 malformed rows .*and 7 more"):
        read_twohop_csv(_write(tmp_path, rows))


def test_from_triples():
    queries = from_triples([("Imagine", "performer", "John Lennon", "spouse", "Yoko Ono")], TEMPLATES,
                           aliases={"Yoko Ono": ["Ono Yoko"]})
    q = queries[0]
    assert q.id == "Imagine|performer|spouse" and q.prompt == "the spouse of the performer of Imagine is"
    assert q.answers("e3") == ("Yoko Ono", "Ono Yoko")
    bad = [("a", "performer", "b"), ("x", "performer", "y", "unknown", "z"), ("", "performer", "y", "spouse", "z")]
    with pytest.raises(DataError, match=r"3 malformed rows \(row #0: has 3 items.*no template.*e1 is empty"):
        from_triples(bad, TEMPLATES)
    assert len(from_triples(bad, TEMPLATES, on_error="skip").issues) == 3


def test_from_knowledge_graph():
    facts = [("Kyoto", "country", "Japan"), ("Japan", "capital", "Tokyo"), ("Paris", "country", "France"),
             ("France", "capital", "Paris"), ("Osaka", "country", "Japan"), ("Osaka", "country", "Nippon")]
    with pytest.raises(DataError, match=r"row Osaka\|country: has 2 objects"):
        from_knowledge_graph(facts, TEMPLATES)
    queries = from_knowledge_graph(facts, TEMPLATES, on_error="skip")
    assert [q.id for q in queries] == ["Kyoto|country|capital"]  # Paris -> France -> Paris is a cycle
    assert queries[0].prompt == "the capital of the country of Kyoto is" and queries[0].e3 == "Tokyo"
    assert [i.row_id for i in queries.issues] == ["Osaka|country"]
    assert not from_knowledge_graph(facts[:4], TEMPLATES, relation_pairs=[("capital", "country")])


def test_multi_token_entities(tiny_models):
    q = from_triples([("New York City", "country", "United States", "capital", "Washington, D.C.")], TEMPLATES)[0]
    model = tiny_models["gpt2"]
    enc = encode(model, [q.prompt, q.hop1_prompt])
    e1 = q.spans["e1"]
    first, last = enc.position(0, e1, "first"), enc.position(0, e1, "last")
    pieces = model.tokenizer.decode(enc.tokens[0, first : last + 1])
    assert last > first and pieces.strip() == "New York City"
    assert q.prompt[slice(*q.spans["r2"])] == "the capital of" and q.prompt.endswith("New York City is")


@pytest.fixture()
def world_path(tmp_path):
    from mhop_lens.organism.world import World

    path = tmp_path / "world.json"
    World.generate(seed=3, n_entities=12, n_relations=3).save(path)
    return path


def test_organism_queries(world_path):
    from mhop_lens.organism.world import World

    world = World.load(world_path)
    queries = organism_queries(world_path)
    n_held = len(world.two_hop["heldout"])
    assert len(queries) == 12 * 9 and {q.split for q in queries[:n_held]} == {"heldout"}
    for q in queries[:: 7]:
        e1, r1, r2 = q.id.split("|")
        ref = world.query(e1, r1, r2)
        assert (q.prompt, q.e2, q.e3, q.split) == (ref["prompt"], ref["e2"], ref["e3"], ref["split"])
        assert q.hop1_prompt == world.one_hop_prompt(e1, r1) and q.hop2_prompt == world.one_hop_prompt(q.e2, r2)
        assert q.spans["e1"] == ref["e1_span"]
        assert q.spans["r1"][1] == ref["r1_span"][1] and q.spans["r2"][1] == ref["r2_span"][1]
        assert q.relation_shortcut_prompt == f"'s {r1} 's {r2}"
    assert organism_queries(world, "train") == queries[n_held:]


def test_organism_world_with_a_missing_fact(world_path):
    from mhop_lens.organism.world import World

    world = World.load(world_path)
    e1, r1, r2 = world.two_hop["heldout"][0]
    del world.facts[r1][e1]
    with pytest.raises(DataError, match=rf"row {e1}\|{r1}\|{r2}: the world has no fact {r1}\({e1}\)"):
        organism_queries(world)
    issues = organism_queries(world, on_error="skip").issues
    assert {f"{e1}|{r1}|{r}" for r in world.relation_names} <= {i.row_id for i in issues}
    assert all(f"no fact {r1}({e1})" in i.problem for i in issues)


def test_load_queries_split_limit_shard(world_path):
    spec = str(world_path)
    held = load_queries(spec, split="heldout")
    assert all(q.split == "heldout" for q in held)
    first = load_queries(str(world_path.parent), split="heldout", limit=5)
    shards = [load_queries(spec, split="heldout", limit=5, shard=f"{i}/2") for i in range(2)]
    assert first == held[:5] and sorted(q.id for s in shards for q in s) == sorted(q.id for q in first)
    with pytest.raises(DataError, match="gave no queries"):
        load_queries(spec, split="test")
    with pytest.raises(DataError, match="expected 'organism'"):
        load_queries("two_hop.tsv")
    with pytest.raises(DataError, match="does not exist"):
        load_queries("missing.csv")


def test_load_organism_spec():
    from mhop_lens.organism import assets_dir

    if (assets_dir() / "world.json").is_file():
        everything = load_queries("organism")
        held = [q for q in everything if q.split == "heldout"]
        assert held == everything[: len(held)] and held == load_queries("organism:heldout")
    else:
        with pytest.raises(DataError, match="organism train"):
            load_queries("organism")


def test_spans_are_unicode_safe():
    """Characters whose lower case is longer ("İ" -> "i̇") before or inside the phrase do not shift the spans."""
    for prompt in ("İİ İstanbul: the spouse of the performer of Imagine is",
                   "THE SPOUSE OF THE PERFORMER OF İMAGİNE is"):
        e1 = "İmagİne" if "İMAGİNE" in prompt else "Imagine"
        q = build_query("q", e1, "performer", "John Lennon", "spouse", "Yoko Ono", "the performer of {}",
                        "the spouse of {}", prompt=prompt)
        texts = {k: q.prompt[a:b] for k, (a, b) in q.spans.items()}
        assert {k: v.lower() for k, v in texts.items()} == {
            "e1": e1.lower(), "r1": "the performer of", "r2": "the spouse of"}, texts


def test_e1_equal_to_e3_stays_a_query():
    """Cycles (the spouse of the spouse of X is X) are real queries; only e2 == e1 or e2 == e3 is refused."""
    q = build_query("q", "Ann", "spouse", "Bob", "spouse", "Ann", "the spouse of {}", "the spouse of {}")
    assert q.e1 == q.e3
    with pytest.raises(DataError, match="e1 and e2 are both 'Ann'"):
        build_query("q", "Ann", "spouse", "Ann", "spouse", "Bob", "the spouse of {}", "the spouse of {}")
    chains = [("Ann", "spouse", "Bob", "spouse", "Bob"), ("Imagine", "performer", "John Lennon", "spouse", "Yoko Ono")]
    kept = from_triples(chains, TEMPLATES, on_error="skip")
    assert [q.id for q in kept] == ["Imagine|performer|spouse"] and "e2 and e3 are both" in kept.issues[0].problem


def test_one_hop_suffix_is_the_studys_and_configurable(tmp_path):
    """Default " is" (the study's evaluate_dataset.py: f"{template.format(label)} is"); prompts that end otherwise
    are counted in one warning; suffix="" for relation-after-entity prompts."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = read_twohop_csv(FIXTURE_CSV)[0]
    assert q.hop1_prompt == "the performer of Imagine is" and q.entity_shortcut_prompt == "the spouse of Imagine is"
    rows = _rows()
    col = rows[0].index("source_prompt")
    for row in rows[1:4]:
        row[col] = row[col].removesuffix(" is")
    path = _write(tmp_path, rows, "no-is.csv")
    with pytest.warns(UserWarning, match=r"3 of 12 two-hop prompts do not end in ' is' .*row 0 ends in ''"):
        queries = read_twohop_csv(path)
    assert queries[0].hop1_prompt.endswith(" is")
    with pytest.warns(UserWarning, match=r"9 of 12 two-hop prompts do not end in ''"):
        bare = load_queries(str(path), suffix="")
    assert bare[0].hop1_prompt == "the performer of Imagine" and bare[0].hop2_prompt == "the spouse of John Lennon"


def test_docs_describe_every_csv_column():
    """docs/data.md names every column the reader needs or writes, the alias syntax and the unknown-word policy."""
    from mhop_lens.data.twohop_csv import COLUMNS, REQUIRED

    text = (Path(__file__).parents[1] / "docs" / "data.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)`", text, flags=re.MULTILINE))
    assert set(COLUMNS) | set(REQUIRED) | {"prompt"} <= documented, set(COLUMNS) - documented
    for topic in ("## Aliases", "## Build a file from your own triples", "## Unknown words", "--on-error skip"):
        assert topic in text
