"""What the fuzz targets share: libFuzzer's bytes made into values, and the
entry point.

Only two ``FuzzedDataProvider`` calls make values from the input:
``ConsumeBytes`` (from the front) and ``ConsumeIntInRange`` (from the end),
so ``fuzz/make_corpus.py`` can write seeds that decode to exactly the
events, messages and expressions it means. Text is UTF-8 decoded with
replacement: the wire only carries valid UTF-8 strings, and mutating bytes
still reaches every code point.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

import atheris
import orjson

T = TypeVar("T")

# Deep enough for every nesting bound of the matcher and the CEL evaluator
# to be reached by JSON seeds; the FDP-made values stay shallower.
MAX_VALUE_DEPTH = 8


def text(fdp: atheris.FuzzedDataProvider, limit: int) -> str:
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, limit)).decode("utf-8", "replace")


def blob(fdp: atheris.FuzzedDataProvider, limit: int) -> bytes:
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, limit))


def pick(fdp: atheris.FuzzedDataProvider, options: Sequence[T], other: Callable[[], T]) -> T:
    """One of ``options``, or (the index past them) whatever ``other`` makes."""
    index = fdp.ConsumeIntInRange(0, len(options))
    return options[index] if index < len(options) else other()


def document(fdp: atheris.FuzzedDataProvider, limit: int) -> object:
    """A JSON document when the bytes are JSON (readable seeds), else a value
    made from them that JSON cannot spell: NaN, infinities, -0.0, integers
    past 64 bits, non-string keys."""
    raw = blob(fdp, limit)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return value(atheris.FuzzedDataProvider(raw), 0)


_FLOATS = (float("nan"), float("inf"), float("-inf"), -0.0, 2.0**53, 2.0**63, 1e308)
_INTS = (0, 1, -1, 2**53, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64, -(2**64))
_KEYS = ("a", "b", "n", "s", "l", "m", "x", "tags", "chat", "_id", "deleted", "")


def value(fdp: atheris.FuzzedDataProvider, depth: int) -> object:
    leaf = depth >= MAX_VALUE_DEPTH
    kind = fdp.ConsumeIntInRange(0, 8 if leaf else 11)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-1000, 1000)
    if kind == 3:
        return _INTS[fdp.ConsumeIntInRange(0, len(_INTS) - 1)]
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind == 5:
        return _FLOATS[fdp.ConsumeIntInRange(0, len(_FLOATS) - 1)]
    if kind in (6, 7):
        return text(fdp, 24)
    if kind == 8:
        return _KEYS[fdp.ConsumeIntInRange(0, len(_KEYS) - 1)]
    size = fdp.ConsumeIntInRange(0, 4)
    if kind == 9:
        return [value(fdp, depth + 1) for _ in range(size)]
    if kind == 10:
        return {
            pick(fdp, _KEYS, lambda: text(fdp, 8)): value(fdp, depth + 1) for _ in range(size)
        }
    return {fdp.ConsumeIntInRange(-2, 2): value(fdp, depth + 1) for _ in range(size)}


def main(test_one_input: Callable[[bytes], None]) -> None:
    """Run a target under libFuzzer with the command line's arguments."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
