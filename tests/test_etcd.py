"""streamer.cluster.etcd against real etcd processes on loopback
(tests/etcd_helpers.py): the calls, a create-if-absent race, lease expiry
seen by a watch, keepalive through a leader's SIGKILL, a dead etcd noticed,
and watches that resume by revision without missing an event."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from etcd_helpers import ETCD_MISSING, EtcdCluster

from streamer.cluster.etcd import CHANNEL_OPTIONS, EtcdClient, Event, KeepAlive, prefix_end
from streamer.cluster.etcdpb import rpc_pb2
from streamer.errors import EtcdUnavailable, LeaseLost, StreamClosed, WatchCompacted

if ETCD_MISSING:
    pytest.skip(ETCD_MISSING, allow_module_level=True)


def run(scenario: Coroutine[Any, Any, None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout))


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


class Watcher:
    """``watch_prefix`` consumed in the background into ``events``."""

    def __init__(self, client: EtcdClient, prefix: bytes, start_revision: int) -> None:
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._task = asyncio.create_task(self._run(client, prefix, start_revision))

    async def _run(self, client: EtcdClient, prefix: bytes, start_revision: int) -> None:
        try:
            async with contextlib.aclosing(client.watch_prefix(prefix, start_revision)) as events:
                async for event in events:
                    self.events.append(event)
        except Exception as exc:
            self.error = exc

    def seen(self, revision: int) -> bool:
        assert self.error is None, self.error
        return bool(self.events) and self.events[-1].revision >= revision

    def history(self) -> list[tuple[str, bytes, int]]:
        return [(e.type, e.kv.key, e.revision) for e in self.events]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def test_prefix_end() -> None:
    assert prefix_end(b"a/") == b"a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


def test_channel_pings_stay_within_etcds_enforcement() -> None:
    # etcd answers pings more often than every 5 s, or on a connection with
    # no call open, with GOAWAY too_many_pings (killing the open streams).
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] >= 5_000 * 1.5
    assert options["grpc.keepalive_permit_without_calls"] == 0


def test_put_get_prefix_delete(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with EtcdClient(etcd1.endpoints) as etcd:
            r1 = await etcd.put(b"/t/a", b"1")
            r2 = await etcd.put(b"/t/b", b"2")
            await etcd.put(b"/tz", b"outside")
            assert r2 > r1
            kv = await etcd.get(b"/t/a")
            assert kv is not None
            assert (kv.value, kv.create_revision, kv.mod_revision) == (b"1", r1, r1)
            assert await etcd.get(b"/t/none") is None
            kvs, revision = await etcd.get_prefix(b"/t/")
            assert [(k.key, k.value) for k in kvs] == [(b"/t/a", b"1"), (b"/t/b", b"2")]
            assert revision == r2 + 1
            assert await etcd.delete(b"/t/a") is True
            assert await etcd.delete(b"/t/a") is False
            assert await etcd.get(b"/t/a") is None
            # A put under a lease etcd does not know.
            with pytest.raises(LeaseLost, match="requested lease not found"):
                await etcd.put(b"/t/c", b"3", lease=0x1234)
            await etcd.lease_revoke(0x1234)  # gone already: not an error
            watcher = Watcher(etcd, b"/t/", r1)
            await until(lambda: watcher.seen(r2), 5, "the watch")
        # Closing the client ends its watches; it serves nothing more.
        await asyncio.wait_for(watcher._task, 5)
        assert watcher.error is None
        with pytest.raises(StreamClosed):
            await etcd.get(b"/t/b")

    run(scenario())


def test_create_if_absent_race_has_one_winner(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with EtcdClient(etcd1.endpoints) as a, EtcdClient(etcd1.endpoints) as b:
            la, lb = await a.lease_grant(10), await b.lease_grant(10)
            keys = [f"/shard/{i}".encode() for i in range(20)]
            results = await asyncio.gather(*(
                c.create_if_absent(k, name, lease)
                for k in keys for c, name, lease in ((a, b"a", la), (b, b"b", lb))
            ))
            for ca, cb in zip(results[::2], results[1::2], strict=True):
                assert ca.created != cb.created
                winner = ca if ca.created else cb
                # Both see the same holder; its create revision is the epoch.
                for claim in (ca, cb):
                    assert (claim.create_revision, claim.value, claim.lease) == (
                        winner.create_revision, winner.value, winner.lease)
            epochs = {k: c.create_revision for k, c in zip(keys, results[::2], strict=True)}
            # The winner's lease goes: the key is claimable again, at a later epoch.
            await a.lease_revoke(la)
            await b.lease_revoke(lb)
            lc = await b.lease_grant(10)
            again = await b.create_if_absent(keys[0], b"c", lc)
            assert again.created and again.create_revision > epochs[keys[0]]
            assert (await b.create_if_absent(keys[0], b"d", lc)).created is False

    run(scenario())


def test_expired_lease_deletes_its_key_and_the_watch_sees_it(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with EtcdClient(etcd1.endpoints) as holder, EtcdClient(etcd1.endpoints) as other:
            lease = await holder.lease_grant(2)
            keepalive = holder.keep_alive(lease, 2)
            revision = await holder.put(b"/nodes/a", b"addr", lease)
            watcher = Watcher(other, b"/nodes/", revision)
            await until(lambda: watcher.seen(revision), 5, "the watch sees the put")
            await asyncio.sleep(3)  # longer than the TTL: the keepalive holds it
            assert await other.get(b"/nodes/a") is not None
            await keepalive.stop()  # the holder stops keeping it alive
            stopped = time.monotonic()
            await until(lambda: watcher.events[-1].type == "delete", 6, "the expiry's delete")
            took = time.monotonic() - stopped
            assert watcher.events[-1].kv.key == b"/nodes/a"
            assert took < 2 + 2, took
            assert await other.get(b"/nodes/a") is None
            await watcher.stop()

    run(scenario())


def test_keepalive_survives_a_leader_sigkill(
    etcd3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        leader = await asyncio.to_thread(etcd3.leader)
        # The leader first: the keepalive stream is on the member killed.
        endpoints = [leader.endpoint] + [e for e in etcd3.endpoints if e != leader.endpoint]
        lost: list[LeaseLost] = []
        async with EtcdClient(endpoints, timeout=2) as etcd:
            lease = await etcd.lease_grant(5)
            keepalive = etcd.keep_alive(lease, 5, on_lost=lost.append)
            await etcd.put(b"/nodes/a", b"addr", lease)
            await asyncio.sleep(1)
            await asyncio.to_thread(etcd3.kill_leader)
            killed = time.monotonic()
            new_leader = await asyncio.to_thread(etcd3.leader)
            assert new_leader is not leader
            await until(lambda: keepalive.last_ok > killed, 5, "a keepalive after the kill")
            await asyncio.sleep(6)  # past the TTL
            assert not lost and keepalive.error is None
            assert time.monotonic() - keepalive.last_ok < 5 / 3 + 1
            kv = await etcd.get(b"/nodes/a")
            assert kv is not None and kv.lease == lease
        # The keepalive's stream was on the leader: it broke and moved.
        assert f"keepalive failed ({leader.endpoint}: " in caplog.text

    run(scenario())


def test_a_dead_etcd_is_reported_as_a_lost_lease(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        lost: list[LeaseLost] = []
        async with EtcdClient(etcd1.endpoints, timeout=1) as etcd:
            lease = await etcd.lease_grant(2)
            keepalive: KeepAlive = etcd.keep_alive(lease, 2, on_lost=lost.append)
            await asyncio.sleep(1)
            etcd1.members[0].kill()
            killed = time.monotonic()
            await until(lambda: bool(lost), 2 + 1.5, "the lease reported lost")
            took = time.monotonic() - killed
            assert lost[0] is keepalive.error and lost[0].lease_id == lease
            assert "no keepalive succeeded" in str(lost[0])
            # No sooner than etcd itself could have expired it.
            assert time.monotonic() >= keepalive.expires_by and took <= 2 + 1, took
            with pytest.raises(LeaseLost):
                await keepalive.wait()
            with pytest.raises(EtcdUnavailable):
                await etcd.get(b"/x")

    run(scenario())


def test_watches_resume_by_revision_across_a_member_restart(
    etcd3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Two watchers start on a follower: one knows only that member, one knows
    all three. The follower is SIGKILLed and restarted while a writer keeps
    writing through the others; both watchers see exactly etcd's history."""

    async def scenario() -> None:
        leader = await asyncio.to_thread(etcd3.leader)
        follower = next(m for m in etcd3.members if m is not leader)
        others = [m.endpoint for m in etcd3.members if m is not follower]
        async with (EtcdClient([follower.endpoint]) as only, EtcdClient(
                [follower.endpoint, *others]) as any_member, EtcdClient(others) as writer):
            start = await writer.put(b"/w/start", b"")
            watchers = [Watcher(only, b"/w/", start), Watcher(any_member, b"/w/", start)]
            await until(lambda: all(w.seen(start) for w in watchers), 5, "watchers started")
            last = start

            async def write(count: int) -> None:
                nonlocal last
                for i in range(count):
                    key = f"/w/{last}-{i}".encode()
                    last = await writer.put(key, b"v")
                    if i % 3 == 0:
                        last = max(last, await writer.put(key, b"v2"))
                    if i % 5 == 0:
                        await writer.delete(key)
                    await asyncio.sleep(0.01)

            await write(20)
            follower.kill()
            await write(40)  # while the follower is down
            follower.start()
            await asyncio.to_thread(etcd3.wait_healthy)
            await write(20)
            await until(lambda: all(w.seen(last) for w in watchers), 15, "watchers caught up")
            # The reference: a watch of the whole history on a healthy cluster.
            reference = Watcher(writer, b"/w/", start)
            await until(lambda: reference.seen(last), 5, "the reference watch")
            for w in [*watchers, reference]:
                await w.stop()
            expected = reference.history()
            assert len(expected) > 80
            for w in watchers:
                assert w.history() == expected
        # Both streams were on the follower killed: both broke and resumed.
        assert caplog.text.count(f"at {follower.endpoint} broke") >= 2, caplog.text

    run(scenario())


def test_a_watch_from_a_compacted_revision_is_reported(etcd1: EtcdCluster) -> None:
    async def scenario() -> None:
        async with EtcdClient(etcd1.endpoints) as etcd:
            first = await etcd.put(b"/c/a", b"1")
            last = await etcd.put(b"/c/a", b"2")
            _, stubs = etcd._endpoint()
            await stubs.kv.Compact(rpc_pb2.CompactionRequest(revision=last, physical=True))
            with pytest.raises(WatchCompacted) as caught:
                async for _ in etcd.watch_prefix(b"/c/", first):
                    pass
            assert caught.value.compact_revision == last

    run(scenario())
