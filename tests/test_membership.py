"""streamer.cluster.membership against real etcd processes on loopback
(tests/etcd_helpers.py): members join and see each other, every shard is
owned exactly once as the placement says, a join moves only the shards the
new node wins (after their old owners release them), a lost member's keys
vanish within its TTL and its shards are claimed again, a node cut off
from etcd stops being deliverable before its lease can expire, and
memberships survive the SIGKILL of a 3-member etcd's leader.

Each member has its own EtcdClient, as separate processes would."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from etcd_helpers import ETCD_MISSING, EtcdCluster

from streamer.cluster import shards
from streamer.cluster.etcd import EtcdClient
from streamer.cluster.etcdpb import rpc_pb2
from streamer.cluster.membership import (
    ALL,
    Membership,
    NodeInfo,
    Ownership,
    ShardOwner,
    fence_margin,
    group_of,
    node_key,
    route_group,
    shard_key,
)
from streamer.errors import LeaseLost

if ETCD_MISSING:
    pytest.skip(ETCD_MISSING, allow_module_level=True)

CLUSTER = "test"


def run(scenario: Coroutine[Any, Any, None], timeout: float = 90) -> None:
    asyncio.run(asyncio.wait_for(scenario, timeout))


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``predicate``; returns how long it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Node:
    """A member as a node process would run one: its own client, its
    Membership and Ownership, and what it reported."""

    def __init__(self, endpoints: list[str], node_id: str, ttl: int,
                 collections: tuple[str, ...] = ()) -> None:
        self.node_id = node_id
        self.client = EtcdClient(endpoints, timeout=2)
        self.failures: list[BaseException] = []
        self.changes: list[set[int]] = []
        self.seen: list[set[str]] = []  # the live nodes at each membership change
        self.membership = Membership(
            self.client, CLUSTER, node_id, f"127.0.0.1:{7000 + int(node_id[1:])}",
            collections=collections, ttl=ttl, on_failed=self.failures.append,
            on_change=lambda nodes: self.seen.append(set(nodes)))
        self.ownership = Ownership(self.membership, on_change=self.changes.append)

    async def start(self) -> Node:
        await self.membership.start()
        await self.ownership.start()
        return self

    async def hand_over(self) -> None:
        """What the node does once the gateways of its handed-over shards
        have re-homed (here at once)."""
        for shard in self.ownership.handovers():
            await self.ownership.release(shard)

    async def stop(self) -> None:
        await self.ownership.stop()
        await self.membership.stop()
        await self.client.close()

    async def crash(self) -> None:
        """As a SIGKILL would: no revoke, no more keepalives, no more calls."""
        await self.client.close()
        await self.ownership.stop()


@contextlib.asynccontextmanager
async def running(nodes: list[Node]) -> AsyncIterator[list[Node]]:
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def agreed(nodes: list[Node]) -> bool:
    """Every node sees the same live nodes and the same owners, every shard
    is owned by its desired owner, and the owned sets partition the shards."""
    ids = {n.node_id for n in nodes}
    if any(set(n.membership.nodes) != ids for n in nodes):
        return False
    views = [n.ownership.owners() for n in nodes]
    if any(v != views[0] for v in views) or not all(n.ownership.settled() for n in nodes):
        return False
    owned = [set(n.ownership.owned()) for n in nodes]
    return sum(map(len, owned)) == shards.SHARDS and set().union(*owned) == set(
        range(shards.SHARDS))


async def settle(nodes: list[Node], timeout: float) -> float:
    """Hand over until every node agrees; how long it took."""
    start = time.monotonic()
    while not agreed(nodes):
        assert time.monotonic() - start < timeout, "the cluster did not settle: " + ", ".join(
            f"{n.node_id}: {len(n.membership.nodes)} nodes, {len(n.ownership.owned())} owned,"
            f" handovers {len(n.ownership.handovers())}, awaited {len(n.ownership.awaited())}"
            f" (held by {sorted({str(n.ownership.owner(s)) for s in n.ownership.awaited()})[:3]})"
            for n in nodes)
        for node in nodes:
            await node.hand_over()
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_members_join_own_every_shard_once_and_a_join_moves_only_what_it_wins(
    etcd1: EtcdCluster,
) -> None:
    async def scenario() -> None:
        endpoints = etcd1.endpoints
        three = [Node(endpoints, f"n{i}", ttl=5) for i in range(3)]
        async with running(three), EtcdClient(endpoints) as observer:
            started = time.monotonic()
            await asyncio.gather(*(n.start() for n in three))
            await until(lambda: all(len(n.membership.nodes) == 3 for n in three), 5,
                        "each member sees 3 nodes")
            await settle(three, 10)
            assert all(n.seen[-1] == {"n0", "n1", "n2"} and n.membership.changed.is_set()
                       for n in three)
            print(f"\n3 members joined and settled in {time.monotonic() - started:.2f} s")
            info = three[0].membership.nodes["n1"]
            assert info == NodeInfo("n1", "127.0.0.1:7001", (), three[1].membership.lease,
                                    info.revision)
            assert info.serves("anything") and info.group == ALL
            kv = await observer.get(node_key(CLUSTER, "n0"))
            assert kv is not None and kv.lease == three[0].membership.lease
            assert json.loads(kv.value) == {"advertise": "127.0.0.1:7000", "collections": []}
            # etcd agrees with every view: owner, epoch and lease of each shard.
            placement = shards.placement(["n0", "n1", "n2"])
            by_id = {n.node_id: n for n in three}
            for shard in range(shards.SHARDS):
                kv = await observer.get(shard_key(CLUSTER, shard))
                assert kv is not None
                owner = placement[shard]
                assert kv.value == owner.encode()
                assert kv.lease == by_id[owner].membership.lease
                assert by_id[owner].ownership.owned()[shard] == kv.create_revision
                assert three[2].ownership.owner(shard) == ShardOwner(
                    owner, kv.create_revision, kv.lease)
                assert all(n.ownership.deliverable(shard) == (n.node_id == owner) for n in three)

            # A release only works for the holder at its epoch.
            shard = next(s for s, o in placement.items() if o == "n0")
            assert await three[1].ownership.release(shard) is False
            epoch = three[0].ownership.owned()[shard]
            key = shard_key(CLUSTER, shard)
            assert await observer.delete_if_created_at(key, epoch - 1) is False
            assert three[0].ownership.owned()[shard] == epoch

            # A fourth node joins: it waits for the shards it wins until
            # their owners release them; nothing else moves.
            before = {s: (o.node_id, o.epoch) for s, o in three[0].ownership.owners().items()}
            four = [*three, Node(endpoints, "n3", ttl=5)]
            joined = time.monotonic()
            await four[3].start()
            try:
                await until(lambda: all(len(n.membership.nodes) == 4 for n in four), 5,
                            "each member sees 4 nodes")
                wins = shards.moved(placement, shards.placement(["n0", "n1", "n2", "n3"]))
                assert wins and all(shards.owner_of(s, ["n0", "n1", "n2", "n3"]) == "n3"
                                    for s in wins)
                await until(lambda: four[3].ownership.awaited() == wins, 5,
                            "the new node awaits the shards it wins")
                await asyncio.sleep(0.3)
                assert not four[3].ownership.owned(), "claimed before the old owner released"
                assert set().union(*(n.ownership.handovers() for n in three)) == wins
                await settle(four, 10)
                print(f"a 4th member joined; {len(wins)} shards moved in"
                      f" {time.monotonic() - joined:.2f} s")
                after = {s: (o.node_id, o.epoch) for s, o in four[0].ownership.owners().items()}
                assert {s for s in after if after[s] != before[s]} == wins
                assert all(after[s][0] == "n3" and after[s][1] > before[s][1] for s in wins)
                assert set(four[3].ownership.owned()) == wins
            finally:
                await four[3].stop()
            # A graceful leave (revoke): its shards are claimed again at once.
            left = time.monotonic()
            await settle(three, 5)
            print(f"the 4th member left; shards re-claimed in {time.monotonic() - left:.2f} s")
            assert all(not n.failures for n in three)
            assert all(n.changes for n in three)
            assert all({"n0", "n1", "n2", "n3"} in n.seen and n.seen[-1] == {"n0", "n1", "n2"}
                       for n in three)

    run(scenario())


def test_a_lost_member_vanishes_within_its_ttl_and_its_shards_are_claimed(
    etcd1: EtcdCluster,
) -> None:
    ttl = 2

    async def scenario() -> None:
        nodes = [Node(etcd1.endpoints, f"n{i}", ttl=ttl) for i in range(3)]
        async with running(nodes[:2]):
            try:
                for node in nodes:
                    await node.start()
                await settle(nodes, 10)
                victim, survivors = nodes[2], nodes[:2]
                lost_shards = set(victim.ownership.owned())
                assert lost_shards
                await asyncio.sleep(ttl)  # the keepalive holds it past a TTL
                assert all("n2" in n.membership.nodes for n in survivors)
                await victim.crash()
                crashed = time.monotonic()
                gone = await until(lambda: all("n2" not in n.membership.nodes for n in survivors),
                                   ttl + 2, "the lost member's key deleted")
                await settle(survivors, ttl + 2 - gone)
                took = time.monotonic() - crashed
                print(f"\nlost member gone after {gone:.2f} s, its {len(lost_shards)} shards"
                      f" owned again after {took:.2f} s (TTL {ttl} s)")
                assert took < ttl + 2
                placement = shards.placement(["n0", "n1"])
                for shard in lost_shards:
                    owner = survivors[0].ownership.owner(shard)
                    assert owner is not None and owner.node_id == placement[shard]
                assert all(not n.failures for n in survivors)
            finally:
                await nodes[2].stop()

    run(scenario())


def test_a_node_cut_off_from_etcd_is_fenced_before_its_lease_can_expire(
    etcd1: EtcdCluster,
) -> None:
    ttl = 3

    async def scenario() -> None:
        node = Node(etcd1.endpoints, "n0", ttl=ttl)
        async with running([node]):
            await node.start()
            await until(node.ownership.settled, 5, "the single node owns every shard")
            await asyncio.sleep(1.5)
            assert node.membership.deliverable() and node.ownership.deliverable(0)
            etcd1.members[0].kill()
            killed = time.monotonic()
            fenced = await until(lambda: node.membership.fenced, ttl, "fenced")
            fenced_at = time.monotonic()
            last_ok = node.membership.last_ok
            assert not node.ownership.deliverable(0)
            # Fenced before etcd could expire the lease (the last acknowledged
            # keepalive + TTL), at the margin, not sooner.
            margin = fence_margin(ttl)
            assert fenced_at < last_ok + ttl, (fenced_at - last_ok)
            assert fenced_at >= last_ok + ttl - margin
            assert node.membership.error is None  # not lost yet: only fenced
            print(f"\nfenced {fenced:.2f} s after etcd was killed, {fenced_at - last_ok:.2f} s"
                  f" after the last keepalive (lease TTL {ttl} s, margin {margin:.1f} s)")
            # Then the lease is reported lost: fenced for good, loudly.
            await until(lambda: bool(node.failures), ttl + 2, "the lease reported lost")
            assert isinstance(node.failures[0], LeaseLost)
            assert node.membership.error is node.failures[0]
            with pytest.raises(LeaseLost):
                await asyncio.wait_for(node.membership.wait(), 1)
            assert node.membership.fenced and time.monotonic() - killed < ttl + 2

    run(scenario())


def test_memberships_survive_the_sigkill_of_the_etcd_leader(
    etcd3: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    ttl = 5

    async def scenario() -> None:
        leader = await asyncio.to_thread(etcd3.leader)
        others = [e for e in etcd3.endpoints if e != leader.endpoint]
        # The leader first for every member: their streams are on the member killed.
        endpoints = [leader.endpoint, *others]
        nodes = [Node(endpoints, f"n{i}", ttl=ttl) for i in range(3)]
        async with running(nodes):
            for node in nodes:
                await node.start()
            await settle(nodes, 10)
            before = {s: (o.node_id, o.epoch) for s, o in nodes[0].ownership.owners().items()}
            fenced: dict[str, float] = {n.node_id: 0.0 for n in nodes}
            await asyncio.to_thread(etcd3.kill_leader)
            killed = time.monotonic()
            # Sample fencing through the election and past a TTL.
            while time.monotonic() - killed < ttl + 1.5:
                for node in nodes:
                    if node.membership.fenced:
                        fenced[node.node_id] += 0.02
                await asyncio.sleep(0.02)
            assert all(not n.failures for n in nodes), [n.failures for n in nodes]
            assert all(n.membership.deliverable() for n in nodes)
            assert all(time.monotonic() - n.membership.last_ok < ttl / 3 + 1 for n in nodes)
            await settle(nodes, 5)
            after = {s: (o.node_id, o.epoch) for s, o in nodes[0].ownership.owners().items()}
            assert after == before  # nothing moved
            print("\nafter the etcd leader's SIGKILL, fenced for " + ", ".join(
                f"{k}: {v:.2f} s" for k, v in fenced.items()))
        # Every member's keepalive was on the leader killed: each broke and moved.
        assert caplog.text.count(f"keepalive failed ({leader.endpoint}: ") >= 3, caplog.text

    run(scenario())


def test_a_restarted_node_gets_its_shards_back_when_its_old_lease_expires(
    etcd1: EtcdCluster,
) -> None:
    """A node SIGKILLed and started again at once (same id, new lease): the
    shards its old incarnation held are not its own (another lease) until
    that lease expires; then it claims them again."""
    ttl = 2

    async def scenario() -> None:
        nodes = [Node(etcd1.endpoints, f"n{i}", ttl=ttl) for i in range(2)]
        async with running(nodes[:1]):
            for node in nodes:
                await node.start()
            await settle(nodes, 10)
            old = nodes[1]
            held = old.ownership.owned()
            await old.crash()
            crashed = time.monotonic()
            new = Node(etcd1.endpoints, "n1", ttl=ttl)
            async with running([new]):
                await new.start()
                assert new.membership.lease != old.membership.lease
                await until(lambda: new.ownership.awaited() == set(held), 5,
                            "the new incarnation awaits its old shards")
                assert not new.ownership.owned() and not new.ownership.handovers()
                await settle([nodes[0], new], ttl + 2)
                took = time.monotonic() - crashed
                print(f"\nrestarted node owns its {len(held)} shards again after {took:.2f} s")
                assert set(new.ownership.owned()) == set(held)
                assert all(new.ownership.owned()[s] > held[s] for s in held)
                # The old lease's expiry did not take the new registration with it.
                assert "n1" in nodes[0].membership.nodes
            await old.stop()

    run(scenario())


def test_a_view_reads_again_after_compaction(etcd1: EtcdCluster) -> None:
    """A node view whose watch must resume from a compacted revision reads
    the nodes again instead of failing."""

    async def scenario() -> None:
        a, b = Node(etcd1.endpoints, "n0", ttl=5), Node(etcd1.endpoints, "n1", ttl=5)
        async with running([a, b]), EtcdClient(etcd1.endpoints) as observer:
            await a.start()
            view = a.membership._view
            await view.stop()  # the watch falls behind
            await b.start()
            revision = await observer.put(b"/other", b"x")
            _, stubs = observer._endpoint()
            await stubs.kv.Compact(rpc_pb2.CompactionRequest(revision=revision, physical=True))
            assert set(a.membership.nodes) == {"n0"}
            changed = a.membership.changed
            changed.clear()
            view._task = asyncio.create_task(view._run())
            await until(lambda: set(a.membership.nodes) == {"n0", "n1"}, 5, "read again")
            assert changed.is_set() and not a.failures

    run(scenario())


def test_each_collection_group_splits_the_shards_among_its_own_nodes(
    etcd1: EtcdCluster,
) -> None:
    # Two nodes serving c1 and c2 (registered in any order and with a
    # repeat: one group) and one serving everything: the pair split the 256
    # shards of their group, the third owns all 256 of its own.
    async def scenario() -> None:
        pair = [Node(etcd1.endpoints, "n1", ttl=5, collections=("c2", "c1", "c2")),
                Node(etcd1.endpoints, "n2", ttl=5, collections=("c1", "c2"))]
        alone = Node(etcd1.endpoints, "n3", ttl=5)
        async with running([*pair, alone]):
            await asyncio.gather(*(n.start() for n in [*pair, alone]))
            await until(lambda: all(len(n.membership.nodes) == 3 for n in [*pair, alone]), 5,
                        "each member sees 3 nodes")
            await until(lambda: sum(len(n.ownership.owned()) for n in pair) == shards.SHARDS
                        and len(alone.ownership.owned()) == shards.SHARDS, 10,
                        "each group owns its shards")
            assert set(pair[0].ownership.owned()).isdisjoint(pair[1].ownership.owned())
            info = alone.membership.nodes["n1"]
            assert info.collections == ("c1", "c2") and info.group == "c1%2Cc2"
            assert info.serves("c1") and not info.serves("c3")
            assert pair[0].ownership.desired() == shards.placement(["n1", "n2"])
            nodes = alone.membership.nodes.values()
            assert route_group("c1", nodes) == "c1%2Cc2"
            assert route_group("c3", nodes) == ALL
            assert route_group("c3", [info]) is None

    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.parametrize("collections, group", [
    ((), ALL), (("a",), "a"), (("b", "a", "b"), "a%2Cb"), (("a/b", "*"), "%2A%2Ca%2Fb"),
])
def test_a_group_is_one_key_segment_the_same_for_the_same_collections(
    collections: tuple[str, ...], group: str
) -> None:
    assert group_of(collections) == group
