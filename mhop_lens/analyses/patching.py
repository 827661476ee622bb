"""Activation patching (clean -> corrupted), many sites per forward: residual by (layer, position), or per head.

Sites are TransformerLens act names and follow ``transformer_lens.patching``: ``"resid_pre"`` patches
``blocks.{l}.hook_resid_pre`` at one position (as ``get_act_patch_resid_pre``); ``"z"``, ``"q"``, ``"k"``, ``"v"``
patch one head's ``attn.hook_{site}`` at every position (as ``get_act_patch_attn_head_{out,q,k,v}_all_pos``) and
``"pattern"`` one head's attention pattern (as ``get_act_patch_attn_head_pattern_all_pos``). On grouped-query
models ``k`` / ``v`` sites are the key/value heads (``head`` then indexes the ``n_key_value_heads``), which
``transformer_lens.patching`` cannot patch. The old names ``"resid"`` and ``"heads"`` are accepted with a
deprecation warning. The metric is read at the last position of the patched corrupted run; the default is the
logit difference clean answer - corrupted answer.

Fast path: clean and corrupted runs are cached once; the rows of many sites go along the batch dimension; a
patch at (l, p) starts at block l (``partial_forward.run_from``) and recomputes only positions >= p over the
corrupted run's keys/values of the prefix. Reference (``patching_reference``): one batched full forward per site.
"""

from __future__ import annotations

import inspect
import random
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses.metrics import LogitDiff, Metric
from mhop_lens.analyses.partial_forward import (
    CleanRun,
    cache_of,
    clean_run,
    dispatch,
    kept_block_args,
    kv_layers,
    prefix_cache,
    reference_run,
    run_from,
)
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import last_logits
from mhop_lens.tokens import Encoded, encode, first_token_ids

#: The metric form of earlier releases, ``metric(logits, clean_ids, corrupt_ids)``; still accepted, deprecated.
OldMetric = Callable[[Float[Tensor, "n vocab"], Int[Tensor, " n"], Int[Tensor, " n"]], Float[Tensor, " n"]]
SITES = ("resid_pre", "z", "q", "k", "v", "pattern")
HEAD_SITES = ("z", "q", "k", "v", "pattern")
#: Names of earlier releases -> TransformerLens act names.
OLD_SITES = {"resid": "resid_pre", "heads": "z"}
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


def site_name(site: str) -> str:
    """The TransformerLens act name of a patching site (an old name is mapped, with a deprecation warning)."""
    return hooks.act_names([site], SITES, OLD_SITES, "activation patching", MhopLensError, stacklevel=4)[0]


def n_sites(model, site: str) -> int:
    """Heads a head site has: key/value heads for ``k`` / ``v`` (grouped-query attention), else query heads."""
    return hooks.n_kv_heads(model) if site in ("k", "v") else model.cfg.n_heads


def site_acts(run: CleanRun, site: str, layer: int) -> Float[Tensor, "batch pos head ..."]:
    """A head site's cached activation with positions on axis 1 and heads on axis 2 (the pattern's query
    positions; its key axis stays last)."""
    act = run.acts[hooks.head(layer, site)]
    return rearrange(act, "b head query key -> b query head key") if site == "pattern" else act


def logit_diff(logits: Float[Tensor, "n vocab"], clean_ids: Int[Tensor, " n"], corrupt_ids: Int[Tensor, " n"]
               ) -> Float[Tensor, " n"]:
    """Logit of the clean answer minus logit of the corrupted answer (the ``OldMetric`` form; the default metric
    is now ``metrics.LogitDiff`` of the same ids)."""
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


def prepare(model, clean_prompts: Sequence[str], corrupt_prompts: Sequence[str], sites: str, fast: bool = True
            ) -> tuple[CleanRun, CleanRun]:
    """Cached clean and corrupted runs, encoded together so positions align; pairs must have equal lengths.
    ``fast=False``: plain forwards without any KV cache (``partial_forward.reference_run``)."""
    return prepared(model, encode_pairs(model, clean_prompts, corrupt_prompts), sites, fast)


def encode_pairs(model, clean_prompts: Sequence[str], corrupt_prompts: Sequence[str]) -> Encoded:
    """Clean then corrupted prompts in one padded batch; raises when a pair's token counts differ."""
    n = len(clean_prompts)
    enc = encode(model, list(clean_prompts) + list(corrupt_prompts))
    if not torch.equal(enc.lengths[:n], enc.lengths[n:]):
        bad = int((enc.lengths[:n] != enc.lengths[n:]).nonzero()[0])
        raise MhopLensError(f"pair {bad}: the clean and corrupted prompts have different token counts "
                            f"({clean_prompts[bad]!r} vs {corrupt_prompts[bad]!r}); activation patching by "
                            "position needs aligned prompts (same template, entities of the same token length).")
    return enc


