"""Gateway sessions: responses, ownership, limits and TTL expiry."""

from __future__ import annotations

import asyncio
import uuid
from array import array

from streamer.matching.matcher import Matcher
from streamer.node.gateways import GatewayRegistry, KnownGateways, Limits, RestartWindow
from streamer.protocol.streamer_v1_pb2 import Filter, ListValue, SubscribeRequest, Value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(sub_id: str = "", *filters: Filter, expression: str = "") -> SubscribeRequest:
    return SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=list(filters), expression=expression,
    )


def chat(c: str) -> Filter:
    return Filter(field="chat_id", op="==", value=Value(string_value=c))


def test_subscribe_echoes_or_generates_the_id() -> None:
    registry = GatewayRegistry(Matcher())
    session = registry.connect()
    response = registry.subscribe(session, request("s1", chat("c1")))
    assert (response.subscription_id, response.success, response.code) == ("s1", True, "")
    generated = registry.subscribe(session, request("", chat("c2")))
    assert generated.success and uuid.UUID(generated.subscription_id)
    assert registry.matcher.match("app", "messages", "m", {"chat_id": "c1"}) == ["s1"]


def test_values_of_every_kind() -> None:
    registry = GatewayRegistry(Matcher())
    session = registry.connect()
    filters = [
        Filter(field="n", op=">=", value=Value(int_value=3)),
        Filter(field="x", op="<", value=Value(double_value=2.5)),
        Filter(field="b", op="==", value=Value(bool_value=True)),
        Filter(field="t", op="in", value=Value(list_value=ListValue(
            values=[Value(string_value="a"), Value(int_value=1)]))),
    ]
    assert registry.subscribe(session, request("s", *filters)).success
    doc = {"n": 3.0, "x": 1, "b": True, "t": 1.0}
    assert registry.matcher.match("app", "messages", "m", doc) == ["s"]


def test_rejections_carry_a_code_and_a_precise_error() -> None:
    registry = GatewayRegistry(Matcher(), limits=Limits(max_filters=2, max_subscriptions=3))
    one, other = registry.connect(), registry.connect()
    assert registry.subscribe(one, request("s1", chat("c1"))).success
    dup = registry.subscribe(other, request("s1", chat("c9")))
    assert (dup.success, dup.code) == (False, "already_exists")
    bad_op = registry.subscribe(one, request("s2", Filter(field="a", op="like", value=Value())))
    assert (bad_op.code, bad_op.error) == (
        "invalid_argument", "filter 1: unsupported operator 'like'")
    null = registry.subscribe(one, request("s3", Filter(field="a", op="==")))
    assert (null.code, null.error) == ("invalid_argument", "filter 1: value is null")
    cel = registry.subscribe(one, request("s4", expression="doc.a == (1))"))
    assert cel.code == "invalid_argument" and "column 13" in cel.error
    many = registry.subscribe(one, request("s5", chat("a"), chat("b"), chat("c")))
    assert (many.code, many.error) == ("resource_exhausted", "3 filters; the limit is 2")
    assert registry.subscribe(one, request("s6")).success
    assert registry.subscribe(one, request("s7")).success
    full = registry.subscribe(one, request("s8"))
    assert full.code == "resource_exhausted"
    # The first s1 still delivers, to its owner.
    assert registry.owner("s1") is one


def test_only_the_owner_unsubscribes_and_disconnect_removes_exactly_its_own() -> None:
    registry = GatewayRegistry(Matcher())
    one, other = registry.connect(), registry.connect()
    registry.subscribe(one, request("a", chat("c")))
    registry.subscribe(other, request("b", chat("c")))
    assert not registry.unsubscribe(other, "a")
    assert not registry.unsubscribe(other, "missing")
    assert registry.disconnect(one) == 1
    assert registry.matcher.match("app", "messages", "m", {"chat_id": "c"}) == ["b"]
    assert registry.subscription_ids() == {"b"}


