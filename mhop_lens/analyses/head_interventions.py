"""Head interventions during GAR evaluation: accuracy before -> after, against random heads of the same number.

Kinds (all from ``mhop_lens.interventions``): ``zero`` (zero_heads), ``mean`` (mean_ablate_heads, one mean z per
head over the real tokens of a reference set), ``scale`` (scale_heads by ``factor``), ``attend`` (set_attention:
each head's attention row at END rewritten to the last token of role ``attend_role``, e.g. "A" or "V").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mhop_lens import hooks, interventions
from mhop_lens.errors import SpanError
from mhop_lens.forward import run_with_cache
from mhop_lens.gar.evaluate import Restrict, Scorer, score
from mhop_lens.tokens import Encoded, encode

Kind = Literal["zero", "mean", "scale", "attend"]
Head = tuple[int, int]


@torch.no_grad()
def mean_z(model, prompts: Sequence[str], batch_size: int = 32) -> dict[int, Float[Tensor, "head d_head"]]:
    """Mean ``hook_z`` per layer and head over all real (non-padding, non-BOS) tokens of ``prompts``."""
    names = [hooks.head(l, "z") for l in range(model.cfg.n_layers)]
    sums: dict[int, Tensor] = {}
    count = 0
    for i in range(0, len(prompts), batch_size):
        enc = encode(model, prompts[i : i + batch_size])
        _, cache = run_with_cache(model, enc, names)
        keep = torch.tensor([[off is not None for off in row] for row in enc.offsets], device=enc.tokens.device)
        count += int(keep.sum())
        for l in range(model.cfg.n_layers):
            z = cache[hooks.head(l, "z")][keep].float().sum(0)
            sums[l] = sums.get(l, 0) + z.cpu()
    return {l: s / max(count, 1) for l, s in sums.items()}


def _by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for l, h in heads:
        out.setdefault(int(l), []).append(int(h))
    return out


def head_hooks(model, heads: Sequence[Head], kind: Kind, factor: float = 0.0,
               means: dict[int, Tensor] | None = None, attend_role: str = "A") -> Sequence | Callable:
    """Forward hooks for ``kind`` on ``heads``: a list, or (for ``attend``) a function of the batch."""
    layers = _by_layer(heads)
    if kind == "zero":
        return [(hooks.head(l, "z"), interventions.zero_heads(hs)) for l, hs in layers.items()]
    if kind == "scale":
        return [(hooks.head(l, "z"), interventions.scale_heads(hs, factor)) for l, hs in layers.items()]
    if kind == "mean":
        if means is None:
            raise ValueError("kind='mean' needs means (mean_z over a reference set).")
        return [(hooks.head(l, "z"), interventions.mean_ablate_heads(hs, means[l])) for l, hs in layers.items()]
    if kind == "attend":
        return _attend_hooks(model, layers, attend_role)
    raise ValueError(f"unknown intervention kind {kind!r}; choose zero, mean, scale or attend.")


def _attend_hooks(model, layers: dict[int, list[int]], role: str) -> Callable:
    def build(enc: Encoded, examples: list) -> list:
        query, key = [], []
        for b, ex in enumerate(examples):
            if not ex.spans.get(role):
                raise SpanError(f"example {ex.id} has no {role!r} span to attend to; choose a role it has "
                                f"({sorted(ex.spans)}).")
            query.append(enc.position(b, tuple(ex.spans["END"][-1])))
            key.append(enc.position(b, tuple(ex.spans[role][-1])))
        q = torch.tensor(query, device=enc.tokens.device)
        k = torch.tensor(key, device=enc.tokens.device)
        return [(hooks.head(l, "pattern"), interventions.set_attention(h, q, k)) for l, hs in layers.items()
                for h in hs]

    return build


def random_heads(model, k: int, exclude: Sequence[Head], rng: np.random.Generator) -> list[Head]:
    """k distinct heads drawn uniformly from all heads not in ``exclude``."""
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (l, h) not in set(exclude)]
    if k > len(pool):
        raise ValueError(f"cannot draw {k} random heads from the {len(pool)} heads outside the target set.")
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def _summary(frame: pd.DataFrame, condition: str, set_index: int, heads: Sequence[Head]) -> pd.DataFrame:
    g = frame.groupby(["task", "form", "n_r"], sort=True)
    out = pd.DataFrame({"accuracy": g["correct"].mean(), "margin": g["margin"].mean(), "n": g.size()}).reset_index()
    yes = frame[frame["label"] == "Yes"] if "label" in frame else frame.iloc[:0]
    if len(yes):
        out = out.merge(yes.groupby("task")["correct"].mean().rename("accuracy_yes").reset_index(), on="task",
                        how="left")
    return out.assign(condition=condition, set_index=set_index, heads=" ".join(f"L{l}H{h}" for l, h in heads))


def intervene(model, examples: Sequence, heads: Sequence[Head], kind: Kind = "zero", factor: float = 0.0,
              attend_role: str = "A", n_random: int = 5, seed: int = 0, restrict: Restrict = "candidates",
              scorer: Scorer = "auto", batch_size: int = 32, means: dict[int, Tensor] | None = None
              ) -> pd.DataFrame:
    """Accuracy per task before, after intervening on ``heads``, and after the same on ``n_random`` random sets.

    One row per (condition, set, task): condition "before" | "target" | "random"; ``delta`` = accuracy - before.
    """
    heads = [(int(l), int(h)) for l, h in heads]
    if kind == "mean" and means is None:
        means = mean_z(model, [ex.prompt for ex in examples], batch_size)
    run = lambda hs: score(model, examples, restrict, scorer, batch_size,  # noqa: E731
                           hooks=head_hooks(model, hs, kind, factor, means, attend_role) if hs else None)
    frames = [_summary(run([]), "before", 0, []), _summary(run(heads), "target", 0, heads)]
    rng = np.random.default_rng(seed)
    for i in range(n_random):
        hs = random_heads(model, len(heads), heads, rng)
        frames.append(_summary(run(hs), "random", i, hs))
    out = pd.concat(frames, ignore_index=True)
    before = out[out["condition"] == "before"].set_index("task")["accuracy"]
    out["delta"] = out["accuracy"] - out["task"].map(before)
    return out.assign(kind=kind, factor=factor if kind == "scale" else np.nan,
                      attend_role=attend_role if kind == "attend" else None)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy over tasks per condition (random: mean and sd over the random sets)."""
    per_set = frame.groupby(["condition", "set_index"])["accuracy"].mean().reset_index()
    out = per_set.groupby("condition")["accuracy"].agg(["mean", "std", "count"]).rename(
        columns={"mean": "accuracy", "std": "sd_over_sets", "count": "n_sets"})
    return out.reindex(["before", "target", "random"]).dropna(how="all").reset_index()