def prepared(model, enc: Encoded, sites: str, fast: bool = True) -> tuple[CleanRun, CleanRun]:
    """``prepare`` of an ``encode_pairs`` batch."""
    n, sites = enc.tokens.shape[0] // 2, OLD_SITES.get(sites, sites)
    names = [hooks.head(layer, sites) for layer in range(model.cfg.n_layers)] if sites in HEAD_SITES else []
    both = clean_run(model, enc, names) if fast else reference_run(model, enc, names)
    split = []
    for part in (torch.arange(n), torch.arange(n, 2 * n)):
        dev = part.to(both.streams.device)
        kv = None if both.kv is None else _kv_rows(both.kv, dev)
        split.append(CleanRun(enc.select(part), both.streams[:, dev], kv, both.last_logits[dev],
                              {k: v[dev] for k, v in both.acts.items()}))
    return split[0], split[1]


def _kv_rows(kv, rows):
    return cache_of([(k[rows], v[rows]) for k, v in kv_layers(kv)])


def _head_hook(clean: Tensor, heads: Tensor, site: str = "z"):
    """A head site's hook: row r takes head heads[r] from clean[r] at every (new) position."""

    def hook(act: Tensor, hook=None) -> Tensor:
        act = act.clone()
        rows = torch.arange(act.shape[0], device=act.device)
        if site == "pattern":  # [batch head query key]: the new query rows over every key
            act[rows, heads] = clean[rows, heads, -act.shape[2]:, -act.shape[3]:].to(act.dtype)
        else:  # [batch pos head d_head]
            act[rows, :, heads] = clean[rows, -act.shape[1]:, heads].to(act.dtype)
        return act

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
    dev, sites = corrupt.streams.device, OLD_SITES.get(sites, sites)
    out = {}
    pairs = torch.arange(n)
    calls = kept_block_args(model)  # the same row tiles recur in every layer: capture their block arguments once
    if sites == "resid_pre":
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
            name = hooks.head(layer, sites)
            run, p0 = _skip_unchanged(out, clean, corrupt, sites, layer, skip_unchanged)
            if layer == model.cfg.n_layers - 1 and sites not in ("k", "v"):
                p0 = width - 1  # the last block: only the read-out position's query side matters
            todo = run.nonzero()[:, 0]
            for a in range(0, len(todo), step):
                hs = todo[a : a + step]
                rows = pairs.repeat(len(hs))
                heads = hs.repeat_interleave(n)
                fn = _head_hook(clean.acts[name][rows.to(dev)], heads.to(dev), sites)
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
    """Which sites of ``layer`` (positions for ``resid_pre``, heads for a head site) need a forward, and what the
    others give without one.

    Returns ``run`` (per site), ``as_clean`` (per site and pair, for sites not run: True where the patch turns the
    corrupted layer into the clean one, so the result is the clean run; False where clean and corrupted are equal
    at the site, so the patch is the identity) and the first position where anything of the layer differs
    (positions before it keep the corrupted keys/values). Without ``skip_unchanged``: every site, from position 0.
    """
    sites = OLD_SITES.get(sites, sites)
    if sites == "resid_pre":  # [batch pos d_model], a site is a position
        a, b, site = clean.streams[layer], corrupt.streams[layer], 1
    else:  # [batch pos head d_head] (the pattern: [batch query head key]), a site is a head
        a, b, site = site_acts(clean, sites, layer), site_acts(corrupt, sites, layer), 2
    n, n_sites = a.shape[0], a.shape[site]
    if not skip_unchanged:
        return torch.ones(n_sites, dtype=torch.bool), torch.zeros(n_sites, n, dtype=torch.bool), 0
    differ = ((a - b).abs().amax(-1) > SAME_RTOL * b.abs().amax(-1)).cpu()  # [batch pos] or [batch pos head]
    positions = differ if sites == "resid_pre" else differ.any(-1)
    start = int(positions.any(0).nonzero()[0, 0]) if positions.any() else a.shape[1]
    if sites == "resid_pre":  # patching the only differing position of a pair restores its clean run
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
    sites = OLD_SITES.get(sites, sites)
    out = {}
    for layer in layers:
        for index in range(width if sites == "resid_pre" else n_sites(model, sites)):
            if sites == "resid_pre":
                name = hooks.resid(layer, "pre")
                value = clean.streams[layer][:, index]

                def fn(act, hook=None, value=value, p=index):
                    act = act.clone()
                    act[:, p] = value
                    return act
            else:
                name = hooks.head(layer, sites)
                axis = 1 if sites == "pattern" else 2
                value = clean.acts[name].select(axis, index)

                def fn(act, hook=None, value=value, h=index, axis=axis):
                    act = act.clone()
                    act.select(axis, h).copy_(value)
                    return act

            with torch.no_grad():
                out[(layer, index)] = last_logits(model, corrupt.enc, [(name, fn)])
    return out


