"""The public matching API: semantics, errors, and fast vs reference."""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from array import array
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from reentry import BUSY, Reentry

from streamer._ext import _core
from streamer.errors import IndexBusy
from streamer.matching.matcher import (
    DuplicateSubscription,
    Filter,
    InvalidSubscription,
    Matcher,
    compile_subscription,
)
from streamer.matching.reference import ReferenceMatcher


def both() -> tuple[Matcher, ReferenceMatcher]:
    return Matcher(), ReferenceMatcher()


def test_issue_example() -> None:
    m = Matcher()
    m.add("s1", "app", "messages", filters=[Filter("chat_id", "==", "c1")])
    m.add("s2", "app", "messages", expression="doc.score >= 3.5 && 'urgent' in doc.tags")
    m.add(
        "s3", "app", "messages", filters=[Filter("type", "==", "text")],
        expression="doc.chat_id == 'c1'",
    )
    doc = {"chat_id": "c1", "score": 4.0, "tags": ["urgent"], "type": "text"}
    assert sorted(m.match("app", "messages", "m-17", doc)) == ["s1", "s2", "s3"]
    assert m.remove("s2") is True
    assert m.remove("s2") is False
    assert len(m) == 2
    assert sorted(m.match("app", "messages", "m-17", doc)) == ["s1", "s3"]


# (filters, expression, document, matches?) — document id is always "d1".
CASES: list[tuple[list[Filter], str | None, Any, bool]] = [
    ([], None, {"x": 1}, True),
    ([Filter("x", "==", "a")], None, {"x": "a"}, True),
    ([Filter("x", "eq", "a")], None, {"x": "b"}, False),
    ([Filter("x", "==", 5)], None, {"x": 5.0}, True),
    ([Filter("x", "==", 5.0)], None, {"x": 5}, True),
    ([Filter("age", "gt", 20)], None, {"age": 25.0}, True),
    ([Filter("age", ">", 20)], None, {"age": 20}, False),
    ([Filter("age", ">=", 20)], None, {"age": 20}, True),
    ([Filter("age", "<", 20.5)], None, {"age": 20}, True),
    ([Filter("age", "lte", 20)], None, {"age": 20.0}, True),
    ([Filter("x", "==", 1)], None, {"x": "1"}, False),
    ([Filter("x", "!=", 1)], None, {"x": "1"}, True),
    ([Filter("x", ">", 1)], None, {"x": "2"}, False),
    ([Filter("x", "<", "b")], None, {"x": "a"}, True),
    ([Filter("x", "!=", 1)], None, {}, False),
    ([Filter("x", "==", 1)], None, {"x": None}, False),
    ([Filter("x", "!=", 1)], None, {"x": None}, True),
    ([Filter("x", "==", True)], None, {"x": 1}, False),
    ([Filter("x", "==", 1)], None, {"x": True}, False),
    ([Filter("x", "==", True)], None, {"x": True}, True),
    ([Filter("x", "in", ["a", 2])], None, {"x": 2.0}, True),
    ([Filter("x", "in", ["a", 2])], None, {"x": "b"}, False),
    ([Filter("x", "in", [])], None, {"x": "b"}, False),
    ([Filter("tags", "contains", "u")], None, {"tags": ["u", "v"]}, True),
    ([Filter("tags", "contains", "u")], None, {"tags": "a u b"}, True),
    ([Filter("tags", "contains", "u")], None, {"tags": {"u": 1}}, False),
    ([Filter("tags", "contains", 3)], None, {"tags": [1, 3.0]}, True),
    ([Filter("p.a.city", "==", "B")], None, {"p": {"a": {"city": "B"}}}, True),
    ([Filter("p.a.city", "==", "B")], None, {"p": {"a": "city"}}, False),
    ([Filter("p.a", "==", "B")], None, {"p": ["a"]}, False),
    ([Filter("_id", "==", "d1")], None, {"_id": "other"}, True),
    ([Filter("_id", "==", "d2")], None, {"_id": "d2"}, False),
    ([Filter("_id", "in", ["d0", "d1"])], None, {}, True),
    ([Filter("x", "==", math.nan)], None, {"x": math.nan}, False),
    ([Filter("x", "!=", math.nan)], None, {"x": math.nan}, True),
    ([Filter("x", ">", -math.inf)], None, {"x": -1e308}, True),
    ([Filter("x", "==", math.inf)], None, {"x": math.inf}, True),
    ([Filter("x", "==", 2**63 - 1)], None, {"x": 2**63 - 1}, True),
    ([Filter("x", "==", 2**63 - 1)], None, {"x": 2**63 - 2}, False),
    ([Filter("x", "==", 2**53 + 1)], None, {"x": 2**53}, False),
    ([Filter("x", "==", -(2**63))], None, {"x": -(2**63)}, True),
    ([Filter("x", ">", 2**53 - 1)], None, {"x": 2**53 + 1}, True),
    # An int meets a double as a double: 2**53 + 1 is 2.0**53 then (found by
    # fuzz/fuzz_cel.py: the index looked 2.0**53 up exactly).
    ([], "doc.n == 9007199254740992.0", {"n": 2**53 + 1}, True),
    ([], "doc.n == 1 || doc.n == 9007199254740992.0", {"n": 2**53 + 1}, True),
    ([Filter("n", "in", [1, -(2.0**53)])], None, {"n": -(2**53) - 1}, True),
    ([Filter("n", "==", 2**53)], None, {"n": 2.0**53}, True),
    ([Filter("n", "==", 2**53)], None, {"n": 2**53 + 1}, False),
    ([Filter('we"ird\\\n\u00e9', "==", "q'\"\\\n")], None, {'we"ird\\\n\u00e9': "q'\"\\\n"}, True),
    ([Filter("a", "==", 1)], "doc.b == 2", {"a": 1, "b": 2}, True),
    ([Filter("a", "==", 1)], "doc.b == 2", {"a": 1, "b": 3}, False),
    ([], "doc.a == 1 || doc.b == 2", {"a": 1, "b": 2}, True),
    ([], "doc.a == 1 || doc.b == 2", {"a": 0, "b": 2}, True),
    ([], "doc.a == 1 || doc.missing.x", {"a": 1}, True),
    ([], "doc.missing.x || doc.a == 1", {"a": 1}, True),
    ([], "doc.missing.x && doc.a == 1", {"a": 1}, False),
    ([], "!(doc.a < 1)", {"a": math.nan}, True),
    ([], "doc.a >= 1", {"a": math.nan}, False),
    ([], "!(doc.a == 1)", {}, False),
    ([], "!(doc.a == 1)", {"a": 2}, True),
    ([], "!(doc.a == 1 && doc.b == 1)", {"a": 1, "b": 2}, True),
    ([], "'u' in doc.tags", {"tags": ["u"]}, True),
    ([], "'u' in doc.tags", {"tags": {"u": 0}}, True),
    ([], "'u' in doc.tags", {"tags": "u"}, False),
    ([], "doc.x in ['a', 1]", {"x": 1.0}, True),
    ([], "doc['a\\'b'] == 'x\\n'", {"a'b": "x\n"}, True),
    ([], "doc._id == 'd1'", {}, True),
    ([], "has(doc.p) && doc.p.c == 'DE'", {"p": {"c": "DE"}}, True),
    ([], "has(doc.p) && doc.p.c == 'DE'", {"q": 1}, False),
    ([], "doc.t.startsWith('he')", {"t": "hello"}, True),
    ([], "doc.t.matches('^h.l+o$')", {"t": "hello"}, True),
    ([], "size(doc.tags) == 2", {"tags": [1, 2]}, True),
    ([], "doc.n + 1 == 3", {"n": 2}, True),
    ([], "doc.n / 0 == 1 || true", {"n": 2}, True),
    ([], "doc.a ? true : false", {"a": True}, True),
    ([], "doc.a", {"a": 1}, False),
    ([], "true", {}, True),
    ([], "false || doc.a == 1", {"a": 1}, True),
    ([], "-1 < doc.a", {"a": 0}, True),
    ([], "1 == doc.a", {"a": 1}, True),
    ([], "doc.a == [1, 2]", {"a": [1, 2.0]}, True),
    ([Filter("a", "==", 1)], None, None, False),
    ([], None, None, True),
    ([Filter("a", "==", 1)], None, ["a"], False),
    ([Filter("a", "==", 1)], None, "a", False),
]


