"""Loader for the published GAR file (GAR_data.jsonl, 4,608 lines) -> :class:`GarExample`.

Each line holds ``task_id``, ``texts`` (an optional candidate-list header line, a solved demonstration row and
the test row, rows joined by "\\n ") and ``ranges`` (LLaMA token spans per row). Character spans are recovered
from the text by parsing the row grammar; the token spans are used only to tell which context item plays
which role (their order), never as positions. See docs/gar.md for the mapping.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

from mhop_lens.errors import DataError, not_utf8
from mhop_lens.gar.examples import GarExample
from mhop_lens.gar.relations import RELATIONS

DEFAULT_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gar" / "GAR_data.jsonl"
ROW_SEP = "\n "
CLS_HEAD = "Answer with Yes or No. Can it be inferred from the premise that "

_TASK_RE = re.compile(r"^(?P<g2c>g2c\[)?rlr_gen(?P<dc>\[dict_candidates=True\])?(?(g2c)\])"
                      r"\[(?P<r1>[^,\[\]]+),(?P<r2>[^,\[\]]+)\]\[cxt_len=(?P<n>\d+)(?P<rev>,rev_item2str)?\]$")
_PERSON_RELATIONS = {"genders_of_persons", "occupations_of_persons"}
_SURFACE_OF = {"countries_of_cities": "likes", "countries_of_landmarks": "likes", "kinds_of_things": "has",
               "capabilities_of_things": "has", "person_adjs": "is"}
# (regex for "person first" items, regex for the swapped key-value surface with the thing first)
_ITEM_RE = {"likes": (r"(?P<a>.+?) likes (?P<b>.+)", r"(?P<a>.+?) attracts (?P<b>.+)"),
            "has": (r"(?P<a>.+?) has (?P<b>.+)", r"(?:The )?(?P<a>.+) is (?P<b>.+)'s"),
            "is": (r"(?P<a>.+?) is (?P<b>.+)", r"(?P<a>\S+) (?P<b>.+)")}
_COPY_Q = {"likes": ("So {} likes", "So who likes {}?"), "has": ("So {} has", "So who has {}?"),
           "is": ("So {} is", "So who is {}?")}
_PREDICATES = {False: r"wants to go to|owns|has|is",
               True: r"(?:does|do) not want to go to|(?:does|do) not own|(?:does|do) not have|is not"}
_STMT_RE = {False: r"(?:So |In other words, )?(?P<Q>.+?) (?P<pred>{preds}) (?P<A>.+)",
            True: r"(?:So |In other words, )?(?:who|[Tt]he (?:one|person) who)(?:'s | (?:wants to go to|owns|has|is) )"
                  r"(?P<Q>.+?)(?P<pred>\? | is not | is )(?P<A>.+)"}
_ABBREV_RE = re.compile(r"(?:^|[\s.])(?:[A-Z]|Dr|Mr|Mrs|Ms|St|Mt|Jr|Sr)$")
_SINGULAR = {"boys": "boy", "girls": "girl"}


class GarFormatError(DataError):
    """A line of the published file does not have the expected shape; names the line and the problem."""

    def __init__(self, line_no: int, reason: str, path: str | Path = "GAR_data.jsonl"):
        self.line_no, self.reason = line_no, reason
        super().__init__(f"{path}: line {line_no}: {reason}")


def _relation(spec: str) -> tuple[str, str, bool]:
    """"occupations_Of_Persons.TreeSet.neg_child" -> ("occupations_of_persons", "child", negated)."""
    if "." not in spec:
        raise ValueError(f"relation {spec!r} has no '.TYPE' part (want e.g. 'genders_of_persons.TreeSet.equal')")
    name, rtype = spec.split(".")[0].lower(), spec.rsplit(".", 1)[1]
    negated = rtype.startswith("neg_")
    return name, rtype.removeprefix("neg_"), negated


def _token_spans(value, role: str) -> list[tuple[int, int]]:
    if value is None:
        return []
    if len(value) == 2 and all(isinstance(v, int) for v in value):
        return [tuple(value)]
    if len(value) == 2 and all(isinstance(v, list) for v in value) and len(value[0]) == len(value[1]):
        return list(zip(value[0], value[1], strict=True))
    raise ValueError(f"role {role!r} has a malformed token span {value!r} (want [start, end] or "
                     "[[starts], [ends]] of equal length)")


def _dedup(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Drop token spans that start where an earlier one starts (the file has a few such duplicates)."""
    seen: dict[int, tuple[int, int]] = {}
    for span in spans:
        seen.setdefault(span[0], span)
    return list(seen.values())


