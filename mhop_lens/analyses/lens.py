"""Logit lens and sublayer projection ("Hopping Too Late" section 3): read e2 / e3 off every layer's outputs.

Each site's vector (TransformerLens act names: ``resid_post``, ``attn_out``, ``mlp_out``) at a chosen position is sent
through the model's own final norm and unembedding (``model.ln_final``, ``model.unembed``) and whatever the model
applies after the unembedding (a logit scale, Gemma-2's final soft cap: ``partial_forward.readout``, read from
the model), exactly the path the last layer's residual takes to the logits, so the last layer's ``resid_post``
projection *is* the model's output. One cached forward per batch serves every layer, site and position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.partial_forward import readout
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import DataError
from mhop_lens.forward import run_with_cache
from mhop_lens.tokens import encode

#: Sites read by the lens (TransformerLens act names).
SITES = {"resid_post": lambda layer: hooks.resid(layer, "post"), "attn_out": hooks.attn_out, "mlp_out": hooks.mlp_out}
DEFAULT_SITES = tuple(SITES)
#: Names of earlier releases -> act names (accepted with a deprecation warning).
OLD_SITES = {"resid": "resid_post"}
#: Site labels of the residual stream in lens tables (``resid`` in tables written by earlier releases).
RESID = ("resid_post", "resid")
CORRECT_RULE = "greedy first token == first token of e3"
#: ``translator(layer, h) -> h'`` applied to the residual before the readout (a tuned lens, see ``tuned_lens``).
Translator = Callable[[int, Float[Tensor, "... d_model"]], Float[Tensor, "... d_model"]]


def project(model, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """Vocabulary logits of residual-space vectors: the model's final norm, its unembedding and its logit
    scale / soft cap (``partial_forward.readout``)."""
    shape = x.shape
    flat = x.reshape(1, -1, shape[-1])
    return readout(model, flat).reshape(*shape[:-1], -1)


def ranks(logits: Float[Tensor, "... vocab"], ids: Tensor) -> Tensor:
    """0-based rank of token ``ids`` (broadcast over the leading dims; 0 = top-1)."""
    value = logits.gather(-1, ids[..., None])
    return (logits > value).sum(-1)


#: Bytes of vocabulary logits (fp32) one ``read_stats`` chunk may hold; the lens's extra memory is a few times this,
#: whatever the batch, depth or vocabulary (a 128k vocabulary: 128 rows per chunk).
READOUT_CHUNK_BYTES = 64 * 2**20


def read_stats(model, x: Float[Tensor, "... d_model"], ids: dict[str, Tensor], top_k: int = 5,
            chunk_bytes: int = READOUT_CHUNK_BYTES) -> dict[str, Tensor]:
    """Projection statistics of residual-space vectors, a bounded number of rows at a time (on the CPU).

    For each name in ``ids`` (token ids shaped like ``x``'s leading dims): ``{name}_rank`` (``ranks``) and
    ``{name}_prob`` (softmax of the projection); ``top`` holds the ``top_k`` token ids. Rows are projected in
    chunks of ``chunk_bytes`` of fp32 logits, so memory does not grow with rows x vocabulary.
    """
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    flat_ids = {name: i.reshape(-1).to(x.device) for name, i in ids.items()}
    step = max(1, chunk_bytes // (4 * model.cfg.d_vocab))
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, flat.shape[0], step):
        proj = project(model, flat[start : start + step]).float()  # [chunk, vocab]
        logz = proj.logsumexp(-1)
        for name, i in flat_ids.items():
            i = i[start : start + step, None]
            parts.setdefault(f"{name}_rank", []).append(ranks(proj, i[:, 0]).cpu())
            parts.setdefault(f"{name}_prob", []).append((proj.gather(-1, i)[:, 0] - logz).exp().cpu())
        parts.setdefault("top", []).append(proj.topk(top_k, dim=-1).indices.cpu())
        del proj
    return {k: torch.cat(v).reshape(*shape, *v[0].shape[1:]) for k, v in parts.items()}


def decode_ids(model, ids: Tensor) -> list[str]:
    """Each id decoded on its own (leading spaces kept). Ids the tokenizer does not have (a vocabulary padded past
    the tokenizer, e.g. Pythia's 50,304 logits over 50,277 tokens) read ``<id N>``, never ''."""
    flat = ids.reshape(-1).tolist()
    known = len(model.tokenizer)
    words = model.tokenizer.batch_decode([[i] if i < known else [] for i in flat])
    return [w if i < known else f"<id {i}>" for w, i in zip(words, flat, strict=True)]


@torch.inference_mode()
def lens_batch(model, queries: Sequence[TwoHopQuery], positions: Sequence[S.PositionSpec] = ("last",),
               sites: Sequence[str] = DEFAULT_SITES, top_k: int = 5,
               translator: Translator | None = None) -> pd.DataFrame:
    """Lens rows of one batch (see ``run_lens``, which checks ``sites``)."""
    n_layers = model.cfg.n_layers
    enc = encode(model, [q.prompt for q in queries])
    names = [SITES[s](layer) for s in sites for layer in range(n_layers)]
    logits, cache = run_with_cache(model, enc, hooks.validate(model, names))
    rows = torch.arange(len(queries), device=logits.device)
    e2 = S.entity_tokens(model, queries, "e2").to(logits.device)
    e3 = S.entity_tokens(model, queries, "e3").to(logits.device)
    correct = (logits[rows, enc.last.to(logits.device)].argmax(-1) == e3).cpu().numpy()
    frames = []
    for pos_name in positions:
        pos = S.positions(enc, queries, pos_name).to(logits.device)
        pred = logits[rows, pos].argmax(-1)
        for site in sites:
            acts = torch.stack([_read(cache[SITES[site](layer)][rows, pos], layer, site, translator)
                                for layer in range(n_layers)], 1)
            expand = lambda ids: ids[:, None].expand(-1, n_layers)  # noqa: E731
            read = read_stats(model, acts, {"e2": expand(e2), "e3": expand(e3), "pred": expand(pred)}, top_k)
            top_str = np.array(decode_ids(model, read["top"]), dtype=object).reshape(len(queries), n_layers, top_k)
            frames.append(pd.DataFrame({
                "qid": np.repeat([q.id for q in queries], n_layers),
                "layer": np.tile(np.arange(n_layers), len(queries)),
                "site": site,
                "lens": "logit" if translator is None or site not in RESID else "tuned",
                "position": S.label(pos_name),
                "token_index": np.repeat(S.unpadded(enc, pos).numpy(), n_layers),
                "token": np.repeat(decode_ids(model, enc.tokens[rows.cpu(), pos.cpu()]), n_layers),
                "e2_rank": read["e2_rank"].numpy().ravel(),
                "e3_rank": read["e3_rank"].numpy().ravel(),
                "e2_prob": read["e2_prob"].numpy().ravel(),
                "e3_prob": read["e3_prob"].numpy().ravel(),
                "pred_rank": read["pred_rank"].numpy().ravel(),
                "pred_token": np.repeat(decode_ids(model, pred), n_layers),
                "top1": top_str[:, :, 0].ravel(),
                "top_tokens": [list(t) for t in top_str.reshape(-1, top_k)],
                "correct": np.repeat(correct, n_layers),
            }))
    return pd.concat(frames, ignore_index=True)


def _read(x: Float[Tensor, "batch d_model"], layer: int, site: str, translator: Translator | None
          ) -> Float[Tensor, "batch d_model"]:
    """The vector the readout sees: the residual through ``translator`` when one is given (translators are fitted
    to the residual stream, so attention / MLP outputs are always read as they are)."""
    return x if translator is None or site not in RESID else translator(layer, x)


def site_names(sites: Sequence[str], stacklevel: int = 4) -> list[str]:
    """Lens sites as act names (``resid`` -> ``resid_post`` with a deprecation warning); unknown names refused."""
    return hooks.act_names(sites, tuple(SITES), OLD_SITES, "lens", DataError, stacklevel)


def run_lens(model, queries: Sequence[TwoHopQuery], positions: Sequence[S.PositionSpec] = ("last",),
             sites: Sequence[str] = DEFAULT_SITES, top_k: int = 5, batch_size: int = 32,
             progress: bool = True, translator: Translator | None = None) -> pd.DataFrame:
    """Logit lens of every layer's residual / attention / MLP output at ``positions`` (names of ``sites.py``).

    One row per (query, position, site, layer). Columns: ``qid, layer, site, position, token_index`` (index in the
    prompt's tokens, BOS = 0), ``token``;
    ``e2_rank, e3_rank`` (0-based rank of the entity's first token, 0 = top-1), ``e2_prob, e3_prob`` (softmax of
    the projection), ``pred_rank`` (rank of the model's own final next-token prediction at that position) and
    ``pred_token``, ``top1`` and ``top_tokens`` (the ``top_k`` decoded tokens), ``correct`` (the model's greedy
    first token at the last position == e3's first token), ``lens`` (``logit``, or ``tuned`` where ``translator``
    -- e.g. a ``tuned_lens.TunedLens`` -- translated the residual first).
    """
    if not queries:
        raise DataError("no queries for the lens; check --data, --limit and --shard.")
    sites = site_names(sites)
    batches = [list(queries[i : i + batch_size]) for i in range(0, len(queries), batch_size)]
    frames = [lens_batch(model, b, positions, sites, top_k, translator)
              for b in tqdm(batches, desc="lens", unit="batch", disable=not progress)]
    return pd.concat(frames, ignore_index=True)
