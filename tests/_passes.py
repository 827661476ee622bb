"""Pass counting with hooks of the tests' own, independent of the library's counter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def independent_pass_count(model) -> Iterator[dict[str, int]]:
    """Forwards seen at ``hook_embed`` and backwards through ``ln_final.hook_in`` while the block runs."""
    counts = {"fwd": 0, "bwd": 0}

    def on_embed(module, args, output):
        counts["fwd"] += 1

    def on_final(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda g: counts.__setitem__("bwd", counts["bwd"] + 1))

    handles = [model.hook_dict["hook_embed"].register_forward_hook(on_embed),
               model.hook_dict["ln_final.hook_in"].register_forward_hook(on_final)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
