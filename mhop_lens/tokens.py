"""Batched tokenisation: BOS the way the model expects, padding with its attention mask, character offsets.

This is the one place the suite pads. TransformerLens 4.3 gives silently wrong logits for a left-padded token
tensor passed without ``attention_mask``; every forward in the suite therefore passes ``Encoded.attention_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Int
from torch import Tensor

from mhop_lens.errors import PromptTooLongError, SpanError
from mhop_lens.positions import Span, last_token


@dataclass
class Encoded:
    """A padded batch of prompts with everything needed to find positions in it."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    offsets: list[list[tuple[int, int] | None]]  # per row, per position; None for BOS and padding
    lengths: Int[Tensor, " batch"]  # real tokens per row (BOS included)
    padding_side: str
    prompts: list[str]

    @property
    def last(self) -> Int[Tensor, " batch"]:
        """Position of each row's last real token."""
        if self.padding_side == "left":
            return torch.full_like(self.lengths, self.tokens.shape[1] - 1)
        return self.lengths - 1

    def position(self, row: int, span: Span, which: Literal["last", "first"] = "last") -> int:
        """Token position (in the padded tensor) of the last/first token of a character span of row ``row``."""
        from mhop_lens.positions import first_token

        find = last_token if which == "last" else first_token
        return find(self.offsets[row], span)

    def positions(self, spans: Sequence[Span], which: Literal["last", "first"] = "last") -> Int[Tensor, " batch"]:
        """One position per row for one span per row."""
        return torch.tensor([self.position(i, s, which) for i, s in enumerate(spans)], dtype=torch.long)

    def select(self, rows: Int[Tensor, " n"] | Sequence[int] | slice) -> Encoded:
        """The rows ``rows`` (indices, repeats allowed, or a slice) as a batch of their own."""
        if isinstance(rows, slice):
            idx = list(range(len(self.prompts)))[rows]
        else:
            idx = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        t = torch.tensor(idx, dtype=torch.long, device=self.tokens.device)
        return Encoded(self.tokens[t], self.attention_mask[t], [self.offsets[i] for i in idx],
                       self.lengths[t.to(self.lengths.device)], self.padding_side, [self.prompts[i] for i in idx])

    def repeat(self, k: int) -> Encoded:
        """The batch stacked ``k`` times (copy j holds rows j*n .. j*n + n - 1)."""
        return Encoded(self.tokens.repeat(k, 1), self.attention_mask.repeat(k, 1), self.offsets * k,
                       self.lengths.repeat(k), self.padding_side, self.prompts * k)

    def to(self, device) -> Encoded:
        self.tokens = self.tokens.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self


def _bos_id(model) -> int | None:
    tok = model.tokenizer
    if not getattr(model.cfg, "default_prepend_bos", True):
        return None
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _pad_id(model) -> int:
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, 0):
        if cand is not None:
            return cand
    return 0


def tokenize_one(model, prompt: str) -> tuple[list[int], list[tuple[int, int] | None]]:
    """Token ids and character offsets of one prompt, BOS prepended when the model expects it."""
    return tokenize_many(model, [prompt])[0]


def _backend(tok):
    """The Rust tokenizer behind a fast HF tokenizer, when calling it directly gives what ``tok(...)`` gives.

    ``tok(texts, add_special_tokens=False)`` first resets the backend's padding / truncation / special-token
    splitting and then calls ``encode_batch``; skipping the wrapper (and its per-row dict conversion) is only the
    same when those are already off, so anything else returns None and the wrapper is used.
    """
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is None or backend.padding is not None or backend.truncation is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tok, "split_special_tokens", False)):
        return None
    return backend


