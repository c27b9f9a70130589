"""The subscription set: responses, ownership, limits by count and by
cost, and releasing a departed owner's subscriptions in chunks."""

from __future__ import annotations

import asyncio
import tracemalloc
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from streamer.matching import Matcher
from streamer.node import subscriptions as subscriptions_module
from streamer.node.subscriptions import Limits, SubscriptionSet
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    ListValue,
    SubscribeRequest,
    SubscribeResponse,
    Value,
)


def request(sub_id: str = "", *filters: Filter, expression: str = "") -> SubscribeRequest:
    return SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=list(filters), expression=expression,
    )


def chat(c: str) -> Filter:
    return Filter(field="chat_id", op="==", value=Value(string_value=c))


def strings(*values: str) -> Value:
    return Value(list_value=ListValue(values=[Value(string_value=v) for v in values]))


def test_subscribe_echoes_or_generates_the_id() -> None:
    subs = SubscriptionSet(Matcher())
    response = subs.subscribe(0, request("s1", chat("c1")))
    assert (response.subscription_id, response.success, response.code) == ("s1", True, "")
    generated = subs.subscribe(0, request("", chat("c2")))
    assert generated.success and uuid.UUID(generated.subscription_id)
    assert subs.matcher.match("app", "messages", "m", {"chat_id": "c1"}) == ["s1"]
    assert subs.owned(0) == {"s1", generated.subscription_id}


def test_values_of_every_kind() -> None:
    subs = SubscriptionSet(Matcher())
    filters = [
        Filter(field="n", op=">=", value=Value(int_value=3)),
        Filter(field="x", op="<", value=Value(double_value=2.5)),
        Filter(field="b", op="==", value=Value(bool_value=True)),
        Filter(field="t", op="in", value=Value(list_value=ListValue(
            values=[Value(string_value="a"), Value(int_value=1)]))),
    ]
    assert subs.subscribe(0, request("s", *filters)).success
    doc = {"n": 3.0, "x": 1, "b": True, "t": 1.0}
    assert subs.matcher.match("app", "messages", "m", doc) == ["s"]


def test_rejections_carry_a_code_and_a_precise_error() -> None:
    subs = SubscriptionSet(Matcher(), Limits(max_filters=2, max_subscriptions=3))
    assert subs.subscribe(1, request("s1", chat("c1"))).success
    dup = subs.subscribe(2, request("s1", chat("c9")))
    assert (dup.success, dup.code) == (False, "already_exists")
    bad_op = subs.subscribe(1, request("s2", Filter(field="a", op="like", value=Value())))
    assert (bad_op.code, bad_op.error) == (
        "invalid_argument", "filter 1: unsupported operator 'like'")
    null = subs.subscribe(1, request("s3", Filter(field="a", op="==")))
    assert (null.code, null.error) == ("invalid_argument", "filter 1: value is null")
    cel = subs.subscribe(1, request("s4", expression="doc.a == (1))"))
    assert cel.code == "invalid_argument" and "column 13" in cel.error
    many = subs.subscribe(1, request("s5", chat("a"), chat("b"), chat("c")))
    assert (many.code, many.error) == ("resource_exhausted", "3 filters; the limit is 2")
    assert subs.subscribe(1, request("s6")).success
    assert subs.subscribe(1, request("s7")).success
    full = subs.subscribe(1, request("s8"))
    assert full.code == "resource_exhausted"
    # The first s1 still delivers, to its owner.
    assert subs.owner_of("s1") == 1


def test_limits_by_cost() -> None:
    subs = SubscriptionSet(Matcher(), Limits(
        max_request_bytes=200, max_list_values=5, max_scan_clauses=2, max_node_scan_clauses=3))
    big = subs.subscribe(1, request("big", expression="doc.text == '" + "x" * 300 + "'"))
    assert (big.code, big.error) == (
        "resource_exhausted", "the request is 337 bytes; the limit is 200")
    lists = subs.subscribe(1, request(
        "lists", Filter(field="a", op="in", value=strings("1", "2", "3")),
        Filter(field="b", op="in", value=strings("4", "5", "6"))))
    assert (lists.code, lists.error) == (
        "resource_exhausted", "the filters' lists hold 6 values together; the limit is 5")
    # Scan clauses: nothing the index can look up, verified on every event.
    scans = [subs.subscribe(1, request(f"scan{i}", expression=f"doc.n != {i}")) for i in range(3)]
    assert [r.success for r in scans] == [True, True, False]
    assert scans[2].code == "resource_exhausted"
    assert "this gateway's scan clauses would be 3; the limit is 2" in scans[2].error
    assert "scan2" not in subs.matcher  # refused means not in the index
    assert subs.subscribe(2, request("other", expression="doc.n != 9")).success
    node_full = subs.subscribe(3, request("one-more", expression="doc.n != 10"))
    assert "the node's scan clauses would be 4; the limit is 3" in node_full.error
    # Indexed subscriptions are not limited by the scan budget.
    assert subs.subscribe(1, request("indexed", chat("c"))).success
    # Removing a scan subscription gives its budget back.
    assert subs.unsubscribe(1, "scan0")
    assert subs.subscribe(1, request("scan-again", expression="doc.n != 0")).success


