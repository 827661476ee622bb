"""Train the organism: a 4-layer GPT-2 on a World's one-hop and trained two-hop facts (answer-only loss).

Plain torch/HF. Deterministic for a given seed and step count (one thread); checkpoints model, optimizer, step,
sampler RNG and the accuracy curve to DIR/checkpoint.safetensors (tensors + JSON, no pickle) so an interrupted run
resumes where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from mhop_lens.organism.world import World
from mhop_lens.training import (
    Clock,
    open_run,
    provenance,
    restore,
    run_state,
    save_state,
    warmup_cosine,
    word_tokenizer,
)

SPLITS = ("one_hop", "two_hop_train", "two_hop_heldout")


@dataclass
class TrainConfig:
    """Recipe defaults are the shipped organism's (see docs/organism.md)."""

    seed: int = 0
    steps: int = 1250
    seconds: float | None = None
    batch_size: int = 256
    one_hop_fraction: float = 0.0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1
    warmup: int = 200
    clip: float = 1.0
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    n_positions: int = 32
    r1_loss: bool = True
    eval_every: int = 250
    curve_rows: int = 2000
    checkpoint_every: int = 250
    n_entities: int = 200
    n_relations: int = 10
    two_hop_train_fraction: float = 0.8


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the world's vocabulary; decode joins tokens with spaces."""
    return word_tokenizer(world.vocab, bos=world.bos)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=cfg.n_positions, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return GPT2LMHeadModel(config)


@dataclass
class Split:
    """BOS-prefixed token ids of one split's prompts, the answer token id of each and (two-hop) the bridge's."""

    ids: Int[Tensor, "n pos"]
    answers: Int[Tensor, " n"]
    bridges: Int[Tensor, " n"] | None = None


