"""The Puller's MongoDB source: a change stream turned into ``ChangeEvent``s.

This module owns reading one database's change stream (all its collections,
or only the listed ones) with ``pymongo``'s asyncio client, normalizing each
document change into a ``puller.v1`` ``ChangeEvent`` (docs/protocol.md),
handing them to the Puller's log in batches, and resuming where the log
stopped. It implements the ``Source`` protocol of ``streamer.puller.sources``:
``run(emit, resume)``.

Source state. Each event's ``source_state`` is its change stream resume token
(``_id``), BSON-encoded. ``run(emit, resume=<the last logged state>)`` opens
the stream with ``resumeAfter`` that token, so a restarted Puller neither
misses nor repeats an event. If the oplog no longer holds the token,
``run`` raises :class:`~streamer.errors.ResumePointLost`.

Events. ``insert``, ``update``, ``replace`` and ``delete`` become events:
``event_id`` is the resume token's ``_data`` string, ``mgo_doc_id`` the
document's ``_id`` as a string (ObjectId: its hex; a string: itself; an
integer: its decimal; anything else: its canonical Extended JSON),
``full_doc`` the document after the change (``updateLookup``: for an update,
the document as it is when the change is read; empty on a delete),
``update_desc`` ``{updatedFields, removedFields, truncatedArrays}`` (updates
only), ``before_doc`` the pre-image when the collection records them
(``changeStreamPreAndPostImages``), ``cluster_time`` the operation's
timestamp, ``timestamp`` its ``wallTime`` in ms (cluster time seconds x 1000
on servers older than 6.0), ``txn_number`` when in a transaction.

Skipped, counted in :attr:`MongoSource.skipped` by reason, logged:
- operations that change no single document (``drop``, ``rename``,
  ``dropDatabase``, ``invalidate``, ...): the Streamer is told nothing, so
  live queries over a dropped collection keep their results (logged at
  WARNING);
- an update whose document no longer exists when the change is read
  (``updateLookup`` finds nothing): the delete that removed it follows, and
  that is the change the Streamer needs (``update_without_document``, DEBUG).

``invalidate`` (the database was dropped) ends a change stream: the source
then opens a new one with ``startAfter`` the invalidate, so a recreated
database is followed. That token is never logged (it is no document change);
after a restart the stream resumes before the invalidate, reads it again and
does the same.

MongoDB documents as JSON (``full_doc``, ``before_doc``, ``update_desc``):

==================  ==================================================
BSON                JSON
==================  ==================================================
double, string,     themselves (NaN and +-Infinity become ``null``: JSON
bool, null, int32   has no such numbers)
Int64               number
ObjectId            24-hex-digit string
date                ISO 8601 UTC string, milliseconds, ``Z``:
                    ``"2024-01-02T03:04:05.678Z"`` (outside Python's
                    years 1-9999: Extended JSON ``{"$date": ...}``)
Decimal128          string (``"1.50"``)
binary              base64 string (any subtype, UUIDs included)
Timestamp           ``{"t": seconds, "i": increment}``
regular expression  its pattern string (flags dropped)
JavaScript code     its source string (a scope is dropped)
MinKey, MaxKey,     relaxed Extended JSON (``{"$minKey": 1}``, ...)
DBRef, others
==================  ==================================================

Embedded documents and arrays are rendered the same way, recursively.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import bson
import orjson
from bson import json_util
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.decimal128 import Decimal128
from bson.objectid import ObjectId
from bson.regex import Regex
from bson.timestamp import Timestamp
from pymongo import AsyncMongoClient
from pymongo.asynchronous.change_stream import AsyncDatabaseChangeStream
from pymongo.errors import ConnectionFailure, CursorNotFound, OperationFailure, PyMongoError

from streamer.errors import ResumePointLost, StreamerError
from streamer.protocol.puller_v1_pb2 import ChangeEvent, ClusterTime

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[tuple[ChangeEvent, bytes]]], Awaitable[None]]
Change = dict[str, Any]

DOCUMENT_OPS = frozenset(("insert", "update", "replace", "delete"))
# ChangeStreamHistoryLost: the resume token is older than the oplog.
_HISTORY_LOST = 286
# ChangeStreamFatalError: servers before 4.2 report a lost resume point with it.
_FATAL = 280
# Tokens, documents and dates as the rest of this module expects them: dates
# timezone-aware in UTC, and out-of-range dates as DatetimeMS instead of an
# error that would stop the stream.
_CODEC_OPTIONS: CodecOptions[Change] = CodecOptions(
    tz_aware=True,
    tzinfo=datetime.UTC,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_MS = datetime.timedelta(milliseconds=1)


class SkippedChange(StreamerError, ValueError):
    """A change that is not logged; ``reason`` labels it (the operation type,
    ``update_without_document`` or ``malformed``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _json_default(value: Any) -> Any:
    # orjson handles str, int (Int64 too: a subclass), float, bool, None,
    # dict and list itself and calls this for everything else, including what
    # this returns, so nested BSON values inside returned objects work too.
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, datetime.datetime):
        return _iso(value)
    if isinstance(value, Decimal128):
        return str(value)
    if isinstance(value, bytes):  # Binary is a bytes subclass
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Timestamp):
        return {"t": value.time, "i": value.inc}
    if isinstance(value, Regex):
        return value.pattern if isinstance(value.pattern, str) else value.pattern.decode()
    return json_util.default(value, json_util.RELAXED_JSON_OPTIONS)