@pytest.mark.parametrize(("filters", "expression", "doc", "expected"), CASES)
def test_semantics(filters: list[Filter], expression: str | None, doc: Any, expected: bool) -> None:
    for matcher in both():
        matcher.add("s", "db", "c", filters=filters, expression=expression)
        got = matcher.match("db", "c", "d1", doc)
        assert got == (["s"] if expected else []), (type(matcher).__name__, filters, expression)


def test_other_collection_or_database_never_matches() -> None:
    m = Matcher()
    m.add("s", "db", "c")
    assert m.match("db", "c", "x", {}) == ["s"]
    assert m.match("db", "other", "x", {}) == []
    assert m.match("other", "c", "x", {}) == []


def test_one_id_per_subscription_even_if_several_clauses_match() -> None:
    m = Matcher()
    m.add("s", "db", "c", expression="doc.a == 1 || doc.b == 2 || 'u' in doc.t")
    assert m.match("db", "c", "x", {"a": 1, "b": 2, "t": ["u", "u"]}) == ["s"]
    assert m.stats()["scan_clauses"] == 0


def test_scan_subscriptions_are_counted() -> None:
    m = Matcher()
    m.add("s", "db", "c", expression="doc.t.endsWith('x')")
    assert m.stats()["scan_clauses"] == 1
    assert m.match("db", "c", "1", {"t": "ax"}) == ["s"]
    m.remove("s")
    assert m.stats()["scan_clauses"] == 0


