"""Gateway sessions: TTL expiry, owner numbers, identity (Hello instance and
certificate), known gateways and the restart window."""

from __future__ import annotations

import asyncio
from array import array

import pytest

from streamer.matching import Matcher
from streamer.node.sessions import (
    IdentityTaken,
    KnownGateways,
    RestartWindow,
    Sessions,
    proof_of,
)
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol.streamer_v1_pb2 import Filter, SubscribeRequest, Value


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sessions(**kw: object) -> Sessions:
    return Sessions(SubscriptionSet(Matcher()), **kw)  # type: ignore[arg-type]


def subscribe(s: Sessions, owner: int, sub_id: str) -> None:
    assert s.subscriptions.subscribe(owner, SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=[Filter(field="chat_id", op="==", value=Value(string_value="c"))],
    )).success


def test_silent_sessions_expire_and_lose_their_subscriptions() -> None:
    clock = Clock()
    s = sessions(session_ttl=90, clock=clock)
    quiet, chatty = s.connect(), s.connect()
    subscribe(s, quiet.owner, "q")
    subscribe(s, chatty.owner, "c")
    clock.now += 60
    s.heartbeat(chatty, "gw-2")
    clock.now += 31
    assert s.expired() == [quiet] and quiet.dropped == 1
    assert chatty.gateway_id == "gw-2"  # a plain gateway's name, for logs
    assert s.subscriptions.matcher.match("app", "messages", "m", {"chat_id": "c"}) == ["c"]
    assert len(s) == 1
    clock.now += 90
    assert s.expired() == [chatty] and len(s.subscriptions.matcher) == 0
    assert s.expired_sessions == 2


def test_sessions_have_reusable_owner_numbers() -> None:
    s = sessions()
    a, b = s.connect(), s.connect()
    assert (a.owner, b.owner) == (0, 1) and s.by_owner == [a, b]
    subscribe(s, b.owner, "s1")
    ids, owners = s.subscriptions.matcher.match_owned("app", "messages", "m", {"chat_id": "c"})
    assert (ids, list(array("I", owners))) == (["s1"], [1])
    s.disconnect(b)
    assert s.by_owner == [a, None]
    c = s.connect()
    assert c.owner == 1 and s.by_owner == [a, c]


def test_known_gateways_follow_hello_and_disconnect() -> None:
    s = sessions()
    seen: list[KnownGateways] = []
    s.on_known = seen.append
    a, b = s.connect(), s.connect()
    s.hello(a, "gw-a", "secret-a")
    s.heartbeat(b, "gw-b")  # a plain gateway: known by count only
    s.disconnect(a)
    s.disconnect(b)
    proof = frozenset({("gw-a", proof_of("secret-a"))})
    assert seen == [
        KnownGateways(frozenset(), 1),
        KnownGateways(frozenset(), 2),
        KnownGateways(frozenset({"gw-a"}), 1, proof),
        KnownGateways(frozenset(), 1),
        KnownGateways(frozenset(), 0),
    ]


def test_a_resuming_gateway_is_not_known_to_the_restart_window() -> None:
    # It re-subscribes after its own markers: ingest may start before it
    # is back, so a restart never waits for it.
    s = sessions()
    a, b = s.connect(), s.connect()
    s.hello(a, "gw-a", "secret-a", resumes=True)
    s.hello(b, "gw-b", "secret-b")
    assert s.known == KnownGateways(
        frozenset({"gw-b"}), 0, frozenset({("gw-b", proof_of("secret-b"))}))


def test_a_new_stream_of_the_same_gateway_replaces_the_stale_one() -> None:
    s = sessions()
    stale, other = s.connect(), s.connect()
    s.hello(stale, "gw-a", "instance-1")
    s.hello(other, "gw-b", "instance-2")
    subscribe(s, stale.owner, "s1")
    fresh = s.connect()
    assert s.hello(fresh, "gw-a", "instance-1") == [stale]
    assert "s1" not in s.subscriptions.matcher
    # The same id can be registered again, by the new stream.
    subscribe(s, fresh.owner, "s1")
    assert s.known.ids == {"gw-a", "gw-b"} and s.known.others == 0


