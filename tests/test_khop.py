"""k-hop chains: the record, builders, the k-hop world, and the k = 2 path against today's two-hop code."""

import numpy as np
import pandas as pd
import pytest

from mhop_lens.analyses.backpatch import run_backpatch
from mhop_lens.analyses.khop import (
    resolution_profile,
    run_khop_backpatch,
    run_khop_knockout,
    run_khop_lens,
)
from mhop_lens.analyses.knockout import run_knockout
from mhop_lens.analyses.lens import run_lens
from mhop_lens.data import organism_queries
from mhop_lens.data.khop import from_chains, from_facts, prefix_queries, world_queries
from mhop_lens.data.records import KHopQuery, build_khop_query, khop_from_frame, khop_to_frame
from mhop_lens.errors import DataError
from mhop_lens.evaluate import evaluate, evaluate_khop, summarize, summarize_khop
from mhop_lens.organism_khop.world import KHopWorld

POSSESSIVE = {"spouse": "{} 's spouse", "boss": "{} 's boss", "rival": "{} 's rival"}


def test_record_spans_prompts_and_views():
    q = build_khop_query("x", ("Ann", "Bo", "Cy", "Di"), ("spouse", "boss", "rival"),
                         [POSSESSIVE[r] for r in ("spouse", "boss", "rival")], suffix="")
    assert q.prompt == "Ann 's spouse 's boss 's rival" and q.k == 3 and q.answer == "Di"
    assert {k: q.prompt[a:b] for k, (a, b) in q.spans.items()} == {
        "e1": "Ann", "r1": "'s spouse", "r2": "'s boss", "r3": "'s rival"}
    assert q.prefix_prompt(2) == "Ann 's spouse 's boss" and q.hop_prompt(3) == "Cy 's rival"
    v = q.view(2)
    assert (v.e2, v.e3, v.hop1_prompt, v.hop2_prompt) == ("Cy", "Di", "Ann 's spouse 's boss", "Cy 's rival")
    assert v.prompt[slice(*v.spans["r1"])].endswith("boss") and v.prompt[slice(*v.spans["hop3"])] == "'s rival"
    prefix = "the rival of the boss of the spouse of Ann is"
    q2 = build_khop_query("y", ("Ann", "Bo", "Cy", "Di"), ("spouse", "boss", "rival"),
                          ("the spouse of {}", "the boss of {}", "the rival of {}"))
    assert q2.prompt == prefix and q2.prompt[slice(*q2.spans["r1"])] == "the spouse of"
    with pytest.raises(DataError):
        q.view(3)
    with pytest.raises(DataError):
        build_khop_query("z", ("A", "B"), ("spouse",), ("{} 's spouse",))
    assert khop_from_frame(khop_to_frame([q, q2])) == [q, q2]


def test_two_hop_record_is_the_k2_view():
    for q in organism_queries(None, "heldout")[:50]:
        k = KHopQuery.from_two_hop(q)
        v = k.view(1)
        assert k.k == 2 and k.suffix == ""
        assert {n: s for n, s in v.spans.items() if not n.startswith("hop")} == q.spans
        assert v.spans["hop1"] == q.spans["r1"] and v.spans["hop2"] == q.spans["r2"]
        assert all(getattr(v, f) == getattr(q, f) for f in q.__dataclass_fields__ if f != "spans")
        assert k.prefix_prompt(1) == q.hop1_prompt and k.prefix_prompt(2) == q.prompt
        assert k.hop_prompt(2) == q.hop2_prompt


def test_builders_from_chains_and_facts():
    qs = from_chains([("A", "spouse", "B", "boss", "C", "rival", "D"), ("A", "spouse", "B", "boss", "C")], POSSESSIVE,
                     suffix="")
    assert [q.k for q in qs] == [3, 2] and qs[0].id == "A|spouse|boss|rival"
    with pytest.raises(DataError):
        from_chains([("A", "spouse", "B", "boss")], POSSESSIVE)
    facts = [("a", "spouse", "b"), ("b", "boss", "c"), ("c", "rival", "d"), ("d", "spouse", "a"),
             ("a", "boss", "x"), ("a", "boss", "y")]
    chains = from_facts(facts, POSSESSIVE, 3, on_error="skip", suffix="")
    assert {q.id for q in chains} == {"a|spouse|boss|rival", "b|boss|rival|spouse", "c|rival|spouse|spouse",
                                      "d|spouse|spouse|boss"}  # a|boss is ambiguous, so no chain takes it
    assert all(len(set(q.entities)) == 4 for q in chains)
    assert {q.id for q in prefix_queries(chains, 2)} == {"a|spouse|boss", "b|boss|rival", "c|rival|spouse",
                                                         "d|spouse|spouse"}
    cyclic = from_facts([("a", "spouse", "b"), ("b", "boss", "a"), ("a", "rival", "c")], POSSESSIVE, 3)
    assert cyclic == []  # a -> b -> a repeats an entity


