"""The bad-input corpus of issues 9 and 14: every way a user can hand the suite a broken input, and the error it
must give.

Each ``Case`` provokes one bad input through the library (``lib``) and/or the CLI (``cli``: the click command and
its argv; files are written to the test's tmp dir). ``error`` is the library exception type, ``match`` a regex
the message must match; it names the fix. CLI cases must exit with ``exit_code`` (1; 2 for an option value click
rejects before anything runs) with that message on one ``Error:`` line and no traceback.
"""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhop_lens import errors, hooks, positions, tokens
from mhop_lens.cli.gar import load_examples
from mhop_lens.data import FIXTURE_CSV, build_query, load_queries
from mhop_lens.gar.published import GarFormatError, load_published
from mhop_lens.runs import RunError, RunStore


@dataclass(frozen=True)
class Env:
    """What a case may use: the tmp dir, the organism, a tiny GPT-2 and its directory."""

    tmp: Path
    organism: Any
    gpt2: Any
    gpt2_dir: str


@dataclass(frozen=True)
class Case:
    name: str
    error: type[Exception]
    match: str
    lib: Callable[[Env], Any] | None = None
    cli: Callable[[Env], tuple[str, list[str]]] | None = None  # (verb, argv) of `mhop-lens`
    exit_code: int = 1


# inputs ----------------------------------------------------------------------------------------------------------
def fixture_rows() -> tuple[list[str], list[list[str]]]:
    with open(FIXTURE_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:4]


def write_csv(env: Env, edit: Callable[[list[str], list[list[str]]], None] | None = None, name="data.csv") -> str:
    """The first three fixture rows, edited in place by ``edit(header, rows)``."""
    header, rows = fixture_rows()
    if edit:
        edit(header, rows)
    path = env.tmp / name
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return str(path)


def _set(column: str, value: str, row: int = 1):
    def edit(header, rows):
        rows[row][header.index(column)] = value

    return edit


def short_row_csv(env):
    return write_csv(env, lambda h, rows: rows[1].pop(), "short.csv")


def str_aliases_csv(env):
    return write_csv(env, _set("e3_aliases", "'Lennon'"), "aliases.csv")


def absent_entity_csv(env):
    return write_csv(env, _set("source_prompt", "the spouse of the performer of Hamlet is"), "absent.csv")


def empty_csv(env):
    return write_csv(env, lambda h, rows: rows.clear(), "empty.csv")


def long_prompt_csv(env):
    """A valid row whose prompt (a long preamble + the query) exceeds the tiny models' 128-token context."""
    def edit(header, rows):
        i = header.index("source_prompt")
        rows[0][i] = "Read this carefully. " * 60 + rows[0][i]
        del rows[1:]

    return write_csv(env, edit, "long.csv")


def empty_dir(env):
    path = env.tmp / "not-a-model"
    path.mkdir(exist_ok=True)
    (path / "notes.txt").write_text("no model here")
    return str(path)


def weightless_dir(env):
    path = env.tmp / "weightless"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(path)


def broken_gar(env):
    """One published-format line whose K' token span has starts and ends of different lengths."""
    rec = {"task_id": "rlr_gen[genders_of_persons.TreeSet.equal,countries_of_cities.TreeSet.equal][cxt_len=3]",
           "texts": "< Anna likes Paris. Tom likes Rome. Eve likes Oslo. >. So Eve wants to go to Oslo\n"
                    " < Anna likes Lima. Tom likes Rome. Eve likes Kyiv. >. So Tom wants to go to Rome\n",
           "ranges": [{"K": [20, 21], "V": [22, 23], "K'": [[2, 10], [3, 11]], "V'": [[4, 12], [5, 13]], "R": None},
                      {"K": [40, 41], "V": [42, 43], "K'": [[32], [33, 51]], "V'": [[34, 52], [35, 53]],
                       "R": None}]}
    path = env.tmp / "gar.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return str(path)


def empty_alias_csv(env):
    return write_csv(env, _set("e3_aliases", "['Ono', '']"), "empty-alias.csv")


def e2_is_e3_csv(env):
    def edit(header, rows):
        rows[1][header.index("e3_label")] = rows[1][header.index("e2_label")]

    return write_csv(env, edit, "e2-is-e3.csv")


def latin1_csv(env):
    path = Path(write_csv(env, _set("e3_aliases", "['Yoko Onó']"), "latin1.csv"))
    path.write_bytes(path.read_text(encoding="utf-8").encode("latin-1"))
    return str(path)