# --- True/False-head edits and set controls on Yes/No rows (issue 15) -------------------------------------------
#
# These score Yes/No classification rows directly by the sign of logit(Yes) - logit(No) at END (what
# ``gar.evaluate.score`` does with candidates Yes/No), so that many head sets or per-row edits share one batched
# forward: an edit is a per-row factor on every head's ``hook_z`` (1 = untouched, 0 = zero-ablated, 2 = doubled).


def yes_no_rows(examples: Sequence, yes: str = "Yes", no: str = "No") -> tuple[list[str], Tensor, list[str]]:
    """Prompts, gold sign (+1 = Yes, -1 = No) and ids of the Yes/No classification rows of ``examples``."""
    rows = [ex for ex in examples if ex.kind == "cls" and ex.label in (yes, no)]
    if not rows:
        raise SpanError("no Yes/No classification rows in the data; generate cls forms "
                        "(`mhop-lens gar generate --forms cls`).")
    return ([ex.prompt for ex in rows], torch.tensor([1.0 if ex.label == yes else -1.0 for ex in rows]),
            [ex.id for ex in rows])


def _factor_hooks(model, factors: Float[Tensor, "rows layer head"], means: dict[int, Tensor] | None) -> list:
    """``hook_z`` of every layer: z <- f z (+ (1 - f) mean when ``means`` is given: mean-ablation for f = 0)."""

    def make(layer: int):
        def hook(z, hook=None):
            f = factors[:, layer].to(z.dtype).to(z.device)[:, None, :, None]
            out = z * f
            if means is not None:
                out = out + (1 - f) * means[layer].to(z.dtype).to(z.device)[None, None]
            return out

        return hook

    return [(hooks.head(l, "z"), make(l)) for l in range(model.cfg.n_layers)
            if not bool((factors[:, l] == 1).all())]


