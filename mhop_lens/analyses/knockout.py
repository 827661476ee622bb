"""Attention knockout ("Hopping Too Late" section 4, after Geva et al. 2023): where does information flow?

An edge ``"Q->K"`` forbids query position(s) Q to attend to key position(s) K (scores set to -inf before softmax on
``hook_attn_scores``, all heads) in the layer window [c - k, c + k] around a centre layer c; the effect on the
answer e3 at the last position is read per centre. Positions: K is a span name of ``sites.py`` meaning *every*
token of that span (``e1``, ``r1``, ``r2``, ``t1``) or ``last``; Q is ``last``, a span name (its last token), or
``all`` = every position after the key span's last token (the span's own tokens keep reading each other, so the
entity representation itself is left intact). All centres of a query batch run in one forward: the batch is
repeated per centre and each layer's hook blocks only the rows whose window covers it.

Which key tokens a span stands for (``keys``; it matters for relations: the organism's r1 span "'s spouse" is two
tokens):
- ``span`` (default): every token of the span ("'s" and "spouse"; "the performer of").
- ``last``: the span's last token only ("spouse"; "of"; e1's last token).
- ``word``: the study's key (``knockout_attention.py``: the last token of ``last_relation_word``, the relation
  word of the template): for r1 / r2 the last token of the span's last word that is not "of", "'s" or an article
  ("spouse"; "performer"), for e1 / t1 the span's last token. ``all->K`` queries start after the span either way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.lens import decode_ids
from mhop_lens.analyses.partial_forward import CleanRun, clean_run, dispatch, prefix_cache, run_from
from mhop_lens.analyses.patched_generation import (
    STUDY_NEW_TOKENS,
    answer_aliases,
    decode_new,
    generate_patched,
    mentions_any,
)
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import DataError
from mhop_lens.forward import last_logits
from mhop_lens.interventions import block_attention
from mhop_lens.tokens import Encoded, encode

DEFAULT_EDGES = ("last->e1", "last->r1", "all->e1")
KEY_TOKENS = ("span", "last", "word")
_FUNCTION_WORDS = {"of", "'s", "’s", "the", "a", "an", "s"}


def parse_edge(edge: str) -> tuple[str, str]:
    """``"last->e1"`` -> ("last", "e1")."""
    parts = [p.strip() for p in edge.split("->")]
    if len(parts) != 2 or not all(parts):
        raise DataError(f"an edge looks like 'QUERY->KEY', e.g. 'last->e1', not {edge!r}.")
    return parts[0], parts[1]


def window_layers(centre: int, window: int, n_layers: int) -> range:
    """Layers [centre - window, centre + window] clipped to the model; empty for ``window < 0``."""
    if window < 0:
        return range(0)
    return range(max(0, centre - window), min(n_layers, centre + window + 1))


def relation_word(query: TwoHopQuery, name: str) -> tuple[int, int]:
    """Character span of the relation word of span ``name`` (its last word that is not a function word)."""
    a, b = S.span_of(query, name)
    words = [(m.start() + a, m.end() + a) for m in re.finditer(r"\S+", query.prompt[a:b])]
    content = [w for w in words if query.prompt[w[0] : w[1]].lower() not in _FUNCTION_WORDS]
    return (content or words)[-1]


def key_positions(enc: Encoded, row: int, query: TwoHopQuery, name: str, keys: str = "span") -> list[int]:
    """Token indices that key ``name`` blocks under the ``keys`` definition (module docstring)."""
    every = S.span_positions(enc, row, query, name)
    if keys == "span" or name in ("last", "t2"):
        return every
    if keys == "word" and name in ("r1", "r2"):
        return [enc.position(row, relation_word(query, name))]
    if keys in ("last", "word"):
        return every[-1:]
    raise DataError(f"key tokens must be one of {KEY_TOKENS}, not {keys!r}.")


def edge_mask(enc: Encoded, queries: Sequence[TwoHopQuery], edges: str | Sequence[str], keys: str = "span"
              ) -> Bool[Tensor, "batch query key"]:
    """Blocked (query, key) pairs for every row of ``enc`` (row i holds ``queries[i]``, its edge ``edges[i]``);
    ``keys``: which tokens of a key span are blocked (``KEY_TOKENS``)."""
    edges = [edges] * len(queries) if isinstance(edges, str) else list(edges)
    width = enc.tokens.shape[1]
    mask = torch.zeros(len(queries), width, width, dtype=torch.bool)
    for i, (q, edge) in enumerate(zip(queries, edges, strict=True)):
        q_name, k_name = parse_edge(edge)
        span = S.span_positions(enc, i, q, k_name)
        keys_at = key_positions(enc, i, q, k_name, keys)
        if q_name == "all":
            rows = list(range(max(span) + 1, int(enc.last[i]) + 1))
        else:
            rows = [S.position(enc, i, q, q_name)]
        for r in rows:
            mask[i, r, [k for k in keys_at if k <= r]] = True
    return mask


def knockout_hooks(edges: Bool[Tensor, "batch query key"], windows: Sequence[range], n_layers: int) -> list:
    """One ``block_attention`` hook per layer covered by some row's window; rows outside it are untouched."""
    out = []
    for layer in range(n_layers):
        active = torch.tensor([layer in w for w in windows], dtype=torch.bool)
        if active.any():
            out.append((hooks.head(layer, "attn_scores"), block_attention(edges & active[:, None, None])))
    return out


