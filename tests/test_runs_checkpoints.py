"""Issue 14 item 5: nothing in a training output directory can run code, a resume keeps its seed, and a trained
model is only replaced on purpose. Tiny step counts; the shipped organisms are never retrained."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import mhop_lens
from mhop_lens.cli.khop import organism_khop as organism_khop_cli
from mhop_lens.cli.organisms import organism as organism_cli
from mhop_lens.cli.organisms import organism_gar as organism_gar_cli
from mhop_lens.organism.train import TrainConfig, train
from mhop_lens.training import CHECKPOINT, CheckpointError, load_state, save_state

TINY = dict(steps=2, n_entities=20, n_relations=3, batch_size=16, eval_every=2, checkpoint_every=2)


class _Payload:
    """A pickle that creates ``marker`` when unpickled (what a crafted checkpoint.pt would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _craft(directory: Path, name: str = "checkpoint.pt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "EXECUTED"
    with open(directory / name, "wb") as f:
        pickle.dump({"model": _Payload(marker), "step": 1}, f)
    with open(directory / "probe.pkl", "wb") as f:  # the same payload does run under a plain pickle load
        pickle.dump(_Payload(directory / "probe-ran"), f)
    pickle.loads((directory / "probe.pkl").read_bytes())
    assert (directory / "probe-ran").exists()
    return marker


@pytest.mark.parametrize("cli", [organism_cli, organism_gar_cli, organism_khop_cli],
                         ids=["organism", "organism-gar", "organism-khop"])
def test_crafted_checkpoint_pt_does_not_execute(cli, tmp_path):
    marker = _craft(tmp_path / "out")
    result = CliRunner().invoke(cli, ["train", "--out", str(tmp_path / "out"), "--resume", "--steps", "1"])
    assert result.exit_code == 1 and result.output.startswith("Error:") and "Traceback" not in result.output
    assert "pickle" in result.output and "not loaded" in result.output, result.output
    assert not marker.exists()


def test_crafted_safetensors_checkpoint_is_refused(tmp_path):
    """A pickle renamed to checkpoint.safetensors is not a safetensors file: one clear error, nothing runs."""
    marker = _craft(tmp_path / "out", CHECKPOINT)
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        train(tmp_path / "out", TrainConfig(**TINY), resume=True)
    assert not marker.exists()


def test_no_pickle_loads_in_the_training_code():
    root = Path(mhop_lens.__file__).parent
    for path in [root / "training.py", *root.glob("organism*/train.py")]:
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "pickle.load" not in text, path


def test_state_round_trip_keeps_types(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
             "step": 7, "curve": [{"step": 1, "loss": float("nan")}], "config": {"betas": (0.9, 0.95), "x": None}}
    save_state(tmp_path / CHECKPOINT, state)
    back = load_state(tmp_path / CHECKPOINT)
    assert back["step"] == 7 and back["config"] == {"betas": (0.9, 0.95), "x": None}
    assert set(back["optimizer"]["state"]) == {0, 1} and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(back["generator"], gen.get_state())
    opt2 = torch.optim.AdamW(model.parameters())
    opt2.load_state_dict(back["optimizer"])  # what a resume does


def test_seed_mismatch_on_resume_is_an_error(tmp_path):
    train(tmp_path, TrainConfig(seed=0, **TINY))
    with pytest.raises(CheckpointError, match="--seed 9 does not match .*seed 0"):
        train(tmp_path, TrainConfig(seed=9, steps=3), resume=True)
    assert train(tmp_path, TrainConfig(seed=0, steps=3), resume=True)["steps"] == 3


def test_retraining_needs_overwrite(tmp_path):
    first = train(tmp_path, TrainConfig(**TINY))
    with pytest.raises(CheckpointError, match="already holds a trained model"):
        train(tmp_path, TrainConfig(**TINY))
    result = CliRunner().invoke(organism_cli, ["train", "--out", str(tmp_path), "--steps", "1"])
    assert result.exit_code == 1 and "--overwrite" in result.output and "Traceback" not in result.output
    again = train(tmp_path, TrainConfig(**TINY), overwrite=True)
    assert again["sha256"] == first["sha256"]  # same seed and steps: the same model, trained afresh
