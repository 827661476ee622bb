"""A k-hop world: the organism's entities, relations and facts, plus depth-k chains split into trained / held out.

Prompts are the organism's possessive chains in composing order ("Mokar 's spouse 's boss 's rival"), so every
shorter chain is a prefix of the longer one and its answer is predicted at its last relation token. A held-out
chain's prefixes are trained chains (every prefix has at least one trained continuation), so held-out accuracy
measures composition of trained hops, not missing facts.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from mhop_lens.organism.world import BOS, World

Chain = tuple[str, ...]  # (e1, r1, ..., rk)


@dataclass
class KHopWorld(World):
    """A ``World`` (facts, vocabulary, two-hop prompts) whose two-hop triples are all trained, plus ``chains``:
    depth-``depth`` chains [e1, r1, ..., rk] by split ('train' / 'heldout')."""

    depth: int = 3
    chains: dict[str, list[list[str]]] = field(default_factory=dict)
    _chain_split: dict[Chain, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._chain_split = {tuple(c): s for s, cs in self.chains.items() for c in cs}

    @classmethod
    def generate(cls, seed: int, n_entities: int = 200, n_relations: int = 5, depth: int = 3,
                 train_fraction: float = 0.8) -> KHopWorld:
        """Seeded world: the organism's entities and facts for ``seed``, all depth-``depth`` chains with a random
        ``train_fraction`` trained; a prefix whose continuations all fell in held-out gets one moved back."""
        if depth < 2:
            raise ValueError(f"depth must be at least 2, got {depth}")
        base = World.generate(seed, n_entities, n_relations, two_hop_train_fraction=1.0)
        rng = random.Random(f"{seed}|chains{depth}")
        names = base.relation_names
        chains = _all_chains(base.entities, names, depth)
        order = list(range(len(chains)))
        rng.shuffle(order)
        train_idx = set(order[:round(train_fraction * len(chains))])
        covered = {tuple(chains[i][:-1]) for i in train_idx}
        for i in order[len(train_idx):]:
            if tuple(chains[i][:-1]) not in covered:
                train_idx.add(i)
                covered.add(tuple(chains[i][:-1]))
        split = {"train": [c for i, c in enumerate(chains) if i in train_idx],
                 "heldout": [c for i, c in enumerate(chains) if i not in train_idx]}
        return cls(seed=seed, entities=base.entities, relations=base.relations, facts=base.facts,
                   two_hop=base.two_hop, depth=depth, chains=split)

    @classmethod
    def load(cls, path: str | Path) -> KHopWorld:
        d = json.loads(Path(path).read_text())
        names = [r["name"] for r in d["relations"]]
        two_hop = {"train": [[e, a, b] for e in d["entities"] for a in names for b in names], "heldout": []}
        chains = d.get("chains") or _split_from_heldout(d["entities"], names, d["depth"], d["heldout_chains"])
        return cls(seed=d["seed"], entities=d["entities"], relations=d["relations"], facts=d["facts"],
                   two_hop=two_hop, bos=d.get("bos", BOS), depth=d["depth"], chains=chains)

    def to_dict(self) -> dict:
        """world.json: only the held-out chains are listed (the trained ones are all the others, in enumeration
        order) and the two-hop triples are omitted (all trained); ``load`` rebuilds both."""
        return {"seed": self.seed, "entities": self.entities, "relations": self.relations, "facts": self.facts,
                "depth": self.depth, "heldout_chains": self.chains["heldout"], "bos": self.bos}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")) + "\n")

    def chain_prompt(self, chain: Chain) -> str:
        """'e1 's r1 's r2 ... 's rk' for chain (e1, r1, ..., rk), in composing order."""
        prompt = chain[0]
        for r in chain[1:]:
            prompt = self._templates[r].format(prompt)
        return prompt

    def entities_of(self, chain: Chain) -> list[str]:
        """[e1, e2, ..., e_{k+1}]: the entity after each hop."""
        out = [chain[0]]
        for r in chain[1:]:
            out.append(self.facts[r][out[-1]])
        return out

    def chain_split(self, chain: Chain) -> str:
        """'train' or 'heldout' for a depth-k chain; shorter chains are all trained (as prefixes)."""
        return self._chain_split[tuple(chain)] if len(chain) == self.depth + 1 else "train"


def _all_chains(entities: list[str], names: list[str], depth: int) -> list[list[str]]:
    return [[e, *rs] for e in entities for rs in itertools.product(names, repeat=depth)]


def _split_from_heldout(entities: list[str], names: list[str], depth: int, heldout: list[list[str]]
                        ) -> dict[str, list[list[str]]]:
    held = {tuple(c) for c in heldout}
    return {"train": [c for c in _all_chains(entities, names, depth) if tuple(c) not in held],
            "heldout": [list(c) for c in heldout]}
