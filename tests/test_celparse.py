"""Differential tests of the compiled CEL parser (streamer/_ext/_celparse.pyx).

``streamer.matching.cel`` is the reference: for every input, ``_celparse.parse`` must
return the same AST (node types, fields *and* ``pos``) or raise the same
exception class with the same message, and ``_celparse.parse(s, check=True)``
must behave exactly like ``cel.parse(s)`` followed by ``cel.check``.  Inputs:
the conformance expressions, every bad input pinned in test_cel.py, and
hypothesis-generated text (arbitrary text, CEL-ish token soups, deep nesting,
long inputs, escapes, int64 bounds), also under small limits.
"""

from __future__ import annotations

import importlib.machinery
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_cel import CASES, CEL_TOKENS, CHECK_ERRORS, PARSE_ERRORS, _expr

from streamer._ext import _celparse
from streamer.errors import InvalidSubscription
from streamer.matching import cel
from streamer.matching.cel.nodes import children

assert _celparse.__file__ is not None and _celparse.__file__.endswith(
    tuple(importlib.machinery.EXTENSION_SUFFIXES)
), f"streamer._ext._celparse is not the compiled extension: {_celparse.__file__}"

def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )

# --------------------------------------------------------------------------
# The comparison


def _fields(node: cel.Expr) -> tuple[object, ...]:
    """The non-node fields of ``node`` (children are compared by the walk)."""
    if isinstance(node, cel.Literal):
        return (type(node.value), node)  # Literal.__eq__: type-exact, -0.0, NaN
    if isinstance(node, cel.Ident):
        return (node.name,)
    if isinstance(node, cel.Select):
        return (node.field, node.test_only)
    if isinstance(node, cel.Call):
        return (node.function, node.target is None, len(node.args))
    if isinstance(node, cel.ListExpr):
        return (len(node.items),)
    if isinstance(node, cel.MapExpr):
        return (len(node.entries),)
    return ()


def assert_same_tree(ours: cel.Expr, ref: cel.Expr) -> None:
    """Same node types, fields and ``pos`` everywhere (iterative: trees can be deep)."""
    stack = [(ours, ref, "root")]
    while stack:
        a, b, where = stack.pop()
        assert type(a) is type(b), (where, a, b)
        assert type(a.pos) is int and a.pos == b.pos, (where, a.pos, b.pos)
        assert _fields(a) == _fields(b), (where, a, b)
        if isinstance(a, cel.Literal):
            assert isinstance(b, cel.Literal)
            assert type(a.value) is type(b.value) and a == b, (where, a, b)
        if isinstance(a, cel.MapExpr):
            assert isinstance(b, cel.MapExpr)
            for entry in (*a.entries, *b.entries):
                assert type(entry) is tuple and len(entry) == 2, (where, entry)
        assert all(type(seq) is tuple for seq in _sequences(a)), (where, a)
        pairs = zip(children(a), children(b), strict=True)
        stack.extend((x, y, f"{where}/{type(a).__name__}") for x, y in pairs)


def _sequences(node: cel.Expr) -> tuple[object, ...]:
    if isinstance(node, cel.Call):
        return (node.args,)
    if isinstance(node, cel.ListExpr):
        return (node.items,)
    if isinstance(node, cel.MapExpr):
        return (node.entries,)
    return ()


def _reference(source: str, *, check: bool = False, **limits: int) -> cel.Expr:
    expr = cel.parse(source, **limits)
    if check:
        cel.check(expr)
    return expr


def _outcome(
    parse: Callable[..., cel.Expr], source: str, check: bool, limits: dict[str, int]
) -> tuple[str, object]:
    try:
        return "ok", parse(source, check=check, **limits)
    except InvalidSubscription as e:  # CelSyntaxError is one
        return type(e).__name__, str(e)


def same_as_reference(source: str, **limits: int) -> None:
    """The compiled parser agrees with the reference on ``source``, with and
    without ``check``.  Any other exception (or a crash) fails the test."""
    for check in (False, True):
        ref = _outcome(_reference, source, check, limits)
        ours = _outcome(_celparse.parse, source, check, limits)
        if ref[0] == "ok" and ours[0] == "ok":
            assert isinstance(ref[1], cel.Expr) and isinstance(ours[1], cel.Expr)
            assert_same_tree(ours[1], ref[1])
        else:
            assert ours == ref, (source, check)


