"""Back-patching as a fix: a rescue chosen without the answer, selected on train queries, tested on held-out ones.

Back-patching ("Hopping Too Late") shows that *some* (s, t) pair, chosen per query with the answer known, fixes a
failure: an oracle. Here every rescue is one rule applied to every query, chosen on a train split of queries and
scored on a disjoint test split:

- ``fixed``: one (position, s, t): resid_post(t)[p] := resid_post(s)[p] (back-patching, same query) for every query.
- ``gated``: the same patch applied only where a signal the model has without the answer passes a threshold:
  ``entropy`` / ``margin`` (top-1 minus top-2 logit) of the last position's output, or ``bridge_rank_l{l}``: the
  lens rank at layer l, at t1, of the model's own final top-1 token there (its bridge guess; no label used).
  Pair, signal, direction and threshold (deciles of the train signal) are chosen together on train.
- ``map``: resid_post(t)[p] += W resid_post(s)[p] + b, an affine map (W, b start at 0: the clean model) trained on
  the train split's answers (minibatch cross-entropy through the rest of the frozen model, AdamW, weight decay);
  the pair and the training step are chosen on a validation part of the train split.

Test-split outcome per query: correct before / after (greedy first token == answer); fixes, breaks, net change
(mean of after - before) with a 95% bootstrap interval over queries. Control: the same queries get, instead of the
rescue's change ``delta`` of the residual, a random direction of the same norm (seeded), scored the same way. The
oracle (best pair per query, answer known) is reported on the same test split for scale, labelled as an oracle.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mhop_lens import hooks
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.backpatch import all_pairs
from mhop_lens.analyses.lens import project, ranks
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import DataError
from mhop_lens.forward import run, run_with_cache
from mhop_lens.interventions import replace_positions
from mhop_lens.tokens import encode

Candidate = tuple[str, int, int]  # (position, s, t)


@dataclass
class Features:
    """Clean-run quantities of a list of queries: residuals at the rescue positions, answers, signals."""

    queries: list[TwoHopQuery]
    resid: Float[Tensor, "n layer position d_model"]  # resid_post of every layer at each of ``positions``
    positions: list[str]
    answer: Int[Tensor, " n"]
    correct: Bool[Tensor, " n"]
    signals: pd.DataFrame  # one row per query, one column per signal

    def subset(self, idx: Sequence[int]) -> Features:
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return Features([self.queries[j] for j in idx], self.resid[i], self.positions, self.answer[i],
                        self.correct[i], self.signals.iloc[list(idx)].reset_index(drop=True))


@torch.inference_mode()
def collect(model, queries: Sequence[TwoHopQuery], positions: Sequence[str] = ("last", "t1"),
            batch_size: int = 256) -> Features:
    """One cached forward per batch: resid_post of every layer at ``positions``, clean correctness, signals."""
    queries = list(queries)
    if len(queries) < 2:
        raise DataError("a rescue needs at least 2 queries (train and test splits); pass more with --data/--limit.")
    n_layers = model.cfg.n_layers
    names = [hooks.resid(layer, "post") for layer in range(n_layers)]
    resid, answer, correct, signals = [], [], [], []
    for a in range(0, len(queries), batch_size):
        batch = queries[a:a + batch_size]
        enc = encode(model, [q.prompt for q in batch])
        logits, cache = run_with_cache(model, enc, names)
        rows = torch.arange(len(batch), device=logits.device)
        pos = {p: S.positions(enc, batch, p).to(logits.device) for p in positions}
        resid.append(torch.stack([torch.stack([cache[names[layer]][rows, pos[p]] for p in positions], 1)
                                  for layer in range(n_layers)], 1).float().cpu())
        final = logits[rows, enc.last.to(logits.device)].float()
        e3 = S.entity_tokens(model, batch, "e3").to(logits.device)
        answer.append(e3.cpu())
        correct.append((final.argmax(-1) == e3).cpu())
        top2 = final.topk(2, dim=-1).values
        sig = {"entropy": -(final.log_softmax(-1) * final.softmax(-1)).sum(-1).cpu().numpy(),
               "margin": (top2[:, 0] - top2[:, 1]).cpu().numpy()}
        t1 = S.positions(enc, batch, "t1").to(logits.device)
        guess = logits[rows, t1].argmax(-1)  # the model's own bridge prediction at t1
        for layer in range(n_layers - 1):
            lens = project(model, cache[names[layer]][rows, t1]).float()
            sig[f"bridge_rank_l{layer}"] = ranks(lens, guess).cpu().numpy()
        signals.append(pd.DataFrame(sig))
    return Features(queries, torch.cat(resid), list(positions), torch.cat(answer), torch.cat(correct),
                    pd.concat(signals, ignore_index=True))


def _add_at(delta: Float[Tensor, "n d"], pos: Int[Tensor, " n"]):
    """Hook adding ``delta[i]`` to row i at position ``pos[i]`` (differentiable in ``delta``)."""

    def hook(act, hook=None):
        onehot = torch.zeros(act.shape[:2], dtype=act.dtype, device=act.device)
        onehot[torch.arange(act.shape[0], device=act.device), pos.to(act.device)] = 1
        return act + onehot[..., None] * delta.to(act.dtype)[:, None]

    return hook


def patched_last_logits(model, queries: Sequence[TwoHopQuery], layer: int, position: str,
                        values: Float[Tensor, "n d"], batch_size: int = 256) -> Float[Tensor, "n vocab"]:
    """Last-position logits with resid_post(layer)[position] := values[i] in query i."""
    out = []
    with torch.inference_mode():
        for a in range(0, len(queries), batch_size):
            batch = list(queries[a:a + batch_size])
            enc = encode(model, [q.prompt for q in batch])
            pos = S.positions(enc, batch, position)
            fn = replace_positions(values[a:a + batch_size, None], pos[:, None])
            logits = run(model, enc, [(hooks.resid(layer, "post"), fn)])
            out.append(logits[torch.arange(len(batch)), enc.last.to(logits.device)].float().cpu())
    return torch.cat(out)


def patched_correct(model, f: Features, layer: int, position: str, values: Float[Tensor, "n d"],
                    batch_size: int = 256) -> Bool[Tensor, " n"]:
    return patched_last_logits(model, f.queries, layer, position, values, batch_size).argmax(-1) == f.answer


def random_like(delta: Float[Tensor, "n d"], seed: int) -> Float[Tensor, "n d"]:
    """Random directions (seeded Gaussian, normalised) with the norms of ``delta``'s rows."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(delta.shape, generator=gen)
    return u / u.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)


