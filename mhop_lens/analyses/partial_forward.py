"""Re-run only what a patch changes: blocks ``start..L-1`` on a few trailing positions over a cached prefix.

A patch at (layer l, position p) leaves every residual before layer l and every position before p unchanged, so
the keys/values of positions < p at every layer are the clean run's. ``run_from`` feeds the residual entering
block ``start`` for positions >= p through the model's own block modules (TransformerBridge ``blocks``, so the
arithmetic is the bridge's, hooks included) with the prefix keys/values in an HF ``DynamicCache``. Layers before
``start`` are skipped entirely (the bridge's ``start_at_layer`` still executes them).

The per-call block arguments (attention mask, position ids, rotary embeddings) are taken from the model itself:
a forward with the same mask and cache is stopped at block 0 and its arguments are reused, so any architecture
whose blocks the bridge calls in a loop works. ``check_fast_path`` verifies this per model against a full forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import Cache, DynamicCache

from mhop_lens import hooks
from mhop_lens.tokens import Encoded

#: Largest |logit| difference between ``run_from`` and a full forward that still counts as the same computation.
FAST_PATH_TOL = 1e-4
#: In bf16 / fp16 the same computation in other shapes rounds differently: up to this share of the largest |value|.
LOW_PRECISION_RTOL = 1e-2


def same_computation(got: Tensor, ref: Tensor) -> bool:
    """|got - ref| within ``FAST_PATH_TOL`` (fp32), or within ``LOW_PRECISION_RTOL`` of max |ref| below fp32."""
    tol = FAST_PATH_TOL
    if ref.dtype in (torch.bfloat16, torch.float16):
        tol = max(tol, LOW_PRECISION_RTOL * float(ref.float().abs().max()))
    return bool((got.float() - ref.float()).abs().max() < tol)


class _Stop(Exception):
    """Raised inside block 0's pre-hook once its call arguments are captured."""


@dataclass
class CleanRun:
    """A cached forward: residual entering every block, the KV cache, last-position logits, extra activations."""

    enc: Encoded
    streams: Float[Tensor, "layer_plus_1 batch pos d_model"]  # streams[l] enters block l; streams[L] leaves L-1
    kv: DynamicCache
    last_logits: Float[Tensor, "batch vocab"]
    acts: dict[str, Tensor] = field(default_factory=dict)

    def resid_post(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """Output of block ``layer`` (the "Hopping Too Late" layer convention)."""
        return self.streams[layer + 1]


def _streams_forward(model, tokens, attention_mask, cache=None, names: Sequence[str] = ()):
    """Logits, KV cache, the residual entering every block (+ the last block's output) and the activations
    ``names``, all from one forward."""
    n_layers = model.cfg.n_layers
    stream_names = [hooks.resid(0, "pre")] + [hooks.resid(layer, "post") for layer in range(n_layers)]
    store: dict[str, Tensor] = {}

    def keep(key: str):
        def hook(act: Tensor, hook=None) -> Tensor:
            store[key] = act.detach()
            return act

        return hook

    kw = {} if cache is None else {"past_key_values": cache}
    fwd = [(name, keep(name)) for name in dict.fromkeys([*stream_names, *names])]
    with torch.no_grad():
        logits, kv = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=fwd,
                                          return_type="logits_and_cache", use_cache=True, **kw)
    return logits, kv, torch.stack([store[name] for name in stream_names]), {name: store[name] for name in names}


def _prefix_groups(enc: Encoded) -> Int[Tensor, " batch"] | None:
    """Row -> index of its distinct prefix (every token but the last, with its mask), or None when sharing cannot
    pay (fewer than a quarter of the rows repeat a prefix) or apply (a row with no real prefix token)."""
    if enc.tokens.shape[1] < 2 or int(enc.lengths.min()) < 2 or enc.padding_side != "left":
        return None
    keys = torch.cat([enc.tokens[:, :-1], enc.attention_mask[:, :-1]], dim=1)
    unique, group = torch.unique(keys, dim=0, return_inverse=True)
    return group if len(unique) <= 0.75 * len(keys) else None


def clean_run(model, enc: Encoded, names: Sequence[str] = (), share_prefixes: bool = True) -> CleanRun:
    """One forward keeping every block's input residual, the HF KV cache and the activations ``names``.

    With ``share_prefixes`` (and no extra ``names``), rows whose prompts differ only in the last token (the
    organism's "e1 's r1 's r2" for one (e1, r1)) run their shared prefix once; the last tokens then run over
    that prefix's keys/values. Checked once per model against the plain forward (``_mhop_prefix_share_ok``).
    """
    group = _prefix_groups(enc) if share_prefixes and not names else None
    if group is not None and getattr(model, "_mhop_prefix_share_ok", None) is not False:
        shared = _shared_clean_run(model, enc, group)
        if getattr(model, "_mhop_prefix_share_ok", None) is None:
            plain = clean_run(model, enc, share_prefixes=False)
            model._mhop_prefix_share_ok = (same_computation(shared.last_logits, plain.last_logits)
                                           and same_computation(shared.streams, plain.streams))
            return shared if model._mhop_prefix_share_ok else plain
        return shared
    logits, kv, streams, extra = _streams_forward(model, enc.tokens, enc.attention_mask, names=names)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return CleanRun(enc, streams, kv, logits[rows, enc.last.to(logits.device)].detach(), extra)


