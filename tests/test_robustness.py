"""Issue 9: every bad input of the corpus (``bad_inputs.py``) gives one clear error naming the fix, and hooks never
outlive an exception."""

from __future__ import annotations

import re

import pytest
import torch
from bad_inputs import CASES, Env, short_row_csv
from click.testing import CliRunner

from mhop_lens.cli import main
from mhop_lens.errors import MhopLensError

LIB = [c for c in CASES if c.lib]
CLI = [c for c in CASES if c.cli]


@pytest.fixture
def env(tmp_path, organism, tiny_models, tiny_dirs) -> Env:
    return Env(tmp_path, organism, tiny_models["gpt2"], tiny_dirs["gpt2"])


@pytest.mark.parametrize("case", LIB, ids=[c.name for c in LIB])
def test_library_error_names_the_fix(case, env):
    with pytest.raises(case.error, match=case.match) as info:
        case.lib(env)
    assert isinstance(info.value, MhopLensError)


@pytest.mark.parametrize("case", CLI, ids=[c.name for c in CLI])
def test_cli_error_is_one_clean_line(case, env):
    verb, argv = case.cli(env)
    result = CliRunner().invoke(main, [*verb.split(), *argv])
    assert result.exit_code == case.exit_code, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert re.search(case.match, line), result.output


@pytest.mark.parametrize("verb", ["evaluate", "lens", "backpatch"])
def test_skipped_rows_are_counted(env, verb):
    """The documented alternative to the malformed-row error (every sweep verb): skip, say which rows, how many."""
    from mhop_lens.data import load_queries

    queries = load_queries(short_row_csv(env), on_error="skip")
    assert len(queries) == 2 and [i.row_id for i in queries.issues] == ["1"]
    out = env.tmp / f"skip-{verb}"
    result = CliRunner().invoke(main, [verb, "--model", env.gpt2_dir, "--data", short_row_csv(env), "--out",
                                       str(out), "--on-error", "skip", "--device", "cpu"])
    assert result.exit_code == 0 and "skipped 1 malformed row (row 1:" in result.output, result.output
    assert "skipped" in (out / "log.txt").read_text()


def test_failed_setup_leaves_no_run_directory(env):
    """A bad --data fails before --out is created, so the corrected command needs no --resume."""
    out = env.tmp / "out"
    bad = CliRunner().invoke(main, ["lens", "--data", str(env.tmp / "missing.csv"), "--out", str(out), "--limit", "2"])
    assert bad.exit_code == 1 and "does not exist" in bad.output and not out.exists()
    good = CliRunner().invoke(main, ["lens", "--out", str(out), "--limit", "2", "--device", "cpu",
                                     "--sites", "resid_post"])
    assert good.exit_code == 0, good.output


def _no_hooks_left(model) -> bool:
    return all(not hp._forward_hooks and not hp._forward_pre_hooks and not hp._backward_hooks
               for hp in model.hook_dict.values())


def test_hooks_are_removed_after_an_exception_inside_a_sweep(organism, tmp_path, monkeypatch):
    """A hook that raises mid-forward in chunk 2 of a knockout sweep: no hook survives, clean logits are a fresh
    model's, and the finished chunk is kept for --resume."""
    from mhop_lens.analyses import knockout
    from mhop_lens.data import load_queries
    from mhop_lens.forward import run
    from mhop_lens.models import load_model
    from mhop_lens.runs import RunStore
    from mhop_lens.tokens import encode

    queries = load_queries("organism", limit=4)
    enc = encode(organism, [q.prompt for q in queries])
    chunks, calls = [], []
    original = knockout.block_attention

    def flaky(edges, heads=None):
        inner = original(edges, heads)

        def hook(scores, hook=None):
            calls.append(len(chunks))
            if len(chunks) == 2:
                raise RuntimeError("CUDA error: device-side assert (simulated)")
            return inner(scores, hook)

        return hook

    def compute(chunk):
        chunks.append(chunk)
        return knockout.run_knockout(organism, chunk, edges=["last->e1"], window=0, batch_size=2, progress=False)

    monkeypatch.setattr(knockout, "block_attention", flaky)
    store = RunStore(tmp_path / "run", "knockout", {})
    with pytest.raises(RuntimeError, match="simulated"):
        store.sweep("knockout", queries, compute, key=lambda q: q.id, chunk_size=2)
    assert calls[-1] == 2 and _no_hooks_left(organism)
    assert store.done_keys("knockout") == {q.id for q in queries[:2]}

    with pytest.raises(KeyboardInterrupt):
        run(organism, enc, [("blocks.1.hook_resid_post", lambda a, hook: (_ for _ in ()).throw(KeyboardInterrupt))])
    assert _no_hooks_left(organism)
    fresh = load_model("organism", device="cpu")
    torch.testing.assert_close(run(organism, enc), run(fresh, enc), rtol=0, atol=0)


