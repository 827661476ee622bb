"""Issue 19 item 6: `--executor local --shards N` runs the shards as a submitit job array (one process each), merges
them, and equals the unsharded run; a shard lost after the fact is redone by `--resume`."""

from __future__ import annotations

import json
import shutil

import click
import pandas as pd
import pytest
from _small_world import small_world
from click.testing import CliRunner

from mhop_lens.cli import main
from mhop_lens.cli.patching import backpatch
from mhop_lens.executor import params_to_argv

N = 12
TABLES = {"backpatch": ["qid", "position", "t", "s", "donor"], "backpatch_queries": ["qid", "position"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> str:
    return small_world(tmp_path_factory.mktemp("world"), N)


def _backpatch(world, out, *extra):
    args = ["backpatch", "--model", "organism", "--data", world, "--limit", str(N), "--device", "cpu",
            "--batch-size", "2", "--threads", "1", "--out", str(out), *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result


def _same(a, b):
    for table, key in TABLES.items():
        got = pd.read_parquet(a / f"{table}.parquet").sort_values(key, ignore_index=True)
        want = pd.read_parquet(b / f"{table}.parquet").sort_values(key, ignore_index=True)
        pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-5, rtol=1e-5)


def test_local_executor_equals_the_unsharded_run(world, tmp_path):
    _backpatch(world, tmp_path / "all")
    result = _backpatch(world, tmp_path / "sub", "--executor", "local", "--shards", "4")
    assert "merged 4 shards" in result.output
    plan = json.loads((tmp_path / "sub" / "submit.json").read_text())
    assert plan["shards"] == 4 and len(plan["jobs"]) == 4
    shard_qids = [set(pd.read_parquet(d / "backpatch.parquet")["qid"])
                  for d in sorted((tmp_path / "sub" / "shards").iterdir())]
    assert len(shard_qids) == 4 and all(shard_qids) and sum(map(len, shard_qids)) == N
    _same(tmp_path / "sub", tmp_path / "all")
    assert (tmp_path / "sub" / "status.json").exists()

    # a shard lost (as if pre-empted before it finished): --resume resubmits only that one and merges again
    lost = tmp_path / "sub" / "shards" / "0002"
    (lost / "status.json").unlink()
    shutil.rmtree(lost / "parts")
    again = _backpatch(world, tmp_path / "sub", "--executor", "local", "--shards", "4", "--resume")
    assert "submitted 1 shard job" in again.output
    _same(tmp_path / "sub", tmp_path / "all")

    refused = CliRunner().invoke(main, ["backpatch", "--data", world, "--limit", str(N), "--out",
                                        str(tmp_path / "sub"), "--executor", "local", "--shards", "4"])
    assert refused.exit_code == 1 and "--resume" in refused.output and "Traceback" not in refused.output
    changed = CliRunner().invoke(main, ["backpatch", "--data", world, "--limit", "10", "--out",
                                        str(tmp_path / "sub"), "--executor", "local", "--shards", "4", "--resume"])
    assert changed.exit_code == 1 and "args.limit" in changed.output


def test_executor_options_are_checked_before_submitting(world, tmp_path):
    cases = [(["--shards", "2"], "need --executor"),
             (["--executor", "local"], "--shards N"),
             (["--executor", "local", "--shards", "2", "--shard", "0/2"], "exclude each other"),
             (["--executor", "local", "--shards", str(N + 1)], "more than the"),
             (["--executor", "local", "--shards", "2", "--executor-option", "nonsense"], "KEY=VALUE"),
             (["--executor", "local", "--shards", "2", "--executor-option", "bogus_param=3"], "Unknown executor")]
    if shutil.which("srun") is None:
        cases.append((["--executor", "slurm", "--shards", "2"], "slurm cluster"))
    for extra, message in cases:
        result = CliRunner().invoke(main, ["backpatch", "--data", world, "--limit", str(N), "--out",
                                           str(tmp_path / "x"), *extra])
        assert result.exit_code != 0 and message in result.output, (extra, result.output)
        errors = [line for line in result.output.splitlines() if "Error" in line]
        assert "Traceback" not in result.output and len(errors) == 1 and errors[0].startswith("Error:"), result.output
    assert not (tmp_path / "x" / "submit.json").exists()


def test_params_to_argv_round_trips():
    """The shard jobs get the verb's own options back: parsing the argv gives the same values."""
    ctx = backpatch.make_context("backpatch", ["--out", "o", "--positions", "last,e1", "--no-control", "--limit", "5",
                                               "--reference", "--executor", "local", "--shards", "3"])
    argv = params_to_argv(backpatch, ctx.params)
    assert "--executor" not in argv and "--out" not in argv and "--no-control" in argv
    again = backpatch.make_context("backpatch", [*argv, "--out", "o"]).params
    skip = {"executor", "shards", "executor_option"}
    assert {k: v for k, v in again.items() if k not in skip} == {k: v for k, v in ctx.params.items() if k not in skip}
    assert isinstance(backpatch, click.Command)


def test_a_preempted_shard_job_is_requeued_and_resumes(world, tmp_path, monkeypatch):
    """What submitit does on pre-emption: ``checkpoint`` returns a resubmission of the same shard; run again, it
    finds the shard's config and continues with --resume, recomputing only what the killed job had not listed."""
    from mhop_lens.executor import ShardJob, shard_dir

    monkeypatch.chdir(tmp_path)  # the job changes to the submitting directory; restore ours afterwards
    ctx = backpatch.make_context("backpatch", ["--data", world, "--limit", str(N), "--device", "cpu",
                                               "--batch-size", "2", "--threads", "1", "--out", "unused"])
    job = ShardJob("backpatch", params_to_argv(backpatch, ctx.params), str(tmp_path / "sub"), 2, str(tmp_path))
    out = shard_dir(tmp_path / "sub", 1)
    assert job(1) == str(out)
    whole = pd.read_parquet(out / "backpatch.parquet")
    chunks = sorted((out / "parts" / "backpatch").glob("*.parquet"))
    chunks[0].unlink()  # as if the job was pre-empted before this chunk was written
    (out / "status.json").unlink()
    resubmission = job.checkpoint(1)
    assert resubmission.function is job and resubmission.args == (1,)
    assert resubmission.result() == str(out)
    log = (out / "log.txt").read_text()
    assert "backpatch resumed" in log and f"{N // 2 - 2} of {N // 2} items already done" in log
    pd.testing.assert_frame_equal(pd.read_parquet(out / "backpatch.parquet"), whole, check_exact=True)
