"""The GAR organism: deterministic GAR-generator data, held-out contexts, train + resume, the shipped checkpoint."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner
from transformers import LlamaForCausalLM

from mhop_lens.cli.organisms import organism_gar as organism_gar_cli
from mhop_lens.organism_gar import assets_dir
from mhop_lens.organism_gar.evaluate import eval_set, held_out_contexts, score
from mhop_lens.organism_gar.train import Stream, TrainConfig, train
from mhop_lens.organism_gar.world import ROW_FORMS, build_tokenizer, build_world, examples, rows_of, vocab
from mhop_lens.training import CHECKPOINT, load_state, sha256

SHIPPED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "world.json",
           "metrics.json"]


@pytest.fixture(scope="module")
def world():
    return build_world()


@pytest.fixture(scope="module")
def tok(world):
    return build_tokenizer(vocab(world))


def test_data_is_deterministic_and_covers_every_form(world, tok):
    a = rows_of(examples(world, 5, 3, 3))
    assert a == rows_of(examples(world, 5, 3, 3)) and a != rows_of(examples(world, 6, 3, 3))
    assert {r.form for r in a} == set(ROW_FORMS)
    assert vocab(world) == vocab(build_world())
    for cxt in (2, 3, 4):
        for r in rows_of(examples(world, 1, 2, cxt)):
            ids = tok(r.prompt, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and r.answer in tok.get_vocab(), r.prompt


def test_training_stream_never_shows_a_held_out_context(world, tok):
    cfg = TrainConfig(chunk_per_task=8)
    held = held_out_contexts(world, 50)
    assert len(held) > 500
    stream = Stream(world, tok, cfg, held)
    assert all(not {r.context for r in stream.rows(c)} & held for c in range(3))
    chunk0 = {r.context for r in Stream(world, tok, cfg, set()).rows(0)}
    assert {r.form for r in Stream(world, tok, cfg, chunk0).rows(0)} == {"fact"}


def test_train_writes_files_and_resume_matches_a_straight_run(tmp_path):
    small = dict(n_layer=1, d_model=16, n_head=2, batch_size=16, chunk_per_task=4, eval_every=2,
                 checkpoint_every=2, eval_per_task=2, held_out_per_task=3, statement_loss_from=1,
                 yesno_from=2)
    straight = train(tmp_path / "a", TrainConfig(steps=4, **small), command="test")
    assert all((tmp_path / "a" / f).is_file() for f in [*SHIPPED, CHECKPOINT])
    assert straight["steps"] == 4 and json.loads((tmp_path / "a" / "metrics.json").read_text())["command"] == "test"
    train(tmp_path / "b", TrainConfig(steps=3, **small))  # stops inside the Yes/No phase
    resumed = train(tmp_path / "b", TrainConfig(steps=4), resume=True)
    assert [c["step"] for c in resumed["curve"]] == [2, 3, 4]
    assert resumed["sha256"] == straight["sha256"]
    assert load_state(tmp_path / "b" / CHECKPOINT)["step"] == 4


def test_shipped_files_and_size():
    d = assets_dir()
    assert all((d / f).is_file() for f in SHIPPED)
    assert sum(p.stat().st_size for p in d.iterdir() if p.is_file()) <= 20 * 2**20
    shipped = json.loads((d / "metrics.json").read_text())["sha256"]["model.safetensors"]
    assert sha256(d / "model.safetensors") == shipped


def test_shipped_metrics_match_a_remeasurement(world):
    d = assets_dir()
    m = json.loads((d / "metrics.json").read_text())
    model = LlamaForCausalLM.from_pretrained(d)
    tok = build_tokenizer(vocab(world))
    df = score(model, tok, eval_set(world, m["check"]["n_per_task"]))
    acc = df.groupby("form")["correct"].mean().to_dict()
    counts = df.groupby("form").size().to_dict()
    for form, shipped in m["check"]["accuracy"].items():
        assert abs(acc[form] - shipped) <= 1 / counts[form] + 1e-9, form


def test_shipped_boots_in_the_bridge_offline_and_agrees_with_hf(world):
    from mhop_lens.models import load_model

    start = time.perf_counter()
    bridge = load_model("organism-gar", device="cpu")
    assert time.perf_counter() - start < 5
    hf = LlamaForCausalLM.from_pretrained(assets_dir())
    tok = build_tokenizer(vocab(world))
    for r in rows_of(examples(world, 11, 1, 3))[:6]:
        ids = torch.tensor([[tok.bos_token_id, *tok(r.prompt, add_special_tokens=False)["input_ids"]]])
        assert torch.equal(bridge.to_tokens(r.prompt), ids)
        with torch.no_grad():  # compatibility mode centres the unembedding: compare log-probabilities
            got, want = bridge(ids)[0, -1].log_softmax(-1), hf(ids).logits[0, -1].log_softmax(-1)
        assert torch.allclose(got, want, atol=1e-4)


def test_shipped_balanced_eval_has_no_single_cue_shortcut():
    m = json.loads((assets_dir() / "metrics.json").read_text())
    assert all(s["margin_over_chance"] <= 0.10 for s in m["shortcuts"].values())


def test_cli_info():
    res = CliRunner().invoke(organism_gar_cli, ["info"])
    assert res.exit_code == 0, res.output
    assert "composed" in res.output and "command:" in res.output
