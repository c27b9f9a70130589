"""The CEL parser: a regex lexer and a Pratt parser for the supported
subset, bounded in length, depth and node count."""

from __future__ import annotations

import re
from itertools import accumulate
from typing import cast

from streamer.matching.cel.nodes import (
    INT64_MAX,
    INT64_MIN,
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    MAX_NODES,
    Call,
    CelSyntaxError,
    Expr,
    Ident,
    Index,
    ListExpr,
    Literal,
    LiteralValue,
    MapExpr,
    Select,
    children,
    col,
    quote,
)

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

RESERVED = frozenset(
    "as break const continue else for function if import let loop package namespace"
    " return var void while".split()
)

UNSUPPORTED_MACROS = frozenset(("all", "exists", "exists_one", "map", "filter"))

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
            raise CelSyntaxError(f"invalid escape sequence {quote(bad)} at {col(offset + k)}")
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
                    f"invalid escape sequence {quote(m.group())} (not a Unicode code point)"
                    f" at {col(offset + k)}"
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
        return "err", f"unterminated string at {col(pos)}"
    prefix = text[:prefix_len]
    if "b" in prefix or "B" in prefix:
        return "err", f"bytes literals are not supported at {col(pos)}"
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
                return "err", f"unsigned integer literals are not supported at {col(pos)}"
            value = int(text, 16)
        elif "." in text or "e" in text or "E" in text:
            return "num", float(text)
        elif text[-1] in "uU":
            return "err", f"unsigned integer literals are not supported at {col(pos)}"
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
            return "err", f"unterminated quoted field name at {col(pos)}"
        if _QUOTED_FIELD_RE.fullmatch(name) is None:
            return "err", f"invalid quoted field name {text!r} at {col(pos)}"
        return "qid", name
    return "err", f"unexpected character {c!r} at {col(pos)}"


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
            return CelSyntaxError(f"unexpected end of expression at {col(pos)}")
        m = _TOKEN_RE.match(self.src, pos)
        text = m.group(2) if m is not None else self.src[pos : pos + 1]
        if len(text) > 24:
            text = text[:21] + "..."
        return CelSyntaxError(f"unexpected {text!r} at {col(pos)}")

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
                f"expression nests deeper than {self.max_depth} levels at {col(self.poss[self.i])}"
            )
        kinds = self.kinds
        i = self.i
        kind = kinds[i]
        node: Expr
        if kind == "id" and kinds[i + 1] != "(":
            name = cast(str, self.vals[i])
            if name in RESERVED:
                raise CelSyntaxError(
                    f"reserved word {name!r} cannot be used as an identifier"
                    f" at {col(self.poss[i])}"
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
                f"expression nests deeper than {self.max_depth} levels at {col(self.poss[self.i])}"
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
                        if name in UNSUPPORTED_MACROS:
                            raise CelSyntaxError(f"macro {name!r} is not supported at {col(npos)}")
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
                if name in RESERVED:
                    raise CelSyntaxError(f"reserved word {name!r} is not a function at {col(pos)}")
                return Call(name, None, self.args(depth + 1), pos)
            if name in RESERVED:
                raise CelSyntaxError(
                    f"reserved word {name!r} cannot be used as an identifier at {col(pos)}"
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
                raise CelSyntaxError(f"integer literal out of the int64 range at {col(pos)}")
            self.i = i + 2
            return Literal(-value, pos)
        if kind == "bigint":
            raise CelSyntaxError(f"integer literal out of the int64 range at {col(pos)}")
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
        raise CelSyntaxError(f"has() needs a single field selection like has(doc.f) at {col(pos)}")

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


def check_size(expr: Expr, max_depth: int, max_nodes: int) -> None:
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
                f"expression nests deeper than {max_depth} levels at {col(node.pos)}"
            )
        # Children reversed: the walk is pre-order, left to right.
        for child in reversed(children(node)):
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
            raise CelSyntaxError(f"invalid character (lone surrogate) at {col(m.start())}")
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
        check_size(expr, max_depth, max_nodes)
    return expr
