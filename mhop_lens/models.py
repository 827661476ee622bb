"""Load any model the suite analyses as a TransformerLens 4 `TransformerBridge` in compatibility mode.

`load_model("organism")` is the shipped two-hop model organism; any other name is a local directory holding an HF
model + tokenizer, or a hub name (works where the hub is reachable or the model is cached).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from mhop_lens.errors import ModelLoadError

#: Built-in models shipped inside the package: name -> import path of a module with ``assets_dir()``.
BUILTIN_MODELS = {
    "organism": "mhop_lens.organism",
    "organism-gar": "mhop_lens.organism_gar",
}


def builtin_dir(name: str) -> Path:
    """Directory of a shipped model, or a `ModelLoadError` saying it is not shipped (yet)."""
    import importlib

    try:
        module = importlib.import_module(BUILTIN_MODELS[name])
        path = Path(module.assets_dir())
    except (ImportError, AttributeError) as e:
        raise ModelLoadError(f"the built-in model {name!r} is not part of this installation ({e}).") from e
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in model {name!r} has no checkpoint at {path}. Train one with "
            f"`mhop-lens {name} train --out DIR` and pass DIR to load_model, or reinstall mhop_lens."
        )
    return path


def resolve(name_or_path: str | os.PathLike) -> str:
    """Map a built-in name to its directory; check that a path-like name is a model directory."""
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return str(builtin_dir(name))
    path = Path(name).expanduser()
    looks_like_path = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"{name!r} is not a directory. Pass a directory holding an HF model "
                                 "(config.json + weights + tokenizer), a hub name, or 'organism'.")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name!r} is a directory but holds no config.json, so it is not an HF model "
                                 "directory. Save one with `model.save_pretrained(DIR)` and "
                                 "`tokenizer.save_pretrained(DIR)`, or pass 'organism'.")
        return str(path)
    return name


def load_model(
    name_or_path: str | os.PathLike = "organism",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    **kw: Any,
) -> TransformerBridge:
    """Boot a model through `TransformerBridge.boot_transformers` and enable compatibility mode.

    `device_map` / `n_devices` pass through for models larger than one GPU. Extra keywords go to
    `boot_transformers` (e.g. `tokenizer=`, `hf_model=`, `revision=`). ``dtype`` (``'bf16'``, ``'fp16'``,
    ``'fp32'`` or a torch dtype) loads the weights in that precision; None keeps fp32. Weight processing runs one
    block at a time (``lean_weights``), so loading peaks near the weights' own size instead of ~2.2x.
    """
    from mhop_lens import lean_weights
    from mhop_lens.budget import parse_dtype

    dtype = parse_dtype(dtype)
    if device is not None and device_map is not None:
        raise ModelLoadError(f"pass a device ({device!r}) or a device_map ({device_map!r}), not both: --device-map "
                             "places every layer itself (e.g. 'auto' over all GPUs).")
    target = resolve(name_or_path)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    boot_kw: dict[str, Any] = dict(device=device, trust_remote_code=trust_remote_code, **kw)
    if dtype is not None:
        boot_kw["dtype"] = dtype
    if device_map is not None:
        boot_kw["device_map"] = device_map
    if n_devices is not None:
        boot_kw["n_devices"] = n_devices
    start = time.perf_counter()
    try:
        bridge = TransformerBridge.boot_transformers(target, **boot_kw)
    except OSError as e:
        if target == str(name_or_path) and not Path(target).exists():
            raise ModelLoadError(
                f"could not load {target!r}: it is not a local directory and the hub copy is not cached here "
                f"(offline, or no such repo). Download it where the hub is reachable "
                f"(`huggingface-cli download {target}`), or pass a local directory with config.json, weights "
                f"and tokenizer, or 'organism' for the shipped model. Original error: {str(e).splitlines()[0]}"
            ) from e
        raise ModelLoadError(f"could not load {target!r}: {str(e).splitlines()[0]} Pass a directory saved with "
                             "save_pretrained (config.json, weights and tokenizer), a hub name, or 'organism'.") from e
    except ValueError as e:
        raise ModelLoadError(f"could not load {target!r}: {str(e).splitlines()[0]} Is it a causal LM "
                             "directory saved with save_pretrained?") from e
    bridge.mhop_weight_processing = lean_weights.install(bridge) or "lean"
    bridge.enable_compatibility_mode()
    bridge.eval()
    bridge.mhop_name = str(name_or_path)
    bridge.mhop_load_seconds = time.perf_counter() - start
    return bridge
