"""Train the three-hop organism: a 4-layer GPT-2 on a KHopWorld's trained depth-k chains, answer-only loss at every
relation token (r1 -> e2, r2 -> e3, ..., rk -> e_{k+1}).

By causal masking the loss at r_i is exactly the loss of the chain's depth-i prefix, so one-hop facts and all
shorter chains are trained through the prefixes of the trained depth-k chains at no extra compute. The model, the
tokenizer and the lr schedule are the two-hop organism's (``mhop_lens.organism.train``, ``mhop_lens.training``).
Deterministic for a seed and step count (one thread); DIR/checkpoint.safetensors holds model, optimizer,
scheduler, sampler RNG and curve, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

from mhop_lens.organism.train import build_model, build_tokenizer
from mhop_lens.organism_khop.world import KHopWorld
from mhop_lens.training import Clock, open_run, provenance, restore, run_state, save_state, warmup_cosine

DEPTH_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass
class TrainConfig:
    """Recipe defaults are the shipped three-hop organism's (see docs/khop.md)."""

    seed: int = 0
    steps: int = 1500
    seconds: float | None = None
    batch_size: int = 512
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    warmup: int = 200
    clip: float = 1.0
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_positions: int = 32
    eval_every: int = 250
    curve_rows: int = 2000
    checkpoint_every: int = 250
    n_entities: int = 200
    n_relations: int = 5
    depth: int = 3
    train_fraction: float = 0.8


@dataclass
class ChainSplit:
    """BOS-prefixed ids of chains of one depth and the entity expected at each relation token (column i: e_{i+2})."""

    ids: Int[Tensor, "n pos"]
    targets: Int[Tensor, "n hop"]

    @property
    def positions(self) -> list[int]:
        """Token positions of r1..rk in "<bos> e1 's r1 's r2 ..."."""
        return [3 + 2 * i for i in range(self.targets.shape[1])]

    def rows(self, idx: Tensor) -> ChainSplit:
        return ChainSplit(self.ids[idx], self.targets[idx])


def encode_chains(world: KHopWorld, tokenizer: PreTrainedTokenizerFast, chains: list) -> ChainSplit:
    """Token ids of the chains' prompts exactly as TransformerLens sees them, and the entity after every hop."""
    vocab = tokenizer.get_vocab()
    rows = [[tokenizer.bos_token_id, *tokenizer(world.chain_prompt(c), add_special_tokens=False)["input_ids"]]
            for c in chains]
    if len({len(r) for r in rows}) != 1 or tokenizer.unk_token_id in {i for r in rows for i in r}:
        raise ValueError("chains must tokenise to equal-length rows of known words")
    targets = [[vocab[e] for e in world.entities_of(c)[1:]] for c in chains]
    return ChainSplit(torch.tensor(rows), torch.tensor(targets))


def split_names(depth: int) -> list[str]:
    """Evaluation splits: every shorter depth (all trained), then depth-k trained and held out."""
    return [f"{DEPTH_WORDS[d]}_hop" for d in range(1, depth)] + [
        f"{DEPTH_WORDS[depth]}_hop_train", f"{DEPTH_WORDS[depth]}_hop_heldout"]


def encode_world(world: KHopWorld, tokenizer: PreTrainedTokenizerFast) -> dict[str, ChainSplit]:
    """Every chain of depth < k (one-hop facts, two-hop chains, ...) and the depth-k trained / held-out chains."""
    import itertools

    names = world.relation_names
    out = {}
    for d in range(1, world.depth):
        chains = [(e, *rs) for e in world.entities for rs in itertools.product(names, repeat=d)]
        out[f"{DEPTH_WORDS[d]}_hop"] = encode_chains(world, tokenizer, chains)
    for split in ("train", "heldout"):
        out[f"{DEPTH_WORDS[world.depth]}_hop_{split}"] = encode_chains(world, tokenizer, world.chains[split])
    return out


@torch.no_grad()
def predict_at(model: GPT2LMHeadModel, data: ChainSplit, batch_size: int = 512) -> Int[Tensor, "n hop"]:
    """Greedy token (argmax over the whole vocabulary) at every relation token of every row."""
    model.eval()
    pos = data.positions
    return torch.cat([model(data.ids[i:i + batch_size]).logits[:, pos].argmax(-1)
                      for i in range(0, len(data.ids), batch_size)])


def evaluate(model: GPT2LMHeadModel, data: dict[str, ChainSplit]) -> dict[str, float]:
    """Accuracy of the final answer (last relation token) of every split."""
    return {name: (predict_at(model, sp)[:, -1] == sp.targets[:, -1]).float().mean().item()
            for name, sp in data.items()}