def _readout(probs: Float[Tensor, "n vocab"], e3: Tensor, pred: Tensor) -> Float[Tensor, "n 3"]:
    """Per row: probability of e3's first token, of the clean top-1 token, and the top-1 token id."""
    rows = torch.arange(probs.shape[0])
    return torch.stack([probs[rows, e3], probs[rows, pred], probs.argmax(-1).float()], 1)


def _reference_knockout(model, queries, jobs, window, keys, batch_size, e3, clean_pred, generate
                        ) -> tuple[Tensor, list[str]]:
    """Every (query, edge, centre) job as a full forward with the knockout hooks (batched along the rows); also
    the study's generation (knockout in the prompt pass, then cached steps) when ``generate``."""
    n_layers = model.cfg.n_layers
    out, texts = [], []
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo : lo + batch_size]
        qs = [queries[qi] for qi, _, _ in chunk]
        enc = encode(model, [q.prompt for q in qs])
        mask = edge_mask(enc, qs, [e for _, e, _ in chunk], keys)
        fwd = knockout_hooks(mask, [window_layers(c, window, n_layers) for _, _, c in chunk], n_layers)
        qi = torch.tensor([qi for qi, _, _ in chunk])
        out.append(_readout(last_logits(model, enc, fwd).float().softmax(-1).cpu(), e3[qi], clean_pred[qi]))
        if generate:
            texts += decode_new(model, generate_patched(model, enc, fwd, STUDY_NEW_TOKENS))
    return torch.cat(out), texts


def _fast_knockout(model, clean: CleanRun, queries, jobs, window, keys, batch_size, e3, clean_pred) -> Tensor:
    """The same numbers from one cached clean run: a knockout in layers [lo, hi] with queries from position q0 on
    changes nothing before q0 (any layer) or below lo, so each centre's rows run from block lo over positions q0..
    only (``run_from`` over the clean prefix's keys/values), unembedding the last position."""
    n_layers = model.cfg.n_layers
    qi_all = torch.tensor([qi for qi, _, _ in jobs])
    mask = edge_mask(clean.enc.select(qi_all), [queries[qi] for qi, _, _ in jobs], [e for _, e, _ in jobs], keys)
    active = mask.flatten(2).any(-1)  # [job, query position]: rows whose attention is edited
    out = _readout(clean.last_logits.float().softmax(-1).cpu()[qi_all], e3[qi_all], clean_pred[qi_all])
    dev = clean.streams.device
    by_centre: dict[int, list[int]] = {}
    for j, (_, _, c) in enumerate(jobs):
        by_centre.setdefault(c, []).append(j)
    for c, idx in by_centre.items():
        layers = window_layers(c, window, n_layers)
        idx = [j for j in idx if active[j].any()]  # the others are the clean run
        for a in range(0, len(idx) if len(layers) else 0, batch_size):
            part = torch.tensor(idx[a : a + batch_size])
            q0 = int(active[part].any(0).nonzero()[0])
            rows = qi_all[part].to(dev)
            fwd = [(hooks.head(layer, "attn_scores"), block_attention(mask[part][:, q0:])) for layer in layers]
            logits = run_from(model, clean.streams[layers.start][rows, q0:], layers.start,
                              clean.enc.attention_mask[rows], prefix_cache(clean.kv, rows, q0, layers.start), fwd,
                              last_only=True)[:, -1]
            out[part] = _readout(logits.float().softmax(-1).cpu(), e3[qi_all[part]], clean_pred[qi_all[part]])
    return out


