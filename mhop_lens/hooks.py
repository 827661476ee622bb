"""Canonical TransformerLens hook names, from intent, validated against a model's own hook points.

Layer ``l`` means the output of block ``l`` (``blocks.{l}.hook_resid_post``), the convention of "Hopping Too Late".
Shapes (compatibility mode):

- ``resid(l, "pre"|"mid"|"post")``: [batch, pos, d_model]
- ``attn_out(l)``, ``mlp_out(l)``: [batch, pos, d_model]
- ``head(l, "z"|"result"|"q")``: [batch, pos, n_heads, d_head]  (result: d_model)
- ``head(l, "k"|"v")``: [batch, pos, n_key_value_heads, d_head]  (grouped-query attention: fewer k/v heads)
- ``head(l, "pattern"|"attn_scores")``: [batch, n_heads, query_pos, key_pos]
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from mhop_lens.errors import HookNameError

ResidSite = Literal["pre", "mid", "post"]
HeadSite = Literal["z", "result", "q", "k", "v", "pattern", "attn_scores"]
HEAD_SITES: tuple[str, ...] = ("z", "result", "q", "k", "v", "pattern", "attn_scores")


def resid(layer: int, site: ResidSite = "post") -> str:
    """Residual stream before the block, between attention and MLP, or after the block."""
    if site not in ("pre", "mid", "post"):
        raise HookNameError(f"residual site must be 'pre', 'mid' or 'post', not {site!r}.")
    return f"blocks.{layer}.hook_resid_{site}"


def attn_out(layer: int) -> str:
    """Output of the attention sublayer (all heads summed, before it joins the residual)."""
    return f"blocks.{layer}.hook_attn_out"


def mlp_out(layer: int) -> str:
    """Output of the MLP sublayer."""
    return f"blocks.{layer}.hook_mlp_out"


def head(layer: int, site: HeadSite = "z") -> str:
    """Per-head activation of block ``layer``'s attention."""
    if site not in HEAD_SITES:
        close = difflib.get_close_matches(str(site), HEAD_SITES, n=3)
        raise HookNameError(f"unknown head site {site!r}; did you mean {close or list(HEAD_SITES)}?")
    return f"blocks.{layer}.attn.hook_{site}"


def act_names(sites: Sequence[str], known: Sequence[str], old: Mapping[str, str], what: str,
              error: type[Exception] = HookNameError, stacklevel: int = 3) -> list[str]:
    """TransformerLens act names of ``what`` sites: an old project name in ``old`` is mapped with a deprecation
    warning; names outside ``known`` are refused (``error``) with the nearest known names."""
    out, bad = [], []
    for site in sites:
        if site in old:
            warnings.warn(f"{what} site {site!r} is deprecated; use {old[site]!r} (TransformerLens's act name).",
                          DeprecationWarning, stacklevel=stacklevel)
            site = old[site]
        (out if site in known else bad).append(site)
    if bad:
        close = sorted({c for b in bad for c in difflib.get_close_matches(str(b), known, n=2)})
        hint = f" (did you mean {close}?)" if close else ""
        raise error(f"unknown {what} site(s) {bad}; choose from {list(known)}{hint}.")
    return out


def n_kv_heads(model) -> int:
    """Number of key/value heads (< n_heads under grouped-query attention)."""
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def kv_head(model, query_head: int) -> int:
    """The key/value head that query head ``query_head`` reads under grouped-query attention."""
    n_heads = model.cfg.n_heads
    if not 0 <= query_head < n_heads:
        raise HookNameError(f"head {query_head} is out of range: the model has {n_heads} heads (0..{n_heads - 1}).")
    return query_head // (n_heads // n_kv_heads(model))


def check_layer(model, layer: int) -> int:
    """Return ``layer`` (negative counts from the end) or raise naming the valid range."""
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise HookNameError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1}).")
    return layer % n


def has_resid_mid(model) -> bool:
    """False for parallel attention/MLP blocks (GPT-NeoX/Pythia, GPT-J), which have no point between them."""
    return resid(0, "mid") in model.hook_dict


def validate(model, names: str | Iterable[str]) -> list[str]:
    """Check hook names against ``model.hook_dict``; a typo raises with the closest real names."""
    names = [names] if isinstance(names, str) else list(names)
    known = model.hook_dict
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            if name.endswith("hook_resid_mid"):
                hint = (" Blocks with parallel attention and MLP (GPT-NeoX/Pythia, GPT-J) have no resid_mid: use "
                        "resid(l, 'pre') or resid(l, 'post').")
            raise HookNameError(
                f"{name!r} is not a hook point of this model.{hint} Build names with mhop_lens.hooks "
                f"(resid(l, 'post'), attn_out(l), mlp_out(l), head(l, 'z'), ...); the model has layers "
                f"0..{model.cfg.n_layers - 1}."
            )
    return names
