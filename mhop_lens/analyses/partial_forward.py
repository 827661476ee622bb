"""Re-run only what a patch changes: blocks ``start..L-1`` on a few trailing positions over a cached prefix.

A patch at (layer l, position p) leaves every residual before layer l and every position before p unchanged, so
the keys/values of positions < p at every layer are the clean run's. ``run_from`` feeds the residual entering
block ``start`` for positions >= p through the model's own block modules (TransformerBridge ``blocks``, so the
arithmetic is the bridge's, hooks included) with the prefix keys/values in an HF ``DynamicCache``. Layers before
``start`` are skipped entirely (the bridge's ``start_at_layer`` still executes them).

The per-call block arguments (attention mask, position ids, rotary embeddings) are taken from the model itself:
a forward with the same mask and cache is stopped at block 0 and its arguments are reused, so any architecture
whose blocks the bridge calls in a loop works. ``fast_path_cause`` verifies this against a full forward once per
model *and condition* (``condition``: every sliding window exceeded or not, padding, batch shape, dtype, device);
``dispatch`` runs an analysis's fast path under that verdict and falls back to its reference on any exception,
with one warning naming the architecture and the cause. Prompts at least as long as a sliding / local attention
window never take the fast path (the cached-prefix forward does not apply the window). Everything read from
transformers' internals goes through ``hf_compat``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache

from mhop_lens import hooks
from mhop_lens.analyses.hf_compat import (
    FastPathError,
    apply_readout,
    architecture,
    attention_windows,
    cache_kwarg,
    cache_of,
    empty_cache,
    ensure_cache_plumbing,
    is_cache,
    kv_layers,
    logit_readout,
    seq_length,
)
from mhop_lens.model_state import model_state
from mhop_lens.tokens import Encoded

__all__ = ["FastPathError", "cache_of", "kv_layers"]  # re-exported for the analyses
T = TypeVar("T")

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
    kv: DynamicCache | None  # None in a ``reference_run`` (no cache machinery at all)
    last_logits: Float[Tensor, "batch vocab"]
    acts: dict[str, Tensor] = field(default_factory=dict)

    def resid_post(self, layer: int) -> Float[Tensor, "batch pos d_model"]:
        """Output of block ``layer`` (the "Hopping Too Late" layer convention)."""
        return self.streams[layer + 1]


def _streams_forward(model, tokens, attention_mask, cache=None, names: Sequence[str] = (), use_kv: bool = True,
                     read: Tensor | None = None):
    """Logits, KV cache (None without ``use_kv``), the residual entering every block (+ the last block's output)
    and the activations ``names``, all from one forward. ``read`` (one position per row): only those positions are
    unembedded, logits ``[batch, 1, vocab]`` (at a 128k vocabulary the others would hold ~0.5 MB per token)."""
    n_layers = model.cfg.n_layers
    stream_names = [hooks.resid(0, "pre")] + [hooks.resid(layer, "post") for layer in range(n_layers)]
    store: dict[str, Tensor] = {}

    def keep(key: str):
        def hook(act: Tensor, hook=None) -> Tensor:
            store[key] = act.detach()
            return act

        return hook

    fwd = [(name, keep(name)) for name in dict.fromkeys([*stream_names, *names])]
    if read is not None:
        rows = torch.arange(tokens.shape[0])
        fwd.append(("unembed.hook_in", lambda act, hook=None: act[rows.to(act.device), read.to(act.device)][:, None]))
    with torch.no_grad():
        if use_kv:
            ensure_cache_plumbing(model)
            kw = {} if cache is None else {"past_key_values": cache}
            with _quiet():
                logits, kv = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=fwd,
                                                  return_type="logits_and_cache", use_cache=True, **kw)
            kv_layers(kv)  # raises FastPathError when the forward left the cache empty
        else:
            logits, kv = model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=fwd), None
    return logits, kv, torch.stack([store[name] for name in stream_names]), {name: store[name] for name in names}


@contextlib.contextmanager
def _quiet():
    """Silence transformers' deprecation notice for ``past_key_values`` (the bridge's forward takes that name)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
        yield


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
    that prefix's keys/values. Checked against the plain forward once per model and condition (``prefix_share``
    in ``model_state``); any failure of the shared run gives the plain one. Part of the fast machinery: reference
    paths use ``reference_run``. Raises ``FastPathError`` when the model returns no usable KV cache.
    """
    group = _prefix_groups(enc) if share_prefixes and not names else None
    if group is not None and not _exceeds_window(model, enc):
        verdicts = _verdicts(model, "prefix_share")
        key = condition(model, enc)
        if verdicts.get(key, True):
            try:
                shared = _shared_clean_run(model, enc, group)
                if key not in verdicts:
                    plain = clean_run(model, enc, share_prefixes=False)
                    verdicts[key] = (same_computation(shared.last_logits, plain.last_logits)
                                     and same_computation(shared.streams, plain.streams))
                    return shared if verdicts[key] else plain
                return shared
            except Exception:  # noqa: BLE001 - a failing shortcut: the plain run below decides what is wrong
                verdicts[key] = False
    logits, kv, streams, extra = _streams_forward(model, enc.tokens, enc.attention_mask, names=names, read=enc.last)
    return CleanRun(enc, streams, kv, logits[:, 0].detach(), extra)


def reference_run(model, enc: Encoded, names: Sequence[str] = ()) -> CleanRun:
    """``clean_run``'s residuals, last logits and activations from one plain full forward: no KV cache, no prefix
    sharing, nothing kept on the model (what reference paths and fallbacks compute from)."""
    logits, _, streams, extra = _streams_forward(model, enc.tokens, enc.attention_mask, names=names, use_kv=False)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return CleanRun(enc, streams, None, logits[rows, enc.last.to(logits.device)].detach(), extra)


def _shared_clean_run(model, enc: Encoded, group: Int[Tensor, " batch"]) -> CleanRun:
    """``clean_run`` computing each distinct prefix once (see there)."""
    device = enc.tokens.device
    group = group.to(device)
    first = torch.zeros(int(group.max()) + 1, dtype=torch.long, device=device)
    first[group] = torch.arange(len(group), device=device)  # one representative row per prefix
    width = enc.tokens.shape[1] - 1
    _, kv_u, streams_u, _ = _streams_forward(model, enc.tokens[first, :-1], enc.attention_mask[first, :-1],
                                             read=torch.full((len(first),), width - 1))  # logits unused
    cache = cache_of([(k.index_select(0, group), v.index_select(0, group)) for k, v in kv_layers(kv_u)])
    logits, kv, streams_last, _ = _streams_forward(model, enc.tokens[:, -1:], enc.attention_mask, cache)
    streams = torch.cat([streams_u[:, group], streams_last], dim=2)
    return CleanRun(enc, streams, kv, logits[:, -1].detach(), {})


def prefix_cache(kv: DynamicCache, rows: Int[Tensor, " n"], end: int, from_layer: int = 0) -> DynamicCache | None:
    """A cache holding positions ``[:end]`` of ``kv`` for ``rows`` (repeats allowed), or None when ``end == 0``.

    Layers below ``from_layer`` are never read by ``run_from(start=from_layer)``; they get a zero-copy stand-in
    of the right shape (HF reads the cache length from layer 0).
    """
    if end == 0:
        return None
    layers = []
    for layer, (k, v) in enumerate(kv_layers(kv)):
        k, v = k[..., :end, :], v[..., :end, :]
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
    ensure_cache_plumbing(model)
    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with _quiet():
            model(dummy, attention_mask=attention_mask, **{cache_kwarg(model): cache})
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
    cuttable: bool = True  # False when an argument folds the rows into its first dimension (Bloom's ALiBi)


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
        cached = seq_length(cache)
        key = (n_new, cached, width, str(attention_mask.device))
        got = self._captures.get(key)
        # cutting rows is ambiguous when the captured row count equals another size of the arguments
        cut_ok = got is not None and (n == got.rows or (n < got.rows and got.cuttable
                                                        and got.rows not in (n_new, cached, width)))
        if cut_ok and torch.equal(got.mask[:n], attention_mask):
            return for_call(got.args, got.kwargs, cache, got.rows, n)
        args, kwargs = stored(*(self.capture or block_call)(self.model, n_new, attention_mask, cache))
        if got is None or n >= got.rows:
            self._captures[key] = _Capture(n, attention_mask, args, kwargs, _cuttable([*args, *kwargs.values()], n))
        return for_call(args, kwargs, cache)


def _cuttable(values, rows: int) -> bool:
    """False when a tensor argument's first dimension is a multiple (> 1) of the row count: rows folded with
    something else (heads, in Bloom's ALiBi bias) cannot be cut to the first n by slicing."""
    for value in values:
        if isinstance(value, Tensor) and value.dim() and value.shape[0] != rows and rows > 1 \
                and value.shape[0] % rows == 0:
            return False
        if isinstance(value, tuple | list) and not _cuttable(value, rows):
            return False
    return True


def kept_block_args(model, capture=None) -> BlockArgs:
    """The ``BlockArgs`` kept on ``model`` (one per capture function): captures outlive a sweep, so the batches
    of a run and later sweeps on the same model skip the capture forward. Captures depend only on the shapes and
    the attention mask, which every reuse checks."""
    name = "block_args" + ("" if capture is None else "_" + capture.__name__)
    state = model_state(model)
    if state.get(name) is None:
        state[name] = BlockArgs(model, capture)
    return state[name]


def _drop_cache(value):
    """``value`` with any cache object replaced by the ``_CACHE`` placeholder (``_adapt`` puts the call's back)."""
    if is_cache(value):
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
        return cache if cache is not None else empty_cache()
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
    unembed: bool = True,
) -> Float[Tensor, "n new vocab"]:
    """Logits of the last ``new`` positions when ``resid`` enters block ``start`` and ``cache`` holds the rest.

    ``attention_mask`` covers prefix + new positions (padding excluded as usual); ``cache`` holds the prefix
    keys/values of every layer >= ``start`` (see ``prefix_cache``); ``fwd_hooks`` are active on the blocks run.
    The cache is extended in place, so build a fresh one per call. ``block_args`` defaults to the model's kept one.
    ``last_only``: unembed only the last position (``[n, 1, vocab]``; at a 128k vocabulary the unembedding of a
    token costs ~2.4 Llama blocks). ``unembed=False``: the final residual instead of logits (``[..., d_model]``, for
    callers that read it out in bounded chunks).
    """
    args, kwargs = (block_args or kept_block_args(model))(resid.shape[1], attention_mask, cache)
    hooked = model.hooks(fwd_hooks=list(fwd_hooks)) if fwd_hooks else contextlib.nullcontext()
    with hooked:  # the bridge's hooks context costs ~1 ms: skipped when there is nothing to add
        return run_blocks(model, resid, start, args, kwargs, last_only, unembed)