def _iso(value: datetime.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC)
    # Explicit fields: strftime("%Y") does not zero-pad years before 1000.
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond // 1000:03d}Z"
    )


def to_json(value: Mapping[str, Any]) -> bytes:
    """A BSON document (as decoded by pymongo) as JSON, per the module's table."""
    # Dates go through _json_default so that they all get milliseconds and Z.
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME)


def document_id(value: Any) -> str:
    """A document ``_id`` as ``mgo_doc_id``."""
    if isinstance(value, ObjectId):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)


def event_id(token: Mapping[str, Any]) -> str:
    """A stable event id: the resume token's ``_data`` string (what servers
    since 4.2 send), else the token's canonical Extended JSON."""
    data = token.get("_data")
    if isinstance(data, str):
        return data
    return json_util.dumps(token, json_options=json_util.CANONICAL_JSON_OPTIONS)


def normalize_change(change: Mapping[str, Any], *, backend: str = "") -> ChangeEvent:
    """One change stream document as a ``ChangeEvent``.

    Raises :class:`SkippedChange` for a change that is not logged (see the
    module docstring).
    """
    op = change.get("operationType")
    if op not in DOCUMENT_OPS:
        raise SkippedChange(str(op), f"operation {op!r} changes no single document")
    try:
        token = change["_id"]
        ns = change["ns"]
        key = change["documentKey"]["_id"]
        cluster_time: Timestamp = change["clusterTime"]
    except (KeyError, TypeError) as exc:
        raise SkippedChange("malformed", f"{op} change without {exc}") from None
    full = change.get("fullDocument")
    if full is None and op != "delete":
        if op == "update":
            raise SkippedChange(
                "update_without_document",
                f"update of {ns.get('coll')}/{document_id(key)}: the document is gone",
            )
        raise SkippedChange("malformed", f"{op} change without fullDocument")
    event = ChangeEvent(
        event_id=event_id(token),
        database=ns["db"],
        mgo_coll=ns["coll"],
        mgo_doc_id=document_id(key),
        op_type=op,
        full_doc=to_json(full) if full is not None and op != "delete" else b"",
        cluster_time=ClusterTime(t=cluster_time.time, i=cluster_time.inc),
        backend=backend,
    )
    wall = change.get("wallTime")
    if isinstance(wall, datetime.datetime):
        if wall.tzinfo is None:  # a client decoding without tz_aware
            wall = wall.replace(tzinfo=datetime.UTC)
        event.timestamp = (wall - _EPOCH) // _MS
    else:
        event.timestamp = cluster_time.time * 1000
    desc = change.get("updateDescription")
    if op == "update" and desc is not None:
        event.update_desc = to_json({
            "updatedFields": desc.get("updatedFields") or {},
            "removedFields": desc.get("removedFields") or [],
            "truncatedArrays": desc.get("truncatedArrays") or [],
        })
    before = change.get("fullDocumentBeforeChange")
    if before is not None:
        event.before_doc = to_json(before)
    txn = change.get("txnNumber")
    if txn is not None:
        event.txn_number = int(txn)
    return event


