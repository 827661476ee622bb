"""Activation-patching sweeps: ours vs ``transformer_lens.patching`` (one full forward per site).

Sites: residual (``hook_resid_pre``) by layer x position, as ``get_act_patch_resid_pre``; every head's ``hook_z``
at all positions, as ``get_act_patch_attn_head_out_all_pos``. Metric: logit difference clean - corrupted answer at
the last position, per pair (``reduce="none"``). TransformerLens's loop passes no attention mask, so the inputs
are unpadded (all prompts of one token length). Ours batches many sites per forward, starts at the patched
layer and reuses the corrupted run's keys/values of the positions before the patch. In quick mode the baseline is
timed on a subset of sites and its per-site part scaled (every site costs one identical forward; the set-up,
tokenising and the cached clean run, is timed separately and counted once).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter

import torch
from common import (
    block_flops,
    compare,
    forward_flops,
    gpt2_small_dir,
    load_organism,
    parse_args,
    random_queries,
    report,
    unembed_flops,
)
from transformer_lens import patching as tlp

from mhop_lens.analyses.patching import changed_sites, counterfactual_pairs, prepare, run_activation_patching
from mhop_lens.models import load_model
from mhop_lens.tokens import encode, first_token_id

TL_FN = {"resid_pre": tlp.get_act_patch_resid_pre, "z": tlp.get_act_patch_attn_head_out_all_pos}


def same_length_pairs(model, queries, n: int):
    """(clean, corrupted) query pairs, all prompts of the most common token length (no padding needed)."""
    length = {q.id: encode(model, q.prompt).tokens.shape[1] for q in queries}
    common = Counter(length.values()).most_common(1)[0][0]
    pool = [q for q in queries if length[q.id] == common]
    try:
        pairs = [p for p in counterfactual_pairs(pool) if length[p[1].id] == common]
    except Exception:  # noqa: BLE001 - random queries share no relations: pair neighbours
        pairs = list(zip(pool[0::2], pool[1::2], strict=False))
    return pairs[:n]


def tl_baseline(model, pairs, sites: str, index_df=None, setup_times: list | None = None):
    """TransformerLens's generic_activation_patch: one full forward of all pairs per site.

    The set-up (tokenising, the cached clean run) is timed into ``setup_times`` so that a sweep timed on a subset
    of sites can be scaled without scaling the set-up.
    """
    start = time.perf_counter()
    clean_enc = encode(model, [c.prompt for c, _ in pairs])
    corrupt_enc = encode(model, [x.prompt for _, x in pairs])
    assert bool(clean_enc.attention_mask.all()) and bool(corrupt_enc.attention_mask.all()), "inputs must be unpadded"
    good = torch.tensor([first_token_id(model, c.answer_prefix + c.e3) for c, _ in pairs])
    bad = torch.tensor([first_token_id(model, x.answer_prefix + x.e3) for _, x in pairs])
    rows = torch.arange(len(pairs))

    def metric(logits):
        return logits[rows, -1, good] - logits[rows, -1, bad]

    with torch.no_grad():
        _, cache = model.run_with_cache(clean_enc.tokens)
        if setup_times is not None:
            setup_times.append(time.perf_counter() - start)
        fn = TL_FN[sites]
        if index_df is None:
            return fn(model, corrupt_enc.tokens, cache, metric, reduce="none").values
        return fn.func(model, corrupt_enc.tokens, cache, metric, patch_setter=fn.keywords["patch_setter"],
                       activation_name=fn.keywords["activation_name"], index_df=index_df, reduce="none").values


def floor_ratios(model, pairs, sites: str, layers) -> tuple[float, float, int]:
    """Reference FLOPs / FLOPs of recomputing only positions >= p from the patched layer up: counting only the
    sites that need a forward (``patching.changed_sites``: the others are the identity or restore the clean run;
    a head patch starts at the first position where the layer's heads differ, as ours does) and counting every
    site from position 0; and the number of sites that need no forward. One cached run serves both counts."""
    n_layers = model.cfg.n_layers
    c, x = prepare(model, [a.prompt for a, _ in pairs], [b.prompt for _, b in pairs], sites)
    n, width = x.enc.tokens.shape
    floors, skipped, n_sites = [], 0, 0
    for skip in (True, False):
        floor = 0.0
        for layer in layers:
            run, _, start = changed_sites(c, x, sites, layer, skip)
            if skip:
                n_sites += len(run)
                skipped += int((~run).sum())
            for index in run.nonzero()[:, 0].tolist():
                first = index if sites == "resid_pre" else start
                floor += n * ((n_layers - layer) * block_flops(model, width - first, width) + unembed_flops(model, 1))
        floors.append(n_sites * forward_flops(model, n, width) / floor)
    return floors[0], floors[1], skipped


def bench(name, model, pairs, sites: str, repeats: int, site_subset: int | None, layers=None) -> dict[str, float]:
    import pandas as pd

    width = encode(model, pairs[0][0].prompt).tokens.shape[1]
    n_layers = model.cfg.n_layers
    axis = ("layer", "pos") if sites == "resid_pre" else ("layer", "head")
    full = tlp.make_df_from_ranges([n_layers, width if sites == "resid_pre" else model.cfg.n_heads], list(axis))
    layers = list(range(n_layers)) if layers is None else list(layers)
    full = full[full["layer"].isin(layers)].reset_index(drop=True)
    if len(layers) < n_layers:
        site_subset = site_subset or len(full)
    index_df = None
    if site_subset is not None:
        index_df = full.iloc[:: max(1, len(full) // site_subset)].iloc[:site_subset].reset_index(drop=True)
    scale = len(full) / (len(index_df) if index_df is not None else len(full))
    note = f" (baseline timed on {len(index_df)} and scaled)" if scale != 1 else ""
    print(f"\n## {name}, sites={sites}: {n_layers} layers, d_model {model.cfg.d_model}, {len(pairs)} pairs, "
          f"{width} tokens, {len(full)} sites in layers {layers}{note}", flush=True)
    clean, corrupt = [c for c, _ in pairs], [x for _, x in pairs]
    run_activation_patching(model, clean[:2], corrupt[:2], sites, progress=False)  # warm-up
    fns = {
        "ours (kv-partial)": lambda: run_activation_patching(model, clean, corrupt, sites, batch_size=len(pairs),
                                                             layers=layers, progress=False),
        "transformer_lens.patching": lambda: tl_baseline(model, pairs, sites, index_df, setup_times),
    }
    setup_times: list[float] = []
    seconds, results, memory = compare(fns, repeats)
    ours, base = results["ours (kv-partial)"], results["transformer_lens.patching"]
    assert ours.attrs["path"] == "kv-partial"
    index = "position" if sites == "resid_pre" else "head"
    grid = ours.pivot_table(index=["layer", index], columns="pair", values="metric")
    cells = full if index_df is None else index_df
    mine = torch.tensor(grid.loc[pd.MultiIndex.from_frame(cells.set_axis(["layer", index], axis=1))].to_numpy())
    theirs = base.reshape(-1, len(pairs)) if index_df is None else base
    assert (mine - theirs).abs().max() < 1e-4, f"ours and TransformerLens disagree: {(mine - theirs).abs().max()}"
    setup = statistics.median(setup_times)  # the clean cached run etc. happen once, whatever the number of sites
    seconds["transformer_lens.patching"] = setup + (seconds["transformer_lens.patching"] - setup) * scale
    floor, every, skipped = floor_ratios(model, pairs, sites, layers)
    ratios = report(f"{name} {sites}: median of {repeats}, results agree", seconds, memory, "ours (kv-partial)",
                    floor)
    print(f"  {skipped} of {len(full)} sites need no forward (identity, or the patch restores the clean run); "
          f"FLOP floor counting every site from position 0: {every:.1f}x")
    ratios["floor"] = floor
    return ratios


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    quick = args.quick
    results = {}
    organism, queries = load_organism()
    if organism is not None:
        pairs = same_length_pairs(organism, queries, 32 if quick else 200)
        for sites in ("resid_pre", "z"):
            results[f"organism {sites}"] = bench("organism", organism, pairs, sites, repeats=9 if quick else 15,
                                                 site_subset=3 if quick else None)
    model = load_model(str(gpt2_small_dir()), device="cpu")
    pairs = same_length_pairs(model, random_queries(model, 60, seed=1), 1 if quick else 16)
    for sites in ("resid_pre", "z"):
        results[f"gpt2-small-shape {sites}"] = bench("random GPT-2-small shape", model, pairs, sites,
                                                     repeats=1 if quick else 3, site_subset=2 if quick else None,
                                                     layers=[0, 6, 11] if quick else None)
    print("\nsummary (speedup over transformer_lens.patching; target >= 5x; FLOP floor)")
    for name, r in results.items():
        speed = r["transformer_lens.patching"]
        verdict = "OK" if speed >= 5 else "below 5x" + (" (the floor itself is below 5x)" if r["floor"] < 5 else "")
        print(f"  {name:<24} {speed:5.1f}x  (FLOP floor {r['floor']:.1f}x)  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