def bootstrap_interval(change: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                       ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-query changes (resampling queries)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(change, size=(n_boot, len(change)), replace=True).mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def outcome(before: np.ndarray, after: np.ndarray, seed: int = 0) -> dict:
    """Accuracy before/after, fixes, breaks, net change and its 95% bootstrap interval."""
    before, after = before.astype(bool), after.astype(bool)
    change = after.astype(int) - before.astype(int)
    lo, hi = bootstrap_interval(change, seed=seed)
    n_fail, n_ok = int((~before).sum()), int(before.sum())
    fixes, breaks = int((~before & after).sum()), int((before & ~after).sum())
    nan = float("nan")
    return {"acc_before": before.mean(), "acc_after": after.mean(), "fixes": fixes, "breaks": breaks,
            "fix_rate": fixes / n_fail if n_fail else nan, "break_rate": breaks / n_ok if n_ok else nan,
            "net": change.mean(), "net_lo": lo, "net_hi": hi}


# (i) and (ii) ----------------------------------------------------------------------------------------------------
def pair_outcomes(model, f: Features, candidates: Sequence[Candidate], batch_size: int = 256
                  ) -> dict[Candidate, Bool[Tensor, " n"]]:
    """Correctness of every query under each fixed back-patch candidate."""
    out = {}
    for position, s, t in candidates:
        p = f.positions.index(position)
        out[(position, s, t)] = patched_correct(model, f, t, position, f.resid[:, s, p], batch_size)
    return out


def select_gate(signals: pd.DataFrame, before: np.ndarray, after: np.ndarray, quantiles: Sequence[float]
                ) -> dict:
    """Best (signal, direction, threshold) for applying a patch: the gate maximising the net change on these
    queries. Thresholds are quantiles of each signal; ``above`` applies where signal > threshold."""
    best = {"net": -np.inf}
    gain = after.astype(int) - before.astype(int)
    for name in signals.columns:
        x = signals[name].to_numpy(dtype=float)
        for thr in np.unique(np.quantile(x, quantiles)):
            for direction in ("above", "below"):
                gate = x > thr if direction == "above" else x <= thr
                net = (gain * gate).mean()
                if net > best["net"]:
                    best = {"net": net, "signal": name, "direction": direction, "threshold": float(thr)}
    return best


def gate_mask(signals: pd.DataFrame, gate: dict) -> np.ndarray:
    x = signals[gate["signal"]].to_numpy(dtype=float)
    return x > gate["threshold"] if gate["direction"] == "above" else x <= gate["threshold"]


# (iii) -------------------------------------------------------------------------------------------------------------
@dataclass
class AffineMap:
    """delta = resid_s @ weight.T + bias, added to resid_post(t) at ``position``."""

    position: str
    s: int
    t: int
    weight: Float[Tensor, "d d"]
    bias: Float[Tensor, " d"]
    step: int

    def delta(self, f: Features) -> Float[Tensor, "n d"]:
        return f.resid[:, self.s, f.positions.index(self.position)] @ self.weight.T + self.bias


def train_map(model, train: Features, val: Features, candidate: Candidate, steps: int = 120, lr: float = 3e-4,
              weight_decay: float = 0.0, eval_every: int = 10, batch_size: int = 256, seed: int = 0
              ) -> tuple[AffineMap, float]:
    """Fit the affine map of ``candidate`` on ``train`` (seeded minibatches of ``batch_size`` queries, answer
    cross-entropy through the frozen model); return the map at the step with the best validation net change (step 0,
    the unchanged model, included) and that net change. Defaults: a probe on the organism's train split (lr 1e-3
    with weight decay 0.1 and lr 1e-2 never beat the clean model on validation for the t1 pairs; lr 3e-4 did)."""
    position, s, t = candidate
    p = train.positions.index(position)
    torch.manual_seed(seed)
    d = train.resid.shape[-1]
    weight = torch.zeros(d, d, requires_grad=True)
    bias = torch.zeros(d, requires_grad=True)
    opt = torch.optim.AdamW([weight, bias], lr=lr, weight_decay=weight_decay)
    enc = encode(model, [q.prompt for q in train.queries])
    pos = S.positions(enc, train.queries, position)
    x = train.resid[:, s, p]
    for param in model.parameters():
        param.requires_grad_(False)
    best = (AffineMap(position, s, t, weight.detach().clone(), bias.detach().clone(), 0), 0.0)
    val_before = val.correct.numpy()
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        i = torch.randperm(len(x), generator=gen)[:batch_size]
        sub = enc.select(i)
        delta = x[i] @ weight.T + bias
        logits = run(model, sub, [(hooks.resid(t, "post"), _add_at(delta, pos[i]))])
        last = logits[torch.arange(len(i)), sub.last.to(logits.device)]
        loss = torch.nn.functional.cross_entropy(last.float(), train.answer[i].to(last.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            m = AffineMap(position, s, t, weight.detach().clone(), bias.detach().clone(), step)
            after = apply_map(model, val, m).numpy()
            net = float((after.astype(int) - val_before.astype(int)).mean())
            if net > best[1]:
                best = (m, net)
    return best


def apply_map(model, f: Features, m: AffineMap, delta: Tensor | None = None) -> Bool[Tensor, " n"]:
    """Correctness with resid_post(t)[p] += delta (default: the map's delta)."""
    p = f.positions.index(m.position)
    delta = m.delta(f) if delta is None else delta
    return patched_correct(model, f, m.t, m.position, f.resid[:, m.t, p] + delta)


# the whole experiment ----------------------------------------------------------------------------------------------
def split_indices(n: int, train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint train / test query indices."""
    if not 0 < train_fraction < 1:
        raise DataError(f"train_fraction must be between 0 and 1, not {train_fraction}.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = round(train_fraction * n)
    if cut < 1 or cut >= n:
        raise DataError(f"{n} queries cannot be split {train_fraction:.2f} / {1 - train_fraction:.2f}; pass more.")
    return sorted(order[:cut]), sorted(order[cut:])


def run_rescue(model, queries: Sequence[TwoHopQuery], positions: Sequence[str] = ("last", "t1"),
               train_fraction: float = 0.5, val_fraction: float = 0.25, map_steps: int = 120,
               map_candidates: int = 2, seed: int = 0, batch_size: int = 256, progress: bool = True
               ) -> tuple[pd.DataFrame, dict]:
    """The rescue table (one row per method, held-out test split) and the train-split selection details.

    ``map_candidates``: the learned map is trained for this many (position, s, t) pairs, those with the best
    fixed-patch fix rate on the train split (ties: best net), and the pair is then chosen on validation.
    """
    from tqdm.auto import tqdm

    n_layers = model.cfg.n_layers
    f = collect(model, queries, positions, batch_size)
    tr_idx, te_idx = split_indices(len(f.queries), train_fraction, seed)
    train, test = f.subset(tr_idx), f.subset(te_idx)
    candidates = [(p, s, t) for p in positions for s, t in all_pairs(n_layers)]
    steps = tqdm(total=4, desc="rescue", disable=not progress)
    tr_after = pair_outcomes(model, train, candidates, batch_size)
    te_after = pair_outcomes(model, test, candidates, batch_size)
    steps.update(1)
    tr_before, te_before = train.correct.numpy(), test.correct.numpy()
    tr_net = {c: float((a.numpy().astype(int) - tr_before.astype(int)).mean()) for c, a in tr_after.items()}
    rows, details = [], {"n_train": len(train.queries), "n_test": len(test.queries), "train_net": {}}
    details["train_net"] = {f"{p}:{s}>{t}": v for (p, s, t), v in tr_net.items()}

    def row(method, cand, gate, after, delta_rows, applied, train_value, extra_seed):
        """One table row: outcome on test and the random-direction control on the same applied queries."""
        position, s, t = cand
        p = test.positions.index(position)
        control = te_before.copy()
        if applied.any():
            idx = np.flatnonzero(applied)
            sub = test.subset(idx.tolist())
            rand = sub.resid[:, t, p] + random_like(delta_rows[idx], seed + extra_seed)
            control[idx] = patched_correct(model, sub, t, position, rand, batch_size).numpy()
        out = {"method": method, "position": position, "s": s, "t": t, "gate": gate,
               "n_train": len(train.queries), "n_test": len(test.queries), "n_failures": int((~te_before).sum()),
               "n_applied": int(applied.sum()), "train_net": train_value}
        out |= outcome(te_before, after, seed)
        c = outcome(te_before, control, seed)
        out |= {"control_acc_after": c["acc_after"], "control_fixes": c["fixes"], "control_breaks": c["breaks"],
                "control_net": c["net"], "control_net_lo": c["net_lo"], "control_net_hi": c["net_hi"]}
        return out

    # (i) one fixed pair
    best = max(candidates, key=lambda c: tr_net[c])
    p = test.positions.index(best[0])
    delta = test.resid[:, best[1], p] - test.resid[:, best[2], p]
    applied = np.ones(len(test.queries), dtype=bool)
    rows.append(row("fixed pair", best, "", te_after[best].numpy(), delta, applied, tr_net[best], 1))
    # (ii) the pair gated by a signal without the answer
    quantiles = np.linspace(0.1, 0.9, 9)
    gates = {c: select_gate(train.signals, tr_before, tr_after[c].numpy(), quantiles) for c in candidates}
    gbest = max(candidates, key=lambda c: gates[c]["net"])
    g = gates[gbest]
    details["gate"] = {"candidate": list(gbest), **g}
    mask = gate_mask(test.signals, g)
    p = test.positions.index(gbest[0])
    delta = test.resid[:, gbest[1], p] - test.resid[:, gbest[2], p]
    after = np.where(mask, te_after[gbest].numpy(), te_before)
    label = f"{g['signal']} {'>' if g['direction'] == 'above' else '<='} {g['threshold']:.4g}"
    rows.append(row("gated pair", gbest, label, after, delta, mask, g["net"], 2))
    steps.update(1)
    # (iii) a learned affine map from layer s into layer t
    tr_in, va_in = split_indices(len(train.queries), 1 - val_fraction, seed + 1)
    fit, val = train.subset(tr_in), train.subset(va_in)
    fail = ~train.correct.numpy()
    score = {c: (float(tr_after[c].numpy()[fail].mean()) if fail.any() else 0.0, tr_net[c]) for c in candidates}
    shortlist = sorted(candidates, key=lambda c: score[c], reverse=True)[:map_candidates]
    maps = [train_map(model, fit, val, c, steps=map_steps, seed=seed)
            for c in tqdm(shortlist, desc="learned map", disable=not progress)]
    details["map"] = [{"candidate": list(c), "val_net": v, "step": m.step} for c, (m, v) in zip(shortlist, maps,
                                                                                                strict=True)]
    m, v = max(maps, key=lambda mv: mv[1])
    delta = m.delta(test)
    after = apply_map(model, test, m, delta).numpy()
    rows.append(row("learned map", (m.position, m.s, m.t), f"affine, step {m.step}", after, delta,
                    np.ones(len(test.queries), dtype=bool), v, 3))
    steps.update(1)
    # the oracle, for scale only: any last-position pair fixes the failure (answer known)
    last = [c for c in candidates if c[0] == positions[0]]
    fixed_any = np.zeros(len(test.queries), dtype=bool)
    for c in last:
        fixed_any |= te_after[c].numpy() & ~te_before
    oracle = {"method": "oracle (answer known; not a fix)", "position": positions[0], "s": -1, "t": -1,
              "gate": "best pair per failure", "n_train": 0, "n_test": len(test.queries),
              "n_failures": int((~te_before).sum()), "n_applied": int((~te_before).sum()),
              "fixes": int(fixed_any.sum()), "breaks": 0,
              "fix_rate": fixed_any.sum() / max(1, (~te_before).sum()), "acc_before": te_before.mean(),
              "acc_after": (te_before | fixed_any).mean(), "net": fixed_any.mean()}
    rows.append(oracle)
    steps.update(1)
    steps.close()
    return pd.DataFrame(rows), details