def test_remove_frees_everything_and_ids_can_be_reused() -> None:
    m = Matcher()
    for i in range(50):
        m.add(f"s{i}", "db", "c", filters=[Filter("a", "==", i % 5), Filter("b", ">", i)])
        m.add(f"e{i}", "db", "c", expression=f"doc.t.startsWith('{i % 3}') || doc.r < {i}")
    for i in range(50):
        assert m.remove(f"s{i}") and m.remove(f"e{i}")
    stats = m.stats()
    assert (len(m), stats["clauses"], stats["atoms"], stats["postings"]) == (0, 0, 0, 0)
    assert (stats["paths"], stats["collections"]) == (0, 0)
    m.add("s1", "db", "c", filters=[Filter("a", "==", 1)])
    assert m.match("db", "c", "x", {"a": 1}) == ["s1"]


def churn_pair(m: Matcher, i: int) -> None:
    """Add and remove one subscription on paths and a collection of its own:
    an equality, a range, an ``in []`` (no posting) and CEL over more paths."""
    db, coll = f"db{i % 3}", f"c{i}"
    m.add(f"s{i}", db, coll, filters=[
        Filter(f"f{i}.x", "==", i), Filter(f"g{i}", ">", i), Filter(f"t{i}", "contains", "u"),
    ], expression=f"doc.h{i}.y == 1 || doc.k{i}.startsWith('a') || doc.z{i} in []")
    document = {f"f{i}": {"x": i}, f"g{i}": i + 1, f"t{i}": ["u"], f"k{i}": "ab"}
    assert m.match(db, coll, "d", document) == [f"s{i}"]
    assert m.remove(f"s{i}")


def test_churn_with_distinct_paths_and_collections_gives_everything_back() -> None:
    # Interned paths and per-collection indexes used to stay forever: 220k
    # such pairs left 1.32M paths and 220k postings behind.
    m = Matcher()
    churn_pair(m, 0)
    tables = m.index.tables()
    assert m.stats() == {
        "subscriptions": 0, "clauses": 0, "scan_clauses": 0, "atoms": 0, "postings": 0,
        "paths": 0, "collections": 0, "scan_subscriptions": 0,
    }
    assert all(used == 0 for used, _ in tables.values())
    for i in range(1, 2_000):
        churn_pair(m, i)
    # Nothing in use, and no table grew: every freed entry was reused.
    assert m.index.tables() == tables
    assert m.stats()["paths"] == m.stats()["collections"] == 0


def test_a_refused_add_leaves_nothing_behind() -> None:
    # What add took before it failed (atoms, paths, a new collection's
    # index) is given back.
    core = _core.Core()
    core.add("s", "db", "c", [[]])
    stats = core.stats()
    in_use = {table: used for table, (used, _) in core.tables().items()}

    def factory(inside: _core.Core) -> _core.Pred:
        inside.path_id(("a", "b"))
        raise RuntimeError("refused")

    compare = (("cmp", ("p",), "==", ("int", 1)), ("eq", ("p",), (1,)), None)
    residual = (("cmp", ("q",), "<", ("int", 1)), None, None)
    with pytest.raises(RuntimeError, match="refused"):
        core.add("t", "db", "other", [[compare, residual], [(("expr", "x"), None, factory)]])
    assert core.stats() == stats and "t" not in core
    assert {table: used for table, (used, _) in core.tables().items()} == in_use
    assert in_use["paths"] == in_use["atoms"] == 0 and in_use["collections"] == 1


def test_a_reused_path_id_reads_its_own_path() -> None:
    # Path ids are reused once free; the per-event path cache is keyed by
    # id, so a reused id must never serve the value of the path it named.
    m = Matcher()
    m.add("a", "db", "c", filters=[Filter("p.x", "==", 1)])
    document = {"p": {"x": 1}, "q": 2}
    assert m.match("db", "c", "d", document) == ["a"]
    m.remove("a")
    m.add("b", "db", "c", filters=[Filter("q", "==", 1)])
    m.add("e", "db", "c", expression="doc.q == 2")
    assert m.index.tables()["paths"] == (1, 1)
    assert m.match("db", "c", "d", document) == ["e"]
    assert m.match("db", "c", "d", {"p": {"x": 2}, "q": 1}) == ["b"]


def test_posting_and_range_arrays_shrink_with_their_entries() -> None:
    # They only grew: a posting or a range that once held many entries kept
    # their memory, and a freed posting kept its groups for its next key.
    m = Matcher()
    for i in range(5_000):
        m.add(f"hot{i}", "db", "c", filters=[Filter("k", "==", "hot")])
        m.add(f"range{i}", "db", "c", filters=[Filter("n", ">", i)])
        m.add(f"key{i}", "db", "c", filters=[Filter("k", "==", i), Filter("t", "==", i % 3)])
    used, allocated = m.index.tables()["array_bytes"]
    assert allocated < 2 * used
    for i in range(10, 5_000):
        m.remove(f"hot{i}")
        m.remove(f"range{i}")
        m.remove(f"key{i}")
    used, allocated = m.index.tables()["array_bytes"]
    assert allocated <= 4 * used + 4_096
    for i in range(10):
        for kind in ("hot", "range", "key"):
            m.remove(f"{kind}{i}")
    assert m.index.tables()["array_bytes"] == (0, 0)


