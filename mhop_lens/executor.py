"""Sweep verbs on a cluster through submitit: the shards of a run as one job array, resumed after pre-emption,
merged into ``--out`` when all are done.

``mhop-lens VERB ... --executor slurm --shards N --out OUT`` (or ``--executor local``: one process per shard on
this machine) writes::

    OUT/submit.json      the verb, its arguments and input fingerprints, the shard count, the job ids
    OUT/shards/<i>/      shard i's run directory (``VERB ... --shard i/N``), resumed with --resume when it exists
    OUT/submitit/        submitit's job files and each job's stdout/stderr
    OUT/<table>.parquet  the merged tables (``mhop_lens.runs.merge``), with config.json and status.json

A pre-empted or timed-out SLURM job is requeued by submitit (``ShardJob.checkpoint``) and resumes its shard from
the finished chunks. If the submitting process itself stops, rerun the same command with ``--resume``: finished
shards are kept, the others are submitted again and resume from their chunks, and the merge follows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import click

from mhop_lens.runs import (
    IGNORED_FOR_RESUME,
    RunError,
    atomic_write_text,
    config_difference,
    describe_difference,
    hold_lock,
    jsonable,
    merge,
    now,
    package_version,
    release_lock,
)

NOT_FORWARDED = {"executor", "shards", "executor_option", "out", "shard", "resume", "overwrite"}
DEFAULT_PARAMETERS = {"timeout_min": 24 * 60}

try:
    from submitit.helpers import Checkpointable
except ImportError:  # submitit is a dependency; without it only --executor is unavailable
    Checkpointable = object


def params_to_argv(command: click.Command, params: dict[str, Any]) -> list[str]:
    """The command-line arguments that give ``command`` these option values (executor options left out)."""
    argv: list[str] = []
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in NOT_FORWARDED:
            continue
        value = params.get(p.name)
        if p.is_flag and p.is_bool_flag:
            if p.secondary_opts:
                argv.append(p.opts[0] if value else p.secondary_opts[0])
            elif value:
                argv.append(p.opts[0])
        elif p.multiple:
            for v in value or ():
                argv += [p.opts[0], str(v)]
        elif value is not None:
            argv += [p.opts[0], str(value)]
    return argv


def shard_dir(out: Path, i: int) -> Path:
    return out / "shards" / f"{i:04d}"


class ShardJob(Checkpointable):
    """One shard of a sweep verb, run in the job's process through the CLI (so it validates, locks and resumes
    exactly like a hand-run ``--shard i/n``). submitit requeues it on pre-emption or time-out (``checkpoint``);
    the requeued job resumes from the shard's finished chunks."""

    def __init__(self, verb: str, argv: list[str], out: str, n: int, cwd: str):
        self.verb, self.argv, self.out, self.n, self.cwd = verb, argv, out, n, cwd

    def __call__(self, i: int) -> str:
        from mhop_lens.cli import main

        os.chdir(self.cwd)
        out = shard_dir(Path(self.out), i)
        if (out / "status.json").exists():
            return str(out)
        args = [self.verb, *self.argv, "--shard", f"{i}/{self.n}", "--out", str(out)]
        args += ["--resume"] if (out / "config.json").exists() else []
        try:
            main.main(args, prog_name="mhop-lens", standalone_mode=False)
        except click.ClickException as e:
            raise RuntimeError(f"shard {i}/{self.n}: Error: {e.format_message()}") from None
        return str(out)


