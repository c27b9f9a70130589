"""The subscription checker: the only variable is ``doc`` and only a small
set of functions exists; literal ``matches`` patterns are compiled (RE2)
here."""

from __future__ import annotations

import functools

import re2

from streamer.errors import InvalidSubscription
from streamer.matching.cel.nodes import (
    Call,
    Expr,
    Ident,
    Index,
    ListExpr,
    Literal,
    MapExpr,
    Select,
    children,
    col,
    quote,
)

# --------------------------------------------------------------------------
# Checker

_OPERATOR_ARITY: dict[str, int] = {
    "_&&_": 2,
    "_||_": 2,
    "!_": 1,
    "-_": 1,
    "_?_:_": 3,
    "_==_": 2,
    "_!=_": 2,
    "_<_": 2,
    "_<=_": 2,
    "_>_": 2,
    "_>=_": 2,
    "_+_": 2,
    "_-_": 2,
    "_*_": 2,
    "_/_": 2,
    "_%_": 2,
    "@in": 2,
}

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=1024)
def compile_regex(pattern: str) -> tuple[object, str | None]:
    """Compile an RE2 pattern: ``(regexp, None)`` or ``(None, error message)``."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS), None
    except re2.error as e:
        detail = e.args[0] if e.args else "invalid"
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return None, str(detail)
    except (UnicodeError, TypeError, ValueError) as e:
        return None, str(e)


def call_shape_ok(node: Call) -> bool:
    fn = node.function
    nargs = len(node.args)
    has_target = node.target is not None
    arity = _OPERATOR_ARITY.get(fn)
    if arity is not None:
        return not has_target and nargs == arity
    if fn == "size":
        return nargs == (0 if has_target else 1)
    if fn in ("contains", "startsWith", "endsWith"):
        return has_target and nargs == 1
    if fn == "matches":
        return nargs == (1 if has_target else 2)
    return False


def check(expr: Expr) -> None:
    """Validate ``expr`` for the subscription environment.

    The only variable is ``doc``; the functions are the operators, ``size``,
    ``contains``, ``startsWith``, ``endsWith``, ``matches`` and ``has()``.
    Raises :class:`InvalidSubscription` naming the first problem and its column.
    """
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        t = type(node)
        if t is Ident:
            assert isinstance(node, Ident)
            if node.name != "doc":
                raise InvalidSubscription(
                    f"undeclared reference to {node.name!r} at {col(node.pos)}"
                )
        elif t is Call:
            assert isinstance(node, Call)
            if not call_shape_ok(node):
                raise InvalidSubscription(
                    f"unsupported function {node.function!r} at {col(node.pos)}"
                )
            if node.function == "matches":
                pattern = node.args[0] if node.target is not None else node.args[1]
                if isinstance(pattern, Literal) and isinstance(pattern.value, str):
                    _, err = compile_regex(pattern.value)
                    if err is not None:
                        raise InvalidSubscription(
                            f"invalid regular expression {quote(pattern.value)}"
                            f" at {col(pattern.pos)}: {err}"
                        )
        elif t not in (Literal, Select, Index, ListExpr, MapExpr):
            raise InvalidSubscription(f"unsupported expression node {t.__name__}")
        stack.extend(reversed(children(node)))
