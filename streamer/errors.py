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


class IndexBusy(StreamerError, RuntimeError):
    """The subscription index was called while one of its own operations was
    still running: from a finalizer that the garbage collector ran in the
    middle of it, or from another thread. The index refuses instead of
    corrupting that operation's state; nothing was changed.
    """


class SubscriptionRejected(StreamerError, ValueError):
    """The Streamer refused a ``SubscribeRequest`` (``streamer.client``).

    ``code`` is the response's code (``invalid_argument``, ``already_exists``,
    ``resource_exhausted``, ...) and ``error`` the server's own explanation.
    """

    def __init__(self, subscription_id: str, code: str, error: str) -> None:
        super().__init__(f"subscription {subscription_id!r} rejected ({code}): {error}")
        self.subscription_id = subscription_id
        self.code = code
        self.error = error


class StreamClosed(StreamerError, ConnectionError):
    """The client was closed; it sends and receives nothing more."""


class CannotConnect(StreamerError, ConnectionError):
    """A ``StreamerClient`` could not open its first stream within its
    ``connect_timeout`` (nothing listening at the address, a TLS failure, a
    server that is not a Streamer, no answer at all).

    ``target`` is the address, ``timeout`` the connect timeout in seconds and
    ``reason`` the last attempt's failure (a gRPC status and its details).
    """

    def __init__(self, target: str, timeout: float, reason: str) -> None:
        super().__init__(f"cannot connect to {target} within {timeout:g} s: {reason}")
        self.target = target
        self.timeout = timeout
        self.reason = reason


class AccessDenied(StreamerError, PermissionError):
    """The Streamer refused the gateway's credentials (``UNAUTHENTICATED`` or
    ``PERMISSION_DENIED``); retrying with the same ones cannot help.

    ``code`` is the gRPC status name, ``details`` the server's message.
    """

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class ResumePointLost(StreamerError, LookupError):
    """A change source can no longer resume from the logged position (e.g. a
    MongoDB oplog that no longer holds the resume token): the changes since
    then are lost, and only an operator can decide what to do about it."""


class ClusterError(StreamerError):
    """Base class of the errors of cluster coordination (``streamer.cluster``)."""


class EtcdUnavailable(ClusterError, ConnectionError):
    """No etcd endpoint answered a request (``streamer.cluster.etcd``).

    ``endpoints`` are the ones tried, ``reason`` the last failure (a gRPC
    status and its details).
    """

    def __init__(self, what: str, endpoints: tuple[str, ...], reason: str) -> None:
        super().__init__(f"etcd {what}: no endpoint answered ({', '.join(endpoints)}): {reason}")
        self.endpoints = endpoints
        self.reason = reason


class EtcdRequestFailed(ClusterError, RuntimeError):
    """etcd answered a request with an error that retrying cannot fix
    (``code`` is the gRPC status name, ``details`` etcd's message)."""

    def __init__(self, what: str, code: str, details: str) -> None:
        super().__init__(f"etcd {what} failed ({code}): {details}")
        self.code = code
        self.details = details


class LeaseLost(ClusterError, ConnectionError):
    """An etcd lease is gone, or may be: etcd said it no longer exists, or
    no keepalive succeeded for its whole TTL. The keys attached to it are
    (or are about to be) deleted; whoever held them must stop acting on them.
    ``lease_id`` is the lease, ``reason`` what happened."""

    def __init__(self, lease_id: int, reason: str) -> None:
        super().__init__(f"etcd lease {lease_id:x} lost: {reason}")
        self.lease_id = lease_id
        self.reason = reason


class MembershipFailed(ClusterError, RuntimeError):
    """A node's view of its cluster stopped being maintained: a watch or a
    shard claim failed in a way retrying cannot fix
    (``streamer.cluster.membership``). The node is fenced for good; the
    cause is chained."""


class WatchCompacted(ClusterError, LookupError):
    """A watch cannot resume: etcd compacted its history past the revision
    it needed. Read the current state again (``get_prefix``) and watch from
    the revision of that read."""

    def __init__(self, prefix: bytes, revision: int, compact_revision: int) -> None:
        super().__init__(
            f"etcd watch of {prefix!r} from revision {revision}: history compacted"
            f" up to {compact_revision}"
        )
        self.prefix = prefix
        self.revision = revision
        self.compact_revision = compact_revision
