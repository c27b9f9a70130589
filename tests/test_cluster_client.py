"""``StreamerClient(cluster=...)`` against real ``streamer serve --cluster``
processes, a real etcd and one scripted Puller shared by every node:
subscriptions go to their shard's node and get every matching event in
Puller order; a SIGKILLed node's shards are owned again within the lease
TTL + 2 s and its subscriptions resume elsewhere with no gap; a joining
node takes only the shards it wins, with no gap; a plain gateway is
served at any node; collection groups route each collection to its own
nodes; a kill of the etcd leader leaves delivery going."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from pathlib import Path

import orjson
from cluster_helpers import cluster_keys, node
from etcd_helpers import EtcdCluster
from puller_double import PullerDouble
from service_helpers import ServeProcess

from streamer.client import StreamerClient, Subscription
from streamer.cluster import shards
from streamer.cluster.etcd import EtcdClient
from streamer.protocol import puller_v1_pb2 as pb

CHATS = 50


def change(k: int, collection: str = "messages") -> pb.ChangeEvent:
    return pb.ChangeEvent(event_id=f"e{k}", database="app", mgo_coll=collection,
                          mgo_doc_id=f"d{k}", op_type="insert",
                          full_doc=orjson.dumps({"chat": f"c{k % CHATS}"}))


class Gateway:
    """A client and what it received, by subscription, in arrival order."""

    def __init__(self, client: StreamerClient) -> None:
        self.client = client
        self.received: dict[str, list[str]] = defaultdict(list)
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for delivery in self.client.deliveries():
            for sub_id in delivery.subscription_ids:
                self.received[sub_id].append(delivery.event.event_id)

    def missing(self, expected: dict[str, list[str]]) -> int:
        return sum(len(set(want) - set(self.received[s])) for s, want in expected.items())

    def check(self, expected: dict[str, list[str]]) -> int:
        """Every expected event came, first arrivals in Puller order; the
        number of duplicates."""
        duplicates = 0
        for sub_id, want in expected.items():
            got = self.received[sub_id]
            first = list(dict.fromkeys(got))
            assert first == want, (sub_id, got, want)
            duplicates += len(got) - len(first)
        return duplicates


def subscriptions(name: str, count: int) -> list[Subscription]:
    return [Subscription("messages", database="app", subscription_id=f"{name}-{i}",
                         filters=[("chat", "==", f"c{i % CHATS}")]) for i in range(count)]


def expected_of(subs: list[Subscription], events: range) -> dict[str, list[str]]:
    by_chat: dict[str, list[str]] = defaultdict(list)
    for k in events:
        by_chat[f"c{k % CHATS}"].append(f"e{k}")
    return {s.subscription_id or "": list(by_chat[str(s.filters[0][2])]) for s in subs}


async def settled(etcd: EtcdClient, live: set[str]) -> bool:
    nodes, owners = await cluster_keys(etcd)
    return nodes == live and owners == shards.placement(live)


async def wait_settled(etcd: EtcdClient, live: set[str], timeout: float,
                       processes: list[ServeProcess]) -> float:
    start = time.monotonic()
    while not await settled(etcd, live):
        for serve in processes:
            assert serve.proc.poll() is None, serve.log()
        assert time.monotonic() - start < timeout, (await cluster_keys(etcd), live)
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_cluster_clients_through_a_node_kill_and_a_join(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    ttl = 3
    per_gateway = 5000

    async def main() -> None:
        puller = PullerDouble()
        await puller.start()
        endpoints = "etcd://" + ",".join(etcd1.endpoints)
        names = ["n1", "n2", "n3", "n4"]
        n1, n2, n3, n4 = (node(tmp_path, etcd1, n, "--lease-ttl", str(ttl), puller=puller)
                          for n in names)
        try:
            async with contextlib.AsyncExitStack() as stack, n1, n2, n3, \
                    EtcdClient(etcd1.endpoints) as etcd:
                await wait_settled(etcd, {"n1", "n2", "n3"}, 30, [n1, n2, n3])
                subs = {g: subscriptions(g, per_gateway) for g in ("gwa", "gwb")}
                plain_subs = subscriptions("plain", 20)
                async with StreamerClient(cluster=endpoints, gateway_id="gwa") as a, \
                        StreamerClient(cluster=endpoints, gateway_id="gwb") as b, \
                        StreamerClient(n2.address, gateway_id="plain", batch=False) as plain:
                    gateways = {"gwa": Gateway(a), "gwb": Gateway(b)}
                    plain_gateway = Gateway(plain)
                    started = time.monotonic()
                    answers = await asyncio.gather(
                        a.subscribe_many(subs["gwa"], timeout=60),
                        b.subscribe_many(subs["gwb"], timeout=60),
                        plain.subscribe_many(plain_subs, timeout=60))
                    print(f"\n{2 * per_gateway} cluster subscriptions placed in "
                          f"{time.monotonic() - started:.2f} s")
                    assert all(isinstance(x, str) for answer in answers for x in answer)
                    # Each at its shard's owner.
                    placement = shards.placement(["n1", "n2", "n3"])
                    for g, client in (("gwa", a), ("gwb", b)):
                        for sub in subs[g][:500]:
                            sub_id = sub.subscription_id or ""
                            assert client.node_of(sub_id) == placement[shards.shard_of(sub_id)]

                    async def delivered(events: range) -> None:
                        want = {g: expected_of(subs[g], events) for g in gateways}
                        plain_want = expected_of(plain_subs, events)
                        start = time.monotonic()
                        while any(gateways[g].missing(want[g]) for g in gateways) or (
                                plain_gateway.missing(plain_want)):
                            assert time.monotonic() - start < 60, {
                                g: gateways[g].missing(want[g]) for g in gateways}
                            await asyncio.sleep(0.1)

                    # Steady state.
                    await puller.append(*(change(k) for k in range(100)))
                    await delivered(range(100))

                    # SIGKILL n3 while events flow.
                    await n3.kill()
                    killed = time.monotonic()
                    for k in range(100, 200):
                        await puller.append(change(k))
                        await asyncio.sleep(0.01)
                    await wait_settled(etcd, {"n1", "n2"}, ttl + 10, [n1, n2])
                    reowned = time.monotonic() - killed
                    print(f"n3 killed: its shards owned again after {reowned:.2f} s "
                          f"(lease TTL {ttl} s)")
                    assert reowned < ttl + 2
                    await delivered(range(200))
                    print(f"n3 killed: every subscription delivering again after "
                          f"{time.monotonic() - killed:.2f} s")

                    # n4 joins while events flow: it takes only what it wins.
                    before = (await cluster_keys(etcd))[1]
                    joined = time.monotonic()
                    await stack.enter_async_context(n4)
                    for k in range(200, 300):
                        await puller.append(change(k))
                        await asyncio.sleep(0.01)
                    await wait_settled(etcd, {"n1", "n2", "n4"}, 30, [n1, n2, n4])
                    took = time.monotonic() - joined
                    after = (await cluster_keys(etcd))[1]
                    moved = {s for s in after if after[s] != before[s]}
                    assert moved == shards.moved(shards.placement(["n1", "n2"]),
                                                 shards.placement(["n1", "n2", "n4"]))
                    assert {after[s] for s in moved} == {"n4"}
                    print(f"n4 joined: {len(moved)} shards moved to it within {took:.2f} s "
                          "of its start")
                    await delivered(range(300))
                    for g, client in (("gwa", a), ("gwb", b)):
                        for sub in subs[g][:500]:
                            sub_id = sub.subscription_id or ""
                            assert client.node_of(sub_id) == after[shards.shard_of(sub_id)]
                    everything = range(300)
                    duplicates = sum(gateways[g].check(expected_of(subs[g], everything))
                                     for g in gateways)
                    plain_gateway.check(expected_of(plain_subs, everything))
                    print(f"every subscription got every event in order; {duplicates} "
                          "duplicates around the moves")
        finally:
            await puller.stop()

    asyncio.run(main())