CHURN_SCRIPT = """
import json
import psutil
from test_matcher import Matcher, churn_pair
m = Matcher()
for i in range(20_000):
    churn_pair(m, i)
rss0 = psutil.Process().memory_info().rss
for i in range(20_000, 220_000):
    churn_pair(m, i)
rss1 = psutil.Process().memory_info().rss
print(json.dumps({"growth_mib": (rss1 - rss0) / 2**20, "stats": m.stats()}))
"""


def test_churn_of_200k_pairs_keeps_rss_flat() -> None:
    # A fresh interpreter: RSS is the whole process's. The bound is generous
    # (the compiler's own caches of field names and CEL tokens are bounded
    # too, at a few MiB); without reclamation it grew by ~390 MiB.
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (tests, os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run([sys.executable, "-c", CHURN_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(count == 0 for count in result["stats"].values()), result
    assert result["growth_mib"] < 20, result


def test_duplicate_ids_are_global_and_leave_the_first_untouched() -> None:
    m = Matcher()
    m.add("s", "db", "c", filters=[Filter("a", "==", 1)])
    with pytest.raises(DuplicateSubscription, match="'s' already exists"):
        m.add("s", "other", "coll")
    with pytest.raises(KeyError):
        m.add("s", "db", "c")
    assert m.match("db", "c", "x", {"a": 1}) == ["s"]
    assert len(m) == 1


ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"filters": [Filter("a", "==", 1), Filter("b", "like", "x")]},
     "filter 2: unsupported operator 'like'"),
    ({"filters": [Filter("a", "==", None)]}, "filter 1: value is null"),
    ({"filters": [Filter("a", "==", 2**63)]}, "filter 1: integer 9223372036854775808 is outside"),
    ({"filters": [Filter("a", "in", "x")]}, "filter 1: operator 'in' needs a list value"),
    ({"filters": [Filter("a", ">", [1])]}, "filter 1: operator '>' needs a single value"),
    ({"filters": [Filter("a", "in", [1, [2]])]},
     "filter 1: list item 1: unsupported value type list"),
    ({"filters": [Filter("a", "==", {"k": 1})]}, "filter 1: unsupported value type dict"),
    ({"filters": [Filter("", "==", 1)]}, "filter 1: field must be a non-empty string"),
    ({"filters": [Filter("a..b", "==", 1)]}, "filter 1: field 'a..b' has an empty path segment"),
    ({"filters": [Filter("_id", "==", 1.5)]}, "filter 1: _id compares as a string, got float"),
    ({"filters": [("a", "==")]}, "filter 1: expected Filter(field, op, value)"),
    ({"filters": "a == 1"}, "filters must be a list of Filter"),
    ({"expression": "doc.a == (1))"}, "expression: unexpected ')' at column 13"),
    ({"expression": "x.a == 1"}, "expression: undeclared reference to 'x' at column 1"),
    ({"expression": "doc.a.like('x')"}, "expression: unsupported function 'like'"),
    ({"expression": "doc.a.exists(x, x > 1)"}, "expression: macro 'exists' is not supported"),
    ({"expression": "doc.a == '" + "x" * 5000 + "'"},
     "expression: expression is 5011 characters long; the limit is 4096"),
    ({"expression": "(" * 200 + "1" + ")" * 200}, "expression: expression nests deeper than 64"),
    ({"expression": 5}, "expression must be a string"),
]


@pytest.mark.parametrize(("kwargs", "message"), ERRORS)
def test_invalid_subscriptions_name_the_problem(kwargs: dict[str, Any], message: str) -> None:
    m = Matcher()
    with pytest.raises(InvalidSubscription) as info:
        m.add("s", "db", "c", **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)
    assert len(m) == 0 and m.stats()["atoms"] == 0


@pytest.mark.parametrize("bad", [None, 5, ""])
def test_bad_ids(bad: Any) -> None:
    with pytest.raises(InvalidSubscription):
        Matcher().add(bad, "db", "c")


def test_deeply_nested_document_does_not_crash() -> None:
    doc: Any = {"leaf": 1}
    for _ in range(100_000):
        doc = {"a": doc}
    m = Matcher()
    m.add("s", "db", "c", filters=[Filter("a.a.a.a", "==", 1)])
    m.add("e", "db", "c", expression="doc.a.a.a == 1 || size(doc) > 0")
    assert m.match("db", "c", "x", doc) == ["e"]


