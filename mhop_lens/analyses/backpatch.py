"""Back-patching ("Hopping Too Late", Biran et al. 2024): does a later layer's residual, fed back, fix a failure?

For every pair (source layer s > target layer t) and position p the residual at (t, p) is overwritten with the
clean residual at (s, p) (layer l = ``blocks.{l}.hook_resid_post``) and the answer is scored. A shuffled-donor
control feeds the residual of a different query (a fixed, seeded derangement) through the same pairs.

Fast path (``_fast_sweep``): one cached clean run per batch; per target layer t one partial forward of all
(query x donor x s) rows that starts at block t+1, recomputes only positions >= p and reads the clean keys/values
of the prefix (``partial_forward``); at the last position all t in one pass over the layers. Reference
(``_reference_sweep``): one batched full forward per (s, t) pair with ``interventions.replace_positions``. Both give
the same logits (tests: < 1e-4).

Memory: the sweeps return final residuals and read them out ``lens.READOUT_CHUNK_BYTES`` of fp32 logits at a time
(``partial_forward.readout``), handing each chunk to a sink. ``run_backpatch`` uses ``backpatch_scores``, which keeps
only each target's rank and probability, so the read-out adds a few chunks of memory whatever the number of pairs,
rows and vocabulary (held whole, the logits are pairs x rows x vocabulary x 4 bytes: ~8 GB for Llama-3-8B's 496
pairs x 32 rows x 128,256). ``backpatch_logits`` / ``backpatch_reference_logits`` keep the full logits (tests).

Criterion for "fixed" / "correct" (``criterion``):
- ``first-token``: e3's first token (after ``answer_prefix``) is the top-1 next token at the last position.
- ``generate`` (the study's ``patch_activations.py`` + ``classify_prediction_correct``): greedy generation of 10
  tokens with the patch applied in the prompt pass (``patched_generation.generate_patched``, KV cache), correct
  when e3's label or an alias longer than one character is a case-insensitive substring of the generated text.
- ``both``: the two side by side (``correct`` and ``correct_generate`` columns).
Positions: any name of ``analyses/sites.py``; the study's two are ``t1`` (last token of the first-hop phrase, its
"e1" source) and ``last`` (its "last" source, the final "is").
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks, interventions
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.lens import READOUT_CHUNK_BYTES
from mhop_lens.analyses.partial_forward import (
    BlockArgs,
    CleanRun,
    call_block,
    clean_run,
    dispatch,
    kept_block_args,
    prefix_cache,
    readout,
    reference_run,
    run_from,
    warn_once,
)
from mhop_lens.analyses.patched_generation import (
    STUDY_NEW_TOKENS,
    answer_aliases,
    decode_new,
    generate_patched,
    mentions_any,
)
from mhop_lens.analyses.variant_tokens import run_variants, variant_path_cause
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import logits_at
from mhop_lens.tokens import Encoded, encode, first_token_ids

Pair = tuple[int, int]  # (source layer s, target layer t)
DONORS = ("self", "shuffled")
CRITERIA = ("first-token", "generate", "both")
#: Failure definitions: the evaluate subset (both hops known, no shortcut, composition wrong) / clean misses.
FAILURES = ("evaluate-subset", "clean-miss")
#: Bytes of expanded prefix keys/values one partial forward may hold (rows are chunked to stay below it).
CACHE_BUDGET = 256 * 2**20


def all_pairs(n_layers: int) -> list[Pair]:
    """Every (s, t) with s > t."""
    return [(s, t) for t in range(n_layers) for s in range(t + 1, n_layers)]


def derangement(n: int, seed: int = 0) -> list[int]:
    """A seeded permutation with no fixed point (donor i != i), for the shuffled-donor control."""
    if n < 2:
        raise MhopLensError("the shuffled-donor control needs at least 2 queries; pass more or control=False.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    donor = [0] * n
    for i, q in enumerate(order):
        donor[q] = order[(i + 1) % n]
    return donor


def positions_of(enc: Encoded, queries: Sequence[TwoHopQuery], position: str) -> Int[Tensor, " batch"]:
    """Token position per row: ``"last"`` or a name of ``analyses/sites.py`` (``"t1"``, ``"e1"``, ``"r1"``, ...)."""
    if position == "last":
        return enc.last.cpu()
    return S.positions(enc, queries, position)


# read-outs ----------------------------------------------------------------------------------------------------
#: ``put(pair, row, logits)``: what a sweep hands on, chunk by chunk: logits ``[e, vocab]`` of entries (pairs[pair[i]],
#: row index row[i] into the sweep's ``rows``).
Sink = Callable[[Int[Tensor, " e"], Int[Tensor, " e"], Float[Tensor, "e vocab"]], None]


def _read_out(model, hidden: Float[Tensor, "e d_model"], pair: Int[Tensor, " e"], row: Int[Tensor, " e"], put: Sink,
              chunk_bytes: int) -> None:
    """Logits of final residuals (``partial_forward.readout``: final norm, unembedding, logit scale / soft cap),
    ``chunk_bytes`` of fp32 logits at a time, each chunk handed to ``put``."""
    step = _chunk_rows(model, chunk_bytes)
    for a in range(0, len(hidden), step):
        put(pair[a : a + step], row[a : a + step], readout(model, hidden[None, a : a + step])[0])


def _chunk_rows(model, chunk_bytes: int) -> int:
    """Rows of fp32 vocabulary logits in ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * model.cfg.d_vocab))


