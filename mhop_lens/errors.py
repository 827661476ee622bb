"""Exceptions with messages that say what to do. Every user-facing failure of the suite raises one of these."""

from __future__ import annotations

import os
from pathlib import Path


class MhopLensError(Exception):
    """Base class: a problem with the user's input or environment, with a message naming the fix."""


class ModelLoadError(MhopLensError):
    """The model name or directory could not be loaded."""


class HookNameError(MhopLensError, KeyError):
    """A hook name is not one of the model's hook points."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class SpanError(MhopLensError, ValueError):
    """A substring or character span is not where the caller said it is."""


class DataError(MhopLensError, ValueError):
    """A data row or file is malformed."""


class PromptTooLongError(MhopLensError, ValueError):
    """A prompt has more tokens than the model's context."""


def not_utf8(path: str | os.PathLike) -> DataError:
    """The error for a data file that is not UTF-8: the first bad byte, its line, and the command that converts it."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f" (byte {data[e.start:e.start + 1]!r} on line {line})"
    return DataError(f"{path} is not UTF-8 text{where}; re-save it as UTF-8, e.g. "
                     f"`iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix}`.")