@pytest.mark.parametrize("expression", ["doc.a == doc.b", "!(doc.a == doc.b)", "doc.a in [doc.b]"])
def test_deeply_nested_values_compare_as_an_error(expression: str) -> None:
    # Equality recurses into lists: a hostile document must not overflow the
    # C stack (this once crashed the process).
    a: Any = []
    b: Any = []
    for _ in range(200_000):
        a, b = [a], [b]
    for matcher in both():
        matcher.add("s", "db", "c", expression=expression)
        assert matcher.match("db", "c", "x", {"a": a, "b": b}) == []


def test_no_per_subscription_python_objects() -> None:
    # The index keeps per-subscription state in C: adding 20k subscriptions
    # must not add anything like 20k GC-tracked Python objects.
    m = Matcher()
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20_000):
        m.add(f"s{i}", "db", "c", filters=[Filter("a", "==", i), Filter("b", ">", i % 7)])
    gc.collect()
    assert len(gc.get_objects()) - before < 2_000


# ---------------------------------------------------------------- re-entry


def busy_fixture() -> tuple[Matcher, ReferenceMatcher, list[str]]:
    """A few ids that one document matches, 300 another does, and a regex
    atom (re2's matching is Python code: it allocates on every event)."""
    small = [f"small{i}" for i in range(10)]
    big = [f"big{i}" for i in range(300)]
    regex = f"regex{len(big)}"
    fast, ref = both()
    for matcher in (fast, ref):
        for i, sub_id in enumerate(small + big):
            kind = "small" if sub_id in small else "big"
            matcher.add(sub_id, "db", "c", filters=[Filter("k", "==", kind)], owner=i % 3)
        matcher.add(regex, "db", "c", expression="doc.t.matches('^a')")
    return fast, ref, [*small, *big, regex]


REENTRIES: dict[str, Callable[[Matcher], object]] = {
    "match": lambda m: m.match("db", "c", "x", {"k": "big"}),
    "match_owned": lambda m: m.match_owned("db", "c", "x", {"k": "big"}),
    "match_id_owned": lambda m: m.match_id_owned("db", "c", "x"),
    "add": lambda m: m.add("late", "db", "c", filters=[Filter("k", "==", "small")]),
    "remove": lambda m: m.remove("small0"),
}


@pytest.mark.parametrize("call", sorted(REENTRIES))
def test_a_finalizer_calling_into_the_index_during_a_match_gets_index_busy(call: str) -> None:
    # The GC runs finalizers in the middle of a match; one that matched
    # there overwrote the shared match buffer (the outer match returned
    # thousands of foreign ids), one that added or removed changed the
    # index under the search.
    fast, ref, ids = busy_fixture()
    reentry = Reentry(lambda: REENTRIES[call](fast))
    document = {"k": "small", "t": "abc"}
    expected = sorted(ref.match("db", "c", "x", document))
    refcounts = [sys.getrefcount(sub_id) for sub_id in ids]
    for _ in range(20):
        got = reentry.during(lambda: fast.match("db", "c", "x", document))
        assert sorted(got) == expected
        del got
    assert [sys.getrefcount(sub_id) for sub_id in ids] == refcounts
    assert reentry.calls > 0
    assert reentry.errors == reentry.unraisable == [(IndexBusy, BUSY)] * reentry.calls
    assert "late" not in fast and "small0" in fast and len(fast) == len(ids)
    assert sorted(fast.match("db", "c", "x", document)) == expected


@pytest.mark.parametrize("call", sorted(REENTRIES))
def test_a_finalizer_calling_into_the_index_during_an_add_gets_index_busy(call: str) -> None:
    # The core's add runs Python code (the CEL atoms' factories), which
    # allocates; a nested add there claimed the same free slot as the outer
    # one. (Matcher.add compiles before it enters the core: a finalizer
    # there may use the index, so the core's add is called directly.)
    fast, ref, _ = busy_fixture()
    reentry = Reentry(lambda: REENTRIES[call](fast))
    for n in range(20):
        expression = f"doc.n{n} + 1 == 2 || doc.t.startsWith('{n}')"
        clauses = compile_subscription((), expression)
        reentry.during(partial(fast.index.add, f"cel{n}", "db", "c", clauses))
        ref.add(f"cel{n}", "db", "c", expression=expression)
    assert reentry.calls > 0
    assert reentry.errors == reentry.unraisable == [(IndexBusy, BUSY)] * reentry.calls
    assert "late" not in fast and "small0" in fast and len(fast) == len(ref)
    for document in ({"k": "small", "n3": 1}, {"k": "big", "t": "7x"}, {"t": "abc"}):
        assert sorted(fast.match("db", "c", "x", document)) == sorted(
            ref.match("db", "c", "x", document))