def _keep(out: Float[Tensor, "pair m vocab"]) -> Sink:
    """A sink that stores the logits."""
    def put(pair, row, logits):
        out[pair.to(out.device), row.to(out.device)] = logits.to(out.dtype)
    return put


def _scorer(targets: Int[Tensor, " m"], rank: Int[Tensor, "pair m"], prob: Float[Tensor, "pair m"]) -> Sink:
    """A sink that keeps only the rank and probability of each row's target (``_score``)."""
    def put(pair, row, logits):
        r, p = _score(logits.float()[None], targets[row.cpu()])
        rank[pair.cpu(), row.cpu()], prob[pair.cpu(), row.cpu()] = r[0], p[0]
    return put


def backpatch_scores(
    model,
    clean: CleanRun,
    rows: Int[Tensor, " m"],
    pos: Int[Tensor, " m"],
    pairs: Sequence[Pair],
    donor: Int[Tensor, " m"],
    donor_pos: Int[Tensor, " m"],
    targets: Int[Tensor, " m"],
    reference: bool = False,
    chunk_bytes: int = READOUT_CHUNK_BYTES,
) -> tuple[Int[Tensor, "pair m"], Float[Tensor, "pair m"]]:
    """Rank (0 = top) and probability of ``targets[i]`` in the logits ``backpatch_logits`` gives (the reference's
    with ``reference=True``), read out and scored ``chunk_bytes`` of fp32 logits at a time: the extra memory is a
    few chunks whatever the number of pairs, rows and vocabulary, not pairs x rows x vocabulary."""
    rank = torch.empty(len(pairs), len(rows), dtype=torch.long)
    prob = torch.empty(len(pairs), len(rows))
    sweep = _reference_sweep if reference else _fast_sweep
    sweep(model, clean, rows, pos, pairs, donor, donor_pos, _scorer(targets.cpu(), rank, prob), chunk_bytes)
    return rank, prob


def backpatch_logits(
    model,
    clean: CleanRun,
    rows: Int[Tensor, " m"],
    pos: Int[Tensor, " m"],
    pairs: Sequence[Pair],
    donor: Int[Tensor, " m"],
    donor_pos: Int[Tensor, " m"],
    chunk_bytes: int = READOUT_CHUNK_BYTES,
    reference: bool = False,
) -> Float[Tensor, "pair m vocab"]:
    """Last-position logits of clean row ``rows[i]`` with resid_post(t)[pos[i]] := resid_post(s)[donor_pos[i]] of
    clean row ``donor[i]``, for each (s, t) in ``pairs`` (the fast path, or the plain per-pair implementation with
    ``reference=True``; all of them at once: pairs x rows x vocabulary fp32, so sweeps use ``backpatch_scores``)."""
    device = "cpu" if reference else clean.streams.device
    out = torch.empty(len(pairs), len(rows), model.cfg.d_vocab, device=device)
    sweep = _reference_sweep if reference else _fast_sweep
    sweep(model, clean, rows, pos, pairs, donor, donor_pos, _keep(out), chunk_bytes)
    return out


