"""The one place that reads transformers' KV-cache internals and the model config fields the fast path depends on.

transformers changes these between minor versions (5.24 renamed the attention's ``past_key_values`` argument to
``cache``; TransformerLens 4.3's attention bridges still read only ``past_key_values`` / ``layer_past``, so a forward
asked for a cache returned an empty one). Everything here is guarded: a shape it does not recognise raises
``FastPathError`` naming what it found, which the analyses turn into one warning and the reference path.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from mhop_lens.model_state import model_state

try:  # the base class of every cache in transformers >= 4.36
    from transformers import Cache
except ImportError:  # pragma: no cover - guarded for older / newer layouts
    Cache = DynamicCache


class FastPathError(Exception):
    """The KV-reusing machinery cannot serve this model or input; the message names the cause."""


def is_cache(value) -> bool:
    return isinstance(value, Cache)


def kv_layers(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) of every layer of an HF cache, each [batch, kv_heads, pos, d_head]; raises ``FastPathError``
    when the cache is of an unknown layout or was left empty by the forward that should have filled it."""
    if cache is None:
        raise FastPathError("the forward returned no KV cache")
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    elif hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):  # transformers < 4.56
        pairs = list(zip(cache.key_cache, cache.value_cache, strict=True))
    else:
        raise FastPathError(f"unrecognised KV cache layout {type(cache).__name__}")
    if not pairs:
        raise FastPathError("the forward returned an empty KV cache (no layers)")
    for i, (k, v) in enumerate(pairs):
        if not isinstance(k, Tensor) or not isinstance(v, Tensor) or k.dim() != 4 or k.shape[-2] != v.shape[-2]:
            raise FastPathError(f"layer {i} of the returned KV cache holds no keys/values (the attention did not "
                                "write to the cache it was given)")
    return pairs


def seq_length(cache) -> int:
    """Positions held by ``cache`` (0 for None)."""
    if cache is None:
        return 0
    return int(kv_layers(cache)[0][0].shape[-2])