def oversized_field_csv(env):
    """An unclosed quote: the rest of the file (here 200,000 characters) becomes one field."""
    path = Path(write_csv(env, name="oversized.csv"))
    path.write_text(path.read_text(encoding="utf-8") + '"' + "x" * 200_000 + "\n", encoding="utf-8")
    return str(path)


def _model_copy(env, name: str) -> Path:
    path = env.tmp / name
    shutil.copytree(env.gpt2_dir, path, dirs_exist_ok=True)
    return path


def truncated_weights(env):
    path = _model_copy(env, "truncated")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return str(path)


class _RunsCode:
    """Unpickling this runs ``touch`` on the marker file (what a crafted pytorch_model.bin would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


def crafted_pickle_weights(env):
    path = _model_copy(env, "pickled")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"transformer.wte.weight": _RunsCode(env.tmp / "RAN")}))
    return str(path)


def _load_crafted(env):
    try:
        return _load(crafted_pickle_weights(env))
    finally:
        assert not (env.tmp / "RAN").exists(), "the crafted pickle ran code"


def config_dir(env, text: str, name: str):
    path = _model_copy(env, name)
    (path / "config.json").write_text(text)
    return str(path)


def no_gpu_device() -> str:
    """A CUDA device this machine does not have ('cuda' on a CPU-only machine)."""
    import torch

    return "cuda:99" if torch.cuda.is_available() else "cuda"


def gar_line(task_id: str, texts: str, ranges: list) -> str:
    return json.dumps({"task_id": task_id, "texts": texts, "ranges": ranges}) + "\n"


def gar_file(env, text: str | bytes, name: str) -> str:
    path = env.tmp / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def gar_without_period(env):
    rec = json.loads(Path(broken_gar(env)).read_text())
    rec["task_id"] = rec["task_id"].replace("genders_of_persons.TreeSet.equal", "genders_of_persons")
    return gar_file(env, json.dumps(rec) + "\n", "no-period.jsonl")


def gar_48_items(env):
    """A crafted line: 48 context items whose names hold ". " (95 candidate boundaries: C(95, 47) ~ 1e27 splits
    for an exhaustive splitter); its token spans do not match, so it must fail fast with the line number."""
    items = " ".join(f"Dr. N{i} likes Mt. P{i}." for i in range(48))
    task = "rlr_gen[genders_of_persons.TreeSet.equal,countries_of_cities.TreeSet.equal][cxt_len=48]"
    texts = f"< {items} >. So N3 wants to go to P3\n"
    return gar_file(env, gar_line(task, texts, [{"K": [2, 3], "V": [4, 5], "K'": [[6], [7]], "V'": [[8], [9]],
                                                 "R": None}]), "gar48.jsonl")


def gar_latin1(env):
    return gar_file(env, Path(broken_gar(env)).read_text().replace("Oslo", "Tromsø").encode("latin-1"), "l1.jsonl")


def gar_argv(env, data: str, *extra: str) -> tuple[str, list[str]]:
    return "gar evaluate", ["--model", "organism", "--data", data, "--out", str(env.tmp / "out"), "--device", "cpu",
                            *extra]


def eval_argv(env, *extra: str, model: str | None = None, data: str | None = None) -> tuple[str, list[str]]:
    return "evaluate", ["--model", model or env.gpt2_dir, "--data", data or str(FIXTURE_CSV), "--out",
                        str(env.tmp / "out"), "--limit", "2", "--device", "cpu", *extra]


def unwritable_out(env):
    blocker = env.tmp / "a-file"
    blocker.write_text("x")
    return str(blocker / "run")


def lens_argv(env, *extra: str, data: str = "organism", model: str = "organism") -> tuple[str, list[str]]:
    out = str(env.tmp / "out")
    return "lens", ["--model", model, "--data", data, "--out", out, "--limit", "2", "--device", "cpu", *extra]


# library calls ---------------------------------------------------------------------------------------------------
def _load(name):
    from mhop_lens.models import load_model

    return load_model(name, device="cpu")


def _read_csv(make):
    return lambda env: load_queries(make(env))


def _hook_typo_run(env):
    from mhop_lens.forward import run
    from mhop_lens.tokens import encode

    return run(env.organism, encode(env.organism, "Mokar 's spouse"), [("blocks.0.hook_resid_psot", lambda a, hook: a)])


def _hook_typo_cache(env):
    from mhop_lens.forward import run_with_cache
    from mhop_lens.tokens import encode

    return run_with_cache(env.organism, encode(env.organism, "Mokar 's spouse"), ["blocks.1.attn.hook_patern"])


def _str_aliases(env):
    return build_query("q", "Imagine", "performer", "John Lennon", "spouse", "Yoko Ono", "the performer of {}",
                       "the spouse of {}", e2_aliases="Lennon")


def _run_lens_empty(env):
    from mhop_lens.analyses.lens import run_lens

    return run_lens(env.organism, [], progress=False)


def _empty_alias(env):
    return build_query("q", "Imagine", "performer", "John Lennon", "spouse", "Yoko Ono", "the performer of {}",
                       "the spouse of {}", e3_aliases=["Ono", " "])


def _run_knockout_empty(env):
    from mhop_lens.analyses.knockout import run_knockout

    return run_knockout(env.organism, [], progress=False)


CASES = [
    Case("unknown model name", errors.ModelLoadError, r"not cached here.*huggingface-cli download",
         lib=lambda env: _load("no-such-org/no-such-model"),
         cli=lambda env: lens_argv(env, model="no-such-org/no-such-model")),
    Case("directory that is not a model", errors.ModelLoadError, r"no config\.json.*save_pretrained",
         lib=lambda env: _load(empty_dir(env)), cli=lambda env: lens_argv(env, model=empty_dir(env))),
    Case("model directory without weights", errors.ModelLoadError, r"model\.safetensors.*saved with save_pretrained",
         lib=lambda env: _load(weightless_dir(env)), cli=lambda env: lens_argv(env, model=weightless_dir(env))),
    Case("malformed CSV row", errors.DataError, r"1 malformed row \(row 1: has 23 fields but the header has 24.*"
         r"Fix these rows", lib=_read_csv(short_row_csv), cli=lambda env: lens_argv(env, data=short_row_csv(env))),
    Case("aliases that are not a list (CSV)", errors.DataError, r"row 1: e3_aliases must be a list of strings",
         lib=_read_csv(str_aliases_csv), cli=lambda env: lens_argv(env, data=str_aliases_csv(env))),
    Case("aliases that are not a list (library)", errors.DataError,
         r"e2_aliases must be a list of strings.*\['Lennon'\]", lib=_str_aliases),
    Case("entity absent from its prompt (CSV)", errors.DataError, r"does not contain the composed phrase.*fix the "
         r"templates or the prompt", lib=_read_csv(absent_entity_csv),
         cli=lambda env: lens_argv(env, data=absent_entity_csv(env))),
    Case("entity absent from its prompt (span)", errors.SpanError, r"'Tilu' does not occur.*pass the span",
         lib=lambda env: positions.find_span("Mokar 's spouse", "Tilu")),
    Case("entity that is several tokens where one is needed", errors.SpanError,
         r"is \d+ tokens.*needs one token.*first token", lib=lambda env: tokens.single_token_id(env.gpt2, " Yoko Ono")),
    Case("entity outside a word-level vocabulary", errors.SpanError,
         r"outside this model's vocabulary.*--data organism",
         lib=lambda env: tokens.first_token_id(env.organism, " Yoko Ono"),
         cli=lambda env: lens_argv(env, data=str(FIXTURE_CSV))),
    Case("hook-name typo (validate)", errors.HookNameError, r"Did you mean 'blocks\.0\.hook_resid_post'",
         lib=lambda env: hooks.validate(env.organism, "blocks.0.hook_resid_psot")),
    Case("hook-name typo (fwd_hooks)", errors.HookNameError, r"hook_resid_psot.*Did you mean", lib=_hook_typo_run),
    Case("hook-name typo (cache names)", errors.HookNameError, r"hook_patern.*Did you mean", lib=_hook_typo_cache),
    Case("layer out of range", errors.HookNameError, r"layer 9 is out of range.*0\.\.3",
         lib=lambda env: hooks.check_layer(env.organism, 9)),
    Case("lens site typo", errors.DataError, r"unknown lens site\(s\) \['atn_out'\]; choose from",
         cli=lambda env: lens_argv(env, "--sites", "resid,atn_out")),
    Case("knockout edge typo", errors.DataError, r"an edge looks like 'QUERY->KEY'",
         cli=lambda env: ("knockout", [*lens_argv(env)[1], "--edges", "last-e1"])),
    Case("prompt longer than the context", errors.PromptTooLongError, r"128 tokens: shorten it",
         lib=lambda env: tokens.encode(env.gpt2, "Read this carefully. " * 60),
         cli=lambda env: lens_argv(env, data=long_prompt_csv(env), model=env.gpt2_dir)),
    Case("empty dataset (CSV)", errors.DataError, r"gave no queries.*check the split name, raise --limit",
         lib=_read_csv(empty_csv), cli=lambda env: lens_argv(env, data=empty_csv(env))),
    Case("empty dataset (run_lens)", errors.DataError, r"no queries for the lens; check --data", lib=_run_lens_empty),
    Case("empty dataset (run_knockout)", errors.DataError, r"no queries to knock out; check --data",
         lib=_run_knockout_empty),
    Case("empty dataset (encode)", errors.SpanError, r"dataset is empty.*check --limit",
         lib=lambda env: tokens.encode(env.organism, [])),
    Case("shard out of range", RunError, r"--shard 2/2: need 0 <= i < n",
         lib=lambda env: load_queries("organism", shard="2/2"),
         cli=lambda env: lens_argv(env, "--shard", "2/2")),
    Case("GAR line with a broken span", GarFormatError, r"line 1: .*malformed token span.*want \[start, end\]",
         lib=lambda env: load_published(broken_gar(env)),
         cli=lambda env: ("gar evaluate", ["--model", "organism", "--data", broken_gar(env), "--out",
                                           str(env.tmp / "out"), "--device", "cpu"])),
    Case("unwritable --out", RunError, r"cannot write to --out .*Choose a directory you can write to",
         lib=lambda env: RunStore(unwritable_out(env), "lens", {}),
         cli=lambda env: ("lens", [*lens_argv(env)[1], "--out", unwritable_out(env)])),
    # issue 14: silent wrong answers become errors naming the row
    Case("empty alias (CSV)", errors.DataError, r"row 1: e3_aliases \['Ono', ''\] holds an empty alias",
         lib=_read_csv(empty_alias_csv), cli=lambda env: lens_argv(env, data=empty_alias_csv(env))),
    Case("empty alias (library)", errors.DataError, r"query q: e3_aliases .* holds an empty alias", lib=_empty_alias),
    Case("e2 equal to e3", errors.DataError, r"row 1: e2 and e3 are both 'Bill Gates'", lib=_read_csv(e2_is_e3_csv),
         cli=lambda env: eval_argv(env, data=e2_is_e3_csv(env))),
    Case("crafted GAR line with 48 context items", GarFormatError, r"line 1: .*token spans .* do not match 48",
         lib=lambda env: load_published(gar_48_items(env)), cli=lambda env: gar_argv(env, gar_48_items(env))),
    Case("GAR examples with limit -1", errors.DataError, r"--limit must be at least 1, not -1",
         lib=lambda env: load_examples("organism-gar", -1)),
    Case("gar evaluate --limit -1", errors.DataError, r"--limit.*-1 is not in the range x>=1",
         cli=lambda env: gar_argv(env, "organism-gar", "--limit", "-1"), exit_code=2),
    # issue 14: faults that ended in a traceback
    Case("Latin-1 CSV", errors.DataError, r"latin1\.csv is not UTF-8 text \(byte b'\\xf3' on line 3\).*iconv",
         lib=_read_csv(latin1_csv), cli=lambda env: eval_argv(env, data=latin1_csv(env))),
    Case("oversized CSV field", errors.DataError, r"line 5: not valid CSV \(field larger than field limit.*unclosed "
         r"quote", lib=_read_csv(oversized_field_csv), cli=lambda env: eval_argv(env, data=oversized_field_csv(env))),
    Case("truncated safetensors", errors.ModelLoadError, r"could not load the weights .*truncated or corrupt",
         lib=lambda env: _load(truncated_weights(env)), cli=lambda env: eval_argv(env, model=truncated_weights(env))),
    Case("pickle weights that would run code", errors.ModelLoadError, r"objects other than tensors, which are never "
         r"unpickled", lib=_load_crafted, cli=lambda env: eval_argv(env, model=crafted_pickle_weights(env))),
    Case("--device cuda without a GPU", errors.ModelLoadError, r"sees no CUDA GPU|has \d+ CUDA GPU",
         lib=lambda env: _load_device(env, no_gpu_device()),
         cli=lambda env: eval_argv(env, "--device", no_gpu_device()), exit_code=2),
    Case("--device foo", errors.ModelLoadError, r"device 'foo' is not a torch device; use cpu, cuda",
         lib=lambda env: _load_device(env, "foo"), cli=lambda env: eval_argv(env, "--device", "foo"), exit_code=2),
    Case("--batch-size 0", errors.MhopLensError, r"--batch-size.*0 is not in the range x>=1",
         cli=lambda env: eval_argv(env, "--batch-size", "0"), exit_code=2),
    Case("--top-k 0", errors.MhopLensError, r"--top-k.*0 is not in the range x>=1",
         cli=lambda env: lens_argv(env, "--top-k", "0"), exit_code=2),
    Case("--top-k past the vocabulary", errors.MhopLensError, r"--top-k 1000000 exceeds this model's vocabulary",
         cli=lambda env: lens_argv(env, "--top-k", "1000000")),
    Case("--max-new-tokens 0", errors.MhopLensError, r"--max-new-tokens.*0 is not in the range x>=1",
         cli=lambda env: eval_argv(env, "--scorer", "gen", "--max-new-tokens", "0"), exit_code=2),
    Case("--max-new-tokens past the context", errors.MhopLensError, r"--max-new-tokens 500 does not fit: .* context "
         r"is 128", cli=lambda env: eval_argv(env, "--scorer", "gen", "--max-new-tokens", "500")),
    Case("--max-new-tokens past the context (describe)", errors.MhopLensError, r"--max-new-tokens 500 does not fit",
         cli=lambda env: ("describe", [*eval_argv(env)[1], "--max-new-tokens", "500", "--decoder", "generate"])),
    Case("empty config.json", errors.ModelLoadError, r"config\.json is not valid JSON",
         lib=lambda env: _load(config_dir(env, "", "empty-config")),
         cli=lambda env: eval_argv(env, model=config_dir(env, "", "empty-config"))),
    Case("non-object config.json", errors.ModelLoadError, r"config\.json holds a JSON list, not an object",
         lib=lambda env: _load(config_dir(env, "[1, 2]", "list-config")),
         cli=lambda env: eval_argv(env, model=config_dir(env, "[1, 2]", "list-config"))),
    Case("empty GAR file", errors.DataError, r"holds no GAR examples: it has no lines",
         lib=lambda env: load_published(gar_file(env, "", "empty.jsonl")),
         cli=lambda env: gar_argv(env, gar_file(env, "\n", "empty.jsonl"))),
    Case("GAR relation without a period", GarFormatError, r"line 1: .*relation 'genders_of_persons' has no '\.TYPE'",
         lib=lambda env: load_published(gar_without_period(env)),
         cli=lambda env: gar_argv(env, gar_without_period(env))),
    Case("Latin-1 GAR file", errors.DataError, r"l1\.jsonl is not UTF-8 text \(byte b'\\xf8' on line 1\)",
         lib=lambda env: load_published(gar_latin1(env)), cli=lambda env: gar_argv(env, gar_latin1(env))),
    Case("organism info --path on another directory", errors.MhopLensError, r"holds no metrics\.json, so it is not "
         r"a directory written by `mhop-lens organism train",
         cli=lambda env: ("organism info", ["--path", env.gpt2_dir])),
    Case("organism-gar info on the two-hop organism", errors.MhopLensError, r"is not the metrics of a `mhop-lens "
         r"organism-gar train` run", cli=lambda env: ("organism-gar info", ["--path", _organism_dir()])),
    # issue 18: one unknown-word policy; --limit messages say how many rows are needed
    Case("words outside the vocabulary (evaluate)", errors.DataError, r"12 of 12 queries have words outside this "
         r"model's vocabulary .*--data organism",
         cli=lambda env: eval_argv(env, "--limit", "12", model="organism", data=str(FIXTURE_CSV))),
    Case("patch --limit too small", errors.MhopLensError, r"--limit 20 is too small: .*no counterfactual pair.*pass "
         r"--limit \d+ or more", cli=lambda env: ("patch", [*lens_argv(env)[1], "--limit", "20"])),
    Case("AtP*-only option without --method atp-star", errors.DataError, r"--no-grad-drop applies only to --method "
         r"atp-star \(this run's method is atp\); add --method atp-star or drop it",
         cli=lambda env: ("attribute", ["--data", "organism-gar", "--no-grad-drop", "--out", str(env.tmp / "out"),
                                        "--device", "cpu"])),
    Case("attribute --method atp-star --per-span", errors.DataError, r"atp-star scores whole nodes; drop --per-span",
         cli=lambda env: ("attribute", ["--data", "organism-gar", "--method", "atp-star", "--per-span", "--out",
                                        str(env.tmp / "out"), "--device", "cpu"])),
    Case("attribute --limit too small on built-in data", errors.MhopLensError, r"--limit 20 is too small: the first "
         r"20 rows of --data 'organism-gar' have no Yes/No counter-pair.*pass --limit \d+ or more",
         cli=lambda env: ("attribute", ["--data", "organism-gar", "--limit", "20", "--out", str(env.tmp / "out"),
                                        "--device", "cpu"])),
]


def _load_device(env, device: str):
    from mhop_lens.models import load_model

    return load_model(env.gpt2_dir, device=device)


def _organism_dir() -> str:
    from mhop_lens.models import builtin_dir

    return str(builtin_dir("organism"))