# --------------------------------------------------------------------------
# Pinned inputs


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance_expressions(case: dict[str, Any]) -> None:
    same_as_reference(case["expr"])


def test_conformance_expressions_parse() -> None:
    assert len(CASES) == 589
    for case in CASES:
        assert _celparse.parse(case["expr"]) == cel.parse(case["expr"])


@pytest.mark.parametrize(("source", "message"), PARSE_ERRORS, ids=range(len(PARSE_ERRORS)))
def test_parse_errors(source: str, message: str) -> None:
    with pytest.raises(cel.CelSyntaxError) as info:
        _celparse.parse(source)
    assert str(info.value) == message
    same_as_reference(source)


@pytest.mark.parametrize(("source", "message"), CHECK_ERRORS, ids=range(len(CHECK_ERRORS)))
def test_check_errors(source: str, message: str) -> None:
    assert _celparse.parse(source) == cel.parse(source)
    with pytest.raises(InvalidSubscription) as info:
        _celparse.parse(source, check=True)
    assert type(info.value) is InvalidSubscription
    assert str(info.value) == message
    same_as_reference(source)


ODD_INPUTS = [
    # Comments, including the reference's reading of one that ends with a quote.
    "1 // c\n + 2",
    "// it's 'x'",
    "1 + // abc 'x'",
    "1 // x'",
    '1 //"',
    "// only",
    "doc.a == // 'x'\n 1",
    # Prefixed, raw, triple-quoted and unterminated strings.
    "r''",
    "R\"\"",
    "b''",
    "rb'x'",
    "Br\"x\"",
    "bR'''x'''",
    "rr'x'",
    "bb'x'",
    "rbr'x'",
    "xr'x'",
    "r'''a''''",
    "'''''",
    "''''''",
    "'''a\\''''",
    "r'\\'",
    "r'a\nb'",
    "'a\nb'",
    "'a\\\nb'",
    "'''a\nb'''",
    "\"\"\"a\"\"b\"\"\"",
    "'\\",
    "'''\\",
    "'abc\\'",
    "\"it's\"",
    # Every escape form, valid and not.
    "'\\a\\b\\f\\n\\r\\t\\v\\\\\\?\\\"\\'\\`'",
    "'\\000\\377\\400\\38'",
    "'\\x4G'",
    "'\\X41\\x4'",
    "'\\u00E9\\u00e'",
    "'\\U0001F600\\U0010FFFF'",
    "'\\U00110000'",
    "'\\udfff'",
    "'\\uD7FF\\uE000'",
    "'\\z'",
    "'é\\n😀'",
    # Numbers.
    "0x",
    "0xg",
    "0X1F",
    "0x1Fu",
    "1U",
    "1uu",
    "07",
    "1.e5",
    "1.5.3",
    ".5e+3",
    "1e",
    "1e+",
    "1E-2",
    "1.5e",
    "00x1",
    "1_000",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "- 9223372036854775808",
    "-(9223372036854775808)",
    "18446744073709551615",
    "-18446744073709551616",
    "0x7fffffffffffffff",
    "0x8000000000000000",
    "-0x8000000000000000",
    "-0x8000000000000001",
    "0xffffffffffffffffff",
    "1" * 40,
    "-" + "9" * 400,
    "1e308 + 1e309 + 2.2250738585072014e-308 + 5e-324 + 1e-400",
    "0.1 + 0.30000000000000004 + 123456789012345678901234567890.5",
    "1" * 70 + ".5",
    "-0.0",
    "--0.0",
    "-0",
    # Identifiers, keywords, reserved words and macros.
    "in",
    "doc.in",
    "true.a",
    "doc.true",
    "null",
    "if",
    "doc.if",
    "while(1)",
    "doc.while()",
    "has(doc)",
    "has(doc.a.b)",
    "has(has(doc.a))",
    "has()",
    "has",
    ".doc",
    ".has(doc.a)",
    ".f(1)",
    ". doc",
    "..doc",
    ".1",
    ".if",
    "doc.exists(x, x)",
    "doc.all",
    "exists(doc)",
    "doc.`a-b`.`c/d.e f`",
    "doc.``",
    "doc.`a`b",
    "doc.`é`",
    "doc.`a\nb`",
    "`a`",
    # Operators and structure.
    "!!!a",
    "--a",
    "!-a",
    "-!a",
    "- -1",
    "-(-1)",
    "a ? b : c ? d : e",
    "a ? b ? c : d : e",
    "a ?",
    "(a",
    "a)",
    "[,]",
    "[1,,]",
    "{,}",
    "{1:2,}",
    "{1}",
    "{1:}",
    "f(,)",
    "a.b.(c)",
    "a[1",
    "a[]",
    "a = b",
    "a & b",
    "a | b",
    "a === b",
    "a !== b",
    "a <> b",
    "a # b",
    "a @ b",
    "a \x0b b",
    "a\x00",
    "a\u00a0b",
    "\ud800",
    "a + '\ud83d'",
    " \t\r\n\f",
    "x" * 30 + " y",
    "'" + "x" * 30 + "' y",
]


