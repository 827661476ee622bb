"""The run directory every CLI verb writes: config.json, log.txt, chunked parquet tables, resume, shards, merge.

Layout of ``--out DIR``::

    config.json                  arguments, a fingerprint of every input, package version, seed, git commit
    status.json                  {"complete": true, ...} once the verb finished (``merge`` requires it)
    log.txt                      one timestamped line per event
    .lock                        held (flock) by the one process writing the directory
    parts/<table>/<keys>.parquet chunks of a sweep, named by a hash of the keys they hold, written atomically
    parts/<table>/manifest.jsonl one line per chunk: file, keys, rows, bytes, sha256
    <table>.parquet              the consolidated table, sorted by its key, rewritten when a sweep finishes

A run killed mid-way keeps every finished chunk. ``resume=True`` first checks that the inputs are the ones the run
started with (``config.json`` fingerprints: file hashes, resolved paths, package version), then checks every chunk
against the manifest: a missing, truncated or altered chunk is dropped and its keys recomputed, so the consolidated
table equals the uninterrupted run's.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from tqdm.auto import tqdm

from mhop_lens.errors import MhopLensError

T = TypeVar("T")
# arguments that may change between a run and its --resume (they do not change the rows)
IGNORED_FOR_RESUME = {"resume", "out", "batch_size", "device", "progress", "threads", "overwrite", "executor",
                       "shards", "executor_option"}
# arguments that differ between the shards of one study, or are not part of a run's result
IGNORED_FOR_MERGE = {"shard", "out", "resume", "overwrite", "executor", "shards", "executor_option"}
MANIFEST = "manifest.jsonl"
FULL_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole; larger ones (model weights) are sampled
_SAMPLE = 4 * 2**20


class RunError(MhopLensError):
    """The output directory cannot be used as asked."""


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mhop_lens")
    except PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """Commit of the mhop_lens checkout, if it is one (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# fingerprints ---------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, full: bool = False) -> str:
    """sha256 of a file's bytes; for a file over ``FULL_HASH_BYTES`` (unless ``full``), of its size and 16 evenly
    spaced 4 MiB samples (model weights of many GiB: a sampled hash keeps a resume check to seconds, and a
    rewritten weight file differs in its header, size or samples)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if full or size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                h.update(block)
            return h.hexdigest()
        h.update(f"sampled:{size}".encode())
        for k in range(16):
            f.seek((size - _SAMPLE) * k // 15)
            h.update(f.read(_SAMPLE))
    return "sampled-" + h.hexdigest()


def fingerprint_path(path: str | os.PathLike) -> dict[str, Any]:
    """Resolved absolute path plus a content hash: of the file, or of a directory's files (relative path, size and
    hash of each; hidden files and ``__pycache__`` skipped)."""
    path = Path(path).expanduser().resolve()
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size}
    if not path.is_dir():
        raise RunError(f"input {str(path)!r} does not exist.")
    h, n = hashlib.sha256(), 0
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if not p.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        h.update(f"{rel.as_posix()}\0{p.stat().st_size}\0{file_sha256(p)}\n".encode())
        n += 1
    return {"path": str(path), "sha256": h.hexdigest(), "files": n}


def fingerprint_model(name_or_dir: str) -> dict[str, Any]:
    """A local model directory's fingerprint; for a hub name, the name and the cached snapshot's fingerprint if the
    model is in the local HF cache (else only the name: the hub revision is then whatever the loader fetches)."""
    if Path(name_or_dir).expanduser().exists():
        return fingerprint_path(name_or_dir)
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_dir, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, offline, or not a hub name: the name is all we can record
        return {"name": name_or_dir}
    return {"name": name_or_dir, **fingerprint_path(local)}


def config_difference(old: dict, new: dict, ignore_args: set[str]) -> tuple[str, Any, Any] | None:
    """The first field (dotted name) where two run configs differ, with both values; None if they agree.

    Compares the command, every argument except ``ignore_args`` and the raw spelling of inputs that are
    fingerprinted (a relative ``--model`` resolved elsewhere is compared by its resolved path and hash), every
    input fingerprint, and the package version.
    """
    inputs = set(new.get("inputs", {})) | set(old.get("inputs", {}))
    keep = lambda d: {k: v for k, v in d.items() if k not in ignore_args and k not in inputs}  # noqa: E731
    fields = [("command", old.get("command"), new.get("command")),
              ("mhop_lens_version", old.get("mhop_lens_version"), new.get("mhop_lens_version"))]
    old_args, new_args = keep(old.get("args", {})), keep(new.get("args", {}))
    fields += [(f"args.{k}", old_args.get(k), new_args.get(k)) for k in sorted(set(old_args) | set(new_args))]
    for name in sorted(inputs):
        a, b = old.get("inputs", {}).get(name, {}), new.get("inputs", {}).get(name, {})
        order = sorted(set(a) | set(b), key=lambda k: (k != "sha256", k != "path", k))  # content first
        fields += [(f"inputs.{name}.{k}", a.get(k), b.get(k)) for k in order]
    for field, a, b in fields:
        if a != b:
            return field, a, b
    return None


def describe_difference(diff: tuple[str, Any, Any]) -> str:
    field, a, b = diff
    short = lambda v: (v[:16] + "…") if isinstance(v, str) and len(v) > 40 else v  # noqa: E731
    return f"{field} was {short(a)!r}, now {short(b)!r}"


# locking --------------------------------------------------------------------------------------------------
def lock_dir(directory: Path) -> int:
    """Take the exclusive lock of a run directory (``flock`` on ``DIR/.lock``); return its file descriptor.

    The lock dies with the process (killed, pre-empted), so a stale lock never blocks a resume. On network file
    systems flock needs lock support (NFSv4, Lustre mounted with ``-o flock``).
    """
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(f"{directory} is in use by another process ({holder}); wait for it to finish, or use "
                       "another --out.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    if spec in (None, ""):
        return None
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise RunError(f"--shard must look like i/n (e.g. 0/4), not {spec!r}.") from None
    if not (n >= 1 and 0 <= i < n):
        raise RunError(f"--shard {spec}: need 0 <= i < n.")
    return i, n


def shard_items(items: Sequence[T], shard: tuple[int, int] | None) -> list[T]:
    """Shard i of n: every n-th item starting at i (disjoint, covering, stable across runs)."""
    if shard is None:
        return list(items)
    i, n = shard
    return list(items[i::n])


_HELD: dict[str, list] = {}  # resolved run directory -> [fd, id(owner), pid]: the locks this process holds


def hold_lock(directory: Path, owner: object) -> None:
    """Lock ``directory`` for ``owner``. A later store of the same process takes the lock over (an earlier store
    kept alive by a traceback must not block a retry in the same session); other processes are refused."""
    key = str(directory.resolve())
    if key in _HELD and _HELD[key][2] == os.getpid():
        _HELD[key][1] = id(owner)
        return
    _HELD[key] = [lock_dir(directory), id(owner), os.getpid()]


def release_lock(directory: Path, owner: object) -> None:
    """Release ``directory``'s lock if ``owner`` holds it (a store whose lock was taken over releases nothing)."""
    key = str(directory.resolve())
    held = _HELD.get(key)
    if held is not None and held[1] == id(owner) and held[2] == os.getpid():
        del _HELD[key]
        unlock(held[0])


