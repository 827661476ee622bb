"""Patched generation: KV cache (patch once in the prompt pass) vs re-running the whole sequence at every token.

Patchscopes (``describe --decoder generate``) and back-patching with ``--criterion generate`` continue a patched
prompt for several tokens (the study: 10). The re-run baseline is what ``patchscope`` did before: every step runs
prompt + generated tokens again with the patch hook active. Ours (``patched_generation.generate_patched``) patches
in the prompt pass, keeps the keys/values and runs one new token per step. Both must give the same tokens (checked
here on every row, greedy and seeded sampling). Shapes: the study's description prompt patched at its placeholder,
10 new tokens, on a random GPT-2-small-shaped model (12 layers, d_model 768); and the organism's back-patching
generations (its held-out prompts, 10 tokens).
"""

from __future__ import annotations

import sys

import torch
from common import block_flops, compare, forward_flops, gpt2_small_dir, load_organism, parse_args, report, unembed_flops

from mhop_lens import hooks
from mhop_lens.analyses.patched_generation import Sampling, _cache_filled, generate_patched
from mhop_lens.analyses.patchscope import DEFAULT
from mhop_lens.interventions import replace_positions
from mhop_lens.models import load_model
from mhop_lens.positions import find_span
from mhop_lens.tokens import encode


def bench(name: str, model, prompts: list[str], position: torch.Tensor, layer: int, n_new: int, repeats: int,
          sampling: Sampling | None) -> float:
    enc = encode(model, prompts, padding_side="left")
    values = torch.randn(len(prompts), 1, model.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 4
    fwd = [(hooks.resid(layer, "post"), replace_positions(values, position[:, None]))]
    fns = {"ours (KV cache)": lambda: generate_patched(model, enc, fwd, n_new, sampling, seed=0),
           "re-run every step": lambda: generate_patched(model, enc, fwd, n_new, sampling, seed=0, cached=False)}
    generate_patched(model, enc.select(torch.arange(2)), [], 2)  # warm-up
    _, kv = model.run_with_hooks(enc.tokens[:1], attention_mask=enc.attention_mask[:1], fwd_hooks=[],
                                 return_type="logits_and_cache", use_cache=True)
    if not _cache_filled(kv, enc.tokens.shape[1]):
        print(f"{name}: this transformers release returns no KV cache through the bridge; ours falls back to "
              "re-running every step, so the ratio below is about 1x (issue 14)")
    seconds, results, memory = compare(fns, repeats)
    same = torch.equal(results["ours (KV cache)"], results["re-run every step"])
    assert same, f"{name}: cached and re-run generations differ"
    width, n_layers = enc.tokens.shape[1], model.cfg.n_layers
    rerun = sum(forward_flops(model, len(prompts), width + i) for i in range(n_new))
    cached = forward_flops(model, len(prompts), width) + len(prompts) * sum(
        n_layers * block_flops(model, 1, width + i + 1) + unembed_flops(model, 1) for i in range(n_new - 1))
    kind = "greedy" if sampling is None else "sampled"
    ratios = report(f"{name}: {len(prompts)} rows x {enc.tokens.shape[1]} prompt tokens, {n_new} new tokens "
                    f"({kind}), patch at layer {layer}; median of {repeats}, tokens identical", seconds, memory,
                    "ours (KV cache)", floor=rerun / cached)
    return ratios["re-run every step"]


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    results = {}
    model = load_model(str(gpt2_small_dir()), device="cpu")
    rows = 4 if args.quick else 16
    enc = encode(model, [DEFAULT])
    placeholder = enc.position(0, find_span(DEFAULT, "x"))
    for sampling in (None, Sampling()):
        key = f"gpt2-small-shape {'greedy' if sampling is None else 'sampled'}"
        results[key] = bench("random GPT-2-small shape, description prompt", model, [DEFAULT] * rows,
                             torch.full((rows,), placeholder), 4, 10, 2 if args.quick else 3, sampling)
    organism, queries = load_organism()
    if organism is not None:
        qs = queries[: 100 if args.quick else 250]
        enc = encode(organism, [q.prompt for q in qs], padding_side="left")
        results["organism back-patching"] = bench("organism held-out prompts (back-patching at the last position)",
                                                  organism, [q.prompt for q in qs], enc.last.cpu(), 1, 10,
                                                  2 if args.quick else 3, None)
    print("\nsummary (patched generation, speedup of the KV cache over re-running every step)")
    for name, ratio in results.items():
        print(f"  {name:<34} {ratio:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
