"""Patchscopes entity description ("Hopping Too Late" section 3): which entity does a hidden state encode?

The residual at (source layer s, position p) of the two-hop prompt is written into a target prompt at its
placeholder token, at target layer t (``hook_resid_post``), and the patched model's continuation is decoded:

- ``generate``: greedy (or seeded sampling) generation from a few-shot description prompt; the text is classified
  e1 / e2 / e3 / other by which entity's label or alias appears first (whole words, case-insensitive).
  ``protocol="study"`` instead follows the study's code (``generate_entity_description.py``,
  ``classify_results.py``): 10 sampled tokens (the model's ``generation_config`` sampling settings, as HF
  ``generate(do_sample=True)``), seeds 0, 1, 2 (one row per seed), and the class by priority e1 > e2 > e3 of the
  colon patterns ": a ", ": a,", ": a.", ": a:", "a: " for every label / alias ``a`` longer than one character
  (case-insensitive substrings).
- ``lens``: the logit lens of the source vector (no target prompt); the class is the entity whose first token is
  the top-1 token. For models that cannot follow a description prompt, e.g. the word-level organism.
- ``one_hop``: target prompt = the query's one-hop r2 prompt with e2 replaced by the placeholder ("x 's boss"); the
  patched next token is compared with the model's own answers to the clean prompts r2(e2), r2(e3), r2(e1): a hit on
  r2(e2) means the vector carried e2. A token that is the model's answer for several of them is 'other'.
- ``auto``: ``generate`` when the target prompt tokenises without unknown tokens and fits the context, else
  ``lens`` (so the organism, whose vocabulary lacks the description prompt's words, gets the lens).

Rows are (query, s, t, p) combinations batched along the batch dimension. Generation patches the prompt pass once
and continues over the KV cache (``patched_generation.generate_patched``; equal token for token to re-running the
whole sequence at every step, ``cached=False``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mhop_lens import hooks
from mhop_lens.analyses import sites as S
from mhop_lens.analyses.lens import project
from mhop_lens.analyses.partial_forward import warn_once
from mhop_lens.analyses.patched_generation import (
    STUDY_NEW_TOKENS,
    Sampling,
    decode_new,
    generate_patched,
    mentions_any,
    prefix_keys_values,
    prefix_sharing_cause,
)
from mhop_lens.data.records import TwoHopQuery
from mhop_lens.errors import MhopLensError
from mhop_lens.forward import run, run_with_cache
from mhop_lens.interventions import replace_positions
from mhop_lens.positions import find_span
from mhop_lens.tokens import Encoded, encode

DEFAULT = ("Syria: Syria is a country in the Middle East, Leonardo DiCaprio: Leonardo DiCaprio is an American actor, "
           "Samsung: Samsung is a South Korean multinational corporation, x")
#: The study's second target prompt (``--target-prompt repeat`` in its ``generate_entity_description.py``).
REPEAT = "Syria: Syria, Leonardo DiCaprio: Leonardo DiCaprio, Samsung: Samsung, x"
IDENTITY = "cat -> cat; 1135 -> 1135; hello -> hello; x"
TARGET_PROMPTS = {"default": DEFAULT, "description": DEFAULT, "repeat": REPEAT, "identity": IDENTITY}
DECODERS = ("auto", "generate", "lens", "one_hop")
PROTOCOLS = ("default", "study")
#: The study's seeds for sampled descriptions (``*_entity_description_s{0,1,2}.csv``).
STUDY_SEEDS = (0, 1, 2)
CLASSES = ("e1", "e2", "e3", "other")
_ORDER = ("e2", "e3", "e1")
_STUDY_ORDER = ("e1", "e2", "e3")


def classify(text: str, query: TwoHopQuery) -> str:
    """'e1' / 'e2' / 'e3' for the entity whose label or alias occurs first in ``text`` (whole words), else 'other'."""
    best, where = "other", len(text) + 1
    for entity in _ORDER:
        for alias in query.answers(entity):
            m = re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", text, flags=re.IGNORECASE)
            if m and m.start() < where:
                best, where = entity, m.start()
    return best


def study_answers(query: TwoHopQuery, entity: str) -> list[str]:
    """The study's ``get_entity_classification_answers``: colon patterns around the label and every alias longer
    than one character."""
    label, *aliases = query.answers(entity)
    names = [label, *(a for a in aliases if len(a) > 1)]
    return [p.format(a) for p in (": {} ", ": {},", ": {}.", ": {}:", "{}: ") for a in names]


def classify_study(text: str, query: TwoHopQuery) -> str:
    """The study's ``classify_entity_row``: the first of e1, e2, e3 (in that priority) with a colon pattern that is
    a case-insensitive substring of ``text``, else 'other'."""
    return next((e for e in _STUDY_ORDER if mentions_any(text, study_answers(query, e))), "other")


def resolve_decoder(model, decoder: str, target_prompt: str) -> str:
    """Pick the decoder for ``auto`` (see module docstring)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}.")
    if decoder != "auto":
        return decoder
    tok = model.tokenizer
    ids = tok(target_prompt, add_special_tokens=False)["input_ids"]
    n_ctx = getattr(model.cfg, "n_ctx", None) or len(ids) + 1
    unknown = tok.unk_token_id is not None and tok.unk_token_id in ids
    return "lens" if unknown or len(ids) + 1 > n_ctx else "generate"