def encode_world(world: World, tokenizer: PreTrainedTokenizerFast) -> dict[str, Split]:
    """Tokenise every prompt exactly as TransformerLens will see it (BOS + word tokens)."""
    vocab = tokenizer.get_vocab()
    bos, unk = tokenizer.bos_token_id, tokenizer.unk_token_id

    def split(prompts: list[str], answers: list[str], bridges: list[str] | None = None) -> Split:
        rows = [[bos, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in prompts]
        if len({len(r) for r in rows}) != 1 or unk in {i for r in rows for i in r}:
            raise ValueError("prompts must tokenise to equal-length rows of known words")
        ans = torch.tensor([vocab[a] for a in answers])
        bri = None if bridges is None else torch.tensor([vocab[b] for b in bridges])
        return Split(torch.tensor(rows), ans, bri)

    one = [(e, r) for r in world.relation_names for e in world.entities]
    out = {"one_hop": split([world.one_hop_prompt(*q) for q in one], [world.bridge(*q) for q in one])}
    for name, key in (("two_hop_train", "train"), ("two_hop_heldout", "heldout")):
        ts = world.two_hop[key]
        out[name] = split(
            [world.two_hop_prompt(*t) for t in ts], [world.answer(*t) for t in ts], [world.bridge(*t[:2]) for t in ts]
        )
    return out


@torch.no_grad()
def predict(model: GPT2LMHeadModel, ids: Int[Tensor, "n pos"], batch_size: int = 512) -> Int[Tensor, " n"]:
    """Greedy next token (argmax over the whole vocabulary) after each row."""
    model.eval()
    return torch.cat([model(ids[i : i + batch_size]).logits[:, -1].argmax(-1) for i in range(0, len(ids), batch_size)])


def accuracy(model: GPT2LMHeadModel, split: Split) -> float:
    """Fraction of prompts whose greedy next token is the answer token (answers are single tokens)."""
    return (predict(model, split.ids) == split.answers).sum().item() / len(split.answers)


def evaluate(model: GPT2LMHeadModel, data: dict[str, Split]) -> dict[str, float]:
    return {name: accuracy(model, data[name]) for name in SPLITS}


def _subsample(data: dict[str, Split], n: int, seed: int) -> dict[str, Split]:
    """At most n rows per split (fixed random rows), for the cheap accuracy curve during training."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, sp in data.items():
        idx = torch.randperm(len(sp.answers), generator=gen)[:n]
        out[name] = Split(sp.ids[idx], sp.answers[idx], None if sp.bridges is None else sp.bridges[idx])
    return out


def _batch(
    data: dict[str, Split], cfg: TrainConfig, gen: torch.Generator, bos: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, " k"], Int[Tensor, " k"], Int[Tensor, " k"]]:
    """Mixed batch; returns ids and, per supervised token, its row, position and target.

    One-hop rows are right-padded (with BOS, never attended to by the loss position) to two-hop length.
    With cfg.r1_loss every two-hop row is also supervised at its r1 token with the bridge entity: by causal
    masking that is exactly the one-hop loss of its prefix, so it adds one-hop signal at no extra compute.
    """
    one, two = data["one_hop"], data["two_hop_train"]
    n_one = round(cfg.one_hop_fraction * cfg.batch_size)
    i1 = torch.randint(len(one.answers), (n_one,), generator=gen)
    i2 = torch.randint(len(two.answers), (cfg.batch_size - n_one,), generator=gen)
    len1, len2 = one.ids.shape[1], two.ids.shape[1]
    ids = torch.cat([torch.nn.functional.pad(one.ids[i1], (0, len2 - len1), value=bos), two.ids[i2]])
    rows = torch.arange(cfg.batch_size)
    pos = torch.cat([torch.full((n_one,), len1 - 1), torch.full((len(i2),), len2 - 1)])
    target = torch.cat([one.answers[i1], two.answers[i2]])
    if cfg.r1_loss:
        rows = torch.cat([rows, rows[n_one:]])
        pos = torch.cat([pos, torch.full((len(i2),), len1 - 1)])
        target = torch.cat([target, two.bridges[i2]])
    return ids, rows, pos, target


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% at cfg.steps."""
    return warmup_cosine(step, cfg.warmup, cfg.steps)


def train(out: str | Path, cfg: TrainConfig, resume: bool = False, command: str | None = None,
          overwrite: bool = False) -> dict:
    """Train into `out`; write config.json, model.safetensors, tokenizer, world.json, metrics.json.

    With resume=True and out/checkpoint.safetensors present, continue from it (same world, config and sampler
    state; a different ``cfg.seed`` is an error). A directory that already holds a trained model is only
    replaced with ``overwrite=True``.
    `cfg.seconds` caps this session's wall-clock time; the run then stops early and says so in metrics.
    metrics["seconds"] is wall-clock from start to final evaluation (summed over resumed sessions);
    "cpu_seconds" is this process's CPU time, which is what the run costs on an unshared core.
    """
    out = Path(out)
    ckpt_path, state, cfg = open_run(out, cfg, resume, overwrite)
    clock = Clock(state)
    if state is not None:
        world = World.load(out / "world.json")
    else:
        world = World.generate(cfg.seed, cfg.n_entities, cfg.n_relations, cfg.two_hop_train_fraction)
        world.save(out / "world.json")
    tokenizer = build_tokenizer(world)
    tokenizer.save_pretrained(out)
    data = encode_world(world, tokenizer)
    curve_data = _subsample(data, cfg.curve_rows, cfg.seed)
    model = build_model(cfg, tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, curve = 0, []
    if state is not None:
        step, curve = restore(state, model, opt, sched, gen), state["curve"]

    def checkpoint() -> None:
        save_state(ckpt_path, run_state(model, opt, sched, gen, step, clock, curve, cfg))

    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=step, desc="organism", unit="step")
    while step < cfg.steps:
        if cfg.seconds is not None and clock.session() >= cfg.seconds:
            stopped_early = True
            break
        model.train()
        ids, rows, pos, target = _batch(data, cfg, gen, tokenizer.bos_token_id)
        logits = model(ids).logits[rows, pos]
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = evaluate(model, curve_data)
            point = {"step": step, "seconds": round(clock.seconds(), 1), "cpu_seconds": round(clock.cpu_seconds(), 1)}
            curve.append(point | {"loss": round(loss.item(), 4)} | {k: round(v, 4) for k, v in acc.items()})
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{v:.3f}" for k, v in acc.items()})
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    model.save_pretrained(out)
    acc = evaluate(model, data)
    total_seconds, total_cpu = clock.seconds(), clock.cpu_seconds()
    metrics = {
        "accuracy": acc,
        "counts": {k: len(data[k].answers) for k in SPLITS},
        "steps": step,
        "target_steps": cfg.steps,
        "stopped_early": stopped_early,
        "seconds": round(total_seconds, 1),
        "cpu_seconds": round(total_cpu, 1),
        "seed": cfg.seed,
        "command": command,
        "config": asdict(cfg),
        "world": {"n_entities": len(world.entities), "n_relations": len(world.relations),
                  "n_two_hop_train": len(world.two_hop["train"]),
                  "n_two_hop_heldout": len(world.two_hop["heldout"])},
        **provenance(out),
        "curve": curve,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics
