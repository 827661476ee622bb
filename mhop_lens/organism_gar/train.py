"""Train the GAR organism: a small Llama on GAR-generator prompts over the organism world (answer-only loss).

Every batch mixes fresh generator examples (all trained forms and their sub-questions, contexts of 2-4 items)
with an auxiliary repeated-sequence task ("w1 .. wk w1 .. wk", loss on the repeat) that makes induction heads
form within ~1k steps; without it in-context recall stays on the uniform-over-context plateau. From step
``statement_loss_from`` a true statement's stated item is also a target ("... that Mary owns" -> drill): the
generation answer inside the Yes/No prompt, which Yes/No judgement can then compare against. From step
``yesno_from`` (6,500) a Yes/No phase follows: fresh AdamW (constant lr, weight decay 0.01), 90% of the GAR rows
Yes/No counter-pairs on 2-item contexts; Yes/No jumps to >0.9 within ~3k phase steps (seed 0). Contexts of the
held-out evaluation never occur in training. Deterministic for a seed and step count (one thread);
DIR/checkpoint.safetensors (tensors + JSON, no pickle) holds model, optimizer, scheduler, sampler state and
curve, so a stopped run resumes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mhop_lens.organism_gar.config import TrainConfig
from mhop_lens.organism_gar.evaluate import eval_set, full_metrics, held_out_contexts
from mhop_lens.organism_gar.predict import accuracy_by_form, answer_ids, encode, pad, predict
from mhop_lens.organism_gar.splits import chunk_rows
from mhop_lens.organism_gar.world import (
    Row,
    build_tokenizer,
    build_world,
    vocab,
)
from mhop_lens.training import Clock, open_run, provenance, restore, run_state, save_state, warmup_cosine

__all__ = ["TrainConfig", "accuracy_by_form", "answer_ids", "encode", "pad", "predict", "train"]


def build_model(cfg: TrainConfig, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)



class Stream:
    """Deterministic, resumable stream of training rows: chunk c is generated from seed (cfg.seed, c)."""

    def __init__(self, world, tok, cfg: TrainConfig, held_out: set[str], cxt_lens: tuple[int, ...] | None = None,
                 yesno_only: bool = False, first_chunk: int = 0, seed: int | None = None):
        self.world, self.tok, self.cfg, self.held_out = world, tok, cfg, held_out
        self.seed = cfg.seed if seed is None else seed
        self.cxt_lens, self.yesno_only = cxt_lens or cfg.cxt_lens, yesno_only
        self.chunk, self.offset, self._rows = first_chunk, 0, None

    def rows(self, c: int) -> list[Row]:
        """Chunk c: generator examples (seed from self.seed and c) minus held-out contexts, plus facts, shuffled."""
        return chunk_rows(self.world, self.cfg, self.seed, c, self.held_out, self.cxt_lens, self.yesno_only)

    def _load(self) -> None:
        rows = self.rows(self.chunk)
        enc = self.tok([r.prompt for r in rows], add_special_tokens=False, return_offsets_mapping=True)
        seqs = [[self.tok.bos_token_id, *ids] for ids in enc["input_ids"]]
        stated = [-1 if r.statement is None else [o[0] for o in offs].index(r.statement)
                  for r, offs in zip(rows, enc["offset_mapping"], strict=True)]
        self._rows = (seqs, answer_ids(self.tok, rows).tolist(), stated)

    def take(self, n: int) -> tuple[list[list[int]], list[int], list[int]]:
        """n rows: BOS-prefixed ids, answer id, and the position predicting a true statement's item (-1: none)."""
        seqs, ans, stated = [], [], []
        while len(seqs) < n:
            if self._rows is None:
                self._load()
            s, a, p = self._rows
            k = min(n - len(seqs), len(s) - self.offset)
            seqs += s[self.offset:self.offset + k]
            ans += a[self.offset:self.offset + k]
            stated += p[self.offset:self.offset + k]
            self.offset += k
            if self.offset == len(s):
                self.chunk, self.offset, self._rows = self.chunk + 1, 0, None
        return seqs, ans, stated

    def state(self) -> dict:
        return {"chunk": self.chunk, "offset": self.offset}

    def restore(self, st: dict) -> None:
        self.chunk, self.offset, self._rows = st["chunk"], st["offset"], None


