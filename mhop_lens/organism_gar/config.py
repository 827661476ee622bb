"""The GAR organism's training recipe (its defaults are the shipped checkpoint's), shared by training and by the
replay of its training stream (``splits.training_contexts``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """Recipe defaults are the shipped organism's (see docs/organism-gar.md)."""

    seed: int = 0
    steps: int = 10500
    seconds: float | None = None
    batch_size: int = 64
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    warmup: int = 200
    clip: float = 1.0
    n_layer: int = 4
    d_model: int = 64
    n_head: int = 4
    cxt_lens: tuple[int, ...] = (2, 3, 4)
    chunk_per_task: int = 64
    rep_fraction: float = 0.25
    rep_max: int = 12
    statement_loss_from: int | None = 1500
    yesno_from: int | None = 6500
    yesno_lr: float = 3e-3
    yesno_fraction: float = 0.9
    yesno_cxt_lens: tuple[int, ...] = (2,)
    yesno_weight_decay: float = 0.01
    yesno_seed: int | None = None
    eval_per_task: int = 50
    held_out_per_task: int = 250
    eval_every: int = 250
    checkpoint_every: int = 250