@pytest.mark.parametrize("source", ODD_INPUTS, ids=range(len(ODD_INPUTS)))
def test_odd_inputs(source: str) -> None:
    same_as_reference(source)


ALL_PINNED = [c["expr"] for c in CASES] + [s for s, _ in PARSE_ERRORS + CHECK_ERRORS] + ODD_INPUTS


def test_positions_of_every_token_kind() -> None:
    """Tiny depth limits make the parser fail at the first operand, naming the
    column of its token, whatever kind it is (errors included)."""
    for source in ALL_PINNED:
        if len(source) > 200:
            continue
        for prefix in ("", "1 + ", "(", "f(", "!"):
            same_as_reference(prefix + source, max_depth=1)
        same_as_reference(source, max_depth=0)
        same_as_reference(source, max_nodes=1)


SMALL_TREES = [
    "1", "a.b.c.d", "a || b || c || d", "[1, [2, [3]]]", "!(a)", "-(-(1))", "a ? b : c",
    "f(g(h(1)))", "has(a.b.c)", "{1: {2: 3}}", "a[b[c]]",
]  # fmt: skip


def test_limits() -> None:
    for limits in ({"max_depth": 1}, {"max_depth": 3}, {"max_nodes": 1}, {"max_nodes": 5}):
        for source in SMALL_TREES:
            same_as_reference(source, **limits)
    for max_length in (0, 3, 4):
        same_as_reference("1234", max_length=max_length)
    for zero in (0, -1, -(10**30)):
        same_as_reference("a", max_depth=zero)
        same_as_reference("a", max_nodes=zero)
        same_as_reference("a", max_length=zero)
    same_as_reference("[" * 70 + "]" * 70, max_depth=10**30, max_nodes=10**30, max_length=10**30)
    same_as_reference(" || ".join(["true"] * 70), max_depth=100)
    same_as_reference("[" + "1," * 1100 + "]", max_nodes=1100)


def test_deep_nesting_never_overflows_the_stack() -> None:
    for opener, closer in (
        ("(", ")"), ("[", "]"), ("!(", ")"), ("a[", "]"), ("f(", ")"), ("{1:", "}"),
        ("has(", ")"), ("a.f(", ")"), ("-(", ")"), ("1 ? 2 : ", ""), ("1 || (", ")"),
    ):  # fmt: skip
        source = opener * 10_000 + "1" + closer * 10_000
        same_as_reference(source, max_length=10**6)
        with pytest.raises(cel.CelSyntaxError, match="nests deeper than 64 levels at column"):
            _celparse.parse(source, max_length=10**6)
        # The reference runs into Python's recursion limit, we into _HARD_DEPTH:
        # both give up with the message without a column.
        same_as_reference(source, max_length=10**6, max_depth=10**6)
    # Long chains are iterative; long unary runs cancel in pairs.
    for source in ["!" * 10_000 + "true", "-" * 9_999 + "1", "a" + ".b" * 5_000,
                   "1" + " + 1" * 5_000, "a" + "[0]" * 5_000]:  # fmt: skip
        same_as_reference(source, max_length=10**6)
        same_as_reference(source, max_length=10**6, max_depth=10**6, max_nodes=10**6)


