"""The reference interpreter: a plain tree walk that is the simple,
obviously-correct definition of the semantics (CEL's error-absorbing
``&&``/``||``, heterogeneous equality, int64 overflow checks, RE2
``matches``...). The compiled evaluator of the hot path is tested against it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from streamer.matching.cel.checker import compile_regex
from streamer.matching.cel.nodes import (
    INT64_MAX,
    INT64_MIN,
    MAX_CONCAT,
    MAX_VALUE_DEPTH,
    Call,
    CelEvalError,
    Expr,
    Ident,
    Index,
    ListExpr,
    Literal,
    MapExpr,
    Select,
    quote,
)

# --------------------------------------------------------------------------
# Reference evaluator

_TYPE_NAMES: dict[type, str] = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "double",
    str: "string",
    list: "list",
    dict: "map",
}


def _type_name(value: object) -> str:
    name = _TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    if isinstance(value, dict):
        return "map"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _no_overload(fn: str, *values: object) -> CelEvalError:
    types = ", ".join(_type_name(v) for v in values)
    return CelEvalError(f"no matching overload for '{fn}' applied to ({types})")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _to_double(i: int) -> float:
    try:
        return float(i)
    except OverflowError:
        return math.inf if i > 0 else -math.inf


def _checked(i: int) -> int:
    if not INT64_MIN <= i <= INT64_MAX:
        raise CelEvalError("integer overflow")
    return i


def _equals(a: object, b: object, depth: int = 0) -> bool:
    """CEL heterogeneous equality (never an error for known value types)."""
    if depth > MAX_VALUE_DEPTH:
        raise CelEvalError(f"values nest deeper than {MAX_VALUE_DEPTH} levels")
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int):
        if isinstance(b, int):
            return a == b
        if isinstance(b, float):
            return _to_double(a) == b
        return False
    if isinstance(a, float):
        if isinstance(b, float):
            return a == b
        if isinstance(b, int):
            return a == _to_double(b)
        return False
    if isinstance(a, str):
        return isinstance(b, str) and a == b
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return False
        return all(_equals(x, y, depth + 1) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if not isinstance(b, dict) or len(a) != len(b):
            return False
        for key, value in a.items():
            found, other = _map_find(b, key)
            if not found or not _equals(value, other, depth + 1):
                return False
        return True
    raise CelEvalError(f"unsupported value of type {type(a).__name__}")


def _map_find(m: dict[object, object], key: object) -> tuple[bool, object]:
    """Look ``key`` up in a CEL map with CEL key equality.

    Python's ``True == 1`` means a dict lookup alone cannot tell a bool key
    from an int key, so those are confirmed by type.  Integral doubles find
    int keys (CEL numeric key equality).  Errors for unsupported key types.
    """
    if isinstance(key, str):
        if key in m:
            return True, m[key]
        return False, None
    if isinstance(key, float):
        if not key.is_integer() or not INT64_MIN <= key <= INT64_MAX:
            return False, None
        key = int(key)
    if isinstance(key, (bool, int)):
        if key not in m:
            return False, None
        want_bool = isinstance(key, bool)
        for k, v in m.items():
            if isinstance(k, (bool, int)) and isinstance(k, bool) == want_bool and k == key:
                return True, v
        return False, None
    raise CelEvalError(f"unsupported map key type {_type_name(key)}")


def _less(a: object, b: object, fn: str) -> tuple[object, object]:
    """Return the two operands ready for Python ordering, or raise."""
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, bool) and isinstance(b, bool):
            return a, b
        raise _no_overload(fn, a, b)
    if isinstance(a, int):
        if isinstance(b, int):
            return a, b
        if isinstance(b, float):
            return _to_double(a), b
    elif isinstance(a, float):
        if isinstance(b, float):
            return a, b
        if isinstance(b, int):
            return a, _to_double(b)
    elif isinstance(a, str) and isinstance(b, str):
        return a, b
    raise _no_overload(fn, a, b)


def _op_lt(a: object, b: object) -> object:
    x, y = _less(a, b, "_<_")
    return x < y  # type: ignore[operator]


def _op_le(a: object, b: object) -> object:
    x, y = _less(a, b, "_<=_")
    return x <= y  # type: ignore[operator]


def _op_gt(a: object, b: object) -> object:
    x, y = _less(a, b, "_>_")
    return x > y  # type: ignore[operator]


def _op_ge(a: object, b: object) -> object:
    x, y = _less(a, b, "_>=_")
    return x >= y  # type: ignore[operator]


def _op_eq(a: object, b: object) -> object:
    return _equals(a, b)


def _op_ne(a: object, b: object) -> object:
    return not _equals(a, b)


def _op_add(a: object, b: object) -> object:
    if _is_int(a) and _is_int(b):
        assert isinstance(a, int) and isinstance(b, int)
        return _checked(a + b)
    if isinstance(a, float) and isinstance(b, float):
        return a + b
    if isinstance(a, str) and isinstance(b, str):
        _check_concat(len(a) + len(b))
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        _check_concat(len(a) + len(b))
        return [*a, *b]
    raise _no_overload("_+_", a, b)


def _check_concat(length: int) -> None:
    if length > MAX_CONCAT:
        raise CelEvalError(f"concatenation of {length} elements; the limit is {MAX_CONCAT}")


def _op_sub(a: object, b: object) -> object:
    if _is_int(a) and _is_int(b):
        assert isinstance(a, int) and isinstance(b, int)
        return _checked(a - b)
    if isinstance(a, float) and isinstance(b, float):
        return a - b
    raise _no_overload("_-_", a, b)


def _op_mul(a: object, b: object) -> object:
    if _is_int(a) and _is_int(b):
        assert isinstance(a, int) and isinstance(b, int)
        return _checked(a * b)
    if isinstance(a, float) and isinstance(b, float):
        return a * b
    raise _no_overload("_*_", a, b)


def _op_div(a: object, b: object) -> object:
    if _is_int(a) and _is_int(b):
        assert isinstance(a, int) and isinstance(b, int)
        if b == 0:
            raise CelEvalError("division by zero")
        q = abs(a) // abs(b)  # truncate toward zero
        return _checked(q if (a < 0) == (b < 0) else -q)
    if isinstance(a, float) and isinstance(b, float):
        if b == 0.0:
            if a == 0.0 or a != a:
                return math.nan
            return math.copysign(math.inf, a) * math.copysign(1.0, b)
        return a / b
    raise _no_overload("_/_", a, b)


def _op_mod(a: object, b: object) -> object:
    if _is_int(a) and _is_int(b):
        assert isinstance(a, int) and isinstance(b, int)
        if b == 0:
            raise CelEvalError("modulus by zero")
        if a == INT64_MIN and b == -1:
            raise CelEvalError("integer overflow")
        r = abs(a) % abs(b)  # the result has the sign of the dividend
        return -r if a < 0 else r
    raise _no_overload("_%_", a, b)


def _op_in(a: object, b: object) -> object:
    if isinstance(b, list):
        return any(_equals(a, x) for x in b)
    if isinstance(b, dict):
        return _map_find(b, a)[0]
    raise _no_overload("@in", a, b)


def _fn_size(a: object) -> object:
    if isinstance(a, (str, list, dict)):
        return len(a)
    raise _no_overload("size", a)


def _string_fn(name: str, op: Callable[[str, str], bool]) -> Callable[[object, object], object]:
    def impl(s: object, arg: object) -> object:
        if isinstance(s, str) and isinstance(arg, str):
            return op(s, arg)
        raise _no_overload(name, s, arg)

    return impl


def _fn_matches(s: object, pattern: object) -> object:
    if not (isinstance(s, str) and isinstance(pattern, str)):
        raise _no_overload("matches", s, pattern)
    regexp, err = compile_regex(pattern)
    if regexp is None:
        raise CelEvalError(f"invalid regular expression {quote(pattern)}: {err}")
    try:
        return regexp.search(s) is not None  # type: ignore[attr-defined]
    except UnicodeError as e:
        raise CelEvalError(f"matches: {e}") from None


_BINARY_IMPLS: dict[str, Callable[[object, object], object]] = {
    "_==_": _op_eq,
    "_!=_": _op_ne,
    "_<_": _op_lt,
    "_<=_": _op_le,
    "_>_": _op_gt,
    "_>=_": _op_ge,
    "_+_": _op_add,
    "_-_": _op_sub,
    "_*_": _op_mul,
    "_/_": _op_div,
    "_%_": _op_mod,
    "@in": _op_in,
}

_RECEIVER_IMPLS: dict[str, Callable[[object, object], object]] = {
    "contains": _string_fn("contains", lambda s, t: t in s),
    "startsWith": _string_fn("startsWith", str.startswith),
    "endsWith": _string_fn("endsWith", str.endswith),
    "matches": _fn_matches,
}


class _Evaluator:
    """The tree walk; one instance per :func:`evaluate` call."""

    __slots__ = ("bindings",)

    def __init__(self, bindings: Mapping[str, object]) -> None:
        self.bindings = bindings

    def eval(self, node: Expr) -> object:
        t = type(node)
        if t is Literal:
            assert isinstance(node, Literal)
            return node.value
        if t is Ident:
            assert isinstance(node, Ident)
            try:
                return self.bindings[node.name]
            except KeyError:
                raise CelEvalError(f"undeclared reference to {node.name!r}") from None
        if t is Select:
            assert isinstance(node, Select)
            return self.select(node)
        if t is Call:
            assert isinstance(node, Call)
            return self.call(node)
        if t is Index:
            assert isinstance(node, Index)
            return self.index(self.eval(node.operand), self.eval(node.index))
        if t is ListExpr:
            assert isinstance(node, ListExpr)
            return [self.eval(item) for item in node.items]
        if t is MapExpr:
            assert isinstance(node, MapExpr)
            return self.map_literal(node)
        raise CelEvalError(f"unsupported expression node {t.__name__}")

    def select(self, node: Select) -> object:
        obj = self.eval(node.operand)
        if not isinstance(obj, dict):
            raise CelEvalError(
                f"type {_type_name(obj)} does not support field selection ('{node.field}')"
            )
        if node.test_only:
            return node.field in obj
        try:
            return obj[node.field]
        except KeyError:
            raise CelEvalError(f"no such key: {node.field!r}") from None

    def index(self, obj: object, key: object) -> object:
        if isinstance(obj, list):
            if isinstance(key, float) and key.is_integer():
                key = int(key)
            if not _is_int(key):
                raise CelEvalError(f"invalid list index of type {_type_name(key)}")
            assert isinstance(key, int)
            if not 0 <= key < len(obj):
                raise CelEvalError(f"index {key} out of range for a list of size {len(obj)}")
            return obj[key]
        if isinstance(obj, dict):
            found, value = _map_find(obj, key)
            if not found:
                raise CelEvalError(f"no such key: {key!r}")
            return value
        raise CelEvalError(f"type {_type_name(obj)} does not support indexing")

    def map_literal(self, node: MapExpr) -> object:
        result: dict[object, object] = {}
        for key_expr, value_expr in node.entries:
            key = self.eval(key_expr)
            if not isinstance(key, (str, int)):  # bool is an int subclass
                raise CelEvalError(f"unsupported map key type {_type_name(key)}")
            value = self.eval(value_expr)
            if key in result:
                if _map_find(result, key)[0]:
                    raise CelEvalError(f"duplicate map key {key!r}")
                raise CelEvalError("a map with both true and 1 (or false and 0) as keys")
            result[key] = value
        return result

    def logic(self, node: Call, absorbing: bool) -> object:
        """``_&&_`` (absorbing=False) / ``_||_`` (absorbing=True), CEL style.

        The absorbing value on either side wins even over an error; otherwise
        an error, or a non-bool operand, is an error.
        """
        left_error: CelEvalError | None = None
        right_error: CelEvalError | None = None
        left: object = None
        right: object = None
        try:
            left = self.eval(node.args[0])
        except CelEvalError as e:
            left_error = e
        if left is absorbing:
            return absorbing
        try:
            right = self.eval(node.args[1])
        except CelEvalError as e:
            right_error = e
        if right is absorbing:
            return absorbing
        if left_error is not None:
            raise left_error
        if right_error is not None:
            raise right_error
        if not isinstance(left, bool) or not isinstance(right, bool):
            raise _no_overload(node.function, left, right)
        return not absorbing

    def call(self, node: Call) -> object:
        fn = node.function
        args = node.args
        target = node.target
        if target is None:
            binary = _BINARY_IMPLS.get(fn)
            if binary is not None and len(args) == 2:
                return binary(self.eval(args[0]), self.eval(args[1]))
            if fn == "_&&_" and len(args) == 2:
                return self.logic(node, False)
            if fn == "_||_" and len(args) == 2:
                return self.logic(node, True)
            if fn == "_?_:_" and len(args) == 3:
                cond = self.eval(args[0])
                if not isinstance(cond, bool):
                    raise _no_overload("_?_:_", cond)
                return self.eval(args[1] if cond else args[2])
            if fn == "!_" and len(args) == 1:
                value = self.eval(args[0])
                if not isinstance(value, bool):
                    raise _no_overload("!_", value)
                return not value
            if fn == "-_" and len(args) == 1:
                value = self.eval(args[0])
                if _is_int(value):
                    assert isinstance(value, int)
                    return _checked(-value)
                if isinstance(value, float):
                    return -value
                raise _no_overload("-_", value)
            if fn == "size" and len(args) == 1:
                return _fn_size(self.eval(args[0]))
            if fn == "matches" and len(args) == 2:
                return _fn_matches(self.eval(args[0]), self.eval(args[1]))
        else:
            if fn == "size" and not args:
                return _fn_size(self.eval(target))
            receiver = _RECEIVER_IMPLS.get(fn)
            if receiver is not None and len(args) == 1:
                return receiver(self.eval(target), self.eval(args[0]))
        raise CelEvalError(f"unknown function {fn!r} with {len(args)} argument(s)")


def evaluate(expr: Expr, bindings: Mapping[str, object]) -> object:
    """Evaluate ``expr`` with the given variable bindings (reference semantics).

    Returns ``None``, ``bool``, ``int``, ``float``, ``str``, ``list`` or
    ``dict``; raises :class:`CelEvalError` for a CEL runtime error.  Work is
    linear in the size of the AST (plus the size of the values it touches).
    """
    try:
        return _Evaluator(bindings).eval(expr)
    except RecursionError:
        raise CelEvalError("expression nests too deeply to evaluate") from None