def one_hop_prompt(query: TwoHopQuery, placeholder: str = "x") -> tuple[str, tuple[int, int]]:
    """The query's r2 one-hop prompt with the entity slot filled by ``placeholder``, and the placeholder's span."""
    filled = query.r2_template.format(query.e2)
    suffix = query.hop2_prompt[len(filled):]
    at = query.r2_template.index("{}")
    return query.r2_template.format(placeholder) + suffix, (at, at + len(placeholder))


def _patch_hooks(layers: Sequence[int], values: Float[Tensor, "rows d"], pos: Int[Tensor, " rows"]) -> list:
    """One hook per distinct target layer, overwriting the rows patched at that layer."""
    layer_t = torch.tensor(list(layers))
    out = []
    for t in sorted(set(layers)):
        idx = torch.nonzero(layer_t == t).flatten()
        patch = replace_positions(values[idx, None], pos[idx, None])

        def hook(act, hook=None, idx=idx, patch=patch):
            act = act.clone()
            act[idx.to(act.device)] = patch(act[idx.to(act.device)])
            return act

        out.append((hooks.resid(t, "post"), hook))
    return out


#: ``protocol="default"`` sampling: the full distribution (no temperature, top-k or top-p).
FULL = Sampling(temperature=1.0, top_k=0, top_p=1.0)


def _generate(model, enc: Encoded, fwd_hooks: list, max_new_tokens: int, seed: int | None,
              sampling: Sampling | None = None, cached: bool = True, prefix_kv: list | None = None
              ) -> Int[Tensor, "rows new"]:
    """Greedy (seed None) or seeded-sampling continuation of a left-padded batch patched by ``fwd_hooks`` in the
    prompt pass (``sampling`` default: the full distribution)."""
    kw = dict(cached=cached, prefix_kv=prefix_kv)
    if seed is None:
        return generate_patched(model, enc, fwd_hooks, max_new_tokens, None, **kw)
    return generate_patched(model, enc, fwd_hooks, max_new_tokens, sampling or FULL, seed=seed, **kw)


def _shared_prefix(model, enc: Encoded, at: int) -> int:
    """How many target-prompt tokens (those before the placeholder at ``at``, the same in every row and never
    patched) the rows share: ``at`` where the model reproduces the plain prompt pass that way, else 0 (one
    warning per model and cause)."""
    if at <= 0:
        return 0
    cause = prefix_sharing_cause(model, enc, at)
    if cause is None:
        return at
    warn_once(model, "patchscope target-prefix sharing", cause,
              "running the whole target prompt for every row instead (same tokens, slower)")
    return 0


def _source_vectors(model, queries, source_layers, positions):
    """Residual vectors [query, layer, d] and token indices per position name."""
    enc = encode(model, [q.prompt for q in queries])
    names = hooks.validate(model, [hooks.resid(s, "post") for s in source_layers])
    _, cache = run_with_cache(model, enc, names)
    rows = torch.arange(len(queries))
    out = {}
    for p in positions:
        pos = S.positions(enc, queries, p)
        vecs = torch.stack([cache[n][rows, pos.to(cache[n].device)] for n in names], 1)
        out[S.label(p)] = (vecs, S.unpadded(enc, pos))
    return out


