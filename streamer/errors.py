"""The package's exception hierarchy.

Every error the package raises on purpose derives from :class:`StreamerError`,
and each subclass also inherits the builtin that callers would catch for the
same situation, so ``except ValueError`` keeps working for code that does not
know this package.
"""

from __future__ import annotations


class StreamerError(Exception):
    """Base class of every error raised by ``streamer`` on purpose."""


class InvalidSubscription(StreamerError, ValueError):
    """A subscription's filters or expression are malformed or unsupported.

    The message names the part at fault, e.g. ``filter 2: unsupported operator
    'like'`` or ``expression: unexpected ')' at column 17``.
    """


class DuplicateSubscription(StreamerError, KeyError):
    """A subscription id is already registered (ids are global)."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument; ours is a sentence.
        return str(self.args[0]) if self.args else ""
