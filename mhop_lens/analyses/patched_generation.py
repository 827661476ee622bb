"""Generation from a patched prompt: the patch is applied in the prompt pass, later tokens read the KV cache.

"Hopping Too Late" (``src/patched_generation.py``) patches a hidden state at a prompt position and lets HF
``generate`` continue; its hook skips the one-token cached steps ("After first replacement the hidden state is
cached"). A patch at a prompt position only changes that position and later ones, and later generated tokens see
the prompt through its keys/values, so patching once in the prompt pass and extending the cache gives the same
tokens as re-running the whole (growing) sequence with the patch at every step. ``generate_patched`` does the
former (``cached=True``, default) or the latter (``cached=False``, the plain reference); tests check both agree
token for token on the organism and on tiny GPT-2 / Llama-GQA / NeoX models; ``benchmarks/bench_generation.py``
times them.

Decoding: greedy (``sampling=None``) or seeded sampling with temperature / top-k / top-p applied as HF's
``generate`` does for ``do_sample=True`` (temperature, then top-k, then top-p over the sorted probabilities).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mhop_lens.analyses.hf_compat import FastPathError, cache_kwarg, cache_of, kv_layers
from mhop_lens.forward import run
from mhop_lens.tokens import Encoded

#: The study's generation length (``max_new_tokens=10`` everywhere in its code).
STUDY_NEW_TOKENS = 10


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; the defaults are HF ``GenerationConfig``'s (the study's ``do_sample=True`` on GPT-2)."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    @classmethod
    def of_model(cls, model) -> Sampling:
        """The settings the model's own ``generation_config`` gives ``generate(do_sample=True)`` (e.g. Llama-2/3:
        temperature 0.6, top-p 0.9), falling back to HF's defaults."""
        cfg = getattr(getattr(model, "original_model", None), "generation_config", None)

        def get(name, default):
            value = getattr(cfg, name, None) if cfg is not None else None
            return default if value is None else value

        return cls(float(get("temperature", 1.0)), int(get("top_k", 50)), float(get("top_p", 1.0)))

    def filter(self, logits: Float[Tensor, "rows vocab"]) -> Float[Tensor, "rows vocab"]:
        """Logits with temperature applied and tokens outside top-k / top-p set to -inf (HF's warper order)."""
        logits = logits / self.temperature if self.temperature != 1.0 else logits
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum <= 1 - self.top_p
            drop[:, -1] = False  # keep at least one token
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return logits


def _next(logits: Float[Tensor, "rows vocab"], sampling: Sampling | None, gen: torch.Generator | None
          ) -> Int[Tensor, " rows"]:
    if sampling is None:
        return logits.argmax(-1)
    probs = sampling.filter(logits.float()).softmax(-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).flatten().to(logits.device)