def test_khop_world_split_and_prompts(tmp_path):
    w = KHopWorld.generate(0, n_entities=20, n_relations=3, depth=3)
    chains = w.chains["train"] + w.chains["heldout"]
    assert len(chains) == 20 * 27 and len(w.chains["heldout"]) > 0
    trained_prefixes = {tuple(c[:-1]) for c in w.chains["train"]}
    assert all(tuple(c[:-1]) in trained_prefixes for c in w.chains["heldout"])
    qs = world_queries(w, "heldout")
    q = qs[0]
    assert q.prompt == w.chain_prompt(tuple(q.id.split("|"))) and q.entities == tuple(w.entities_of(q.id.split("|")))
    assert q.prefix_prompt(2) == w.two_hop_prompt(q.entities[0], *q.relations[:2])
    w.save(tmp_path / "world.json")
    back = KHopWorld.load(tmp_path / "world.json")
    assert back.chains == w.chains and back.facts == w.facts and back.two_hop == w.two_hop


@pytest.fixture(scope="module")
def two_hop_pair():
    """Held-out organism queries with distinct (e1, r1) and their k = 2 records."""
    qs = list({(q.e1, q.r1): q for q in organism_queries(None, "heldout")}.values())[:16]
    return qs, [KHopQuery.from_two_hop(q) for q in qs]


def test_k2_evaluation_matches_two_hop(organism, two_hop_pair):
    qs, ks = two_hop_pair
    a, b = evaluate(organism, qs, progress=False), evaluate_khop(organism, ks, progress=False)
    for old, new in (("hop1", "prefix1"), ("two_hop", "prefix2"), ("hop2", "hop2")):
        assert (a[f"{old}_correct"] == b[f"{new}_correct"]).all() and (a[f"{old}_rank"] == b[f"{new}_rank"]).all()
        assert np.allclose(a[f"{old}_logprob"], b[f"{new}_logprob"], atol=1e-4)
    s = summarize_khop(b).set_index(["split", "depth"])
    assert s.loc[("all", 2), "gap"] == pytest.approx(summarize(a)["compositionality_gap"])
    assert s.loc[("all", 2), "chain_accuracy"] == pytest.approx(a["two_hop_correct"].mean())


def test_k2_lens_backpatch_knockout_match_two_hop(organism, two_hop_pair):
    qs, ks = two_hop_pair
    old = run_lens(organism, qs, ["r1", "last"], ["resid_post"], progress=False)
    new = run_khop_lens(organism, ks, ["r1", "r2"], progress=False)
    for entity, col in (("e2", "e2_rank"), ("e3", "e3_rank")):
        got = new[new["entity"] == entity].reset_index(drop=True)
        assert (got["rank"].to_numpy() == old[col].to_numpy()).all()
        assert (got["token_index"].to_numpy() == old["token_index"].to_numpy()).all()
    prof = resolution_profile(new)
    assert set(prof["entity"]) == {"e2", "e3"} and prof["top1_share"].between(0, 1).all()
    pd.testing.assert_frame_equal(run_backpatch(organism, qs, ["last", "r1"], progress=False, reference=True),
                                  run_khop_backpatch(organism, ks, ["last", "r1"], progress=False, reference=True))
    pd.testing.assert_frame_equal(run_knockout(organism, qs, ["last->e1", "last->r1"], progress=False),
                                  run_khop_knockout(organism, ks, ["last->e1", "last->r1"], progress=False))


def test_shipped_three_hop_organism_loads_by_name():
    from mhop_lens.data.khop import load_khop_queries
    from mhop_lens.models import builtin_dir

    assert (builtin_dir("organism-khop") / "model.safetensors").is_file()
    qs = load_khop_queries("organism-khop:heldout", limit=5)
    assert len(qs) == 5 and all(q.k == 3 and q.split == "heldout" for q in qs)
    assert len(load_khop_queries("organism-khop:train", limit=3)) == 3


def test_chain_returning_to_an_earlier_entity_is_read():
    """The spouse of the spouse of e1 is e1: the chain's bridge view has e1 == e2, which the two-hop data checks
    refuse (a decoded answer could not be told apart) but the k-hop lens scores by token rank."""
    from mhop_lens.analyses.khop import run_khop_lens
    from mhop_lens.data.khop import load_khop_queries
    from mhop_lens.models import load_model

    chains = load_khop_queries("organism-khop:heldout")
    back = [q for q in chains if q.entities[0] == q.entities[2]][:2]
    assert back, "the held-out set holds chains that return to e1"
    from mhop_lens.data.records import build_query

    assert back[0].view(2).e1 == back[0].view(2).e2  # the view is built; a user row like it is refused
    with pytest.raises(DataError, match="can never be told apart"):
        build_query("x", "A", "r", "A", "s", "B", "the r of {}", "the s of {}")
    model = load_model("organism-khop")
    lens = run_khop_lens(model, back, progress=False)
    assert set(lens["entity"]) == {"e2", "e3", "e4"} and lens["rank"].notna().all()
