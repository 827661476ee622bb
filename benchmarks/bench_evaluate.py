"""Evaluation throughput (queries / s), both scorers: ``mhop_lens.evaluate`` vs a per-prompt loop.

Each query has five prompts (two-hop, hop 1, hop 2, two shortcuts). Baselines, what a hand-written script does:

- logprob: for every (prompt, answer alias) one unbatched teacher-forced forward of prompt + answer through the
  bridge, correct when every answer token is the greedy next token;
- gen: for every prompt one unbatched greedy ``generate`` (HF model under the bridge, KV cache) of as many tokens
  as the longest alias, matched on word boundaries.

Ours batches prompts by length, scores prompts shared between queries and kinds once, and scores one-token answers
from the prompt's own forward. The per-kind correctness of both must agree on every query.
"""

from __future__ import annotations

import sys

import torch
from common import compare, gpt2_small_dir, load_organism, parse_args, random_queries, report

from mhop_lens.data.records import PROMPT_KINDS
from mhop_lens.evaluate import answer_texts, evaluate, mentions
from mhop_lens.models import load_model
from mhop_lens.tokens import encode


def per_prompt_logprob(model, queries) -> list[bool]:
    """Correctness per (query, kind), one forward per (prompt, alias)."""
    out = []
    with torch.inference_mode():
        for q in queries:
            for kind in PROMPT_KINDS:
                prompt, ok = q.prompt_of(kind), False
                n_prompt = encode(model, prompt).tokens.shape[1]
                for answer in answer_texts(q, kind):
                    enc = encode(model, prompt + q.answer_prefix + answer)
                    logits = model(enc.tokens, attention_mask=enc.attention_mask)[0]
                    targets = enc.tokens[0, n_prompt:]
                    ok |= bool((logits[n_prompt - 1 : -1].argmax(-1) == targets).all())
                out.append(ok)
    return out


def per_prompt_gen(model, queries) -> list[bool]:
    """Correctness per (query, kind), one greedy generate per prompt."""
    hf, tok, out = model.original_model, model.tokenizer, []
    with torch.inference_mode():
        for q in queries:
            for kind in PROMPT_KINDS:
                answers = answer_texts(q, kind)
                n = max(len(tok(q.answer_prefix + a, add_special_tokens=False)["input_ids"]) for a in answers)
                enc = encode(model, q.prompt_of(kind))
                new = hf.generate(input_ids=enc.tokens, attention_mask=enc.attention_mask, max_new_tokens=n,
                                  do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                  pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
                out.append(mentions(tok.decode(new[0, enc.tokens.shape[1] :], skip_special_tokens=True), answers))
    return out


def bench(name: str, model, queries, repeats: int) -> dict[str, float]:
    print(f"\n## {name}: {len(queries)} queries x {len(PROMPT_KINDS)} prompts", flush=True)
    ratios = {}
    for scorer, baseline in (("logprob", per_prompt_logprob), ("gen", per_prompt_gen)):
        evaluate(model, queries[:2], scorer=scorer, progress=False)  # warm-up
        fns = {"ours (batched)": lambda s=scorer: evaluate(model, queries, scorer=s, progress=False),
               "per-prompt loop": lambda b=baseline: b(model, queries)}
        seconds, results, memory = compare(fns, repeats)
        frame = results["ours (batched)"]
        mine = [bool(frame.iloc[i][f"{kind}_correct"]) for i in range(len(queries)) for kind in PROMPT_KINDS]
        theirs = results["per-prompt loop"]
        assert mine == theirs, f"{scorer}: {sum(a != b for a, b in zip(mine, theirs, strict=True))} verdicts differ"
        r = report(f"{name}, scorer={scorer}: median of {repeats}, all {len(mine)} verdicts agree", seconds, memory,
                   "ours (batched)")
        for method, sec in seconds.items():
            print(f"  {method:<28} {len(queries) / sec:8.1f} queries / s")
        ratios[scorer] = r["per-prompt loop"]
    return ratios


def main() -> int:
    args = parse_args(__doc__.splitlines()[0])
    results = {}
    organism, queries = load_organism()
    if organism is not None:
        results["organism"] = bench("organism (held-out)", organism, queries[: 200 if args.quick else 1000],
                                    repeats=3 if args.quick else 5)
    model = load_model(str(gpt2_small_dir()), device="cpu")
    results["gpt2-small-shape"] = bench("random GPT-2-small shape", model, random_queries(model, 16 if args.quick
                                                                                           else 100), repeats=1)
    print("\nsummary (evaluation speedup over the per-prompt loop)")
    for name, r in results.items():
        print(f"  {name:<18} logprob {r['logprob']:5.1f}x, gen {r['gen']:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