def test_what_gateways_make_the_node_hold_is_bounded_by_the_byte_budgets() -> None:
    # Found by bench/bench_abuse.py: a subscription at the request limits holds
    # over 200 KiB, so a count limit alone let one stream make the node hold
    # over 20 GiB. Requests past a gateway's (or the node's) byte budget are
    # refused, and what the accepted ones hold stays a small multiple of it.
    limits = Limits(max_gateway_bytes=2 << 20, max_node_bytes=3 << 20)
    subs = SubscriptionSet(Matcher(), limits)
    values = limits.max_list_values
    width = (limits.max_request_bytes - limits.max_expression_length) // values - 8

    def maximal(i: int) -> SubscribeRequest:
        # At the request limits, and its values unique: nothing it holds is shared.
        return request(
            f"max-{i}",
            Filter(field="chat_id", op="in", value=strings(
                *(f"{i:03d}-{j:04d}".ljust(width, "v") for j in range(values)))),
            expression=("doc.chat_id in [" + ", ".join(
                f"'{i:03d}-{j:04d}'" for j in range(330)) + "]").ljust(
                    limits.max_expression_length, " "),
        )

    refused: dict[int, str] = {}
    tracemalloc.start()
    try:
        for owner in (1, 2):
            for i in range(100):
                response = subs.subscribe(owner, maximal(owner * 100 + i))
                if not response.success:
                    refused[owner] = response.error
                    break
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "this gateway's subscriptions would weigh" in refused[1]
    assert "the node's subscriptions would weigh" in refused[2]
    assert subs.bytes <= limits.max_node_bytes
    assert held <= 8 * limits.max_node_bytes


def test_only_the_owner_unsubscribes_and_release_removes_exactly_its_own() -> None:
    subs = SubscriptionSet(Matcher())
    subs.subscribe(1, request("a", chat("c")))
    subs.subscribe(2, request("b", chat("c")))
    assert not subs.unsubscribe(2, "a")
    assert not subs.unsubscribe(2, "missing")
    released: list[int] = []
    assert subs.release(1, lambda: released.append(1)) == 1
    assert released == [1]  # a small release is done at once
    assert subs.matcher.match("app", "messages", "m", {"chat_id": "c"}) == ["b"]
    assert subs.ids() == {"b"}


def test_a_large_release_leaves_the_index_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscriptions_module, "RECLAIM_CHUNK", 10)

    async def main() -> None:
        subs = SubscriptionSet(Matcher())
        for i in range(35):
            subs.subscribe(1, request(f"s{i}", chat("c")))
        released: list[int] = []
        assert subs.release(1, lambda: released.append(1)) == 35
        # Gone for everyone at once, though most are still in the index.
        assert subs.ids() == set() and subs.owned(1) == frozenset()
        assert len(subs.matcher) == 25 and released == []
        # Its ids are free: a reconnecting gateway takes one back at once.
        assert subs.subscribe(2, request("s34", chat("c"))).success
        task = asyncio.create_task(subs.reclaim())
        for _ in range(100):
            if released:
                break
            await asyncio.sleep(0)
        task.cancel()
        assert released == [1]
        assert subs.matcher.match("app", "messages", "m", {"chat_id": "c"}) == ["s34"]
        assert subs.owner_of("s34") == 2

    asyncio.run(main())


def test_what_a_gateway_and_the_node_hold_is_bounded_in_bytes() -> None:
    one = request("x0", chat("c"))
    size = one.ByteSize()
    subs = SubscriptionSet(Matcher(), Limits(
        max_gateway_bytes=3 * size, max_node_bytes=5 * size))
    assert all(subs.subscribe(1, request(f"x{i}", chat("c"))).success for i in range(3))
    fourth = subs.subscribe(1, request("x3", chat("c")))
    assert fourth.code == "resource_exhausted"
    assert fourth.error == (f"this gateway's subscriptions would weigh {4 * size} bytes "
                            f"(serialized requests); the limit is {3 * size}")
    assert all(subs.subscribe(2, request(f"y{i}", chat("c"))).success for i in range(2))
    node_full = subs.subscribe(3, request("z0", chat("c")))
    assert node_full.error.startswith(f"the node's subscriptions would weigh {6 * size} bytes")
    assert subs.bytes == 5 * size
    # Removal gives the bytes back.
    assert subs.unsubscribe(1, "x0")
    assert subs.subscribe(3, request("z0", chat("c"))).success
    assert subs.bytes == 5 * size