class RunStore:
    """One run directory, locked while this object is open. Use ``sweep`` for resumable tables.

    ``inputs`` maps an argument name (``data``, ``model``, ...) to its fingerprint (``fingerprint_path``); a resume
    compares them. ``start=False`` validates and locks without writing anything: call ``start()`` once the rest
    of the setup (loading the model) has succeeded, so a failed setup leaves no config.json behind.
    ``overwrite=True`` clears a finished or stopped run in ``out`` first. Use as a context manager (or call
    ``finish()`` and ``close()``): ``finish`` writes status.json, which ``merge`` requires of every shard.
    """

    def __init__(self, out: str | os.PathLike, command: str, args: dict[str, Any], resume: bool = False, *,
                 inputs: dict[str, dict] | None = None, overwrite: bool = False, start: bool = True):
        self.dir = Path(out)
        self.command = command
        self.args = {k: jsonable(v) for k, v in args.items()}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"  # per process: two writers must not unlink each other's
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunError(f"cannot write to --out {str(out)!r} ({e.strerror}). Choose a directory you can "
                           "write to, e.g. --out ./runs/my-run.") from None
        hold_lock(self.dir, self)
        self._open = True
        try:
            self.config = {
                "command": command,
                "args": self.args,
                "inputs": jsonable(inputs or {}),
                "model": self.args.get("model"),
                "seed": self.args.get("seed"),
                "mhop_lens_version": package_version(),
                "git_commit": git_commit(),
                "python": platform.python_version(),
                "created": now(),
            }
            self.resumed = self._check_existing(resume, overwrite)
        except BaseException:
            self.close()
            raise
        self._started = False
        if start:
            self.start()

    @staticmethod
    def precheck(out: str | os.PathLike, command: str, args: dict[str, Any], resume: bool = False, *,
                 inputs: dict[str, dict] | None = None, overwrite: bool = False) -> None:
        """Raise the ``RunError`` that opening ``out`` would raise (another process writing it, a run there that
        needs --resume, a resume with other inputs), writing nothing and creating nothing: lets a verb refuse at
        once, before loading a large model. Opening the store checks again under the lock."""
        out = Path(out)
        held = _HELD.get(str(out.resolve()))
        if (out / ".lock").is_file() and not (held and held[2] == os.getpid()):
            unlock(lock_dir(out))  # only probes: another process holding it is refused here
        cfg_path = out / "config.json"
        if overwrite or not cfg_path.is_file():
            return
        try:
            old = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError):
            return  # opening the store reports it
        has_results = any(out.glob("*.parquet")) or any((out / "parts").rglob("*.parquet"))
        if not isinstance(old, dict) or not has_results:
            return
        if not resume:
            raise RunError(f"{out} already holds a run of `{old.get('command')}`. Pass --resume to continue "
                           "it, --overwrite to replace it, or choose a new --out.")
        new = {"command": command, "args": jsonable(args), "inputs": jsonable(inputs or {}),
               "mhop_lens_version": package_version()}
        diff = config_difference(old, new, IGNORED_FOR_RESUME)
        if diff is not None:
            raise RunError(f"--resume refused: {out} was started with other inputs or arguments "
                           f"({describe_difference(diff)}). Resume with the same arguments and inputs, or choose a "
                           "new --out (or pass --overwrite).")

    def _check_existing(self, resume: bool, overwrite: bool) -> bool:
        """Validate ``out`` against an earlier run there; True when this continues it."""
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            return False
        try:
            old = json.loads(cfg_path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if overwrite:
                self._clear()
                return False
            raise RunError(f"{cfg_path} is unreadable ({e}); pass --overwrite to replace the run, or choose a new "
                           "--out.") from None
        if overwrite:
            self._clear()
            return False
        if not self._has_results():
            cfg_path.unlink()  # a setup that failed before computing anything: nothing to protect
            self.log(f"replaced the config of an earlier `{old.get('command')}` that wrote no results")
            return False
        if not resume:
            raise RunError(f"{self.dir} already holds a run of `{old.get('command')}`. Pass --resume to continue "
                           "it, --overwrite to replace it, or choose a new --out.")
        diff = config_difference(old, self.config, IGNORED_FOR_RESUME)
        if diff is not None:
            raise RunError(f"--resume refused: {self.dir} was started with other inputs or arguments "
                           f"({describe_difference(diff)}). Resume with the same arguments and inputs, or choose a "
                           "new --out (or pass --overwrite).")
        self.config = old
        return True

    def _has_results(self) -> bool:
        return any(self.dir.glob("*.parquet")) or any((self.dir / "parts").rglob("*.parquet"))

    def _clear(self) -> None:
        """Remove what a run writes (config, status, log, chunks, tables), nothing else."""
        for name in ("config.json", "status.json", "log.txt"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "parts", ignore_errors=True)
        for p in self.dir.glob("*.parquet"):
            p.unlink()
        self.log("--overwrite: cleared the earlier run in this directory")

    def start(self) -> None:
        """Write config.json (a new run) and log the start; idempotent."""
        if self._started:
            return
        cfg_path = self.dir / "config.json"
        if not cfg_path.exists():
            atomic_write_text(cfg_path, json.dumps(self.config, indent=2))
        self._started = True
        self.log(f"{self.command} {'resumed' if self.resumed else 'started'} with {self.args}")

    def finish(self) -> None:
        """Mark the run complete (status.json)."""
        self.start()
        atomic_write_text(self.dir / "status.json", json.dumps({"complete": True, "finished": now()}, indent=2))
        self.log(f"{self.command} finished")

    def close(self) -> None:
        """Release the directory lock (the process exiting releases it too)."""
        if getattr(self, "_open", False):
            self._open = False
            release_lock(self.dir, self)

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the process exit releases the lock anyway
            pass

    def log(self, message: str) -> None:
        with open(self.dir / "log.txt", "a") as f:
            f.write(f"{now()} {message}\n")

    def path(self, name: str) -> Path:
        return self.dir / name

    # tables -------------------------------------------------------------------------------------------------
    def _parts(self, table: str) -> Path:
        return self.dir / "parts" / table

    def chunks(self, table: str, verify: bool = False) -> list[dict]:
        """Manifest entries of ``table``'s chunks. ``verify=True`` checks each chunk's size and sha256, drops (and
        deletes) missing, truncated or altered chunks and chunks the manifest does not list, logs each, and
        rewrites the manifest; their keys are then computed again by ``sweep``."""
        parts = self._parts(table)
        manifest = parts / MANIFEST
        entries: dict[str, dict] = {}
        problems = []
        if manifest.exists():
            for n, line in enumerate(manifest.read_text(errors="replace").splitlines()):
                try:
                    entry = json.loads(line)
                    entries[entry["file"]] = {k: entry[k] for k in ("file", "keys", "rows", "bytes", "sha256")}
                except (ValueError, KeyError, TypeError):
                    problems.append(f"manifest line {n + 1} unreadable")
        if not verify:
            return [e for e in entries.values() if (parts / e["file"]).is_file()]
        valid = []
        for e in entries.values():
            p = parts / e["file"]
            if not p.is_file():
                problems.append(f"chunk {e['file']} ({len(e['keys'])} keys) is missing")
            elif p.stat().st_size != e["bytes"] or file_sha256(p, full=True) != e["sha256"]:
                problems.append(f"chunk {e['file']} ({len(e['keys'])} keys) is truncated or altered")
                p.unlink()
            else:
                valid.append(e)
        listed = {e["file"] for e in valid}
        for p in parts.glob(".*.tmp") if parts.is_dir() else []:
            p.unlink()  # a chunk being written when its process died
        for p in sorted(parts.glob("*.parquet")) if parts.is_dir() else []:
            if p.name not in listed:
                problems.append(f"chunk {p.name} is not in the manifest")
                p.unlink()
        seen: set = set()
        for e in valid:
            overlap = seen.intersection(map(_key, e["keys"]))
            if overlap:
                raise RunError(f"{parts}: key {sorted(overlap)[0]!r} is in two chunks; the run directory was "
                               "written by two processes at once. Start it again with --overwrite.")
            seen.update(map(_key, e["keys"]))
        if problems:
            for problem in problems:
                self.log(f"{table}: {problem}; its keys will be computed again")
            atomic_write_text(manifest, "".join(json.dumps(e) + "\n" for e in valid))
        return valid

    def done_keys(self, table: str) -> set:
        """Keys whose rows are in a verified chunk of ``table``."""
        return {_key(k) for e in self.chunks(table, verify=True) for k in e["keys"]}

    def append(self, table: str, frame: pd.DataFrame, keys: Sequence | None = None, key: str = "qid") -> Path:
        """Write one chunk atomically, named by the keys it holds (default: ``frame[key]``), listed in the manifest
        with its row count and sha256 before it is renamed into place (a killed process leaves no half chunk; a
        listed chunk that never arrived is found missing on resume and recomputed)."""
        self.start()
        keys = list(frame[key].drop_duplicates()) if keys is None else list(keys)
        parts = self._parts(table)
        parts.mkdir(parents=True, exist_ok=True)
        path = parts / f"{_chunk_name(keys)}.parquet"
        tmp = parts / f".{path.name}.tmp"
        frame.to_parquet(tmp, index=False)
        _fsync(tmp)
        entry = {"file": path.name, "keys": jsonable(keys), "rows": len(frame), "bytes": tmp.stat().st_size,
                 "sha256": file_sha256(tmp, full=True)}
        with open(parts / MANIFEST, "a") as f:  # listed first: a chunk file on disk is always in the manifest
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def read(self, table: str, sort_by: Sequence[str] | None = None) -> pd.DataFrame:
        """The consolidated table if written, else the concatenated chunks."""
        final = self.dir / f"{table}.parquet"
        if final.exists():
            return pd.read_parquet(final)
        return self.read_parts(table, sort_by)

    def read_parts(self, table: str, sort_by: Sequence[str] | None = None) -> pd.DataFrame:
        entries = self.chunks(table)
        if not entries:
            raise RunError(f"{self.dir} has no table {table!r} yet.")
        parts = self._parts(table)
        frame = pd.concat([pd.read_parquet(parts / e["file"]) for e in entries], ignore_index=True)
        return _sorted(frame, sort_by)

    def write(self, table: str, frame: pd.DataFrame, sort_by: Sequence[str] | None = None) -> Path:
        """Write a whole table at once (small results: summaries, evaluations)."""
        self.start()
        path = self.dir / f"{table}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        _sorted(frame, sort_by).to_parquet(tmp, index=False)
        os.replace(tmp, path)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        self.start()
        path = self.dir / name
        atomic_write_text(path, json.dumps(jsonable(obj), indent=2))
        return path

    def sweep(
        self,
        table: str,
        items: Sequence[T],
        compute: Callable[[list[T]], pd.DataFrame],
        key: Callable[[T], Any],
        chunk_size: int = 32,
        sort_by: Sequence[str] | None = None,
        desc: str | None = None,
    ) -> pd.DataFrame:
        """Run ``compute`` over ``items`` in chunks, skipping those whose key is in a verified chunk; return the
        whole table (also written to ``<table>.parquet``).

        ``compute`` must return the rows of exactly the items of its chunk (their ``qid`` column holds
        ``key(item)``); a chunk is recorded under the keys of its items, so an item with no rows is not redone.
        """
        self.start()
        done = self.done_keys(table)
        todo = [it for it in items if _key(key(it)) not in done]
        if done:
            self.log(f"{table}: {len(items) - len(todo)} of {len(items)} items already done, skipping them")
        chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
        for chunk in tqdm(chunks, desc=desc or table, unit="chunk", disable=not chunks):
            self.append(table, compute(chunk), keys=[key(it) for it in chunk])
        self.log(f"{table}: {len(todo)} items computed")
        if not self.chunks(table):
            raise RunError(f"{table}: nothing to compute (empty dataset?).")
        frame = self.read_parts(table, sort_by)
        self.write(table, frame, sort_by)
        return frame


def merge(run_dirs: Iterable[str | os.PathLike], out: str | os.PathLike, key: str = "qid", *,
          overwrite: bool = False, locked: bool = False) -> dict[str, int]:
    """Merge the tables of the n shard runs (``--shard i/n``) of one study into ``out``.

    Refused, before anything is written: a directory that is not a finished run (status.json), runs whose configs
    differ in any field but the shard (command, arguments, input fingerprints, package version), a missing or
    repeated shard, and an ``out`` that is one of the runs or inside one (or already holds a run, unless
    ``overwrite``). ``locked=True``: the caller holds ``out``'s lock. Tables without a ``key`` column are
    per-shard summaries; they are left out (listed in log.txt), not stacked.
    """
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out)
    if not run_dirs:
        raise RunError("merge: give the shard run directories to merge.")
    configs = []
    for d in run_dirs:
        try:
            cfg = json.loads((d / "config.json").read_text())
        except FileNotFoundError:
            raise RunError(f"{d} is not a run directory (no config.json).") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise RunError(f"{d}/config.json is unreadable ({e}).") from None
        if not (d / "status.json").exists():
            raise RunError(f"{d} is not finished (no status.json): complete it with the same command and --resume, "
                           "then merge.")
        configs.append(cfg)
    commands = {c.get("command") for c in configs}
    if len(commands) != 1:
        raise RunError(f"cannot merge runs of different commands: {sorted(map(str, commands))}.")
    for d, cfg in zip(run_dirs[1:], configs[1:], strict=True):
        diff = config_difference(configs[0], cfg, IGNORED_FOR_MERGE)
        if diff is not None:
            raise RunError(f"cannot merge {run_dirs[0]} and {d}: they differ in more than the shard "
                           f"({describe_difference(diff)}).")
    shards = [parse_shard(c.get("args", {}).get("shard")) for c in configs]
    if any(s is None for s in shards):
        raise RunError(f"{run_dirs[shards.index(None)]} is not a shard run (no --shard i/n); merge combines the "
                       "shards of one study.")
    ns = {n for _, n in shards}
    if len(ns) != 1:
        raise RunError(f"the runs are shards of different splits ({sorted(ns)} shards); merge one study at a time.")
    n = ns.pop()
    owners: dict[int, list[Path]] = {}
    for d, (i, _) in zip(run_dirs, shards, strict=True):
        owners.setdefault(i, []).append(d)
    repeated = {i: ds for i, ds in owners.items() if len(ds) > 1}
    if repeated:
        i, ds = next(iter(repeated.items()))
        raise RunError(f"shard {i}/{n} appears in more than one run ({', '.join(map(str, ds))}); were the shards "
                       "overlapping?")
    missing = sorted(set(range(n)) - set(owners))
    if missing:
        raise RunError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}: merge needs all {n}; run them "
                       "(or finish them with --resume) first.")
    target = out.expanduser().resolve()
    for d in run_dirs:
        src = d.resolve()
        if target == src or src in target.parents:
            raise RunError(f"--out {out} is {'one of the runs' if target == src else 'inside ' + str(d)}; merge "
                           "into a new directory.")
    if (out / "config.json").exists() and not overwrite:
        raise RunError(f"{out} already holds a run; choose a new --out, or pass --overwrite to replace it.")
    names = [sorted(p.stem for p in d.glob("*.parquet")) for d in run_dirs]
    for d, have in zip(run_dirs, names, strict=True):
        lost = sorted(set().union(*map(set, names)) - set(have))
        if lost:
            raise RunError(f"{d} has no table {lost[0]!r}, which other shards have; rerun it with the same command "
                           "and --resume (it rewrites its tables from its chunks).")
    tables: dict[str, list[pd.DataFrame]] = {}
    for d in run_dirs:
        for p in sorted(d.glob("*.parquet")):
            try:
                tables.setdefault(p.stem, []).append(pd.read_parquet(p))
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise RunError(f"{p} is unreadable ({type(e).__name__}); rerun {d} with the same command and "
                               "--resume (it rewrites its tables from its chunks).") from None
    merged, summaries = {}, []
    for name, frames in tables.items():
        if key not in frames[0].columns and len(frames) > 1:
            summaries.append(name)  # a per-shard summary: concatenating them would be a wrong table
            continue
        frame = pd.concat(frames, ignore_index=True)
        if key in frame.columns and len(frames) > 1:
            owned = pd.concat([f[[key]].drop_duplicates().assign(_run=i) for i, f in enumerate(frames)])
            dup = owned[owned.duplicated(key, keep=False)]
            if len(dup):
                raise RunError(f"table {name}: {dup[key].nunique()} {key}s appear in more than one run "
                               f"(e.g. {dup[key].iloc[0]!r}); were the shards overlapping?")
        merged[name] = _sorted(frame, [key] if key in frame.columns else None)
    out.mkdir(parents=True, exist_ok=True)
    owner = object()
    if not locked:
        hold_lock(out, owner)
    try:
        for p in out.glob("*.parquet"):
            if p.stem not in merged:
                p.unlink()  # a table of the run --overwrite replaces
        for name, frame in merged.items():
            tmp = out / f".{name}.parquet.tmp"
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, out / f"{name}.parquet")
        merged_cfg = dict(configs[0], merged_from=[str(d.resolve()) for d in run_dirs], created=now())
        merged_cfg["args"] = dict(merged_cfg.get("args", {}), shard=None)
        atomic_write_text(out / "config.json", json.dumps(merged_cfg, indent=2))
        atomic_write_text(out / "status.json", json.dumps({"complete": True, "finished": now()}, indent=2))
        counts = {name: len(frame) for name, frame in merged.items()}
        with open(out / "log.txt", "a") as f:
            f.write(f"{now()} merged {len(run_dirs)} runs: {counts}\n")
            if summaries:
                f.write(f"{now()} not merged (per-shard summaries without {key}; recompute them from the merged "
                        f"tables): {sorted(summaries)}\n")
    finally:
        if not locked:
            release_lock(out, owner)
    return counts


def _key(k: Any) -> Any:
    """A key as it reads back from the manifest's JSON (tuples become lists, then tuples again)."""
    return tuple(_key(x) for x in k) if isinstance(k, list | tuple) else k


def _chunk_name(keys: Sequence) -> str:
    return hashlib.sha256(json.dumps(sorted(jsonable(keys), key=str)).encode()).hexdigest()[:24]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sorted(frame: pd.DataFrame, sort_by: Sequence[str] | None) -> pd.DataFrame:
    if sort_by:
        frame = frame.sort_values(list(sort_by), kind="stable").reset_index(drop=True)
    return frame


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