def repeat_batch(n: int, word_ids: Int[Tensor, " w"], cfg: TrainConfig, gen: torch.Generator, bos: int):
    """n rows "<bos> s s" (s: 3..rep_max random world words) and (row, pos, target) of the repeat's tokens."""
    seqs, rows, pos, tgt = [], [], [], []
    for i in range(n):
        k = int(torch.randint(3, cfg.rep_max + 1, (1,), generator=gen))
        s = word_ids[torch.randint(len(word_ids), (k,), generator=gen)].tolist()
        seqs.append([bos, *s, *s])
        rows += [i] * (k - 1)
        pos += list(range(k + 1, 2 * k))
        tgt += s[1:]
    return seqs, torch.tensor(rows), torch.tensor(pos), torch.tensor(tgt)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% at the end of phase 1 (cfg.yesno_from, else cfg.steps)."""
    return warmup_cosine(step, cfg.warmup, cfg.yesno_from if cfg.yesno_from is not None else cfg.steps)


def _optimizer(model, cfg: TrainConfig, yesno_phase: bool):
    """Phase 1: AdamW at cfg.lr with warm-up + cosine. Yes/No phase: a fresh AdamW at constant cfg.yesno_lr
    (weight decay cfg.yesno_weight_decay)."""
    lr = cfg.yesno_lr if yesno_phase else cfg.lr
    wd = cfg.yesno_weight_decay if yesno_phase else cfg.weight_decay
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=cfg.betas, weight_decay=wd)
    factor = (lambda s: 1.0) if yesno_phase else (lambda s: _lr_factor(s, cfg))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(out: str | Path, cfg: TrainConfig, resume: bool = False, command: str | None = None,
          overwrite: bool = False) -> dict:
    """Train into ``out``: config.json, model.safetensors, tokenizer, world.json, metrics.json, checkpoint.safetensors.

    ``resume`` continues the checkpoint (a different ``cfg.seed`` is an error); a directory that already holds a
    trained model is only replaced with ``overwrite=True``.
    ``cfg.seconds`` caps this session's wall-clock time (the run stops early and says so; resume continues).
    """
    out = Path(out)
    ckpt_path, state, cfg = open_run(out, cfg, resume, overwrite)
    world = build_world()
    tok = build_tokenizer(vocab(world))
    tok.save_pretrained(out)
    (out / "world.json").write_text(json.dumps(world_dict(world), indent=1) + "\n")
    held_out = held_out_contexts(world, cfg.held_out_per_task)
    curve_rows = eval_set(world, cfg.eval_per_task)
    stream = Stream(world, tok, cfg, held_out)
    yn_stream = Stream(world, tok, cfg, held_out, cfg.yesno_cxt_lens, yesno_only=True, first_chunk=10_000,
                       seed=cfg.yesno_seed)
    model = build_model(cfg, tok)

    def in_yesno_phase(s: int) -> bool:
        return cfg.yesno_from is not None and s >= cfg.yesno_from

    yesno_phase = state is not None and in_yesno_phase(state["step"]) and "yn_stream" in state
    opt, sched = _optimizer(model, cfg, yesno_phase)
    gen = torch.Generator().manual_seed(cfg.seed)
    v = tok.get_vocab()
    word_ids = torch.tensor(sorted(v[w] for w in (*world.keys, *world.values)))
    step, curve = 0, []
    if state is not None:
        step, curve = restore(state, model, opt, sched, gen), state["curve"]
        stream.restore(state["stream"])
        if "yn_stream" in state:
            yn_stream.restore(state["yn_stream"])
    clock = Clock(state)

    def checkpoint() -> None:
        save_state(ckpt_path, run_state(model, opt, sched, gen, step, clock, curve, cfg, stream=stream.state(),
                                        **({"yn_stream": yn_stream.state()} if yesno_phase else {})))

    n_rep = round(cfg.rep_fraction * cfg.batch_size)
    stopped_early = False
    bar = tqdm(total=cfg.steps, initial=step, desc=NAME_BAR, unit="step")
    while step < cfg.steps:
        if cfg.seconds is not None and clock.session() >= cfg.seconds:
            stopped_early = True
            break
        model.train()
        if in_yesno_phase(step) and not yesno_phase:
            yesno_phase = True
            opt, sched = _optimizer(model, cfg, True)
        n_yn = round(cfg.yesno_fraction * (cfg.batch_size - n_rep)) if yesno_phase else 0
        seqs, ans, stated = yn_stream.take(n_yn) if n_yn else ([], [], [])
        s2, a2, p2 = stream.take(cfg.batch_size - n_rep - n_yn)
        seqs, ans, stated = seqs + s2, ans + a2, stated + p2
        rseqs, rrow, rpos, rtgt = repeat_batch(n_rep, word_ids, cfg, gen, tok.bos_token_id)
        ids, last = pad(seqs + rseqs, tok.pad_token_id)
        logits = model(ids, attention_mask=(ids != tok.pad_token_id).long()).logits
        n = len(seqs)
        loss_main = torch.nn.functional.cross_entropy(logits[torch.arange(n), last[:n]], torch.tensor(ans))
        loss_rep = torch.nn.functional.cross_entropy(logits[rrow + n, rpos], rtgt)
        loss = loss_main + loss_rep
        if cfg.statement_loss_from is not None and step >= cfg.statement_loss_from:
            rows = [i for i, p in enumerate(stated) if p >= 0]
            pos = torch.tensor([stated[i] for i in rows])
            tgt = torch.tensor([seqs[i][stated[i] + 1] for i in rows])
            loss = loss + torch.nn.functional.cross_entropy(logits[torch.tensor(rows), pos], tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            acc = accuracy_by_form(model, tok, curve_rows)
            curve.append({"step": step, "seconds": round(clock.seconds(), 1), "loss": round(loss_main.item(), 4),
                          "loss_repeat": round(loss_rep.item(), 4)} | {k: round(a, 4) for k, a in acc.items()})
            bar.set_postfix(loss=f"{loss_main.item():.3f}", **{k[:8]: f"{a:.2f}" for k, a in acc.items()})
            tqdm.write(json.dumps(curve[-1]))
        if step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    total = clock.seconds()
    model.save_pretrained(out)
    metrics = full_metrics(model, tok, world, cfg.held_out_per_task)
    metrics |= {
        "name": "organism-gar", "command": command, "seed": cfg.seed, "steps": step, "seconds": round(total, 1),
        "cpu_seconds": round(clock.cpu_seconds(), 1),
        "stopped_early": stopped_early, "config": asdict(cfg),
        "curve": curve, "n_parameters": sum(p.numel() for p in model.parameters()),
        **provenance(out),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


NAME_BAR = "organism-gar"


def world_dict(world) -> dict:
    """The world as JSON: persons, things with kinds, surface templates."""
    return {"name": world.name, "keys": list(world.keys), "values": list(world.values),
            "relations": {n: dict(r.facts) for n, r in world.value_relations.items()},
            "surface": {k: getattr(world.surface, k) for k in ("context", "context_rev", "predicate",
                                                                  "neg_predicate", "copy_kv", "copy_vk")}}
