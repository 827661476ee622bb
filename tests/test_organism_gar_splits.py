"""GAR organism packages: no import cycle, training-context exclusion, tie-free shortcut baselines."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import mhop_lens.organism_gar as pkg
from mhop_lens.organism_gar.evaluate import EVAL_SEED, _balanced, _tie_credit, held_out_examples, shortcut_baselines
from mhop_lens.organism_gar.splits import exclude_trained, rows_per_stream
from mhop_lens.organism_gar.world import build_world, context_of


def _imports(path: Path) -> set[str]:
    """Modules a file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


def test_organism_gar_modules_form_no_import_cycle():
    root = Path(pkg.__file__).parent
    mods = {f"mhop_lens.organism_gar.{p.stem}": _imports(p) for p in root.glob("*.py") if p.stem != "__init__"}
    graph = {m: {d for d in deps if d in mods} for m, deps in mods.items()}

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    assert all(m not in reach(m) for m in graph), graph
    assert "mhop_lens.organism_gar.train" not in reach("mhop_lens.organism_gar.evaluate")


def test_tie_credit_is_the_expected_accuracy_over_tied_majorities():
    assert _tie_credit(Counter({"Yes": 3, "No": 1}), "Yes", ["Yes", "No"]) == 1.0
    assert _tie_credit(Counter({"Yes": 2, "No": 2}), "No", ["Yes", "No"]) == 0.5
    assert _tie_credit(Counter(), "No", ["Yes", "No"]) == 0.5


def test_shortcut_baselines_do_not_depend_on_the_fitting_order():
    world = build_world()
    exs, fit = _balanced(world, 20, EVAL_SEED), _balanced(world, 20, EVAL_SEED + 1)
    assert shortcut_baselines(world, exs, fit) == shortcut_baselines(world, exs, fit[::-1])


def test_exclusion_drops_trained_contexts_and_whole_pairs():
    world = build_world()
    exs = _balanced(world, 10, 7)
    pair = next(e for e in exs if e.pair_id)
    trained = {context_of(pair.prompt)}
    kept, dropped = exclude_trained(exs, trained)
    assert dropped >= 2 and all(context_of(e.prompt) not in trained for e in kept)
    assert all(e.pair_id != pair.pair_id for e in kept)
    assert held_out_examples(world, 10)[1] == 0  # the held-out seed needs no replay and drops nothing


def test_rows_per_stream_follows_the_batch_split():
    from mhop_lens.organism_gar.config import TrainConfig

    assert rows_per_stream(TrainConfig()) == (6500 * 48 + 4000 * 5, 4000 * 43)
