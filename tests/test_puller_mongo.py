"""streamer.puller.mongo: the MongoDB change-stream source.

Against SecantusDB (a MongoDB wire server on WiredTiger, in-process with
in-memory storage, advertising itself as a single-node replica set primary
so the driver allows change streams), and against MockupDB (a scripted wire
server) for the driver's resumable-error paths; plus unit tests of the
normalization of change documents.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import bson
import orjson
import pymongo
import pytest
from bson import Binary, Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.datetime_ms import DatetimeMS
from mockupdb import MockupDB, Request
from secantus import SecantusDBServer
from service_helpers import free_port, puller_command, puller_events, start_puller, stop_puller

from streamer.errors import ResumePointLost, StreamerError
from streamer.node.events import normalize
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.puller.mongo import MongoSource, SkippedChange, document_id, normalize_change

Logged = list[tuple[ChangeEvent, bytes]]
UTC = datetime.UTC
WAIT = 15.0


# --- helpers -----------------------------------------------------------------


class Log:
    """What ``emit`` was given: the batches, and a way to wait for n events."""

    def __init__(self) -> None:
        self.batches: list[Logged] = []
        self._grew = asyncio.Event()

    async def emit(self, batch: Sequence[tuple[ChangeEvent, bytes]]) -> None:
        self.batches.append(list(batch))
        self._grew.set()

    @property
    def events(self) -> Logged:
        return [item for batch in self.batches for item in batch]

    async def wait_for(self, count: int) -> Logged:
        async def grown() -> None:
            while len(self.events) < count:
                self._grew.clear()
                await self._grew.wait()

        await asyncio.wait_for(grown(), WAIT)
        return self.events


async def run_source(
    source: MongoSource, resume: bytes | None, count: int, *, settle: float = 0.3
) -> Log:
    """Run ``source`` until it has emitted ``count`` events (and ``settle``
    seconds more, to see any extra one), then cancel it."""
    log = Log()
    task = asyncio.create_task(source.run(log.emit, resume))
    try:
        await log.wait_for(count)
        await asyncio.sleep(settle)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    return log


def doc(event: ChangeEvent, field: str = "full_doc") -> Any:
    return orjson.loads(getattr(event, field))


# --- SecantusDB ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[SecantusDBServer]:
    srv = SecantusDBServer(storage_path=":memory:")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server: SecantusDBServer) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    c: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(server.uri, tz_aware=True)
    with c:
        yield c


_databases = iter(range(1_000_000))


@pytest.fixture
def db(client: pymongo.MongoClient[dict[str, Any]]) -> Any:
    """A fresh database per test (the server is shared)."""
    return client[f"t{next(_databases)}"]


def head(db: Any) -> bytes:
    """The source state of "now": the resume token of a stream opened on
    ``db``, so that a source started from it sees every later write even if
    the writes happen before it has opened its own stream."""
    with db.watch(max_await_time_ms=10) as stream:
        stream.try_next()
        assert stream.resume_token is not None, "no postBatchResumeToken"
        return bson.encode(stream.resume_token)


def test_document_changes_end_to_end(server: SecantusDBServer, db: Any) -> None:
    db.create_collection("people", changeStreamPreAndPostImages={"enabled": True})
    start = head(db)
    oid = ObjectId()
    born = datetime.datetime(1990, 5, 17, 8, 30, 1, 250000, tzinfo=UTC)
    db.people.insert_one({
        "_id": oid, "name": "ada", "born": born, "balance": Decimal128("10.50"),
        "tags": [{"since": born}, ObjectId("5f0000000000000000000001")], "n": Int64(2**40),
    })
    db.people.update_one({"_id": oid}, {"$set": {"name": "Ada"}, "$unset": {"tags": ""}})
    db.people.replace_one({"_id": oid}, {"name": "Ada L.", "deleted": False})
    db.people.insert_one({"_id": "gone", "v": 1})
    db.people.delete_one({"_id": "gone"})

    log = asyncio.run(run_source(MongoSource(server.uri, db.name, max_await_ms=100), start, 5))
    events = [e for e, _ in log.events]
    assert [e.op_type for e in events] == ["insert", "update", "replace", "insert", "delete"]
    assert [e.mgo_doc_id for e in events] == [str(oid)] * 3 + ["gone", "gone"]
    assert {(e.database, e.mgo_coll) for e in events} == {(db.name, "people")}

    inserted = doc(events[0])
    assert inserted == {
        "_id": str(oid), "name": "ada", "born": "1990-05-17T08:30:01.250Z", "balance": "10.50",
        "tags": [{"since": "1990-05-17T08:30:01.250Z"}, "5f0000000000000000000001"],
        "n": 2**40,
    }
    assert not events[0].before_doc and not events[0].update_desc

    # updateLookup: the document as it is when the change is read (replaced since).
    assert doc(events[1]) == {"_id": str(oid), "name": "Ada L.", "deleted": False}
    assert doc(events[1], "update_desc") == {
        "updatedFields": {"name": "Ada"}, "removedFields": ["tags"], "truncatedArrays": [],
    }
    assert doc(events[1], "before_doc") == inserted  # pre-images are enabled
    assert doc(events[2], "before_doc")["name"] == "Ada"
    assert events[4].full_doc == b""
    assert doc(events[4], "before_doc") == {"_id": "gone", "v": 1}

    times = [(e.cluster_time.t, e.cluster_time.i) for e in events]
    assert times == sorted(times) and len(set(times)) == 5
    now_ms = datetime.datetime.now(UTC).timestamp() * 1000
    assert all(abs(e.timestamp - now_ms) < 60_000 for e in events)
    for event, state in log.events:
        assert bson.decode(state) == {"_data": event.event_id}
    assert len({e.event_id for e in events}) == 5

    # What the Streamer makes of them (docs/semantics.md, Event transformation).
    assert [normalize(e).op.name for e in events] == [
        "INSERT", "UPDATE", "UPDATE", "INSERT", "DELETE",
    ]


def test_update_of_a_deleted_document_is_skipped(server: SecantusDBServer, db: Any) -> None:
    start = head(db)
    db.c.insert_one({"_id": 1})
    db.c.update_one({"_id": 1}, {"$set": {"x": 1}})
    db.c.delete_one({"_id": 1})
    source = MongoSource(server.uri, db.name, max_await_ms=100)
    log = asyncio.run(run_source(source, start, 2))
    assert [e.op_type for e, _ in log.events] == ["insert", "delete"]
    assert source.skipped == {"update_without_document": 1}


def test_collections_filter(server: SecantusDBServer, db: Any) -> None:
    start = head(db)
    for name in ("a", "b", "c", "a"):
        db[name].insert_one({"coll": name})
    source = MongoSource(server.uri, db.name, ["a", "c"], max_await_ms=100)
    log = asyncio.run(run_source(source, start, 3))
    assert [e.mgo_coll for e, _ in log.events] == ["a", "c", "a"]


def test_batches_hold_what_is_ready_up_to_batch_max(server: SecantusDBServer, db: Any) -> None:
    start = head(db)
    db.c.insert_many([{"_id": i} for i in range(10)])
    log = asyncio.run(run_source(MongoSource(server.uri, db.name, batch_max=4), start, 10))
    assert [e.mgo_doc_id for e, _ in log.events] == [str(i) for i in range(10)]
    sizes = [len(b) for b in log.batches]
    assert max(sizes) == 4 and sum(sizes) == 10


def test_resume_misses_and_repeats_nothing(server: SecantusDBServer, db: Any) -> None:
    start = head(db)
    db.c.insert_many([{"_id": i} for i in range(3)])
    first = asyncio.run(run_source(MongoSource(server.uri, db.name, max_await_ms=100), start, 3))
    assert [e.mgo_doc_id for e, _ in first.events] == ["0", "1", "2"]

    # Written while no source runs.
    db.c.insert_many([{"_id": i} for i in range(3, 6)])
    db.c.delete_one({"_id": 0})
    resume = first.events[-1][1]
    second = asyncio.run(
        run_source(MongoSource(server.uri, db.name, max_await_ms=100), resume, 4, settle=0.5)
    )
    assert [(e.op_type, e.mgo_doc_id) for e, _ in second.events] == [
        ("insert", "3"), ("insert", "4"), ("insert", "5"), ("delete", "0"),
    ]


def test_a_dropped_database_is_followed_after_its_invalidate(
    server: SecantusDBServer, client: Any, db: Any
) -> None:
    start = head(db)
    db.c.insert_one({"_id": 1})
    client.drop_database(db.name)
    db.c.insert_one({"_id": 2})
    source = MongoSource(server.uri, db.name, ["c"], max_await_ms=100)
    log = asyncio.run(run_source(source, start, 2))
    assert [e.mgo_doc_id for e, _ in log.events] == ["1", "2"]
    assert source.skipped == {"drop": 1, "dropDatabase": 1, "invalidate": 1}


def test_a_resume_point_gone_from_the_oplog_is_reported() -> None:
    srv = SecantusDBServer(storage_path=":memory:", oplog_max_entries=5)
    srv.start()
    try:
        c: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(srv.uri)
        with c:
            c.d.c.insert_one({"_id": "first"})
            old = head(c.d)
            c.d.c.insert_many([{"_id": i} for i in range(20)])
            # Pruning happens as the oplog grows; this SecantusDB command
            # makes it happen now.
            assert c.admin.command("secantusAdmin.pruneOplog")["pruned"] > 0

        async def main() -> None:
            source = MongoSource(srv.uri, "d", max_await_ms=100)
            await asyncio.wait_for(source.run(Log().emit, old), WAIT)

        with pytest.raises(ResumePointLost, match="no longer holds the resume point") as err:
            asyncio.run(main())
        assert isinstance(err.value, StreamerError) and isinstance(err.value, LookupError)
    finally:
        srv.stop()


# --- MockupDB: the driver's resumable-error paths --------------------------------


def _change(n: int) -> dict[str, Any]:
    return {
        "_id": {"_data": f"T{n:04d}"},
        "operationType": "insert",
        "clusterTime": Timestamp(1_700_000_000, n),
        "wallTime": datetime.datetime(2023, 11, 14, 22, 13, 20, n * 1000),
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": n},
        "fullDocument": {"_id": n, "v": n},
    }


@pytest.fixture
def mock() -> Iterator[MockupDB]:
    srv = MockupDB(request_timeout=WAIT)
    port = srv.run()
    address = f"localhost:{port}"
    primary = {
        "ismaster": True, "isWritablePrimary": True, "helloOk": True, "setName": "rs",
        "setVersion": 1, "hosts": [address], "primary": address, "me": address,
        "electionId": ObjectId("7fffffff0000000000000001"), "minWireVersion": 0,
        "maxWireVersion": 21, "logicalSessionTimeoutMinutes": 30,
    }
    for name in ("ismaster", "isMaster", "hello"):
        srv.autoresponds(name, primary)
    # A command-name matcher also compares the value with 1: these two need a
    # handler (the driver sends them when it closes a cursor or the client).
    srv.autoresponds(
        lambda request: request.command_name in ("endSessions", "killCursors")
        and request.replies()
    )
    try:
        yield srv
    finally:
        srv.stop()


def _cursor(request: Request, cursor_id: int, first: bool, changes: list[dict[str, Any]]) -> None:
    batch = "firstBatch" if first else "nextBatch"
    token = changes[-1]["_id"] if changes else {"_data": "T0000"}
    request.reply(cursor={
        "id": Int64(cursor_id), "ns": "d.$cmd.aggregate", batch: changes,
        "postBatchResumeToken": token,
    })


def _expect(request: Request, name: str) -> Request:
    assert request.command_name == name, request
    return request


def _scripted(
    mock: MockupDB, script: Callable[[], None], count: int, source: MongoSource
) -> Log:
    """Run ``source`` against ``mock`` while ``script`` (in a thread) answers
    its requests; returns once ``count`` events are emitted and the script ended."""
    failure: list[BaseException] = []

    def play() -> None:
        try:
            script()
        except BaseException as exc:
            failure.append(exc)

    async def main() -> Log:
        log = Log()
        task = asyncio.create_task(source.run(log.emit, None))
        thread = threading.Thread(target=play, daemon=True)
        thread.start()
        try:
            await log.wait_for(count)
            await asyncio.to_thread(thread.join, WAIT)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return log

    log = asyncio.run(main())
    if failure:
        raise failure[0]
    return log


def _source(mock: MockupDB) -> MongoSource:
    return MongoSource(
        f"mongodb://localhost:{mock.port}/?directConnection=true", "d",
        max_await_ms=50, backoff_initial=0.01,
        client_options={"serverSelectionTimeoutMS": 5000},
    )


def test_driver_resumes_after_a_resumable_error(mock: MockupDB) -> None:
    def script() -> None:
        agg = _expect(mock.receives(), "aggregate")
        stage = agg["pipeline"][0]["$changeStream"]
        assert stage["fullDocument"] == "updateLookup"
        assert stage["fullDocumentBeforeChange"] == "whenAvailable"
        _cursor(agg, 42, True, [_change(1), _change(2)])
        _expect(mock.receives(), "getMore").reply(
            ok=0, code=6, codeName="HostUnreachable", errmsg="scripted",
            errorLabels=["ResumableChangeStreamError"],
        )
        agg = _expect(mock.receives(), "aggregate")
        assert agg["pipeline"][0]["$changeStream"]["resumeAfter"] == {"_data": "T0002"}
        _cursor(agg, 43, True, [_change(3)])

    source = _source(mock)
    log = _scripted(mock, script, 3, source)
    events = [e for e, _ in log.events]
    assert [e.mgo_doc_id for e in events] == ["1", "2", "3"]
    assert source.reconnects == 0  # the driver resumed by itself
    assert events[2].timestamp == 1_700_000_000_000 + 3


def test_source_reopens_when_the_drivers_resume_fails_too(mock: MockupDB) -> None:
    def script() -> None:
        _cursor(_expect(mock.receives(), "aggregate"), 42, True, [_change(1), _change(2)])
        _expect(mock.receives(), "getMore").hangup()
        # The driver's own resume attempt and its retry of it die as well: the
        # source takes over.
        _expect(mock.receives(), "aggregate").hangup()
        _expect(mock.receives(), "aggregate").hangup()
        agg = _expect(mock.receives(), "aggregate")
        assert agg["pipeline"][0]["$changeStream"]["resumeAfter"] == {"_data": "T0002"}
        _cursor(agg, 43, True, [_change(3), _change(4)])

    source = _source(mock)
    log = _scripted(mock, script, 4, source)
    assert [e.mgo_doc_id for e, _ in log.events] == ["1", "2", "3", "4"]
    assert source.reconnects == 1


def test_source_reopens_a_stream_the_server_closed(mock: MockupDB) -> None:
    def script() -> None:
        # Cursor id 0 without an invalidate: the driver considers it finished.
        _cursor(_expect(mock.receives(), "aggregate"), 0, True, [_change(1)])
        agg = _expect(mock.receives(), "aggregate")
        assert agg["pipeline"][0]["$changeStream"]["resumeAfter"] == {"_data": "T0001"}
        _cursor(agg, 43, True, [_change(2)])

    log = _scripted(mock, script, 2, _source(mock))
    assert [e.mgo_doc_id for e, _ in log.events] == ["1", "2"]


def test_history_lost_from_the_server_is_reported(mock: MockupDB) -> None:
    def script() -> None:
        _expect(mock.receives(), "aggregate").reply(
            ok=0, code=286, codeName="ChangeStreamHistoryLost",
            errmsg="Resume of change stream was not possible",
        )

    async def main() -> None:
        await asyncio.wait_for(_source(mock).run(Log().emit, bson.encode({"_data": "T0001"})), WAIT)

    thread = threading.Thread(target=script, daemon=True)
    thread.start()
    with pytest.raises(ResumePointLost, match="'T0001'"):
        asyncio.run(main())
    thread.join(WAIT)


# --- normalization ---------------------------------------------------------------


def change(op: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_id": {"_data": "826A"},
        "operationType": op,
        "clusterTime": Timestamp(1_700_000_000, 7),
        "wallTime": datetime.datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC),
        "ns": {"db": "d", "coll": "c"},
        "documentKey": {"_id": ObjectId("65540000000000000000abcd")},
    }
    base.update(extra)
    return base


def test_insert() -> None:
    event = normalize_change(change("insert", fullDocument={"_id": 1, "a": "x"}), backend="b1")
    assert event.event_id == "826A"
    assert (event.database, event.mgo_coll) == ("d", "c")
    assert event.mgo_doc_id == "65540000000000000000abcd"
    assert event.op_type == "insert" and event.backend == "b1"
    assert orjson.loads(event.full_doc) == {"_id": 1, "a": "x"}
    assert (event.cluster_time.t, event.cluster_time.i) == (1_700_000_000, 7)
    assert event.timestamp == 1_700_000_000_123
    assert not event.update_desc and not event.before_doc and event.txn_number == 0


def test_update_with_pre_image_and_transaction() -> None:
    event = normalize_change(change(
        "update", fullDocument={"a": 2}, fullDocumentBeforeChange={"a": 1},
        updateDescription={
            "updatedFields": {"a": 2, "t": datetime.datetime(2020, 1, 1)},
            "removedFields": ["b"],
            "truncatedArrays": [{"field": "l", "newSize": 1}],
        },
        txnNumber=Int64(12), lsid={"id": Binary(b"x" * 16, 4)},
    ))
    assert event.op_type == "update" and event.txn_number == 12
    assert orjson.loads(event.update_desc) == {
        "updatedFields": {"a": 2, "t": "2020-01-01T00:00:00.000Z"}, "removedFields": ["b"],
        "truncatedArrays": [{"field": "l", "newSize": 1}],
    }
    assert orjson.loads(event.before_doc) == {"a": 1}
    assert orjson.loads(event.full_doc) == {"a": 2}


def test_update_description_defaults_and_servers_without_wall_time() -> None:
    event = normalize_change({
        k: v for k, v in change(
            "update", fullDocument={"a": 2}, updateDescription={"updatedFields": {"a": 2}},
        ).items() if k != "wallTime"
    })
    assert orjson.loads(event.update_desc) == {
        "updatedFields": {"a": 2}, "removedFields": [], "truncatedArrays": [],
    }
    assert event.timestamp == 1_700_000_000_000


def test_replace_and_delete() -> None:
    replace = normalize_change(change("replace", fullDocument={"a": 3}))
    assert replace.op_type == "replace" and orjson.loads(replace.full_doc) == {"a": 3}
    assert not replace.update_desc
    delete = normalize_change(change("delete"))
    assert delete.op_type == "delete" and delete.full_doc == b"" and not delete.before_doc
    with_image = normalize_change(change("delete", fullDocumentBeforeChange={"a": 3}))
    assert orjson.loads(with_image.before_doc) == {"a": 3}


@pytest.mark.parametrize("op", [
    "drop", "rename", "dropDatabase", "invalidate", "create", "createIndexes", "modify",
])
def test_non_document_operations_are_skipped(op: str) -> None:
    with pytest.raises(SkippedChange) as err:
        normalize_change(change(op))
    assert err.value.reason == op
    assert isinstance(err.value, StreamerError) and isinstance(err.value, ValueError)


def test_updates_of_vanished_documents_and_malformed_changes_are_skipped() -> None:
    with pytest.raises(SkippedChange) as err:
        normalize_change(change("update", fullDocument=None))
    assert err.value.reason == "update_without_document"
    with pytest.raises(SkippedChange) as err:
        normalize_change(change("insert"))
    assert err.value.reason == "malformed"
    broken = change("insert", fullDocument={})
    del broken["documentKey"]
    with pytest.raises(SkippedChange) as err:
        normalize_change(broken)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize(("value", "expected"), [
    (ObjectId("65540000000000000000abcd"), "65540000000000000000abcd"),
    ("k-1", "k-1"),
    (42, "42"),
    (Int64(-2**62), str(-2**62)),
    (1.5, '{"$numberDouble": "1.5"}'),
    (True, "true"),
    ({"a": 1}, '{"a": {"$numberInt": "1"}}'),
    (Binary(b"\x01\x02", 0), '{"$binary": {"base64": "AQI=", "subType": "00"}}'),
])
def test_document_ids(value: Any, expected: str) -> None:
    assert document_id(value) == expected


def test_bson_types_as_json() -> None:
    when = datetime.datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    document = {
        "oid": ObjectId("65540000000000000000abcd"),
        "aware": when,
        "paris": when.astimezone(datetime.timezone(datetime.timedelta(hours=1))),
        "naive": datetime.datetime(2024, 1, 2, 3, 4, 5),
        "early": datetime.datetime(5, 1, 1, tzinfo=UTC),
        "dec": Decimal128("-1.50E+3"),
        "big": Int64(2**62),
        "bin": Binary(b"\x00\xffhi", 0),
        "raw": b"\x01",
        "uuid": Binary(b"\x12" * 16, 4),
        "ts": Timestamp(1_700_000_000, 3),
        "re": Regex("^a.*z$", "i"),
        "code": Code("f()"),
        "min": MinKey(),
        "max": MaxKey(),
        "nested": {"list": [ObjectId("65540000000000000000abce"), {"d": Decimal128("2")}],
                   "deep": [[when]]},
        "plain": [1, 2.5, "s", None, True],
        "nan": float("nan"),
        # Beyond Python's year 9999 the driver decodes a DatetimeMS (the
        # source asks for that rather than an error that stops the stream).
        "far": DatetimeMS(253_402_300_800_000),
    }
    full = normalize_change(change("insert", fullDocument=document)).full_doc
    assert orjson.loads(full) == {
        "oid": "65540000000000000000abcd",
        "aware": "2024-01-02T03:04:05.678Z",
        "paris": "2024-01-02T03:04:05.678Z",
        "naive": "2024-01-02T03:04:05.000Z",
        "early": "0005-01-01T00:00:00.000Z",
        "dec": "-1.50E+3",
        "big": 2**62,
        "bin": base64.b64encode(b"\x00\xffhi").decode(),
        "raw": "AQ==",
        "uuid": base64.b64encode(b"\x12" * 16).decode(),
        "ts": {"t": 1_700_000_000, "i": 3},
        "re": "^a.*z$",
        "code": "f()",
        "min": {"$minKey": 1},
        "max": {"$maxKey": 1},
        "nested": {"list": ["65540000000000000000abce", {"d": "2"}],
                   "deep": [["2024-01-02T03:04:05.678Z"]]},
        "plain": [1, 2.5, "s", None, True],
        "nan": None,
        "far": {"$date": {"$numberLong": "253402300800000"}},
    }


# ------------------------------------------------------------ streamer puller


def test_streamer_puller_serves_a_change_stream_and_resumes_after_a_restart(
    server: SecantusDBServer, db: Any, tmp_path: Path
) -> None:
    """``streamer puller --mongodb`` as a real process: changes reach a
    puller.v1 consumer, and a restart resumes the change stream from the
    token kept in the log (writes made while it was down are not lost)."""
    port = free_port()
    args = ("--mongodb", server.uri, "--db", db.name, "--collections", "messages")

    def ids(events: list[Any]) -> list[str]:
        return [e.change_event.mgo_doc_id for e in events]

    proc = start_puller(tmp_path, port, *args)
    try:
        # The change stream starts at "now" once the process is up: a live
        # consumer waits while documents are written until one comes through.
        async def first() -> list[Any]:
            consumer = asyncio.create_task(puller_events(port, "", 1, timeout=90))
            n = 0
            while not consumer.done():
                db.messages.insert_one({"_id": f"m{n}", "text": "hi"})
                db.other.insert_one({"_id": f"o{n}"})  # filtered out
                n += 1
                await asyncio.wait([consumer], timeout=0.5)
            return consumer.result()

        [got] = asyncio.run(first())
        assert got.change_event.op_type == "insert" and got.change_event.mgo_coll == "messages"
        assert stop_puller(proc) == 0
        db.messages.insert_one({"_id": "while-down"})
        db.messages.update_one({"_id": "while-down"}, {"$set": {"text": "edited"}})
        proc = start_puller(tmp_path, port, *args, run="1")
        later = asyncio.run(puller_events(port, got.progress, 2, timeout=90))
        assert [(e.change_event.op_type, e.change_event.mgo_doc_id) for e in later][-2:] == [
            ("insert", "while-down"), ("update", "while-down")]
        assert "o0" not in ids(later)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_streamer_puller_mongodb_usage_errors() -> None:
    for args, message in [
        (("--mongodb", "mongodb://127.0.0.1:1"), "--mongodb needs --db NAME"),
        (("--workload", "chat", "--db", "app"), "--db and --collections go with --mongodb"),
    ]:
        proc = subprocess.run(puller_command(*args), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