def test_multi_token_answers_are_handled_as_documented(tiny_models):
    """The lens ranks an entity's first token; the log-prob scorer scores every token of the answer."""
    from _hopping import tiny_queries

    from mhop_lens.analyses.lens import ranks, run_lens
    from mhop_lens.evaluate import score_answers
    from mhop_lens.forward import last_logits, run
    from mhop_lens.tokens import encode, first_token_id

    model = tiny_models["gpt2"]
    q = next(q for q in tiny_queries() if len(model.tokenizer(" " + q.e3, add_special_tokens=False)["input_ids"]) > 1)
    frame = run_lens(model, [q], sites=["resid_post"], progress=False)
    last = frame[frame["layer"] == model.cfg.n_layers - 1].iloc[0]
    logits = last_logits(model, encode(model, q.prompt))
    first = torch.tensor([first_token_id(model, " " + q.e3)])
    assert last["e3_rank"] == int(ranks(logits, first)[0])

    answer = " " + q.e3
    score = score_answers(model, [(q.prompt, answer)])[(q.prompt, answer)]
    enc = encode(model, q.prompt + answer, padding_side="right")
    n_prompt = encode(model, q.prompt).tokens.shape[1]
    with torch.inference_mode():
        logprobs = run(model, enc)[0].float().log_softmax(-1)
    targets = enc.tokens[0, n_prompt:]
    expected = logprobs[torch.arange(n_prompt - 1, enc.tokens.shape[1] - 1), targets].sum()
    assert len(targets) > 1 and score.logprob == pytest.approx(float(expected), abs=1e-4)
    assert score.first_logprob == pytest.approx(float(logprobs[n_prompt - 1, targets[0]]), abs=1e-4)


def test_sentence_splitter_is_polynomial():
    """48 items whose names hold ". " give 95 candidate boundaries (C(95, 47) ~ 1e27 subsets): the split is found
    with at most m^2 pattern matches, and an ambiguous context is still reported as a tie."""
    import re as re_

    from mhop_lens.gar.published import _sentences

    class Counting:
        def __init__(self, pattern):
            self.pattern, self.calls = re_.compile(pattern), 0

        def fullmatch(self, *args):
            self.calls += 1
            return self.pattern.fullmatch(*args)

    text = " ".join(f"Dr. N{i} likes Mt. P{i}." for i in range(48))
    pattern = Counting(r"(?P<a>.+?) likes (?P<b>.+)")
    spans = _sentences(text, 48, pattern)
    assert [text[a:b] for (a, b), _ in spans] == [f"Dr. N{i}" for i in range(48)]
    assert [text[a:b] for _, (a, b) in spans] == [f"Mt. P{i}" for i in range(48)]
    assert pattern.calls <= text.count(". ") ** 2
    with pytest.raises(ValueError, match="more than one way"):
        _sentences("A likes B. C likes D. E likes F.", 2, re_.compile(r"(?P<a>.+?) likes (?P<b>.+)"))


