"""CEL front end: parser, subscription checker and reference interpreter.

This package owns three things, one module each:

* :func:`parse` (``streamer.matching.cel.parser``) turns the source of a
  subscription's CEL expression into a small AST (``streamer.matching.cel.nodes``).
  It implements the CEL grammar for the supported subset, including the full
  literal syntax (hex ints, doubles, raw / triple-quoted strings and every
  escape), and it bounds the work a hostile expression can cause: length,
  nesting depth and node count are limited and checked while parsing, so no
  input string makes it raise anything but :class:`CelSyntaxError` (never
  ``RecursionError``).
* :func:`check` (``streamer.matching.cel.checker``) validates a parsed expression for
  the subscription environment: the only variable is ``doc`` and only a
  small set of functions exists.  ``matches`` patterns given as literals are
  compiled (RE2) here.
* :func:`evaluate` (``streamer.matching.cel.interpreter``) is the reference
  interpreter: a plain tree walk that is the simple, obviously-correct
  definition of the semantics (CEL's error-absorbing ``&&``/``||``,
  heterogeneous equality, int64 overflow checks, RE2 ``matches``...).  The
  compiled evaluator used on the hot path lives elsewhere and is tested
  against this one.

Nesting.  ``max_depth`` bounds the nesting of the expression: AST depth, where
parentheses also count as a level while parsing.  Left-associative chains such
as ``a || b || c`` nest one level per operator.

A few deliberate choices where Python or the CEL specification leaves room:

* ``!!x`` and ``--x`` are dropped in pairs by the parser, exactly as the CEL
  reference parsers (cel-go, cel-cpp) do; ``!-x`` and ``-!x`` are syntax errors
  per the grammar.  ``-`` directly before a number literal is part of the
  literal, which is how ``-9223372036854775808`` is valid.
* Map lookups (``m[k]`` and ``k in m``) use CEL's numeric key equality: an
  integral double finds the int key (``{1: 'a'}[1.0]`` is ``'a'``); a double
  key in a map *literal* is an error.
* Python dicts cannot hold both ``1`` and ``true`` as keys, so a map literal
  with both is an evaluation error here.
"""

from __future__ import annotations

from streamer.matching.cel.checker import check
from streamer.matching.cel.interpreter import evaluate
from streamer.matching.cel.nodes import (
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_NODES,
    Call,
    CelEvalError,
    CelSyntaxError,
    Expr,
    Ident,
    Index,
    ListExpr,
    Literal,
    MapExpr,
    Select,
)
from streamer.matching.cel.parser import parse

__all__ = [
    "MAX_DEPTH",
    "MAX_EXPRESSION_LENGTH",
    "MAX_NODES",
    "Call",
    "CelEvalError",
    "CelSyntaxError",
    "Expr",
    "Ident",
    "Index",
    "ListExpr",
    "Literal",
    "MapExpr",
    "Select",
    "check",
    "evaluate",
    "parse",
]
