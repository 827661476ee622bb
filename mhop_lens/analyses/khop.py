"""The hopping analyses over k-hop chains: logit lens of every bridge entity at its position, back-patching and
attention knockout on k-hop prompts.

Nothing here re-implements an analysis: each runs the two-hop function on ``KHopQuery.view(i)``, the two-hop
record that splits the chain at bridge e_{i+1} (its ``e2``) with the chain's answer as ``e3`` and the span of every
relation r_j as ``hop{j}``. Position names given here are the chain's own (``e1``, ``r1`` .. ``rk``, ``last``,
``t1`` = r_{k-1}, the last bridge's position, reported as ``r{k-1}``); frames report them under those names. For
k = 2 the views are the two-hop records themselves, so these functions give the two-hop tables (tests check it).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from mhop_lens.analyses.backpatch import run_backpatch
from mhop_lens.analyses.knockout import run_knockout
from mhop_lens.analyses.lens import RESID, run_lens
from mhop_lens.data.records import KHopQuery
from mhop_lens.errors import DataError

_HOP = re.compile(r"^r(\d+)$")


def _k(queries: Sequence[KHopQuery]) -> int:
    ks = {q.k for q in queries}
    if len(ks) != 1:
        raise DataError(f"k-hop analyses take chains of one length; got k = {sorted(ks)} (split them by q.k).")
    return ks.pop()


def view_name(name: str, k: int) -> str:
    """Chain position name -> the views' span name (``r{j}`` -> ``hop{j}``, ``t1`` -> ``hop{k-1}``: the last
    bridge's position); ``e1`` and ``last`` unchanged."""
    if name == "t1":
        return f"hop{k - 1}"
    m = _HOP.match(name)
    if m is None:
        return name
    if not 1 <= int(m.group(1)) <= k:
        raise DataError(f"position {name!r} does not exist in a {k}-hop chain; use e1, r1 .. r{k}, t1 or last.")
    return f"hop{m.group(1)}"


def chain_name(name: str) -> str:
    """Inverse of ``view_name`` for frame labels."""
    return re.sub(r"hop(\d+)", r"r\1", name)


def run_khop_lens(model, queries: Sequence[KHopQuery], positions: Sequence[str] | None = None,
                  sites: Sequence[str] = ("resid_post",), batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Logit lens of every bridge entity and the answer at every chain position: one row per
    (query, position, site, layer, entity).

    ``positions`` default: ``e1, r1 .. rk`` (r_k is the last token). Columns: ``qid, layer, site, position,
    token_index, token, entity`` (``e2`` .. ``e{k+1}``), ``hop`` (the entity is formed by hop ``hop`` at
    position ``r{hop}``), ``rank`` (0 = top-1), ``prob``, ``own_position`` (``position == r{hop}``), ``correct``
    (the model's greedy answer at the last position is e_{k+1}). One ``run_lens`` per bridge (k - 1 in all).
    """
    queries = list(queries)
    k = _k(queries)
    positions = list(positions) if positions is not None else ["e1", *[f"r{j}" for j in range(1, k + 1)]]
    view_positions = [view_name(p, k) for p in positions]
    keep = ["qid", "layer", "site", "position", "token_index", "token", "correct"]
    frames = []
    for bridge in range(1, k):
        lens = run_lens(model, [q.view(bridge) for q in queries], view_positions, sites, top_k=1,
                        batch_size=batch_size, progress=progress)
        entities = [(f"e{bridge + 1}", bridge, "e2")] + ([(f"e{k + 1}", k, "e3")] if bridge == 1 else [])
        for entity, hop, col in entities:
            frames.append(lens[keep].assign(entity=entity, hop=hop, rank=lens[f"{col}_rank"],
                                            prob=lens[f"{col}_prob"]))
    frame = pd.concat(frames, ignore_index=True)
    frame["position"] = frame["position"].map(chain_name)
    frame["own_position"] = frame["position"] == "r" + frame["hop"].astype(str)
    return frame


def resolution_profile(lens: pd.DataFrame) -> pd.DataFrame:
    """Share of queries whose entity is the lens top-1 at its own position, per (entity, layer, correct), from the
    ``resid`` rows of ``run_khop_lens``: where in depth each hop is resolved, successes vs failures."""
    own = lens[lens["own_position"] & lens["site"].isin(RESID)]
    out = (own.assign(top1=own["rank"] == 0)
           .groupby(["entity", "hop", "position", "layer", "correct"], as_index=False)
           .agg(top1_share=("top1", "mean"), n=("qid", "nunique")))
    return out


def run_khop_backpatch(model, queries: Sequence[KHopQuery], positions: Sequence[str] = ("last",),
                       **kw) -> pd.DataFrame:
    """Back-patching (``run_backpatch``) of the chain's answer at chain positions (``last``, ``r1`` .., ``t1``)."""
    queries = list(queries)
    k = _k(queries)
    frame = run_backpatch(model, [q.view(k - 1) for q in queries], [view_name(p, k) for p in positions], **kw)
    frame["position"] = frame["position"].map(chain_name)
    return frame


def run_khop_knockout(model, queries: Sequence[KHopQuery], edges: Sequence[str] | None = None,
                      **kw) -> pd.DataFrame:
    """Attention knockout (``run_knockout``) of edges between chain positions, e.g. ``last->r1`` .. ``last->r{k-1}``
    (the default: the last position reading each bridge's position) and ``last->e1``."""
    queries = list(queries)
    k = _k(queries)
    edges = list(edges) if edges is not None else ["last->e1", *[f"last->r{j}" for j in range(1, k)]]
    mapped = {}
    for edge in edges:
        q, _, key = edge.partition("->")
        mapped["->".join(view_name(p.strip(), k) for p in (q, key))] = edge
    frame = run_knockout(model, [q.view(k - 1) for q in queries], list(mapped), **kw)
    frame["edge"] = frame["edge"].map(mapped)
    return frame