#: ``backpatch_logits`` by the plain per-pair implementation (``_reference_sweep``).
backpatch_reference_logits = functools.partial(backpatch_logits, reference=True)


# fast path ----------------------------------------------------------------------------------------------------
def _fast_sweep(model, clean: CleanRun, rows: Int[Tensor, " m"], pos: Int[Tensor, " m"], pairs: Sequence[Pair],
                donor: Int[Tensor, " m"], donor_pos: Int[Tensor, " m"], put: Sink, chunk_bytes: int) -> None:
    """The patched last-position logits of every (pair, row) (see ``backpatch_logits``), handed to ``put`` in
    chunks of ``chunk_bytes``. The partial forwards return final residuals; only ``_read_out`` unembeds.

    Rows sharing t run together from block t+1 on positions >= min(pos), over the clean prefix keys/values.
    """
    device = clean.streams.device
    rows, pos, donor, donor_pos = (x.cpu() for x in (rows, pos, donor, donor_pos))
    m, start = len(rows), int(pos.min())
    calls = kept_block_args(model)  # every t's rows are a tile of the same m rows: one capture serves all
    by_t: dict[int, list[int]] = {}
    for i, (_, t) in enumerate(pairs):
        by_t.setdefault(t, []).append(i)
    last_only = start == clean.enc.tokens.shape[1] - 1  # every row patched at its last position
    if last_only and len(by_t) > 1 and _layerwise(model, clean, rows, donor, donor_pos, pairs, by_t, put,
                                                  chunk_bytes):
        return
    for t, idx in by_t.items():
        if last_only and len(idx) > 1 and _variants(model, clean, rows, donor, donor_pos, pairs, idx, put,
                                                    chunk_bytes):
            continue
        k = torch.arange(m).repeat(len(idx))  # pair-major: entry e = pair idx[e // m], row e % m
        src = torch.tensor([pairs[i][0] for i in idx]).repeat_interleave(m)
        pair = torch.tensor(idx).repeat_interleave(m)
        step = _rows_per_call(model, clean, t, start)
        for a in range(0, len(k), step):
            e, s = k[a : a + step], src[a : a + step]
            resid = clean.streams[t + 1][rows[e].to(device), start:].clone()
            resid[torch.arange(len(e)), (pos[e] - start).to(device)] = clean.streams[s + 1, donor[e], donor_pos[e]]
            hidden = _finish(model, resid, t, clean, rows[e], start, calls)
            _read_out(model, hidden, pair[a : a + step], e, put, chunk_bytes)