def _transient(exc: PyMongoError) -> bool:
    """Whether reopening the stream may cure ``exc`` (the driver's own rule
    for resumable change stream errors)."""
    if isinstance(exc, (ConnectionFailure, CursorNotFound)):
        return True
    return isinstance(exc, OperationFailure) and exc.has_error_label("ResumableChangeStreamError")


def _history_lost(exc: PyMongoError) -> bool:
    if not isinstance(exc, OperationFailure):
        return False
    return exc.code == _HISTORY_LOST or (
        exc.code == _FATAL and "no longer be in the oplog" in str(exc)
    )


class MongoSource:
    """Change events of one MongoDB database, for the Puller's log.

    ``collections``: only these collections (``None`` or empty: all).
    ``batch_max``: the most events per ``emit``; a batch holds whatever the
    stream has already received, never waiting for more. ``max_await_ms``: how
    long one ``getMore`` waits for changes when there are none. ``backend``
    fills ``ChangeEvent.backend``. A stream that fails with a network or
    resumable error is reopened where it stopped after a jittered exponential
    backoff from ``backoff_initial`` to ``backoff_max`` seconds (the driver
    has already tried once to resume it by itself).
    """

    def __init__(
        self,
        uri: str,
        database: str,
        collections: list[str] | None = None,
        *,
        batch_max: int = 256,
        max_await_ms: int = 1000,
        backend: str = "",
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_max < 1:
            raise ValueError(f"batch_max must be at least 1, not {batch_max}")
        self.uri = uri
        self.database = database
        self.collections = list(collections or ())
        self.batch_max = batch_max
        self.max_await_ms = max_await_ms
        self.backend = backend
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.client_options = dict(client_options or {})
        #: Changes not logged, by reason (see the module docstring).
        self.skipped: Counter[str] = Counter()
        #: Times the stream was reopened after an error.
        self.reconnects = 0
        #: Events handed to ``emit``.
        self.emitted = 0

    def pipeline(self) -> list[dict[str, Any]]:
        """The stages after ``$changeStream``: the collections filter."""
        if not self.collections:
            return []
        # Database-wide events have no ns.coll; they must still get through,
        # the invalidate above all (the stream ends with it).
        return [{"$match": {"$or": [
            {"ns.coll": {"$in": self.collections}},
            {"operationType": {"$in": ["dropDatabase", "invalidate"]}},
        ]}}]

    async def run(self, emit: Emit, resume: bytes | None) -> None:
        """Emit the database's changes, from after ``resume`` (a logged
        ``source_state``; ``None``: from now on), until cancelled."""
        token: Change | None = bson.decode(resume, _CODEC_OPTIONS) if resume else None
        client: AsyncMongoClient[Change] = AsyncMongoClient(
            self.uri,
            document_class=dict,
            tz_aware=True,
            tzinfo=datetime.UTC,
            datetime_conversion=DatetimeConversion.DATETIME_AUTO,
            appname="streamer-puller",
            **self.client_options,
        )
        try:
            start_after: Change | None = None
            failures = 0
            while True:
                stream: AsyncDatabaseChangeStream[Change] | None = None
                emitted = self.emitted
                try:
                    stream = await client[self.database].watch(
                        self.pipeline(),
                        full_document="updateLookup",
                        full_document_before_change="whenAvailable",
                        resume_after=None if start_after else token,
                        start_after=start_after,
                        batch_size=self.batch_max,
                        max_await_time_ms=self.max_await_ms,
                    )
                    async with stream:
                        start_after = None
                        token, start_after = await self._pump(stream, emit, token)
                        if start_after is None and stream.resume_token is not None:
                            token = dict(stream.resume_token)
                    if start_after is None:  # closed by the server: not in a tight loop
                        await asyncio.sleep(self.backoff_initial)
                except PyMongoError as exc:
                    if _history_lost(exc):
                        raise ResumePointLost(
                            f"MongoDB change stream of {self.database!r}: the oplog no longer "
                            f"holds the resume point {_describe(token)}; the changes since "
                            f"then are lost ({exc})"
                        ) from exc
                    if not _transient(exc):
                        raise
                    # The stream's own token is at or after the last emitted
                    # one: everything it read was emitted or deliberately
                    # skipped, and resuming there rescans less of the oplog.
                    if stream is not None and stream.resume_token is not None:
                        token = dict(stream.resume_token)
                    if self.emitted > emitted:  # it worked for a while: start over
                        failures = 0
                    delay = min(self.backoff_max, self.backoff_initial * 2**failures)
                    delay *= random.uniform(0.5, 1.0)
                    failures += 1
                    self.reconnects += 1
                    log.warning(
                        "MongoDB change stream of %r failed (%s); reopening in %.2fs",
                        self.database, exc, delay,
                    )
                    await asyncio.sleep(delay)
        finally:
            await client.close()

    async def _pump(
        self, stream: AsyncDatabaseChangeStream[Change], emit: Emit, token: Change | None
    ) -> tuple[Change | None, Change | None]:
        """Emit the stream's changes until it ends; returns the last emitted
        token and, if it was invalidated, the invalidate's (to ``startAfter``)."""
        while True:
            change = await stream.try_next()
            if change is None:
                if not stream.alive:
                    # The server closed the cursor without an invalidate:
                    # try_next() would return None forever.
                    log.warning(
                        "MongoDB change stream of %r was closed by the server; reopening",
                        self.database,
                    )
                    return token, None
                continue
            batch: list[tuple[ChangeEvent, bytes]] = []
            invalidated: Change | None = None
            while True:
                if change.get("operationType") == "invalidate":
                    invalidated = change["_id"]
                elif self._add(change, batch):
                    token = change["_id"]
                # pymongo has no public way to ask whether a change is already
                # buffered; try_next() on an empty buffer would wait up to
                # max_await_ms for more, holding a ready batch back on a timer.
                if len(batch) >= self.batch_max or invalidated or not stream._cursor._has_next():
                    break
                change = await stream.try_next()
                if change is None:
                    break
            if batch:
                await emit(batch)
                self.emitted += len(batch)
            if invalidated is not None:
                self.skipped["invalidate"] += 1
                log.warning(
                    "MongoDB change stream of %r invalidated (the database was dropped); "
                    "opening a new one after it", self.database,
                )
                return token, invalidated

    def _add(self, change: Change, batch: list[tuple[ChangeEvent, bytes]]) -> bool:
        """Append ``change`` to ``batch`` unless it is skipped (counted, logged)."""
        try:
            event = normalize_change(change, backend=self.backend)
        except SkippedChange as skip:
            self.skipped[skip.reason] += 1
            if skip.reason == "update_without_document":
                log.debug("skipped: %s", skip)
            elif skip.reason == "malformed":
                log.error("skipped a malformed change: %s", skip)
            else:
                ns = change.get("ns") or {}
                log.warning(
                    "skipped %r on %s.%s: not a document change, the Streamer is not told",
                    skip.reason, ns.get("db", self.database), ns.get("coll", "*"),
                )
            return False
        batch.append((event, bson.encode(change["_id"])))
        return True


def _describe(token: Mapping[str, Any] | None) -> str:
    return "(the live head)" if token is None else repr(event_id(token))