def test_not_a_string() -> None:
    for value in (None, b"doc", 1, ["doc"]):
        with pytest.raises(TypeError) as ours:
            _celparse.parse(value)  # type: ignore[arg-type]
        with pytest.raises(TypeError) as ref:
            cel.parse(value)  # type: ignore[arg-type]
        assert str(ours.value) == str(ref.value)


def test_str_subclass() -> None:
    class S(str):
        pass

    same_as_reference(S("doc.a == 'x' && doc.`b-c` in [1, 2]"))


# --------------------------------------------------------------------------
# Fuzzing

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]

EXTRA_TOKENS = [
    *SURROGATES, "é", "😀", "\u00a0", "\u2028", "\x00", "\x0b", "\x0c", "\r", "\t", "$", "@", "~",
    ";", "^", "===", "!==", "<>", "=>", "'''", '"""', "r", "R", "b", "B", "rb", "br", "bR", "Rb",
    "rr", "bb", "u", "U", "x", "e", "E", "0x", "0X", "0xFF", "0xffffffffffffffff",
    "0x8000000000000000", "0x7fffffffffffffff", "0x10000000000000000", "9223372036854775806",
    "9223372036854775809", "18446744073709551615", "18446744073709551616", "00", "1.", ".5",
    "1.5e", "1e+5", "1E-5", "1e309", "5e-324", "2.5u", "r'\\n'", "R'''a'b'''", "b\"x\"",
    "'\\x41'", "'\\X4'", "'\\101'", "'\\400'", "'\\u00e9'", "'\\uD800'", "'\\U0001F600'",
    "'\\U00110000'", "'\\q'", "'a\\'", "'\\", "'''a\nb'''", "'\\\n'", "`a.b-c/d e`", "`a~`", "`",
    "//x'", "// 'q'", "// b'", "has(", "has(doc.a)", ".doc", "..", "doc.all(x, x)", "a.b(", "f(",
    "while", "package", "null", "true", "in", "doc.in", "]]", "))", "}}", "((", "[[", "{{",
]  # fmt: skip

TOKENS = [*CEL_TOKENS, *EXTRA_TOKENS]
SEPARATORS = ["", " ", "", "\n", "\t", " \f "]

token_soup = st.lists(
    st.tuples(st.sampled_from(TOKENS), st.sampled_from(SEPARATORS)), max_size=30
).map(lambda parts: "".join(t + s for t, s in parts))

# Limits small enough that token soups hit them (and large ones, the defaults).
limits = st.fixed_dictionaries(
    {},
    optional={
        "max_depth": st.integers(-1, 70),
        "max_nodes": st.integers(-1, 40),
        "max_length": st.integers(0, 120),
    },
)


@fuzz(1500)
@given(source=st.text(st.characters(exclude_categories=()), max_size=60))
def test_fuzz_arbitrary_text(source: str) -> None:
    same_as_reference(source)


@fuzz(1000)
@given(source=st.text("doc.ab1_'\"\\`rRbBxuU0xe+-!()[]{}<=>&|?:, /\n", max_size=40))
def test_fuzz_cel_alphabet(source: str) -> None:
    same_as_reference(source)


@fuzz(3000)
@example(source="// it's 'x'")
@given(source=token_soup)
def test_fuzz_token_soup(source: str) -> None:
    same_as_reference(source)


@fuzz(1500)
@given(source=token_soup, limits=limits)
def test_fuzz_token_soup_limits(source: str, limits: dict[str, int]) -> None:
    same_as_reference(source, **limits)


@fuzz(800)
@given(source=st.integers(1, 5).flatmap(lambda d: _expr("bool", d)))
def test_fuzz_valid_expressions(source: str) -> None:
    same_as_reference(source)
    same_as_reference(source.replace("doc", "d"))  # undeclared references
    same_as_reference(source.replace("size(", "sz(").replace(".contains(", ".has("))