def per_hop(model: GPT2LMHeadModel, world: KHopWorld, tokenizer: PreTrainedTokenizerFast,
            data: ChainSplit, chains: list) -> dict[str, float]:
    """On depth-k chains: accuracy of every prefix chain (e1->e2, e1->e3, ...), of the last hop asked alone
    (the one-hop fact (e_k, r_k)), and of the full chain given every prefix right."""
    hit = predict_at(model, data) == data.targets
    out = {f"prefix_{i + 1}_hops": hit[:, i].float().mean().item() for i in range(hit.shape[1])}
    last = encode_chains(world, tokenizer, [(world.entities_of(c)[-2], c[-1]) for c in chains])
    out["last_hop_alone"] = (predict_at(model, last)[:, -1] == last.targets[:, -1]).float().mean().item()
    prefixes_right = hit[:, :-1].all(1)
    out["n_prefixes_right"] = int(prefixes_right.sum())
    out["full_given_prefixes_right"] = hit[prefixes_right, -1].float().mean().item()
    return out


def _batch(train: ChainSplit, cfg: TrainConfig, gen: torch.Generator) -> ChainSplit:
    return train.rows(torch.randint(len(train.ids), (cfg.batch_size,), generator=gen))


def train(out: str | Path, cfg: TrainConfig, resume: bool = False, command: str | None = None,
          overwrite: bool = False) -> dict:
    """Train into ``out``: config.json, model.safetensors, tokenizer, world.json, metrics.json,
    checkpoint.safetensors (``training.save_state``: tensors + JSON, nothing that can run code when read).

    ``cfg.seconds`` caps this session's wall-clock time (the run stops early and says so; --resume continues with
    the same seed); a directory that already holds a trained model is only replaced with ``overwrite=True``.
    """
    out = Path(out)
    ckpt_path, state, cfg = open_run(out, cfg, resume, overwrite)
    clock = Clock(state)
    if state is not None:
        world = KHopWorld.load(out / "world.json")
    else:
        world = KHopWorld.generate(cfg.seed, cfg.n_entities, cfg.n_relations, cfg.depth, cfg.train_fraction)
        world.save(out / "world.json")
    tokenizer = build_tokenizer(world)
    tokenizer.save_pretrained(out)
    data = encode_world(world, tokenizer)
    train_split = data[f"{DEPTH_WORDS[cfg.depth]}_hop_train"]
    sub = torch.Generator().manual_seed(cfg.seed)
    curve_data = {k: sp.rows(torch.randperm(len(sp.ids), generator=sub)[:cfg.curve_rows]) for k, sp in data.items()}
    model = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, curve = 0, []
    if state is not None:
        step, curve = restore(state, model, opt, sched, gen), state["curve"]

    def checkpoint() -> None:
        save_state(ckpt_path, run_state(model, opt, sched, gen, step, clock, curve, cfg))

    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=step, desc="organism-khop", unit="step")
    while step < cfg.steps:
        if cfg.seconds is not None and clock.session() >= cfg.seconds:
            stopped_early = True
            break
        model.train()
        batch = _batch(train_split, cfg, gen)
        logits = model(batch.ids).logits[:, batch.positions]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = evaluate(model, curve_data)
            curve.append({"step": step, "seconds": round(clock.seconds(), 1),
                          "cpu_seconds": round(clock.cpu_seconds(), 1), "loss": round(loss.item(), 4)}
                         | {k: round(v, 4) for k, v in acc.items()})
            tqdm.write(json.dumps(curve[-1]))
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    model.save_pretrained(out)
    acc = evaluate(model, data)
    held = f"{DEPTH_WORDS[cfg.depth]}_hop_heldout"
    metrics = {
        "accuracy": acc,
        "counts": {k: len(sp.ids) for k, sp in data.items()},
        "heldout_per_hop": per_hop(model, world, tokenizer, data[held], world.chains["heldout"]),
        "steps": step, "target_steps": cfg.steps, "stopped_early": stopped_early,
        "seconds": round(clock.seconds(), 1), "cpu_seconds": round(clock.cpu_seconds(), 1),
        "seed": cfg.seed, "command": command, "config": asdict(cfg),
        "world": {"n_entities": len(world.entities), "n_relations": len(world.relations), "depth": world.depth,
                  "n_train": len(world.chains["train"]), "n_heldout": len(world.chains["heldout"])},
        **provenance(out),
        "curve": curve,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
