"""TransformerLens weight processing (fold LN, centre writing weights / unembed, fold value biases) in bounded memory.

``TransformerBridge.process_weights`` takes the whole state dict, clones it in each of several passes and then
installs the processed copy: loading peaks at ~2.2x the weights (issue 19). ``lean_process_weights`` runs the same
``ProcessWeights.process_weights`` one block at a time (the block's keys renamed to block 0 of a one-layer config)
and installs each block's result before the next, so the old tensors of a block are freed as its new ones arrive.
The vocabulary-sized matrices (embedding, unembedding) go through the same function in row chunks (every step
there is row-local) with the results written back into their own storage; only ``center_unembed`` (a mean over the
vocabulary) is applied in place here, with the library's definition. Architectures whose adapter preprocesses
weights, or mixture-of-experts blocks, use the library unchanged.
"""

from __future__ import annotations

import copy
import types

import torch
from transformer_lens.weight_processing import ProcessWeights

#: Rows of the embedding / unembedding processed per call (128 MiB per matrix at d_model 4096 in fp32).
VOCAB_CHUNK = 8192
GLOBAL_PREFIXES = ("embed.", "pos_embed.", "ln_final.", "unembed.")


def supported(bridge) -> str | None:
    """None when the lean path applies to ``bridge``, else why not (the library's own path is used then)."""
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter

    adapter = bridge.adapter
    if adapter is None or type(adapter).preprocess_weights is not ArchitectureAdapter.preprocess_weights:
        return "the adapter preprocesses weights"
    if not getattr(adapter, "supports_fold_ln", True):
        return "the adapter does not fold layer norms"
    try:
        from transformer_lens.model_bridge.generalized_components.moe import has_batched_experts
    except ImportError:  # pragma: no cover - older TransformerLens
        has_batched_experts = None
    for block in getattr(bridge, "blocks", []):
        mlp = getattr(block, "mlp", None)
        if mlp is not None and (has_batched_experts is None or has_batched_experts(mlp)):
            return "mixture-of-experts blocks"
    if not all(k.startswith(("blocks.", *GLOBAL_PREFIXES)) or "rotary" in k for k in bridge.state_dict()):
        return "weights outside blocks / embed / unembed"
    if hasattr(bridge.original_model, "hf_device_map"):
        return "a device_map"
    return None


def _block_keys(bridge, layer: int) -> dict[str, torch.Tensor]:
    prefix = f"blocks.{layer}."
    return {k: v.detach() for k, v in bridge.state_dict(keep_vars=True).items() if k.startswith(prefix)}


def lean_process_weights(bridge, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, fold_value_biases: bool = True,
                         refactor_factored_attn_matrices: bool = False, verbose: bool = False,
                         vocab_chunk: int = VOCAB_CHUNK) -> None:
    """``bridge.process_weights`` with the same options, one block / vocabulary chunk at a time (see module)."""
    from transformer_lens.utilities.activation_functions import softcap_enabled

    if getattr(bridge, "_weights_processed", False):
        return
    cfg = bridge.cfg
    if center_unembed and softcap_enabled(getattr(cfg, "output_logits_soft_cap", None)):
        center_unembed = False  # as the library: centring does not commute with the softcap
    options = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                   refactor_factored_attn_matrices=refactor_factored_attn_matrices, adapter=bridge.adapter)
    bridge._weights_processed = True
    with torch.no_grad():
        params = dict(bridge.state_dict(keep_vars=True))
        extra = {k: params[k][:1].detach().clone() for k in ("embed.weight", "pos_embed.weight") if k in params}
        del params
        layer_cfg = copy.copy(cfg)
        layer_cfg.n_layers = 1
        for layer in range(cfg.n_layers):
            prefix = f"blocks.{layer}."
            block = {"blocks.0." + k[len(prefix):]: v for k, v in _block_keys(bridge, layer).items()}
            value_bias = any(k.endswith(("attn.v.bias", "attn.b_V", "attn._b_V")) for k in block)
            out = ProcessWeights.process_weights({**block, **extra}, layer_cfg, center_unembed=False,
                                                 fold_value_biases=fold_value_biases and value_bias, **options)
            del block
            out = {prefix + k[len("blocks.0."):]: v for k, v in out.items() if k.startswith("blocks.0.")}
            ProcessWeights.distribute_weights_to_components(out, bridge.real_components)
            del out
        _process_vocab(bridge, options, center_unembed, vocab_chunk)
    if bridge.adapter is not None:
        bridge.adapter.postprocess_weights(bridge)


def _process_vocab(bridge, options: dict, center_unembed: bool, vocab_chunk: int) -> None:
    """Embedding, positional embedding, final norm and unembedding: the library's steps on row chunks, written
    back in place, then ``center_unembed`` in place, then installed through the components."""
    params = {k: v.detach() for k, v in bridge.state_dict(keep_vars=True).items() if k.startswith(GLOBAL_PREFIXES)}
    if "embed.weight" in params and "unembed.weight" in params and (
            params["embed.weight"].data_ptr() == params["unembed.weight"].data_ptr()):
        params["unembed.weight"] = params["unembed.weight"].clone()  # untie, as the library does
    vocab = {k for k in ("embed.weight", "unembed.weight", "unembed.bias") if k in params}
    small = {k: v for k, v in params.items() if k not in vocab}
    n_rows = max(params[k].shape[0] for k in vocab)
    processed_small: dict[str, torch.Tensor] = {}
    for start, stop in _chunks(n_rows, vocab_chunk, bridge.cfg.d_model):
        rows = {k: params[k][start:stop] for k in vocab if params[k].shape[0] == n_rows}
        cfg = copy.copy(bridge.cfg)
        cfg.n_layers, cfg.d_vocab = 0, stop - start
        out = ProcessWeights.process_weights({**rows, **small}, cfg, center_unembed=False, fold_value_biases=False,
                                             **options)
        for k, v in rows.items():
            v.copy_(out[k])
        if not processed_small:
            processed_small = {k: v for k, v in out.items() if k not in rows}
    if center_unembed and "unembed.weight" in params:
        w = params["unembed.weight"]
        w.sub_(w.mean(0, keepdim=True, dtype=torch.float32).to(w.dtype))
        if "unembed.bias" in params:
            b = params["unembed.bias"]
            b.sub_(b.float().mean().to(b.dtype))
    ProcessWeights.distribute_weights_to_components({**processed_small, **{k: params[k] for k in vocab}},
                                                    bridge.real_components)


def _chunks(n_rows: int, size: int, d_model: int) -> list[tuple[int, int]]:
    """Row ranges of at most ``size`` rows, none of exactly ``d_model`` rows (the library tells a matrix's layout
    by comparing its shape with d_model and d_vocab)."""
    bounds, start = [], 0
    while start < n_rows:
        stop = min(start + size, n_rows)
        if stop - start == d_model:
            stop -= 1
        bounds.append((start, stop))
        start = stop
    return bounds


def install(bridge) -> str | None:
    """Make ``bridge.enable_compatibility_mode()`` process weights with ``lean_process_weights``; returns None
    when installed, else the reason the library's own path stays."""
    reason = supported(bridge)
    if reason is None:
        bridge.process_weights = types.MethodType(lean_process_weights, bridge)
    return reason
