"""The three-hop model organism: the two-hop organism's world extended to k-hop chains, and a small GPT-2 trained
on it (shipped in assets/, loads as ``load_model("organism-khop")``)."""

from pathlib import Path

from mhop_lens.organism_khop.world import KHopWorld

ASSETS_DIR = Path(__file__).parent / "assets"


def assets_dir() -> Path:
    """Directory of the shipped checkpoint (HF config, safetensors, tokenizer, world.json, metrics.json)."""
    return ASSETS_DIR


__all__ = ["ASSETS_DIR", "KHopWorld", "assets_dir"]