def call_block(model, layer: int, hidden: Float[Tensor, "n pos d_model"], args: list, kwargs: dict
               ) -> Float[Tensor, "n pos d_model"]:
    """Block ``layer`` on ``hidden`` with captured call arguments (the hidden states replace the first positional
    argument, or ``hidden_states``); returns the block's output residual."""
    if args:
        args[0] = hidden
    else:
        kwargs["hidden_states"] = hidden
    out = model.blocks[layer](*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_blocks(model, hidden: Float[Tensor, "n new d_model"], start: int, args: list, kwargs: dict,
               last_only: bool = False, unembed: bool = True) -> Float[Tensor, "n new vocab"]:
    """Blocks ``start..L-1`` then ``ln_final`` + unembed, each block called with ``args`` / ``kwargs`` (captured
    block arguments; the hidden states are put in place of the first argument). ``unembed=False`` returns the
    final residual (``readout`` gives its logits)."""
    with torch.no_grad():
        for layer in range(start, model.cfg.n_layers):
            hidden = call_block(model, layer, hidden, args, kwargs)
        hidden = hidden[:, -1:] if last_only else hidden
        return readout(model, hidden) if unembed else hidden


def readout(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """The model's logits from a final residual: final norm, unembedding, then whatever the model applies after
    the unembedding (a logit scale, Gemma-2's final soft cap; ``hf_compat.logit_readout``)."""
    return apply_readout(model.unembed(model.ln_final(resid)), *logit_readout(model))


# verdicts -------------------------------------------------------------------------------------------------------
def condition(model, enc: Encoded) -> tuple:
    """What can change whether the fast path reproduces the full forward on ``enc``: whether the prompts reach each
    sliding window, padding side, whether any row is padded, the batch shape (one row or several: HF squeezes some
    one-row masks), dtype and device. The width itself matters only through the windows, so batches of one sweep
    share a verdict instead of paying the check's three forwards each."""
    width = enc.tokens.shape[1]
    padded = bool((enc.attention_mask == 0).any())
    return (tuple(width >= w for w in attention_windows(model)), enc.padding_side, padded,
            "one row" if enc.tokens.shape[0] == 1 else "rows", str(getattr(model.cfg, "dtype", None)),
            str(enc.tokens.device))


def _verdicts(model, name: str) -> dict:
    """The dict of verdicts ``name`` kept in ``model_state(model)`` (``fast_path``, ``prefix_share``,
    ``variant_path``; deleting the key clears it)."""
    return model_state(model).setdefault(name, {})


def _exceeds_window(model, enc: Encoded) -> int | None:
    """The smallest sliding / local attention window the prompts reach (None when they reach none)."""
    width = enc.tokens.shape[1]
    reached = [w for w in attention_windows(model) if width >= w]
    return min(reached) if reached else None


def fast_path_cause(model, enc: Encoded) -> str | None:
    """None when ``run_from`` reproduces the full forward on batches like ``enc``; else why not (one line).

    Decided once per model and ``condition``: prompts reaching a sliding window are refused without a check; else
    a clean run and a partial forward from the middle layer are compared with the full forward. Exceptions are
    causes, except when a plain full forward fails too (the model or a hook of the user's is broken, not the
    shortcut): then that error propagates and nothing is recorded."""
    verdicts = _verdicts(model, "fast_path")
    key = condition(model, enc)
    if key in verdicts:
        return verdicts[key]
    window = _exceeds_window(model, enc)
    if window is not None:
        cause = (f"prompts of {enc.tokens.shape[1]} tokens reach its {window}-token sliding/local attention window, "
                 "which a partial forward over a cached prefix does not apply")
    else:
        try:
            clean = clean_run(model, enc)
            start = model.cfg.n_layers // 2
            end = enc.tokens.shape[1] - 1
            rows = torch.arange(enc.tokens.shape[0], device=enc.tokens.device)
            got = run_from(model, clean.streams[start][:, end:], start, enc.attention_mask,
                           prefix_cache(clean.kv, rows, end, start))[:, -1]
            full = reference_run(model, enc).last_logits
            diff = float(max((got.float() - full.float()).abs().max(),
                             (clean.last_logits.float() - full.float()).abs().max()))
            exact = same_computation(got, full) and same_computation(clean.last_logits, full)
            cause = None if exact else f"a partial forward differs from the full forward by {diff:.3g}"
        except Exception as e:  # noqa: BLE001 - any failure is a cause, once the plain forward is known to work
            reference_run(model, enc)  # raises when the plain forward fails too: not the shortcut's fault
            cause = describe(e)
    verdicts[key] = cause
    return cause


def check_fast_path(model, enc: Encoded) -> bool:
    """True when ``run_from`` reproduces the full forward on ``enc`` (see ``fast_path_cause``)."""
    return fast_path_cause(model, enc) is None


def describe(error: BaseException) -> str:
    """One line naming an exception (type and first line of its message)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


REFERENCE_NOTE = "using the full-forward reference instead (slower, same results)"


def warn_once(model, what: str, cause: str, instead: str = REFERENCE_NOTE) -> None:
    """One warning per model, analysis and cause (numbers aside): which path turned itself off, on which
    architecture, why."""
    said = model_state(model).setdefault("warned", set())
    key = (what, re.sub(r"\d[\d.e+-]*", "#", cause))  # the same cause at another width or size says nothing new
    if key in said:
        return
    said.add(key)
    warnings.warn(f"{what} is off for this {architecture(model)} model ({cause}); {instead}.", stacklevel=3)


def dispatch(model, enc: Encoded, what: str, fast: Callable[[], T], reference: Callable[[], T],
             use_reference: bool = False) -> tuple[T, str]:
    """``(fast(), "kv-partial")`` when the fast path holds for ``enc`` (``fast_path_cause``), else
    ``(reference(), "reference")`` with one warning naming the cause. An exception in ``fast`` falls back too and
    is recorded for this condition, unless the reference fails as well (then it propagates: a user hook or metric
    error is not the fast path's). ``use_reference`` runs the reference without touching the fast machinery."""
    if use_reference:
        return reference(), "reference"
    cause = fast_path_cause(model, enc)
    if cause is None:
        try:
            return fast(), "kv-partial"
        except Exception as e:  # noqa: BLE001 - fall back, then decide whose fault it was
            out = reference()
            cause = describe(e)
            _verdicts(model, "fast_path")[condition(model, enc)] = cause
            warn_once(model, f"{what}: the KV-reusing fast path", cause)
            return out, "reference"
    warn_once(model, f"{what}: the KV-reusing fast path", cause)
    return reference(), "reference"