def _sentences(text: str, n: int, pattern: re.Pattern) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Split ``text`` into ``n`` "."-terminated sentences that all fit ``pattern``.

    Names and places contain ". " ("Dr. Michio Kaku", "Washington, D.C."), so every ". " is a candidate
    boundary; among the splits whose sentences all fit, the one with the fewest abbreviation-like boundaries
    wins (a tie is an error). Returns each sentence's two element spans.

    A dynamic programme over (boundary, sentences so far) keeps the cheapest split and how many splits reach that
    cost, so the work is polynomial (at most m^2 pattern matches for m candidate boundaries) instead of one try
    per subset of boundaries (~1e13 for a 48-item context).
    """
    if not text.endswith("."):
        raise ValueError(f"context {text!r} does not end with '.'")
    if n < 1:
        raise ValueError(f"a context needs at least one item, not {n}")
    bounds = [-2, *(m.start() for m in re.finditer(r"\. ", text)), len(text) - 1]
    last = len(bounds) - 1
    slack = last - n  # boundaries a split leaves out; one sentence can swallow at most this many
    if slack < 0:
        raise ValueError(f"context {text!r} has fewer than {n} sentences")
    matches: dict[tuple[int, int], re.Match | None] = {}

    def fits(i: int, j: int) -> re.Match | None:
        if (i, j) not in matches:
            matches[i, j] = pattern.fullmatch(text, bounds[i] + 2, bounds[j])
        return matches[i, j]

    abbrev = [j not in (0, last) and bool(_ABBREV_RE.search(text[:bounds[j]])) for j in range(last + 1)]
    # best[k][j] = (fewest abbreviation-like cuts, number of splits with that many (capped at 2), previous boundary)
    best: list[dict[int, tuple[int, int, int]]] = [{0: (0, 1, -1)}]
    for k in range(1, n + 1):
        layer: dict[int, tuple[int, int, int]] = {}
        for j in ([last] if k == n else range(k, min(k + slack, last - 1) + 1)):
            for i, (cost, count, _) in best[k - 1].items():
                if not i < j <= i + slack + 1 or not fits(i, j):
                    continue
                cost += abbrev[j]
                old = layer.get(j)
                if old is None or cost < old[0]:
                    layer[j] = (cost, count, i)
                elif cost == old[0]:
                    layer[j] = (cost, min(2, old[1] + count), old[2])
        best.append(layer)
    if last not in best[n]:
        raise ValueError(f"context {text!r} cannot be split into {n} items of the expected surface")
    if best[n][last][1] > 1:
        raise ValueError(f"context {text!r} splits into {n} items in more than one way")
    path, j = [], last
    for k in range(n, 0, -1):
        i = best[k][j][2]
        path.append(fits(i, j))
        j = i
    return [(m.span("a"), m.span("b")) for m in reversed(path)]


def _strip_category(phrase: str, relation: str, rtype: str) -> str:
    """"a city of Italy" -> "Italy", "the boy" -> "boy": drop the relation's phrase prefix (docs/gar.md)."""
    prefix = RELATIONS[relation].phrase[:-2] if rtype == "child" else ""
    return phrase[len(prefix):] if prefix and phrase.lower().startswith(prefix.lower()) else phrase