@torch.no_grad()
def margins(model, prompts: Sequence[str], factors: Float[Tensor, "sets rows layer head"] | None = None,
            batch_size: int = 256, yes: str = " Yes", no: str = " No", means: dict[int, Tensor] | None = None
            ) -> Float[Tensor, "sets rows"]:
    """logit(Yes) - logit(No) at END of every prompt under each of the ``sets`` per-row head-factor tensors
    (None = no edit), sets and rows batched together (``batch_size`` rows per forward)."""
    from mhop_lens.analyses.metrics import yes_no
    from mhop_lens.forward import last_logits

    n = len(prompts)
    metric = yes_no(model, 1, yes, no)
    enc = encode(model, list(prompts))
    if factors is None:
        factors = torch.ones(1, n, model.cfg.n_layers, model.cfg.n_heads)
    flat = factors.reshape(-1, *factors.shape[2:])
    out = []
    for i in range(0, flat.shape[0], batch_size):
        idx = torch.arange(i, min(i + batch_size, flat.shape[0]))
        sub = enc.select(idx % n)
        logits = last_logits(model, sub, _factor_hooks(model, flat[idx], means))
        out.append(metric(logits, torch.zeros(len(idx), dtype=torch.long)).float().cpu())
    return torch.cat(out).view(factors.shape[0], n)


def head_set_factors(model, sets: Sequence[Sequence[Head]], n_rows: int, factor: float = 0.0
                     ) -> Float[Tensor, "sets rows layer head"]:
    """Per set, every row's factors: ``factor`` on the set's heads, 1 elsewhere."""
    out = torch.ones(len(sets), n_rows, model.cfg.n_layers, model.cfg.n_heads)
    for s, hs in enumerate(sets):
        for l, h in hs:
            out[s, :, l, h] = factor
    return out


def class_factors(model, verdict: Float[Tensor, " rows"], true_heads: Sequence[Head], false_heads: Sequence[Head],
                  strengthen: float = 2.0, mask: float = 0.0) -> Float[Tensor, "rows layer head"]:
    """The paper's edit per row: verdict +1 (Yes) strengthens True heads and masks False heads, -1 the reverse,
    0 leaves the row alone."""
    out = torch.ones(len(verdict), model.cfg.n_layers, model.cfg.n_heads)
    for heads_, sign in ((true_heads, 1.0), (false_heads, -1.0)):
        for l, h in heads_:
            out[verdict == sign, l, h] = strengthen
            out[verdict == -sign, l, h] = mask
    return out


@torch.no_grad()
def head_verdict(model, prompts: Sequence[str], true_heads: Sequence[Head], false_heads: Sequence[Head],
                 batch_size: int = 64) -> Float[Tensor, " rows"]:
    """A label-free verdict read off the heads themselves: the sign of the summed direct effect on
    logit(Yes) - logit(No) of the True and False heads' END outputs (``heads.direct_effects``)."""
    from mhop_lens.analyses.heads import direct_effects

    chosen = list(true_heads) + list(false_heads)
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = encode(model, list(prompts[i : i + batch_size]))
        de = direct_effects(model, enc)
        out.append(sum(de[:, l, h] for l, h in chosen) if chosen else torch.zeros(de.shape[0]))
    return torch.sign(torch.cat(out))


