"""Validation of CLI option values shared by the verbs: every check runs before a run directory is written.

Range errors are click usage errors (exit 2, one ``Error:`` line naming the option); checks that need the loaded
model (context length, vocabulary size) or the data (how many rows a too-small ``--limit`` misses) raise
``MhopLensError``, which ``friendly_errors`` prints as one ``Error:`` line (exit 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import click

from mhop_lens.errors import MhopLensError

#: --limit, --batch-size, --threads, --top-k, --max-new-tokens, --n-per-task ...: counts that must be at least 1.
POSITIVE = click.IntRange(min=1)


class BatchSize(click.ParamType):
    """--batch-size: a count of at least 1 (returned as an int), or ``auto`` / ``auto:CAP`` (returned as given; sized
    from the free memory by ``budget.resolve_batch_size`` once the model is loaded)."""

    name = "N|auto|auto:CAP"

    def convert(self, value, param, ctx):
        from mhop_lens.budget import check_batch_size
        from mhop_lens.errors import DataError

        text = str(value).strip().lower()
        if text.lstrip("-").isdigit():
            return POSITIVE.convert(int(text), param, ctx)
        try:
            check_batch_size(text)
        except DataError as e:
            self.fail(str(e), param, ctx)
        return text


BATCH_SIZE = BatchSize()


def check_device_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback of --device: an unknown device or a GPU this machine lacks fails before anything runs."""
    from mhop_lens.errors import ModelLoadError
    from mhop_lens.models import check_device

    try:
        check_device(value)
    except ModelLoadError as e:
        raise click.BadParameter(str(e), ctx, param) from None
    return value


def check_top_k(model, top_k: int) -> None:
    """--top-k must fit the model's vocabulary."""
    vocab = int(model.cfg.d_vocab)
    if top_k > vocab:
        raise MhopLensError(f"--top-k {top_k} exceeds this model's vocabulary of {vocab} tokens; use 1..{vocab}.")


def check_generation_fits(model, prompts: Sequence[str], max_new_tokens: int) -> None:
    """The longest prompt plus ``max_new_tokens`` must fit the model's context (positions past it do not exist)."""
    from mhop_lens.tokens import encode

    n_ctx = getattr(model.cfg, "n_ctx", None)
    if not n_ctx or not prompts:
        return
    longest = int(encode(model, list(dict.fromkeys(prompts))).lengths.max())
    if longest + max_new_tokens > n_ctx:
        room = n_ctx - longest
        fix = "lower --max-new-tokens" if room > 0 else "shorten the prompts"
        raise MhopLensError(f"--max-new-tokens {max_new_tokens} does not fit: the longest prompt has {longest} "
                            f"tokens and the model's context is {n_ctx}, so at most {max(room, 0)} new token(s) "
                            f"fit; {fix}.")


def smallest_prefix(items: Sequence, works: Callable[[Sequence], Any], fails_at: int = 0) -> int | None:
    """Smallest n with ``works(items[:n])`` not raising ``MhopLensError`` (monotone in n: more rows, more pairs);
    None when even all items fail. ``fails_at``: a prefix length known to fail. Galloping then binary search, so
    the cost is set by the answer, not by the size of the data."""
    def ok(n: int) -> bool:
        try:
            works(items[:n])
        except MhopLensError:
            return False
        return True

    lo, hi = fails_at, max(2 * fails_at, 1)  # invariant: items[:lo] fails
    while not ok(min(hi, len(items))):
        if hi >= len(items):
            return None
        lo, hi = hi, 2 * hi
    hi = min(hi, len(items))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def limit_too_small(error: MhopLensError, limit: int | None, data: str, missing: str,
                    load_all: Callable[[], Sequence], works: Callable[[Sequence], Any]) -> MhopLensError:
    """``error`` raised on the first ``limit`` rows, restated with the --limit that would have worked.

    Without a --limit the error stands as it is. Otherwise the rows of ``--data`` are searched for the smallest
    prefix on which ``works`` succeeds, so the message says how many rows are needed (``missing`` names what the
    first rows lack) instead of how to make new data.
    """
    if limit is None:
        return error
    items = load_all()
    need = smallest_prefix(items, works, fails_at=min(limit, len(items)))
    if need is None:
        return MhopLensError(f"{error} (all {len(items)} rows of --data {data!r} were checked, not only the first "
                             f"--limit {limit}).")
    return MhopLensError(f"--limit {limit} is too small: the first {limit} rows of --data {data!r} have {missing}. "
                         f"The first {need} rows have some; pass --limit {need} or more, or leave --limit out.")


def site_list(spec: str, old: dict[str, str], option: str = "--sites") -> str:
    """A comma list of site names with the deprecated names of earlier releases replaced by their TransformerLens
    act names (one note on stderr); unknown names are left for the analysis to refuse with its own message."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in dict.fromkeys(n for n in names if n in old):
        click.echo(f"note: {option} {name} is deprecated; use {old[name]} (TransformerLens's act name).", err=True)
    return ",".join(old.get(n, n) for n in names)