def cache_of(layers: Sequence[tuple[Tensor, Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these (keys, values) per layer (no copy).

    ``DynamicCache.update`` on an empty layer concatenates onto an empty tensor, i.e. copies; building the cache
    that way would copy every prefix twice before the blocks copy it again when they append the new positions.
    """
    cache = DynamicCache()
    for layer, (k, v) in enumerate(layers):
        cache.update(k[..., :0, :], v[..., :0, :], layer)  # initialises the layer (dtype, device) at no cost
        entry = cache.layers[layer] if hasattr(cache, "layers") else None
        if entry is not None and hasattr(entry, "keys"):
            entry.keys, entry.values = k, v
        else:  # pragma: no cover - older layout
            cache.key_cache[layer], cache.value_cache[layer] = k, v
    return cache


def empty_cache() -> DynamicCache:
    return DynamicCache()


def ensure_cache_plumbing(model) -> None:
    """Make every bridge attention of ``model`` see the KV cache its HF block passes, whatever the argument name.

    TransformerLens 4.3's attention bridges update a cache only when it arrives as ``past_key_values`` or
    ``layer_past``; transformers 5.24 blocks pass ``cache=``. A pre-hook copies it across (idempotent, installed
    once per model; a no-op where the name already matches)."""
    state = model_state(model)
    if state.get("cache_plumbing"):
        return
    for module in model.modules():
        if hasattr(module, "_update_kv_cache"):
            module.register_forward_pre_hook(_cache_prehook, with_kwargs=True)
    state["cache_plumbing"] = True


def _cache_prehook(module, args, kwargs):
    if kwargs.get("past_key_values") is None and kwargs.get("layer_past") is None and is_cache(kwargs.get("cache")):
        return args, {**kwargs, "past_key_values": kwargs["cache"]}
    return None


def cache_kwarg(model) -> str:
    """The keyword the wrapped HF model's forward takes a KV cache by: ``cache`` (transformers 5.24, where
    ``past_key_values`` is deprecated, to be removed in 5.40) or ``past_key_values`` (5.23, whose forward silently
    ignores ``cache``: a prompt pass after a prefix would then see no prefix). Read once per model."""
    state = model_state(model)
    if "cache_kwarg" not in state:
        hf = getattr(model, "original_model", None)
        params = inspect.signature(hf.forward).parameters if hf is not None else {}
        state["cache_kwarg"] = "cache" if "cache" in params else "past_key_values"
    return state["cache_kwarg"]


def hf_config(model):
    """The wrapped HF model's config (None when the bridge holds none)."""
    return getattr(getattr(model, "original_model", None), "config", None)


def architecture(model) -> str:
    """A short name of the model's architecture for messages (HF ``model_type``, else TL's ``cfg.architecture``)."""
    cfg = hf_config(model)
    name = getattr(cfg, "model_type", None) or getattr(getattr(model, "cfg", None), "architecture", None)
    return str(name or type(model).__name__)


#: HF config fields that hold a local / sliding / chunked attention window (tokens).
WINDOW_FIELDS = ("sliding_window", "window_size", "attention_chunk_size", "local_attention_window")


def attention_windows(model) -> tuple[int, ...]:
    """Every local attention window the model may apply (sorted, empty when none), read from its HF config.

    A window is counted unless the config switches it off (``use_sliding_window=False``, or ``layer_types`` /
    ``attention_layers`` naming no sliding / local / chunked layer). Erring towards a window only costs speed:
    prompts at least that long take the reference path."""
    cfg = hf_config(model)
    if cfg is None:
        return ()
    if getattr(cfg, "use_sliding_window", True) is False:
        return ()
    kinds = getattr(cfg, "layer_types", None) or getattr(cfg, "attention_layers", None)
    if kinds is not None and not any(any(w in str(k) for w in ("sliding", "local", "chunk")) for k in kinds):
        return ()
    found = set()
    for name in WINDOW_FIELDS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)
    return tuple(sorted(found))


def _readout_candidates(model) -> list[tuple[float, float | None]]:
    """(scale, soft cap) pairs the HF model may apply after its unembedding, from its config: Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, Gemma-2/3's ``final_logit_softcapping``. The bridge may already
    fold a scale into its ``unembed`` (it does for Cohere), so each is tried with and without the scale."""
    cfg = hf_config(model)
    scale = 1.0
    for name, invert in (("logit_scale", False), ("logits_scaling", True)):
        value = getattr(cfg, name, None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value:
            scale = scale / float(value) if invert else scale * float(value)
    cap = getattr(cfg, "final_logit_softcapping", None)
    cap = float(cap) if isinstance(cap, int | float) and not isinstance(cap, bool) and cap > 0 else None
    out = [(scale, cap), (1.0, cap), (scale, None), (1.0, None)]
    return list(dict.fromkeys(out))


def apply_readout(logits: Tensor, scale: float, cap: float | None) -> Tensor:
    """``cap * tanh(scale * logits / cap)`` (without a cap: ``scale * logits``)."""
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def logit_readout(model) -> tuple[float, float | None]:
    """(scale, soft cap) that turn ``model.unembed(model.ln_final(resid))`` into the model's own logits.

    Read from the model: candidates from its config (``_readout_candidates``), the one that reproduces its forward
    on a short probe is kept on the model. Without any such field: (1.0, None), no probe."""
    state = model_state(model)
    if state.get("readout") is not None:
        return state["readout"]
    candidates = _readout_candidates(model) if hf_config(model) is not None else [(1.0, None)]
    chosen = candidates[0]
    if len(candidates) > 1:
        chosen = _probe_readout(model, candidates)
    state["readout"] = chosen
    return chosen


def _probe_readout(model, candidates):
    n_layers = model.cfg.n_layers
    vocab = int(model.cfg.d_vocab)
    tokens = (torch.arange(8, device=model.cfg.device) * 7919 % max(vocab - 3, 1) + 2)[None]
    name = f"blocks.{n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=[name])
        raw = model.unembed(model.ln_final(cache[name]))
    errors = [float((apply_readout(raw, *c) - logits).abs().max()) for c in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    if errors[best] > 1e-3 * max(1.0, float(logits.abs().max())):
        warnings.warn(f"{architecture(model)}: no read-out (scale, soft cap) read from the config reproduces the "
                      f"model's logits (closest off by {errors[best]:.3g}); the logit lens and partial forwards use "
                      f"{candidates[best]}.", stacklevel=3)
    return candidates[best]
