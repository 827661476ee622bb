"""Issue 9: a sweep killed with SIGKILL mid-way and resumed with --resume gives the uninterrupted run's table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from mhop_lens.cli.hopping import lens

N = 160  # queries: 20 chunks of 8, so the kill lands mid-way
ARGS = ["--model", "organism", "--data", "organism", "--limit", str(N), "--batch-size", "8", "--sites", "resid_post",
        "--positions", "last,t1", "--top-k", "2", "--device", "cpu"]
KEY = ["qid", "position", "site", "layer"]


@pytest.fixture
def one_thread():
    """The killed subprocess runs on one thread; so do the in-process runs, so that floats match bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kill_after_first_chunk(out) -> int:
    """Start `lens` in a subprocess, SIGKILL it as soon as its first chunk is on disk; return the chunks it left."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    code = "import torch; torch.set_num_threads(1); from mhop_lens.cli.hopping import lens; lens()"
    proc = subprocess.Popen([sys.executable, "-c", code, *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = out / "parts" / "lens"
    deadline = time.monotonic() + 120
    try:
        while not any(parts.glob("*.parquet")):
            if proc.poll() is not None:
                pytest.fail(f"lens exited ({proc.returncode}) before writing a chunk: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("lens wrote no chunk within 120 s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stderr.close()
    return len(list(parts.glob("*.parquet")))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, one_thread):
    killed = _kill_after_first_chunk(tmp_path / "A")
    assert 1 <= killed < N // 8, "the sweep finished before it was killed; raise --limit"
    assert not (tmp_path / "A" / "lens.parquet").exists()

    again = CliRunner().invoke(lens, [*ARGS, "--out", str(tmp_path / "A")])
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = CliRunner().invoke(lens, [*ARGS, "--out", str(tmp_path / "A"), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"{killed * 8} of {N} items already done" in (tmp_path / "A" / "log.txt").read_text()
    full = CliRunner().invoke(lens, [*ARGS, "--out", str(tmp_path / "B")])
    assert full.exit_code == 0, full.output

    a = pd.read_parquet(tmp_path / "A" / "lens.parquet")
    b = pd.read_parquet(tmp_path / "B" / "lens.parquet")
    assert not a.duplicated(KEY).any() and a["qid"].nunique() == N
    assert len(a) == N * 2 * 4
    pd.testing.assert_frame_equal(a.sort_values(KEY, ignore_index=True), b.sort_values(KEY, ignore_index=True),
                                  check_exact=True)
