"""Issue 14 item 4: the run store never mixes or loses rows.

A resume after the data or model changed is refused and names the field; a missing or truncated chunk is
recomputed and the table equals an uninterrupted run's; two writers on one directory: one is refused, the table is
right; merge refuses mismatched, missing, unfinished or self-overlapping shards; a failed setup does not block the
corrected command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mhop_lens.cli import main
from mhop_lens.data import FIXTURE_CSV

KEY = ["qid", "position", "site", "layer"]
LENS = ["lens", "--sites", "resid_post", "--positions", "last", "--top-k", "2", "--device", "cpu", "--batch-size", "4"]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data_csv(tmp_path):
    path = tmp_path / "two_hop.csv"
    shutil.copy(FIXTURE_CSV, path)
    return path


def _lens(model, data, out, *extra):
    return CliRunner().invoke(main, [*LENS, "--model", str(model), "--data", str(data), "--out", str(out), *extra])


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _refused(result, *needles):
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result


def _table(out):
    return pd.read_parquet(out / "lens.parquet").sort_values(KEY, ignore_index=True)


def _edit_csv(path):
    """One digit of a popularity column changed in place: same path, same size, other content."""
    text = path.read_text(encoding="utf-8")
    assert "61234" in text
    path.write_text(text.replace("61234", "61235", 1), encoding="utf-8")


def test_resume_after_data_edit_refused(tiny_dirs, data_csv, tmp_path):
    out = tmp_path / "run"
    _ok(_lens(tiny_dirs["gpt2"], data_csv, out))
    _ok(_lens(tiny_dirs["gpt2"], data_csv, out, "--resume"))  # same inputs: resumes (nothing left to do)
    _edit_csv(data_csv)  # in place: same path, same arguments, other content
    _refused(_lens(tiny_dirs["gpt2"], data_csv, out, "--resume"), "--resume refused", "inputs.data.sha256")


def test_relative_model_resolved_from_another_folder(tiny_dirs, data_csv, tmp_path, monkeypatch):
    from mhop_lens.tiny_models import save_tiny_model

    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    shutil.copytree(tiny_dirs["gpt2"], tmp_path / "A" / "m")
    save_tiny_model(tmp_path / "B" / "m", "gpt2", seed=2)  # same name ./m, other weights
    shutil.copytree(tiny_dirs["gpt2"], tmp_path / "B" / "copy")  # same weights, another place
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path / "A")
    _ok(_lens("./m", data_csv, out))
    monkeypatch.chdir(tmp_path / "B")
    _refused(_lens("./m", data_csv, out, "--resume"), "inputs.model.sha256")
    _refused(_lens("./copy", data_csv, out, "--resume"), "inputs.model.path")
    _ok(_lens("../A/m", data_csv, out, "--resume"))  # other spelling, same resolved model: accepted


def test_deleted_and_truncated_chunks_are_recomputed(tiny_dirs, data_csv, tmp_path, one_thread):
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "full"))
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "run"))
    parts = tmp_path / "run" / "parts" / "lens"
    chunks = sorted(parts.glob("*.parquet"))
    assert len(chunks) == 3  # 12 queries in chunks of 4
    chunks[0].unlink()
    chunks[1].write_bytes(chunks[1].read_bytes()[:200])
    (tmp_path / "run" / "lens.parquet").unlink()
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "run", "--resume"))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "is missing" in log and "truncated or altered" in log and "4 of 12 items already done" in log
    got = _table(tmp_path / "run")
    assert not got.duplicated(KEY).any() and got["qid"].nunique() == 12
    pd.testing.assert_frame_equal(got, _table(tmp_path / "full"), check_exact=True)


def test_a_chunk_not_in_the_manifest_is_recomputed(tiny_dirs, data_csv, tmp_path, one_thread):
    """A process killed between writing a chunk and listing it (or an old layout): the chunk is not trusted."""
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "run"))
    before = _table(tmp_path / "run")
    manifest = tmp_path / "run" / "parts" / "lens" / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "run", "--resume"))
    assert "not in the manifest" in (tmp_path / "run" / "log.txt").read_text()
    pd.testing.assert_frame_equal(_table(tmp_path / "run"), before, check_exact=True)


def test_two_concurrent_writers(tmp_path, one_thread):
    """Both start at once on one directory: one holds the lock, the other gets one Error: line; the table is the
    uninterrupted run's."""
    args = ["--model", "organism", "--data", "organism", "--limit", "120", "--batch-size", "8", "--sites", "resid_post",
            "--positions", "last,t1", "--top-k", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    code = "import torch; torch.set_num_threads(1); from mhop_lens.cli.hopping import lens; lens()"
    out = tmp_path / "shared"
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, "--out", str(out), *extra], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for extra in ([], ["--resume"])]
    deadline = time.monotonic() + 300
    results = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
        finally:
            proc.kill()
        results.append((proc.returncode, err))
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refused = next(err for code, err in results if code == 1)
    lines = [line for line in refused.splitlines() if line.strip()]
    assert lines[-1].startswith("Error:") and "in use by another process" in lines[-1], refused
    assert "Traceback" not in refused
    whole = CliRunner().invoke(main, ["lens", *args, "--out", str(tmp_path / "alone")])
    assert whole.exit_code == 0, whole.output
    a = pd.read_parquet(out / "lens.parquet").sort_values(KEY, ignore_index=True)
    assert not a.duplicated(KEY).any() and a["qid"].nunique() == 120
    pd.testing.assert_frame_equal(a, _table(tmp_path / "alone"), check_exact=True)


