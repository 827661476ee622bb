"""Activation patching (clean -> corrupted), many sites per forward: residual by (layer, position), or per head.

Sites follow TransformerLens's ``transformer_lens.patching``: ``"resid"`` patches ``blocks.{l}.hook_resid_pre``
at one position (as ``get_act_patch_resid_pre``), ``"heads"`` patches one head's ``attn.hook_z`` at every position
(as ``get_act_patch_attn_head_out_all_pos``). The metric is read at the last position of the patched corrupted
run; the default is the logit difference clean answer - corrupted answer.

Fast path: clean and corrupted runs are cached once; the rows of many sites go along the batch dimension; a
patch at (l, p) starts at block l (``partial_forward.run_from``) and recomputes only positions >= p over the
corrupted run's keys/values of the prefix. Reference (``patching_reference``): one batched full forward per site.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses.partial_forward import (
    CleanRun,
    cache_of,
    check_fast_path,
    clean_run,
    kept_block_args,
    prefix_cache,
    run_from,
)
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import last_logits
from mhop_lens.tokens import encode, first_token_ids

Metric = Callable[[Float[Tensor, "n vocab"], Int[Tensor, " n"], Int[Tensor, " n"]], Float[Tensor, " n"]]
SITES = ("resid", "heads")
#: Rows (heads x pairs) of one forward in the head sweep.
ROWS_PER_CALL = 512
#: Residual sweep: the fixed cost of one forward, in token-equivalents, at least. Positions p0, p0+1, ... may share
#: one forward (all recomputed from p0); the grouping minimises calls x overhead + tokens recomputed. On a CPU a
#: block over a few tokens is bound by reading its weights (GPT-2-small: 13 tokens cost 6.7 ms, 416 cost 70 ms),
#: so a tiny batch gains from recomputing a few unchanged positions in one larger call. See ``call_overhead``.
CALL_OVERHEAD = 32
#: Clean and corrupted activations closer than this, relative to the largest entry of the vector, count as equal
#: (rows of one batch can round differently in float32, ~1e-7 relative; a true difference is far larger).
SAME_RTOL = 1e-5
#: Most tokens (rows x new positions) one forward of the residual sweep may hold.
MAX_TOKENS_PER_CALL = 8192


def logit_diff(logits: Float[Tensor, "n vocab"], clean_ids: Int[Tensor, " n"], corrupt_ids: Int[Tensor, " n"]
               ) -> Float[Tensor, " n"]:
    """Logit of the clean answer minus logit of the corrupted answer."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, clean_ids.to(logits.device)] - logits[rows, corrupt_ids.to(logits.device)]


def counterfactual_pairs(queries: Sequence[TwoHopQuery], seed: int = 0) -> list[tuple[TwoHopQuery, TwoHopQuery]]:
    """(clean, corrupted) pairs with the same (r1, r2) and a different e1 whose answer e3 differs."""
    groups: dict[tuple[str, str], list[TwoHopQuery]] = {}
    for q in queries:
        groups.setdefault((q.r1, q.r2), []).append(q)
    rng = random.Random(seed)
    out = []
    for q in queries:
        others = [o for o in groups[(q.r1, q.r2)] if o.e1 != q.e1 and o.e3 != q.e3]
        if others:
            out.append((q, rng.choice(others)))
    if not out:
        raise MhopLensError("no counterfactual pairs: no two queries share (r1, r2) with different answers.")
    return out


def prepare(model, clean_prompts: Sequence[str], corrupt_prompts: Sequence[str], sites: str
            ) -> tuple[CleanRun, CleanRun]:
    """Cached clean and corrupted runs, encoded together so positions align; pairs must have equal lengths."""
    n = len(clean_prompts)
    enc = encode(model, list(clean_prompts) + list(corrupt_prompts))
    if not torch.equal(enc.lengths[:n], enc.lengths[n:]):
        bad = int((enc.lengths[:n] != enc.lengths[n:]).nonzero()[0])
        raise MhopLensError(f"pair {bad}: the clean and corrupted prompts have different token counts "
                            f"({clean_prompts[bad]!r} vs {corrupt_prompts[bad]!r}); activation patching by "
                            "position needs aligned prompts (same template, entities of the same token length).")
    names = [hooks.head(layer, "z") for layer in range(model.cfg.n_layers)] if sites == "heads" else []
    both = clean_run(model, enc, names)
    split = []
    for part in (torch.arange(n), torch.arange(n, 2 * n)):
        dev = part.to(both.streams.device)
        split.append(CleanRun(enc.select(part), both.streams[:, dev], _kv_rows(both.kv, dev), both.last_logits[dev],
                              {k: v[dev] for k, v in both.acts.items()}))
    return split[0], split[1]