def test_silent_sessions_expire_and_lose_their_subscriptions() -> None:
    clock = Clock()
    registry = GatewayRegistry(Matcher(), session_ttl=90, clock=clock)
    quiet, chatty = registry.connect(), registry.connect()
    registry.subscribe(quiet, request("q", chat("c")))
    registry.subscribe(chatty, request("c", chat("c")))
    clock.now += 60
    registry.touch(chatty, "gw-2")
    clock.now += 31
    assert registry.expired() == [quiet]
    assert chatty.gateway_id == "gw-2"
    assert registry.matcher.match("app", "messages", "m", {"chat_id": "c"}) == ["c"]
    assert len(registry) == 1
    clock.now += 90
    assert registry.expired() == [chatty] and len(registry.matcher) == 0


def test_known_gateways_follow_hello_and_disconnect() -> None:
    async def main() -> list[KnownGateways]:
        registry = GatewayRegistry(Matcher())
        seen: list[KnownGateways] = []
        registry.on_known = seen.append
        a, b = registry.connect(), registry.connect()
        registry.hello(a, "gw-a")
        registry.heartbeat(b, "gw-b")  # a plain gateway: known by count only
        registry.disconnect(a)
        registry.disconnect(b)
        return seen

    assert asyncio.run(main()) == [
        KnownGateways(frozenset(), 1),
        KnownGateways(frozenset(), 2),
        KnownGateways(frozenset({"gw-a"}), 1),
        KnownGateways(frozenset(), 1),
        KnownGateways(frozenset(), 0),
    ]


def test_restart_window_closes_when_every_hello_gateway_heartbeats() -> None:
    async def main() -> tuple[bool, bool, set[str]]:
        registry = GatewayRegistry(Matcher())
        window = registry.window = RestartWindow(KnownGateways(frozenset({"gw-a", "gw-b"})))
        a, b = registry.connect(), registry.connect()
        registry.hello(a, "gw-a")
        registry.heartbeat(a, "gw-a")
        registry.heartbeat(b, "gw-b")  # no Hello on this stream: proves nothing
        early = await window.wait(0.01)
        pending = set(window.pending)
        registry.hello(b, "gw-b")
        registry.heartbeat(b, "gw-b")
        return early, await window.wait(30), pending

    assert asyncio.run(main()) == (False, True, {"gw-b"})


def test_restart_window_waits_the_whole_grace_for_plain_gateways() -> None:
    async def main() -> bool:
        window = RestartWindow(KnownGateways(frozenset(), 1))
        return await window.wait(0.05)

    assert asyncio.run(main()) is False
    assert asyncio.run(RestartWindow(KnownGateways()).wait(0)) is True


def test_a_new_hello_supersedes_the_stale_session_of_the_same_gateway() -> None:
    async def main() -> None:
        registry = GatewayRegistry(Matcher())
        stale, other = registry.connect(), registry.connect()
        registry.hello(stale, "gw-a")
        registry.hello(other, "gw-b")
        assert registry.subscribe(stale, request("s1", chat("c1"))).success
        fresh = registry.connect()
        assert registry.hello(fresh, "gw-a") == [stale]
        assert stale.subscriptions == set() and "s1" not in registry.matcher
        # The same id can be registered again, by the new stream.
        assert registry.subscribe(fresh, request("s1", chat("c1"))).success
        assert registry.known == KnownGateways(frozenset({"gw-a", "gw-b"}), 0)
        # A plain stream with that id is not a Hello gateway: left alone.
        plain = registry.connect()
        registry.heartbeat(plain, "gw-a")
        assert registry.hello(registry.connect(), "gw-b") == [other]

    asyncio.run(main())


def test_sessions_have_reusable_owner_indexes() -> None:
    async def main() -> None:
        registry = GatewayRegistry(Matcher())
        a, b = registry.connect(), registry.connect()
        assert (a.owner, b.owner) == (0, 1) and registry.by_owner == [a, b]
        registry.subscribe(b, request("s1", chat("c1")))
        ids, owners = registry.matcher.match_owned("app", "messages", "m", {"chat_id": "c1"})
        assert (ids, list(array("I", owners))) == (["s1"], [1])
        registry.disconnect(b)
        assert registry.by_owner == [a, None]
        c = registry.connect()
        assert c.owner == 1 and registry.by_owner == [a, c]

    asyncio.run(main())