def _ids_and_offsets(tok, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of every text, no special tokens added, in one batched call."""
    backend = _backend(tok)
    if backend is not None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [list(ids) for ids in enc["input_ids"]], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]


def tokenize_many(model, prompts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int] | None]]]:
    """``tokenize_one`` for many prompts in one tokenizer call (a fast tokenizer encodes the batch at once)."""
    ids, offsets = _ids_and_offsets(model.tokenizer, list(prompts))
    bos = _bos_id(model)
    head_ids, head_offsets = ([bos], [None]) if bos is not None else ([], [])
    return [(head_ids + row, head_offsets + offs) for row, offs in zip(ids, offsets, strict=True)]


def encode(
    model,
    prompts: str | Sequence[str],
    padding_side: Literal["left", "right"] = "left",
    device=None,
) -> Encoded:
    """Tokenise and pad a batch; left padding keeps every row's last token at position -1."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SpanError("no prompts to encode: the dataset is empty (check --limit, --shard and the data file).")
    rows = tokenize_many(model, prompts)
    n_ctx = getattr(model.cfg, "n_ctx", None)
    width = max(len(ids) for ids, _ in rows)
    if n_ctx and width > n_ctx:
        worst = max(range(len(rows)), key=lambda i: len(rows[i][0]))
        raise PromptTooLongError(
            f"prompt {worst} has {len(rows[worst][0])} tokens but the model's context is {n_ctx} tokens: "
            f"shorten it (fewer in-context examples, shorter templates) or use a model with a longer context. "
            f"Prompt starts {prompts[worst][:80]!r}."
        )
    pad = _pad_id(model)
    left = padding_side == "left"
    ids, masks, offsets = [], [], []
    for row, offs in rows:
        gap = width - len(row)
        ids.append([pad] * gap + row if left else row + [pad] * gap)
        masks.append([0] * gap + [1] * len(row) if left else [1] * len(row) + [0] * gap)
        offsets.append([None] * gap + offs if left else offs + [None] * gap)
    mask = torch.tensor(masks, dtype=torch.long)
    enc = Encoded(torch.tensor(ids, dtype=torch.long), mask, offsets, mask.sum(1), padding_side, prompts)
    return enc.to(device or model.cfg.device)


def single_token_id(model, text: str, *, what: str = "answer") -> int:
    """The id of ``text`` when it is exactly one token (leading space kept); raises naming the fix otherwise."""
    ids = _known_ids(model, text)
    if len(ids) != 1:
        pieces = model.tokenizer.convert_ids_to_tokens(ids)
        raise SpanError(
            f"the {what} {text!r} is {len(ids)} tokens {pieces} for this tokenizer; this measure needs one token. "
            "Use its first token (scorer='first-token'), the full-answer log-prob scorer, or a single-token alias."
        )
    return ids[0]


def first_token_id(model, text: str) -> int:
    """Id of the first token of ``text`` (used for answer ranks, as in logit-lens studies)."""
    ids = _known_ids(model, text)
    if not ids:
        raise SpanError(f"{text!r} tokenises to nothing; give a non-empty answer.")
    return ids[0]


def first_token_ids(model, texts: Sequence[str]) -> Int[Tensor, " n"]:
    """``first_token_id`` of every text, tokenised in one call (answer ids of a whole batch)."""
    texts = list(texts)
    if not texts:
        return torch.zeros(0, dtype=torch.long)
    ids, _ = _ids_and_offsets(model.tokenizer, texts)
    unk = getattr(model.tokenizer, "unk_token_id", None)
    for text, row in zip(texts, ids, strict=True):
        if not row or (unk is not None and row[0] == unk):
            first_token_id(model, text)  # raises the explanatory error
    return torch.tensor([row[0] for row in ids], dtype=torch.long)


def _known_ids(model, text: str) -> list[int]:
    """Token ids of ``text``; a first word outside a word-level vocabulary raises instead of ranking <unk>."""
    tok = model.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if ids and unk is not None and ids[0] == unk and str(tok.unk_token) not in text:
        raise SpanError(f"{text!r} starts with a word outside this model's vocabulary (it tokenises to "
                        f"{tok.unk_token}); "
                        "use entities the model knows (e.g. --data organism for the organism) or another model.")
    return ids