def _kv_rows(kv, rows):
    return cache_of([(entry.keys[rows], entry.values[rows]) for entry in kv.layers])


def _head_hook(clean_z: Tensor, heads: Tensor):
    """hook_z: row r takes head heads[r] from clean_z[r] at every position."""

    def hook(z: Tensor, hook=None) -> Tensor:
        z = z.clone()
        rows = torch.arange(z.shape[0], device=z.device)
        z[rows, :, heads] = clean_z[rows, -z.shape[1]:, heads].to(z.dtype)
        return z

    return hook


# fast path ----------------------------------------------------------------------------------------------------
def patch_logits(model, clean: CleanRun, corrupt: CleanRun, sites: str, layers: Sequence[int],
                 rows_per_call: int = ROWS_PER_CALL, overhead: int | None = None, skip_unchanged: bool = True
                 ) -> dict[tuple[int, int], Float[Tensor, "n vocab"]]:
    """Last-position logits of the corrupted run with one clean site patched: {(layer, position|head): logits}.

    With ``skip_unchanged`` a site needs no forward when, in every pair, clean and corrupted are equal there (the
    BOS position, a token both prompts share at the embeddings, a head reading nothing that differs: the patch is
    the identity, the result the corrupted run) or it is the only position where the layer differs (the patch
    restores the clean run, e.g. the swapped token at the embeddings). A head patch recomputes only from the
    first position where that layer's heads differ, and in the last block only the last position (a head's output
    changes no keys/values of its own layer, and nothing after the last block reads the other positions).
    ``overhead``: see ``call_overhead`` (its default).
    """
    n, width = corrupt.enc.tokens.shape
    dev = corrupt.streams.device
    out = {}
    pairs = torch.arange(n)
    calls = kept_block_args(model)  # the same row tiles recur in every layer: capture their block arguments once
    if sites == "resid":
        cost = call_overhead(model) if overhead is None else overhead
        for layer in layers:
            run = _skip_unchanged(out, clean, corrupt, sites, layer, skip_unchanged)[0]
            for ps in position_groups(n, width, cost, positions=run.nonzero()[:, 0].tolist()):
                p0 = int(ps[0])
                rows = pairs.repeat(len(ps))
                pos = ps.repeat_interleave(n)
                resid = corrupt.streams[layer][rows.to(dev), p0:].clone()
                resid[torch.arange(len(rows)), (pos - p0).to(dev)] = clean.streams[layer][rows.to(dev), pos.to(dev)]
                cache = prefix_cache(corrupt.kv, rows.to(dev), p0, layer)
                logits = run_from(model, resid, layer, corrupt.enc.attention_mask[rows.to(dev)], cache,
                                  block_args=calls, last_only=True)[:, -1]
                for i, p in enumerate(ps.tolist()):
                    out[(layer, p)] = logits[i * n : (i + 1) * n]
    else:
        step = max(1, rows_per_call // n)
        for layer in layers:
            name = hooks.head(layer, "z")
            run, p0 = _skip_unchanged(out, clean, corrupt, sites, layer, skip_unchanged)
            if layer == model.cfg.n_layers - 1:  # the last block: only the read-out position matters
                p0 = width - 1
            todo = run.nonzero()[:, 0]
            for a in range(0, len(todo), step):
                hs = todo[a : a + step]
                rows = pairs.repeat(len(hs))
                heads = hs.repeat_interleave(n)
                fn = _head_hook(clean.acts[name][rows.to(dev)], heads.to(dev))
                logits = run_from(model, corrupt.streams[layer][rows.to(dev), p0:], layer,
                                  corrupt.enc.attention_mask[rows.to(dev)],
                                  prefix_cache(corrupt.kv, rows.to(dev), p0, layer),
                                  [(name, fn)], block_args=calls, last_only=True)[:, -1]
                for i, h in enumerate(hs.tolist()):
                    out[(layer, h)] = logits[i * n : (i + 1) * n]
    return out


def _skip_unchanged(out: dict, clean: CleanRun, corrupt: CleanRun, sites: str, layer: int, skip_unchanged: bool
                    ) -> tuple[Bool[Tensor, " site"], int]:
    """Fill ``out`` for the sites of ``layer`` that need no forward (the clean run's logits where the patch
    restores it, else the corrupted run's); return which sites do and where their recompute may start."""
    run, as_clean, start = changed_sites(clean, corrupt, sites, layer, skip_unchanged)
    pick = as_clean.to(corrupt.last_logits.device)[..., None]
    for i in (~run).nonzero()[:, 0].tolist():
        out[(layer, i)] = torch.where(pick[i], clean.last_logits, corrupt.last_logits)
    return run, start


def call_overhead(model) -> int:
    """Token-equivalents of one partial forward's fixed cost for ``position_groups`` (deterministic, from the
    shape). A block call costs ~0.7 ms of Python here, the compute of ~128 tokens of a d_model-128 block (the
    organism, 32 pairs, interleaved medians: overhead 128 took 42 ms, 32 took 58 ms), fewer for bigger blocks,
    down to ``CALL_OVERHEAD`` where reading the weights dominates small calls."""
    return max(CALL_OVERHEAD, (1 << 21) // model.cfg.d_model**2)


def changed_sites(clean: CleanRun, corrupt: CleanRun, sites: str, layer: int, skip_unchanged: bool = True
                  ) -> tuple[Bool[Tensor, " site"], Bool[Tensor, "site batch"], int]:
    """Which sites of ``layer`` (positions for ``"resid"``, heads for ``"heads"``) need a forward, and what the
    others give without one.

    Returns ``run`` (per site), ``as_clean`` (per site and pair, for sites not run: True where the patch turns the
    corrupted layer into the clean one, so the result is the clean run; False where clean and corrupted are equal
    at the site, so the patch is the identity) and the first position where anything of the layer differs
    (positions before it keep the corrupted keys/values). Without ``skip_unchanged``: every site, from position 0.
    """
    if sites == "resid":  # [batch pos d_model], a site is a position
        a, b, site = clean.streams[layer], corrupt.streams[layer], 1
    else:  # [batch pos head d_head], a site is a head
        name = hooks.head(layer, "z")
        a, b, site = clean.acts[name], corrupt.acts[name], 2
    n, n_sites = a.shape[0], a.shape[site]
    if not skip_unchanged:
        return torch.ones(n_sites, dtype=torch.bool), torch.zeros(n_sites, n, dtype=torch.bool), 0
    differ = ((a - b).abs().amax(-1) > SAME_RTOL * b.abs().amax(-1)).cpu()  # [batch pos] or [batch pos head]
    positions = differ if sites == "resid" else differ.any(-1)
    start = int(positions.any(0).nonzero()[0, 0]) if positions.any() else a.shape[1]
    if sites == "resid":  # patching the only differing position of a pair restores its clean run
        as_clean = (differ & (differ.sum(1, keepdim=True) == 1)).T
        return (differ.T & ~as_clean).any(1), as_clean, start
    return differ.any(1).any(0), torch.zeros(n_sites, n, dtype=torch.bool), start


def position_groups(n: int, width: int, overhead: int = CALL_OVERHEAD,
                    max_tokens: int = MAX_TOKENS_PER_CALL, positions: Sequence[int] | None = None) -> list[Tensor]:
    """Runs of ``positions`` (default: all of ``range(width)``, sorted) patched in one forward each: the partition
    minimising ``calls * overhead + n * sum(group size * (width - group start))`` (recomputed tokens), by
    dynamic programming; a group of several positions holds at most ``max_tokens`` tokens."""
    ps = list(range(width)) if positions is None else sorted(positions)
    m = len(ps)
    best, cut = [0.0] * (m + 1), [m] * (m + 1)
    for i in range(m - 1, -1, -1):
        best[i] = float("inf")
        for j in range(i + 1, m + 1):
            tokens = n * (j - i) * (width - ps[i])
            if j > i + 1 and tokens > max_tokens:
                break
            cost = overhead + tokens + best[j]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups, i = [], 0
    while i < m:
        groups.append(torch.tensor(ps[i : cut[i]], dtype=torch.long))
        i = cut[i]
    return groups


# reference ----------------------------------------------------------------------------------------------------
def patching_reference(model, clean: CleanRun, corrupt: CleanRun, sites: str, layers: Sequence[int]
                       ) -> dict[tuple[int, int], Float[Tensor, "n vocab"]]:
    """One batched full forward of the corrupted prompts per site (TransformerLens's loop, with the mask)."""
    n, width = corrupt.enc.tokens.shape
    out = {}
    for layer in layers:
        for index in range(width if sites == "resid" else model.cfg.n_heads):
            if sites == "resid":
                name = hooks.resid(layer, "pre")
                value = clean.streams[layer][:, index]

                def fn(act, hook=None, value=value, p=index):
                    act = act.clone()
                    act[:, p] = value
                    return act
            else:
                name = hooks.head(layer, "z")
                value = clean.acts[name][:, :, index]

                def fn(act, hook=None, value=value, h=index):
                    act = act.clone()
                    act[:, :, h] = value
                    return act

            with torch.no_grad():
                out[(layer, index)] = last_logits(model, corrupt.enc, [(name, fn)])
    return out


# the sweep ----------------------------------------------------------------------------------------------------
def run_activation_patching(
    model,
    clean: Sequence[TwoHopQuery] | Sequence[str],
    corrupted: Sequence[TwoHopQuery] | Sequence[str],
    sites: str = "resid",
    metric: Metric = logit_diff,
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    reference: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (pair, layer, position) or (pair, layer, head) with the patched metric.

    ``clean`` / ``corrupted`` are queries (answers: first token of each e3) or prompts with ``answers`` =
    (clean answers, corrupted answers). Columns: pair, qid, corrupt_qid, site, layer, position|head, metric,
    clean_metric, corrupt_metric, recovered ((metric - corrupt) / (clean - corrupt)). ``frame.attrs["path"]``
    says whether the fast path or the reference ran.
    """
    if sites not in SITES:
        raise MhopLensError(f"sites must be one of {SITES}, not {sites!r}.")
    if len(clean) != len(corrupted):
        raise MhopLensError(f"{len(clean)} clean but {len(corrupted)} corrupted inputs; pass one of each per pair.")
    queries = bool(clean) and isinstance(clean[0], TwoHopQuery)
    if queries:
        prompts = ([q.prompt for q in clean], [q.prompt for q in corrupted])
        texts = ([q.answer_prefix + q.e3 for q in clean], [q.answer_prefix + q.e3 for q in corrupted])
        ids = ([q.id for q in clean], [q.id for q in corrupted])
    else:
        if answers is None:
            raise MhopLensError("prompts need answers=(clean answers, corrupted answers).")
        prompts, texts = (list(clean), list(corrupted)), answers
        ids = ([str(i) for i in range(len(clean))], [str(i) for i in range(len(clean))])
    good_ids = first_token_ids(model, texts[0])
    bad_ids = first_token_ids(model, texts[1])
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    frames, path = [], "reference"
    for a in tqdm(range(0, len(prompts[0]), batch_size), desc=f"patch {sites}", unit="batch", disable=not progress):
        part = slice(a, a + batch_size)
        c, x = prepare(model, prompts[0][part], prompts[1][part], sites)
        fast = not reference and check_fast_path(model, c.enc)
        path = "kv-partial" if fast else "reference"
        if not fast and not reference:
            warnings.warn("activation patching: the KV-reusing fast path does not reproduce this model's forward; "
                          "using the batched full-forward reference instead (slower, same results).", stacklevel=2)
        logits = (patch_logits if fast else patching_reference)(model, c, x, sites, layers)
        g, b = good_ids[part], bad_ids[part]
        clean_m, corrupt_m = metric(c.last_logits, g, b).cpu(), metric(x.last_logits, g, b).cpu()
        index = "position" if sites == "resid" else "head"
        keys, n = list(logits), len(g)
        value = metric(torch.cat(list(logits.values())), g.repeat(len(keys)), b.repeat(len(keys))).cpu()
        frames.append(pd.DataFrame({
            "pair": np.tile(np.arange(a, a + n), len(keys)), "qid": ids[0][part] * len(keys),
            "corrupt_qid": ids[1][part] * len(keys), "site": sites,
            "layer": np.repeat([layer for layer, _ in keys], n), index: np.repeat([i for _, i in keys], n),
            "metric": value.numpy(), "clean_metric": np.tile(clean_m.numpy(), len(keys)),
            "corrupt_metric": np.tile(corrupt_m.numpy(), len(keys)),
            "recovered": ((value - corrupt_m.repeat(len(keys))) / (clean_m - corrupt_m).repeat(len(keys))).numpy(),
        }))
    frame = pd.concat(frames, ignore_index=True).sort_values(["pair", "layer", index], kind="stable")
    frame = frame.reset_index(drop=True)
    frame.attrs["path"] = path
    return frame
