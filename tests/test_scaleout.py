"""Issue 9: ``--shard i/n`` on every sweep verb merges (``mhop-lens merge``) into the unsharded run's tables, and
``--device-map`` passes through to the HF loader."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from _small_world import small_world
from click.testing import CliRunner

from mhop_lens.cli import main

N = 12
SWEEPS = {  # verb: (extra options, table keys)
    "evaluate": ([], {"evaluation": ["qid"]}),
    "lens": (["--sites", "resid_post"], {"lens": ["qid", "position", "site", "layer"]}),
    "knockout": (["--edges", "last->e1", "--centres", "0,2"], {"knockout": ["qid", "edge", "centre"]}),
    "describe": (["--positions", "t1", "--source-layers", "0,2", "--target-layers", "same"],
                 {"patchscope": ["qid", "position", "source_layer", "target_layer"], "earliest": ["qid"]}),
    "backpatch": ([], {"backpatch": ["qid", "position", "t", "s", "donor"], "backpatch_queries": ["qid", "position"]}),
    "patch": ([], {"patching": ["qid", "layer", "position"]}),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    return small_world(tmp_path_factory.mktemp("world"), N)


def _run(verb: str, world: str, out, *extra: str, device: tuple[str, ...] = ("--device", "cpu")) -> None:
    args = [verb, "--model", "organism", "--data", world, "--limit", str(N), *device, "--batch-size", "4",
            "--out", str(out), *SWEEPS[verb][0], *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("verb", list(SWEEPS))
def test_shards_merge_into_the_unsharded_run(verb, world, tmp_path):
    _run(verb, world, tmp_path / "all")
    for i in range(2):
        _run(verb, world, tmp_path / f"s{i}", "--shard", f"{i}/2")
    merged = CliRunner().invoke(main, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                                       str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    for table, key in SWEEPS[verb][1].items():
        shards = [set(pd.read_parquet(tmp_path / f"s{i}" / f"{table}.parquet")["qid"]) for i in range(2)]
        assert shards[0] and shards[1] and not shards[0] & shards[1], "shards must be disjoint and non-empty"
        whole = pd.read_parquet(tmp_path / "all" / f"{table}.parquet").sort_values(key, ignore_index=True)
        got = pd.read_parquet(tmp_path / "merged" / f"{table}.parquet").sort_values(key, ignore_index=True)
        assert shards[0] | shards[1] == set(whole["qid"])
        pd.testing.assert_frame_equal(got, whole, check_exact=False, atol=1e-5, rtol=1e-5)


def test_merge_leaves_out_per_shard_summaries(world, tmp_path):
    """backpatch_pairs holds rates over a shard's queries: stacking two shards' rows would be a wrong table."""
    for i in range(2):
        _run("backpatch", world, tmp_path / f"s{i}", "--shard", f"{i}/2")
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                                       str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "m" / "backpatch_pairs.parquet").exists()
    assert "not merged" in (tmp_path / "m" / "log.txt").read_text()
    overlap = CliRunner().invoke(main, ["merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out",
                                        str(tmp_path / "dup")])
    assert overlap.exit_code == 1 and "overlapping" in overlap.output and "Traceback" not in overlap.output


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}])
def test_device_map_passthrough(tiny_dirs, tiny_models, device_map):
    """``device_map`` (the HF loader's; 'auto' spreads a large model over GPUs) boots and gives the same logits."""
    from mhop_lens.models import load_model

    model = load_model(tiny_dirs["llama"], device_map=device_map)
    assert getattr(model.original_model, "hf_device_map", {"": "cpu"}) in ({"": "cpu"}, {"": torch.device("cpu")})
    tokens = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.inference_mode():
        torch.testing.assert_close(model(tokens), tiny_models["llama"](tokens))


def test_device_map_on_the_cli(world, tmp_path):
    _run("lens", world, tmp_path / "dm", device=("--device-map", "cpu"))
    config = json.loads((tmp_path / "dm" / "config.json").read_text())
    assert config["args"]["device_map"] == "cpu" and (tmp_path / "dm" / "lens.parquet").exists()
    both = CliRunner().invoke(main, ["lens", "--device", "cpu", "--device-map", "auto", "--out", str(tmp_path / "x")])
    assert both.exit_code == 1 and "not both" in both.output
