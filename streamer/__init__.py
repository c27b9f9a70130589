"""streamer: the fan-out and matching engine of a real-time document database."""

from streamer.errors import DuplicateSubscription, InvalidSubscription, StreamerError

__all__ = ["DuplicateSubscription", "InvalidSubscription", "StreamerError"]
__version__ = "0.1.0"
# The name on the package index (``pip install streamer-fanout``); the import
# package and the command stay ``streamer``.
DISTRIBUTION = "streamer-fanout"