@st.composite
def _string_literal(draw: st.DrawFn) -> str:
    """A string literal of random pieces: text and every escape form, good or bad."""
    pieces = st.sampled_from([
        "a", "é", "😀", " ", "'", '"', "`", "\\a", "\\b", "\\f", "\\n", "\\r", "\\t", "\\v",
        "\\\\", "\\?", "\\\"", "\\'", "\\`", "\\0", "\\07", "\\077", "\\377", "\\378", "\\400",
        "\\x", "\\x4", "\\x41", "\\X7f", "\\xG1", "\\u", "\\u00e", "\\u00e9", "\\uD7FF",
        "\\uD800", "\\uDFFF", "\\uE000", "\\U", "\\U0001F600", "\\U0010FFFF", "\\U00110000",
        "\\UFFFFFFFF", "\\q", "\\8", "\\\n", "\n", "\r", "\\ ", "\\é", "\x00",
    ])  # fmt: skip
    body = "".join(draw(st.lists(pieces, max_size=8)))
    prefix = draw(st.sampled_from(["", "", "r", "R", "b", "rb", "BR"]))
    quote = draw(st.sampled_from(["'", '"', "'''", '"""']))
    close = draw(st.sampled_from([quote, quote, "", quote[0]]))
    return prefix + quote + body + close


@fuzz(1500)
@given(
    literal=_string_literal(),
    context=st.sampled_from(["{}", "doc.s == {}", "{} + 'x'", "[{}, {}]", "doc.s.matches({})"]),
)
def test_fuzz_string_literals(literal: str, context: str) -> None:
    same_as_reference(context.replace("{}", literal))


INT64_EDGES = [0, 1, 2**31, 2**53 + 1, 2**63 - 2, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 1, 2**64,
               10**19, 10**30]  # fmt: skip


@fuzz(800)
@given(
    n=st.sampled_from(INT64_EDGES) | st.integers(0, 2**70),
    form=st.sampled_from(["{}", "0x{:x}", "0X{:X}", "{}u", "0x{:x}U", "{}.0", "{}e0", "{}.5e-3"]),
    sign=st.sampled_from(["", "-", "--", "- ", "-(", "!-", "1 -"]),
)
def test_fuzz_numbers(n: int, form: str, sign: str) -> None:
    source = sign + form.format(n, n) + (")" if sign.endswith("(") else "")
    same_as_reference(source)


def _nested(kind: str, n: int) -> dict[str, str]:
    return {
        "paren": "(" * n + "doc" + ")" * n,
        "list": "[" * n + "]" * n,
        "map": "{1:" * n + "x" + "}" * n,
        "call": "size(" * n + "doc" + ")" * n,
        "index": "doc" + "[doc" * n + "]" * n,
        "not": "!(" * n + "true" + ")" * n,
        "neg": "-(" * n + "1" + ")" * n,
        "or": " || ".join(["doc.a"] * n),
        "ternary": "doc ? 1 : " * n + "2",
        "select": "doc" + ".a" * n,
        "has": "has(" * n + "doc.a" + ")" * n,
        "unary": "!" * n + "-" * n + "1",
        "unbalanced": "(" * n + "1" + ")" * (n // 2),
    }


@fuzz(300)
@given(
    kind=st.sampled_from(sorted(_nested("x", 1))),
    n=st.integers(50, 80),
    limits=limits,
)
def test_fuzz_deep_nesting(kind: str, n: int, limits: dict[str, int]) -> None:
    limits.pop("max_length", None)
    same_as_reference(_nested(kind, n)[kind], **limits)



@fuzz(100)
@given(
    items=st.integers(0, 1200),
    item=st.sampled_from(["1", "doc.a", "'s'", "[1]", "-1", "x"]),
    trailer=st.sampled_from(["", ",", ")", " + 1", " && doc"]),
)
def test_fuzz_long_inputs(items: int, item: str, trailer: str) -> None:
    source = "[" + ", ".join([item] * items) + "]" + trailer
    same_as_reference(source)
    same_as_reference(source, max_length=10**6)
    same_as_reference("'" + "x" * items * 4 + "'", max_length=4096)