def test_the_core_refuses_calls_from_inside_its_own_operations() -> None:
    # No GC needed: an atom factory runs inside ``add``.
    core = _core.Core()
    core.add("s", "db", "c", [[]])
    refused: list[str] = []

    def factory(inside: _core.Core) -> _core.Pred:
        for name, call in (
            ("add", lambda: inside.add("t", "db", "c", [])),
            ("remove", lambda: inside.remove("s")),
            ("match", lambda: inside.match("db", "c", "x", {})),
            ("match_owned", lambda: inside.match_owned("db", "c", "x", {})),
            ("match_id_owned", lambda: inside.match_id_owned("db", "c", "x")),
        ):
            with pytest.raises(IndexBusy, match=re.escape(BUSY)):
                call()
            refused.append(name)
        return _core.Expression(_core.DocPath(inside.path_id(("a",))))

    core.add("e", "db", "c", [[(("expr", "custom"), None, factory)]])
    assert len(refused) == 5
    with pytest.raises(RuntimeError, match="only handed out to atom factories"):
        core.path_id(("a",))
    assert len(core) == 2 and "t" not in core
    assert sorted(core.match("db", "c", "x", {"a": True})) == ["e", "s"]
    assert isinstance(IndexBusy(BUSY), RuntimeError)


# ---------------------------------------------------------------- properties

FIELDS = ["a", "b", "n.a", "tags", "_id"]
SCALARS = st.one_of(
    st.integers(-2, 3),
    st.sampled_from([0.0, 1.0, 2.5, -1.5, math.nan, math.inf, 2.0**53, 2**53 + 1]),
    st.sampled_from(["x", "y", "", "d1"]),
    st.booleans(),
)
DOC_VALUES = st.recursive(
    st.one_of(SCALARS, st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2)
    ),
    max_leaves=5,
)
DOCS = st.dictionaries(st.sampled_from(["a", "b", "n", "tags", "_id"]), DOC_VALUES, max_size=5)
FILTERS = st.builds(
    Filter,
    st.sampled_from(FIELDS),
    st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "eq", "gte", "contains"]),
    SCALARS,
) | st.builds(Filter, st.sampled_from(FIELDS), st.just("in"), st.lists(SCALARS, max_size=3))


def _literal(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("(0.0/0.0)" if math.isnan(v) else "(1.0/0.0)")
    if isinstance(v, str):
        return repr(v)
    return str(v)


CEL_PATHS = st.sampled_from(["doc.a", "doc.b", "doc.n.a", "doc.tags", "doc._id", "doc['a']"])
CEL_ATOMS = st.one_of(
    st.builds(
        lambda p, op, v, flip: f"{_literal(v)} {op} {p}" if flip else f"{p} {op} {_literal(v)}",
        CEL_PATHS, st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), SCALARS, st.booleans(),
    ),
    st.builds(lambda v, p: f"{_literal(v)} in {p}", SCALARS, CEL_PATHS),
    st.builds(
        lambda p, vs: f"{p} in [{', '.join(_literal(v) for v in vs)}]", CEL_PATHS,
        st.lists(SCALARS, max_size=3),
    ),
    st.builds(lambda p: f"has({p})", st.sampled_from(["doc.a", "doc.n.a", "doc.tags"])),
    st.builds(lambda p: f"{p}.startsWith('x')", CEL_PATHS),
    st.builds(lambda p: f"size({p}) > 1", CEL_PATHS),
    st.sampled_from(["true", "false", "doc.a", "doc.a + 1 == 2", "doc.b ? doc.a == 1 : true"]),
)
CEL = st.recursive(
    CEL_ATOMS,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a}) && ({b})", inner, inner),
        st.builds(lambda a, b: f"({a}) || ({b})", inner, inner),
        st.builds(lambda a: f"!({a})", inner),
    ),
    max_leaves=6,
)


