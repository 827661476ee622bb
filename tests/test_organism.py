"""The organism: world generation, prompts and spans, the training path, and the shipped checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from mhop_lens.cli.organisms import organism as organism_cli
from mhop_lens.organism import World, assets_dir
from mhop_lens.organism.train import TrainConfig, build_tokenizer, encode_world, train
from mhop_lens.training import CHECKPOINT, load_state, sha256

SHIPPED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "world.json",
           "metrics.json"]


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(0)


def test_world_is_deterministic(tmp_path):
    a, b = World.generate(3), World.generate(3)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.to_dict() != World.generate(4).to_dict()
    a.save(tmp_path / "w.json")
    assert World.load(tmp_path / "w.json").to_dict() == a.to_dict()


def test_world_shape(world):
    assert len(set(world.entities)) == 200 and all(e.isalpha() and e[0].isupper() for e in world.entities)
    assert len(world.relations) == 10 and world.relations[0] == {"name": "spouse", "template": "{} 's spouse"}
    for r, f in world.facts.items():
        assert sorted(f) == sorted(world.entities) and all(e1 != e2 for e1, e2 in f.items()), r
    train, held = world.two_hop["train"], world.two_hop["heldout"]
    assert (len(train), len(held)) == (16000, 4000)
    assert not {tuple(t) for t in train} & {tuple(t) for t in held}
    assert len({tuple(t) for t in train + held}) == 200 * 10 * 10
    assert {(e1, r1) for e1, r1, _ in train} == {(e, r) for r in world.facts for e in world.entities}


def test_prompts_and_spans(world):
    e1, r1, r2 = world.two_hop["heldout"][0]
    q = world.query(e1, r1, r2)
    assert q["prompt"] == f"{e1} 's {r1} 's {r2}" == world.two_hop_prompt(e1, r1, r2)
    assert q["prompt"].startswith(world.one_hop_prompt(e1, r1))
    for key in ("e1", "r1", "r2"):
        start, end = q[f"{key}_span"]
        assert q["prompt"][start:end] == q[key]
    assert q["e2"] == world.facts[r1][e1] and q["e3"] == world.answer(e1, r1, r2) == world.facts[r2][q["e2"]]
    assert q["split"] == "heldout"


def test_tokenizer_is_word_level(world):
    tok = build_tokenizer(world)
    prompt = world.two_hop_prompt(*world.two_hop["train"][0])
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == 5 and tok.unk_token_id not in ids
    assert tok.decode(ids) == prompt
    assert len(tok) == len(world.vocab) and tok.convert_ids_to_tokens(tok.bos_token_id) == "<bos>"


def test_train_writes_files_and_resumes(tmp_path):
    cfg = TrainConfig(steps=3, n_entities=20, n_relations=3, batch_size=32, eval_every=2, checkpoint_every=2)
    m = train(tmp_path, cfg, command="test")
    assert all((tmp_path / f).is_file() for f in [*SHIPPED, CHECKPOINT])
    assert m["steps"] == 3 and m["sha256"]["model.safetensors"] == sha256(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "metrics.json").read_text())["command"] == "test"
    m2 = train(tmp_path, TrainConfig(steps=5), resume=True)
    assert m2["steps"] == 5 and m2["world"]["n_entities"] == 20
    assert [c["step"] for c in m2["curve"]] == [2, 3, 4, 5]
    assert load_state(tmp_path / CHECKPOINT)["step"] == 5


def test_training_is_deterministic(tmp_path):
    cfg = TrainConfig(steps=4, n_entities=20, n_relations=3, batch_size=32)
    shas = [train(tmp_path / name, cfg)["sha256"]["model.safetensors"] for name in ("a", "b")]
    assert shas[0] == shas[1]


@pytest.mark.slow
def test_cli_train_default_recipe_path(tmp_path):
    """The committed command's path, for two steps: the default world and model, through click."""
    res = CliRunner().invoke(organism_cli, ["train", "--out", str(tmp_path), "--steps", "2"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["command"] == f"mhop-lens organism train --out {tmp_path} --seed 0 --steps 2"
    assert m["world"]["n_entities"] == 200 and m["config"]["steps"] == 2
    info = CliRunner().invoke(organism_cli, ["info", "--path", str(tmp_path)])
    assert info.exit_code == 0 and "two_hop_heldout" in info.output


def test_shipped_metrics_meet_acceptance():
    m = json.loads((assets_dir() / "metrics.json").read_text())
    acc = m["accuracy"]
    assert acc["one_hop"] >= 0.98 and acc["two_hop_train"] >= 0.95
    assert 0.5 <= acc["two_hop_heldout"] <= 0.95
    assert m["cpu_seconds"] <= 600 and not m["stopped_early"] and m["steps"] == m["config"]["steps"]
    assert m["command"].startswith("mhop-lens organism train") and m["seed"] == m["config"]["seed"]
    assert m["sha256"]["model.safetensors"] == sha256(assets_dir() / "model.safetensors")
    info = CliRunner().invoke(organism_cli, ["info"])
    assert info.exit_code == 0 and m["sha256"]["model.safetensors"] in info.output


def test_shipped_files_small():
    files = list(assets_dir().iterdir())
    assert {f.name for f in files} >= set(SHIPPED) and CHECKPOINT not in {f.name for f in files}
    assert sum(f.stat().st_size for f in files if f.is_file()) <= 20 * 2**20


def test_shipped_boots_offline_fast(organism):
    """Booting the assets with HF_HUB_OFFLINE=1 takes < 5 s and gives the same logits as load_model."""
    world = World.load(assets_dir() / "world.json")
    prompt = world.two_hop_prompt(*world.two_hop["heldout"][0])
    code = (
        "import json, sys, time\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "t = time.perf_counter()\n"
        f"b = TransformerBridge.boot_transformers({str(assets_dir())!r}, device='cpu')\n"
        "b.enable_compatibility_mode()\n"
        "seconds = time.perf_counter() - t\n"
        f"print(json.dumps([seconds, b({prompt!r})[0, -1].tolist()]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    seconds, logits = json.loads(out.stdout.strip().splitlines()[-1])
    assert seconds < 5.0
    with torch.no_grad():
        expected = organism(prompt)[0, -1]
    torch.testing.assert_close(torch.tensor(logits), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_shipped_accuracy_matches_metrics(organism):
    """Recompute through TransformerLens: all held-out and one-hop prompts exactly, a train sample closely."""
    m = json.loads((assets_dir() / "metrics.json").read_text())
    world = World.load(assets_dir() / "world.json")
    data = encode_world(world, build_tokenizer(world))
    prompt = world.two_hop_prompt(*world.two_hop["heldout"][0])
    assert organism.to_tokens(prompt)[0].tolist() == data["two_hop_heldout"].ids[0].tolist()

    def acc(split, stride=1):
        ids, ans = data[split].ids[::stride], data[split].answers[::stride]
        hits = sum((organism(ids[i : i + 1000])[:, -1].argmax(-1) == ans[i : i + 1000]).sum().item()
                   for i in range(0, len(ans), 1000))
        return hits / len(ans)

    start = time.perf_counter()
    assert acc("two_hop_heldout") == m["accuracy"]["two_hop_heldout"]
    assert acc("one_hop") == m["accuracy"]["one_hop"]
    assert abs(acc("two_hop_train", 8) - m["accuracy"]["two_hop_train"]) < 0.02
    assert time.perf_counter() - start < 20
