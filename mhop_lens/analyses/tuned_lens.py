"""Tuned lens (Belrose et al. 2023, "Eliciting Latent Predictions from Transformers with the Tuned Lens").

The logit lens reads layer l's residual through the model's final norm and unembedding as it is; early layers
live in a slightly different basis, so the logit lens reads them late or not at all. A tuned lens learns one
affine *translator* per layer, ``h -> h + A_l h + b_l`` (A_l, b_l start at zero, so training starts from the logit
lens), trained to minimise KL(final-layer distribution || lens distribution) over every position of the model's
own prompts. The paper's choices kept here: residual form with zero init, forward KL to the model's own output,
every position, the last layer left as the identity (its lens *is* the output). Departures: Adam instead of
Nesterov SGD, and the training prompts are the user's (the organism's trained two-hop queries by default) instead
of a pre-training corpus, which the organism does not have.

Use it through ``run_lens(model, queries, translator=lens)``: the ``resid`` site then reads ``lens(layer, h)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mhop_lens import hooks
from mhop_lens.analyses.lens import RESID, project, run_lens
from mhop_lens.errors import DataError
from mhop_lens.forward import run_with_cache
from mhop_lens.tokens import encode


class TunedLens(nn.Module):
    """One affine translator per layer: ``lens(layer, h) = h + h @ A[layer] + b[layer]`` (identity at init)."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, layer: int, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        w, b = self.weight[layer], self.bias[layer]
        return h + h.to(w.dtype) @ w + b

    def save(self, directory: str | Path, meta: dict | None = None) -> Path:
        """``tuned_lens.safetensors`` + ``tuned_lens.json`` (shapes and training record) in ``directory``."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.detach().contiguous(), "bias": self.bias.detach().contiguous()},
                  str(path / "tuned_lens.safetensors"))
        info = {"n_layers": self.weight.shape[0], "d_model": self.weight.shape[1], **(meta or {})}
        (path / "tuned_lens.json").write_text(json.dumps(info, indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path, model=None) -> TunedLens:
        """A saved lens; with ``model``, checked against its shape."""
        path = Path(directory)
        file = path / "tuned_lens.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"no tuned lens at {str(path)!r}: train one with `mhop-lens tuned-lens train --out DIR`.")
        tensors = load_file(str(file))
        lens = cls(*tensors["weight"].shape[:2])
        lens.load_state_dict(tensors)
        if model is not None and (lens.weight.shape[0], lens.weight.shape[1]) != (model.cfg.n_layers,
                                                                                   model.cfg.d_model):
            raise DataError(f"the tuned lens at {str(path)!r} has {lens.weight.shape[0]} layers x d_model "
                            f"{lens.weight.shape[1]}, the model {model.cfg.n_layers} x {model.cfg.d_model}: "
                            "train one for this model.")
        return lens.to(next(iter(model.parameters())).device) if model is not None else lens


@torch.no_grad()
def collect(model, prompts: Sequence[str], batch_size: int = 64
            ) -> tuple[Float[Tensor, "layer tokens d_model"], Float[Tensor, "tokens vocab"]]:
    """Every layer's residual (``hook_resid_post``) and the model's final log-probs at every real position."""
    names = [hooks.resid(layer, "post") for layer in range(model.cfg.n_layers)]
    resid, target = [], []
    for a in range(0, len(prompts), batch_size):
        enc = encode(model, list(prompts[a : a + batch_size]))
        logits, cache = run_with_cache(model, enc, names)
        real = enc.attention_mask.bool().to(logits.device)
        resid.append(torch.stack([cache[name][real] for name in names]))
        target.append(logits[real].float().log_softmax(-1))
    return torch.cat(resid, 1), torch.cat(target)


def train_tuned_lens(model, prompts: Sequence[str], steps: int = 300, lr: float = 1e-3, batch_tokens: int = 512,
                     seed: int = 0, progress: bool = False) -> tuple[TunedLens, dict]:
    """A tuned lens for ``model`` fitted on every position of ``prompts`` (see the module doc).

    Returns the lens and a record: KL of the logit lens and of the tuned lens per layer on a held-out tenth of the
    positions (nats), so a caller can see that it helps before using it.
    """
    if len(prompts) < 10:
        raise DataError(f"a tuned lens needs at least 10 training prompts, got {len(prompts)}.")
    resid, target = collect(model, prompts)
    n_layers, n_tok, d_model = resid.shape
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_tok, generator=gen)
    test, train = order[: max(1, n_tok // 10)], order[max(1, n_tok // 10):]
    lens = TunedLens(n_layers, d_model).to(resid.device)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    trained = list(range(n_layers - 1))  # the last layer's lens is the model's output: identity
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():  # gradients reach the lens only; the model is restored afterwards
            p.requires_grad_(False)
        for step in range(steps):
            idx = train[torch.randint(len(train), (min(batch_tokens, len(train)),), generator=gen)]
            loss = sum(_kl(model, lens, resid[layer, idx], target[idx], layer) for layer in trained)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress and step % 50 == 0:
                print(f"tuned lens step {step}: mean KL {loss.item() / max(1, len(trained)):.4f}")
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    with torch.no_grad():
        record = {"prompts": len(prompts), "positions": n_tok, "steps": steps, "lr": lr, "seed": seed,
                  "heldout_kl_logit_lens": [float(_kl(model, None, resid[layer, test], target[test], layer))
                                            for layer in range(n_layers)],
                  "heldout_kl_tuned_lens": [float(_kl(model, lens, resid[layer, test], target[test], layer))
                                            for layer in range(n_layers)]}
    return lens, record


def _kl(model, lens: TunedLens | None, h: Float[Tensor, "n d_model"], target: Float[Tensor, "n vocab"],
        layer: int) -> Tensor:
    """Mean KL(final || lens at ``layer``) in nats."""
    x = h if lens is None else lens(layer, h)
    logp = project(model, x).float().log_softmax(-1)
    return (target.exp() * (target - logp)).sum(-1).mean()


def earliest_decoding(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (lens, position, entity, correct): how many queries decode the entity top-1 at some layer, and the mean
    earliest such layer. ``frame``: ``run_lens`` rows of the ``resid`` site (one or both lenses)."""
    rows = []
    resid = frame[frame["site"].isin(RESID)]
    for (lens, position, correct), part in resid.groupby(["lens", "position", "correct"], sort=True):
        for entity in ("e2", "e3"):
            top = part[part[f"{entity}_rank"] == 0]
            first = top.groupby("qid")["layer"].min()
            rows.append({"lens": lens, "position": position, "correct": bool(correct), "entity": entity,
                         "n": part["qid"].nunique(), "decoded": len(first),
                         "mean_earliest_layer": float(first.mean()) if len(first) else float("nan")})
    return pd.DataFrame(rows)


def compare_lenses(model, queries, lens: TunedLens, positions: Sequence[str] = ("t1", "last"),
                   batch_size: int = 32) -> pd.DataFrame:
    """``earliest_decoding`` of the logit lens and of ``lens`` on the same queries, side by side."""
    frames = [run_lens(model, queries, positions=positions, sites=("resid_post",), batch_size=batch_size,
                       progress=False, translator=t) for t in (None, lens)]
    return earliest_decoding(pd.concat(frames, ignore_index=True))
