"""Tests of the CEL front end (streamer.matching.cel): parser, checker, reference evaluator.

* ``test_conformance`` runs the cel-spec derived cases of
  ``tests/data/cel_spec_subset.json`` (see ``tests/data/README.md``) through every evaluator in
  ``EVALUATORS`` (add a compiled evaluator there with one line).
* Parse / check error messages are pinned exactly.
* Hypothesis: robustness fuzzing (only CelSyntaxError / CelEvalError ever
  escape) and a differential test against Google's cel-expr-python (cel-cpp).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from streamer.errors import InvalidSubscription
from streamer.matching import cel, compiler

# --------------------------------------------------------------------------
# Conformance

CONFORMANCE_PATH = Path(__file__).resolve().parent / "data" / "cel_spec_subset.json"
CASES: list[dict[str, Any]] = json.loads(CONFORMANCE_PATH.read_text(encoding="utf-8"))

# An evaluator takes a parsed expression and the bindings and returns the
# value, or raises cel.CelEvalError for a CEL runtime error.
Evaluator = Callable[[cel.Expr, Mapping[str, object]], object]
EVALUATORS: dict[str, Evaluator] = {
    "reference": lambda expr, bindings: cel.evaluate(expr, bindings),
    "compiled": lambda expr, bindings: compiler.evaluate(expr, dict(bindings)),
}

# Cases that cannot pass, with the reason (the goal is none).
SKIPPED: dict[str, str] = {}

# Error cases whose error is reported by the parser rather than at evaluation
# (a CelSyntaxError is accepted for exactly these; none so far).
SYNTAX_ERROR_CASES: dict[str, str] = {}

_PYTHON_TYPES: dict[str, type] = {
    "int": int,
    "double": float,
    "bool": bool,
    "string": str,
    "list": list,
    "map": dict,
    "null": type(None),
}


def same_value(actual: object, expected: object) -> bool:
    """Exact CEL value equality: types must match (1 is not 1.0, True is not 1),
    doubles compare exactly (NaN equals NaN here, -0.0 differs from 0.0)."""
    if type(actual) is not type(expected):
        return False
    if isinstance(actual, float) and isinstance(expected, float):
        if math.isnan(actual) or math.isnan(expected):
            return math.isnan(actual) and math.isnan(expected)
        return actual == expected and math.copysign(1.0, actual) == math.copysign(1.0, expected)
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(
            same_value(a, e) for a, e in zip(actual, expected, strict=True)
        )
    if isinstance(actual, dict) and isinstance(expected, dict):
        if len(actual) != len(expected):
            return False
        for key, value in actual.items():
            match = [k for k in expected if type(k) is type(key) and k == key]
            if not match or not same_value(value, expected[match[0]]):
                return False
        return True
    return actual == expected


@pytest.mark.parametrize("evaluator_name", sorted(EVALUATORS))
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_conformance(case: dict[str, Any], evaluator_name: str) -> None:
    name = case["name"]
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    expect = case["expect"]
    wants_error = expect == {"error": True}
    try:
        expr = cel.parse(case["expr"])
    except cel.CelSyntaxError as e:
        if wants_error and name in SYNTAX_ERROR_CASES:
            return  # expected: this error is found by the parser
        pytest.fail(f"parse failed: {e}")
    evaluator = EVALUATORS[evaluator_name]
    if wants_error:
        with pytest.raises(cel.CelEvalError):
            result = evaluator(expr, case["bindings"])
            pytest.fail(f"expected an evaluation error, got {result!r}")
        return
    result = evaluator(expr, case["bindings"])
    expected_type = _PYTHON_TYPES[case["expect_type"]]
    assert type(result) is expected_type, (result, case["expect_type"])
    assert same_value(result, expect), (result, expect)


def test_conformance_file_is_complete() -> None:
    assert len(CASES) == 589
    assert len({c["name"] for c in CASES}) == len(CASES)
    assert not SKIPPED


# --------------------------------------------------------------------------
# AST shapes

L, Id, S, C = cel.Literal, cel.Ident, cel.Select, cel.Call


def test_ast_shapes() -> None:
    a, b, c = Id("a"), Id("b"), Id("c")
    assert cel.parse("a && b && c") == C("_&&_", None, (C("_&&_", None, (a, b)), c))
    assert cel.parse("a || b && c") == C("_||_", None, (a, C("_&&_", None, (b, c))))
    assert cel.parse("a ? b : c ? a : b") == C("_?_:_", None, (a, b, C("_?_:_", None, (c, a, b))))
    assert cel.parse("1 - 2 - 3") == C("_-_", None, (C("_-_", None, (L(1), L(2))), L(3)))
    assert cel.parse("1 + 2 * 3") == C("_+_", None, (L(1), C("_*_", None, (L(2), L(3)))))
    assert cel.parse("a < b == true") == C("_==_", None, (C("_<_", None, (a, b)), L(True)))
    assert cel.parse("a in [1, 2,]") == C("@in", None, (a, cel.ListExpr((L(1), L(2)))))
    assert cel.parse("{'k': 1,}") == cel.MapExpr(((L("k"), L(1)),))
    assert cel.parse("size(a)") == C("size", None, (a,))
    assert cel.parse("a.size()") == C("size", a, ())
    assert cel.parse("a.startsWith('p')") == C("startsWith", a, (L("p"),))
    assert cel.parse("has(a.b)") == S(a, "b", True)
    assert cel.parse("a.b[0]") == cel.Index(S(a, "b"), L(0))
    assert cel.parse("a.`content-type`") == S(a, "content-type")
    assert cel.parse("a.if") == S(a, "if")  # reserved words are fine as fields
    assert cel.parse("a.as()") == C("as", a, ())
    assert cel.parse("!a") == C("!_", None, (a,))
    assert cel.parse("-a") == C("-_", None, (a,))
    assert cel.parse("!!a") == a  # pairs cancel, as in the CEL parsers
    assert cel.parse("---a") == C("-_", None, (a,))
    assert cel.parse("-(1)") == C("-_", None, (L(1),))
    assert cel.parse("-9223372036854775808") == L(-(2**63))
    assert cel.parse("- 2.5") == L(-2.5)
    assert cel.parse("0x55") == L(0x55)
    assert cel.parse(".5 + 1e3") == C("_+_", None, (L(0.5), L(1000.0)))
    assert cel.parse("(a) // comment\n") == a
    # Structural equality is type-exact.
    assert L(1) != L(1.0) and L(1) != L(True) and L(0.0) != L(-0.0)
    assert hash(cel.parse("a.b == 1")) == hash(cel.parse(" a . b==1 "))


def test_positions() -> None:
    expr = cel.parse("doc.a == 'x' && !doc.b")
    assert isinstance(expr, cel.Call)
    assert expr.pos == 13  # the operator
    eq, neg = expr.args
    assert isinstance(eq, cel.Call) and eq.pos == 6
    select = eq.args[0]
    assert isinstance(select, cel.Select) and select.pos == 3  # the '.'
    assert isinstance(select.operand, cel.Ident) and select.operand.pos == 0
    assert eq.args[1].pos == 9
    assert neg.pos == 16
    call = cel.parse("doc.s.matches('x')")
    assert isinstance(call, cel.Call) and call.pos == 6  # the function name


def test_repr() -> None:
    assert repr(cel.parse("a.b == 1")) == (
        "Call('_==_', None, (Select(Ident('a'), 'b', False), Literal(1)))"
    )


def test_literals() -> None:
    cases: dict[str, object] = {
        "'\\x41\\101\\u0041\\U00000041'": "AAAA",
        "'''a\nb'''": "a\nb",
        'r"\\n"': "\\n",
        "R'''\\'''": "\\",
        "'\\377'": "\u00ff",
        '"\\`\\?"': "`?",
        "9223372036854775807": 2**63 - 1,
        "-0x8000000000000000": -(2**63),
        "1e-324": 0.0,
        "1e400": math.inf,
        "07": 7,
    }
    for source, value in cases.items():
        expr = cel.parse(source)
        assert isinstance(expr, cel.Literal), source
        assert same_value(expr.value, value), (source, expr.value)


# --------------------------------------------------------------------------
# Parse errors

PARSE_ERRORS: list[tuple[str, str]] = [
    ("(doc.a == 1", "unexpected end of expression at column 12"),
    ("doc.a == 1)", "unexpected ')' at column 11"),
    ("(doc.a == 1))", "unexpected ')' at column 13"),
    ("", "unexpected end of expression at column 1"),
    ("doc.a == 'abc", "unterminated string at column 10"),
    ("'''abc''", "unterminated string at column 1"),
    ("doc.s == 'a\\qb'", "invalid escape sequence '\\q' at column 12"),
    ("'\\ud800'", "invalid escape sequence '\\ud800' (not a Unicode code point) at column 2"),
    (
        "'\\U00110000'",
        "invalid escape sequence '\\U00110000' (not a Unicode code point) at column 2",
    ),
    ("'\\400'", "invalid escape sequence '\\4' at column 2"),
    ("doc.n == 1u", "unsigned integer literals are not supported at column 10"),
    ("doc.b == b'x'", "bytes literals are not supported at column 10"),
    ("[1,2].exists(x, x > 1)", "macro 'exists' is not supported at column 7"),
    ("doc.l.map(x, x * 2)", "macro 'map' is not supported at column 7"),
    ("doc.a & doc.b", "unexpected character '&' at column 7"),
    ("doc.a = 1", "unexpected character '=' at column 7"),
    ("doc.a == 9223372036854775808", "integer literal out of the int64 range at column 10"),
    ("--9223372036854775808", "integer literal out of the int64 range at column 3"),
    ("-9223372036854775809", "integer literal out of the int64 range at column 1"),
    ("has(doc)", "has() needs a single field selection like has(doc.f) at column 1"),
    ("has(doc.a, doc.b)", "has() needs a single field selection like has(doc.f) at column 1"),
    ("if", "reserved word 'if' cannot be used as an identifier at column 1"),
    ("while(1)", "reserved word 'while' is not a function at column 1"),
    ("doc.`a~b`", "invalid quoted field name '`a~b`' at column 5"),
    ("doc.`a", "unterminated quoted field name at column 5"),
    ("doc.in", "unexpected 'in' at column 5"),
    ("!-doc.a", "unexpected '-' at column 2"),
    ("doc.a doc.b", "unexpected 'doc' at column 7"),
    ("[1, 2", "unexpected end of expression at column 6"),
    ("{1: 2", "unexpected end of expression at column 6"),
    ("f(1,)", "unexpected ')' at column 5"),
    ("a ? b", "unexpected end of expression at column 6"),
    ("x" * 5000, "expression is 5000 characters long; the limit is 4096"),
    ("(" * 10_000 + "1" + ")" * 10_000, "expression is 20001 characters long; the limit is 4096"),
    ("(" * 65 + "1" + ")" * 65, "expression nests deeper than 64 levels at column 65"),
    ("[" * 70 + "]" * 70, "expression nests deeper than 64 levels at column 65"),
    ("-(" * 40 + "1" + ")" * 40, "expression nests deeper than 64 levels at column 65"),
    ("[" + "1," * 1100 + "]", "expression has more than 1024 nodes"),
    (
        " || ".join(["true"] * 70),
        "expression nests deeper than 64 levels at column 38",  # the 5th '||'
    ),
]


@pytest.mark.parametrize(("source", "message"), PARSE_ERRORS, ids=range(len(PARSE_ERRORS)))
def test_parse_errors(source: str, message: str) -> None:
    with pytest.raises(cel.CelSyntaxError) as info:
        cel.parse(source)
    assert str(info.value) == message
    assert isinstance(info.value, InvalidSubscription)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "source",
    ["doc.a == 1 // it's 'x'", "doc.a == 1 // \"quoted\"", "doc.a == 1 // note\n"],
)
def test_comments_may_end_with_a_quote(source: str) -> None:
    # A comment ending in a quote was once read as a string literal.
    assert cel.parse(source) == cel.parse("doc.a == 1")


def test_deep_nesting_never_overflows_the_stack() -> None:
    for opener, closer in (("(", ")"), ("[", "]"), ("!(", ")"), ("a[", "]"), ("f(", ")")):
        source = opener * 10_000 + "1" + closer * 10_000
        with pytest.raises(cel.CelSyntaxError, match="nests deeper than 64 levels"):
            cel.parse(source, max_length=10**6)
    # Even with an absurd depth limit the answer is a CelSyntaxError.
    with pytest.raises(cel.CelSyntaxError, match="nests deeper"):
        cel.parse("(" * 100_000 + "1" + ")" * 100_000, max_length=10**6, max_depth=10**6)
    # Long unary runs are iterative and cancel in pairs.
    assert cel.parse("!" * 10_000 + "true", max_length=10**6) == L(True)


def test_limits_are_configurable() -> None:
    assert cel.parse(" || ".join(["true"] * 70), max_depth=100) is not None
    with pytest.raises(cel.CelSyntaxError, match="more than 3 nodes"):
        cel.parse("[1, 2, 3, 4]", max_nodes=3)
    with pytest.raises(cel.CelSyntaxError, match="the limit is 5"):
        cel.parse("123456", max_length=5)
    assert cel.parse("(" * 63 + "1" + ")" * 63) == L(1)  # parentheses count as levels


# --------------------------------------------------------------------------
# check()

CHECK_ERRORS: list[tuple[str, str]] = [
    ("x == 1", "undeclared reference to 'x' at column 1"),
    ("doc.a == 1 && other.b", "undeclared reference to 'other' at column 15"),
    ("doc.a.foo()", "unsupported function 'foo' at column 7"),
    ("foo(doc)", "unsupported function 'foo' at column 1"),
    ("size(doc.a, 1)", "unsupported function 'size' at column 1"),
    ("doc.a.size(1)", "unsupported function 'size' at column 7"),
    ("contains(doc.a, 'x')", "unsupported function 'contains' at column 1"),
    ("doc.a.startsWith()", "unsupported function 'startsWith' at column 7"),
    ("doc.a.exists_one2(1)", "unsupported function 'exists_one2' at column 7"),
    (
        "doc.s.matches('x[')",
        "invalid regular expression 'x[' at column 15: missing ]: [",
    ),
    (
        "matches(doc.s, '(a')",
        "invalid regular expression '(a' at column 16: missing ): (a",
    ),
    (
        "doc.s.matches('(a)\\\\1')",
        "invalid regular expression '(a)\\1' at column 15: invalid escape sequence: \\1",
    ),
]


@pytest.mark.parametrize(("source", "message"), CHECK_ERRORS, ids=range(len(CHECK_ERRORS)))
def test_check_errors(source: str, message: str) -> None:
    expr = cel.parse(source)
    with pytest.raises(InvalidSubscription) as info:
        cel.check(expr)
    assert str(info.value) == message


def test_check_accepts_the_environment() -> None:
    for source in [
        "doc.chat_id == 'c12' && doc.score >= 3.5",
        "has(doc.a) && doc.b.startsWith('x') || doc.c.endsWith('y') && doc.d.contains('z')",
        "size(doc.l) > 1 && doc.s.size() < 10 && !(doc.x in [1, 2.0, 'a'])",
        "doc.s.matches('^a+$') && matches(doc.s, doc.pattern) && doc.s.matches(doc.p)",
        "doc.m['k'][0] == {'a': [1]}['a'][0] ? -doc.n % 2 == 0 : doc.n / 2 * 3 + 1 - 1 != 0",
        ".doc.a == 1",
    ]:
        cel.check(cel.parse(source))


# --------------------------------------------------------------------------
# Evaluation semantics beyond the conformance file


def ev(source: str, doc: object = None, **bindings: object) -> object:
    if doc is not None:
        bindings["doc"] = doc
    return cel.evaluate(cel.parse(source), bindings)


def ev_error(source: str, doc: object = None, **bindings: object) -> str:
    with pytest.raises(cel.CelEvalError) as info:
        ev(source, doc, **bindings)
    return str(info.value)


def test_bool_is_not_a_number() -> None:
    assert ev("true == 1") is False
    assert ev("1 in [true]") is False
    assert ev("true in [1]") is False
    assert ev("1 in {true: 'x'}") is False
    assert ev("{1: 'x'}[1]") == "x"
    ev_error("{1: 'x'}[true]")
    ev_error("[1][true]")
    ev_error("true + true")
    ev_error("true < 1")
    assert ev("doc.b == 1", {"b": True}) is False
    assert ev("[true] == [1]") is False
    assert ev("{'a': true} == {'a': 1}") is False


def test_logic() -> None:
    assert ev("false && doc.missing", {}) is False
    assert ev("doc.missing && false", {}) is False
    assert ev("true || doc.missing", {}) is True
    assert ev("doc.missing || true", {}) is True
    assert "no such key" in ev_error("true && doc.missing", {})
    assert "no matching overload" in ev_error("true && 32")
    assert "no matching overload" in ev_error("32 || false")
    assert ev("true || 32") is True
    assert ev("!!1") == 1  # the CEL parsers drop pairs of '!'
    ev_error("!!!1")
    ev_error("1 ? 2 : 3")
    assert ev("true ? 1 : doc.missing", {}) == 1  # only the chosen branch runs


def test_arithmetic() -> None:
    assert ev("-7 / 2") == -3
    assert ev("7 / -2") == -3
    assert ev("-7 % 3") == -1
    assert ev("7 % -3") == 1
    assert "integer overflow" in ev_error("(-9223372036854775808) % -1")
    assert "integer overflow" in ev_error("-doc.n", {"n": -(2**63)})
    assert "division by zero" in ev_error("1 / 0")
    assert "modulus by zero" in ev_error("1 % 0")
    assert ev("1.0 / 0.0") == math.inf
    assert ev("-1.0 / 0.0") == -math.inf
    assert ev("1.0 / -0.0") == -math.inf
    assert math.isnan(ev("0.0 / 0.0"))  # type: ignore[arg-type]
    assert ev("1e308 * 10.0") == math.inf
    ev_error("1 + 1.0")
    ev_error("1.5 % 1.0")
    ev_error("'a' - 'b'")
    assert ev("[1] + ['a']") == [1, "a"]
    assert ev("'a' + 'b'") == "ab"


def test_equality_and_ordering() -> None:
    nan = math.nan
    assert ev("doc.x == doc.x", {"x": nan}) is False
    assert ev("doc.x != doc.x", {"x": nan}) is True
    assert ev("[doc.x] == [doc.x]", {"x": nan}) is False
    assert ev("doc.x < 1.0 || doc.x >= 1.0", {"x": nan}) is False
    assert ev("9223372036854775807 == 9223372036854775808.0") is True
    assert ev("1 == 'a'") is False
    assert ev("null == false") is False
    assert ev("[] == {}") is False
    assert ev("{'a': 1, 'b': [2]} == {'b': [2.0], 'a': 1.0}") is True
    assert ev("'a' < 'b' && 'B' < 'a' && '\\u00e9' < '\\U0001F600'") is True
    ev_error("null < null")
    ev_error("[1] < [2]")
    ev_error("'a' < 1")


def test_maps_and_lists() -> None:
    doc = {"m": {"k": 1, "l": [1, 2.5, "x"]}, "s": "abc"}
    assert ev("doc.m.k", doc) == 1
    assert ev("doc.m['k']", doc) == 1
    assert ev("doc.m.l[2]", doc) == "x"
    assert ev("doc.m.l[1.0]", doc) == 2.5
    assert "no such key: 'z'" in ev_error("doc.m.z", doc)
    assert "out of range" in ev_error("doc.m.l[3]", doc)
    assert "out of range" in ev_error("doc.m.l[-1]", doc)
    ev_error("doc.m.l[0.5]", doc)
    ev_error("doc.s.x", doc)
    ev_error("doc.s[0]", doc)
    ev_error("has(doc.s.x)", doc)
    assert ev("has(doc.m.k) && !has(doc.m.z)", doc) is True
    assert ev("'k' in doc.m && !('z' in doc.m) && 2.5 in doc.m.l", doc) is True
    ev_error("null in doc.m", doc)
    ev_error("1 in 'abc'")
    # CEL numeric key equality for lookups; double keys are not allowed in literals.
    assert ev("{1: 'a'}[1.0]") == "a"
    assert ev("1.0 in {1: 'a'} && !(1.5 in {1: 'a'})") is True
    ev_error("{1: 'a'}[1.5]")
    ev_error("{1.0: 'a'}")
    ev_error("{null: 'a'}")
    ev_error("{[1]: 'a'}")
    assert "duplicate map key" in ev_error("{'a': 1, 'a': 2}")
    ev_error("{1: 'x', true: 'y'}")  # not representable as a Python dict
    assert ev("{true: 'x', 2: 'y'}") == {True: "x", 2: "y"}
    assert ev("size(doc.m) + size(doc.m.l) + size(doc.s) + doc.s.size()", doc) == 11
    ev_error("size(1)")
    ev_error("size(null)")


def test_strings_and_regexes() -> None:
    assert ev("size('🐱😀')") == 2
    assert ev("'🐱😀'.contains('😀') && 'abc'.startsWith('') && 'abc'.endsWith('bc')") is True
    ev_error("'abc'.contains(1)")
    ev_error("doc.n.startsWith('a')", {"n": 1})
    assert ev("'hubba'.matches('ubb')") is True  # search, not full match
    assert ev("'hubba'.matches('^ubb')") is False
    assert ev("matches('abc', 'b')") is True
    assert ev("'ABC'.matches('(?i)abc')") is True
    assert ev("'🐱😀😀'.matches('^.(a|😀){2}$')") is True  # code points, not bytes
    assert "invalid regular expression" in ev_error("'a'.matches(doc.p)", {"p": "(?=a)"})
    assert "invalid regular expression" in ev_error("'aa'.matches(doc.p)", {"p": "(a)\\1"})
    ev_error("'a'.matches(1)")


def test_identifiers_and_functions() -> None:
    assert "undeclared reference to 'x'" in ev_error("x")
    assert ev("f_unknown(17) || true") is True
    ev_error("doc.a.foo()", {"a": 1})
    ev_error("contains('abc', 'b')")  # only the receiver form exists here
    assert ev(".doc.a", {"a": 1}) == 1


def test_unusual_binding_values() -> None:
    # Values outside CEL's types error when used, they never crash.
    ev_error("doc.x + 1", {"x": (1, 2)})
    ev_error("doc.x == doc.x", {"x": object()})
    ev_error("doc.x[0]", {"x": b"ab"})
    assert ev("doc.big == doc.big", {"big": 10**30}) is True
    ev_error("doc.big + 0", {"big": 10**30})
    assert ev("doc.big < 1.0", {"big": 10**400}) is False


def test_evaluation_depth_is_bounded() -> None:
    expr: cel.Expr = L(True)
    for _ in range(100_000):
        expr = C("!_", None, (expr,))
    with pytest.raises(cel.CelEvalError):
        cel.evaluate(expr, {})


# --------------------------------------------------------------------------
# Fuzzing: only the documented exceptions ever escape

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4)
    ),
    max_leaves=12,
)
docs = st.dictionaries(
    st.sampled_from(["a", "b", "c", "s", "l", "m", "n", "x"]) | st.text(max_size=3),
    json_values,
    max_size=6,
)

CEL_TOKENS = [
    "doc", "doc.a", "doc.b", "doc.l", "doc.m", "doc.s", "x", ".", ",", ":", "?", "(", ")", "[",
    "]", "{", "}", "!", "-", "+", "*", "/", "%", "==", "!=", "<", "<=", ">", ">=", "&&", "||",
    "in", "true", "false", "null", "0", "1", "-1", "2.5", "0x1F", "1e3", "9223372036854775807",
    "9223372036854775808", "1u", "'a'", '"b"', "'''c'''", "r'\\d'", "b'x'", "'\\u00e9'", "'\\z'",
    "'", "`a-b`", "has", "size", "contains", "startsWith", "endsWith", "matches", "exists",
    "map", "if", "as", "//", "\n", "&", "=", "|", "#", "\\",
]  # fmt: skip
cel_ish = st.lists(st.sampled_from(CEL_TOKENS), max_size=25).flatmap(
    lambda tokens: st.sampled_from([" ".join(tokens), "".join(tokens)])
)


def _run_untrusted(source: str, doc: dict[str, Any]) -> None:
    try:
        expr = cel.parse(source)
    except cel.CelSyntaxError:
        return
    try:
        cel.check(expr)
    except InvalidSubscription:
        pass
    try:
        cel.evaluate(expr, {"doc": doc})
    except cel.CelEvalError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.text(max_size=60), doc=docs)
def test_fuzz_arbitrary_text(source: str, doc: dict[str, Any]) -> None:
    _run_untrusted(source, doc)


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=cel_ish, doc=docs)
def test_fuzz_cel_tokens(source: str, doc: dict[str, Any]) -> None:
    _run_untrusted(source, doc)


# --------------------------------------------------------------------------
# Differential test against cel-expr-python (Google's cel-cpp bindings)

try:
    from cel_expr_python import cel as cel_cpp
except ImportError:  # pragma: no cover - the test extra installs it
    cel_cpp = None

needs_cel_cpp = pytest.mark.skipif(cel_cpp is None, reason="cel-expr-python is not installed")

_CEL_CPP_ENV: Any = None


def cel_cpp_eval(source: str, doc: Mapping[str, object]) -> tuple[str, object]:
    """Evaluate ``source`` with cel-expr-python over ``{"doc": doc}``.

    Returns ``("value", v)``, ``("error", message)`` for a CEL runtime error,
    or ``("unsupported", message)`` when cel-cpp rejects the expression at
    compile time.  ``doc`` is declared ``dyn`` and type checking is off, so
    ``1 == 1.0`` and friends behave as in an unchecked CEL program.
    """
    global _CEL_CPP_ENV
    if _CEL_CPP_ENV is None:
        _CEL_CPP_ENV = cel_cpp.NewEnv(variables={"doc": cel_cpp.Type.DYN})
    env = _CEL_CPP_ENV
    try:
        program = env.compile(source, disable_check=True)
    except RuntimeError as e:
        return "unsupported", str(e)
    activation = env.Activation({"doc": doc})  # reusable across programs
    try:
        result = program.eval(activation)
    except RuntimeError as e:  # e.g. duplicate map keys are raised, not returned
        return "error", str(e)
    if result.type() == cel_cpp.Type.ERROR:
        return "error", str(result.value())
    return "value", result.plain_value()


def _int_literal(n: int) -> str:
    return f"({n})" if n < 0 else str(n)


def _double_literal(x: float) -> str:
    text = repr(x)
    if "e" not in text and "." not in text:
        text += ".0"
    return f"({text})" if x < 0 or text.startswith("-") else text


def _string_literal(s: str) -> str:
    return "'" + s + "'"


_FIELDS = ["doc.i", "doc.j", "doc.d", "doc.s", "doc.b", "doc.l", "doc.m", "doc.n", "doc.z"]
_TYPED_FIELDS = {
    "int": ["doc.i", "doc.m.k", "doc.l[0]"],
    "double": ["doc.d"],
    "string": ["doc.s", "doc.m2.a"],
    "bool": ["doc.b", "doc.m2.t"],
    "list": ["doc.l"],
}


@st.composite
def _expr(draw: st.DrawFn, kind: str, depth: int) -> str:
    """A random expression of roughly the given CEL type (``any`` = no preference)."""
    if kind == "any":
        kind = draw(st.sampled_from(["int", "double", "string", "bool", "list", "field"]))
    leaf = depth <= 0 or draw(st.integers(0, 3)) == 0
    if kind == "field" or (leaf and draw(st.integers(0, 9)) == 0):
        return draw(st.sampled_from(_FIELDS))  # any field: often a type error
    if leaf and draw(st.integers(0, 2)) == 0:
        return draw(st.sampled_from(_TYPED_FIELDS[kind]))
    sub = depth - 1

    def e(k: str) -> str:
        return draw(_expr(k, sub))

    if kind == "int":
        if leaf:
            return _int_literal(
                draw(
                    st.integers(-5, 5)
                    | st.sampled_from([2**62, 2**63 - 1, -(2**63), 2**32, -(2**31)])
                )
            )
        form = draw(st.integers(0, 3))
        if form == 0:
            op = draw(st.sampled_from(["+", "-", "*", "/", "%"]))
            return f"({e('int')} {op} {e('int')})"
        if form == 1:
            return f"-{e('int')}"
        if form == 2:
            return f"size({e(draw(st.sampled_from(['string', 'list'])))})"
        return f"({e('bool')} ? {e('int')} : {e('int')})"
    if kind == "double":
        if leaf:
            return _double_literal(
                draw(
                    st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: round(x, 2))
                    | st.sampled_from([0.0, -0.0, 1e300, 9.2233720368547758e18, 0.5])
                )
            )
        form = draw(st.integers(0, 2))
        if form == 0:
            op = draw(st.sampled_from(["+", "-", "*", "/"]))
            return f"({e('double')} {op} {e('double')})"
        if form == 1:
            return f"-{e('double')}"
        return f"({e('bool')} ? {e('double')} : {e('any')})"
    if kind == "string":
        if leaf:
            return _string_literal(draw(st.text("abc é😀", max_size=4)))
        return f"({e('string')} + {e('string')})"
    if kind == "list":
        if leaf:
            return "[]"
        items = [e("any") for _ in range(draw(st.integers(1, 3)))]
        if draw(st.booleans()):
            return f"([{', '.join(items)}] + {e('list')})"
        return f"[{', '.join(items)}]"
    # bool
    if leaf:
        return draw(st.sampled_from(["true", "false", "has(doc.i)", "has(doc.m.k)"]))
    form = draw(st.integers(0, 7))
    if form == 0:
        op = draw(st.sampled_from(["==", "!="]))
        return f"({e('any')} {op} {e('any')})"
    if form == 1:
        op = draw(st.sampled_from(["<", "<=", ">", ">="]))
        side = draw(st.sampled_from(["int", "double", "string", "any"]))
        return f"({e(side)} {op} {e(draw(st.sampled_from([side, 'any'])))})"
    if form == 2:
        op = draw(st.sampled_from(["&&", "||"]))
        return f"({e('bool')} {op} {e('bool')})"
    if form == 3:
        return f"!{e('bool')}"
    if form == 4:
        return f"({e('any')} in {e(draw(st.sampled_from(['list', 'field'])))})"
    if form == 5:
        fn = draw(st.sampled_from(["contains", "startsWith", "endsWith"]))
        return f"{e('string')}.{fn}({e('string')})"
    if form == 6:
        return f"({e('bool')} ? {e('bool')} : {e('bool')})"
    return f"(doc.m[{e('string')}] == {e('any')})"


def _doc_value(kind: str) -> st.SearchStrategy[object]:
    small_ints = st.integers(-5, 5) | st.sampled_from([2**63 - 1, -(2**63), 2**53 + 1])
    if kind == "int":
        return small_ints
    if kind == "double":
        return st.floats(-1e3, 1e3).map(lambda x: round(x, 1)) | st.sampled_from(
            [math.nan, math.inf, -0.0]
        )
    if kind == "string":
        return st.text("abc é😀", max_size=4)
    scalars = small_ints | st.booleans() | st.none() | st.text("ab", max_size=2)
    return st.lists(scalars, max_size=3) | st.dictionaries(st.sampled_from("abk"), scalars)


differential_docs = st.fixed_dictionaries(
    {
        "i": _doc_value("int"),
        "d": _doc_value("double"),
        "s": _doc_value("string"),
        "b": st.booleans(),
        "l": st.lists(_doc_value("int"), max_size=3),
        "m": st.dictionaries(st.sampled_from(["k", "a", "é"]), _doc_value("int"), max_size=3),
        "m2": st.fixed_dictionaries({"a": _doc_value("string"), "t": st.booleans()}),
    },
    optional={
        "j": _doc_value("any"),
        "n": st.none(),
        "z": _doc_value("any"),
    },
)


def _compare_with_cel_cpp(source: str, doc: dict[str, Any]) -> None:
    status, theirs = cel_cpp_eval(source, doc)
    assume(status != "unsupported")
    expr = cel.parse(source)  # what cel-cpp compiles, we must parse
    try:
        ours: object = cel.evaluate(expr, {"doc": doc})
    except cel.CelEvalError as e:
        assert status == "error", f"we raised {e}; cel-cpp returned {theirs!r}"
        return
    assert status == "value", f"we returned {ours!r}; cel-cpp failed with {theirs}"
    assert same_value(ours, theirs), f"we returned {ours!r}; cel-cpp returned {theirs!r}"


@needs_cel_cpp
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=st.integers(1, 4).flatmap(lambda d: _expr("bool", d)), doc=differential_docs)
def test_differential_bool_against_cel_cpp(source: str, doc: dict[str, Any]) -> None:
    _compare_with_cel_cpp(source, doc)


@needs_cel_cpp
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    source=st.sampled_from(["int", "double", "string", "list", "any"]).flatmap(
        lambda kind: _expr(kind, 3)
    ),
    doc=differential_docs,
)
def test_differential_values_against_cel_cpp(source: str, doc: dict[str, Any]) -> None:
    _compare_with_cel_cpp(source, doc)
