"""The behaviour of docs/protocol.md, docs/semantics.md and docs/delivery.md, end to end.

The whole Streamer runs in-process (``service_helpers.Service``: real gRPC
on loopback, the real registry, matcher, ingest and sweeper), events come
from a ``PullerDouble`` as ``puller.v1`` change events, and gateways are
``StreamerClient``s (raw gRPC streams only where a gateway must misbehave:
never heartbeat, never read, or send what the client library refuses to).

Event ``k`` appended to the Puller is always ``e{k}``, with marker ``p{k}``.
"Nothing was delivered" is proved by ordering: deliveries to one gateway keep
the Puller's order, so when a later event that does match is the next
delivery, nothing came for the events before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from service_helpers import Service, until

from streamer.client import StreamerClient
from streamer.errors import SubscriptionRejected
from streamer.matching.reference import ReferenceMatcher
from streamer.node.events import Op, normalize
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    EventDelivery,
    Filter,
    GatewayMessage,
    Heartbeat,
    StreamerMessage,
    SubscribeRequest,
    UnsubscribeRequest,
    Value,
)
from streamer.tools.workload import SubscriptionSpec, Workload, change_event

FAST: dict[str, Any] = {"heartbeat_interval": 0.1, "ack_timeout": 1.0, "backoff": (0.01, 0.05)}
T0 = 1_764_000_000_000
INSERT, UPDATE, DELETE = Op.INSERT, Op.UPDATE, Op.DELETE
Doc = dict[str, Any] | bytes | None


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout))


def _json(doc: Doc) -> bytes:
    if doc is None:
        return b""
    return doc if isinstance(doc, bytes) else orjson.dumps(doc)


async def emit(
    svc: Service,
    full: Doc = None,
    *,
    op: str = "insert",
    before: Doc = None,
    update: dict[str, Any] | None = None,
    database: str = "app",
    collection: str = "messages",
    doc_id: str | None = None,
) -> str:
    """Append one change event to the Puller; returns its event id ``e{k}``."""
    k = len(svc.puller.events)
    await svc.puller.append(pb.ChangeEvent(
        event_id=f"e{k}", database=database, mgo_coll=collection,
        mgo_doc_id=f"d{k}" if doc_id is None else doc_id, op_type=op,
        full_doc=_json(full), before_doc=_json(before),
        update_desc=b"" if update is None else orjson.dumps(update),
        cluster_time=pb.ClusterTime(t=1_764_000_000 + k, i=1), timestamp=T0 + k,
        txn_number=k, backend="mongo",
    ))
    return f"e{k}"


async def take(client: StreamerClient, n: int, timeout: float = 5) -> list[EventDelivery]:
    """The next ``n`` deliveries of a gateway (bounded wait)."""
    out: list[EventDelivery] = []

    async def collect() -> None:
        async for delivery in client.deliveries():
            out.append(delivery)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), timeout)
    return out


def brief(deliveries: Iterable[EventDelivery]) -> list[tuple[str, int, list[str]]]:
    """(event id, operation, sorted subscription ids) of each delivery."""
    return [(d.event.event_id, d.event.operation, sorted(d.subscription_ids)) for d in deliveries]


@contextlib.asynccontextmanager
async def gateways(svc: Service, *ids: str, **kw: Any) -> AsyncIterator[list[StreamerClient]]:
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                StreamerClient(svc.target, gateway_id=gw, **{**FAST, **kw}))
            for gw in ids
        ]
        yield clients


async def read_until_status(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode,
                                                                      list[StreamerMessage]]:
    """Everything a raw stream still holds, then the status it ended with."""
    messages: list[StreamerMessage] = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), messages
    return await call.code(), messages


def raw_subscribe(sub_id: str, *filters: Filter, collection: str = "messages") -> GatewayMessage:
    return GatewayMessage(subscribe=SubscribeRequest(
        subscription_id=sub_id, database="app", collection=collection, filters=filters))


# --------------------------------------------------------------- basic routing


def test_an_insert_reaches_its_collection_subscription_with_every_field(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            assert await gw.subscribe("messages", database="app", subscription_id="all") == "all"
            # Forwarded as it came in the plain layout: spacing and key order kept.
            raw = b'{"chat": "c1",  "n": 1, "nested": {"x": [1, 2.5, null]}}'
            await emit(svc, raw, doc_id="m-1")
            [delivery] = await take(gw, 1)
            assert list(delivery.subscription_ids) == ["all"]
            event = delivery.event
            assert (event.event_id, event.database, event.collection, event.document_id) == (
                "e0", "app", "messages", "m-1")
            assert (event.operation, event.timestamp, event.progress) == (INSERT, T0, "p0")
            assert event.document_data == raw
            assert orjson.loads(event.document_data) == {
                "chat": "c1", "n": 1, "nested": {"x": [1, 2.5, None]}}

    run(scenario)


def test_other_collections_and_databases_get_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("messages", database="app", subscription_id="s")
            await emit(svc, {"chat": "c"}, collection="chats")
            await emit(svc, {"chat": "c"}, database="other")
            await emit(svc, {"chat": "c"}, database="", collection="messages")
            await emit(svc, {"chat": "c"}, database="app", collection="Messages")
            wanted = await emit(svc, {"chat": "c"})
            assert brief(await take(gw, 1)) == [(wanted, INSERT, ["s"])]

    run(scenario)


def test_each_gateway_gets_only_its_own_subscriptions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw-1", "gw-2") as [one, two]:
            await one.subscribe("messages", database="app", filters=[("chat", "==", "a")],
                                subscription_id="one-a")
            await two.subscribe("messages", database="app", filters=[("chat", "==", "b")],
                                subscription_id="two-b")
            await two.subscribe("messages", database="app", subscription_id="two-all")
            a = await emit(svc, {"chat": "a"})
            b = await emit(svc, {"chat": "b"})
            a2 = await emit(svc, {"chat": "a"})
            assert brief(await take(one, 2)) == [(a, INSERT, ["one-a"]), (a2, INSERT, ["one-a"])]
            assert brief(await take(two, 3)) == [
                (a, INSERT, ["two-all"]), (b, INSERT, ["two-all", "two-b"]),
                (a2, INSERT, ["two-all"])]

    run(scenario)


@pytest.mark.parametrize("batch", [True, False], ids=["hello-batch", "plain"])
def test_one_delivery_per_gateway_names_every_matching_subscription(
    tmp_path: Path, batch: bool
) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(
            svc, "gw-1", "gw-2", batch=batch
        ) as [one, two]:
            subs: list[tuple[str, list[tuple[str, str, Any]]]] = [
                ("whole", []), ("by-chat", [("chat", "==", "c")]), ("by-n", [("n", ">", 1)]),
                ("by-id", [("_id", "==", "m")]), ("miss", [("chat", "==", "other")]),
            ]
            for sub_id, filters in subs:
                await one.subscribe("messages", database="app", filters=filters,
                                    subscription_id=sub_id)
            await one.subscribe("messages", database="app", expression="doc.n == 2",
                                subscription_id="by-cel")
            await two.subscribe("messages", database="app", subscription_id="two")
            first = await emit(svc, {"chat": "c", "n": 2}, doc_id="m")
            second = await emit(svc, {"chat": "x", "n": 2}, doc_id="z")
            assert brief(await take(one, 2)) == [
                (first, INSERT, ["by-cel", "by-chat", "by-id", "by-n", "whole"]),
                (second, INSERT, ["by-cel", "by-n", "whole"])]
            assert brief(await take(two, 2)) == [(first, INSERT, ["two"]),
                                                  (second, INSERT, ["two"])]

    run(scenario)


def test_a_document_id_subscription_gets_only_its_document(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("users", database="app", filters=[("_id", "==", "u7")],
                               subscription_id="u7")
            await gw.subscribe("users", database="app", filters=[("_id", "in", ["u1", "u2"])],
                               subscription_id="u1|u2")
            # The id is the Puller's mgo_doc_id, not a field of the document.
            await emit(svc, {"_id": "u7", "name": "x"}, collection="users", doc_id="u70")
            mine = await emit(svc, {"name": "seven"}, collection="users", doc_id="u7")
            await emit(svc, {"name": "three"}, collection="users", doc_id="u3")
            other = await emit(svc, {"name": "two"}, collection="users", doc_id="u2")
            await emit(svc, {"name": "seven"}, collection="messages", doc_id="u7")
            update = await emit(svc, {"name": "seven!"}, op="update", collection="users",
                                doc_id="u7")
            got = await take(gw, 3)
            assert brief(got) == [(mine, INSERT, ["u7"]), (other, INSERT, ["u1|u2"]),
                                  (update, UPDATE, ["u7"])]
            assert [d.event.document_id for d in got] == ["u7", "u2", "u7"]

    run(scenario)


# -------------------------------------------------------------------- filters

# (filters, [(document, matches)]): the documents are sent in order, and the
# subscription must receive exactly the matching ones. Each case ends with a
# document only a second subscription ("anchor") wants: its delivery proves
# that nothing else came after the last match.
QUOTED = 'it\'s "quoted" \\ back\nslash \u00e9 ${x} \' || true'
ODD_FIELD = 'we\'ird "field" \\ name'
FILTER_CASES: dict[str, tuple[list[tuple[str, str, Any]], list[tuple[dict[str, Any], bool]]]] = {
    "==": ([("chat", "==", "c1")], [
        ({"chat": "c2"}, False), ({}, False), ({"chat": ["c1"]}, False), ({"chat": "c1"}, True)]),
    "eq": ([("chat", "eq", "c1")], [({"chat": "c2"}, False), ({"chat": "c1"}, True)]),
    "!=": ([("chat", "!=", "c1")], [
        ({"chat": "c1"}, False), ({}, False), ({"other": "c2"}, False),
        ({"chat": 5}, True), ({"chat": "c2"}, True)]),
    "ne": ([("chat", "ne", "c1")], [({"chat": "c1"}, False), ({"chat": "c2"}, True)]),
    "<": ([("n", "<", 10)], [
        ({"n": 10}, False), ({"n": 10.0}, False), ({"n": "5"}, False), ({}, False),
        ({"n": 9.5}, True), ({"n": -3}, True)]),
    "lt": ([("n", "lt", 10)], [({"n": 11}, False), ({"n": 9}, True)]),
    "<=": ([("n", "<=", 10)], [
        ({"n": 10.5}, False), ({"n": None}, False), ({"n": 10.0}, True), ({"n": 10}, True)]),
    "lte": ([("n", "lte", 10)], [({"n": 11}, False), ({"n": 10}, True)]),
    ">": ([("n", ">", 20)], [
        ({"n": 20}, False), ({"n": "25"}, False), ({"n": True}, False),
        ({"n": 25.0}, True), ({"n": 21}, True)]),
    "gt": ([("n", "gt", 20)], [({"n": 20}, False), ({"n": 21}, True)]),
    ">=": ([("n", ">=", 2.5)], [({"n": 2}, False), ({"n": 2.5}, True), ({"n": 3}, True)]),
    "gte": ([("n", "gte", 3)], [({"n": 2.9}, False), ({"n": 3.0}, True)]),
    "in": ([("chat", "in", ["a", "b"])], [
        ({"chat": "c"}, False), ({"chat": ["a"]}, False), ({}, False), ({"chat": "b"}, True),
        ({"chat": "a"}, True)]),
    "in numbers": ([("n", "in", [1, 2.5])], [
        ({"n": 2}, False), ({"n": "1"}, False), ({"n": 1.0}, True), ({"n": 2.5}, True)]),
    "contains (list)": ([("tags", "contains", "x")], [
        ({"tags": ["y", "z"]}, False), ({"tags": []}, False), ({}, False),
        ({"tags": ["y", "x"]}, True)]),
    "contains (substring)": ([("text", "contains", "ell")], [
        ({"text": "help"}, False), ({"text": 5}, False), ({"text": "hello"}, True)]),
    "nested path": ([("a.b.c", "==", 1)], [
        ({"a": {"b": {"c": 2}}}, False), ({"a": {"b": 1}}, False), ({"a.b.c": 1}, False),
        ({"a": {"b.c": 1}}, False), ({"a": [{"b": {"c": 1}}]}, False),
        ({"a": {"b": {"c": 1.0}}}, True), ({"a": {"b": {"c": 1, "d": 0}}}, True)]),
    "int equals double": ([("n", "==", 1)], [({"n": 1.5}, False), ({"n": 1.0}, True)]),
    "double equals int": ([("n", "==", 1.0)], [({"n": 2}, False), ({"n": 1}, True)]),
    "bool": ([("flag", "==", True)], [
        ({"flag": 1}, False), ({"flag": "true"}, False), ({"flag": True}, True)]),
    "strings are data": ([("s", "==", QUOTED)], [
        ({"s": QUOTED[:-1]}, False), ({"s": QUOTED + " "}, False), ({"s": QUOTED}, True)]),
    "field names are data": ([(ODD_FIELD, ">=", 1)], [
        ({"it": 1}, False), ({ODD_FIELD: 0}, False), ({ODD_FIELD: 1}, True)]),
    "large int64 exactly": ([("n", "==", 2**63 - 1)], [
        ({"n": 2**63 - 2}, False), ({"n": -(2**63)}, False), ({"n": 2**63 - 1}, True)]),
    "smallest int64": ([("n", "<", -(2**63) + 1)], [
        ({"n": -(2**63) + 1}, False), ({"n": -(2**63)}, True)]),
    "infinity": ([("n", "<", float("inf")), ("m", ">", float("-inf"))], [
        ({"n": 1, "m": "x"}, False), ({"n": 1e308, "m": -1e308}, True)]),
    "NaN equals nothing": ([("n", "==", float("nan"))], [({"n": 1.0}, False), ({}, False)]),
    "NaN differs from every number": ([("n", "!=", float("nan"))], [
        ({}, False), ({"n": 1.5}, True), ({"n": 0}, True)]),
    "missing field with !=": ([("gone", "!=", "x")], [
        ({"chat": "c"}, False), ({"gone": None}, True)]),
    "ANDed": ([("chat", "==", "c"), ("n", ">=", 2), ("tags", "contains", "t")], [
        ({"chat": "c", "n": 2}, False), ({"chat": "c", "n": 1, "tags": ["t"]}, False),
        ({"chat": "d", "n": 2, "tags": ["t"]}, False),
        ({"chat": "c", "n": 2, "tags": ["t"]}, True)]),
}


@pytest.mark.parametrize("case", list(FILTER_CASES))
def test_filter_operators(tmp_path: Path, case: str) -> None:
    filters, docs = FILTER_CASES[case]

    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("messages", database="app", filters=filters, subscription_id="s")
            await gw.subscribe("messages", database="app", filters=[("anchor", "==", True)],
                               subscription_id="anchor")
            wanted = []
            for doc, matches in docs:
                e = await emit(svc, doc)
                if matches:
                    wanted.append((e, INSERT, ["s"]))
            wanted.append((await emit(svc, {"anchor": True}), INSERT, ["anchor"]))
            got = await take(gw, len(wanted))
            assert brief(got) == wanted
            by_id = {f"e{k}": orjson.dumps(doc) for k, (doc, _) in enumerate(docs)}
            assert [d.event.document_data for d in got[:-1]] == [by_id[e] for e, *_ in wanted[:-1]]

    run(scenario)


@pytest.mark.parametrize("op", ["array-contains", "array-contains-any", "like", "=", ""])
def test_unsupported_operators_are_invalid_argument(tmp_path: Path, op: str) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            with pytest.raises(SubscriptionRejected) as rejected:
                await gw.subscribe("messages", database="app", subscription_id="bad",
                                   filters=[("chat", "==", "c"), ("tags", op, ["x"])])
            assert rejected.value.code == "invalid_argument"
            assert rejected.value.error == f"filter 2: unsupported operator {op!r}"
            assert "bad" not in svc.subscriptions.matcher
            await gw.subscribe("messages", database="app", filters=[("chat", "==", "c")],
                               subscription_id="good")
            e = await emit(svc, {"chat": "c", "tags": ["x"]})
            assert brief(await take(gw, 1)) == [(e, INSERT, ["good"])]

    run(scenario)


# ------------------------------------------------------------------------ CEL

CEL_CASES: dict[str, tuple[str, list[tuple[str, str, Any]], list[tuple[dict[str, Any], bool]]]] = {
    "comparison and method": (
        "doc.score >= 3.5 && doc.text.startsWith('hi')", [], [
            ({"score": 4, "text": "oh hi"}, False), ({"score": 3, "text": "hi"}, False),
            ({"text": "hi"}, False), ({"score": 3.5, "text": "hi there"}, True)]),
    "in list and has": (
        "'urgent' in doc.tags || (has(doc.profile) && doc.profile.country == 'DE')", [], [
            ({"tags": ["x"]}, False), ({"profile": {"country": "FR"}}, False),
            ({"tags": ["urgent"]}, True), ({"tags": 5, "profile": {"country": "DE"}}, True)]),
    "ANDed with filters": (
        "size(doc.members) > 2", [("kind", "==", "group")], [
            ({"kind": "group", "members": [1, 2]}, False),
            ({"kind": "channel", "members": [1, 2, 3]}, False),
            ({"kind": "group", "members": [1, 2, 3]}, True)]),
    "errors and non-bool do not match": (
        "doc.n / doc.d > 1", [], [({"n": 1, "d": 0}, False), ({"n": "x", "d": 1}, False),
                                  ({"n": 4, "d": 2}, True)]),
}


@pytest.mark.parametrize("case", list(CEL_CASES))
def test_cel_expression_subscription(tmp_path: Path, case: str) -> None:
    expression, filters, docs = CEL_CASES[case]

    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("messages", database="app", expression=expression,
                               filters=filters, subscription_id="cel")
            wanted = []
            for doc, matches in docs:
                e = await emit(svc, doc)
                if matches:
                    wanted.append(e)
            assert brief(await take(gw, len(wanted))) == [(e, INSERT, ["cel"]) for e in wanted]

    run(scenario)


# --------------------------------------------------------------- rejections


def test_a_duplicate_id_across_gateways_is_already_exists(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw-1", "gw-2") as [one, two]:
            await one.subscribe("messages", database="app", filters=[("chat", "==", "a")],
                                subscription_id="taken")
            with pytest.raises(SubscriptionRejected) as dup:
                await two.subscribe("messages", database="app", filters=[("chat", "==", "b")],
                                    subscription_id="taken")
            assert (dup.value.subscription_id, dup.value.code) == ("taken", "already_exists")
            taken = svc.holder("taken")
            assert taken is not None and taken.gateway_id == "gw-1"
            await two.subscribe("messages", database="app", subscription_id="two")
            b = await emit(svc, {"chat": "b"})  # the refused filter would match this
            a = await emit(svc, {"chat": "a"})
            assert brief(await take(one, 1)) == [(a, INSERT, ["taken"])]
            assert brief(await take(two, 2)) == [(b, INSERT, ["two"]), (a, INSERT, ["two"])]

    run(scenario)


BAD_SUBSCRIPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "unsupported op": ({"filters": [("chat", "array-contains", "c")]},
                       "filter 1: unsupported operator 'array-contains'"),
    "in with a scalar": ({"filters": [("chat", "in", "c")]},
                         "filter 1: operator 'in' needs a list value, got 'c'"),
    "_id with a double": ({"filters": [("_id", "==", 1.5)]},
                          "filter 1: _id compares as a string, got float 1.5"),
    "CEL syntax": ({"expression": "doc.chat =="},
                   "expression: unexpected end of expression at column 12"),
    "CEL unknown variable": ({"expression": "chat == 'c'"}, "expression: "),
}


@pytest.mark.parametrize("case", list(BAD_SUBSCRIPTIONS))
def test_bad_subscriptions_are_invalid_argument_and_the_stream_carries_on(
    tmp_path: Path, case: str
) -> None:
    request, error = BAD_SUBSCRIPTIONS[case]

    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            with pytest.raises(SubscriptionRejected) as bad:
                await gw.subscribe("messages", database="app", subscription_id="bad", **request)
            assert bad.value.code == "invalid_argument"
            assert bad.value.error.startswith(error)
            assert gw.live_subscriptions == [] and "bad" not in svc.subscriptions.ids()
            # The same stream still serves: no reconnect, a new subscription works.
            await gw.subscribe("messages", database="app", subscription_id="bad-no-more")
            e = await emit(svc, {"chat": "c"})
            assert brief(await take(gw, 1)) == [(e, INSERT, ["bad-no-more"])]
            assert gw.reconnects == 0

    run(scenario)


def test_a_null_filter_value_is_invalid_argument(tmp_path: Path) -> None:
    """The client library cannot send a null value: a raw stream does."""

    async def scenario() -> None:
        async with Service(tmp_path) as svc, grpc.aio.insecure_channel(svc.target) as channel:
            call = sgrpc.StreamerServiceStub(channel).Stream()
            await call.write(raw_subscribe("null", Filter(field="chat", op="==")))
            refused = (await call.read()).subscribe_response
            assert (refused.subscription_id, refused.success, refused.code) == (
                "null", False, "invalid_argument")
            assert refused.error == "filter 1: value is null"
            await call.write(raw_subscribe(
                "ok", Filter(field="chat", op="==", value=Value(string_value="c"))))
            accepted = (await call.read()).subscribe_response
            assert (accepted.subscription_id, accepted.success) == ("ok", True)
            # An empty id: the server makes one up (a UUID) and answers with it.
            await call.write(GatewayMessage(subscribe=SubscribeRequest(
                database="app", collection="messages",
                filters=[Filter(field="chat", op="==", value=Value(string_value="c"))])))
            generated = (await call.read()).subscribe_response
            assert generated.success and str(uuid.UUID(generated.subscription_id)) == (
                generated.subscription_id)
            await emit(svc, {"chat": None})
            e = await emit(svc, {"chat": "c"})
            delivery = (await asyncio.wait_for(call.read(), 5)).delivery
            assert (delivery.event.event_id, sorted(delivery.subscription_ids)) == (
                e, sorted(["ok", generated.subscription_id]))
            call.cancel()

    run(scenario)


def test_unsubscribe_stops_deliveries_for_that_id_only(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw-1", "gw-2") as [one, two], \
                grpc.aio.insecure_channel(svc.target) as channel:
            for sub_id in ("gone", "kept"):
                await one.subscribe("messages", database="app", subscription_id=sub_id)
            await two.subscribe("messages", database="app", subscription_id="other")
            before = await emit(svc, {"chat": "c"})
            assert brief(await take(one, 1)) == [(before, INSERT, ["gone", "kept"])]
            await one.unsubscribe("gone")
            await until(lambda: "gone" not in svc.subscriptions.matcher)
            assert len(svc.subscriptions.matcher) == 2
            # A gateway cannot remove another's subscription (a raw stream can
            # try: the client library only sends its own ids).
            intruder = sgrpc.StreamerServiceStub(channel).Stream()
            await intruder.write(GatewayMessage(unsubscribe=UnsubscribeRequest(
                subscription_id="kept")))
            await intruder.write(GatewayMessage(heartbeat=Heartbeat(timestamp=7)))
            assert (await intruder.read()).heartbeat_ack.timestamp == 7  # and no other answer
            intruder.cancel()
            after = await emit(svc, {"chat": "c"})
            assert brief(await take(one, 1)) == [(after, INSERT, ["kept"])]
            assert brief(await take(two, 2)) == [(before, INSERT, ["other"]),
                                                  (after, INSERT, ["other"])]
            # The id is free again, for whoever asks first.
            await two.subscribe("messages", database="app", filters=[("chat", "==", "c")],
                                subscription_id="gone")
            again = await emit(svc, {"chat": "c"})
            assert brief(await take(one, 1)) == [(again, INSERT, ["kept"])]
            assert brief(await take(two, 1)) == [(again, INSERT, ["gone", "other"])]

    run(scenario)


# ------------------------------------------------------- event transformation

SOFT = {"chat": "c", "deleted": True}
# (change: full, op, before, update_desc) → the deliveries to subscriptions
# whole (the collection), chat (chat == "c") and doc (_id == "d"):
# [(operation, sorted ids, document_data)], in any order for one event.
TRANSFORM_CASES: dict[str, tuple[dict[str, Any], list[tuple[int, list[str], Doc]]]] = {
    "soft delete (update)": (
        {"full": SOFT, "op": "update"},
        [(DELETE, ["chat", "doc", "whole"], SOFT)]),
    "soft delete matched against before_doc": (
        {"full": {"chat": "x", "deleted": True}, "op": "update", "before": {"chat": "c"}},
        [(DELETE, ["chat", "doc", "whole"], {"chat": "c"})]),
    "soft delete (replace)": (
        {"full": SOFT, "op": "replace"},
        [(DELETE, ["chat", "doc", "whole"], SOFT)]),
    "recreation with before_doc": (
        {"full": {"chat": "c", "deleted": False}, "op": "update", "before": SOFT,
         "update": {"updatedFields": {"deleted": False}, "removedFields": []}},
        [(INSERT, ["chat", "doc", "whole"], {"chat": "c", "deleted": False})]),
    "recreation without before_doc": (
        {"full": {"chat": "c", "deleted": False}, "op": "update",
         "update": {"updatedFields": {"deleted": False}}},
        [(INSERT, ["chat", "doc", "whole"], {"chat": "c", "deleted": False})]),
    "plain update": (
        {"full": {"chat": "c", "n": 2}, "op": "update",
         "update": {"updatedFields": {"n": 2}}},
        [(UPDATE, ["chat", "doc", "whole"], {"chat": "c", "n": 2})]),
    "replace of a deleted document (plain)": (
        {"full": {"chat": "c"}, "op": "replace", "before": SOFT},
        [(INSERT, ["chat", "doc", "whole"], {"chat": "c"})]),
    "replace of a live document (plain)": (
        {"full": {"chat": "c", "n": 2}, "op": "replace", "before": {"chat": "c", "n": 1}},
        [(UPDATE, ["chat", "doc", "whole"], {"chat": "c", "n": 2})]),
    "replace without before_doc (plain)": (
        {"full": {"chat": "c"}, "op": "replace"},
        [(UPDATE, ["chat", "doc", "whole"], {"chat": "c"})]),
    "replace entering (plain)": (
        {"full": {"chat": "c"}, "op": "replace", "before": {"chat": "x"}},
        [(INSERT, ["chat"], {"chat": "c"}), (UPDATE, ["doc", "whole"], {"chat": "c"})]),
    "hard delete without pre-image": (
        {"op": "delete"},
        [(DELETE, ["doc", "whole"], None)]),
    "hard delete with before_doc": (
        {"op": "delete", "before": {"chat": "c", "n": 1}},
        [(DELETE, ["chat", "doc", "whole"], {"chat": "c", "n": 1})]),
}


@pytest.mark.parametrize("case", list(TRANSFORM_CASES))
def test_event_transformations(tmp_path: Path, case: str) -> None:
    change, expected = TRANSFORM_CASES[case]

    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("messages", database="app", subscription_id="whole")
            await gw.subscribe("messages", database="app", filters=[("chat", "==", "c")],
                               subscription_id="chat")
            await gw.subscribe("messages", database="app", filters=[("_id", "==", "d")],
                               subscription_id="doc")
            e = await emit(svc, doc_id="d", **change)
            sentinel = await emit(svc, {"chat": "c"}, doc_id="d")
            got = await take(gw, len(expected) + 1)
            assert brief(got[-1:]) == [(sentinel, INSERT, ["chat", "doc", "whole"])]
            assert {d.event.event_id for d in got[:-1]} == {e}
            assert sorted(
                (d.event.operation, sorted(d.subscription_ids), d.event.document_data)
                for d in got[:-1]
            ) == sorted((op, ids, _json(data)) for op, ids, data in expected)
            assert all(d.event.document_id == "d" for d in got)

    run(scenario)


def test_a_hard_delete_without_pre_image_reaches_no_other_subscription(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw") as [gw]:
            await gw.subscribe("messages", database="app", subscription_id="whole")
            await gw.subscribe("messages", database="app", filters=[("_id", "==", "d")],
                               subscription_id="doc")
            await gw.subscribe("messages", database="app", expression="!has(doc.archived)",
                               subscription_id="not-archived")
            await gw.subscribe("messages", database="app", expression="size(doc) == 1",
                               subscription_id="one-field")
            gone = await emit(svc, op="delete", doc_id="d")
            sentinel = await emit(svc, {"archived": True, "n": 1}, doc_id="e")
            assert brief(await take(gw, 2)) == [
                (gone, DELETE, ["doc", "whole"]), (sentinel, INSERT, ["whole"])]

    run(scenario)


def test_enter_and_leave_with_a_pre_image(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw-1", "gw-2") as [one, two]:
            for sub_id, chat in (("old", "c1"), ("new", "c2"), ("idle", "c3")):
                await one.subscribe("messages", database="app", filters=[("chat", "==", chat)],
                                    subscription_id=sub_id)
            await one.subscribe("messages", database="app", subscription_id="both")
            await one.subscribe("messages", database="app", expression="doc.n > 1",
                                subscription_id="cel")
            await two.subscribe("messages", database="app", filters=[("chat", "==", "c2")],
                                subscription_id="new-2")
            moved = await emit(svc, {"chat": "c2", "n": 1}, op="update",
                               before={"chat": "c1", "n": 2}, doc_id="m")
            stayed = await emit(svc, {"chat": "c2", "n": 3}, op="update",
                                before={"chat": "c2", "n": 1}, doc_id="m")
            got = await take(one, 5)
            # One event: up to three deliveries to a gateway, one per
            # operation, all before the next event.
            assert sorted(brief(got[:3])) == [
                (moved, INSERT, ["new"]), (moved, UPDATE, ["both"]),
                (moved, DELETE, ["cel", "old"])]
            assert sorted(brief(got[3:])) == [
                (stayed, INSERT, ["cel"]), (stayed, UPDATE, ["both", "new"])]
            post = orjson.dumps({"chat": "c2", "n": 1})
            assert all(d.event.document_data == post for d in got[:3])
            assert brief(await take(two, 2)) == [(moved, INSERT, ["new-2"]),
                                                  (stayed, UPDATE, ["new-2"])]

    run(scenario)


def test_syntrix_layout_end_to_end(tmp_path: Path) -> None:
    stored: dict[str, Any] = {
        "id": "posts/x1", "database": "db1", "collection": "posts", "collectionHash": "h1",
        "updatedAt": 1700, "createdAt": 1600, "version": 2,
        "data": {"id": "x1", "collection": "posts", "title": "t", "n": 3,
                 "author": {"name": "ada"}},
        "deleted": False,
    }
    flat = {"title": "t", "n": 3, "author": {"name": "ada"}, "updatedAt": 1700,
            "createdAt": 1600, "version": 2}

    async def scenario() -> None:
        async with Service(tmp_path, layout="syntrix") as svc, gateways(svc, "gw") as [gw]:
            subs: dict[str, dict[str, Any]] = {
                "n": {"filters": [("n", ">=", 3)]},
                "id": {"filters": [("_id", "==", "x1")]},
                "meta": {"filters": [("version", ">=", 2), ("author.name", "==", "ada")]},
                "cel": {"expression": "doc.title == 't' && doc.createdAt < doc.updatedAt"},
                "whole": {},
            }
            for sub_id, spec in subs.items():
                await gw.subscribe("posts", database="db1", subscription_id=sub_id, **spec)
            # The Puller's own names must not count in this layout.
            await gw.subscribe("documents", database="mongo", subscription_id="raw")
            await gw.subscribe("posts", database="db1", filters=[("_id", "==", "posts/x1")],
                               subscription_id="stored-id")
            everyone = sorted(subs)
            kw: dict[str, Any] = {"database": "mongo", "collection": "documents",
                                  "doc_id": "oid-1"}
            inserted = await emit(svc, stored, **kw)
            deleted = await emit(svc, {**stored, "version": 3, "deleted": True}, op="update",
                                 **kw)
            recreated = await emit(svc, {**stored, "version": 4}, op="replace", **kw)
            gone = await emit(svc, op="delete", before={**stored, "version": 4}, **kw)
            revived = await emit(svc, {**stored, "version": 5}, op="replace", **kw)
            # What Syntrix writes on a soft delete: ``data`` emptied, so only
            # the pre-image names the document (and matches its filters).
            emptied = await emit(svc, {**stored, "version": 6, "deleted": True, "data": {}},
                                 op="update", before={**stored, "version": 5}, **kw)
            got = await take(gw, 6)
            assert brief(got) == [(inserted, INSERT, everyone), (deleted, DELETE, everyone),
                                  (recreated, INSERT, everyone), (gone, DELETE, everyone),
                                  (revived, INSERT, everyone), (emptied, DELETE, everyone)]
            for d in got:
                assert (d.event.database, d.event.collection, d.event.document_id) == (
                    "db1", "posts", "x1")
            data = [orjson.loads(d.event.document_data) for d in got]
            assert data == [flat, {**flat, "version": 3, "deleted": True},
                            {**flat, "version": 4}, {**flat, "version": 4},
                            {**flat, "version": 5}, {**flat, "version": 5}]
            assert not any({"id", "collection", "database", "data"} & set(doc) for doc in data)

    run(scenario)


# ----------------------------------------------------------- gateway lifecycle


def test_a_closed_gateway_takes_exactly_its_subscriptions(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, gateways(svc, "gw-2") as [two]:
            matcher = svc.subscriptions.matcher
            one = StreamerClient(svc.target, gateway_id="gw-1", **FAST)
            async with one:
                for i in range(3):
                    await one.subscribe("messages", database="app", subscription_id=f"one-{i}",
                                        filters=[("n", ">=", i)])
                await two.subscribe("messages", database="app", subscription_id="two-a")
                await two.subscribe("messages", database="app", filters=[("n", ">=", 0)],
                                    subscription_id="two-b")
                assert len(matcher) == 5
                first = await emit(svc, {"n": 5})
                assert brief(await take(one, 1)) == [(first, INSERT, ["one-0", "one-1",
                                                                      "one-2"])]
            await until(lambda: len(matcher) == 2)
            assert svc.subscriptions.ids() == {"two-a", "two-b"}
            assert all(f"one-{i}" not in matcher for i in range(3))
            assert len(svc.sessions) == 1
            second = await emit(svc, {"n": 5})
            assert brief(await take(two, 2)) == [(first, INSERT, ["two-a", "two-b"]),
                                                  (second, INSERT, ["two-a", "two-b"])]

    run(scenario)


def test_silent_sessions_expire_and_heartbeating_ones_survive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with Service(tmp_path, session_ttl=0.5) as svc, gateways(
            svc, "beating"
        ) as [beating], StreamerClient(
            # Heartbeats far apart, and a long backoff so it does not come back
            # during the test.
            svc.target, gateway_id="slow", heartbeat_interval=30, backoff=(30, 30),
        ) as slow, grpc.aio.insecure_channel(svc.target) as channel:
            await beating.subscribe("messages", database="app", subscription_id="b")
            await slow.subscribe("messages", database="app", subscription_id="s")
            silent = sgrpc.StreamerServiceStub(channel).Stream()
            await silent.write(raw_subscribe("r"))
            assert (await silent.read()).subscribe_response.success
            matched = svc.subscriptions.matcher.match("app", "messages", "d", {})
            assert set(matched) == {"b", "s", "r"}
            code, _ = await read_until_status(silent)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: not slow.connected)
            await until(lambda: svc.sessions.expired_sessions == 2)
            assert svc.subscriptions.ids() == {"b"} and len(svc.subscriptions.matcher) == 1
            assert len(svc.sessions) == 1
            e = await emit(svc, {"chat": "c"})
            assert brief(await take(beating, 1)) == [(e, INSERT, ["b"])]
            assert beating.connected and beating.reconnects == 0

    with caplog.at_level(logging.WARNING, logger="streamer.client"):
        run(scenario)
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream to")]
    assert len(lost) == 1 and lost[0].endswith("DEADLINE_EXCEEDED: session silent for 0.5 s")


def test_a_lagging_gateway_is_cut_off_and_the_others_keep_receiving(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Its own TCP connection, as another gateway process would have: on a
        # shared one, the stuck stream would hold up the connection window.
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        async with Service(tmp_path, queue_capacity=8) as svc, gateways(
            svc, "fast"
        ) as [fast], grpc.aio.insecure_channel(svc.target, options=own_connection) as channel:
            await fast.subscribe("messages", database="app", subscription_id="fast")
            lagging = sgrpc.StreamerServiceStub(channel).Stream()  # never read until the end
            await lagging.write(raw_subscribe("lag"))
            await until(lambda: "lag" in svc.subscriptions.ids())
            got: list[EventDelivery] = []

            async def consume() -> None:
                async for delivery in fast.deliveries():
                    got.append(delivery)

            consumer = asyncio.create_task(consume())
            sent: list[str] = []
            pad = "x" * 65536  # a few MB fill the never-read stream's flow-control window
            while not svc.servicer.lagging_cut_offs:
                assert len(sent) < 1000, "the lagging gateway was never cut off"
                sent.append(await emit(svc, {"n": len(sent), "pad": pad}))
                await until(lambda: len(got) == len(sent))  # so "fast" never fills its queue
            for _ in range(5):  # a queue of 8 takes a few events at a time
                sent.extend([await emit(svc, {"n": len(sent) + i}) for i in range(4)])
                await until(lambda: len(got) == len(sent))
            consumer.cancel()
            assert brief(got) == [(e, INSERT, ["fast"]) for e in sent]
            assert [d.event.progress for d in got] == [f"p{e[1:]}" for e in sent]
            assert fast.reconnects == 0 and svc.servicer.lagging_cut_offs == 1
            code, messages = await read_until_status(lagging)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert messages[0].subscribe_response.success
            received = [m.delivery.event.event_id for m in messages[1:]]
            assert received == sent[: len(received)]  # what it got, it got in order
            assert svc.subscriptions.ids() == {"fast"}

    run(scenario)


# ------------------------------------------------------------------ under load


def test_per_subscription_order_under_load(tmp_path: Path) -> None:
    """8 gateways x 50 workload subscriptions, 2400 workload events in six
    quick bursts: every subscription receives exactly the reference
    matcher's sequence (event, operation, marker), nothing else."""
    workload = Workload(2000, gateways=8)
    picked: dict[str, list[SubscriptionSpec]] = defaultdict(list)
    for spec in workload.subscriptions():
        if len(picked[spec.gateway]) < 50:
            picked[spec.gateway].append(spec)
    assert len(picked) == 8 and all(len(specs) == 50 for specs in picked.values())
    events = [change_event(spec, k, timestamp=T0 + k)
              for k, spec in enumerate(workload.events(2400))]
    reference = ReferenceMatcher()
    for specs in picked.values():
        for spec in specs:
            reference.add(spec.id, spec.database, spec.collection, filters=spec.filters,
                          expression=spec.expression)
    expected: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for k, event in enumerate(events):
        change = normalize(event)  # as the service transforms it (soft deletes...)
        document = change.document if change.document is not None else {}
        for sub_id in reference.match(change.database, change.collection, change.document_id,
                                      document):
            expected[sub_id].append((change.event_id, change.op, f"p{k}"))
    assert sum(map(len, expected.values())) > 5000
    assert {op for seq in expected.values() for _, op, _ in seq} == {INSERT, UPDATE, DELETE}
    sentinel = pb.ChangeEvent(event_id="sentinel", database="app", mgo_coll="sentinel",
                              mgo_doc_id="s", op_type="insert", full_doc=b"{}")

    async def scenario() -> None:
        received: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
        strays: list[tuple[str, list[str]]] = []
        done = {gw: asyncio.Event() for gw in picked}

        async def consume(gw: str, client: StreamerClient) -> None:
            mine = {spec.id for spec in picked[gw]}
            async for delivery in client.deliveries():
                event = delivery.event
                if event.event_id == "sentinel":
                    done[gw].set()
                    continue
                ids = list(delivery.subscription_ids)
                if not mine.issuperset(ids) or len(set(ids)) != len(ids):
                    strays.append((gw, ids))
                for sub_id in ids:
                    received[sub_id].append((event.event_id, event.operation, event.progress))

        async with Service(tmp_path) as svc, gateways(svc, *picked) as clients:
            await asyncio.gather(*(
                client.subscribe(spec.collection, database=spec.database,
                                 filters=spec.filters, expression=spec.expression or "",
                                 subscription_id=spec.id)
                for client in clients for spec in picked[client.gateway_id]
            ), *(client.subscribe("sentinel", database="app") for client in clients))
            assert len(svc.subscriptions.matcher) == 8 * 51
            consumers = [asyncio.create_task(consume(c.gateway_id, c)) for c in clients]
            for burst in range(0, len(events), 400):
                await svc.puller.append(*events[burst:burst + 400])
                await asyncio.sleep(0.05)
            await svc.puller.append(sentinel)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 20)
            for task in consumers:
                task.cancel()
            assert all(c.reconnects == 0 for c in clients)
        assert strays == []
        assert set(received) == set(expected)
        for sub_id, sequence in expected.items():
            assert received[sub_id] == sequence, sub_id

    run(scenario, timeout=60)