def executor_parameters(options: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> submitit parameters (ints, floats and true/false parsed)."""
    params = dict(DEFAULT_PARAMETERS)
    for option in options:
        k, sep, v = option.partition("=")
        if not sep or not k.strip():
            raise RunError(f"--executor-option must look like KEY=VALUE (e.g. slurm_partition=gpu), not {option!r}.")
        params[k.strip()] = _parse_value(v.strip())
    return params


def _parse_value(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def submit_sweep(command: click.Command, kw: dict[str, Any], inputs: dict[str, dict], n_queries: int) -> dict:
    """Run ``command``'s shards through submitit (``kw["executor"]``: local or slurm), wait, merge into ``kw["out"]``.

    ``inputs`` are the validated input fingerprints; returns the merged tables' row counts.
    """
    try:
        import submitit
    except ImportError:
        raise RunError("--executor needs submitit: pip install submitit (it is a dependency of mhop_lens).") from None
    verb, n, out = command.name, kw["shards"], Path(kw["out"])
    if n is None or n < 1:
        raise RunError("--executor needs --shards N (N >= 1): the number of shard jobs.")
    if kw.get("shard"):
        raise RunError("--shard and --executor exclude each other: --executor runs all --shards itself.")
    if n > n_queries:
        raise RunError(f"--shards {n} is more than the {n_queries} queries; use at most {n_queries}.")
    params = executor_parameters(tuple(kw.get("executor_option") or ()))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot write to --out {str(out)!r} ({e.strerror}).") from None
    owner = object()
    hold_lock(out, owner)
    try:
        plan = {"command": verb, "args": jsonable({k: v for k, v in kw.items() if k not in NOT_FORWARDED}),
                "inputs": jsonable(inputs), "mhop_lens_version": package_version(), "shards": n,
                "executor": kw["executor"], "created": now()}
        _check_plan(out, plan, kw)
        try:  # e.g. no SLURM on this machine, or an unknown parameter: one line, and nothing submitted
            executor = submitit.AutoExecutor(folder=out / "submitit", cluster=kw["executor"])
            executor.update_parameters(**{"name": f"mhop-lens-{verb}", **params})
        except Exception as e:  # noqa: BLE001
            raise RunError(f"--executor {kw['executor']}: {' '.join(str(e).split())}") from None
        atomic_write_text(out / "submit.json", json.dumps(plan, indent=2))
        dirs = [shard_dir(out, i) for i in range(n)]
        todo = [i for i, d in enumerate(dirs) if not (d / "status.json").exists()]
        _log(out, f"{verb}: {n} shards, {n - len(todo)} already finished; submitting {len(todo)} "
                  f"({kw['executor']}, {params})")
        if todo:
            job = ShardJob(verb, params_to_argv(command, kw), str(out.resolve()), n, os.getcwd())
            try:
                jobs = executor.map_array(job, todo)
            except Exception as e:  # noqa: BLE001 - e.g. no sbatch on this machine: one line, not a traceback
                raise RunError(f"submitting to {kw['executor']} failed: {e}. Fix the cause and rerun with "
                               "--resume.") from None
            plan["jobs"] = {str(i): j.job_id for i, j in zip(todo, jobs, strict=True)}
            atomic_write_text(out / "submit.json", json.dumps(plan, indent=2))
            click.echo(f"submitted {len(todo)} shard job(s) to {kw['executor']}: {', '.join(j.job_id for j in jobs)}"
                       f" (logs: {out / 'submitit'})", err=True)
            failures = []
            for i, j in zip(todo, jobs, strict=True):
                try:
                    j.result()
                except Exception as e:  # noqa: BLE001 - a failed job: collect its one-line cause
                    failures.append(f"shard {i}/{n}: {_cause(e)} (log: {j.paths.stderr})")
            if failures:
                _log(out, "failed: " + "; ".join(failures))
                raise RunError(f"{len(failures)} of {n} shard jobs failed: {failures[0]}. Fix the cause and rerun "
                               "with --resume: finished shards are kept, the others resume from their chunks (if the "
                               "fix changes an option and some shards wrote results, --overwrite starts over).")
        counts = merge(dirs, out, overwrite=True, locked=True)
        _log(out, f"merged {n} shards: {counts}")
        return counts
    finally:
        release_lock(out, owner)


def _check_plan(out: Path, plan: dict, kw: dict) -> None:
    """Refuse a different study in ``out`` (or clear it with --overwrite)."""
    path = out / "submit.json"
    if path.exists() and not any((out / "shards").rglob("*.parquet")) and not kw.get("overwrite"):
        _log(out, "replacing a submission whose shards wrote no results")  # e.g. every shard failed on an option
        kw = dict(kw, overwrite=True)
    if kw.get("overwrite"):
        shutil.rmtree(out / "shards", ignore_errors=True)
        shutil.rmtree(out / "submitit", ignore_errors=True)
        for name in ("submit.json", "config.json", "status.json"):
            (out / name).unlink(missing_ok=True)
        for p in out.glob("*.parquet"):
            p.unlink()
    elif path.exists():
        if not kw.get("resume"):
            raise RunError(f"{out} already holds a submitted `{plan['command']}`. Pass --resume to finish it (and "
                           "merge), --overwrite to replace it, or choose a new --out.")
        old = json.loads(path.read_text())
        diff = config_difference(old, plan, IGNORED_FOR_RESUME)
        if diff is None and old.get("shards") != plan["shards"]:
            diff = ("shards", old.get("shards"), plan["shards"])
        if diff is not None:
            raise RunError(f"--resume refused: {out} was submitted with other inputs or arguments "
                           f"({describe_difference(diff)}). Resume with the same ones, or choose a new --out.")
        plan.update(created=old.get("created", plan["created"]))
    elif (out / "config.json").exists():
        raise RunError(f"{out} already holds a run; choose a new --out, or pass --overwrite to replace it.")


def _cause(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error:" in line:
            return line[line.rindex("Error:"):]
    return lines[-1] if lines else type(error).__name__


def _log(out: Path, message: str) -> None:
    with open(out / "log.txt", "a") as f:
        f.write(f"{now()} {message}\n")