class _Row:
    """One parsed row: context items (role-ordered), statement roles, label, absolute char spans."""

    def __init__(self, text: str, offset: int, ranges: dict, meta: dict, items: bool = True):
        self.text, self.offset, self.meta = text, offset, meta
        self.spans = defaultdict(list)
        cls = meta["kind"] == "cls"
        head = "Premise: < " if cls else "< "
        if not text.startswith(head):
            raise ValueError(f"row does not start with {head!r}: {text[:40]!r}")
        ctx_end = text.find(" >. ")
        if ctx_end < 0:
            raise ValueError("row has no ' >. ' closing its context")
        self.ctx = (len(head) - 2, ctx_end + 3)
        if items:
            self._items(len(head), ctx_end, ranges)
        stmt_start, stmt_end = ctx_end + 4, len(text)
        self.label = None
        if cls:
            if not text.startswith(CLS_HEAD, stmt_start):
                raise ValueError("classification row lacks the 'Answer with Yes or No. ...' question")
            m = re.search(r"\? Answer: (Yes|No)$", text)
            if not m:
                raise ValueError("classification row does not end in '? Answer: Yes|No'")
            stmt_start, stmt_end, self.label = stmt_start + len(CLS_HEAD), m.start(), m.group(1)
        self._statement(stmt_start, stmt_end)
        if cls:
            self.prompt_end = len(text) - len(self.label) - 1
        else:
            self.prompt_end = len(text[:self.spans["A"][0][0]].rstrip())
            if text[self.prompt_end:] != " " + self.a_core:
                raise ValueError(f"answer {self.a_core!r} is not the row's ending {text[self.prompt_end:]!r}")
        end = self.prompt_end - 1
        while end > 0 and text[end - 1].isalnum() and text[end].isalnum():
            end -= 1
        self.spans["END"] = [(end, self.prompt_end)]

    def _items(self, start: int, stop: int, ranges: dict) -> None:
        meta = self.meta
        pattern = re.compile(_ITEM_RE[meta["surface"]][meta["swap_kv"]])
        items = [((a + start, b + start), (c + start, d + start))
                 for (a, b), (c, d) in _sentences(self.text[start:stop], meta["cxt_len"], pattern)]
        k, kp, v, vp = (_dedup(_token_spans(ranges.get(r), r)) for r in ("K", "K'", "V", "V'"))
        if len(k) + len(kp) == len(items) and k:
            ranked, matched = k + kp, k
        elif len(v) + len(vp) == len(items) and v:
            ranked, matched = v + vp, v
        else:
            raise ValueError(f"token spans K/K'/V/V' ({len(k)}/{len(kp)}/{len(v)}/{len(vp)}) do not match "
                             f"{len(items)} context items")
        rank = {s: i for i, s in enumerate(sorted(t[0] for t in ranked))}
        if len(rank) != len(items):
            raise ValueError("two context items' token spans start at the same token")
        first_k, first_v = (k, v) if k and v else (kp, vp)
        k_first = min(t[0] for t in first_k) < min(t[0] for t in first_v)
        self.match = sorted(rank[t[0]] for t in matched)
        self.items = [(a, b) if k_first else (b, a) for a, b in items]
        self.lower_first = {a for a, _ in items} if meta["surface"] == "is" and meta["swap_kv"] else set()
        for i, (ks, vs) in enumerate(self.items):
            self.spans["K" if i in self.match else "Kp"].append(ks)
            self.spans["V" if i in self.match else "Vp"].append(vs)
        others = [i for i in range(len(items)) if i not in self.match]
        self.src = others[0] if meta["negated"] else self.match[0]
        if meta["negated"] and len(others) != 1:
            raise ValueError(f"negated row should have exactly one non-matching item, has {len(others)}")

    def _statement(self, start: int, stop: int) -> None:
        meta, text = self.meta, self.text
        neg, swap = meta["negated"], meta["swap_qa"]
        pattern = _STMT_RE[swap].format(preds=_PREDICATES[neg])
        m = re.compile(pattern).fullmatch(text, start, stop)
        if not m:
            raise ValueError(f"statement {text[start:stop]!r} does not fit the expected question grammar")
        if swap:
            want = " is not " if neg else ("? " if meta["kind"] == "gen" else " is ")
            if m.group("pred") != want:
                raise ValueError(f"statement {text[start:stop]!r}: expected {want!r} before the answer")
        if neg:
            r = text.find("not", *m.span("pred"))
            self.spans["R"].append((r, r + 3))
        self.q_core, self.spans["Q"] = self._core(m, "Q", meta["q_name"], meta["q_rtype"])
        self.a_core, self.spans["A"] = self._core(m, "A", meta["a_name"], meta["a_rtype"])

    def _core(self, m: re.Match, group: str, relation: str, rtype: str) -> tuple[str, list[tuple[int, int]]]:
        core = _strip_category(m.group(group), relation, rtype)
        end = m.end(group)
        return core, [(end - len(core), end)]

    def element(self, span: tuple[int, int]) -> str:
        """An item element as plain text (an adjective opening its sentence is lower-cased)."""
        s = self.text[span[0]:span[1]]
        return s[:1].lower() + s[1:] if span in self.lower_first else s