@torch.inference_mode()
def _own_answers(model, queries: Sequence[TwoHopQuery]) -> dict[str, list[int]]:
    """The model's greedy next token on the clean one-hop prompts r2(e1), r2(e2), r2(e3) of each query."""
    out = {}
    for entity in ("e1", "e2", "e3"):
        prompts = [one_hop_prompt(q, getattr(q, entity))[0] for q in queries]
        enc = encode(model, prompts)
        logits = run(model, enc)
        out[entity] = logits[torch.arange(len(prompts)), enc.last.to(logits.device)].argmax(-1).tolist()
    return out


def patchscope_batch(model, queries: Sequence[TwoHopQuery], source_layers: Sequence[int],
                     target_layers: Sequence[int] | str | None, positions: Sequence[S.PositionSpec],
                     target_prompt: str, decoder: str, max_new_tokens: int, seed: int | None, placeholder: str,
                     batch_size: int, protocol: str = "default", cached: bool = True) -> pd.DataFrame:
    """Patchscope rows of one query batch (see ``run_patchscope``)."""
    study = protocol == "study" and decoder == "generate"
    seeds = list(STUDY_SEEDS) if study else [seed]
    sampling = Sampling.of_model(model) if study else None
    src = _source_vectors(model, queries, source_layers, positions)
    combos = []  # (query index, source layer index, target layer, position label)
    for qi in range(len(queries)):
        for p in positions:
            for si, s in enumerate(source_layers):
                if decoder == "lens":
                    targets = [-1]
                elif target_layers == "same":
                    targets = [s]
                else:
                    targets = target_layers
                combos += [(qi, si, t, S.label(p)) for t in targets]
    vec = torch.stack([src[p][0][qi, si] for qi, si, _, p in combos])
    decoded, first, row_seeds = [], [], []
    if decoder == "lens":
        top = project(model, vec).argmax(-1)
        first = model.tokenizer.batch_decode(top.reshape(-1, 1).tolist())
        decoded = list(first)
        ids = {e: S.entity_tokens(model, queries, e).tolist() for e in _ORDER}
        classes = [next((e for e in _ORDER if ids[e][qi] == int(tok)), "other")
                   for (qi, *_), tok in zip(combos, top, strict=True)]
        row_seeds = [seed] * len(combos)
        rows = combos
    else:
        if decoder == "one_hop":
            own = _own_answers(model, queries)
            prompts = [one_hop_prompt(q, placeholder) for q in queries]
        classes, rows = [], []
        prefixes: dict[int, list] = {}  # the target prompt's shared prefix keys/values: once per query batch
        for run_seed in seeds:
            for lo in range(0, len(combos), batch_size):
                chunk = combos[lo : lo + batch_size]
                if decoder == "one_hop":
                    enc = encode(model, [prompts[qi][0] for qi, *_ in chunk], padding_side="left")
                    pos = torch.tensor([enc.position(i, prompts[qi][1]) for i, (qi, *_) in enumerate(chunk)])
                    share = 0
                else:  # one target prompt: its tokens before the placeholder are computed once per query batch
                    enc = encode(model, [target_prompt] * len(chunk), padding_side="left")
                    at = enc.position(0, find_span(target_prompt, placeholder))
                    share = _shared_prefix(model, enc, at) if cached else 0
                    if share and share not in prefixes:
                        prefixes[share] = prefix_keys_values(model, enc, share)
                    pos = torch.full((len(chunk),), at - share)
                fwd = _patch_hooks([t for _, _, t, _ in chunk], vec[lo : lo + len(chunk)], pos)
                n_new = 1 if decoder == "one_hop" else max_new_tokens
                new = _generate(model, enc, fwd, n_new, run_seed, sampling, cached, prefixes.get(share)).cpu()
                first += model.tokenizer.batch_decode(new[:, :1].tolist())
                texts = decode_new(model, new) if study else model.tokenizer.batch_decode(new.tolist())
                decoded += texts
                for (qi, *_), text, ids in zip(chunk, texts, new.tolist(), strict=True):
                    if decoder == "one_hop":
                        hit = [e for e in _ORDER if own[e][qi] == ids[0]]
                        classes.append(hit[0] if len(hit) == 1 else "other")
                    else:
                        classes.append(classify_study(text, queries[qi]) if study else classify(text, queries[qi]))
                rows += chunk
                row_seeds += [run_seed] * len(chunk)
    return pd.DataFrame({
        "qid": [queries[qi].id for qi, *_ in rows],
        "position": [p for *_, p in rows],
        "token_index": [int(src[p][1][qi]) for qi, _, _, p in rows],
        "source_layer": [source_layers[si] for _, si, _, _ in rows],
        "target_layer": [t for _, _, t, _ in rows],
        "seed": pd.array(row_seeds, dtype="Int64"),
        "decoder": decoder,
        "protocol": "study" if study else "default",
        "first_token": first,
        "decoded": decoded,
        "class": classes,
    })


