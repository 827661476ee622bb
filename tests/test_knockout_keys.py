"""Knockout key-token definitions: the whole span, its last token, or the study's relation word."""

from __future__ import annotations

import pytest
import torch
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


def test_generate_criterion_equals_an_independent_rerun(tiny_models):
    """The study's knockout verdict: generation with the knockout in the prompt pass, equal to re-running the
    knocked-out prompt at every generated token."""
    from mhop_lens.analyses.knockout import knockout_hooks, window_layers
    from mhop_lens.analyses.patched_generation import answer_aliases, decode_new, mentions_any

    model, qs = tiny_models["llama"], tiny_queries()[:3]
    frame = run_knockout(model, qs, edges=("last->e1",), window=0, centres=[0], criterion="both", progress=False)
    assert {"correct_generate", "clean_correct_generate", "generation"} <= set(frame.columns)
    n_layers = model.cfg.n_layers
    for i, q in enumerate(qs):
        enc = encode(model, [q.prompt])
        base, ids = edge_mask(enc, [q], "last->e1"), enc.tokens
        for _ in range(10):  # the knockout mask stays on the prompt's edges while the sequence grows
            mask = torch.zeros(1, ids.shape[1], ids.shape[1], dtype=torch.bool)
            mask[:, : base.shape[1], : base.shape[2]] = base
            fwd = knockout_hooks(mask, [window_layers(0, 0, n_layers)], n_layers)
            with torch.no_grad():
                logits = model.run_with_hooks(ids, attention_mask=torch.ones_like(ids), fwd_hooks=fwd)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        text = decode_new(model, ids[:, enc.tokens.shape[1] :])[0]
        assert frame.generation.iloc[i] == text
        assert frame.correct_generate.iloc[i] == mentions_any(text, answer_aliases(q))
