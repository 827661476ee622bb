"""Inference on the GAR organism's plain HF model: tokenisation as the bridge does it, padding, greedy prediction.

Shared by training (progress curves) and held-out scoring (``evaluate``), so neither imports the other's module
for it (``train`` imports ``evaluate``; ``evaluate`` imports only this).
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerFast

from mhop_lens.organism_gar.world import Row


def encode(tok: PreTrainedTokenizerFast, prompts: list[str]) -> list[list[int]]:
    """BOS + word ids, exactly as TransformerBridge tokenises a string."""
    ids = tok(prompts, add_special_tokens=False)["input_ids"]
    return [[tok.bos_token_id, *r] for r in ids]


def answer_ids(tok: PreTrainedTokenizerFast, rows: list[Row]) -> Int[Tensor, " n"]:
    v = tok.get_vocab()
    return torch.tensor([v[r.answer] for r in rows])


def pad(seqs: list[list[int]], pad_id: int) -> tuple[Int[Tensor, "b pos"], Int[Tensor, " b"]]:
    """Right-padded ids and each row's last real position."""
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


@torch.no_grad()
def predict(model, tok: PreTrainedTokenizerFast, rows: list[Row], batch_size: int = 256) -> Int[Tensor, " n"]:
    """Greedy next-token id (whole vocabulary) after each prompt."""
    model.eval()
    seqs, out = encode(tok, [r.prompt for r in rows]), []
    for i in range(0, len(seqs), batch_size):
        ids, last = pad(seqs[i:i + batch_size], tok.pad_token_id)
        logits = model(ids, attention_mask=(ids != tok.pad_token_id).long()).logits
        out.append(logits[torch.arange(len(last)), last].argmax(-1))
    return torch.cat(out)


def accuracy_by_form(model, tok, rows: list[Row]) -> dict[str, float]:
    hit = (predict(model, tok, rows) == answer_ids(tok, rows)).tolist()
    forms: dict[str, list[bool]] = {}
    for r, h in zip(rows, hit, strict=True):
        forms.setdefault(r.form, []).append(h)
    return {f: sum(v) / len(v) for f, v in sorted(forms.items())}
