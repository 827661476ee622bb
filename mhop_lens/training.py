"""Pieces the organisms' training loops share: the word-level tokenizer, the lr schedule, file hashes, resumable
training state stored without pickle (safetensors + JSON), opening / resuming a run, its clock and its provenance.
Each organism keeps its own step loop (batches, losses and phases differ)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mhop_lens.errors import MhopLensError

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickled by older versions; never loaded
TRAINED_FILES = ("model.safetensors", CHECKPOINT, LEGACY_CHECKPOINT)


class CheckpointError(MhopLensError):
    """A training output directory cannot be resumed or written as asked."""


def word_tokenizer(words: Sequence[str], *, bos: str = "<bos>", pad: str = "<pad>", unk: str = "<unk>",
                   punctuation: bool = False):
    """A fast HF tokenizer with one token per word of ``words`` (in that order, so ids are stable).

    ``punctuation=False``: tokens are whitespace-separated and decoding joins them with spaces exactly.
    ``punctuation=True``: runs of punctuation are tokens of their own ("cow." -> "cow", ".") and decoding
    re-attaches them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace() if punctuation else pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=punctuation)
    extra = {} if punctuation else {"clean_up_tokenization_spaces": False}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=bos, pad_token=pad,
                                   unk_token=unk, **extra)


def warmup_cosine(step: int, warmup: int, end: int, floor: float = 0.1) -> float:
    """lr factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at step ``end``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, end - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write training state (nested dicts / lists / tuples of tensors and JSON values: model, optimizer and
    scheduler state dicts, generator state, step, curve, config) to one safetensors file: the tensors as
    tensors, the rest as JSON in the header's metadata. Atomic (a killed process leaves the previous file)."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    meta = _encode(state, tensors, "")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"mhop_lens_state": json.dumps(meta)})
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read what ``save_state`` wrote. Loads tensors and JSON only: nothing in the file can run code."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("mhop_lens_state")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        if meta is None:
            raise ValueError("no mhop_lens_state metadata")
        return _decode(json.loads(meta), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable training checkpoint ({e}); train again with --overwrite."
                              ) from None


def prepare_output(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Check a training output directory; return the checkpoint to resume from, or None for a fresh run.

    A directory holding a trained model or a checkpoint is only reused with ``resume`` (when it has a
    checkpoint) or replaced with ``overwrite``. A pickled ``checkpoint.pt`` of older versions is never loaded.
    """
    ckpt, legacy = out / CHECKPOINT, out / LEGACY_CHECKPOINT
    if resume and ckpt.is_file() and not overwrite:
        return ckpt
    if resume and legacy.is_file() and not overwrite:
        raise CheckpointError(f"{legacy} was written by an older mhop_lens with pickle, which can run code when "
                              "loaded, so it is not loaded. Delete it and train again (--overwrite).")
    existing = [name for name in TRAINED_FILES if (out / name).exists()]
    if existing and not overwrite:
        hint = "it has no checkpoint to resume; " if resume else "pass --resume to continue its checkpoint, or "
        raise CheckpointError(f"{out} already holds a trained model ({', '.join(existing)}); {hint}pass --overwrite "
                              "to train a new one into it, or choose another --out.")
    for name in (CHECKPOINT, LEGACY_CHECKPOINT):
        (out / name).unlink(missing_ok=True)
    return None


def check_seed(saved: dict, seed: int, ckpt: Path) -> None:
    """A resumed run continues the checkpoint's seed; asking for another one is an error, not a silent switch."""
    if saved.get("seed") != seed:
        raise CheckpointError(f"--seed {seed} does not match the checkpoint in {ckpt.parent} (seed "
                              f"{saved.get('seed')}): resume with --seed {saved.get('seed')}, or train seed {seed} "
                              "into another --out.")


def open_run(out: str | Path, cfg: Any, resume: bool, overwrite: bool) -> tuple[Path, dict | None, Any]:
    """Start or resume a training run in ``out`` (one torch thread: runs are deterministic for a seed).

    Returns (checkpoint path, the checkpoint's state or None, the config to train with): on resume, the config the
    checkpoint was trained with, keeping this call's ``seconds`` and ``steps`` (a different ``seed`` is an error,
    ``check_seed``); ``prepare_output`` decides what may be resumed or replaced."""
    import torch

    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    resume_from = prepare_output(out, resume, overwrite)
    state = load_state(resume_from) if resume_from is not None else None
    if state is not None:
        check_seed(state["config"], cfg.seed, ckpt)
        saved = {k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()}
        cfg = type(cfg)(**{**saved, "seconds": cfg.seconds, "steps": cfg.steps})
    return ckpt, state, cfg


class Clock:
    """Wall-clock and CPU seconds of a training run, summed over resumed sessions (``state`` holds the earlier
    sessions' ``seconds`` / ``cpu_seconds``); ``session()`` is this session's wall time, for a ``--seconds`` cap."""

    def __init__(self, state: dict | None = None):
        self._wall0, self._cpu0 = time.perf_counter(), time.process_time()
        self._wall, self._cpu = (state["seconds"], state.get("cpu_seconds", 0.0)) if state else (0.0, 0.0)

    def session(self) -> float:
        return time.perf_counter() - self._wall0

    def seconds(self) -> float:
        return self._wall + self.session()

    def cpu_seconds(self) -> float:
        return self._cpu + time.process_time() - self._cpu0


def restore(state: dict, model, optimizer, scheduler, generator) -> int:
    """Load a checkpoint's model, optimizer, scheduler and sampler RNG; return its step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    return state["step"]


def run_state(model, optimizer, scheduler, generator, step: int, clock: Clock, curve: list, cfg: Any,
              **extra) -> dict:
    """What ``save_state`` checkpoints for every organism (``extra``: an organism's own sampler states)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "step": step, "seconds": clock.seconds(),
            "cpu_seconds": clock.cpu_seconds(), "curve": curve, "config": asdict(cfg), **extra}


def provenance(out: Path) -> dict:
    """Library versions and the trained weights' hash, for metrics.json."""
    import torch
    import transformers

    return {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "sha256": {"model.safetensors": sha256(Path(out) / "model.safetensors")}}


def _encode(obj: Any, tensors: dict, path: str) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[path or "."] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path or "."}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"training state at {path or '/'}: cannot store a {type(obj).__name__} without pickle")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