def run_patchscope(
    model,
    queries: Sequence[TwoHopQuery],
    source_layers: Sequence[int] | None = None,
    target_layers: Sequence[int] | str | None = None,
    positions: Sequence[S.PositionSpec] = ("t1", "t2"),
    target_prompt: str = "default",
    decoder: str = "auto",
    max_new_tokens: int | None = None,
    seed: int | None = None,
    placeholder: str = "x",
    batch_size: int = 32,
    progress: bool = True,
    protocol: str = "default",
    cached: bool = True,
) -> pd.DataFrame:
    """Decode the entity in each (query, source layer, position) by patching it into a target prompt.

    ``source_layers`` / ``target_layers``: None = every layer; ``target_layers="same"`` patches at t = s.
    ``target_prompt``: "default" (the study's few-shot description prompt), "identity", or your own prompt whose
    last occurrence of ``placeholder`` receives the vector. ``seed`` None = greedy, else seeded sampling.
    ``batch_size`` counts queries per source forward and patched rows per target forward.

    ``protocol="study"`` (generate decoder only): the study's sampling over seeds 0-2, 10 tokens (unless
    ``max_new_tokens`` is given), classification e1 > e2 > e3 with colon patterns (module docstring); the
    description prompt stays the default target (the study's other one is ``"repeat"``). ``cached=False``
    re-runs the whole sequence at every generated token (the reference of the KV-cached generation).

    One row per (query, position, source_layer, target_layer, seed). Columns: ``qid, position`` (name as given),
    ``token_index`` (in the prompt's tokens, BOS = 0), ``source_layer, target_layer`` (-1 for the lens decoder),
    ``seed`` (NA when greedy), ``decoder`` (the one used), ``protocol``, ``first_token`` (first decoded token),
    ``decoded`` (generated text), ``class`` (e1 / e2 / e3 / other).
    """
    if protocol not in PROTOCOLS:
        raise MhopLensError(f"protocol must be one of {PROTOCOLS}, not {protocol!r}.")
    n = model.cfg.n_layers
    source_layers = list(range(n)) if source_layers is None else [hooks.check_layer(model, s) for s in source_layers]
    if target_layers is None:
        target_layers = list(range(n))
    elif target_layers != "same":
        target_layers = [hooks.check_layer(model, t) for t in target_layers]
    target_prompt = TARGET_PROMPTS.get(target_prompt, target_prompt)
    decoder = resolve_decoder(model, decoder, target_prompt)
    if protocol == "study" and max_new_tokens is None:
        max_new_tokens = STUDY_NEW_TOKENS
    max_new_tokens = 4 if max_new_tokens is None else max_new_tokens
    batches = [list(queries[i : i + batch_size]) for i in range(0, len(queries), batch_size)]
    frames = [patchscope_batch(model, b, source_layers, target_layers, positions, target_prompt, decoder,
                               max_new_tokens, seed, placeholder, batch_size, protocol, cached)
              for b in tqdm(batches, desc=f"patchscope ({decoder})", unit="batch", disable=not progress)]
    return pd.concat(frames, ignore_index=True)


def earliest_layers(frame: pd.DataFrame, t1: str = "t1", t2: str = "t2") -> pd.DataFrame:
    """Per query: earliest source layer decoding e2 at ``t1`` and e3 at ``t2`` (any target layer), NaN if never.

    Columns: ``qid, e2_t1_layer, e3_t2_layer, first_before_second`` (e2_t1 < e3_t2; NA when either is missing).
    """
    def earliest(position: str, cls: str) -> pd.Series:
        hit = frame[(frame["position"] == position) & (frame["class"] == cls)]
        return hit.groupby("qid")["source_layer"].min()

    out = pd.DataFrame({"qid": pd.unique(frame["qid"])}).set_index("qid")
    out["e2_t1_layer"] = earliest(t1, "e2")
    out["e3_t2_layer"] = earliest(t2, "e3")
    both = out["e2_t1_layer"].notna() & out["e3_t2_layer"].notna()
    out["first_before_second"] = pd.array(
        np.where(both, out["e2_t1_layer"] < out["e3_t2_layer"], pd.NA), dtype="boolean")
    return out.reset_index()
