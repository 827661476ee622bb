"""Which GAR-organism contexts were trained on: the held-out evaluation contexts, the training stream's chunks, and
the replay that lists every context the shipped recipe trained on.

The balanced evaluation set of ``EVAL_SEED`` is held out of training by construction. An evaluation set drawn with
any other seed is not: its 2-item contexts can occur in the training stream. ``training_contexts`` replays the
stream's chunks (exactly the chunks a ``TrainConfig`` run consumes; deterministic) so such sets can drop them
(``exclude_trained``), with the count reported.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from mhop_lens.gar import GarExample
from mhop_lens.organism_gar.config import TrainConfig
from mhop_lens.organism_gar.world import Row, context_of, examples, fact_rows, rows_of

EVAL_SEED = 1_000_003
FIT_SEED = 2_000_003
#: First chunk index of the Yes/No stream (``train.train``).
YESNO_FIRST_CHUNK = 10_000


def held_out_contexts(world, n_per_task: int, seed: int = EVAL_SEED) -> set[str]:
    """Contexts of every evaluation example (balanced set and the 3-item negations): never trained on."""
    return {context_of(e.prompt) for cxt in (2, 3) for e in examples(world, seed, n_per_task, cxt)}


def chunk_rows(world, cfg: TrainConfig, seed: int, c: int, held_out: set[str], cxt_lens: Sequence[int],
               yesno_only: bool = False) -> list[Row]:
    """Training chunk c: generator examples (seed from ``seed`` and c) minus held-out contexts, plus facts,
    shuffled; only counter-paired rows for the Yes/No stream."""
    rows = rows_of(examples(world, 7919 * (seed + 1) + c, cfg.chunk_per_task, cxt_lens[c % len(cxt_lens)]))
    rows = [r for r in rows if r.context not in held_out] + fact_rows(world)
    random.Random(f"{seed}|{c}").shuffle(rows)
    return [r for r in rows if r.pair_id] if yesno_only else rows


def rows_per_stream(cfg: TrainConfig) -> tuple[int, int]:
    """Rows a full run takes from the main stream and from the Yes/No stream (``train.train``'s batch split)."""
    n_rep = round(cfg.rep_fraction * cfg.batch_size)
    main = cfg.batch_size - n_rep
    yes_from = cfg.steps if cfg.yesno_from is None else min(cfg.yesno_from, cfg.steps)
    n_yn = round(cfg.yesno_fraction * main)
    return yes_from * main + (cfg.steps - yes_from) * (main - n_yn), (cfg.steps - yes_from) * n_yn


def _cache_path(cfg: TrainConfig) -> Path:
    key = hashlib.sha256(json.dumps(sorted(vars(cfg).items()), default=str).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MHOP_CACHE", Path.home() / ".cache" / "mhop_lens"))
    return root / f"organism_gar_training_contexts_{key}.json.gz"


def training_contexts(world, cfg: TrainConfig | None = None, cache: bool = True) -> set[str]:
    """Every context in the chunks a ``cfg`` run consumes (the whole of its last, partly used chunk included).

    Replays chunk generation only (no model): minutes on one core for the shipped recipe, so the result is cached
    under ``~/.cache/mhop_lens`` (``MHOP_CACHE``), keyed by the config.
    """
    cfg = cfg or TrainConfig()
    path = _cache_path(cfg)
    if cache and path.is_file():
        return set(json.loads(gzip.decompress(path.read_bytes())))
    held_out = held_out_contexts(world, cfg.held_out_per_task)
    need_main, need_yn = rows_per_stream(cfg)
    seen: set[str] = set()
    yn_seed = cfg.seed if cfg.yesno_seed is None else cfg.yesno_seed
    for need, seed, first, lens, only in ((need_main, cfg.seed, 0, cfg.cxt_lens, False),
                                          (need_yn, yn_seed, YESNO_FIRST_CHUNK, cfg.yesno_cxt_lens, True)):
        c, got = first, 0
        while got < need:
            rows = chunk_rows(world, cfg, seed, c, held_out, lens, only)
            seen |= {r.context for r in rows if r.context}
            got += len(rows)
            c += 1
    seen.discard(None)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(json.dumps(sorted(seen)).encode()))
    return seen


def exclude_trained(exs: Sequence[GarExample], trained: set[str]) -> tuple[list[GarExample], int]:
    """``exs`` without those whose context was trained on (a counter-pair goes as a whole), and how many went."""
    bad_pairs = {e.pair_id for e in exs if e.pair_id and context_of(e.prompt) in trained}
    keep = [e for e in exs if context_of(e.prompt) not in trained and not (e.pair_id and e.pair_id in bad_pairs)]
    return keep, len(exs) - len(keep)