class FastVersusReference(RuleBasedStateMachine):
    """Random subscribe/unsubscribe/match sequences through both matchers."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = Matcher()
        self.ref = ReferenceMatcher()
        self.next_id = 0

    @rule(
        coll=st.sampled_from(["c1", "c2"]),
        filters=st.lists(FILTERS, max_size=3),
        expression=st.none() | CEL,
        # Small owners travel inside index entries, large ones in the slot.
        owner=st.sampled_from([0, 1, 7, 0xFFFF, 0x10000, 2**32 - 1]),
    )
    def add(self, coll: str, filters: list[Filter], expression: str | None, owner: int) -> None:
        sub_id = f"s{self.next_id}"
        self.next_id += 1
        errors = []
        for matcher in (self.fast, self.ref):
            try:
                matcher.add(
                    sub_id, "db", coll, filters=filters, expression=expression, owner=owner)
                errors.append(None)
            except InvalidSubscription as exc:
                errors.append(str(exc))
        assert errors[0] == errors[1]

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        sub_id = f"s{data.draw(st.integers(0, max(self.next_id, 1)))}"
        assert self.fast.remove(sub_id) == self.ref.remove(sub_id)

    @rule(coll=st.sampled_from(["c1", "c2"]), doc=DOCS, doc_id=st.sampled_from(["d1", "x", None]))
    def match(self, coll: str, doc: dict[str, Any], doc_id: str | None) -> None:
        fast = self.fast.match("db", coll, doc_id, doc)
        event(f"matched {min(len(fast), 3)}")
        assert len(fast) == len(set(fast))
        assert sorted(fast) == sorted(self.ref.match("db", coll, doc_id, doc)), doc
        ids, owners = self.fast.match_owned("db", coll, doc_id, doc)
        ref_ids, ref_owners = self.ref.match_owned("db", coll, doc_id, doc)
        assert sorted(zip(ids, array("I", owners), strict=True)) == sorted(
            zip(ref_ids, array("I", ref_owners), strict=True))

    @invariant()
    def same_size(self) -> None:
        assert len(self.fast) == len(self.ref)


FastVersusReference.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fast_matches_reference = FastVersusReference.TestCase


# Paths that come and go: nested, shared between filters and CEL, over a few
# collections, so interned path ids, path indexes and collection indexes are
# freed and their ids and slots reused all the time.
REUSE_KEYS = ["a", "b", "c", "x", "m0", "m1", "m2"]
REUSE_FIELDS = ["a", "a.b", "a.b.c", "b", "x.a", "x.c", "m0", "m1.b", "m2", "_id"]
# Every path the index can intern for them (``has(doc.x.c)`` reads doc.x).
REUSE_PATHS = {tuple(f.split("."))[:n] for f in REUSE_FIELDS for n in range(1, f.count(".") + 2)}
REUSE_DOCS = st.dictionaries(
    st.sampled_from(REUSE_KEYS),
    st.recursive(
        SCALARS,
        lambda inner: st.dictionaries(st.sampled_from(REUSE_KEYS), inner, max_size=3),
        max_leaves=6,
    ),
    max_size=5,
)
REUSE_FILTERS = st.builds(
    Filter,
    st.sampled_from(REUSE_FIELDS),
    st.sampled_from(["==", "!=", "<", ">=", "contains"]),
    SCALARS,
) | st.builds(Filter, st.sampled_from(REUSE_FIELDS), st.just("in"), st.lists(SCALARS, max_size=2))
REUSE_CEL_PATHS = st.sampled_from([f"doc.{f}" for f in REUSE_FIELDS] + ["doc['m0']"])
REUSE_CEL = st.recursive(
    st.one_of(
        st.builds(lambda p, op, v: f"{p} {op} {_literal(v)}", REUSE_CEL_PATHS,
                  st.sampled_from(["==", "!=", ">"]), SCALARS),
        st.builds(lambda v, p: f"{_literal(v)} in {p}", SCALARS, REUSE_CEL_PATHS),
        st.builds(lambda p: f"has({p})", st.sampled_from(["doc.a.b", "doc.x.c", "doc.m1.b"])),
        st.builds(lambda p: f"size({p}) > 1", REUSE_CEL_PATHS),
        st.builds(lambda p: f"{p}.startsWith('x')", REUSE_CEL_PATHS),
    ),
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a}) && ({b})", inner, inner),
        st.builds(lambda a, b: f"({a}) || ({b})", inner, inner),
    ),
    max_leaves=3,
)
WHERE = st.tuples(st.sampled_from(["db1", "db2"]), st.sampled_from(["c1", "c2", "c3"]))


class PathReuseVersusReference(RuleBasedStateMachine):
    """Adds, removes and matches while paths and collections are freed and
    their ids reused; the core's tables empty whenever the index does."""

    def __init__(self) -> None:
        super().__init__()
        self.fast = Matcher()
        self.ref = ReferenceMatcher()
        self.live: list[str] = []
        self.next_id = 0

    @rule(where=WHERE, filters=st.lists(REUSE_FILTERS, max_size=2),
          expression=st.none() | REUSE_CEL)
    def add(self, where: tuple[str, str], filters: list[Filter], expression: str | None) -> None:
        sub_id = f"s{self.next_id}"
        self.next_id += 1
        errors = []
        for matcher in (self.fast, self.ref):
            try:
                matcher.add(sub_id, *where, filters=filters, expression=expression)
                errors.append(None)
            except InvalidSubscription as exc:
                errors.append(str(exc))
        assert errors[0] == errors[1]
        if errors[0] is None:
            self.live.append(sub_id)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        if self.live:
            sub_id = self.live.pop(data.draw(st.integers(0, len(self.live) - 1)))
            assert self.fast.remove(sub_id) and self.ref.remove(sub_id)

    @rule()
    def remove_all(self) -> None:
        for sub_id in reversed(self.live):
            assert self.fast.remove(sub_id) and self.ref.remove(sub_id)
        self.live.clear()

    @rule(where=WHERE, doc=REUSE_DOCS, doc_id=st.sampled_from(["d1", None]))
    def match(self, where: tuple[str, str], doc: dict[str, Any], doc_id: str | None) -> None:
        fast = self.fast.match(*where, doc_id, doc)
        assert len(fast) == len(set(fast))
        assert sorted(fast) == sorted(self.ref.match(*where, doc_id, doc)), doc

    @invariant()
    def tables_follow_the_subscriptions(self) -> None:
        assert len(self.fast) == len(self.ref) == len(self.live)
        tables = self.fast.index.tables()
        assert all(0 <= used <= allocated for used, allocated in tables.values())
        assert tables["collections"][0] <= 6 and tables["paths"][0] <= len(REUSE_PATHS)
        if not self.live:
            assert all(used == 0 for used, _ in tables.values()), tables
            assert all(count == 0 for count in self.fast.stats().values())


