"""Matching: subscriptions (structured filters and CEL expressions) compiled
into an index, and events matched against it once.

``Matcher`` (``streamer.matching.matcher``) is the public API; the
``compiler`` turns filters and CEL into clauses of atoms, ``cel`` is the CEL
front end (parser, checker, reference interpreter), and ``reference`` the
linear reference matcher the index is tested against. The index itself is
compiled (``streamer._ext._core``).
"""

from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matching.compiler import Filter
from streamer.matching.matcher import Matcher

__all__ = ["DuplicateSubscription", "Filter", "InvalidSubscription", "Matcher"]