def _shared_clean_run(model, enc: Encoded, group: Int[Tensor, " batch"]) -> CleanRun:
    """``clean_run`` computing each distinct prefix once (see there)."""
    device = enc.tokens.device
    group = group.to(device)
    first = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=device)
    first[group] = torch.arange(len(group), device=device)  # one representative row per prefix
    _, kv_u, streams_u, _ = _streams_forward(model, enc.tokens[first, :-1], enc.attention_mask[first, :-1])
    cache = cache_of([(entry.keys.index_select(0, group), entry.values.index_select(0, group))
                      for entry in kv_u.layers])
    logits, kv, streams_last, _ = _streams_forward(model, enc.tokens[:, -1:], enc.attention_mask, cache)
    streams = torch.cat([streams_u[:, group], streams_last], dim=2)
    return CleanRun(enc, streams, kv, logits[:, -1].detach(), {})


def cache_of(layers: Sequence[tuple[Tensor, Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these (keys, values) per layer.

    ``DynamicCache.update`` on an empty layer concatenates onto an empty tensor, i.e. copies; building the cache
    that way would copy every prefix twice before the blocks copy it again when they append the new positions.
    """
    cache = DynamicCache()
    for layer, (k, v) in enumerate(layers):
        cache.update(k[..., :0, :], v[..., :0, :], layer)  # initialises the layer (dtype, device) at no cost
        cache.layers[layer].keys, cache.layers[layer].values = k, v
    return cache


def prefix_cache(kv: DynamicCache, rows: Int[Tensor, " n"], end: int, from_layer: int = 0) -> DynamicCache | None:
    """A cache holding positions ``[:end]`` of ``kv`` for ``rows`` (repeats allowed), or None when ``end == 0``.

    Layers below ``from_layer`` are never read by ``run_from(start=from_layer)``; they get a zero-copy stand-in
    of the right shape (HF reads the cache length from layer 0).
    """
    if end == 0:
        return None
    layers = []
    for layer, entry in enumerate(kv.layers):
        k, v = entry.keys[..., :end, :], entry.values[..., :end, :]
        if layer < from_layer:
            layers.append((k[:1].expand(len(rows), *k.shape[1:]), v[:1].expand(len(rows), *v.shape[1:])))
        else:
            layers.append((k.index_select(0, rows), v.index_select(0, rows)))
    return cache_of(layers)


def block_call(model, n_new: int, attention_mask: Int[Tensor, "n pos"], cache: DynamicCache | None
                ) -> tuple[list, dict]:
    """The arguments the model passes to block 0 for ``n_new`` new tokens after ``cache`` (stopped there)."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = list(args), dict(kwargs)
        raise _Stop

    dummy = torch.zeros((attention_mask.shape[0], n_new), dtype=torch.long, device=attention_mask.device)
    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(dummy, attention_mask=attention_mask, past_key_values=cache)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise RuntimeError("the model never called blocks[0]; it cannot be re-run from a middle layer.")
    return captured["args"], captured["kwargs"]


_CACHE = object()  # stands for the cache in a stored capture


@dataclass
class _Capture:
    rows: int
    mask: Int[Tensor, "rows pos"]
    args: list
    kwargs: dict


class BlockArgs:
    """Block-call arguments captured once and reused by every ``run_from`` call with the same shape of work.

    Capturing runs the model's own forward up to block 0 (embedding, causal mask, rotary set-up): on small models
    that costs several block calls. A call reuses a capture made for the same number of new tokens, cache length
    and width when its attention mask equals the first rows of the captured one (a sweep's row sets are tiles of
    one batch): tensors with the captured row count as first dimension are cut to the call's rows, and the
    captured cache is replaced by the call's cache (or a fresh one). Anything else is captured anew.
    ``capture(model, n_new, attention_mask, cache) -> (args, kwargs)`` makes a capture (default ``block_call``).
    ``kept_block_args`` gives the instance kept on the model, so later sweeps and batches reuse its captures.
    """

    def __init__(self, model, capture=None):
        self.model = model
        self.capture = capture
        self._captures: dict[tuple, _Capture] = {}

    def __call__(self, n_new: int, attention_mask: Int[Tensor, "n pos"], cache: DynamicCache | None
                 ) -> tuple[list, dict]:
        n, width = attention_mask.shape
        cached = 0 if cache is None else cache.get_seq_length()
        key = (n_new, cached, width, str(attention_mask.device))
        got = self._captures.get(key)
        # cutting rows is ambiguous when the captured row count equals another size of the arguments
        cut_ok = got is not None and (n == got.rows or (n < got.rows and got.rows not in (n_new, cached, width)))
        if cut_ok and torch.equal(got.mask[:n], attention_mask):
            return for_call(got.args, got.kwargs, cache, got.rows, n)
        args, kwargs = stored(*(self.capture or block_call)(self.model, n_new, attention_mask, cache))
        if got is None or n >= got.rows:
            self._captures[key] = _Capture(n, attention_mask, args, kwargs)
        return for_call(args, kwargs, cache)


def kept_block_args(model, capture=None) -> BlockArgs:
    """The ``BlockArgs`` kept on ``model`` (one per capture function): captures outlive a sweep, so the batches
    of a run and later sweeps on the same model skip the capture forward. Captures depend only on the shapes and
    the attention mask, which every reuse checks."""
    name = "_mhop_block_args" + ("" if capture is None else "_" + capture.__name__)
    kept = getattr(model, name, None)
    if kept is None:
        kept = BlockArgs(model, capture)
        setattr(model, name, kept)
    return kept


def _drop_cache(value):
    """``value`` with any cache object replaced by the ``_CACHE`` placeholder (``_adapt`` puts the call's back)."""
    if isinstance(value, Cache):
        return _CACHE
    if isinstance(value, tuple | list):
        return type(value)(_drop_cache(v) for v in value)
    return value


def stored(args: list, kwargs: dict) -> tuple[list, dict]:
    """Captured block arguments without the hidden states and the cache, safe to keep and reuse (see ``for_call``).
    Applying it twice changes nothing."""
    return ([None, *(_drop_cache(a) for a in args[1:])],
            {k: None if k == "hidden_states" else _drop_cache(v) for k, v in kwargs.items()})


def for_call(args: list, kwargs: dict, cache: DynamicCache | None, rows: int = -1, n: int = -1
             ) -> tuple[list, dict]:
    """``stored`` arguments with the call's ``cache`` put back (and row-batched tensors of ``rows`` rows cut to
    the first ``n``)."""
    return [_adapt(a, rows, n, cache) for a in args], {k: _adapt(v, rows, n, cache) for k, v in kwargs.items()}


def _adapt(value, rows: int, n: int, cache: DynamicCache | None):
    """A captured block argument for the first ``n`` of ``rows`` rows and the call's ``cache``."""
    if value is _CACHE:
        return cache if cache is not None else DynamicCache()
    if isinstance(value, Tensor):
        return value[:n] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, tuple | list):
        return type(value)(_adapt(v, rows, n, cache) for v in value)
    return value


def run_from(
    model,
    resid: Float[Tensor, "n new d_model"],
    start: int,
    attention_mask: Int[Tensor, "n pos"],
    cache: DynamicCache | None = None,
    fwd_hooks: Sequence = (),
    block_args: BlockArgs | None = None,
    last_only: bool = False,
) -> Float[Tensor, "n new vocab"]:
    """Logits of the last ``new`` positions when ``resid`` enters block ``start`` and ``cache`` holds the rest.

    ``attention_mask`` covers prefix + new positions (padding excluded as usual); ``cache`` holds the prefix
    keys/values of every layer >= ``start`` (see ``prefix_cache``); ``fwd_hooks`` are active on the blocks run.
    The cache is extended in place, so build a fresh one per call. ``block_args`` defaults to the model's kept one.
    ``last_only``: unembed only the last position (``[n, 1, vocab]``; at a 128k vocabulary the unembedding of a
    token costs ~2.4 Llama blocks).
    """
    args, kwargs = (block_args or kept_block_args(model))(resid.shape[1], attention_mask, cache)
    hooked = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()
    with hooked:  # the bridge's hooks context costs ~1 ms: skipped when there is nothing to add
        return run_blocks(model, resid, start, args, kwargs, last_only)


def run_blocks(model, hidden: Float[Tensor, "n new d_model"], start: int, args: list, kwargs: dict,
               last_only: bool = False) -> Float[Tensor, "n new vocab"]:
    """Blocks ``start..L-1`` then ``ln_final`` + unembed, each block called with ``args`` / ``kwargs`` (captured
    block arguments; the hidden states are put in place of the first argument)."""
    with torch.no_grad():
        for layer in range(start, model.cfg.n_layers):
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            out = model.blocks[layer](*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return model.unembed(model.ln_final(hidden[:, -1:] if last_only else hidden))


def check_fast_path(model, enc: Encoded) -> bool:
    """True when ``run_from`` reproduces the full forward on ``enc`` (from a middle layer, with a prefix cache).

    Cached on the model; a False answer makes the analyses use their generic batched full-forward path.
    """
    known = getattr(model, "_mhop_fast_path_ok", None)
    if known is not None:
        return known
    try:
        clean = clean_run(model, enc)
        start = model.cfg.n_layers // 2
        end = enc.tokens.shape[1] - 1
        rows = torch.arange(enc.tokens.shape[0], device=enc.tokens.device)
        got = run_from(model, clean.streams[start][:, end:], start, enc.attention_mask,
                       prefix_cache(clean.kv, rows, end, start))[:, -1]
        ok = same_computation(got, clean.last_logits)
    except Exception:  # noqa: BLE001 - any failure means: use the generic path
        ok = False
    model._mhop_fast_path_ok = ok
    return ok