def test_lock_refuses_a_second_process_library(tmp_path):
    """The lock is per process: a store held here refuses a writer in another process with one clear line."""
    from mhop_lens.runs import RunStore

    with RunStore(tmp_path / "run", "lens", {"seed": 0}):
        code = ("import sys; from mhop_lens.runs import RunStore, RunError\n"
                "try:\n    RunStore(sys.argv[1], 'lens', {'seed': 0}, resume=True)\n"
                "except RunError as e:\n    print('Error:', e); sys.exit(1)\n")
        other = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert other.returncode == 1 and "in use by another process" in other.stdout, other.stdout + other.stderr
    again = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert again.returncode == 0, again.stdout + again.stderr  # released when the store closed


@pytest.fixture
def shards(tiny_dirs, data_csv, tmp_path):
    """The two shards of a --limit 10 lens run, and a function that runs a variant of shard 1."""
    base = ["--limit", "10"]

    def run(name, *extra, model=tiny_dirs["gpt2"], data=data_csv, shard="1/2"):
        _ok(_lens(model, data, tmp_path / name, *base, "--shard", shard, *extra))
        return str(tmp_path / name)

    return run("s0", shard="0/2"), run("s1"), run


def _merge(*runs, out, extra=()):
    return CliRunner().invoke(main, ["merge", *map(str, runs), "--out", str(out), *extra])


def test_merge_accepts_matching_shards(shards, tmp_path, tiny_dirs, data_csv):
    s0, s1, _ = shards
    _ok(_merge(s0, s1, out=tmp_path / "m"))
    _ok(_lens(tiny_dirs["gpt2"], data_csv, tmp_path / "all", "--limit", "10"))
    pd.testing.assert_frame_equal(_table(tmp_path / "m"), _table(tmp_path / "all"), atol=1e-5, rtol=1e-5)
    _refused(_merge(s0, s1, out=tmp_path / "m"), "already holds a run")
    _ok(_merge(s0, s1, out=tmp_path / "m", extra=["--overwrite"]))


def test_merge_refuses_mismatched_shards(shards, tmp_path, tiny_dirs, data_csv):
    from mhop_lens.tiny_models import save_tiny_model

    s0, s1, run = shards
    other_limit = run("limit", "--limit", "12")
    edited = tmp_path / "edited.csv"
    shutil.copy(data_csv, edited)
    _edit_csv(edited)
    other_data = run("data", data=edited)
    other_model = run("model", model=save_tiny_model(tmp_path / "m2", "gpt2", seed=2))
    _refused(_merge(s0, other_limit, out=tmp_path / "x"), "args.limit")
    _refused(_merge(s0, other_data, out=tmp_path / "x"), "inputs.data")
    _refused(_merge(s0, other_model, out=tmp_path / "x"), "inputs.model")
    _refused(_merge(s0, out=tmp_path / "x"), "missing shard(s) 1/2")
    _refused(_merge(s0, s0, s1, out=tmp_path / "x"), "more than one run", "overlapping")
    _refused(_merge(s0, s1, out=s0), "one of the runs")
    _refused(_merge(s0, s1, out=f"{s1}/merged"), "inside")
    (tmp_path / "s1" / "lens.parquet").write_bytes(b"PAR1 truncated")
    _refused(_merge(s0, s1, out=tmp_path / "x"), "unreadable", "--resume")
    (tmp_path / "s1" / "lens.parquet").unlink()
    _refused(_merge(s0, s1, out=tmp_path / "x"), "has no table 'lens'")
    os.unlink(f"{s1}/status.json")
    _refused(_merge(s0, s1, out=tmp_path / "x"), "not finished")
    assert not (tmp_path / "x").exists(), "a refused merge writes nothing"
    run("s1", "--resume")  # what the messages say: rewrites the table from the chunks, marks the shard finished
    _ok(_merge(s0, s1, out=tmp_path / "x"))


def test_failed_setup_does_not_block_the_corrected_command(tmp_path, tiny_dirs, data_csv):
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(os.path.join(tiny_dirs["gpt2"], "config.json"), broken / "config.json")  # no weights, no tokenizer
    out = tmp_path / "run"
    failed = _lens(broken, data_csv, out)
    assert failed.exit_code != 0
    assert not (out / "config.json").exists()
    # a failure inside the sweep (an option the analysis rejects) leaves a config but no result: not blocking
    bad = _lens(tiny_dirs["gpt2"], data_csv, out, "--positions", "nowhere")
    assert bad.exit_code != 0 and not list(out.glob("*.parquet"))
    _ok(_lens(tiny_dirs["gpt2"], data_csv, out))
    # a finished run: another command needs --resume (same arguments) or --overwrite
    _refused(_lens(tiny_dirs["gpt2"], data_csv, out, "--top-k", "3"), "--overwrite")
    _ok(_lens(tiny_dirs["gpt2"], data_csv, out, "--top-k", "3", "--overwrite"))
    assert '"top_k": 3' in (out / "config.json").read_text()