def _rows_per_call(model, clean: CleanRun, t: int, start: int) -> int:
    """Rows whose expanded prefix keys/values (layers > t) fit in ``CACHE_BUDGET``."""
    n_cached = max(1, model.cfg.n_layers - 1 - t)
    row_bytes = 2 * n_cached * max(1, start) * clean.streams.shape[-1] * clean.streams.element_size()
    return max(1, CACHE_BUDGET // row_bytes)


def _read_variants(model, hidden: Float[Tensor, "n k d_model"], pair: list[int], row0: int, put: Sink,
                   chunk_bytes: int) -> None:
    """``_read_out`` of variant column j of row i as entry (pair[j], row0 + i)."""
    n, k = hidden.shape[:2]
    pairs = torch.tensor(pair).repeat(n)
    rows = (row0 + torch.arange(n)).repeat_interleave(k)
    _read_out(model, rearrange(hidden, "n k d -> (n k) d"), pairs, rows, put, chunk_bytes)


def _variants(model, clean: CleanRun, rows, donor, donor_pos, pairs: Sequence[Pair], idx: list[int], put: Sink,
              chunk_bytes: int) -> bool:
    """Pairs ``idx`` (one t) at the last position as variant tokens of each row (``variant_tokens``): the
    prefix is held once per row instead of once per (row, s). False (nothing handed on) where the model's check
    fails.
    """
    device = clean.streams.device
    t, start = pairs[idx[0]][1], clean.enc.tokens.shape[1] - 1
    sources = torch.tensor([pairs[i][0] for i in idx], device=device)
    donor, donor_pos = donor.to(device), donor_pos.to(device)
    step = _rows_per_call(model, clean, t, start)
    for a in range(0, len(rows), step):
        r = rows[a : a + step].to(device)
        variants = clean.streams[sources[None] + 1, donor[a : a + step, None], donor_pos[a : a + step, None]]
        mask, cache = clean.enc.attention_mask[r], prefix_cache(clean.kv, r, start, t + 1)
        if a == 0:  # checked once per model and condition, on 4 rows
            cause = variant_path_cause(model, variants[:4], t + 1, mask[:4],
                                       prefix_cache(clean.kv, r[:4], start, t + 1))
            if cause is not None:
                warn_once(model, "back-patching: variant tokens (one prefix copy per row)", cause,
                          "running one row per variant instead (same results, more memory)")
                return False
        hidden = run_variants(model, variants, t + 1, mask, cache, unembed=False)
        _read_variants(model, hidden, idx, a, put, chunk_bytes)
    return True


def _layerwise(model, clean: CleanRun, rows, donor, donor_pos, pairs: Sequence[Pair], by_t: dict[int, list[int]],
               put: Sink, chunk_bytes: int) -> bool:
    """Every pair at the last position in ONE pass over the layers: block l runs once, on the variant tokens of
    every t < l together (the pairs of target t join as new variants before block t+1), and the unembedding runs
    once at the end (in chunks). Per-t calls read block l's weights once per t < l and the unembedding once per t;
    at d_model 4096 those one-token calls are bound by reading the weights, so this reads each block once per batch
    (issue 19). False (nothing handed on) where the variant path does not hold for this model."""
    from mhop_lens.analyses.variant_tokens import variant_args

    device = clean.streams.device
    n_layers, start = model.cfg.n_layers, clean.enc.tokens.shape[1] - 1
    ts = sorted(by_t)
    donor, donor_pos = donor.to(device), donor_pos.to(device)
    calls = kept_block_args(model, variant_args)
    order = [i for t in ts for i in by_t[t]]  # variant columns: pairs grouped by t, t ascending
    step = _rows_per_call(model, clean, ts[0], start)
    for a in range(0, len(rows), step):
        r = rows[a : a + step].to(device)
        d, dp = donor[a : a + step, None], donor_pos[a : a + step, None]
        mask, cache = clean.enc.attention_mask[r], prefix_cache(clean.kv, r, start, ts[0] + 1)
        if a == 0:
            first = torch.tensor([pairs[i][0] for i in by_t[ts[0]]], device=device)
            probe = clean.streams[first[None] + 1, d[:4], dp[:4]]
            if variant_path_cause(model, probe, ts[0] + 1, mask[:4],
                                  prefix_cache(clean.kv, r[:4], start, ts[0] + 1)) is not None:
                return False  # the per-t variant path below checks the same and warns with the cause
        hidden = None
        with torch.no_grad():
            for layer in range(ts[0] + 1, n_layers + 1):  # t = L-1 (s = t only) joins the final residuals
                if layer - 1 in by_t:
                    src = torch.tensor([pairs[i][0] for i in by_t[layer - 1]], device=device)
                    new = clean.streams[src[None] + 1, d, dp]
                    hidden = new if hidden is None else torch.cat([hidden, new], dim=1)
                if layer == n_layers:
                    break
                hidden = call_block(model, layer, hidden, *calls(hidden.shape[1], mask, cache))
            _read_variants(model, hidden, order, a, put, chunk_bytes)  # the model's logit scale / soft cap
    return True


def _finish(model, resid, t: int, clean: CleanRun, rows: Tensor, start: int, calls: BlockArgs
            ) -> Float[Tensor, "n d_model"]:
    """Final last-position residual of ``resid`` (positions >= start of ``rows``) entering block t+1."""
    device = clean.streams.device
    if t + 1 >= model.cfg.n_layers:  # the final residual: only the unembedding is left
        return resid[:, -1]
    mask = clean.enc.attention_mask[rows.to(device)]
    cache = prefix_cache(clean.kv, rows.to(device), start, t + 1)
    return run_from(model, resid, t + 1, mask, cache, block_args=calls, last_only=True, unembed=False)[:, -1]


# reference ----------------------------------------------------------------------------------------------------
def _reference_sweep(model, clean: CleanRun, rows: Int[Tensor, " m"], pos: Int[Tensor, " m"], pairs: Sequence[Pair],
                     donor: Int[Tensor, " m"], donor_pos: Int[Tensor, " m"], put: Sink, chunk_bytes: int) -> None:
    """The plain per-pair implementation: per (s, t) and chunk of rows one batched full forward with
    ``replace_positions``, unembedding only the last position (``forward.logits_at``)."""
    rows, pos, donor, donor_pos = (x.cpu() for x in (rows, pos, donor, donor_pos))
    step = _chunk_rows(model, chunk_bytes)
    for i, (s, t) in enumerate(pairs):
        for a in range(0, len(rows), step):
            part = torch.arange(a, min(a + step, len(rows)))
            values = clean.resid_post(s)[donor[part], donor_pos[part]][:, None]
            fn = interventions.replace_positions(values, pos[part, None])
            with torch.no_grad():
                logits = logits_at(model, clean.enc.select(rows[part]), [(hooks.resid(t, "post"), fn)])
            put(torch.full((len(part),), i), part, logits)


# the sweep ----------------------------------------------------------------------------------------------------
def run_backpatch(
    model,
    queries: Sequence[TwoHopQuery],
    positions: Sequence[str] = ("last",),
    control: bool = True,
    batch_size: int = 32,
    criterion: str = "first-token",
    pairs: Sequence[Pair] | None = None,
    donors: Sequence[TwoHopQuery] | None = None,
    seed: int = 0,
    reference: bool = False,
    progress: bool = True,
    max_new_tokens: int = STUDY_NEW_TOKENS,
) -> pd.DataFrame:
    """One row per (qid, position, s, t, donor) with the answer's rank, probability and correctness.

    ``donors[i]`` is query i's shuffled donor (default: a seeded derangement of ``queries``). ``reference=True``
    uses the per-pair full-forward implementation and never enters the fast machinery. Otherwise the fast path runs
    where ``partial_forward.fast_path_cause`` finds it exact for this model and batch condition, else (or on any
    exception in it) the reference, with one warning naming the cause; ``frame.attrs["path"]`` says which ran
    (the last batch's). ``criterion`` (module docstring): ``first-token`` fills ``correct`` / ``clean_correct``;
    ``generate`` and ``both`` add ``correct_generate``, ``clean_correct_generate`` and ``generation``
    (``max_new_tokens`` greedy tokens, the study's 10); ``frame.attrs["criterion"]`` says which.
    """
    if criterion not in CRITERIA:
        raise MhopLensError(f"criterion {criterion!r} is not known; use one of {', '.join(CRITERIA)}.")
    queries = list(queries)
    if control and donors is None:
        donors = [queries[j] for j in derangement(len(queries), seed)]
    pairs = list(pairs) if pairs is not None else all_pairs(model.cfg.n_layers)
    frames, path = [], "reference"
    for a in tqdm(range(0, len(queries), batch_size), desc="backpatch", unit="batch", disable=not progress):
        batch = queries[a : a + batch_size]
        batch_donors = list(donors[a : a + batch_size]) if control else []
        index = {q.id: i for i, q in enumerate(batch)}
        extra = []  # donors outside this batch: encoded once each, so the clean run holds every prompt once
        for d in batch_donors:
            if d.id not in index:
                index[d.id] = len(batch) + len(extra)
                extra.append(d)
        enc = encode(model, [q.prompt for q in batch + extra])
        every = batch + extra
        targets = first_token_ids(model, [q.answer_prefix + q.e3 for q in every])
        n = len(batch)
        rows = torch.arange(n).repeat(2 if control else 1)
        donor = torch.tensor(list(range(n)) + [index[d.id] for d in batch_donors])
        pos_of = [positions_of(enc, every, position) for position in positions]

        def compute(fast: bool, enc=enc, rows=rows, donor=donor, pos_of=pos_of, targets=targets):
            clean = clean_run(model, enc) if fast else reference_run(model, enc)
            return clean, [backpatch_scores(model, clean, rows, pos[rows], pairs, donor, pos[donor], targets[rows],
                                            reference=not fast) for pos in pos_of]

        (clean, patched), path = dispatch(model, enc, "back-patching", lambda: compute(True), lambda: compute(False),
                                          use_reference=reference)
        clean_rank, _ = _score(clean.last_logits[None], targets)
        for position, pos, (rank, prob) in zip(positions, pos_of, patched, strict=True):
            if criterion != "first-token":
                ok, texts = backpatch_generations(model, clean, every, rows, pos[rows], pairs, donor, pos[donor],
                                                  max_new_tokens)
                clean_ok = _clean_generations(model, clean, every, n, max_new_tokens)
            for i, (kind, who) in enumerate(zip(DONORS, (batch, batch_donors)[: 2 if control else 1], strict=False)):
                part = slice(i * n, (i + 1) * n)
                part_frame = _rows(batch, who, position, pairs, kind, rank[:, part], prob[:, part], clean_rank[0, :n])
                if criterion != "first-token":  # pair-major like _rows
                    part_frame["correct_generate"] = ok[:, part].reshape(-1).numpy()
                    part_frame["clean_correct_generate"] = np.tile(clean_ok, len(pairs))
                    part_frame["generation"] = [text for pair_texts in texts for text in pair_texts[part]]
                frames.append(part_frame)
    frame = pd.concat(frames, ignore_index=True)
    frame.attrs["path"] = path
    frame.attrs["criterion"] = criterion
    return frame


# the study's criterion: patched generation ----------------------------------------------------------------------
def e3_answers(query: TwoHopQuery) -> list[str]:
    """e3's label and aliases longer than one character (the study's ``get_answers``)."""
    return answer_aliases(query, "e3")


def backpatch_generations(model, clean: CleanRun, every: Sequence[TwoHopQuery], rows: Int[Tensor, " m"],
                          pos: Int[Tensor, " m"], pairs: Sequence[Pair], donor: Int[Tensor, " m"],
                          donor_pos: Int[Tensor, " m"], max_new_tokens: int = STUDY_NEW_TOKENS
                          ) -> tuple[Bool[Tensor, "pair m"], list[list[str]]]:
    """Per (s, t) pair and row: does the greedy generation of clean row ``rows[i]``, with resid_post(t)[pos[i]]
    := resid_post(s)[donor_pos[i]] of row ``donor[i]`` in the prompt pass, mention e3 (``e3_answers``)? And the
    generated texts."""
    rows, pos, donor, donor_pos = (x.cpu() for x in (rows, pos, donor, donor_pos))
    sub = clean.enc.select(rows)
    answers = [e3_answers(every[int(r)]) for r in rows]
    ok, texts = [], []
    for s, t in pairs:
        values = clean.resid_post(s)[donor.to(clean.streams.device), donor_pos.to(clean.streams.device)][:, None]
        fn = interventions.replace_positions(values, pos[:, None])
        got = decode_new(model, generate_patched(model, sub, [(hooks.resid(t, "post"), fn)], max_new_tokens))
        ok.append([mentions_any(text, a) for text, a in zip(got, answers, strict=True)])
        texts.append(got)
    return torch.tensor(ok, dtype=torch.bool), texts


def _clean_generations(model, clean: CleanRun, every: Sequence[TwoHopQuery], n: int, max_new_tokens: int):
    """Does the unpatched greedy generation of each of the first ``n`` rows mention e3?"""
    got = decode_new(model, generate_patched(model, clean.enc.select(torch.arange(n)), [], max_new_tokens))
    return np.array([mentions_any(text, e3_answers(q)) for text, q in zip(got, every[:n], strict=True)])


def _score(logits: Float[Tensor, "pair batch vocab"], targets: Int[Tensor, " batch"]):
    """Rank (0 = top) and probability of each row's target token."""
    targets = targets.to(logits.device)
    target_logit = logits.gather(-1, targets.expand(logits.shape[0], -1)[..., None])
    rank = (logits > target_logit).sum(-1)
    prob = logits.softmax(-1).gather(-1, targets.expand(logits.shape[0], -1)[..., None])[..., 0]
    return rank.cpu(), prob.detach().float().cpu()


def _rows(batch, donors, position, pairs, kind, rank, prob, clean_rank) -> pd.DataFrame:
    n, n_pairs = len(batch), len(pairs)
    return pd.DataFrame({
        "qid": [q.id for q in batch] * n_pairs,
        "position": position,
        "s": [s for s, _ in pairs for _ in range(n)],
        "t": [t for _, t in pairs for _ in range(n)],
        "donor": kind,
        "donor_qid": [q.id for q in donors] * n_pairs,
        "rank": rank.reshape(-1).numpy(),
        "prob": prob.reshape(-1).numpy(),
        "correct": (rank == 0).reshape(-1).numpy(),
        "clean_rank": clean_rank.repeat(n_pairs).numpy(),
        "clean_correct": (clean_rank == 0).repeat(n_pairs).numpy(),
    })


# summaries ----------------------------------------------------------------------------------------------------
def _columns(frame: pd.DataFrame, criterion: str) -> tuple[str, str]:
    """(patched, clean) correctness columns of ``criterion``."""
    if criterion == "first-token":
        return "correct", "clean_correct"
    if criterion == "generate" and "correct_generate" in frame.columns:
        return "correct_generate", "clean_correct_generate"
    raise MhopLensError(f"no {criterion!r} verdicts in this back-patching frame; run it with criterion='generate' "
                        "or 'both' (`mhop-lens backpatch --criterion both`), or summarise with 'first-token'.")


def criteria_of(frame: pd.DataFrame) -> list[str]:
    """The criteria whose verdicts ``frame`` holds."""
    return ["first-token", "generate"] if "correct_generate" in frame.columns else ["first-token"]


def _status(frame: pd.DataFrame, evaluation: pd.DataFrame | None, criterion: str = "first-token") -> pd.Series:
    """Per qid: 'incorrect' (a failure to fix), 'correct' (could be broken) or other (ignored)."""
    if evaluation is None:
        clean = frame.drop_duplicates("qid").set_index("qid")[_columns(frame, criterion)[1]].astype(bool)
        return clean.map({True: "correct", False: "incorrect"})
    key = "qid" if "qid" in evaluation.columns else "id"
    if "subset" not in evaluation.columns:
        raise MhopLensError("the evaluation frame has no 'subset' column (correct / incorrect); pass the output "
                            "of mhop_lens.evaluate or omit it to use clean first-token correctness.")
    return evaluation.drop_duplicates(key).set_index(key)["subset"]


def summarize_backpatch(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None, by: str = "pair",
                        criterion: str = "first-token") -> pd.DataFrame:
    """Fix rate among failures and break rate among correct queries, with the shuffled control beside.

    ``by="pair"``: one row per (position, s, t). ``by="query"``: one row per (qid, position) with whether any
    pair fixes it, which pairs, and the control's answer. Failures/correct come from ``evaluation``'s ``subset``
    column when given ("evaluate-subset"), else from the clean answer under ``criterion`` ("clean-miss"); a
    patched answer counts as correct under ``criterion`` too. Columns ``criterion`` and ``failures`` say which.
    """
    col, _ = _columns(frame, criterion)
    status = _status(frame, evaluation, criterion)
    f = frame.assign(status=frame["qid"].map(status), correct=frame[col].astype(bool))
    tags = {"criterion": criterion, "failures": FAILURES[0] if evaluation is not None else FAILURES[1]}
    if by == "query":
        return _per_query(f).assign(**tags)
    if by != "pair":
        raise MhopLensError(f"by must be 'pair' or 'query', not {by!r}.")
    out = []
    for (position, s, t), g in f.groupby(["position", "s", "t"], sort=True):
        row = {"position": position, "s": s, "t": t}
        for kind, prefix in (("self", ""), ("shuffled", "control_")):
            d = g[g["donor"] == kind]
            fail, ok = d[d["status"] == "incorrect"], d[d["status"] == "correct"]
            row[f"{prefix}fix_rate"] = fail["correct"].mean() if len(fail) else float("nan")
            row[f"{prefix}break_rate"] = (~ok["correct"].astype(bool)).mean() if len(ok) else float("nan")
            if kind == "self":
                row["n_failures"], row["n_correct"] = fail["qid"].nunique(), ok["qid"].nunique()
        out.append(row)
    return pd.DataFrame(out).assign(**tags)


def _per_query(f: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (qid, position), g in f.groupby(["qid", "position"], sort=True):
        row = {"qid": qid, "position": position, "status": g["status"].iloc[0]}
        for kind, prefix in (("self", ""), ("shuffled", "control_")):
            d = g[(g["donor"] == kind) & g["correct"].astype(bool)]
            row[f"{prefix}fixed_by_any"] = bool(len(d)) if row["status"] == "incorrect" else False
            row[f"{prefix}n_pairs_correct"] = len(d)
            row[f"{prefix}pairs_correct"] = ";".join(f"{s}>{t}" for s, t in zip(d["s"], d["t"], strict=True))
        broken = g[(g["donor"] == "self") & ~g["correct"].astype(bool)]
        row["n_pairs_breaking"] = len(broken) if row["status"] == "correct" else 0
        out.append(row)
    return pd.DataFrame(out)


def fix_table(frame: pd.DataFrame, evaluation: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's headline: share of failures some (s > t) pair fixes, per position x criterion x failure
    definition, with the shuffled-donor control and the best single pair beside.

    One row per (position, criterion, failures); failure definitions: ``clean-miss`` always, ``evaluate-subset``
    when ``evaluation`` is given. Columns: ``n_failures, n_fixed, fix_rate`` (fixed by any pair), ``n_control_fixed,
    control_fix_rate`` (the same with shuffled donors), ``best_pair`` ("s>t"), ``best_pair_fix_rate,
    best_pair_control_fix_rate``, ``n_correct, n_broken`` (correct queries some pair breaks), ``n_queries``.
    """
    out = []
    for criterion in criteria_of(frame):
        for evaluated in ([evaluation] if evaluation is not None else []) + [None]:
            pairs = summarize_backpatch(frame, evaluated, "pair", criterion)
            per_query = summarize_backpatch(frame, evaluated, "query", criterion)
            for position in sorted(pd.unique(frame["position"]), key=lambda p: (p != "t1", p != "last", p)):
                q = per_query[per_query["position"] == position]
                fail, ok = q[q["status"] == "incorrect"], q[q["status"] == "correct"]
                p = pairs[pairs["position"] == position]
                best = p.loc[p["fix_rate"].idxmax()] if len(fail) and p["fix_rate"].notna().any() else None
                out.append({
                    "position": position, "criterion": criterion, "failures": per_query["failures"].iloc[0],
                    "n_failures": len(fail), "n_fixed": int(fail["fixed_by_any"].sum()),
                    "fix_rate": fail["fixed_by_any"].mean() if len(fail) else float("nan"),
                    "n_control_fixed": int(fail["control_fixed_by_any"].sum()),
                    "control_fix_rate": fail["control_fixed_by_any"].mean() if len(fail) else float("nan"),
                    "best_pair": f"{best['s']}>{best['t']}" if best is not None else "",
                    "best_pair_fix_rate": best["fix_rate"] if best is not None else float("nan"),
                    "best_pair_control_fix_rate": best["control_fix_rate"] if best is not None else float("nan"),
                    "n_correct": len(ok), "n_broken": int((ok["n_pairs_breaking"] > 0).sum()),
                    "n_queries": len(q),
                })
    return pd.DataFrame(out)


def format_fix_table(table: pd.DataFrame) -> str:
    """``fix_table`` as a markdown table, every rate with its count and denominator."""
    def pct(k, n):
        return f"{k}/{n} = {k / n:.1%}" if n else "n/a (no failures)"

    lines = ["| position | criterion | failures | fixed by some (s, t) | shuffled control | best pair (control) |",
             "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        best = (f"{r.best_pair}: {r.best_pair_fix_rate:.1%} ({r.best_pair_control_fix_rate:.1%})"
                if r.best_pair else "-")
        lines.append(f"| {r.position} | {r.criterion} | {r.failures} (n = {r.n_failures}) | "
                     f"{pct(r.n_fixed, r.n_failures)} | {pct(r.n_control_fixed, r.n_failures)} | {best} |")
    return "\n".join(lines)
