"""Lowering of subscriptions into the index's form.

A subscription (structured filters ANDed with an optional CEL expression) is
rewritten into disjunctive normal form: a list of *clauses*, each a
conjunction of *atoms*. An atom is a small predicate on one event —
``path op constant``, ``path in [constants]``, ``constant in path`` or an
arbitrary CEL sub-expression — described by a hashable key (so identical
atoms are interned and evaluated once per event) and built into a compiled
predicate of the extension only when the key is new.

DNF is exact for CEL: its ``&&``/``||``/``!`` with error absorption are
Kleene's three-valued logic (error = unknown), where distribution and De
Morgan's laws hold, and a subscription matches exactly when its predicate is
``true``, i.e. when some clause has every atom true. Negation is pushed only
through ``&&``/``||``/``!`` and flips ``==``/``!=``; a negated ordering stays
an opaque atom, because ``!(x < 1)`` and ``x >= 1`` differ on NaN.

This module also compiles CEL ASTs into the extension's evaluator nodes
(``compile_node``), which the conformance tests run directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from streamer._ext import _core
from streamer.errors import InvalidSubscription
from streamer.matching import cel

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# Beyond this many clauses a sub-expression stays one opaque atom rather
# than multiplying out (``(a||b) && (c||d) && ...`` doubles each time).
MAX_CLAUSES = 16

OPERATORS = {
    "==": "==", "eq": "==",
    "!=": "!=", "ne": "!=",
    ">": ">", "gt": ">",
    ">=": ">=", "gte": ">=",
    "<": "<", "lt": "<",
    "<=": "<=", "lte": "<=",
    "in": "in",
    "contains": "contains",
}
_FLIP = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_CMP_FUNCTIONS = {"_==_": "==", "_!=_": "!=", "_<_": "<", "_<=_": "<=", "_>_": ">", "_>=_": ">="}
_ARITH_FUNCTIONS = {"_+_": "+", "_-_": "-", "_*_": "*", "_/_": "/", "_%_": "%"}

Scalar = str | int | float | bool
Value = Scalar | list[Scalar]


class Filter(NamedTuple):
    """One structured condition: ``field op value`` (docs/semantics.md, Filters)."""

    field: str
    op: str
    value: Value


# An atom before interning: ``(key, access, factory)``.
#
# ``key`` identifies the predicate; for the structured kinds the core builds
# the predicate from the key alone (``("cmp", path, op, const)``, ``("in",
# path, consts)``, ``("holds", path, const, substring)``, constants as
# ``const_key`` pairs), otherwise ``factory(core)`` builds it.
# ``access`` says how the index can find events that may satisfy it:
# ``("eq", path, keys)``, ``("elem", path, keys)``, ``("range", path, op,
# threshold)`` or ``None``. Only exact accesses are offered, so a clause found
# through an atom need not test it again. Plain tuples, because a million
# subscriptions are lowered at subscribe time and NamedTuples cost far more.
Atom = tuple[tuple[Any, ...], tuple[Any, ...] | None, Callable[[_core.Core], _core.Pred] | None]
Clause = list[Atom]


_SCALAR_NAMES = {str: "str", int: "int", float: "float", bool: "bool", type(None): "NoneType"}


def const_key(value: object) -> object:
    """A hashable key for a constant that keeps 1, 1.0 and True apart."""
    name = _SCALAR_NAMES.get(type(value))
    if name is not None:
        return (name, value)
    if isinstance(value, list):
        return ("list", tuple(const_key(v) for v in value))
    if isinstance(value, dict):
        return ("map", tuple(sorted((repr(const_key(k)), const_key(v)) for k, v in value.items())))
    return (type(value).__name__, value)


# ------------------------------------------------------------------ atoms


def compare_atom(path: tuple[str, ...], op: str, value: object) -> Atom:
    access: tuple[Any, ...] | None = None
    if op == "==":
        key = _core.index_key(value)
        if key is not _core.NOKEY:
            access = ("eq", path, (key,))
    elif op != "!=":
        threshold = _core.range_key(value)
        if threshold is not None:
            access = ("range", path, op, threshold)
    return ("cmp", path, op, const_key(value)), access, None


def in_atom(path: tuple[str, ...], values: Sequence[object]) -> Atom:
    keys = [_core.index_key(v) for v in values]
    access = None
    if _core.NOKEY not in keys:
        access = ("eq", path, tuple(dict.fromkeys(keys)))
    return ("in", path, tuple(const_key(v) for v in values)), access, None


def holds_atom(path: tuple[str, ...], value: object, substring: bool) -> Atom:
    access = None
    if not substring:
        key = _core.index_key(value)
        if key is not _core.NOKEY:
            access = ("elem", path, (key,))
    return ("holds", path, const_key(value), substring), access, None


def expression_atom(expr: cel.Expr, negate: bool) -> Atom:
    key = ("expr", negate, ast_key(expr))

    def build(core: _core.Core) -> _core.Pred:
        node = compile_node(expr, core)
        return _core.Expression(_core.Not(node) if negate else node)

    return key, None, build


# ---------------------------------------------------------------- filters


def _check_scalar(where: str, value: object) -> None:
    if value is None:
        raise InvalidSubscription(f"{where}: value is null")
    if isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidSubscription(f"{where}: integer {value} is outside the int64 range")
        return
    if isinstance(value, float):
        return
    raise InvalidSubscription(
        f"{where}: unsupported value type {type(value).__name__} "
        "(expected str, int, float, bool or a list of those)"
    )


def _scalar_ok(value: object) -> bool:
    """The common case of ``_check_scalar``, without building messages."""
    t = type(value)
    if t is str or t is float or t is bool:
        return True
    return t is int and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]


def _filter_path(where: str, field: object) -> tuple[str, ...]:
    if not isinstance(field, str) or not field:
        raise InvalidSubscription(f"{where}: field must be a non-empty string, got {field!r}")
    path = tuple(field.split("."))
    if "" in path:
        raise InvalidSubscription(f"{where}: field {field!r} has an empty path segment")
    return path


# Field names repeat across subscriptions; splitting each once saves time
# at a million subscribe requests. Bounded, since names are client data.
_PATHS: dict[str, tuple[str, ...]] = {}
_PATHS_LIMIT = 65536
_ID_PATH = ("_id",)


def lower_filter(index: int, flt: object) -> Atom | None:
    """One filter as an atom; None when it can never hold (``in []``).

    ``index`` (1-based) only names the filter in error messages.
    """
    field: object
    op_name: object
    value: Any
    try:
        field, op_name, value = flt  # type: ignore[misc]
    except (TypeError, ValueError):
        raise InvalidSubscription(
            f"filter {index}: expected Filter(field, op, value), got {flt!r}"
        ) from None
    path = _PATHS.get(field) if isinstance(field, str) else None
    if path is None:
        path = _filter_path(f"filter {index}", field)
        if len(_PATHS) >= _PATHS_LIMIT:
            _PATHS.clear()
        _PATHS[field] = path  # type: ignore[index]
    op = OPERATORS.get(op_name) if isinstance(op_name, str) else None
    if op is None:
        raise InvalidSubscription(f"filter {index}: unsupported operator {op_name!r}")
    if type(value) is list or type(value) is tuple:
        if op not in ("in", "==", "!="):
            raise InvalidSubscription(
                f"filter {index}: operator {op_name!r} needs a single value, got a list"
            )
        for i, v in enumerate(value):
            if not _scalar_ok(v):
                _check_scalar(f"filter {index}: list item {i}", v)
        value = list(value)
    else:
        if op == "in":
            raise InvalidSubscription(
                f"filter {index}: operator 'in' needs a list value, got {value!r}"
            )
        if not _scalar_ok(value):
            _check_scalar(f"filter {index}", value)
    if path == _ID_PATH:
        value = _document_id_value(f"filter {index}", value)
    if op == "in":
        return in_atom(path, value) if value else None
    if op == "contains":
        return holds_atom(path, value, substring=True)
    return compare_atom(path, op, value)


def _document_id_value(where: str, value: Value) -> Value:
    """``_id`` compares as a string; ints are accepted as their decimal text."""
    def one(v: object) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        raise InvalidSubscription(
            f"{where}: _id compares as a string, got {type(v).__name__} {v!r}"
        )

    if isinstance(value, list):
        return [one(v) for v in value]
    return one(value)


# -------------------------------------------------------------------- CEL


def doc_path(expr: cel.Expr) -> tuple[str, ...] | None:
    """The field path of ``doc.a.b`` / ``doc['a'].b``, or None."""
    comps: list[str] = []
    while True:
        if isinstance(expr, cel.Select) and not expr.test_only:
            comps.append(expr.field)
            expr = expr.operand
        elif (
            isinstance(expr, cel.Index)
            and isinstance(expr.index, cel.Literal)
            and isinstance(expr.index.value, str)
        ):
            comps.append(expr.index.value)
            expr = expr.operand
        elif isinstance(expr, cel.Ident) and expr.name == "doc" and comps:
            return tuple(reversed(comps))
        else:
            return None


def _references_variables(expr: cel.Expr) -> bool:
    if isinstance(expr, cel.Ident):
        return True
    if isinstance(expr, cel.Literal):
        return False
    return any(_references_variables(child) for child in children(expr))


def children(expr: cel.Expr) -> list[cel.Expr]:
    if isinstance(expr, cel.Select):
        return [expr.operand]
    if isinstance(expr, cel.Index):
        return [expr.operand, expr.index]
    if isinstance(expr, cel.Call):
        return ([expr.target] if expr.target is not None else []) + list(expr.args)
    if isinstance(expr, cel.ListExpr):
        return list(expr.items)
    if isinstance(expr, cel.MapExpr):
        return [part for entry in expr.entries for part in entry]
    return []


_NO_CONSTANT = object()


def constant(expr: cel.Expr) -> object:
    """The value of a variable-free scalar or list expression, else _NO_CONSTANT."""
    if isinstance(expr, cel.Literal):
        return expr.value
    if _references_variables(expr):
        return _NO_CONSTANT
    value = compile_node(expr)({})
    if value is _core.ERROR or isinstance(value, dict):
        return _NO_CONSTANT
    return value


def lower_expression(expr: cel.Expr) -> list[Clause]:
    """A checked CEL AST in DNF (no clause means it can never match)."""
    clauses = _dnf(expr, False)
    if clauses is None:
        return [[expression_atom(expr, False)]]
    return clauses


def _dnf(expr: cel.Expr, negate: bool) -> list[Clause] | None:
    if isinstance(expr, cel.Call) and expr.target is None:
        fn = expr.function
        if fn in ("_&&_", "_||_"):
            conjunction = (fn == "_&&_") != negate
            parts = []
            for arg in expr.args:
                part = _dnf(arg, negate)
                if part is None:
                    part = [[expression_atom(arg, negate)]]
                parts.append(part)
            left, right = parts
            if conjunction:
                if len(left) * len(right) > MAX_CLAUSES:
                    return None
                return [a + b for a in left for b in right]
            if len(left) + len(right) > MAX_CLAUSES:
                return None
            return left + right
        if fn == "!_":
            return _dnf(expr.args[0], not negate)
    if isinstance(expr, cel.Literal) and isinstance(expr.value, bool):
        return [[]] if expr.value != negate else []
    return [[_lower_atom(expr, negate)]]


def _lower_atom(expr: cel.Expr, negate: bool) -> Atom:
    if isinstance(expr, cel.Call) and expr.target is None and len(expr.args) == 2:
        fn = expr.function
        left, right = expr.args
        op = _CMP_FUNCTIONS.get(fn)
        if op is not None and (not negate or op in ("==", "!=")):
            if negate:
                op = "!=" if op == "==" else "=="
            path, value = doc_path(left), constant(right)
            if path is None or value is _NO_CONSTANT:
                path, value, op = doc_path(right), constant(left), _FLIP[op]
            if path is not None and value is not _NO_CONSTANT:
                return compare_atom(path, op, value)
        elif fn == "@in" and not negate:
            path = doc_path(left)
            values = constant(right)
            if path is not None and isinstance(values, list):
                return in_atom(path, values)
            path = doc_path(right)
            value = constant(left)
            if path is not None and value is not _NO_CONSTANT and not isinstance(value, list):
                return holds_atom(path, value, substring=False)
    return expression_atom(expr, negate)


def ast_key(expr: cel.Expr) -> tuple[Any, ...]:
    """A structural, hashable key of an AST (positions ignored)."""
    if isinstance(expr, cel.Literal):
        return ("lit", const_key(expr.value))
    if isinstance(expr, cel.Ident):
        return ("id", expr.name)
    if isinstance(expr, cel.Select):
        return ("sel", ast_key(expr.operand), expr.field, expr.test_only)
    if isinstance(expr, cel.Call):
        target = None if expr.target is None else ast_key(expr.target)
        return ("call", expr.function, target, tuple(ast_key(a) for a in expr.args))
    return (type(expr).__name__, tuple(ast_key(c) for c in children(expr)))


# ------------------------------------------------------- node compilation


def compile_node(expr: cel.Expr, core: _core.Core | None = None) -> _core.Node:
    """Compile a CEL AST to the extension's evaluator.

    With a ``core``, ``doc`` is the event document: field paths under it are
    read through the core's per-event path cache. Without one, identifiers
    are looked up in the bindings passed at evaluation time.
    """
    if core is not None:
        path = doc_path(expr)
        if path is not None:
            return _core.DocPath(core.path_id(path))
    if isinstance(expr, cel.Literal):
        return _core.Const(expr.value)
    if isinstance(expr, cel.Ident):
        if core is not None and expr.name == "doc":
            return _core.Root()
        return _core.Ident(expr.name)
    if isinstance(expr, cel.Select):
        return _core.Field(compile_node(expr.operand, core), expr.field, expr.test_only)
    if isinstance(expr, cel.Index):
        return _core.Index(compile_node(expr.operand, core), compile_node(expr.index, core))
    if isinstance(expr, cel.ListExpr):
        return _core.ListLit([compile_node(e, core) for e in expr.items])
    if isinstance(expr, cel.MapExpr):
        return _core.MapLit(
            [compile_node(k, core) for k, _ in expr.entries],
            [compile_node(v, core) for _, v in expr.entries],
        )
    if isinstance(expr, cel.Call):
        return _compile_call(expr, core)
    raise TypeError(f"not a CEL expression: {expr!r}")


def _compile_call(expr: cel.Call, core: _core.Core | None) -> _core.Node:
    fn = expr.function
    if expr.target is None and fn in ("_&&_", "_||_"):
        terms: list[_core.Node] = []
        _flatten(expr, fn, core, terms)
        return _core.Junction(terms, fn == "_&&_")
    args = [compile_node(a, core) for a in expr.args]
    target = None if expr.target is None else compile_node(expr.target, core)
    if target is None:
        if fn == "!_" and len(args) == 1:
            return _core.Not(args[0])
        if fn == "-_" and len(args) == 1:
            return _core.Neg(args[0])
        if fn == "_?_:_" and len(args) == 3:
            return _core.Cond(*args)
        if fn in _CMP_FUNCTIONS and len(args) == 2:
            return _core.Binary(_CMP_FUNCTIONS[fn], *args)
        if fn in _ARITH_FUNCTIONS and len(args) == 2:
            return _core.Binary(_ARITH_FUNCTIONS[fn], *args)
        if fn == "@in" and len(args) == 2:
            return _core.Binary("in", *args)
        if fn == "size" and len(args) == 1:
            return _core.Size(args[0])
        if fn == "matches" and len(args) == 2:
            return _core.StringFunction(fn, *args)
    else:
        if fn == "size" and not args:
            return _core.Size(target)
        if fn in ("contains", "startsWith", "endsWith", "matches") and len(args) == 1:
            return _core.StringFunction(fn, target, args[0])
    # Unknown functions are rejected at subscribe time by cel.check; outside
    # subscriptions (conformance) they are an evaluation error, as in CEL.
    return _core.Const(_core.ERROR)


def _flatten(expr: cel.Expr, fn: str, core: _core.Core | None, out: list[_core.Node]) -> None:
    if isinstance(expr, cel.Call) and expr.function == fn and expr.target is None:
        for arg in expr.args:
            _flatten(arg, fn, core, out)
    else:
        out.append(compile_node(expr, core))


def evaluate(expr: cel.Expr, bindings: dict[str, object]) -> object:
    """Evaluate with the compiled evaluator; errors raise ``cel.CelEvalError``."""
    value = compile_node(expr)(bindings)
    if value is _core.ERROR:
        raise cel.CelEvalError("evaluation error")
    return value
