"""Write the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Each seed is encoded the way the target decodes its input (``fuzz/common.py``:
``ConsumeBytes`` from the front, ``ConsumeIntInRange`` from the end) and
checked by decoding it back, so a seed is exactly the expression, Puller
message or gateway script it is named after. Run it again after changing a
target's decoding:

    python fuzz/make_corpus.py
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import fuzz_cel
import fuzz_events
import fuzz_gateway
import orjson

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2 as spb

ROOT = Path(__file__).resolve().parent
CONFORMANCE = ROOT.parent / "tests" / "data" / "cel_spec_subset.json"


class Encoder:
    """Builds the input that the target's sequence of ``FuzzedDataProvider``
    calls decodes into the values given, in the same order."""

    def __init__(self) -> None:
        self.front = bytearray()
        self.back = bytearray()  # in the order the provider consumes it

    def int(self, value: int, lo: int, hi: int) -> Encoder:
        assert lo <= value <= hi, (value, lo, hi)
        span, offset, width = hi - lo, 0, 0
        # The provider reads one byte per 8 bits of the range, most
        # significant first, from the end of the input.
        while offset < 64 and span >> offset:
            width += 1
            offset += 8
        self.back += (value - lo).to_bytes(width, "big") if width else b""
        return self

    def bytes(self, data: bytes, limit: int) -> Encoder:
        self.int(len(data), 0, limit)
        self.front += data
        return self

    def text(self, value: str, limit: int) -> Encoder:
        return self.bytes(value.encode(), limit)

    def pick(self, value: object, options: tuple[object, ...], limit: int) -> Encoder:
        """``common.pick`` with ``text(limit)`` as the other choice."""
        if value in options:
            return self.int(options.index(value), 0, len(options))
        assert isinstance(value, str), value
        return self.int(len(options), 0, len(options)).text(value, limit)

    def data(self) -> bytes:
        return bytes(self.front) + bytes(reversed(self.back))


def dumps(value: object) -> bytes:
    return orjson.dumps(value)


# ------------------------------------------------------------------ CEL


def nested(depth: int) -> object:
    value: object = 1
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


MESSAGE = {
    "chat_id": "c12", "user_id": "u3", "type": "text", "text": "hello there",
    "score": 4.5, "created_at": 1700000000000, "tags": ["urgent", "news"],
    "reply_to": None, "deleted": False,
}
USER = {
    "name": "Ada", "status": "online", "age": 36, "created_at": 1700000000000,
    "profile": {"country": "DE", "city": "Berlin", "language": "de", "bio": "hi"},
}
WORKLOAD_EXPRESSIONS = [
    ("doc.chat_id == 'c12' && doc.score >= 3.5", "d1", MESSAGE),
    ("doc.user_id == 'u3' || 'urgent' in doc.tags", "d1", MESSAGE),
    ("doc.chat_id == 'c5' && doc.text.startsWith('hello')", "d1", MESSAGE),
    ("has(doc.profile) && doc.profile.country == 'DE' && doc.age >= 18", "42", USER),
    ("doc._id == '42' || doc._id in ['d1', 'd2']", "42", USER),
    ("!(doc.score < 3.0) && doc.tags.size() > 1", None, MESSAGE),
    ("doc.text.matches('^h[a-z]+') ? doc.score / 0.0 > 1.0 : false", "d1", MESSAGE),
    ("size(doc.profile) == 4 && doc['profile']['city'].endsWith('in')", "42", USER),
    ("doc.`created_at` % 1000 == 0 && doc.age * 2 - 1 > 70", "42", USER),
    ("doc.a == doc.b", "d1", {"a": [[[[1]]]], "b": [[[[1.0]]]]}),
    ("doc.n + 9223372036854775807 > 0", "d1", {"n": 1}),
    ("{'k': doc.x}.k == 18446744073709551615", "d1", {"x": 18446744073709551615}),
    ("'\\u00e9t\\xe9' + r'\\d' + '''x''' == doc.s", "d1", {"s": "été\\dx"}),
    ("(" * 70 + "true" + ")" * 70, "d1", {}),
    ("doc.l[0] in doc.m && doc.l[1] != null", "d1", {"l": [1, None], "m": {"1": 0}}),
    ("doc.x.exists(y, y > 1)", "d1", {"x": [1, 2]}),
    # Around the evaluator's bound on the nesting of compared values (100).
    ("doc.a == doc.b", "d1", {"a": nested(100), "b": nested(100)}),
    ("doc.a in doc.b", "d1", {"a": nested(101), "b": [nested(101)]}),
    ("doc.n == 9007199254740993 || doc.n == 9007199254740992.0", "d1", {"n": 2**53 + 1}),
    # On either side of the 4096-character bound.
    ("doc.s == 'é'" + " " * 4084, "d1", {"s": "é"}),
    ("doc.s == 'é'" + " " * 4085, "d1", {"s": "é"}),
]


def _binding(expr: str, bindings: dict[str, object]) -> str | None:
    """The conformance expression with its variables read from ``doc``
    (None where a variable's name also occurs inside a string literal)."""
    for name in bindings:
        if re.search(rf"['\"][^'\"]*\b{name}\b", expr):
            return None
        expr = re.sub(rf"(?<![\w.`]){name}(?![\w`])", f"doc.{name}", expr)
    return expr


def conformance_expressions() -> Iterator[tuple[str, tuple[str, str | None, object]]]:
    """Two cases of each section of the conformance file, with their
    variables as document fields."""
    seen: dict[str, int] = {}
    for case in json.loads(CONFORMANCE.read_text()):
        section = case["section"].split("/")[0]
        if seen.get(section, 0) >= 2:
            continue
        try:
            doc = orjson.loads(orjson.dumps(case["bindings"]))
        except (TypeError, orjson.JSONEncodeError):
            continue
        expr = _binding(case["expr"], case["bindings"])
        if expr is None:
            continue
        seen[section] = seen.get(section, 0) + 1
        yield re.sub(r"\W+", "-", case["name"]), (expr, "d1", doc)


def cel_seeds() -> Iterator[tuple[str, bytes]]:
    shapes = ((f"shape-{n:02d}", case) for n, case in enumerate(WORKLOAD_EXPRESSIONS))
    for name, case in (*shapes, *conformance_expressions()):
        expression, document_id, doc = case
        raw = dumps(doc)
        enc = Encoder().text(expression, fuzz_cel.EXPRESSION_LIMIT)
        enc.pick(document_id, fuzz_cel.DOCUMENT_IDS, 16)
        data = enc.bytes(raw, fuzz_cel.DOCUMENT_LIMIT).data()
        assert fuzz_cel.decode(data) == (expression, document_id, doc), case
        yield f"cel-{name}", data


# ------------------------------------------------------------------ events


def change(op_type: str, full: object = None, before: object = None, desc: object = None,
           **fields: object) -> pb.ChangeEvent:
    def raw(doc: object) -> bytes:
        return doc if isinstance(doc, bytes) else b"" if doc is None else dumps(doc)

    base: dict[str, object] = {
        "event_id": "ev-1", "database": "app", "mgo_coll": "messages", "mgo_doc_id": "d1",
        "timestamp": 1700000000000,
    }
    base.update(fields)
    return pb.ChangeEvent(op_type=op_type, full_doc=raw(full), before_doc=raw(before),
                          update_desc=raw(desc), **base)  # type: ignore[arg-type]


def stored(data: object, deleted: bool = False, **meta: object) -> dict[str, object]:
    return {"id": "app:9f2c", "database": "app", "collection": "messages",
            "collectionHash": "9f2c", "updatedAt": 1700000000000, "createdAt": 1690000000000,
            "version": 3, "data": data, "deleted": deleted, **meta}


CHAT = {"chat": "c1", "n": 3, "tags": ["x"], "text": "a chat message", "deleted": False}
SOFT = {**CHAT, "deleted": True}
EVENTS: dict[str, tuple[str, list[pb.ChangeEvent | None]]] = {
    "insert": ("deleted", [change("insert", CHAT)]),
    "update": ("deleted", [change("update", {**CHAT, "n": 4})]),
    "update-desc": ("deleted", [change("update", CHAT, desc={
        "updatedFields": {"n": 4}, "removedFields": ["tags"], "truncatedArrays": []})]),
    "update-enter-leave": ("deleted", [change("update", {**CHAT, "chat": "c2"}, CHAT)]),
    "soft-delete": ("deleted", [change("update", SOFT)]),
    "soft-delete-pre-image": ("deleted", [change("update", SOFT, CHAT)]),
    "recreate-update": ("deleted", [change("update", CHAT, desc={
        "updatedFields": {"deleted": False}})]),
    "replace": ("deleted", [change("replace", CHAT)]),
    "replace-recreate": ("deleted", [change("replace", CHAT, SOFT)]),
    "delete": ("deleted", [change("delete")]),
    "delete-pre-image": ("deleted", [change("delete", before=CHAT)]),
    "delete-id-list": ("deleted", [change("delete", mgo_coll="users", mgo_doc_id="42")]),
    "users-update": ("deleted", [change("update", USER, mgo_coll="users", mgo_doc_id="d2")]),
    "custom-soft-delete": ("archived", [change("update", {**CHAT, "archived": True})]),
    "syntrix-insert": ("deleted", [change("insert", stored({"id": "d1", **CHAT}))]),
    "syntrix-soft-delete": ("deleted", [change(
        "update", stored({}, deleted=True), stored({"id": "d1", **CHAT}))]),
    "syntrix-recreate": ("deleted", [change("replace", stored({"id": "d1", **CHAT}))]),
    "syntrix-no-data": ("deleted", [change("update", stored(None))]),
    "bad-json": ("deleted", [change("insert", b'{"chat": "c1"')]),
    "not-object": ("deleted", [change("update", [1, 2])]),
    "bad-update-desc": ("deleted", [change("update", CHAT, desc=b"[")]),
    "unknown-op": ("deleted", [change("drop", CHAT)]),
    "missing-document": ("deleted", [change("insert")]),
    "other-collection": ("deleted", [change("insert", CHAT, mgo_coll="chats")]),
    "heartbeat": ("deleted", [None]),
    "batch": ("deleted", [change("insert", CHAT), None, change("update", SOFT, CHAT),
                          change("delete", event_id="ev-2")]),
}


def events_seeds() -> Iterator[tuple[str, bytes]]:
    for name, (soft_delete_field, events) in EVENTS.items():
        enc = Encoder().pick(soft_delete_field, fuzz_events.SOFT_DELETE_FIELDS,
                             fuzz_events.TEXT_LIMIT)
        enc.int(len(events), 1, fuzz_events.MAX_EVENTS)
        expected = []
        for n, ce in enumerate(events):
            progress = f"v1:log:{n + 1}"
            enc.int(0 if ce is None else 1, 0, 1).text(progress, fuzz_events.TEXT_LIMIT)
            if ce is None:
                expected.append(pb.PullerEvent(progress=progress))
                continue
            text_limit, doc_limit = fuzz_events.TEXT_LIMIT, fuzz_events.DOCUMENT_LIMIT
            enc.text(ce.event_id, text_limit)
            enc.pick(ce.database, fuzz_events.DATABASES, text_limit)
            enc.pick(ce.mgo_coll, fuzz_events.COLLECTIONS, text_limit)
            enc.pick(ce.mgo_doc_id, fuzz_events.DOCUMENT_IDS, text_limit)
            enc.pick(ce.op_type, fuzz_events.OP_TYPES, text_limit)
            enc.bytes(ce.full_doc, doc_limit).bytes(ce.before_doc, doc_limit)
            enc.bytes(ce.update_desc, doc_limit)
            enc.int(ce.timestamp, *fuzz_events.INT64)
            expected.append(pb.PullerEvent(change_event=ce, progress=progress))
        data = enc.data()
        assert fuzz_events.decode(data) == (soft_delete_field, expected), name
        yield f"events-{name}", data


# ------------------------------------------------------------------ gateway


def gm(**payload: object) -> bytes:
    return spb.GatewayMessage(**payload).SerializeToString()  # type: ignore[arg-type]


def subscribe(sub_id: str, *filters: spb.Filter, collection: str = "messages",
              expression: str = "") -> bytes:
    return gm(subscribe=spb.SubscribeRequest(
        subscription_id=sub_id, database="app", collection=collection, filters=filters,
        expression=expression))


def subscribe_batch(*messages: bytes) -> bytes:
    requests = [spb.GatewayMessage.FromString(m).subscribe for m in messages]
    return gm(subscribe_batch=spb.SubscribeBatch(requests=requests))


def flt(field: str, op: str, value: spb.Value) -> spb.Filter:
    return spb.Filter(field=field, op=op, value=value)


def hello(gateway_id: str, instance: str, **options: object) -> bytes:
    return gm(hello=spb.Hello(gateway_id=gateway_id, instance=instance,
                              **options))  # type: ignore[arg-type]


def heartbeat(gateway_id: str = "gw-1") -> bytes:
    return gm(heartbeat=spb.Heartbeat(gateway_id=gateway_id, timestamp=1700000000000))


def unsubscribe(sub_id: str) -> bytes:
    return gm(unsubscribe=spb.UnsubscribeRequest(subscription_id=sub_id))


S = spb.Value
CLOSE, WAIT = "close", "wait"
CHAT_C1 = flt("chat_id", "==", S(string_value="c1"))


def match(document_id: str | None, doc: object, pick: int = 0) -> tuple[int, str | None, object]:
    return pick, document_id, doc


Action = bytes | str | tuple[int, str | None, object]
GATEWAY: dict[str, list[tuple[int, Action, int]]] = {
    "subscribe-filters": [(0, subscribe("s1", CHAT_C1, flt("type", "eq", S(string_value="text")),
                                        flt("score", ">=", S(double_value=3.5))), 0)],
    "subscribe-values": [(0, subscribe(
        "s2", flt("chat_id", "in", S(list_value=spb.ListValue(values=[
            S(string_value="c1"), S(int_value=42), S(bool_value=True)]))),
        flt("_id", "==", S(int_value=42)), flt("tags", "contains", S(string_value="x"))), 0)],
    "subscribe-expression": [(0, subscribe(
        "s3", expression="doc.chat_id == 'c12' && doc.text.startsWith('hello')"), 0)],
    "subscribe-generated-id": [(1, subscribe("", CHAT_C1), 0)],
    "subscribe-whole-collection": [(1, subscribe("s4", collection="chats"), 0)],
    "subscribe-invalid": [(0, subscribe("bad", flt("chat_id", "like", S(string_value="c"))), 0),
                          (0, subscribe("bad2", expression="doc.a ==") , 0),
                          (0, subscribe("bad3", flt("a", "==", S())), 0)],
    "subscribe-duplicate": [(0, subscribe("dup", CHAT_C1), 0), (1, subscribe("dup", CHAT_C1), 0)],
    "subscribe-scan-limit": [(0, subscribe(f"scan{n}", expression=f"doc.n != {n}"), 0)
                             for n in range(5)],
    "subscribe-too-many": [(2, subscribe(f"m{n}", CHAT_C1), 0) for n in range(13)],
    "subscribe-batch": [(0, subscribe("s1", CHAT_C1), 0), (1, subscribe_batch(
        subscribe("b1", CHAT_C1), subscribe("s1", CHAT_C1), subscribe("", CHAT_C1),
        subscribe("bad", expression="doc.a =="), subscribe("b1", CHAT_C1),
        *(subscribe(f"scan{n}", expression=f"doc.n != {n}") for n in range(4))), 0),
        (1, unsubscribe("b1"), 0), (2, subscribe_batch(), 0)],
    "unsubscribe": [(0, subscribe("s1", CHAT_C1), 0), (0, unsubscribe("s1"), 0)],
    "unsubscribe-other": [(0, subscribe("s1", CHAT_C1), 0), (1, unsubscribe("s1"), 0),
                          (0, unsubscribe("nope"), 0)],
    "hello-batching": [(0, hello("gw-1", "instance-1", batch_delivery=True, max_batch=64,
                                 max_message_bytes=1 << 20), 0), (0, heartbeat(), 0)],
    "hello-replaces": [(0, hello("gw-1", "instance-1"), 0), (0, subscribe("s1", CHAT_C1), 0),
                       (1, hello("gw-1", "instance-1"), 0), (1, subscribe("s1", CHAT_C1), 0)],
    "hello-taken": [(0, hello("gw-1", "instance-1"), 0), (1, hello("gw-1", "intruder"), 0)],
    "heartbeat-plain": [(2, heartbeat("gw-plain"), 0)],
    "empty-message": [(0, gm(), 0)],
    "junk": [(0, b"\xff\xff\xff", 0)],
    "expire": [(0, subscribe("s1", CHAT_C1), 0), (1, heartbeat(), 0), (2, WAIT, 60),
               (1, heartbeat(), 0), (2, WAIT, 31)],
    "close": [(0, subscribe("s1", CHAT_C1), 0), (0, CLOSE, 0), (1, subscribe("s1", CHAT_C1), 0)],
    "queue-full": [(0, heartbeat(), 0) for _ in range(25)],
    "match": [(0, subscribe("s1", CHAT_C1), 0), (1, subscribe("s2", flt(
        "score", ">", S(double_value=3.5))), 0), (2, subscribe("s3", expression=(
            "'urgent' in doc.tags")), 0), (0, match("d1", MESSAGE), 0),
        (1, match(None, {"chat_id": "c2", "score": 3.75}, 1), 0)],
    "match-churn": [(0, subscribe("s1", CHAT_C1), 0), (1, subscribe("s2", CHAT_C1), 0),
                    (0, unsubscribe("s1"), 0), (1, CLOSE, 0), (2, subscribe("s1", flt(
                        "_id", "in", S(list_value=spb.ListValue(values=[
                            S(string_value="d1"), S(int_value=42)])))), 0),
                    (2, match("42", [1, 2]), 0)],
}


def gateway_seeds() -> Iterator[tuple[str, bytes]]:
    for name, steps in GATEWAY.items():
        enc, expected = Encoder(), []
        for stream, what, seconds in steps:
            enc.int(stream, 0, fuzz_gateway.STREAMS - 1)
            if isinstance(what, tuple):
                pick, document_id, doc = what
                enc.int(fuzz_gateway.MATCH, fuzz_gateway.MESSAGE, fuzz_gateway.MATCH)
                enc.int(pick, 0, 255).pick(document_id, fuzz_gateway.DOCUMENT_IDS, 16)
                enc.bytes(dumps(doc), fuzz_gateway.DOCUMENT_LIMIT)
                expected.append((stream, fuzz_gateway.MATCH, (pick, document_id, doc)))
            elif what == CLOSE:
                enc.int(fuzz_gateway.CLOSE, fuzz_gateway.MESSAGE, fuzz_gateway.MATCH)
                expected.append((stream, fuzz_gateway.CLOSE, None))
            elif what == WAIT:
                enc.int(fuzz_gateway.WAIT, fuzz_gateway.MESSAGE, fuzz_gateway.MATCH)
                enc.int(seconds, 0, 2 * fuzz_gateway.SESSION_TTL)
                expected.append((stream, fuzz_gateway.WAIT, seconds))
            else:
                assert isinstance(what, bytes)
                enc.int(fuzz_gateway.MESSAGE, fuzz_gateway.MESSAGE, fuzz_gateway.MATCH)
                enc.bytes(what, fuzz_gateway.MESSAGE_LIMIT)
                expected.append((stream, fuzz_gateway.MESSAGE, what))
        data = enc.data()
        assert fuzz_gateway.decode(data) == expected, name
        yield f"gateway-{name}", data


def write(target: str, seeds: Iterator[tuple[str, bytes]]) -> None:
    directory = ROOT / "corpus" / target
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name, data in seeds:
        # The digest keeps names unique if two seeds ever share a label.
        digest = hashlib.sha1(data).hexdigest()[:8]
        (directory / f"{name}-{digest}").write_bytes(data)


if __name__ == "__main__":
    write("cel", cel_seeds())
    write("events", events_seeds())
    write("gateway", gateway_seeds())
