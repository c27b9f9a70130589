"""The CEL AST: node classes, the limits every parser applies, the errors,
and the column/quoting helpers of error messages.

Positions.  Every node has ``pos``, the 0-based offset of the token that
introduces it (CEL's convention for error columns): a literal, identifier,
list, map, unary operator or global call starts at that token; a binary
operator or ``?:`` sits at its operator; a field selection at its ``.``; an
index at its ``[``; a receiver call at the function name; ``has(a.b)`` at
``has``.
"""

from __future__ import annotations

import math
from typing import TypeAlias

from streamer.errors import InvalidSubscription

MAX_EXPRESSION_LENGTH = 4096
MAX_DEPTH = 64
MAX_NODES = 1024
# Equality walks nested lists and maps; values nested deeper than this compare
# as an evaluation error (documents are data: they must not exhaust the stack).
MAX_VALUE_DEPTH = 100
# A string or list concatenation whose result would hold more characters or
# items is an evaluation error: documents are data, and an expression of a
# thousand `+` over a large field must not copy gigabytes per event.
MAX_CONCAT = 4096

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class CelSyntaxError(InvalidSubscription):
    """The expression does not parse, or uses syntax outside the subset."""


class CelEvalError(Exception):
    """A CEL runtime error (division by zero, no such key, bad operand...).

    Internal: an expression that errors simply does not match.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def col(pos: int) -> str:
    return f"column {pos + 1}"


def quote(text: str) -> str:
    """``'text'`` as written in the source (repr only if it is not printable)."""
    return f"'{text}'" if text.isprintable() else repr(text)


# --------------------------------------------------------------------------
# AST

LiteralValue: TypeAlias = bool | int | float | str | None


def _same_literal(a: LiteralValue, b: LiteralValue) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if a != a:
            return b != b
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


class Expr:
    """Base class of the AST nodes."""

    __slots__ = ("pos",)
    pos: int


class Literal(Expr):
    """A constant: ``None`` (null), ``bool``, ``int`` (int64), ``float`` or ``str``."""

    __slots__ = ("value",)
    value: LiteralValue

    def __init__(self, value: LiteralValue, pos: int = 0) -> None:
        self.value = value
        self.pos = pos

    def __repr__(self) -> str:
        return f"Literal({self.value!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Literal:
            return NotImplemented
        return _same_literal(self.value, other.value)

    def __hash__(self) -> int:
        v = self.value
        return hash(("Literal", type(v).__name__, repr(v) if isinstance(v, float) else v))


class Ident(Expr):
    """A variable reference (``doc``)."""

    __slots__ = ("name",)
    name: str

    def __init__(self, name: str, pos: int = 0) -> None:
        self.name = name
        self.pos = pos

    def __repr__(self) -> str:
        return f"Ident({self.name!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Ident:
            return NotImplemented
        return self.name == other.name

    def __hash__(self) -> int:
        return hash(("Ident", self.name))


class Select(Expr):
    """Field selection ``operand.field``; ``test_only`` for ``has(operand.field)``."""

    __slots__ = ("field", "operand", "test_only")
    operand: Expr
    field: str
    test_only: bool

    def __init__(self, operand: Expr, field: str, test_only: bool = False, pos: int = 0) -> None:
        self.operand = operand
        self.field = field
        self.test_only = test_only
        self.pos = pos

    def __repr__(self) -> str:
        return f"Select({self.operand!r}, {self.field!r}, {self.test_only!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Select:
            return NotImplemented
        return (
            self.field == other.field
            and self.test_only == other.test_only
            and self.operand == other.operand
        )

    def __hash__(self) -> int:
        return hash(("Select", self.operand, self.field, self.test_only))


class Index(Expr):
    """Indexing ``operand[index]``."""

    __slots__ = ("index", "operand")
    operand: Expr
    index: Expr

    def __init__(self, operand: Expr, index: Expr, pos: int = 0) -> None:
        self.operand = operand
        self.index = index
        self.pos = pos

    def __repr__(self) -> str:
        return f"Index({self.operand!r}, {self.index!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Index:
            return NotImplemented
        return self.operand == other.operand and self.index == other.index

    def __hash__(self) -> int:
        return hash(("Index", self.operand, self.index))


class Call(Expr):
    """A function or operator call.

    ``target`` is ``None`` for global calls and operators, else the receiver
    of ``target.function(args)``.  Operators use CEL's canonical names
    (``_&&_``, ``!_``, ``-_``, ``_?_:_``, ``_==_``, ``@in``...).
    """

    __slots__ = ("args", "function", "target")
    function: str
    target: Expr | None
    args: tuple[Expr, ...]

    def __init__(
        self, function: str, target: Expr | None, args: tuple[Expr, ...], pos: int = 0
    ) -> None:
        self.function = function
        self.target = target
        self.args = args
        self.pos = pos

    def __repr__(self) -> str:
        return f"Call({self.function!r}, {self.target!r}, {self.args!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not Call:
            return NotImplemented
        return (
            self.function == other.function
            and self.target == other.target
            and self.args == other.args
        )

    def __hash__(self) -> int:
        return hash(("Call", self.function, self.target, self.args))


class ListExpr(Expr):
    """A list literal ``[a, b, ...]``."""

    __slots__ = ("items",)
    items: tuple[Expr, ...]

    def __init__(self, items: tuple[Expr, ...], pos: int = 0) -> None:
        self.items = items
        self.pos = pos

    def __repr__(self) -> str:
        return f"ListExpr({self.items!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not ListExpr:
            return NotImplemented
        return self.items == other.items

    def __hash__(self) -> int:
        return hash(("ListExpr", self.items))


class MapExpr(Expr):
    """A map literal ``{k: v, ...}``; ``entries`` holds ``(key, value)`` pairs."""

    __slots__ = ("entries",)
    entries: tuple[tuple[Expr, Expr], ...]

    def __init__(self, entries: tuple[tuple[Expr, Expr], ...], pos: int = 0) -> None:
        self.entries = entries
        self.pos = pos

    def __repr__(self) -> str:
        return f"MapExpr({self.entries!r})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not MapExpr:
            return NotImplemented
        return self.entries == other.entries

    def __hash__(self) -> int:
        return hash(("MapExpr", self.entries))


def children(node: Expr) -> tuple[Expr, ...]:
    t = type(node)
    if t is Call:
        assert isinstance(node, Call)
        if node.target is None:
            return node.args
        return (node.target, *node.args)
    if t is Select:
        assert isinstance(node, Select)
        return (node.operand,)
    if t is Index:
        assert isinstance(node, Index)
        return (node.operand, node.index)
    if t is ListExpr:
        assert isinstance(node, ListExpr)
        return node.items
    if t is MapExpr:
        assert isinstance(node, MapExpr)
        return tuple(x for entry in node.entries for x in entry)
    return ()