def _outcome(gold: Tensor, before: Tensor, after: Tensor, variant: str, heads_: str) -> list[dict]:
    ok_b, ok_a = (before * gold) > 0, (after * gold) > 0
    rows = []
    for subset, keep in (("all", torch.ones_like(ok_b)), ("failures", ~ok_b)):
        n = int(keep.sum())
        fixed, broken = int((keep & ~ok_b & ok_a).sum()), int((keep & ok_b & ~ok_a).sum())
        rows.append({"variant": variant, "rows": subset, "n": n, "heads": heads_,
                     "accuracy_before": float(ok_b[keep].float().mean()) if n else float("nan"),
                     "accuracy_after": float(ok_a[keep].float().mean()) if n else float("nan"),
                     "fixed": fixed, "broken": broken, "net": fixed - broken,
                     "fixed_share": fixed / n if n else float("nan")})
    return rows


def truth_interventions(model, examples: Sequence, true_heads: Sequence[Head], false_heads: Sequence[Head],
                        strengthen: float = 2.0, n_random: int = 50, seed: int = 0, batch_size: int = 256
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's label-conditioned edit and two label-free ones, on all Yes/No rows and on the failures.

    Variants: ``label`` (gold Yes: True heads x ``strengthen``, False heads zeroed; gold No: the reverse),
    ``amplify`` (label-free: both classes x ``strengthen`` on every row), ``verdict`` (label-free: the label edit
    driven by :func:`head_verdict` instead of the gold label). Control: the ``label`` edit with ``n_random``
    random disjoint head sets of the same sizes. Returns (table: one row per variant x rows subset with
    accuracy before/after, fixed, broken, net; random-control table: one row per random set, "all" rows).
    """
    prompts, gold, _ = yes_no_rows(examples)
    tag = lambda t, f: "True " + " ".join(f"L{l}H{h}" for l, h in t) + " | False " + " ".join(  # noqa: E731
        f"L{l}H{h}" for l, h in f)
    base = margins(model, prompts, batch_size=batch_size)[0]
    verdict = head_verdict(model, prompts, true_heads, false_heads)
    edits = {"label": class_factors(model, gold, true_heads, false_heads, strengthen),
             "amplify": class_factors(model, torch.ones_like(gold), list(true_heads) + list(false_heads), [],
                                      strengthen, strengthen),
             "verdict": class_factors(model, verdict, true_heads, false_heads, strengthen)}
    after = margins(model, prompts, torch.stack(list(edits.values())), batch_size)
    table = [r for i, v in enumerate(edits) for r in _outcome(gold, base, after[i], v, tag(true_heads, false_heads))]
    verdict_acc = float(((verdict * gold) > 0).float().mean())
    rng = np.random.default_rng(seed)
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    k_t, k_f = len(true_heads), len(false_heads)
    rand_rows = []
    if n_random and k_t + k_f <= len(pool):
        sets = []
        for _ in range(n_random):
            pick = [pool[i] for i in rng.choice(len(pool), size=k_t + k_f, replace=False)]
            sets.append((pick[:k_t], pick[k_t:]))
        f = torch.stack([class_factors(model, gold, t, fl, strengthen) for t, fl in sets])
        got = margins(model, prompts, f, batch_size)
        for i, (t, fl) in enumerate(sets):
            rand_rows += [r for r in _outcome(gold, base, got[i], "label (random heads)", tag(t, fl))]
    out = pd.DataFrame(table).assign(strengthen=strengthen, verdict_accuracy=verdict_acc)
    return out, pd.DataFrame(rand_rows)


def _layer_signature(heads_: Sequence[Head]) -> tuple[int, ...]:
    return tuple(sorted(l for l, _ in heads_))


def null_sets(model, examples: Sequence, chosen: Sequence[Head], kind: Literal["zero", "mean"] = "zero",
              max_exhaustive: int = 5000, n_random: int = 500, seed: int = 0, batch_size: int = 512,
              means: dict[int, Tensor] | None = None) -> tuple[pd.DataFrame, dict]:
    """Ablate every k-head set (all C(n_heads_total, k) when <= ``max_exhaustive``, else ``n_random`` random ones
    plus ``n_random`` layer-matched ones) and place the chosen set in that distribution.

    Per set: Yes/No accuracy and mean signed margin (margin x gold sign) with the set ablated. Summary:
    ``percentile`` = share of sets whose accuracy is <= the chosen set's (as harmful or more; small = the chosen
    set is unusually harmful), the same among layer-matched sets (same layers as the chosen set), and the before
    accuracy. A control that can fail: a percentile near 0.5 means the chosen heads are not special.
    """
    from itertools import combinations
    from math import comb

    chosen = [(int(l), int(h)) for l, h in chosen]
    k = len(chosen)
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    prompts, gold, _ = yes_no_rows(examples)
    if kind == "mean" and means is None:
        means = mean_z(model, prompts)
    rng = np.random.default_rng(seed)
    exhaustive = comb(len(pool), k) <= max_exhaustive
    if exhaustive:
        sets = [list(c) for c in combinations(pool, k)]
    else:
        sets = [[pool[i] for i in sorted(rng.choice(len(pool), size=k, replace=False))] for _ in range(n_random)]
        by_layer = {}
        for l, h in pool:
            by_layer.setdefault(l, []).append((l, h))
        for _ in range(n_random):
            pick = []
            for l in sorted(set(_layer_signature(chosen))):
                need = _layer_signature(chosen).count(l)
                pick += [by_layer[l][i] for i in rng.choice(len(by_layer[l]), size=need, replace=False)]
            sets.append(sorted(pick))
    key = sorted(chosen)
    if key not in [sorted(s) for s in sets]:
        sets.append(key)
    base = margins(model, prompts, batch_size=batch_size, means=None)[0]
    rows = []
    chunk = max(1, 16384 // max(1, len(prompts)))
    for i in range(0, len(sets), chunk):
        part = sets[i : i + chunk]
        m = margins(model, prompts, head_set_factors(model, part, len(prompts)), batch_size, means=means)
        for s, hs in enumerate(part):
            rows.append({"heads": " ".join(f"L{l}H{h}" for l, h in hs), "layers": _layer_signature(hs),
                         "chosen": sorted(hs) == key,
                         "layer_matched": _layer_signature(hs) == _layer_signature(chosen),
                         "accuracy": float(((m[s] * gold) > 0).float().mean()),
                         "signed_margin": float((m[s] * gold).mean())})
    frame = pd.DataFrame(rows).drop_duplicates("heads").reset_index(drop=True)
    own = frame[frame["chosen"]].iloc[0]
    matched = frame[frame["layer_matched"]]
    summary = {"k": k, "kind": kind, "chosen": own["heads"], "exhaustive": exhaustive, "n_sets": len(frame),
               "n_layer_matched": len(matched), "accuracy_before": float(((base * gold) > 0).float().mean()),
               "chosen_accuracy": float(own["accuracy"]),
               "percentile": float((frame["accuracy"] <= own["accuracy"]).mean()),
               "percentile_layer_matched": float((matched["accuracy"] <= own["accuracy"]).mean()),
               "percentile_margin": float((frame["signed_margin"] <= own["signed_margin"]).mean()),
               "null_accuracy_mean": float(frame["accuracy"].mean()),
               "null_accuracy_min": float(frame["accuracy"].min()),
               "n_rows": len(prompts)}
    return frame, summary


def single_head_table(model, examples: Sequence, kind: Literal["zero", "mean"] = "zero", batch_size: int = 512,
                      means: dict[int, Tensor] | None = None) -> pd.DataFrame:
    """Yes/No accuracy and signed margin with each head ablated alone, and the change from no ablation."""
    prompts, gold, _ = yes_no_rows(examples)
    if kind == "mean" and means is None:
        means = mean_z(model, prompts)
    pool = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    base = margins(model, prompts, batch_size=batch_size)[0]
    m = margins(model, prompts, head_set_factors(model, [[p] for p in pool], len(prompts)), batch_size, means=means)
    acc0, mar0 = float(((base * gold) > 0).float().mean()), float((base * gold).mean())
    rows = [{"layer": l, "head": h, "kind": kind, "accuracy": float(((m[i] * gold) > 0).float().mean()),
             "signed_margin": float((m[i] * gold).mean())} for i, (l, h) in enumerate(pool)]
    out = pd.DataFrame(rows)
    out["delta_accuracy"] = out["accuracy"] - acc0
    out["delta_margin"] = out["signed_margin"] - mar0
    return out.sort_values("accuracy").reset_index(drop=True)
