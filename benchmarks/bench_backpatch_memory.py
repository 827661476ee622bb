"""Peak memory and time of ``run_backpatch`` at a 128k vocabulary: this tree vs an earlier commit (issue 19).

Before, ``run_backpatch`` held every (s, t) pair's last-position logits, ``[pairs, rows, vocab]`` fp32 per
position, and the one-pass sweep read all of them out at once; now ``backpatch_scores`` reads out and scores
``READOUT_CHUNK_BYTES`` of logits at a time. Each measurement runs in a fresh process (``--before``'s tree exported
with ``git archive``, or this tree) on the same saved model and queries, alternating, ``--repeats`` rounds; the
process runs ``run_backpatch`` once as a warm-up (fast-path verdicts, captures), then measures the second run:
anonymous-memory growth (RssAnon sampled every ms, ``MALLOC_MMAP_THRESHOLD_`` so freed blocks leave at once)
and wall time. Medians are printed; the tables of both runs are compared. Then (``--time-repeats``) the times in
one process: the earlier commit's ``backpatch.py`` loaded as a module of its own over this tree (whose changes
to ``partial_forward`` / ``variant_tokens`` only add an argument) and this tree's, alternating on one model, so
process start-up and loading do not blur the comparison on a shared machine.

    python benchmarks/bench_backpatch_memory.py --before d1ae688 [--layers 12 --d-model 512 --queries 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from common import random_queries
from real_shapes import anon_bytes, peak_anon
from mhop_lens.analyses.backpatch import all_pairs, run_backpatch
from mhop_lens.models import load_model
torch.set_num_threads(int(sys.argv[5]))
model = load_model(sys.argv[1], device="cpu")
queries = random_queries(model, int(sys.argv[3]))
positions = sys.argv[4].split(",")
def go():
    return run_backpatch(model, queries, positions=positions, batch_size=len(queries), progress=False)
go()
t0 = time.perf_counter()
frame, peak, start = peak_anon(go)
seconds = time.perf_counter() - t0
print(json.dumps({"growth": peak - start, "seconds": seconds, "path": frame.attrs["path"],
                  "pairs": len(all_pairs(model.cfg.n_layers)), "rows": 2 * len(queries),
                  "vocab": model.cfg.d_vocab, "rank": frame["rank"].tolist(), "prob": frame["prob"].tolist()}))
"""


TIMES = """
import importlib.util, json, statistics, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from common import random_queries
from mhop_lens.analyses import backpatch
from mhop_lens.models import load_model
spec = importlib.util.spec_from_file_location("backpatch_before", sys.argv[6])
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)
torch.set_num_threads(int(sys.argv[5]))
model = load_model(sys.argv[1], device="cpu")
queries = random_queries(model, int(sys.argv[3]))
positions = sys.argv[4].split(",")
runs = {"before": before.run_backpatch, "after": backpatch.run_backpatch}
times = {name: [] for name in runs}
for r in range(int(sys.argv[7]) + 1):
    for name, run in runs.items():
        t0 = time.perf_counter()
        run(model, queries, positions=positions, batch_size=len(queries), progress=False)
        if r:  # the first round warms up
            times[name].append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def model_dir(layers: int, d_model: int) -> Path:
    """A saved random Llama model with Llama-3's vocabulary (128,256) and GQA, of ``layers`` x ``d_model``."""
    from common import CACHE

    from mhop_lens.tiny_models import save_shaped_model

    path = CACHE / f"llama-v128k-L{layers}-d{d_model}"
    if not (path / "config.json").is_file():
        shape = dict(arch="llama", vocab_size=128_256, n_layers=layers, d_model=d_model, n_heads=d_model // 64,
                     n_kv_heads=max(1, d_model // 256), d_mlp=int(3.5 * d_model), n_ctx=512)
        save_shaped_model(path, shape)
    return path


def export(rev: str, into: Path) -> Path:
    """The source tree of commit ``rev`` under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure(tree: Path, path: Path, queries: int, positions: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "MALLOC_MMAP_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(ROOT / "benchmarks"), str(queries), positions,
                          str(threads)], capture_output=True, text=True, env=env, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="d1ae688", help="commit to compare with (default: before issue 19's "
                                                             "chunked scoring)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--positions", default="t1,last", help="one run over these (the CLI's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-repeats", type=int, default=5, help="in-process alternating timing rounds (0: skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    path = model_dir(args.layers, args.d_model)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": export(args.before, Path(tmp)), "after": ROOT}
        got: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():
                got[name].append(measure(tree, path, args.queries, args.positions, args.threads))
        times = in_process_times(trees["before"], path, args) if args.time_repeats else None
    first = got["after"][0]
    logits = first["pairs"] * first["rows"] * first["vocab"] * 4 / 2**20
    print(f"run_backpatch, positions {args.positions}: {first['pairs']} pairs x {first['rows']} rows (self + "
          f"shuffled donors) x vocab {first['vocab']:,} (d_model {args.d_model}, {args.layers} layers, "
          f"{args.threads} thread(s)); one position's logits = {logits:.0f} MiB fp32; medians of {args.repeats} "
          "alternating fresh processes")
    for name, runs in got.items():
        growth = statistics.median(r["growth"] for r in runs) / 2**20
        seconds = statistics.median(r["seconds"] for r in runs)
        each = ", ".join(f"{r['seconds']:.2f}" for r in runs)
        print(f"  {name:<7} ({runs[0]['path']}): peak anon growth {growth:8.1f} MiB  run {seconds:7.2f} s  "
              f"(each: {each} s)")
    before, after = got["before"][-1], got["after"][-1]
    dprob = max(abs(a - b) for a, b in zip(before["prob"], after["prob"], strict=True))
    print(f"  tables: ranks equal {before['rank'] == after['rank']}, largest |prob difference| {dprob:.2g}")
    if times:
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"  one process, {args.time_repeats} alternating rounds after a warm-up: " + "; ".join(
            f"{name} median {median[name]:.2f} s ({', '.join(f'{x:.2f}' for x in t)})" for name, t in times.items())
              + f"; after / before = {median['after'] / median['before']:.3f}")


def in_process_times(before_tree: Path, path: Path, args) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", TIMES, str(path), str(ROOT / "benchmarks"), str(args.queries),
                          args.positions, str(args.threads), str(before_tree / "mhop_lens/analyses/backpatch.py"),
                          str(args.time_repeats)], capture_output=True, text=True, env=env, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])

if __name__ == "__main__":
    main()
