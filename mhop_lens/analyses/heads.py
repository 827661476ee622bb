"""True/False heads: heads whose output or attention separates true from false statements on counter-paired data.

Counter-pairs are GAR classification rows sharing a ``pair_id``: the Yes row (true statement) is the clean run,
the No row (false statement) the corrupted run, and the metric is logit(Yes) - logit(No). Each head gets

- ``atp`` / ``exact``: mean attribution / exact patching effect of its ``hook_z`` (all positions), signed:
  > 0 = its true-statement output pushes towards Yes (a "true" head), < 0 = towards No (a "false" head);
- ``act_d``: held-out Cohen's d of its output at END between true and false rows, along the mean-difference
  direction fitted on the other half of the pairs (so a high-dimensional z cannot separate by chance);
- ``attn_d_<role>``: Cohen's d of the attention mass END -> role span (A, V, K, Q, ...) between true and false rows.

Two head classes (the GAR paper's True and False heads) come from what a head *writes* and *represents*, split by
the statement's truth (:func:`head_profiles`): its direct effect on logit(Yes) - logit(No) at END on true rows and on
false rows, and a held-out linear probe of its END output for truth. :func:`classify` labels each head
True / False / mixed / other (rule in its docstring and docs/heads.md).

``null_sets`` puts a chosen head set's ablation in the distribution of every (or >= 500 random, also
layer-matched) k-head sets; ``control`` compares the top-k heads' |score| with random k-head sets;
``consistency`` compares head scores across relation sets or seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mhop_lens import hooks
from mhop_lens.analyses import metrics
from mhop_lens.analyses.attribution import (
    SpanMap,
    aggregate,
    aligned_pairs,
    attribute,
    exact_patching,
    pair_batches,
)
from mhop_lens.errors import DataError
from mhop_lens.forward import run_with_cache
from mhop_lens.positions import token_positions

ATTN_ROLES = ("A", "V", "Vp", "K", "Q")


@dataclass
class PairSet:
    """Aligned counter-pairs: clean (true / Yes) and corrupted (false / No) prompts, with ids and clean spans."""

    clean: list[str]
    corrupted: list[str]
    pair_ids: list[str]
    tasks: list[str]
    spans: list[SpanMap]
    corrupt_spans: list[SpanMap] = field(default_factory=list)
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.clean)

    def subset(self, idx: Sequence[int]) -> PairSet:
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return PairSet(pick(self.clean), pick(self.corrupted), pick(self.pair_ids), pick(self.tasks),
                       pick(self.spans), pick(self.corrupt_spans) if self.corrupt_spans else [], self.dropped)


def counter_pairs(model, examples: Sequence, yes: str = "Yes", no: str = "No") -> PairSet:
    """Pair the Yes and No rows of each ``pair_id``; keep pairs whose two prompts have equal token counts."""
    by_pair: dict[str, dict[str, object]] = {}
    for ex in examples:
        if ex.kind == "cls" and ex.pair_id and ex.label in (yes, no):
            by_pair.setdefault(ex.pair_id, {})[ex.label] = ex
    full = [(p, rows[yes], rows[no]) for p, rows in by_pair.items() if yes in rows and no in rows]
    if not full:
        raise DataError("no counter-paired classification rows (a Yes and a No row sharing a pair_id) in the data; "
                        "generate cls forms (e.g. `mhop-lens gar generate --forms cls`).")
    keep = aligned_pairs(model, [t.prompt for _, t, _ in full], [f.prompt for _, _, f in full])
    full = [full[i] for i in keep]
    return PairSet([t.prompt for _, t, _ in full], [f.prompt for _, _, f in full], [p for p, _, _ in full],
                   [t.task for _, t, _ in full], [dict(t.spans) for _, t, _ in full],
                   [dict(f.spans) for _, _, f in full], dropped=len(by_pair) - len(full))


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a - mean b) / pooled sd; 0 when both are constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    diff = a.mean() - b.mean()
    return float(diff / pooled) if pooled > 0 else (0.0 if diff == 0 else float(np.sign(diff) * np.inf))


def _held_out_d(true: Float[Tensor, "pair d"], false: Float[Tensor, "pair d"]) -> float:
    """Cohen's d of projections on the mean-difference direction, fitted on even pairs and tested on odd ones
    (and vice versa), averaged."""
    n = true.shape[0]
    halves = [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    ds = []
    for fit, test in (halves, halves[::-1]):
        if len(fit) < 1 or len(test) < 2:
            continue
        direction = (true[fit] - false[fit]).mean(0)
        norm = direction.norm()
        if norm == 0:
            ds.append(0.0)
            continue
        u = direction / norm
        ds.append(cohens_d((true[test] @ u).numpy(), (false[test] @ u).numpy()))
    return float(np.mean(ds)) if ds else float("nan")


def _role_mass(pattern: Float[Tensor, "batch head q k"], enc, spans: Sequence[SpanMap], role: str
               ) -> Float[Tensor, "batch head"] | None:
    """Attention from the last token to the tokens of ``role`` (NaN rows where the role is absent)."""
    out = torch.full(pattern.shape[:2], float("nan"))
    last = enc.last
    for b in range(pattern.shape[0]):
        pos = sorted({p for s in spans[b].get(role, []) for p in token_positions(enc.offsets[b], tuple(s))})
        if pos:
            out[b] = pattern[b, :, int(last[b]), pos].sum(-1).float().cpu()
    return None if torch.isnan(out).all() else out


@torch.no_grad()
def _activation_stats(model, pairs: PairSet, batch_size: int, roles: Sequence[str]) -> pd.DataFrame:
    """Per head: held-out d of END output, relative END difference, attention-mass d per role."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [hooks.head(l, s) for l in range(n_layers) for s in ("z", "pattern")]
    z_true, z_false = [], []
    mass: dict[str, list[tuple[Tensor, Tensor]]] = {r: [] for r in roles}
    for batch in pair_batches(model, pairs.clean, pairs.corrupted, batch_size, "head activations"):
        sl, clean, corrupt = slice(batch.start, batch.start + batch_size), batch.clean, batch.corrupt
        _, c_cache = run_with_cache(model, clean, names)
        _, k_cache = run_with_cache(model, corrupt, names)
        rows = torch.arange(clean.tokens.shape[0])
        for store, cache, enc in ((z_true, c_cache, clean), (z_false, k_cache, corrupt)):
            store.append(torch.stack([cache[hooks.head(l, "z")][rows, enc.last] for l in range(n_layers)], 1)
                         .float().cpu())
        for role in roles:
            t = [_role_mass(c_cache[hooks.head(l, "pattern")], clean, pairs.spans[sl], role) for l in range(n_layers)]
            f = [_role_mass(k_cache[hooks.head(l, "pattern")], corrupt, (pairs.corrupt_spans or pairs.spans)[sl],
                            role) for l in range(n_layers)]
            if all(x is not None for x in t + f):
                mass[role].append((torch.stack(t, 1), torch.stack(f, 1)))
    zt, zf = torch.cat(z_true), torch.cat(z_false)  # [pair, layer, head, d_head]
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            row = {"layer": l, "head": h, "act_d": _held_out_d(zt[:, l, h], zf[:, l, h]),
                   "act_rel_diff": float((zt[:, l, h] - zf[:, l, h]).norm(dim=-1).mean()
                                         / zt[:, l, h].norm(dim=-1).mean().clamp(min=1e-12))}
            for role, parts in mass.items():
                if parts:
                    t = torch.cat([p[0] for p in parts])[:, l, h]
                    f = torch.cat([p[1] for p in parts])[:, l, h]
                    keep = ~(torch.isnan(t) | torch.isnan(f))
                    row[f"attn_d_{role}"] = cohens_d(t[keep].numpy(), f[keep].numpy())
            rows.append(row)
    return pd.DataFrame(rows)