def test_another_process_cannot_take_a_live_gateway_id() -> None:
    s = sessions()
    victim = s.connect()
    s.hello(victim, "gw-a", "instance-1")
    subscribe(s, victim.owner, "s1")
    for instance in ("instance-2", ""):
        with pytest.raises(IdentityTaken, match="'gw-a' is held by a live stream"):
            s.hello(s.connect(), "gw-a", instance)
    assert s.identity_refusals == 2
    assert s.subscriptions.owner_of("s1") == victim.owner  # untouched
    # A Heartbeat cannot rename a session that said Hello.
    s.heartbeat(victim, "gw-z")
    assert victim.gateway_id == "gw-a"
    # Once the live stream ends the id is free.
    s.disconnect(victim)
    s.hello(s.connect(), "gw-a", "instance-2")


def test_under_mutual_tls_only_the_same_certificate_replaces_a_stream() -> None:
    s = sessions()
    first = s.connect(principal="gw-a.example")
    s.hello(first, "gw-a", "instance-1")
    with pytest.raises(IdentityTaken):
        s.hello(s.connect(principal="intruder.example"), "gw-a", "instance-1")
    assert s.hello(s.connect(principal="gw-a.example"), "gw-a", "instance-1") == [first]


def test_restart_window_closes_when_every_hello_gateway_heartbeats() -> None:
    async def main() -> tuple[bool, bool, set[str]]:
        s = sessions()
        window = s.window = RestartWindow(KnownGateways(frozenset({"gw-a", "gw-b"})))
        a, b = s.connect(), s.connect()
        s.hello(a, "gw-a", "x")
        s.heartbeat(a, "gw-a")
        s.heartbeat(b, "gw-b")  # no Hello on this stream: proves nothing
        early = await window.wait(0.01)
        pending = set(window.pending)
        s.hello(b, "gw-b", "y")
        s.heartbeat(b, "gw-b")
        return early, await window.wait(30), pending

    assert asyncio.run(main()) == (False, True, {"gw-b"})


def test_a_stranger_cannot_end_the_restart_window_for_a_known_gateway() -> None:
    async def main() -> set[str]:
        s = sessions()
        known = KnownGateways(frozenset({"gw-a"}), 0, frozenset({("gw-a", proof_of("real"))}))
        window = s.window = RestartWindow(known)
        stranger = s.connect()
        s.hello(stranger, "gw-a", "forged")
        s.heartbeat(stranger, "gw-a")
        assert not await window.wait(0.01)
        s.disconnect(stranger)
        real = s.connect()
        s.hello(real, "gw-a", "real")
        s.heartbeat(real, "gw-a")
        assert await window.wait(30)
        return window.pending

    assert asyncio.run(main()) == set()


def test_restart_window_waits_the_whole_grace_for_plain_gateways_not_back() -> None:
    async def main() -> bool:
        window = RestartWindow(KnownGateways(frozenset(), 1))
        return await window.wait(0.05)

    assert asyncio.run(main()) is False
    assert asyncio.run(RestartWindow(KnownGateways()).wait(0)) is True


def test_restart_window_counts_plain_gateways_that_resubscribed_and_went_quiet() -> None:
    async def main() -> None:
        now = [100.0]
        s = Sessions(SubscriptionSet(Matcher()), clock=lambda: now[0])
        window = s.window = RestartWindow(
            KnownGateways(frozenset(), 2), quiet=1.0, clock=lambda: now[0])
        first, second, gone = s.connect(), s.connect(), s.connect()
        for session in (first, second, gone):
            s.subscribed(session)
        s.disconnect(gone)  # a stream that ended does not count
        now[0] += 0.5
        s.subscribed(second)  # still re-subscribing
        now[0] += 0.6
        assert window.plain_back == 1
        waiter = asyncio.create_task(window.wait(5))
        await asyncio.sleep(0.15)
        assert not waiter.done()
        now[0] += 0.5
        assert window.plain_back == 2
        assert await asyncio.wait_for(waiter, 1) is True

    asyncio.run(main())


def test_waiting_for_the_restart_window_ends_when_cancelled_as_it_closes() -> None:
    """A node stopped just as the last known gateway comes back must not go
    on into ingest: on Python 3.11, ``asyncio.wait_for`` swallowed a
    cancellation that landed as the window closed, the node's ingest task
    started the Puller stream instead of ending, and ``StreamerNode.stop``
    waited for it forever."""

    async def main() -> None:
        s = sessions()
        window = s.window = RestartWindow(KnownGateways(frozenset({"gw-a"})))
        waiting = asyncio.create_task(window.wait(60))
        await asyncio.sleep(0)
        gateway = s.connect()
        s.hello(gateway, "gw-a", "x")
        s.heartbeat(gateway, "gw-a")  # the window closes: the wait is woken...
        waiting.cancel()  # ... and cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiting

    asyncio.run(main())