def test_a_subscription_in_another_matcher_is_accounted_like_a_live_one() -> None:
    # A catch-up group's matcher (streamer.node.catchup): ids are global,
    # limits count it, unsubscribe and release find it, and it moves into
    # the live index as the same subscription.
    subs = SubscriptionSet(Matcher(), Limits(max_subscriptions=3, max_node_scan_clauses=1))
    group = Matcher()
    scan = request("scan", expression="doc.n != 1")
    assert subs.subscribe(1, request("g", chat("c1")), group).success
    assert subs.subscribe(1, scan, group).success
    assert (subs.elsewhere, subs.scan_clauses, subs.owned(1)) == (2, 1, {"g", "scan"})
    assert subs.matcher_of("g") is group and len(subs.matcher) == 0
    assert group.match("app", "messages", "m", {"chat_id": "c1"}) == ["g"]
    # The id is taken wherever it lives; a malformed duplicate is still invalid.
    assert subs.subscribe(2, request("g", chat("c2"))).code == "already_exists"
    assert subs.subscribe(2, request("g", expression="doc.")).code == "invalid_argument"
    # The node's scan clauses count every matcher.
    refused = subs.subscribe(2, request("scan2", expression="doc.n != 2"))
    assert refused.code == "resource_exhausted" and "node's scan clauses" in refused.error
    assert subs.subscribe(1, request("live", chat("c3"))).success
    assert subs.subscribe(1, request("more", chat("c4"))).code == "resource_exhausted"
    # Moved: now in the live index, with the same owner, once.
    assert subs.move("g", request("g", chat("c1")), group)
    assert not subs.move("g", request("g", chat("c1")), group)
    assert subs.matcher_of("g") is subs.matcher and "g" not in group
    assert subs.matcher.match_owned("app", "messages", "m", {"chat_id": "c1"})[0] == ["g"]
    # Unsubscribe and release remove them from wherever they are.
    assert subs.unsubscribe(1, "scan")
    assert (len(group), subs.elsewhere, subs.scan_clauses) == (0, 0, 0)
    assert subs.subscribe(1, request("back", chat("c5")), group).success
    gone: list[bool] = []
    subs.release(1, lambda: gone.append(True))
    assert gone == [True] and len(group) == 0 and len(subs.matcher) == 0
    assert (len(subs), subs.elsewhere, subs.bytes) == (0, 0, 0)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_a_node_serving_some_collections_refuses_the_others(compiled: bool) -> None:
    subs = SubscriptionSet(Matcher(), compiled=compiled, collections=frozenset({"messages"}))
    other = SubscribeRequest(subscription_id="u", database="app", collection="users")
    refused = subs.subscribe(1, other)
    assert (refused.success, refused.code) == (False, "not_owner")
    assert refused.error == (
        "collection 'users' is not served by this node, which serves messages (--collections)")
    assert subs.subscribe(1, request("m", chat("c1"))).success
    entries = subs.subscribe_batch(1, [request("b", chat("c2")), other])
    answers = [SubscribeResponse.FromString(e[2:]) for e in entries]
    assert [(a.subscription_id, a.success, a.code) for a in answers] == [
        ("b", True, ""), ("u", False, "not_owner")]
    assert "m" in subs and "b" in subs and "u" not in subs and len(subs) == 2


def test_a_placed_owners_batch_is_compiled_when_every_request_is_placed() -> None:
    """Cluster mode: a Hello gateway's batch whose every request is on a
    shard of this node registers on the compiled path; one with a request
    placed elsewhere is answered request by request in Python, not_owner
    for that one."""
    subs = SubscriptionSet(Matcher(), compiled=True)
    subs.placed = lambda owner: owner == 1
    subs.not_placed = lambda sub_id: "elsewhere" if sub_id.startswith("x") else None
    assert subs._registrar is not None
    compiled: list[int] = []
    register = subs._registrar.register

    def spy(owner: int, requests: Any, *args: Any) -> None:
        compiled.append(len(requests))
        register(owner, requests, *args)

    subs._registrar = SimpleNamespace(register=spy)  # type: ignore[assignment]
    entries = subs.subscribe_batch(1, [request("a", chat("c1")), request("b", chat("c2"))])
    assert compiled == [2] and all(SubscribeResponse.FromString(e[2:]).success for e in entries)
    entries = subs.subscribe_batch(1, [request("c", chat("c3")), request("x", chat("c4"))])
    answers = [SubscribeResponse.FromString(e[2:]) for e in entries]
    assert compiled == [2] and [(a.subscription_id, a.success, a.code) for a in answers] == [
        ("c", True, ""), ("x", False, "not_owner")]
    assert "a" in subs and "c" in subs and "x" not in subs