@torch.inference_mode()
def generate_patched(
    model,
    enc: Encoded,
    fwd_hooks: Sequence,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    seed: int = 0,
    cached: bool = True,
    prefix_kv: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> Int[Tensor, "rows new"]:
    """``max_new_tokens`` continuation ids of a left-padded batch whose prompt pass runs with ``fwd_hooks``.

    ``cached=True``: hooks active in the prompt pass only, then one-token steps over the KV cache.
    ``cached=False``: the whole sequence re-run at every step with the hooks active on its prompt positions
    (``_on_prompt``; prompt positions do not see later tokens, so both give the same tokens). Sampling draws
    from one generator seeded with ``seed`` per call: reproducible for a fixed batch. Rows are not stopped at
    end-of-sequence (cut them when decoding).

    ``prefix_kv`` (cached only; from :func:`prefix_keys_values`): keys/values of the first n tokens, the same in
    every row and unchanged by the hooks (a patch at a later position cannot change them), shared by all rows;
    the prompt pass then runs the later positions only, and the hooks see those (prompt position p is p - n in
    their activations). Ask :func:`prefix_sharing_cause` first whether the model reproduces the plain prompt pass
    this way.
    """
    if enc.padding_side != "left":
        raise ValueError("generate_patched needs a left-padded batch (encode(..., padding_side='left')).")
    gen = None if sampling is None else torch.Generator().manual_seed(seed)
    tokens, mask = enc.tokens, enc.attention_mask
    new = []
    if cached and prefix_kv:
        logits, kv = _after_prefix(model, tokens, mask, fwd_hooks, prefix_kv)
        if not _cache_filled(kv, tokens.shape[1]):
            raise FastPathError("the prompt pass after a shared prefix left no usable KV cache; call "
                                "generate_patched without prefix_kv (prefix_sharing_cause says why).")
    elif cached:
        logits, kv = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=list(fwd_hooks),
                                          return_type="logits_and_cache", use_cache=True)
        cached = _cache_filled(kv, tokens.shape[1])
    width = enc.tokens.shape[1]
    prompt_hooks = [(name, _on_prompt(name, fn, width)) for name, fn in fwd_hooks]
    for step in range(max_new_tokens):
        if not cached:
            logits = run(model, Encoded(tokens, mask, enc.offsets, mask.sum(1), "left", enc.prompts), prompt_hooks)
        nxt = _next(logits[:, -1].float(), sampling, gen)
        new.append(nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if cached and step + 1 < max_new_tokens:
            logits, kv = model.run_with_hooks(nxt[:, None], attention_mask=mask, fwd_hooks=[],
                                              return_type="logits_and_cache", use_cache=True,
                                              **{cache_kwarg(model): kv})
    return torch.stack(new, 1)


@torch.inference_mode()
def prefix_keys_values(model, enc: Encoded, n: int) -> list[tuple[Tensor, Tensor]]:
    """Keys/values of row 0's first ``n`` tokens, one row per layer (for ``generate_patched(prefix_kv=)``)."""
    _, kv = model.run_with_hooks(enc.tokens[:1, :n], attention_mask=enc.attention_mask[:1, :n], fwd_hooks=[],
                                 return_type="logits_and_cache", use_cache=True)
    return kv_layers(kv)


def _after_prefix(model, tokens: Int[Tensor, "rows pos"], mask: Int[Tensor, "rows pos"], fwd_hooks: Sequence,
                  prefix_kv: Sequence[tuple[Tensor, Tensor]]):
    """(logits, cache) of the prompt's positions after the prefix, every row reading ``prefix_kv`` (expanded to
    the rows, not copied)."""
    rows, n = tokens.shape[0], prefix_kv[0][0].shape[-2]
    cache = cache_of([(k.expand(rows, *k.shape[1:]), v.expand(rows, *v.shape[1:])) for k, v in prefix_kv])
    return model.run_with_hooks(tokens[:, n:], attention_mask=mask, fwd_hooks=list(fwd_hooks),
                                return_type="logits_and_cache", use_cache=True, **{cache_kwarg(model): cache})


@torch.inference_mode()
def prefix_sharing_cause(model, enc: Encoded, shared_prefix: int) -> str | None:
    """None when a prompt pass over a shared ``shared_prefix``-token prefix (``generate_patched(prefix_kv=)``)
    gives the plain prompt pass's last logits on row 0 of ``enc``; else why not (one line). Decided once per model,
    prompt width and prefix length (windowed models past their window, or a transformers release that returns no
    cache through the bridge, are refused here rather than giving other tokens)."""
    from mhop_lens.analyses.partial_forward import _verdicts, describe, same_computation

    verdicts = _verdicts(model, "prefix_generation")
    key = (enc.tokens.shape[1], shared_prefix, str(enc.tokens.device))
    if key not in verdicts:
        row = enc.select([0])
        try:
            plain = run(model, row)[:, -1]
            shared, kv = _after_prefix(model, row.tokens, row.attention_mask, [],
                                       prefix_keys_values(model, row, shared_prefix))
            if not _cache_filled(kv, row.tokens.shape[1], warn=False):
                verdicts[key] = "the prompt pass after a shared prefix left no usable KV cache"
            elif not same_computation(shared[:, -1], plain):
                diff = float((shared[:, -1].float() - plain.float()).abs().max())
                verdicts[key] = f"a prompt pass over a shared prefix differs from the plain one by {diff:.3g}"
            else:
                verdicts[key] = None
        except Exception as e:  # noqa: BLE001 - any failure is a cause; the plain path decides what is wrong
            verdicts[key] = describe(e)
    return verdicts[key]


def _on_prompt(name, fn, width: int):
    """``fn`` applied to the prompt's ``width`` positions of a longer re-run sequence (dims 2 and 3 of attention
    scores / patterns, dim 1 of everything else), so hooks built for the prompt (a knockout mask of the prompt's
    shape) act on re-runs exactly as in the prompt pass; generated positions are left alone, as the study's hook
    leaves the cached steps alone."""
    dims = (2, 3) if isinstance(name, str) and name.endswith(("attn_scores", "pattern")) else (1,)

    def hook(act: Tensor, hook=None) -> Tensor:
        if all(act.shape[d] == width for d in dims):
            return fn(act, hook=hook)
        idx = tuple(slice(None, width) if d in dims else slice(None) for d in range(act.dim()))
        out = act.clone()
        out[idx] = fn(act[idx], hook=hook)
        return out

    return hook


def _cache_filled(kv, width: int, warn: bool = True) -> bool:
    """Whether the prompt pass left a cache of all ``width`` positions. Some transformers releases (5.24) ignore
    the cache the bridge hands over and return an empty one; then generation re-runs every step (same tokens,
    slower) and says so once."""
    ok = kv is not None and hasattr(kv, "get_seq_length") and kv.get_seq_length() == width
    if not ok and warn and not _WARNED:
        _WARNED.append(True)
        warnings.warn("patched generation: this transformers version returned no usable KV cache through the "
                      "bridge; re-running the whole sequence at every generated token instead (same tokens, "
                      "slower).", stacklevel=3)
    return ok


_WARNED: list[bool] = []


def decode_new(model, new: Int[Tensor, "rows new"]) -> list[str]:
    """Generated text per row, cut at the first end-of-sequence token, special tokens skipped, stripped and with
    newlines as spaces (the study's ``decode_generated``)."""
    tok = model.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    out = []
    for ids in new.tolist():
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        out.append(tok.decode(ids, skip_special_tokens=True).strip().replace("\n", " "))
    return out


def answer_aliases(query, entity: str = "e3") -> list[str]:
    """Label and aliases longer than one character of ``entity`` of a ``TwoHopQuery`` (the study's
    ``get_answers``)."""
    label, *aliases = (a.strip() for a in query.answers(entity))
    return list(dict.fromkeys([label, *(a for a in aliases if len(a) > 1)]))


def mentions_any(text: str, answers: Sequence[str]) -> bool:
    """The study's ``check_answer_in_pred``: some answer is a case-insensitive substring of ``text`` (no word
    boundaries)."""
    low = text.lower()
    return any(a.lower() in low for a in answers)
