"""Load any model the suite analyses as a TransformerLens 4 `TransformerBridge` in compatibility mode.

`load_model("organism")` is the shipped two-hop model organism; any other name is a local directory holding an HF
model + tokenizer, or a hub name (works where the hub is reachable or the model is cached).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformer_lens.model_bridge import TransformerBridge

from mhop_lens.analyses.hf_compat import ensure_cache_plumbing
from mhop_lens.errors import ModelLoadError

#: Built-in models shipped inside the package: name -> import path of a module with ``assets_dir()``.
BUILTIN_MODELS = {
    "organism": "mhop_lens.organism",
    "organism-gar": "mhop_lens.organism_gar",
    "organism-khop": "mhop_lens.organism_khop",
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
        check_config(path / "config.json")
        return str(path)
    return name


def check_config(path: Path) -> None:
    """A ``ModelLoadError`` unless ``path`` holds a JSON object (an empty or truncated config.json is not one)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-save the model with "
                             "save_pretrained, or restore config.json from where the model came from.") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} holds a JSON {type(config).__name__}, not an object with the model's "
                             "settings; re-save the model with save_pretrained.")


def check_device(device: str | torch.device | None) -> None:
    """A ``ModelLoadError`` naming the fix unless ``device`` is None or a device this machine has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"--device {str(device)!r} is not a torch device; use cpu, cuda, cuda:N or mps, or "
                             "leave it out (cuda when available, else cpu).") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ModelLoadError(f"--device {str(device)!r}: this torch sees no CUDA GPU (torch "
                                 f"{torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                                 "use --device cpu, or leave --device out.")
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(f"--device {str(device)!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {str(device)!r}: MPS is not available here; use --device cpu.")


#: Seconds the hub may take to accept a connection before a hub name counts as offline (no 30 s of retries).
HUB_PROBE_SECONDS = 1.5


@functools.cache
def hub_reachable(endpoint: str | None = None, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether one TCP connection to the hub endpoint (or the HTTPS proxy, when one is set) opens within
    ``timeout``, DNS included; asked once per process.

    False when HF_HUB_OFFLINE is set. Checked before a hub name is loaded, so that an offline machine gets its
    error in about ``timeout`` seconds instead of huggingface_hub's retries with back-off.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(endpoint or constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")  # behind a proxy, the proxy must answer
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    ok: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _local_hub_copy(name: str, revision: str | None) -> str:
    """The cached snapshot directory of hub model ``name`` (no network), or a ``ModelLoadError`` saying how to get
    it."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not usable offline"; the message says what to do
        raise ModelLoadError(
            f"could not load {name!r}: it is not a local directory and the hub copy is not cached here (the hub "
            f"is offline or unreachable, checked in {HUB_PROBE_SECONDS} s). Download it where the hub is reachable "
            f"(`huggingface-cli download {name}`), or pass a "
            f"local directory with config.json, weights and tokenizer, or 'organism' for the shipped model. "
            f"({type(e).__name__})"
        ) from None


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
    check_device(device)
    target = resolve(name_or_path)
    if target == str(name_or_path) and not Path(target).exists() and not hub_reachable():
        target = _local_hub_copy(target, kw.get("revision"))
        check_config(Path(target) / "config.json")
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
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            raise ModelLoadError(f"could not load the weights of {target!r}: its pickle weights file holds objects "
                                 "other than tensors, which are never unpickled here (they could run code). Re-save "
                                 "the model from a trusted copy with save_pretrained (safetensors).") from e
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelLoadError(f"could not load the weights of {target!r} (SafetensorError: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); the file is "
                             "truncated or corrupt. Re-download the model, or re-save it with save_pretrained.") from e
    bridge.mhop_weight_processing = lean_weights.install(bridge) or "lean"
    bridge.enable_compatibility_mode()
    ensure_cache_plumbing(bridge)  # transformers >= 5.24 passes the KV cache as `cache=`, which TL 4.3 ignores
    bridge.eval()
    bridge.mhop_name = str(name_or_path)
    bridge.mhop_load_seconds = time.perf_counter() - start
    return bridge

