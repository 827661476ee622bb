"""Precision and batch size from the machine: ``--dtype`` names and automatic batch sizes from available memory.

A batch row of a cached forward holds, per token, the residual entering every block, every layer's keys and
values, the MLP's hidden activations of one block at a time and (where a metric reads them) the vocabulary logits.
``auto_batch_size`` divides the memory available (free GPU memory, or the kernel's MemAvailable on CPU) by that
per-row estimate times a safety factor, and caps it by the user's maximum.
"""

from __future__ import annotations

import torch

from mhop_lens.errors import DataError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
#: Fraction of the available memory a batch may take (the rest: allocator slack, other processes, the caller).
MEMORY_FRACTION = 0.5
#: Per-row estimate x this = what a batch row is charged (covers copies the estimate leaves out: sorting,
#: softmax, index_select of caches, the second stream of a patching pair).
SAFETY = 3.0
DEFAULT_CAP = 256


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``'bf16'`` / ``'fp16'`` / ``'fp32'`` (or a torch dtype, or None = the checkpoint's own) -> torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise DataError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16.") from None


def available_bytes(device: str | torch.device) -> int:
    """Free memory on ``device``: the CUDA allocator's free + its reserved-but-unused bytes, or MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def row_bytes(model, n_tokens: int, logits_positions: int = 1) -> int:
    """Estimated bytes one batch row of ``n_tokens`` needs in a cached forward (see the module docstring)."""
    cfg = model.cfg
    kv_dim = (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads) * cfg.d_head
    per_token = (cfg.n_layers + 1) * cfg.d_model + 2 * cfg.n_layers * kv_dim + 3 * (cfg.d_mlp or 4 * cfg.d_model)
    per_token += cfg.n_heads * n_tokens  # one layer's attention pattern
    size = torch.finfo(getattr(cfg, "dtype", torch.float32)).bits // 8
    return int((n_tokens * per_token + logits_positions * cfg.d_vocab) * max(size, 4))


def auto_batch_size(model, n_tokens: int, cap: int = DEFAULT_CAP, logits_positions: int = 1,
                    available: int | None = None) -> int:
    """Rows per batch that fit ``MEMORY_FRACTION`` of the available memory, at most ``cap`` and at least 1."""
    free = available_bytes(model.cfg.device) if available is None else available
    rows = int(free * MEMORY_FRACTION // (SAFETY * row_bytes(model, n_tokens, logits_positions)))
    return max(1, min(cap, rows))


def check_batch_size(value: int | str) -> None:
    """A ``DataError`` unless ``value`` is a positive integer, ``auto`` or ``auto:CAP``."""
    text = str(value).strip().lower()
    cap = text.split(":", 1)[1] if text.startswith("auto:") else "1"
    if not ((text.isdigit() and int(text) > 0) or ((text == "auto" or text.startswith("auto:"))
                                                    and cap.isdigit() and int(cap) > 0)):
        raise DataError(f"--batch-size {value!r}: pass a positive integer, 'auto' or 'auto:CAP' (e.g. auto:128).")


def resolve_batch_size(value: int | str, model, n_tokens: int, logits_positions: int = 1) -> int:
    """A ``--batch-size`` value: an int as given; ``auto`` or ``auto:CAP`` from the available memory."""
    check_batch_size(value)
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    cap = int(text.split(":", 1)[1]) if ":" in text else DEFAULT_CAP
    return auto_batch_size(model, n_tokens, cap, logits_positions)