def _final_norm_direction(model, yes: str, no: str) -> tuple[Tensor, Tensor | None, bool]:
    """(W_U[:, yes] - W_U[:, no], the final norm's weight or None, whether the norm centres: LayerNorm)."""
    from mhop_lens.tokens import first_token_id

    w_u = model.W_U
    direction = (w_u[:, first_token_id(model, yes)] - w_u[:, first_token_id(model, no)]).detach().float()
    weight = next((p for n, p in model.ln_final.named_parameters() if n.endswith("weight")), None)
    centre = "LN" == str(getattr(model.cfg, "normalization_type", "")).upper() or any(
        n.endswith("bias") for n, _ in model.ln_final.named_parameters())
    return direction, None if weight is None else weight.detach().float(), centre


def _fit_logistic(x: Tensor, y: Tensor, steps: int, l2: float) -> Tensor:
    """Weights (last = bias) of an L2-regularised logistic regression fitted with L-BFGS."""
    xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(xs.shape[1], dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _probe_accuracy(true: Float[Tensor, "pair d"], false: Float[Tensor, "pair d"], steps: int = 100,
                    l2: float = 1e-2) -> float:
    """Held-out accuracy of a logistic-regression probe for truth: fitted on even pairs and tested on odd ones and
    vice versa (a pair's two rows stay on one side), averaged. Features standardised on the fitting half."""
    n = true.shape[0]
    halves = [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    accs = []
    for fit, test in (halves, halves[::-1]):
        if len(fit) < 2 or len(test) < 1:
            continue
        x = torch.cat([true[fit], false[fit]]).double()
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-8)
        w = _fit_logistic((x - mu) / sd, torch.cat([torch.ones(len(fit)), torch.zeros(len(fit))]).double(), steps,
                          l2)
        xt = (torch.cat([true[test], false[test]]).double() - mu) / sd
        pred = (xt @ w[:-1] + w[-1]) > 0
        yt = torch.cat([torch.ones(len(test)), torch.zeros(len(test))]).bool()
        accs.append(float((pred == yt).double().mean()))
    return float(np.mean(accs)) if accs else float("nan")


@torch.no_grad()
def direct_effects(model, enc, yes: str = " Yes", no: str = " No", cache=None) -> Float[Tensor, "batch layer head"]:
    """Each head's direct effect on logit(Yes) - logit(No) at each row's END: ``z_h W_O[h]`` through the final norm
    with the run's own scale frozen (direct logit attribution), dotted with ``W_U[Yes] - W_U[No]``."""
    n_layers = model.cfg.n_layers
    direction, weight, centre = _final_norm_direction(model, yes, no)
    if cache is None:
        _, cache = run_with_cache(model, enc, [hooks.head(l, "z") for l in range(n_layers)] + ["ln_final.hook_scale"])
    rows, last = torch.arange(enc.tokens.shape[0]), enc.last
    zs = torch.stack([cache[hooks.head(l, "z")][rows, last] for l in range(n_layers)], 1).float().cpu()
    scale = cache["ln_final.hook_scale"][rows, last].float().cpu().reshape(-1, 1, 1)
    out = torch.einsum("blhd,lhdm->blhm", zs, model.W_O.detach().float().cpu())
    if centre:
        out = out - out.mean(-1, keepdim=True)
    if weight is not None:
        out = out * weight.cpu()
    return (out @ direction.cpu()) / scale


@torch.no_grad()
def head_profiles(model, pairs: PairSet, batch_size: int = 32, yes: str = " Yes", no: str = " No") -> pd.DataFrame:
    """Per head, what it writes and what it represents, split by truth (true = the pair's Yes row).

    ``direct_true`` / ``direct_false``: mean :func:`direct_effects` on true / false rows. ``probe_acc``: held-out
    accuracy of a linear probe of the head's END ``z`` for truth (:func:`_probe_accuracy`; chance 0.5).
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    names = [hooks.head(l, "z") for l in range(n_layers)] + ["ln_final.hook_scale"]
    z = {True: [], False: []}
    direct = {True: [], False: []}
    for batch in pair_batches(model, pairs.clean, pairs.corrupted, batch_size, "head profiles"):
        for truth, enc in ((True, batch.clean), (False, batch.corrupt)):
            _, cache = run_with_cache(model, enc, names)
            rows = torch.arange(enc.tokens.shape[0])
            z[truth].append(torch.stack([cache[hooks.head(l, "z")][rows, enc.last] for l in range(n_layers)], 1)
                            .float().cpu())
            direct[truth].append(direct_effects(model, enc, yes, no, cache))
    d_true, d_false = torch.cat(direct[True]), torch.cat(direct[False])
    z_true, z_false = torch.cat(z[True]), torch.cat(z[False])
    rows = []
    for l in range(n_layers):
        for h in range(n_heads):
            rows.append({"layer": l, "head": h, "direct_true": float(d_true[:, l, h].mean()),
                         "direct_false": float(d_false[:, l, h].mean()),
                         "direct_true_sd": float(d_true[:, l, h].std()),
                         "direct_false_sd": float(d_false[:, l, h].std()),
                         "probe_acc": _probe_accuracy(z_true[:, l, h], z_false[:, l, h]), "n_pairs": len(pairs)})
    return pd.DataFrame(rows)


#: Defaults of :func:`classify`: |direct effect| (logits) that counts as writing, dominance ratio, probe accuracy.
MIN_WRITE, DOMINANCE, MIN_PROBE = 0.5, 2.0, 0.75


def classify(profiles: pd.DataFrame, min_write: float = MIN_WRITE, dominance: float = DOMINANCE,
             min_probe: float = MIN_PROBE) -> pd.DataFrame:
    """``profiles`` with ``head_class`` True / False / mixed / other and the two evidence columns.

    ``yes_on_true`` = direct_true (what it writes towards Yes on true statements), ``no_on_false`` = -direct_false
    (towards No on false statements). A head is typed only when its output separates truth (probe_acc >=
    ``min_probe``) and its write depends on truth (direct_true - direct_false >= ``min_write``); then
    True: yes_on_true >= min_write and >= ``dominance`` x max(no_on_false, 0);
    False: no_on_false >= min_write and >= ``dominance`` x max(yes_on_true, 0);
    mixed: both >= min_write, neither dominant. Everything else is "other".
    """
    out = profiles.copy()
    yes_t, no_f = out["direct_true"], -out["direct_false"]
    typed = (out["probe_acc"] >= min_probe) & (out["direct_true"] - out["direct_false"] >= min_write)
    true = typed & (yes_t >= min_write) & (yes_t >= dominance * no_f.clip(lower=0))
    false = typed & (no_f >= min_write) & (no_f >= dominance * yes_t.clip(lower=0))
    mixed = typed & (yes_t >= min_write) & (no_f >= min_write) & ~true & ~false
    out["yes_on_true"], out["no_on_false"] = yes_t, no_f
    out["head_class"] = np.select([true, false, mixed], ["True", "False", "mixed"], "other")
    return out


def head_scores(model, pairs: PairSet, exact: bool = True, batch_size: int = 16,
                roles: Sequence[str] = ATTN_ROLES, yes: str = " Yes", no: str = " No", ig_steps: int = 0
                ) -> pd.DataFrame:
    """One row per head: atp, (exact), act_d, act_rel_diff, attn_d_<role>, and the score used for ranking.

    ``ig_steps > 0`` computes the ``atp`` column with integrated gradients (plain AtP misranks heads of trained
    models, docs/heads.md); ``exact=True`` ranks by exact patching.
    """
    metric = metrics.yes_no(model, len(pairs), yes, no)
    atp = attribute(model, pairs.clean, pairs.corrupted, metric, sites=("z",), batch_size=batch_size,
                    pair_ids=pairs.pair_ids, ig_steps=ig_steps)
    frame = aggregate(atp).rename(columns={"mean": "atp", "abs_mean": "atp_abs", "std": "atp_std", "n": "n_pairs"})
    frame = frame.drop(columns="site")
    if exact:
        ex = aggregate(exact_patching(model, pairs.clean, pairs.corrupted, metric, sites=("z",),
                                      batch_size=batch_size))
        frame = frame.merge(ex[["layer", "head", "mean", "std"]].rename(columns={"mean": "exact", "std": "exact_std"}),
                            on=["layer", "head"])
    frame = frame.merge(_activation_stats(model, pairs, batch_size, roles), on=["layer", "head"])
    profiles = classify(head_profiles(model, pairs, batch_size, yes, no)).drop(columns="n_pairs")
    frame = frame.merge(profiles, on=["layer", "head"])
    frame["score"] = frame["exact"] if exact else frame["atp"]
    frame["score_by"] = "exact" if exact else "atp"
    frame["metric_true"] = float(atp["metric_clean"].mean())
    frame["metric_false"] = float(atp["metric_corrupt"].mean())
    return frame.sort_values(["layer", "head"]).reset_index(drop=True)


def select(scores: pd.DataFrame, k: int, by: str = "score") -> pd.DataFrame:
    """The k heads with the largest |by|, typed "true" (pushes true statements to Yes) or "false"."""
    top = scores.reindex(scores[by].abs().sort_values(ascending=False).index).head(k).copy()
    top["type"] = np.where(top[by] > 0, "true", "false")  # sign of the patching effect (not the head class)
    top["rank"] = np.arange(1, len(top) + 1)
    return top.reset_index(drop=True)


def control(scores: pd.DataFrame, k: int, by: str = "score", n_random: int = 1000, seed: int = 0) -> dict:
    """Mean |by| of the top-k heads vs random k-head sets: random mean, sd and the share of sets at least as large."""
    vals = scores[by].abs().to_numpy()
    top = np.sort(vals)[::-1][:k].mean()
    rng = np.random.default_rng(seed)
    rand = np.array([vals[rng.choice(len(vals), size=k, replace=False)].mean() for _ in range(n_random)])
    return {"k": k, "by": by, "top_mean_abs": float(top), "random_mean_abs": float(rand.mean()),
            "random_sd": float(rand.std()), "p_random_ge_top": float((rand >= top).mean()),
            "ratio": float(top / rand.mean()) if rand.mean() > 0 else float("inf")}


def find_heads(model, examples: Sequence, k: int = 5, exact: bool = True, batch_size: int = 16,
               group_by: str | None = None, ig_steps: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Head scores on the counter-pairs of ``examples`` and the top-k selection.

    ``group_by="relation_set"`` (or any callable-free key: "task", "a_relation", ...) scores each group separately
    too; the returned scores then carry a ``group`` column ("all" for the pooled run).
    """
    pairs = counter_pairs(model, examples)
    scores = head_scores(model, pairs, exact=exact, batch_size=batch_size, ig_steps=ig_steps)
    scores = scores.assign(group="all", n_dropped=pairs.dropped)
    frames = [scores]
    if group_by:
        by_id = {ex.pair_id: ex for ex in examples if ex.pair_id}
        keys = [group_key(by_id[p], group_by) for p in pairs.pair_ids]
        for key in sorted(set(keys)):
            idx = [i for i, g in enumerate(keys) if g == key]
            if len(idx) >= 4:
                frames.append(head_scores(model, pairs.subset(idx), exact=exact, batch_size=batch_size,
                                          ig_steps=ig_steps).assign(group=key, n_dropped=0))
    return pd.concat(frames, ignore_index=True), select(scores, k)


def group_key(example, by: str) -> str:
    """Group of an example: "relation_set" = the world in its task name (gar[cities]...), else an attribute."""
    if by == "relation_set":
        return example.task.split("]", 1)[0].removeprefix("gar[")
    return str(getattr(example, by))


def consistency(scores: pd.DataFrame | Mapping[str, pd.DataFrame], k: int = 5, by: str = "score") -> pd.DataFrame:
    """Pairwise agreement of head scores between groups (relation sets, seeds): Spearman of the signed score,
    top-k overlap, and the overlap two random k-sets would have (k^2 / n_heads)."""
    from scipy.stats import spearmanr

    groups = dict(scores) if isinstance(scores, Mapping) else {g: f for g, f in scores.groupby("group")}
    rows = []
    for (ga, fa), (gb, fb) in combinations(groups.items(), 2):
        m = fa.merge(fb, on=["layer", "head"], suffixes=("_a", "_b"))
        ta = set(map(tuple, select(fa, k, by)[["layer", "head"]].to_numpy()))
        tb = set(map(tuple, select(fb, k, by)[["layer", "head"]].to_numpy()))
        rows.append({"group_a": ga, "group_b": gb, "spearman": float(spearmanr(m[f"{by}_a"], m[f"{by}_b"]).statistic),
                     "top_k_overlap": len(ta & tb), "random_overlap": k * k / len(m), "k": k})
    return pd.DataFrame(rows)
