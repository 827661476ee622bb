"""True/False heads of the shipped GAR organism replicate across data seeds (benchmarks/heads_consistency.py,
docs/organism-gar.md "Consistency"), checked cheaply: 40 counter-pairs per seed, pooled over the 4 Yes/No tasks."""

from __future__ import annotations

import pytest

from mhop_lens.analyses.heads import consistency, find_heads


@pytest.fixture(scope="module")
def gar_organism():
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import load_model

    try:
        return load_model("organism-gar", device="cpu")
    except ModelLoadError as e:
        pytest.skip(f"organism-gar checkpoint not available: {e}")


def test_top_heads_replicate_across_data_seeds(gar_organism):
    from mhop_lens.organism_gar.world import build_world, examples

    world = build_world()
    scores = {}
    for seed in (1, 2):
        cls = [e for e in examples(world, seed, 10, 2) if e.kind == "cls"]
        frame, _ = find_heads(gar_organism, cls, k=2, exact=True, batch_size=40)
        scores[f"seed_{seed}"] = frame
        assert frame["metric_true"].iloc[0] > 0 > frame["metric_false"].iloc[0]  # the model separates the pairs
    row = consistency(scores, k=2).iloc[0]
    assert row["random_overlap"] == pytest.approx(4 / 16)
    assert row["top_k_overlap"] > row["random_overlap"]  # in practice 2 of 2 (L0H1, L3H3)
    assert row["spearman"] > 0.8  # 0.97 measured