@torch.inference_mode()
def knockout_batch(model, queries: Sequence[TwoHopQuery], edges: Sequence[str], window: int,
                   centres: Sequence[int], batch_size: int, keys: str = "span", criterion: str = "first-token",
                   reference: bool = False) -> pd.DataFrame:
    """Knockout rows of one query batch (see ``run_knockout``)."""
    generate = criterion in ("generate", "both")
    clean_enc = encode(model, [q.prompt for q in queries])
    e3 = S.entity_tokens(model, queries, "e3").cpu()
    jobs = [(qi, edge, c) for edge in edges for qi in range(len(queries)) for c in centres]

    def fast():
        run = clean_run(model, clean_enc)
        probs = run.last_logits.float().softmax(-1).cpu()
        pred = probs.argmax(-1)
        return probs, _fast_knockout(model, run, queries, jobs, window, keys, batch_size, e3, pred), []

    def plain():
        probs = last_logits(model, clean_enc).float().softmax(-1).cpu()
        pred = probs.argmax(-1)
        return (probs, *_reference_knockout(model, queries, jobs, window, keys, batch_size, e3, pred, generate))

    # the study's generation needs the full prompt pass with the knockout: the reference path
    (clean, got, texts), path = dispatch(model, clean_enc, "knockout", fast, plain, use_reference=reference or generate)
    clean_pred = clean.argmax(-1)
    if generate:
        clean_text = decode_new(model, generate_patched(model, clean_enc, [], STUDY_NEW_TOKENS))
        clean_gen = [mentions_any(t, answer_aliases(q)) for t, q in zip(clean_text, queries, strict=True)]
    t1_key = {(qi, edge): S.span_of(q, parse_edge(edge)[1]) == S.span_of(q, "t1")
              for qi, q in enumerate(queries) for edge in edges}
    pred_tokens = decode_ids(model, got[:, 2].long())
    records = []
    for j, (qi, edge, c) in enumerate(jobs):
        w = window_layers(c, window, model.cfg.n_layers)
        records.append({
            "qid": queries[qi].id, "edge": edge, "centre": c, "window": window, "key_tokens": keys,
            "layer_lo": w.start if len(w) else -1, "layer_hi": w.stop - 1 if len(w) else -1,
            "e3_prob": float(got[j, 0]), "clean_e3_prob": float(clean[qi, e3[qi]]),
            "pred_prob": float(got[j, 1]), "clean_pred_prob": float(clean[qi, clean_pred[qi]]),
            "pred_token": pred_tokens[j],
            "correct": bool(int(got[j, 2]) == int(e3[qi])), "clean_correct": bool(clean_pred[qi] == e3[qi]),
            "t1_key": t1_key[(qi, edge)],
        })
        if generate:
            records[-1] |= {"correct_generate": mentions_any(texts[j], answer_aliases(queries[qi])),
                            "clean_correct_generate": clean_gen[qi], "generation": texts[j]}
    frame = pd.DataFrame.from_records(records)
    frame["e3_prob_change"] = (frame["e3_prob"] - frame["clean_e3_prob"]) / frame["clean_e3_prob"]
    frame.attrs["path"] = path
    return frame


def run_knockout(
    model,
    queries: Sequence[TwoHopQuery],
    edges: Sequence[str] = DEFAULT_EDGES,
    window: int = 1,
    centres: Sequence[int] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    keys: str = "span",
    criterion: str = "first-token",
    reference: bool = False,
) -> pd.DataFrame:
    """Block each edge in the window [c - window, c + window] for every centre layer c (default: all layers).

    ``window`` is the half-width k (0 = one layer, -1 = an empty window, which reproduces the clean run).
    ``keys``: which tokens of a key span are blocked: ``span`` (all), ``last``, ``word`` (the study's; module
    docstring); the column ``key_tokens`` records it. ``criterion`` "generate" or "both" adds the study's verdict:
    ``correct_generate`` / ``clean_correct_generate`` (e3 or an alias in 10 greedy tokens generated with the
    knockout in the prompt pass, as the study's hook skips cached steps) and ``generation``.
    ``batch_size`` counts forward rows ((query, edge, centre) triples) and queries per clean forward.
    The first-token numbers come from one cached clean run per batch, each centre's rows re-run from the window's
    first layer over the edited positions only, where ``partial_forward.fast_path_cause`` finds that exact for
    the model (else, with one warning, and for ``criterion`` generate / both, and with ``reference=True``: one full
    forward per row); ``frame.attrs["path"]`` says which ran (the last batch's).

    One row per (query, edge, centre). Columns: ``qid, edge, centre, window, layer_lo, layer_hi`` (the blocked
    layers, -1 when empty); ``e3_prob`` / ``clean_e3_prob`` (probability of e3's first token at the last position
    with / without the knockout) and ``e3_prob_change`` (relative change, (p - clean) / clean); ``pred_prob`` /
    ``clean_pred_prob`` (the same for the model's clean top-1 token); ``pred_token`` (top-1 under knockout);
    ``correct`` / ``clean_correct`` (top-1 == e3's first token); ``t1_key`` (the edge's key span is the query's t1,
    so ``last->e1`` on "the spouse of the performer of Imagine" and ``last->r1`` on "Mokar 's spouse 's boss").
    """
    n = model.cfg.n_layers
    centres = list(range(n)) if centres is None else [hooks.check_layer(model, c) for c in centres]
    for edge in edges:
        parse_edge(edge)
    if keys not in KEY_TOKENS:
        raise DataError(f"key tokens must be one of {KEY_TOKENS}, not {keys!r}.")
    if criterion not in ("first-token", "generate", "both"):
        raise DataError(f"criterion must be first-token, generate or both, not {criterion!r}.")
    if not queries:
        raise DataError("no queries to knock out; check --data, --limit and --shard.")
    batches = [list(queries[i : i + batch_size]) for i in range(0, len(queries), batch_size)]
    frames = [knockout_batch(model, b, edges, window, centres, batch_size, keys, criterion, reference)
              for b in tqdm(batches, desc="knockout", unit="batch", disable=not progress)]
    out = pd.concat(frames, ignore_index=True)
    out.attrs["path"] = frames[-1].attrs["path"]
    return out
