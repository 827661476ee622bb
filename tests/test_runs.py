"""Run store: config, chunked resume equals an uninterrupted run, shards merge, clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mhop_lens.runs import RunError, RunStore, merge, parse_shard, shard_items

ITEMS = [f"q{i:02d}" for i in range(10)]


def compute(chunk):
    return pd.DataFrame([{"qid": q, "layer": l, "value": int(q[1:]) * 10 + l} for q in chunk for l in range(3)])


def test_config_and_tables(tmp_path):
    store = RunStore(tmp_path / "run", "lens", {"model": "organism", "seed": 3, "limit": 5})
    frame = store.sweep("lens", ITEMS, compute, key=lambda q: q, chunk_size=4, sort_by=["qid", "layer"])
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["command"] == "lens" and cfg["args"]["seed"] == 3 and cfg["mhop_lens_version"]
    assert (tmp_path / "run" / "lens.parquet").exists() and (tmp_path / "run" / "log.txt").exists()
    assert len(frame) == 30


def test_resume_equals_uninterrupted(tmp_path):
    full = RunStore(tmp_path / "full", "lens", {"seed": 0}).sweep("t", ITEMS, compute, key=str, chunk_size=3,
                                                                    sort_by=["qid", "layer"])
    calls = []

    def crashing(chunk):
        calls.append(chunk)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return compute(chunk)

    with pytest.raises(KeyboardInterrupt):
        RunStore(tmp_path / "part", "lens", {"seed": 0}).sweep("t", ITEMS, crashing, key=str, chunk_size=3)
    with pytest.raises(RunError, match="--resume"):
        RunStore(tmp_path / "part", "lens", {"seed": 0})
    with pytest.raises(RunError, match="same arguments"):
        RunStore(tmp_path / "part", "lens", {"seed": 1}, resume=True)
    redone = []
    resumed = RunStore(tmp_path / "part", "lens", {"seed": 0}, resume=True).sweep(
        "t", ITEMS, lambda c: redone.append(c) or compute(c), key=str, chunk_size=3, sort_by=["qid", "layer"])
    assert ITEMS[:3] not in redone
    pd.testing.assert_frame_equal(full, resumed)
    assert not resumed.duplicated(["qid", "layer"]).any()


def test_shards_merge(tmp_path):
    shards = [shard_items(ITEMS, parse_shard(f"{i}/3")) for i in range(3)]
    assert sorted(sum(shards, [])) == ITEMS
    for i, items in enumerate(shards):
        with RunStore(tmp_path / f"s{i}", "lens", {"shard": f"{i}/3"}) as store:  # finishing writes status.json
            store.sweep("t", items, compute, key=str)
    counts = merge([tmp_path / f"s{i}" for i in range(3)], tmp_path / "merged")
    assert counts == {"t": 30}
    merged = pd.read_parquet(tmp_path / "merged" / "t.parquet")
    assert sorted(merged.qid.unique()) == ITEMS
    with pytest.raises(RunError, match="more than one run"):
        merge([tmp_path / "s0", tmp_path / "s0"], tmp_path / "dup")


def test_bad_shard_and_unwritable_out(tmp_path):
    with pytest.raises(RunError, match="i/n"):
        parse_shard("3")
    with pytest.raises(RunError, match="0 <= i < n"):
        parse_shard("3/3")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot write"):
        RunStore(blocker / "run", "lens", {})