PathReuseVersusReference.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_path_reuse_matches_reference = PathReuseVersusReference.TestCase


# ---------------------------------------------------------------- fuzzing

ANY_VALUE = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
        st.binary(max_size=4), st.just(object()),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    filters=st.lists(
        st.one_of(
            st.tuples(st.one_of(st.text(max_size=6), ANY_VALUE), st.text(max_size=4), ANY_VALUE),
            st.builds(
                Filter, st.sampled_from(FIELDS), st.sampled_from(["==", "in", ">"]), ANY_VALUE
            ),
            ANY_VALUE,
        ),
        max_size=3,
    ),
    expression=st.none() | st.text(max_size=40) | CEL,
    docs=st.lists(ANY_VALUE | DOCS, max_size=3),
)
def test_no_input_crashes(filters: list[Any], expression: str | None, docs: list[Any]) -> None:
    m = Matcher()
    m.add("whole", "db", "c")
    try:
        m.add("s", "db", "c", filters=filters, expression=expression)
    except InvalidSubscription:
        pass
    for doc in docs:
        assert "whole" in m.match("db", "c", "id", doc)
        m.match("db", "c", doc, doc)


@pytest.mark.parametrize("owner", [-1, 2**32, 1.0, True])
def test_owner_must_be_a_uint32(owner: Any) -> None:
    m = Matcher()
    with pytest.raises(ValueError, match="owner must be an int from 0 to 2\\*\\*32 - 1"):
        m.add("s", "db", "c", owner=owner)
    assert len(m) == 0


def test_a_change_without_document_reaches_id_and_whole_collection_subscriptions() -> None:
    m = Matcher()
    m.add("whole", "db", "c", owner=3)
    m.add("id", "db", "c", filters=[Filter("_id", "==", "d1")], owner=1)
    m.add("ids", "db", "c", filters=[Filter("_id", "in", ["d0", "d1"])], owner=70_000)
    m.add("cel-id", "db", "c", expression="doc._id == 'd1'")
    m.add("id-or-x", "db", "c", expression="doc._id == 'd1' || doc.x == 1")
    # Not decidable without the document:
    m.add("id-and-x", "db", "c", filters=[Filter("_id", "==", "d1"), Filter("x", "==", 1)])
    m.add("no-x", "db", "c", expression="!has(doc.x)")
    m.add("other-id", "db", "c", filters=[Filter("_id", "==", "d2")])
    m.add("elsewhere", "db", "c2")
    ids, owners = m.match_id_owned("db", "c", "d1")
    assert sorted(zip(ids, array("I", owners), strict=True)) == [
        ("cel-id", 0), ("id", 1), ("id-or-x", 0), ("ids", 70_000), ("whole", 3)]
    assert m.match_id_owned("db", "nowhere", "d1") == ([], b"")
    assert m.match_id_owned("db", "c", None)[0] == ["whole"]


@pytest.mark.parametrize(("length", "matches"), [(2048, True), (2049, False)])
def test_concatenation_is_bounded_in_both_evaluators(length: int, matches: bool) -> None:
    """A concatenation longer than MAX_CONCAT is an evaluation error (no
    match), in the compiled core and in the reference alike."""
    from streamer.matching.cel.nodes import MAX_CONCAT

    assert MAX_CONCAT == 4096
    doc = {"t": "x" * length, "l": list(range(length))}
    for expression in ("size(doc.t + doc.t) > 0", "size(doc.l + doc.l) > 0"):
        compiled, reference = Matcher(), ReferenceMatcher()
        for m in (compiled, reference):
            m.add("s", "app", "c", expression=expression)
        assert compiled.match("app", "c", "d", doc) == (["s"] if matches else [])
        assert reference.match("app", "c", "d", doc) == compiled.match("app", "c", "d", doc)


def test_the_values_of_in_lists_are_not_walked_by_every_garbage_collection() -> None:
    # Found by bench/bench_abuse.py: 500 subscriptions holding a residual
    # `in` list of 1000 strings each made every full collection walk half a
    # million strings (tens of ms per collection, on the event loop).
    def walked() -> int:  # references a full collection follows
        gc.collect()
        return sum(len(gc.get_referents(o)) for o in gc.get_objects())

    matcher = Matcher()
    before = walked()
    for i in range(100):
        values = ", ".join(f"'{i}-{j}'" for j in range(300))  # each its own atom
        matcher.add(f"s{i}", "app", "messages", filters=[Filter("chat", "==", f"c{i}")],
                    expression=f"doc.author in [{values}]")
    assert walked() - before < 100 * 20
    assert matcher.match("app", "messages", "m", {"chat": "c7", "author": "7-299"}) == ["s7"]
