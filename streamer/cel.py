"""CEL front end: parser, subscription checker and reference interpreter.

This module owns three things:

* :func:`parse` turns the source of a subscription's CEL expression into a
  small AST (the node classes below).  It implements the CEL grammar for the
  supported subset, including the full literal syntax (hex ints, doubles,
  raw / triple-quoted strings and every escape), and it bounds the work a
  hostile expression can cause: length, nesting depth and node count are
  limited and checked while parsing, so no input string makes it raise
  anything but :class:`CelSyntaxError` (never ``RecursionError``).
* :func:`check` validates a parsed expression for the subscription
  environment: the only variable is ``doc`` and only a small set of functions
  exists.  ``matches`` patterns given as literals are compiled (RE2) here.
* :func:`evaluate` is the reference interpreter: a plain tree walk that is the
  simple, obviously-correct definition of the semantics (CEL's error-absorbing
  ``&&``/``||``, heterogeneous equality, int64 overflow checks, RE2
  ``matches``...).  The compiled evaluator used on the hot path lives
  elsewhere and is tested against this one.

Positions.  Every node has ``pos``, the 0-based offset of the token that
introduces it (CEL's convention for error columns): a literal, identifier,
list, map, unary operator or global call starts at that token; a binary
operator or ``?:`` sits at its operator; a field selection at its ``.``; an
index at its ``[``; a receiver call at the function name; ``has(a.b)`` at
``has``.

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

import functools
import math
import re
from collections.abc import Callable, Mapping
from itertools import accumulate
from typing import TypeAlias, cast

import re2

from streamer.errors import InvalidSubscription

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

MAX_EXPRESSION_LENGTH = 4096
MAX_DEPTH = 64
MAX_NODES = 1024
# Equality walks nested lists and maps; values nested deeper than this compare
# as an evaluation error (documents are data: they must not exhaust the stack).
MAX_VALUE_DEPTH = 100

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


def _children(node: Expr) -> tuple[Expr, ...]:
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


# --------------------------------------------------------------------------
# Lexer
#
# One regex splits the source: each match is (leading whitespace, token).
# ``re.split`` returns those pieces as a flat list in C, token offsets come
# from the running sum of the piece lengths, and only the classification of
# each token is done in Python.  The catch-all last alternative matches any
# other non-blank character, so nothing but whitespace is ever left between
# matches.

_TOKEN_RE = re.compile(
    r"""
    ([ \t\n\r\f]*)
    (   [_a-zA-Z][_a-zA-Z0-9]*+(?!['"])                   # identifier, keyword
      | [0-9]+\.[0-9]+(?:[eE][+-]?[0-9]+)?                 # double
      | [0-9]+[eE][+-]?[0-9]+
      | \.[0-9]+(?:[eE][+-]?[0-9]+)?
      | (?:0[xX][0-9a-fA-F]+|[0-9]+)[uU]?                    # int (u: rejected later)
      | == | != | <= | >= | && | \|\| | //[^\n]*           # two-char operators, comment
      | [-+*/%<>!?:.,()\[\]{}]                            # one-char operators
      | (?:[rR][bB]?|[bB][rR])                            # raw string (or raw bytes)
        (?: '''.*?''' | \"\"\".*?\"\"\" | '(?!'')[^'\n\r]*' | "(?!"")[^"\n\r]*" )
      | [bB]?                                             # string (or bytes)
        (?: '''(?:[^'\\]|\\.|'(?!''))*+'''
          | \"\"\"(?:[^"\\]|\\.|"(?!""))*+\"\"\"
          | '(?!'')(?:[^'\\\n\r]|\\.)*+'
          | "(?!"")(?:[^"\\\n\r]|\\.)*+" )
      | [rRbB]{0,2}(?:'''|\"\"\"|'|")                    # unterminated string
      | [_a-zA-Z][_a-zA-Z0-9]*                            # identifier before a quote
      | `[^`\n\r]*`                                       # quoted field name
      | [^ \t\n\r\f]                                      # anything else: an error
    )
    """,
    re.VERBOSE | re.DOTALL,
)

_OPERATOR_TOKENS = frozenset("== != <= >= && || - + * / % < > ! ? : . , ( ) [ ] { }".split())
_OP_KINDS: dict[str, str] = {op: op for op in _OPERATOR_TOKENS}

_ID_START = frozenset("_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_KEYWORDS: dict[str, tuple[str, LiteralValue]] = {
    "true": ("lit", True),
    "false": ("lit", False),
    "null": ("lit", None),
    "in": ("in", "in"),
}

_RESERVED = frozenset(
    "as break const continue else for function if import let loop package namespace"
    " return var void while".split()
)

_UNSUPPORTED_MACROS = frozenset(("all", "exists", "exists_one", "map", "filter"))

_QUOTED_FIELD_RE = re.compile(r"[A-Za-z0-9_.\-/ ]+")

_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "?": "?",
    '"': '"',
    "'": "'",
    "`": "`",
}

_ESCAPE_RE = re.compile(
    r"""\\(?:([abfnrtv\\?"'`])|([0-3][0-7][0-7])|[xX]([0-9a-fA-F]{2})"""
    r"|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))"
)

_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _col(pos: int) -> str:
    return f"column {pos + 1}"


def _quote(text: str) -> str:
    """``'text'`` as written in the source (repr only if it is not printable)."""
    return f"'{text}'" if text.isprintable() else repr(text)


def _unescape(body: str, offset: int) -> str:
    """Process the escapes of a non-raw string body that starts at ``offset``.

    Raises CelSyntaxError for an invalid escape.
    """
    out: list[str] = []
    j = 0
    find = body.find
    while True:
        k = find("\\", j)
        if k < 0:
            out.append(body[j:])
            return "".join(out)
        out.append(body[j:k])
        m = _ESCAPE_RE.match(body, k)
        if m is None:
            bad = body[k : k + 2]
            raise CelSyntaxError(f"invalid escape sequence {_quote(bad)} at {_col(offset + k)}")
        simple, octal, hex2, hex4, hex8 = m.groups()
        if simple is not None:
            out.append(_SIMPLE_ESCAPES[simple])
        else:
            if octal is not None:
                cp = int(octal, 8)
            else:
                cp = int(hex2 or hex4 or hex8, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise CelSyntaxError(
                    f"invalid escape sequence {_quote(m.group())} (not a Unicode code point)"
                    f" at {_col(offset + k)}"
                )
            out.append(chr(cp))
        j = m.end()


def _string_token(text: str, pos: int) -> tuple[str, object]:
    """Classify a token that starts like a string literal: ``(kind, value)``."""
    prefix_len = 0
    while text[prefix_len] not in "'\"":
        prefix_len += 1
    rest = text[prefix_len:]
    quote = rest[0] * 3 if rest.startswith(rest[0] * 3) else rest[0]
    q = len(quote)
    if len(rest) < 2 * q or not rest.endswith(quote):
        return "err", f"unterminated string at {_col(pos)}"
    prefix = text[:prefix_len]
    if "b" in prefix or "B" in prefix:
        return "err", f"bytes literals are not supported at {_col(pos)}"
    body = rest[q:-q]
    if prefix or "\\" not in body:  # the only other prefix is r/R: raw
        return "str", body
    try:
        return "str", _unescape(body, pos + q)
    except CelSyntaxError as e:
        return "err", str(e)


def _classify(text: str, pos: int) -> tuple[str, object]:
    """``(kind, value)`` of a token that is not an operator or an identifier."""
    c = text[0]
    if c in "0123456789.":
        if text[:2] in ("0x", "0X"):
            if text[-1] in "uU":
                return "err", f"unsigned integer literals are not supported at {_col(pos)}"
            value = int(text, 16)
        elif "." in text or "e" in text or "E" in text:
            return "num", float(text)
        elif text[-1] in "uU":
            return "err", f"unsigned integer literals are not supported at {_col(pos)}"
        else:
            value = int(text)
        # An int above INT64_MAX is only valid right after a unary minus.
        return ("int" if value <= INT64_MAX else "bigint"), value
    if text.startswith("//"):
        return "comment", None
    if c in "'\"" or text[-1] in "'\"":
        return _string_token(text, pos)
    if c == "`":
        name = text[1:-1]
        if len(text) < 2 or text[-1] != "`":
            return "err", f"unterminated quoted field name at {_col(pos)}"
        if _QUOTED_FIELD_RE.fullmatch(name) is None:
            return "err", f"invalid quoted field name {text!r} at {_col(pos)}"
        return "qid", name
    return "err", f"unexpected character {c!r} at {_col(pos)}"


# Token kinds of operators, plus identifiers as they are seen (bounded), so
# that most tokens are classified by one C-level ``map`` over a dict.
_KIND_CACHE: dict[str, str] = dict(_OP_KINDS)
_KIND_CACHE_LIMIT = 8192


def _tokenize(src: str) -> tuple[list[str], list[object], list[int]]:
    """Split ``src`` into parallel lists of token kinds, values and offsets.

    Kinds: an operator's own text, ``id``, ``in``, ``lit`` (true, false,
    null), ``int``, ``bigint`` (only valid after ``-``), ``num``, ``str``,
    ``qid`` (backquoted field), ``err`` and finally ``eof``.  Lexical errors
    become ``err`` tokens carrying their message; the parser raises one only
    if it reaches it, so the first error in source order is the one reported.
    """
    parts = _TOKEN_RE.split(src)
    texts: list[str] = parts[2::3]
    poss: list[int] = list(accumulate(map(len, parts)))[1::3]
    kinds: list[str | None] = list(map(_KIND_CACHE.get, texts))
    vals = cast(list[object], texts)  # the same list: literals get their values in place
    if None in kinds:
        j = -1
        for _ in range(kinds.count(None)):
            j = kinds.index(None, j + 1)
            text = vals[j]
            assert isinstance(text, str)
            c = text[0]
            if c in _ID_START and text[-1] not in "'\"":
                keyword = _KEYWORDS.get(text)
                if keyword is None:
                    kinds[j] = "id"
                    if len(_KIND_CACHE) < _KIND_CACHE_LIMIT:
                        _KIND_CACHE[text] = "id"
                else:
                    kinds[j], vals[j] = keyword
            elif (
                (c == "'" or c == '"')
                and text[-1] == c
                and len(text) > 1
                and "\\" not in text
                and not text.startswith(c * 3)
            ):
                kinds[j] = "str"  # the common case: a plain quoted string
                vals[j] = text[1:-1]
            elif len(text) < 19 and text.isascii() and text.isdigit():  # a small int
                kinds[j] = "int"
                vals[j] = int(text)
            else:
                kinds[j], vals[j] = _classify(text, poss[j])
        if "comment" in kinds:
            keep = [j for j, kind in enumerate(kinds) if kind != "comment"]
            kinds = [kinds[j] for j in keep]
            vals = [vals[j] for j in keep]
            poss = [poss[j] for j in keep]
    kinds.append("eof")
    vals.append(None)
    poss.append(len(src))
    return kinds, vals, poss  # type: ignore[return-value]  # no None left in kinds


# --------------------------------------------------------------------------
# Parser

_BINARY_OPS: dict[str, tuple[int, str]] = {
    "||": (1, "_||_"),
    "&&": (2, "_&&_"),
    "==": (3, "_==_"),
    "!=": (3, "_!=_"),
    "<": (3, "_<_"),
    "<=": (3, "_<=_"),
    ">": (3, "_>_"),
    ">=": (3, "_>=_"),
    "in": (3, "@in"),
    "+": (4, "_+_"),
    "-": (4, "_-_"),
    "*": (5, "_*_"),
    "/": (5, "_/_"),
    "%": (5, "_%_"),
}

_LITERAL_KINDS = frozenset(("lit", "str", "num", "int"))


class _Parser:
    """Pratt parser over the token lists produced by :func:`_tokenize`.

    ``depth`` counts the enclosing constructs (operators, calls, brackets and
    parentheses) and is checked on entry to every operand, so recursion is
    bounded by ``max_depth`` whatever the input.
    """

    __slots__ = ("i", "kinds", "max_depth", "poss", "src", "vals")

    def __init__(
        self, src: str, kinds: list[str], vals: list[object], poss: list[int], max_depth: int
    ) -> None:
        self.src = src
        self.kinds = kinds
        self.vals = vals
        self.poss = poss
        self.i = 0
        self.max_depth = max_depth

    # -- errors

    def error_here(self) -> CelSyntaxError:
        """The error for an unexpected token at the current position."""
        i = self.i
        kind = self.kinds[i]
        pos = self.poss[i]
        if kind == "err":
            return CelSyntaxError(str(self.vals[i]))
        if kind == "eof":
            return CelSyntaxError(f"unexpected end of expression at {_col(pos)}")
        m = _TOKEN_RE.match(self.src, pos)
        text = m.group(2) if m is not None else self.src[pos : pos + 1]
        if len(text) > 24:
            text = text[:21] + "..."
        return CelSyntaxError(f"unexpected {text!r} at {_col(pos)}")

    def expect(self, kind: str) -> None:
        if self.kinds[self.i] != kind:
            raise self.error_here()
        self.i += 1

    # -- grammar

    def expr(self, depth: int) -> Expr:
        """expr := or ('?' or ':' expr)?"""
        cond = self.binary(1, depth)
        if self.kinds[self.i] != "?":
            return cond
        pos = self.poss[self.i]
        self.i += 1
        then = self.binary(1, depth + 1)
        self.expect(":")
        other = self.expr(depth + 1)
        return Call("_?_:_", None, (cond, then, other), pos)

    def binary(self, min_prec: int, depth: int) -> Expr:
        """Precedence climbing over the left-associative binary operators."""
        return self.binary_rest(self.operand(depth), min_prec, depth)

    def binary_rest(self, left: Expr, min_prec: int, depth: int) -> Expr:
        """Continue a binary expression whose first operand is ``left``."""
        kinds = self.kinds
        while True:
            op = _BINARY_OPS.get(kinds[self.i])
            if op is None or op[0] < min_prec:
                return left
            prec = op[0]
            pos = self.poss[self.i]
            self.i += 1
            right = self.operand(depth + 1)
            follow = _BINARY_OPS.get(kinds[self.i])
            if follow is not None and follow[0] > prec:
                # A tighter operator follows: it takes ``right`` as its left operand.
                right = self.binary_rest(right, prec + 1, depth + 1)
            left = Call(op[1], None, (left, right), pos)

    def operand(self, depth: int) -> Expr:
        """unary := member | '!'+ member | '-'+ member;  member := primary postfix*

        Runs of '!' or '-' cancel in pairs, as in the CEL reference parsers.
        """
        if depth > self.max_depth:
            raise CelSyntaxError(
                f"expression nests deeper than {self.max_depth} levels at {_col(self.poss[self.i])}"
            )
        kinds = self.kinds
        i = self.i
        kind = kinds[i]
        node: Expr
        if kind == "id" and kinds[i + 1] != "(":
            name = cast(str, self.vals[i])
            if name in _RESERVED:
                raise CelSyntaxError(
                    f"reserved word {name!r} cannot be used as an identifier"
                    f" at {_col(self.poss[i])}"
                )
            node = Ident(name, self.poss[i])
            self.i = i + 1
        elif kind in _LITERAL_KINDS:
            node = Literal(cast(LiteralValue, self.vals[i]), self.poss[i])
            self.i = i + 1
        elif kind == "!" or kind == "-":
            j = i + 1
            while kinds[j] == kind:
                j += 1
            count = j - i
            if count == 1 and kind == "-" and kinds[j] in ("int", "bigint", "num"):
                node = self.primary(depth)  # a negative number literal
            else:
                self.i = j
                node = self.operand_after_unary(depth + 1)
                if count % 2 == 0:
                    return node
                return Call("!_" if kind == "!" else "-_", None, (node,), self.poss[i])
        else:
            node = self.primary(depth)
        kind = kinds[self.i]
        if kind == "." or kind == "[":
            return self.postfix(node, depth)
        return node

    def operand_after_unary(self, depth: int) -> Expr:
        """The member after a run of '!' or '-' (which may not start another run)."""
        if depth > self.max_depth:
            raise CelSyntaxError(
                f"expression nests deeper than {self.max_depth} levels at {_col(self.poss[self.i])}"
            )
        node = self.primary(depth)
        kind = self.kinds[self.i]
        if kind == "." or kind == "[":
            return self.postfix(node, depth)
        return node

    def postfix(self, node: Expr, depth: int) -> Expr:
        """member := member '.' field | member '.' name '(' args ')' | member '[' expr ']'"""
        kinds = self.kinds
        while True:
            kind = kinds[self.i]
            if kind == ".":
                dot = self.poss[self.i]
                self.i += 1
                kind = kinds[self.i]
                name = cast(str, self.vals[self.i])
                if kind == "id":
                    npos = self.poss[self.i]
                    self.i += 1
                    if kinds[self.i] == "(":
                        if name in _UNSUPPORTED_MACROS:
                            raise CelSyntaxError(f"macro {name!r} is not supported at {_col(npos)}")
                        node = Call(name, node, self.args(depth + 1), npos)
                    else:
                        node = Select(node, name, False, dot)
                elif kind == "qid":
                    self.i += 1
                    node = Select(node, name, False, dot)
                else:
                    raise self.error_here()
            elif kind == "[":
                pos = self.poss[self.i]
                self.i += 1
                index = self.expr(depth + 1)
                self.expect("]")
                node = Index(node, index, pos)
            else:
                return node

    def args(self, depth: int) -> tuple[Expr, ...]:
        """'(' (expr (',' expr)*)? ')' -- the current token is the '('."""
        self.i += 1
        if self.kinds[self.i] == ")":
            self.i += 1
            return ()
        items = [self.expr(depth)]
        while self.kinds[self.i] == ",":
            self.i += 1
            items.append(self.expr(depth))
        self.expect(")")
        return tuple(items)

    def primary(self, depth: int) -> Expr:
        kinds = self.kinds
        i = self.i
        kind = kinds[i]
        pos = self.poss[i]
        if kind == "id":
            name = cast(str, self.vals[i])
            self.i = i + 1
            if kinds[i + 1] == "(":
                if name == "has":
                    return self.has(pos, depth)
                if name in _RESERVED:
                    raise CelSyntaxError(f"reserved word {name!r} is not a function at {_col(pos)}")
                return Call(name, None, self.args(depth + 1), pos)
            if name in _RESERVED:
                raise CelSyntaxError(
                    f"reserved word {name!r} cannot be used as an identifier at {_col(pos)}"
                )
            return Ident(name, pos)
        if kind in _LITERAL_KINDS:
            self.i = i + 1
            return Literal(cast(LiteralValue, self.vals[i]), pos)
        if kind == "(":
            self.i = i + 1
            node = self.expr(depth + 1)
            self.expect(")")
            return node
        if kind == "[":
            return self.list_literal(pos, depth)
        if kind == "{":
            return self.map_literal(pos, depth)
        if kind == "-" and kinds[i + 1] in ("int", "bigint", "num"):
            value = self.vals[i + 1]
            assert isinstance(value, (int, float))
            if isinstance(value, int) and -value < INT64_MIN:
                raise CelSyntaxError(f"integer literal out of the int64 range at {_col(pos)}")
            self.i = i + 2
            return Literal(-value, pos)
        if kind == "bigint":
            raise CelSyntaxError(f"integer literal out of the int64 range at {_col(pos)}")
        if kind == "." and kinds[i + 1] == "id":
            # Leading dot: a name resolved from the root namespace (same thing here).
            self.i = i + 1
            node = self.primary(depth)
            if isinstance(node, Ident) or (isinstance(node, Call) and node.function != "has"):
                return node
            self.i = i
        raise self.error_here()

    def has(self, pos: int, depth: int) -> Expr:
        args = self.args(depth + 1)
        if len(args) == 1:
            arg = args[0]
            if isinstance(arg, Select) and not arg.test_only:
                return Select(arg.operand, arg.field, True, pos)
        raise CelSyntaxError(f"has() needs a single field selection like has(doc.f) at {_col(pos)}")

    def list_literal(self, pos: int, depth: int) -> Expr:
        kinds = self.kinds
        self.i += 1
        items: list[Expr] = []
        while kinds[self.i] != "]":
            items.append(self.expr(depth + 1))
            if kinds[self.i] != ",":
                break
            self.i += 1
        self.expect("]")
        return ListExpr(tuple(items), pos)

    def map_literal(self, pos: int, depth: int) -> Expr:
        kinds = self.kinds
        self.i += 1
        entries: list[tuple[Expr, Expr]] = []
        while kinds[self.i] != "}":
            key = self.expr(depth + 1)
            self.expect(":")
            entries.append((key, self.expr(depth + 1)))
            if kinds[self.i] != ",":
                break
            self.i += 1
        self.expect("}")
        return MapExpr(tuple(entries), pos)


def _check_size(expr: Expr, max_depth: int, max_nodes: int) -> None:
    """Enforce the AST depth and node limits (iteratively)."""
    stack: list[tuple[Expr, int]] = [(expr, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_nodes:
            raise CelSyntaxError(f"expression has more than {max_nodes} nodes")
        if depth > max_depth:
            raise CelSyntaxError(
                f"expression nests deeper than {max_depth} levels at {_col(node.pos)}"
            )
        # Children reversed: the walk is pre-order, left to right.
        for child in reversed(_children(node)):
            stack.append((child, depth + 1))


def parse(
    source: str,
    *,
    max_length: int = MAX_EXPRESSION_LENGTH,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> Expr:
    """Parse a CEL expression.

    Raises :class:`CelSyntaxError` (and nothing else) for any bad input, with
    a 1-based column in the message where one applies.
    """
    if not isinstance(source, str):
        raise TypeError(f"CEL source must be str, not {type(source).__name__}")
    if len(source) > max_length:
        raise CelSyntaxError(
            f"expression is {len(source)} characters long; the limit is {max_length}"
        )
    if not source.isascii():
        m = _SURROGATE_RE.search(source)
        if m is not None:
            raise CelSyntaxError(f"invalid character (lone surrogate) at {_col(m.start())}")
    kinds, vals, poss = _tokenize(source)
    parser = _Parser(source, kinds, vals, poss, max_depth)
    try:
        expr = parser.expr(1)
    except RecursionError:
        raise CelSyntaxError(f"expression nests deeper than {max_depth} levels") from None
    if kinds[parser.i] != "eof":
        raise parser.error_here()
    # Every node owns a distinct token, so a short expression cannot exceed
    # the limits and the walk is skipped on the common path.
    ntokens = len(kinds) - 1
    if ntokens > max_depth or ntokens > max_nodes:
        _check_size(expr, max_depth, max_nodes)
    return expr


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
def _compile_regex(pattern: str) -> tuple[object, str | None]:
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


def _call_shape_ok(node: Call) -> bool:
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
                    f"undeclared reference to {node.name!r} at {_col(node.pos)}"
                )
        elif t is Call:
            assert isinstance(node, Call)
            if not _call_shape_ok(node):
                raise InvalidSubscription(
                    f"unsupported function {node.function!r} at {_col(node.pos)}"
                )
            if node.function == "matches":
                pattern = node.args[0] if node.target is not None else node.args[1]
                if isinstance(pattern, Literal) and isinstance(pattern.value, str):
                    _, err = _compile_regex(pattern.value)
                    if err is not None:
                        raise InvalidSubscription(
                            f"invalid regular expression {_quote(pattern.value)}"
                            f" at {_col(pattern.pos)}: {err}"
                        )
        elif t not in (Literal, Select, Index, ListExpr, MapExpr):
            raise InvalidSubscription(f"unsupported expression node {t.__name__}")
        stack.extend(reversed(_children(node)))


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
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        return [*a, *b]
    raise _no_overload("_+_", a, b)


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
    regexp, err = _compile_regex(pattern)
    if regexp is None:
        raise CelEvalError(f"invalid regular expression {_quote(pattern)}: {err}")
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