def _parse_task(task_id: str) -> dict:
    m = _TASK_RE.match(task_id)
    if not m:
        raise ValueError(f"task_id {task_id!r} is not of the form rlr_gen[...][r1,r2][cxt_len=N(,rev_item2str)]")
    (q_name, q_rtype, negated), (a_name, a_rtype, a_neg) = _relation(m["r1"]), _relation(m["r2"])
    if a_neg:
        raise ValueError(f"task_id {task_id!r}: negation on the answer-side relation is not supported")
    value_rel = a_name if q_name in _PERSON_RELATIONS else q_name
    if value_rel not in _SURFACE_OF:
        raise ValueError(f"task_id {task_id!r}: unknown relation {value_rel!r}")
    return dict(kind="cls" if m["g2c"] else "gen", negated=negated, swap_qa=q_name not in _PERSON_RELATIONS,
                swap_kv=bool(m["rev"]), cxt_len=int(m["n"]), q_name=q_name, q_rtype=q_rtype, a_name=a_name,
                a_rtype=a_rtype, surface=_SURFACE_OF[value_rel],
                n_r=(q_rtype != "equal") + (a_rtype != "equal"))


def _split(texts: str, n_rows: int) -> tuple[list[str], str]:
    """(candidate list from the header line or [], rows)."""
    if not texts.endswith("\n"):
        raise ValueError("texts does not end with a newline")
    header = []
    body = texts
    if not texts.startswith(("< ", "Premise: ")):
        head, body = texts.split("\n", 1)
        m = re.fullmatch(r".+? include (.+)\.", head)
        if not m:
            raise ValueError(f"unexpected first line {head!r}")
        first, _, last = m.group(1).rpartition(" and ")
        header = [*first.split(", "), last]
    rows = body[:-1].split(ROW_SEP)
    if len(rows) != n_rows:
        raise ValueError(f"texts has {len(rows)} rows but ranges has {n_rows}")
    return header, rows


def parse_line(line: str, line_no: int, path: str | Path = "GAR_data.jsonl") -> tuple[GarExample, list[str]]:
    """One published line -> (example, answer cores of all its rows); raises :class:`GarFormatError`."""
    try:
        rec = json.loads(line)
        task_id, texts, ranges = rec["task_id"], rec["texts"], rec["ranges"]
        meta = _parse_task(task_id)
        header, rows = _split(texts, len(ranges))
        offset = len(texts) - 1 - len(rows[-1])
        parsed = [_Row(text, 0, r, meta, items=False) for text, r in zip(rows[:-1], ranges[:-1], strict=True)]
        row = _Row(rows[-1], offset, ranges[-1], meta)
        if set(ranges[-1]) - {"END", "A", "A'", "Q", "K", "V", "K'", "V'", "R", "example"}:
            raise ValueError(f"unknown role keys in ranges: {sorted(ranges[-1])}")
        if meta["negated"] != bool(ranges[-1].get("R")):
            raise ValueError("negation R token span present/absent against the task's negation")
        example = _example(row, meta, task_id, line_no, texts[:offset], header)
    except GarFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, json.JSONDecodeError) as e:
        raise GarFormatError(line_no, f"{type(e).__name__}: {e}", path) from None
    return example, [r.a_core for r in parsed + [row]]


def _check(row: _Row, meta: dict) -> None:
    """Facts the grammar implies for copy (equal) relations: the query names K, the answer is the source's V."""
    k_texts = [row.element(s) for s in row.spans["K"]]
    if meta["q_rtype"] == "equal" and any(t != row.q_core for t in k_texts):
        raise ValueError(f"query {row.q_core!r} does not name the matched item(s) {k_texts}")
    if meta["a_rtype"] == "equal":
        true = row.element(row.items[row.src][1])
        if (row.a_core == true) != (row.label in (None, "Yes")):
            raise ValueError(f"answer {row.a_core!r} vs the source item's {true!r} contradicts label {row.label}")


