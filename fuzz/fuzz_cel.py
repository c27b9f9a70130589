"""Fuzz target: a CEL subscription, compiled and by the reference.

For any expression and document, the compiled path (``Matcher``: the
``_celparse`` parser and checker, the compiler to clauses, the index and its
evaluator) and the reference path (``ReferenceMatcher``: the pure-Python
parser, checker and tree-walking interpreter) must give the same verdict:
both reject the expression (``InvalidSubscription``, any message), or both
accept it and agree on whether the document matches. Any other exception,
or a disagreement, is a crash.

The two parsers are also held to their own contract (docs/semantics.md,
"CEL: our own parser and compiled evaluator"): ``_celparse.parse(s,
check=True)`` and ``cel.parse`` + ``cel.check`` raise the same exception
with the same message, or return equal trees with equal positions.

    python fuzz/fuzz_cel.py [libFuzzer options] CORPUS_DIR...
"""

from __future__ import annotations

from collections.abc import Callable

import atheris
from common import document, main, pick, text

with atheris.instrument_imports(include=["streamer"]):
    from streamer._ext import _celparse
    from streamer.errors import InvalidSubscription
    from streamer.matching import Matcher, cel
    from streamer.matching.cel import MAX_EXPRESSION_LENGTH
    from streamer.matching.cel.nodes import children
    from streamer.matching.reference import ReferenceMatcher

# A little past the parser's own bound, so its length check is reached too.
EXPRESSION_LIMIT = MAX_EXPRESSION_LENGTH + 64
DOCUMENT_LIMIT = 4096
DOCUMENT_IDS = (None, "d1", "42")

Input = tuple[str, str | None, object]


def decode(data: bytes) -> Input:
    """The expression, the document id and the document an input stands for."""
    fdp = atheris.FuzzedDataProvider(data)
    expression = text(fdp, EXPRESSION_LIMIT)
    document_id = pick(fdp, DOCUMENT_IDS, lambda: text(fdp, 16))
    return expression, document_id, document(fdp, DOCUMENT_LIMIT)


def verdict(matcher: Matcher | ReferenceMatcher, case: Input) -> str:
    expression, document_id, doc = case
    try:
        matcher.add("s", "db", "c", expression=expression)
    except InvalidSubscription:
        return "rejected"
    ids = matcher.match("db", "c", document_id, doc)
    if ids not in ([], ["s"]):
        raise AssertionError(f"{type(matcher).__name__} matched {ids!r}")
    return "match" if ids else "no match"


def _reference_parse(source: str) -> cel.Expr:
    expr = cel.parse(source)
    cel.check(expr)
    return expr


def _compiled_parse(source: str) -> cel.Expr:
    return _celparse.parse(source, check=True)


def parsed(parse: Callable[[str], cel.Expr], source: str) -> cel.Expr | tuple[str, str]:
    try:
        return parse(source)
    except InvalidSubscription as exc:
        return type(exc).__name__, str(exc)


def positions(expr: cel.Expr) -> list[tuple[str, int]]:
    """Every node's type and position, depth first (``==`` ignores them)."""
    out, stack = [], [expr]
    while stack:
        node = stack.pop()
        out.append((type(node).__name__, node.pos))
        stack.extend(children(node))
    return out


def same_parse(source: str) -> None:
    compiled = parsed(_compiled_parse, source)
    reference = parsed(_reference_parse, source)
    same = compiled == reference and (
        not isinstance(compiled, cel.Expr) or positions(compiled) == positions(reference)
    )
    if not same:
        raise AssertionError(
            f"the compiled parser gives {compiled!r}, the reference {reference!r}, "
            f"for {source!r}"
        )


def test_one_input(data: bytes) -> None:
    case = decode(data)
    same_parse(case[0])
    compiled = verdict(Matcher(), case)
    reference = verdict(ReferenceMatcher(), case)
    if compiled != reference:
        raise AssertionError(
            f"compiled: {compiled}, reference: {reference}, for expression "
            f"{case[0]!r}, document id {case[1]!r}, document {case[2]!r}"
        )


if __name__ == "__main__":
    main(test_one_input)
