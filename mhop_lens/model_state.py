"""What the suite keeps on a model between calls, in one documented place: ``model_state(model)``.

One dict per model object (an attribute the bridge does not register as a module or parameter), keyed by:

| key | value | written by |
|---|---|---|
| ``fast_path`` | {condition: None or the cause the KV-reusing path is off} | ``partial_forward.fast_path_cause`` |
| ``prefix_share`` | {condition: whether shared-prefix clean runs are exact} | ``partial_forward.clean_run`` |
| ``variant_path`` | {condition: None or the cause variant tokens are off} | ``variant_tokens.variant_path_cause`` |
| ``warned`` | {(analysis, cause)} already warned about | ``partial_forward.warn_once`` |
| ``block_args[_<capture>]`` | ``partial_forward.BlockArgs`` captures | ``partial_forward.kept_block_args`` |
| ``cache_plumbing`` | True once the KV-cache pre-hooks are installed | ``hf_compat.ensure_cache_plumbing`` |
| ``readout`` | (logit scale, final soft cap) that reproduce the model's logits | ``hf_compat.logit_readout`` |

Everything there is derived from the model's own forward and the shapes it has seen; the verdicts are keyed by
the conditions that can change them, so nothing needs clearing in normal use. After editing the weights in place,
``model_state(model).clear()`` (the cache pre-hooks stay installed, which is harmless).
"""

from __future__ import annotations

ATTRIBUTE = "_mhop_state"


def model_state(model) -> dict:
    """The dict of state the suite keeps on ``model`` (created empty on first use)."""
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = model.__dict__[ATTRIBUTE] = {}
    return state
