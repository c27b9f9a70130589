"""The public matching API: register subscriptions, match events.

``Matcher`` turns each subscription into clauses (see ``streamer.matching.compiler``),
chooses for every clause the one atom the index looks it up by (its access
atom: document id, then the equality or ``in`` key with the smallest posting
list, then list membership, then a numeric range), interns the remaining
atoms, and hands the result to the compiled core (``streamer._ext._core``),
which holds all per-subscription state in C arrays and matches events.

A clause with no indexable atom is a *scan* clause: it is verified on every
event of its collection. It is allowed and counted (``stats()``).
"""

from __future__ import annotations

from collections.abc import Iterable

from streamer._ext import _celparse, _core
from streamer.errors import DuplicateSubscription, IndexBusy, InvalidSubscription
from streamer.matching import cel
from streamer.matching.compiler import Clause, Filter, lower_expression, lower_filter

__all__ = ["DuplicateSubscription", "Filter", "IndexBusy", "InvalidSubscription", "Matcher"]


class Matcher:
    """An index of subscriptions over (database, collection, document) events.

    >>> m = Matcher()
    >>> m.add("s1", "app", "messages", filters=[Filter("chat_id", "==", "c1")])
    >>> m.match("app", "messages", "m-1", {"chat_id": "c1"})
    ['s1']

    Not re-entrant: a call made while another is still running (from a
    finalizer that the garbage collector ran inside it, or from another
    thread) raises ``IndexBusy`` and changes nothing.
    """

    __slots__ = ("_core", "_scan_subscriptions")

    def __init__(self) -> None:
        self._core = _core.Core()
        self._scan_subscriptions = 0

    def __len__(self) -> int:
        return len(self._core)

    @property
    def index(self) -> _core.Core:
        """The compiled index itself, for compiled consumers of its matches
        (``streamer.node.delivery.fan_out``)."""
        return self._core

    def __contains__(self, subscription_id: object) -> bool:
        return subscription_id in self._core

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
        """Register a subscription: all ``filters`` AND the CEL ``expression``.

        Raises ``InvalidSubscription`` (a ``ValueError``) naming the bad part,
        or ``DuplicateSubscription`` (a ``KeyError``) if the id is taken; the
        index is then unchanged. A request that is both gets the former.
        ``owner`` (0 to 2**32 - 1; the service numbers its gateways) comes
        back with each match from ``match_owned``; small numbers (below
        65536) cost nothing extra per match.
        """
        if (
            type(subscription_id) is not str
            or type(database) is not str
            or type(collection) is not str
            or not subscription_id
        ):
            _check_names(subscription_id, database, collection)
        if type(owner) is not int or not 0 <= owner <= 0xFFFF_FFFF:
            raise ValueError(f"owner must be an int from 0 to 2**32 - 1, got {owner!r}")
        clauses = compile_subscription(filters, expression)
        # Compiling runs Python code, and with it possibly a finalizer that
        # adds or removes: the count is read after it.
        core = self._core
        scan_clauses = core.scan_clauses
        core.add(subscription_id, database, collection, clauses, owner)
        if core.scan_clauses != scan_clauses:
            self._scan_subscriptions += 1

    def remove(self, subscription_id: str) -> bool:
        """Deregister a subscription; False if the id is unknown."""
        if not isinstance(subscription_id, str):
            return False
        core = self._core
        scan_clauses = core.scan_clauses
        removed = bool(core.remove(subscription_id))
        if core.scan_clauses != scan_clauses:
            self._scan_subscriptions -= 1
        return removed

    def match(
        self, database: str, collection: str, document_id: str | None, document: object
    ) -> list[str]:
        """Ids of every subscription matching the document, each once.

        Never raises for odd documents: values of the wrong type, nulls or
        missing fields simply do not match.
        """
        return self._core.match(database, collection, document_id, document)

    def match_owned(
        self, database: str, collection: str, document_id: str | None, document: object
    ) -> tuple[list[str], bytes]:
        """``match``'s ids, and the ``owner`` of each as native ``uint32``
        values packed in bytes (``array("I", owners)`` reads them): what the
        fan-out needs to group matches by gateway without a lookup per id."""
        return self._core.match_owned(database, collection, document_id, document)

    def match_id_owned(
        self, database: str, collection: str, document_id: str | None
    ) -> tuple[list[str], bytes]:
        """``match_owned`` for a change that comes without any document (a
        hard delete without pre-image, docs/semantics.md): it reaches the
        subscriptions that select the document by its id (a clause that is
        only ``_id == x`` or ``_id in [...]``) and those on the whole
        collection; nothing else can be decided without the document."""
        return self._core.match_id_owned(database, collection, document_id)

    def stats(self) -> dict[str, int]:
        """Sizes of the index: subscriptions, clauses, scan clauses, atoms,
        postings, interned field paths (``paths``) and indexed (database,
        collection) pairs (``collections``); each falls back when the last
        subscription using it is removed.

        ``scan_subscriptions`` counts the subscriptions with at least one scan
        clause (the core's scan clause count moves exactly when one of those is
        added or removed).
        """
        stats = self._core.stats()
        stats["scan_subscriptions"] = self._scan_subscriptions
        return stats


def _check_names(subscription_id: object, database: object, collection: object) -> None:
    for name, value in (
        ("subscription id", subscription_id),
        ("database", database),
        ("collection", collection),
    ):
        if not isinstance(value, str):
            raise InvalidSubscription(f"{name} must be a string, got {type(value).__name__}")
    if not subscription_id:
        raise InvalidSubscription("subscription id must not be empty")


def compile_subscription(filters: Iterable[Filter], expression: str | None) -> list[Clause]:
    """Validate a subscription and lower it to clauses (DNF of atoms)."""
    if isinstance(filters, str | bytes) or not hasattr(filters, "__iter__"):
        raise InvalidSubscription(f"filters must be a list of Filter, got {type(filters).__name__}")
    never = False
    conjunction: Clause = []
    for index, flt in enumerate(filters, 1):
        atom = lower_filter(index, flt)
        if atom is None:
            never = True
        else:
            conjunction.append(atom)
    if expression is not None and not isinstance(expression, str):
        raise InvalidSubscription(f"expression must be a string, got {type(expression).__name__}")
    if not expression:
        return [] if never else [conjunction]
    ast = parse_expression(expression)
    if never:
        return []
    return [conjunction + clause for clause in lower_expression(ast)]


def parse_expression(expression: str) -> cel.Expr:
    """Parse and check a subscription's CEL expression."""
    try:
        ast = _celparse.parse(expression, check=True)
    except InvalidSubscription as exc:
        raise InvalidSubscription(f"expression: {exc}") from None
    return ast