def _example(row: _Row, meta: dict, task_id: str, line_no: int, before: str, header: list[str]) -> GarExample:
    _check(row, meta)
    prompt = before + row.text[:row.prompt_end]
    spans = {role: [(s + row.offset, e + row.offset) for s, e in spans]
             for role, spans in row.spans.items() if spans and not (role == "A" and meta["kind"] == "gen")}
    gen = meta["kind"] == "gen"
    candidates = [" " + _strip_category(c, meta["a_name"], meta["a_rtype"]) for c in header] if gen else [" Yes", " No"]
    answer = " " + row.a_core if gen else " " + row.label
    target = " " + row.a_core if gen or row.label == "Yes" else None
    if target is None and meta["a_rtype"] == "equal":
        target = " " + row.element(row.items[row.src][1])
    return GarExample(
        id=f"published:{line_no}", task=task_id, source="published", kind=meta["kind"], negated=meta["negated"],
        swap_qa=meta["swap_qa"], swap_kv=meta["swap_kv"], n_r=meta["n_r"],
        q_relation=f"{meta['q_name']}.{meta['q_rtype']}", a_relation=f"{meta['a_name']}.{meta['a_rtype']}",
        prompt=prompt, answer=answer, target=target or "",
        candidates=candidates, label=row.label, spans=spans,
        subquestions=_subquestions(row, meta, target))


def _subquestions(row: _Row, meta: dict, target: str | None) -> list[dict]:
    ctx = row.text[row.ctx[0]:row.ctx[1]] + " "
    k_src, v_src = (row.element(s) for s in row.items[row.src])
    ask = _COPY_Q[meta["surface"]][meta["swap_qa"]]
    out = [{"name": "copy", "prompt": ctx + ask.format(k_src), "answers": [" " + v_src]}]
    if meta["q_rtype"] != "equal":
        k = row.element(row.spans["K"][0])
        out.append({"name": "key_fact", "prompt": RELATIONS[meta["q_name"]].fact_prompt.format(k),
                    "answers": [" " + _SINGULAR.get(row.q_core, row.q_core)]})
    if meta["a_rtype"] != "equal" and target:
        out.append({"name": "value_fact", "prompt": RELATIONS[meta["a_name"]].fact_prompt.format(v_src),
                    "answers": [target]})
    return out


def _finish(examples: list[GarExample], lines: dict[str, int], cores: dict[str, set[str]]) -> None:
    """Pair consecutive Yes/No lines; fill No rows' targets from their partner; task-level gen candidates."""
    by_line = {lines[ex.id]: ex for ex in examples}
    for no, ex in by_line.items():
        yes = by_line.get(no - 1)
        if ex.label != "No" or yes is None or yes.label != "Yes" or yes.task != ex.task:
            continue
        ctx_yes, ctx_no = (e.prompt[e.prompt.rfind("< "):e.prompt.rfind(" >. ")] for e in (yes, ex))
        if ctx_yes != ctx_no:
            continue
        ex.pair_id = yes.pair_id = yes.id
        if not ex.target:
            ex.target = yes.target
            rel = RELATIONS.get(ex.a_relation.split(".")[0])
            copy = ex.subquestions[0]["answers"][0].strip()
            if rel is not None:
                ex.subquestions.append({"name": "value_fact", "prompt": rel.fact_prompt.format(copy),
                                        "answers": [yes.target]})
    for ex in examples:
        if ex.kind == "gen" and not ex.candidates:
            ex.candidates = [" " + c for c in sorted(cores[ex.task])]


def load_published(path: str | Path = DEFAULT_PATH, on_error: str = "raise",
                   errors: list[GarFormatError] | None = None) -> list[GarExample]:
    """Parse the published GAR jsonl. ``on_error="skip"`` drops bad lines, warns with their count, and appends
    the :class:`GarFormatError` of each to ``errors`` when given; "raise" stops at the first bad line."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"published GAR file not found at {path}; pass its path (it lives in the shared data "
                        "folder, ../shared/data/gar/GAR_data.jsonl relative to the repository root).")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    examples, lines, cores, skipped = [], {}, defaultdict(set), []
    for line_no, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            ex, row_cores = parse_line(line, line_no, path)
        except GarFormatError as e:
            if on_error == "raise":
                raise
            skipped.append(e)
            continue
        examples.append(ex)
        lines[ex.id] = line_no
        cores[ex.task].update(row_cores)
    if not examples:
        why = f"all {len(skipped)} lines are malformed (first: {skipped[0]})" if skipped else "it has no lines"
        raise DataError(f"{path} holds no GAR examples: {why}. Pass the published GAR_data.jsonl or a file of "
                        "its lines.")
    _finish(examples, lines, cores)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} malformed line(s) of {path}; first: {skipped[0]}", stacklevel=2)
        if errors is not None:
            errors.extend(skipped)
    return examples
