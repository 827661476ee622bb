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
    good = CliRunner().invoke(main, ["lens", "--out", str(out), "--limit", "2", "--device", "cpu", "--sites", "resid"])
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
    frame = run_lens(model, [q], sites=["resid"], progress=False)
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