def test_offline_hub_name_fails_without_retries(monkeypatch):
    """With the hub unreachable, a hub name that is not cached fails at once: the HF loader (which retries for
    ~30 s) is never called."""
    import time

    from huggingface_hub import constants
    from transformer_lens.model_bridge import TransformerBridge

    from mhop_lens import models
    from mhop_lens.errors import ModelLoadError

    probe = models.hub_reachable.__wrapped__  # uncached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert probe("https://hub.invalid", timeout=0.5) is False  # an endpoint that cannot resolve: no connection

    calls = []
    monkeypatch.setattr(TransformerBridge, "boot_transformers", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(models, "hub_reachable", lambda *a, **k: False)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="not cached here.*huggingface-cli download"):
        models.load_model("no-such-org/no-such-model", device="cpu")
    assert not calls and time.perf_counter() - start < 30


def test_unknown_words_one_policy(organism, tmp_path):
    """Unknown words: every verb refuses the same rows, or skips and counts them with --on-error skip."""
    from mhop_lens.data import FIXTURE_CSV, load_queries
    from mhop_lens.data.vocab import check_vocabulary
    from mhop_lens.errors import DataError

    mixed = [*load_queries("organism", limit=3), *load_queries(str(FIXTURE_CSV), limit=2)]
    kept = check_vocabulary(organism, mixed, "skip")
    assert [q.id for q in kept] == [q.id for q in mixed[:3]]
    assert [i.row_id for i in kept.issues] == ["0", "1"] and "Imagine" in kept.issues[0].problem
    with pytest.raises(DataError, match=r"2 of 5 queries have words outside this model's vocabulary"):
        check_vocabulary(organism, mixed)
    for verb in ("evaluate", "lens", "knockout"):
        res = CliRunner().invoke(main, [verb, "--data", str(FIXTURE_CSV), "--out", str(tmp_path / verb), "--device",
                                        "cpu", "--limit", "3"])
        assert res.exit_code == 1 and "3 of 3 queries have words outside" in res.output, res.output


def test_demo_exits_nonzero_after_writing_the_rest(tiny_dirs, tmp_path, monkeypatch):
    """A failing step: the other steps' tables, the figures and the report are written, the report marks the
    failure at its top, and the command exits 1 with one Error line."""
    import mhop_lens.demo as demo_module
    from mhop_lens.data import FIXTURE_CSV

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(demo_module, "_knockout", broken)
    out = tmp_path / "demo"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--model", tiny_dirs["gpt2"], "--data",
                                    str(FIXTURE_CSV), "--gar-model", tiny_dirs["gpt2"], "--quick", "--format", "html",
                                    "--threads", "1"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    (line,) = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert "attention knockout" in line
    assert {"evaluation", "lens", "backpatch"} <= {p.stem for p in out.glob("*.parquet")}
    assert not (out / "knockout.parquet").exists() and (out / "figures" / "lens_last.html").is_file()
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("> **FAILED: 1 step(s)**") and "attention knockout: RuntimeError" in report[4]


@pytest.mark.parametrize("argv", [
    ["lens", "--data", "FIXTURE", "--limit", "2"],
    ["patch", "--limit", "20"],
    ["attribute", "--data", "organism-gar", "--limit", "20"],
    ["gar", "evaluate", "--data", "EMPTY"],
    ["lens", "--limit", "2", "--sites", "resid_post,atn_out"],
    ["attribute", "--data", "organism-gar", "--limit", "40", "--sites", "z,resdi"],
], ids=["unknown words", "patch limit", "attribute limit", "empty GAR file", "lens site typo", "attribution site typo"])
def test_refused_data_leaves_no_run_directory(env, argv):
    """Data refused after the model is loaded (unknown words, too few rows for a pair) still writes nothing."""
    from mhop_lens.data import FIXTURE_CSV

    (env.tmp / "empty.jsonl").write_text("")
    argv = [{"FIXTURE": str(FIXTURE_CSV), "EMPTY": str(env.tmp / "empty.jsonl")}.get(a, a) for a in argv]
    out = env.tmp / "out"
    res = CliRunner().invoke(main, [*argv, "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 1 and "Error: " in res.output and not out.exists(), res.output