# the sweep ----------------------------------------------------------------------------------------------------
def _as_metric(metric, good_ids: Int[Tensor, " n"], bad_ids: Int[Tensor, " n"]) -> tuple[Metric, bool]:
    """``metric`` in the ``metrics.Metric`` form (None: the clean-vs-corrupted answer logit difference), and
    whether it must see every pair in one batch.

    A one-argument ``metric(logits)`` is TransformerLens's form: it gets ``[pairs, 1, vocab]`` logits (the read
    position) of every pair in order, once per site, and returns one value per pair (the sweep then runs all pairs
    as one batch). The three-argument form of earlier releases is deprecated."""
    if metric is None:
        return LogitDiff(good_ids[:, None], bad_ids[:, None]), False
    try:
        n_args = len(inspect.signature(metric).parameters)
    except (TypeError, ValueError):
        n_args = 2
    if n_args == 1:
        def per_site(logits: Float[Tensor, "m vocab"], rows: Int[Tensor, " m"]) -> Float[Tensor, " m"]:
            n = int(rows.unique().numel())  # rows = the pairs, repeated once per site
            return torch.cat([torch.as_tensor(metric(chunk[:, None])).reshape(n) for chunk in logits.split(n)])

        return per_site, True
    if n_args != 3:
        return metric, False
    warnings.warn("metric(logits, clean_ids, corrupt_ids) is deprecated: pass metric(last_logits, rows) "
                  "(mhop_lens.analyses.metrics.Metric), the form attribution and heads take.", DeprecationWarning,
                  stacklevel=3)
    return (lambda logits, rows: metric(logits, good_ids[rows.cpu()], bad_ids[rows.cpu()])), False


def run_activation_patching(
    model,
    clean: Sequence[TwoHopQuery] | Sequence[str],
    corrupted: Sequence[TwoHopQuery] | Sequence[str],
    sites: str = "resid_pre",
    metric: Metric | None = None,
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    reference: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (pair, layer, position) or (pair, layer, head) with the patched metric.

    ``sites``: ``resid_pre`` (by position) or a head site ``z`` / ``q`` / ``k`` / ``v`` / ``pattern`` (see the
    module doc; ``k`` / ``v`` index key/value heads on grouped-query models). ``metric``: the one metric form of
    patching, attribution and heads, ``metric(last_logits, rows)`` (``metrics.Metric``: logits at each row's last
    token and the rows' indices among the pairs, one value per row); default ``metrics.LogitDiff`` of the clean
    answer against the corrupted answer. TransformerLens's ``metric(logits)`` works too (logits ``[pairs, 1,
    vocab]`` of every pair, one call per site); the old ``metric(logits, clean_ids, corrupt_ids)`` with a deprecation
    warning.
    ``clean`` / ``corrupted`` are queries (answers: first token of each e3) or prompts with ``answers`` =
    (clean answers, corrupted answers). Columns: pair, qid, corrupt_qid, site, layer, position|head, metric,
    clean_metric, corrupt_metric, recovered ((metric - corrupt) / (clean - corrupt)). ``frame.attrs["path"]``
    says whether the fast path or the reference ran (``partial_forward.dispatch``: the fast path where it is exact
    for this model and batch condition, else the reference with one warning; ``reference=True`` never enters the
    fast machinery).
    """
    sites = site_name(sites)
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
    metric, all_at_once = _as_metric(metric, good_ids, bad_ids)
    if all_at_once:  # a TransformerLens-style metric(logits) indexes every pair at once
        batch_size = max(batch_size, len(prompts[0]))
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    frames, path = [], "reference"
    for a in tqdm(range(0, len(prompts[0]), batch_size), desc=f"patch {sites}", unit="batch", disable=not progress):
        part = slice(a, a + batch_size)
        enc = encode_pairs(model, prompts[0][part], prompts[1][part])

        def compute(fast: bool, enc=enc):
            c, x = prepared(model, enc, sites, fast)
            return c, x, (patch_logits if fast else patching_reference)(model, c, x, sites, layers)

        (c, x, logits), path = dispatch(model, enc, "activation patching", lambda: compute(True),
                                        lambda: compute(False), use_reference=reference)
        g = good_ids[part]
        rows = torch.arange(a, a + len(g))
        clean_m, corrupt_m = metric(c.last_logits, rows).cpu(), metric(x.last_logits, rows).cpu()
        index = "position" if sites == "resid_pre" else "head"
        keys, n = list(logits), len(g)
        value = metric(torch.cat(list(logits.values())), rows.repeat(len(keys))).cpu()
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
