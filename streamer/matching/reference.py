"""The reference matcher: simple, linear and obviously correct.

It keeps every subscription as written and, for each event, evaluates every
subscription of the collection: filters as the CEL comparisons they are
defined to be (docs/semantics.md, Comparison), expressions with the
reference CEL interpreter (``streamer.matching.cel.evaluate``). Property tests demand
that the compiled ``Matcher`` gives exactly its answers.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matching import cel
from streamer.matching.compiler import OPERATORS, Filter, lower_filter

_MISSING = object()
_BINARY = {op: cel.parse(f"a {op} b") for op in ("==", "!=", "<", "<=", ">", ">=")}
_IN = cel.parse("a in b")
_SUBSTRING = cel.parse("a.contains(b)")


def _holds(expr: cel.Expr, a: object, b: object) -> bool:
    try:
        return cel.evaluate(expr, {"a": a, "b": b}) is True
    except cel.CelEvalError:
        return False


def _filter_holds(flt: Filter, view: dict[str, object]) -> bool:
    value: object = view
    for part in flt.field.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    op = OPERATORS[flt.op]
    target: object = flt.value
    if flt.field == "_id":
        target = [str(v) for v in target] if isinstance(target, list) else str(target)
    if op == "in":
        return _holds(_IN, value, target)
    if op == "contains":
        if isinstance(value, list):
            return _holds(_IN, target, value)
        return _holds(_SUBSTRING, value, target)
    return _holds(_BINARY[op], value, target)


def _parse(expression: str) -> cel.Expr:
    """The pure-Python parser and checker (the fast path uses the compiled one)."""
    try:
        ast = cel.parse(expression)
        cel.check(ast)
    except InvalidSubscription as exc:
        raise InvalidSubscription(f"expression: {exc}") from None
    return ast


class ReferenceMatcher:
    """Same API and answers as ``streamer.matching.matcher.Matcher``, by brute force."""

    def __init__(self) -> None:
        self._subs: dict[str, tuple[str, str, list[Filter], cel.Expr | None]] = {}
        self._owners: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._subs)

    def add(
        self,
        subscription_id: str,
        database: str,
        collection: str,
        *,
        filters: Iterable[Filter] = (),
        expression: str | None = None,
        owner: int = 0,
    ) -> None:
        filters = [Filter(*f) for f in filters]
        for index, flt in enumerate(filters, 1):
            lower_filter(index, flt)
        ast = _parse(expression) if expression else None
        if subscription_id in self._subs:
            raise DuplicateSubscription(f"subscription id {subscription_id!r} already exists")
        self._subs[subscription_id] = (database, collection, filters, ast)
        self._owners[subscription_id] = owner

    def remove(self, subscription_id: str) -> bool:
        self._owners.pop(subscription_id, None)
        return self._subs.pop(subscription_id, None) is not None

    def match_owned(
        self, database: str, collection: str, document_id: str | None, document: object
    ) -> tuple[list[str], bytes]:
        ids = self.match(database, collection, document_id, document)
        return ids, array("I", [self._owners[i] for i in ids]).tobytes()

    def match(
        self, database: str, collection: str, document_id: str | None, document: object
    ) -> list[str]:
        view = dict(document) if isinstance(document, dict) else {}
        view.pop("_id", None)
        if document_id is not None:
            view["_id"] = document_id
        out = []
        for sub_id, (db, coll, filters, ast) in self._subs.items():
            if db != database or coll != collection:
                continue
            if not all(_filter_holds(f, view) for f in filters):
                continue
            if ast is not None:
                try:
                    if cel.evaluate(ast, {"doc": view}) is not True:
                        continue
                except cel.CelEvalError:
                    continue
            out.append(sub_id)
        return out
