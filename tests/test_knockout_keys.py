"""Knockout key-token definitions: the whole span, its last token, or the study's relation word."""

from __future__ import annotations

import pytest
from _hopping import possessive_query, tiny_queries

from mhop_lens.analyses.knockout import edge_mask, key_positions, relation_word, run_knockout
from mhop_lens.errors import DataError
from mhop_lens.tokens import encode


def _tokens(model, enc, row, positions):
    return [model.tokenizer.decode([int(enc.tokens[row, p])]).strip() for p in positions]


def test_key_tokens_on_the_possessive_prompt(organism):
    """'Zapus 's spouse 's spouse': r1 = "'s spouse" under span, only "spouse" under last and word."""
    from mhop_lens.data import load_queries

    q = load_queries("organism:heldout", limit=1)[0]
    enc = encode(organism, [q.prompt])
    assert _tokens(organism, enc, 0, key_positions(enc, 0, q, "r1", "span")) == ["'s", q.r1]
    for keys in ("last", "word"):
        assert _tokens(organism, enc, 0, key_positions(enc, 0, q, "r1", keys)) == [q.r1]
    assert key_positions(enc, 0, q, "e1", "word") == key_positions(enc, 0, q, "e1", "span")[-1:]


def test_relation_word_is_the_studys():
    """The study's last_relation_word ('the performer of {}'.split(' ')[-3]) on 'The performer of' is 'performer';
    on the possessive "'s spouse" it is 'spouse'."""
    q = tiny_queries()[0]
    a, b = relation_word(q, "r1")
    assert q.prompt[a:b] == "performer"
    p = possessive_query()
    a, b = relation_word(p, "r1")
    assert p.prompt[a:b] == "spouse"


def test_fewer_keys_block_less(tiny_models):
    model, qs = tiny_models["gpt2"], tiny_queries()
    enc = encode(model, [q.prompt for q in qs])
    span = edge_mask(enc, qs, "last->r1", "span")
    word = edge_mask(enc, qs, "last->r1", "word")
    assert (word <= span).all() and word.sum() == len(qs) and span.sum() > word.sum()
    frame = run_knockout(model, qs, edges=("last->r1",), window=0, keys="word", progress=False)
    assert (frame.key_tokens == "word").all()
    with pytest.raises(DataError, match="key tokens"):
        run_knockout(model, qs, keys="tokens", progress=False)
