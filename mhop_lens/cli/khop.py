"""`mhop-lens organism-khop train|info`: the three-hop organism (the shared organism group factory)."""

from __future__ import annotations

import click

from mhop_lens.cli.organisms import organism_group


def _print_khop(m: dict) -> None:
    w = m["world"]
    click.echo(f"world:           {w['n_entities']} entities, {w['n_relations']} relations, depth {w['depth']}: "
               f"{w['n_train']} trained + {w['n_heldout']} held-out chains")
    for split, acc in m["accuracy"].items():
        click.echo(f"{split + ':':<20}{acc:.4f}  (n={m['counts'][split]})")
    click.echo("held-out chains, per hop:")
    for key, value in m["heldout_per_hop"].items():
        click.echo(f"  {key + ':':<28}{value if isinstance(value, int) else f'{value:.4f}'}")


organism_khop = organism_group(
    "organism-khop", "mhop_lens.organism_khop",
    "The three-hop model organism: a small GPT-2 trained on depth-3 chains of made-up facts.",
    "Generate the k-hop world and train the three-hop organism into OUT (config, weights, tokenizer, world.json, "
    "metrics.json, and checkpoint.safetensors with the optimizer state for --resume).",
    _print_khop,
)
