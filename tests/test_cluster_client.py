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
import re
import time
from collections import defaultdict
from pathlib import Path

import orjson
import pytest
from cluster_helpers import cluster_keys, node, until
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
        endpoints = etcd1.url
        names = ["n1", "n2", "n3", "n4"]
        n1, n2, n3, n4 = (node(tmp_path, etcd1, n, "--lease-ttl", str(ttl), puller=puller)
                          for n in names)
        try:
            async with contextlib.AsyncExitStack() as stack, n1, n2, n3, \
                    EtcdClient(etcd1.endpoints) as etcd:
                await wait_settled(etcd, {"n1", "n2", "n3"}, 30, [n1, n2, n3])
                # Each node reads the stream as a consumer of its own.
                assert {r.consumer_id for r in puller.subscriptions} == {
                    "streamer-n1", "streamer-n2", "streamer-n3"}
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


class Cut:
    """A TCP forwarder on loopback standing for the network between one
    node and etcd, which ``cut()`` takes down (listener and every
    connection): the node loses etcd while the others keep it."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()


def test_a_node_cut_off_from_etcd_stops_before_its_shards_move(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    # n1 reaches etcd through a forwarder that is then cut: n1 must stop
    # (fenced, exit 1) before n2 claims any of n1's shards, and the cluster
    # client's subscriptions at n1 resume at n2 with no gap.
    ttl = 3

    async def main() -> None:
        puller = PullerDouble()
        await puller.start()
        cut = Cut(etcd1.endpoints[0])
        via = await cut.start()
        n1 = node(tmp_path, etcd1, "n1", "--lease-ttl", str(ttl), puller=puller)
        n1.args = tuple(f"etcd://{via}" if a.startswith("etcd://") else a for a in n1.args)
        n2 = node(tmp_path, etcd1, "n2", "--lease-ttl", str(ttl), puller=puller)
        endpoints = etcd1.url
        try:
            async with n1, n2, EtcdClient(etcd1.endpoints) as etcd:
                await wait_settled(etcd, {"n1", "n2"}, 30, [n1, n2])
                subs = subscriptions("gw", 1000)
                async with StreamerClient(cluster=endpoints, gateway_id="gw") as client:
                    gateway = Gateway(client)
                    assert all(isinstance(x, str)
                               for x in await client.subscribe_many(subs, timeout=60))
                    at_n1 = [s.subscription_id for s in subs
                             if client.node_of(s.subscription_id or "") == "n1"]
                    assert at_n1
                    await puller.append(*(change(k) for k in range(50)))
                    _, owners = await cluster_keys(etcd)
                    n1_shards = {s for s, owner in owners.items() if owner == "n1"}

                    cut.cut()
                    cut_at = time.monotonic()
                    claimed_at = 0.0
                    while not claimed_at:
                        _, owners = await cluster_keys(etcd)
                        if any(owners.get(s) == "n2" for s in n1_shards):
                            claimed_at = time.monotonic()
                        assert time.monotonic() - cut_at < ttl + 10
                        await asyncio.sleep(0.02)
                    code = await asyncio.to_thread(n1.proc.wait, 30)
                    exit_line = next(line for line in n1.log().splitlines()
                                     if "NOT_SERVING and stops" in line)
                    print(f"\nn1 cut off from etcd: n2 claimed its first shard after "
                          f"{claimed_at - cut_at:.2f} s (lease TTL {ttl} s)")
                    assert code == 1, n1.log()
                    assert "fenced: no etcd keepalive acknowledged" in n1.log(), n1.log()
                    # n1 stopped before the claim: its fence line is older
                    # than the claim (the log's clock is the wall clock).
                    fenced = time.mktime(time.strptime(exit_line[:19], "%Y-%m-%d %H:%M:%S")) + (
                        int(exit_line[20:23]) / 1000)
                    assert fenced < time.time() - (time.monotonic() - claimed_at), (
                        exit_line, claimed_at - cut_at)
                    await puller.append(*(change(k) for k in range(50, 100)))
                    want = expected_of(subs, range(100))
                    start = time.monotonic()
                    while gateway.missing(want):
                        assert time.monotonic() - start < 60, gateway.missing(want)
                        await asyncio.sleep(0.1)
                    duplicates = gateway.check(want)
                    assert all(client.node_of(s) == "n2" for s in at_n1)
                    print(f"its {len(at_n1)} subscriptions resumed at n2 with no gap "
                          f"({duplicates} duplicates)")
        finally:
            await puller.stop()

    asyncio.run(main())


def test_delivery_goes_on_through_a_kill_of_the_etcd_leader(
    tmp_path: Path, etcd3: EtcdCluster
) -> None:
    # A TTL that outlasts an election (1-2.7 s measured here) with the
    # fencing margin: no node stops, no subscription moves.
    ttl = 8

    async def main() -> None:
        puller = PullerDouble()
        await puller.start()
        n1, n2 = (node(tmp_path, etcd3, n, "--lease-ttl", str(ttl), puller=puller)
                  for n in ("n1", "n2"))
        endpoints = etcd3.url
        try:
            async with n1, n2, EtcdClient(etcd3.endpoints) as etcd:
                await wait_settled(etcd, {"n1", "n2"}, 30, [n1, n2])
                subs = subscriptions("gw", 1000)
                async with StreamerClient(cluster=endpoints, gateway_id="gw") as client:
                    gateway = Gateway(client)
                    assert all(isinstance(x, str)
                               for x in await client.subscribe_many(subs, timeout=60))
                    ids = [s.subscription_id or "" for s in subs]
                    where = {s: client.node_of(s) for s in ids}
                    await puller.append(*(change(k) for k in range(50)))
                    killed = await asyncio.to_thread(etcd3.kill_leader)
                    for k in range(50, 150):
                        await puller.append(change(k))
                        await asyncio.sleep(0.02)
                    want = expected_of(subs, range(150))
                    start = time.monotonic()
                    while gateway.missing(want):
                        assert time.monotonic() - start < 60, gateway.missing(want)
                        await asyncio.sleep(0.1)
                    assert gateway.check(want) == 0
                    new_leader = await asyncio.to_thread(etcd3.leader)
                    print(f"\netcd leader {killed.name} killed, {new_leader.name} elected: "
                          "every event delivered, no node stopped, no subscription moved")
                    assert n1.proc.poll() is None and n2.proc.poll() is None
                    assert {s: client.node_of(s) for s in ids} == where
        finally:
            await puller.stop()

    asyncio.run(main())


def test_collection_groups_route_each_collection_to_its_own_nodes(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    # n1 serves messages, n2 orders, n3 everything: a subscription goes to
    # the group serving the fewest collections that has its collection.
    async def main() -> None:
        puller = PullerDouble()
        await puller.start()
        n1 = node(tmp_path, etcd1, "n1", "--collections", "messages", puller=puller)
        n2 = node(tmp_path, etcd1, "n2", "--collections", "orders", puller=puller)
        n3 = node(tmp_path, etcd1, "n3", puller=puller)
        endpoints = etcd1.url
        try:
            async with n1, n2, n3, EtcdClient(etcd1.endpoints) as etcd:
                async def owned() -> dict[str, int]:
                    kvs, _ = await etcd.get_prefix(b"/streamer/streamer/shards/")
                    groups: dict[str, int] = defaultdict(int)
                    for kv in kvs:
                        groups[kv.key.decode().split("/")[4]] += 1
                    return groups

                start = time.monotonic()
                while await owned() != {"messages": 256, "orders": 256, "*": 256}:
                    assert time.monotonic() - start < 30, await owned()
                    await asyncio.sleep(0.05)
                collections = {"messages": "n1", "orders": "n2", "notes": "n3"}
                subs = [Subscription(c, database="app", subscription_id=f"{c}-{i}")
                        for c in collections for i in range(20)]
                async with StreamerClient(cluster=endpoints, gateway_id="gw") as client:
                    gateway = Gateway(client)
                    assert all(isinstance(x, str)
                               for x in await client.subscribe_many(subs, timeout=60))
                    for sub in subs:
                        assert client.node_of(sub.subscription_id or "") == collections[
                            sub.collection]
                    await puller.append(*(change(k, c) for k, c in enumerate(collections)))
                    want = {s.subscription_id or "": [f"e{k}"]
                            for k, c in enumerate(collections) for s in subs if s.collection == c}
                    start = time.monotonic()
                    while gateway.missing(want):
                        assert time.monotonic() - start < 30, gateway.missing(want)
                        await asyncio.sleep(0.05)
                    assert gateway.check(want) == 0
        finally:
            await puller.stop()

    asyncio.run(main())


def test_the_cluster_client_is_a_streamer_client_and_checks_its_options() -> None:
    from streamer.cluster.client import ClusterClient

    client = StreamerClient(cluster="etcd://127.0.0.1:2379", gateway_id="gw")
    assert isinstance(client, ClusterClient) and isinstance(client, StreamerClient)
    assert client.endpoints == ("127.0.0.1:2379",)
    for kwargs, says in [
        ({"target": "127.0.0.1:1", "cluster": "etcd://127.0.0.1:2379"}, "not both"),
        ({"cluster": "http://127.0.0.1:2379"}, "cluster: not etcd://HOST:PORT"),
        ({"cluster": "etcd://127.0.0.1:2379", "batch": False}, "batch and resume"),
        ({"cluster": "etcd://127.0.0.1:2379", "resume": False}, "batch and resume"),
        ({"cluster": "etcd://127.0.0.1:2379", "gateway_id": ""}, "gateway_id"),
        ({}, "give the Streamer's HOST:PORT, or cluster="),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            StreamerClient(**{"gateway_id": "gw", **kwargs})


def test_a_cluster_client_without_etcd_fails_with_cannot_connect() -> None:
    from streamer.errors import CannotConnect
    from streamer.tools.measure import free_port

    async def main() -> None:
        target = f"etcd://127.0.0.1:{free_port()}"
        async with StreamerClient(cluster=target, gateway_id="gw",
                                  connect_timeout=1) as client:
            with pytest.raises(CannotConnect, match="cannot connect to etcd://"):
                await client.subscribe("messages", timeout=30)
            with pytest.raises(CannotConnect):
                async for _ in client.deliveries():
                    pass

    asyncio.run(main())


def test_a_subscription_waits_for_a_node_serving_its_collection(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    # Only n1 (orders) at first: a subscription to messages has nowhere to
    # go and waits (within its timeout); once n2 (everything) is up it is
    # placed there. Unsubscribing ends its deliveries; marker() follows them.
    async def main() -> None:
        puller = PullerDouble()
        await puller.start()
        n1 = node(tmp_path, etcd1, "n1", "--collections", "orders", puller=puller)
        n2 = node(tmp_path, etcd1, "n2", puller=puller)
        endpoints = etcd1.url
        try:
            async with contextlib.AsyncExitStack() as stack, n1:
                async with StreamerClient(cluster=endpoints, gateway_id="gw") as client:
                    gateway = Gateway(client)
                    await until(lambda: bool(client.nodes), 30, "the client sees n1")
                    with pytest.raises(TimeoutError):
                        await client.subscribe("messages", database="app",
                                               subscription_id="m1", timeout=1)
                    waiting = asyncio.create_task(client.subscribe(
                        "messages", database="app", subscription_id="m2", timeout=60))
                    await stack.enter_async_context(n2)
                    assert await waiting == "m2" and client.node_of("m2") == "n2"
                    await client.subscribe("messages", database="app", subscription_id="m3",
                                           timeout=30)
                    await puller.append(change(0))
                    await until(lambda: len(gateway.received["m3"]) == 1, 30, "e0 delivered")
                    assert gateway.received["m2"] == ["e0"] and "m1" not in gateway.received
                    assert client.marker("m3") == "p0"
                    await client.unsubscribe("m3")
                    assert client.marker("m3") == "" and client.node_of("m3") is None
                    await puller.append(change(1))
                    await until(lambda: len(gateway.received["m2"]) == 2, 30, "e1 delivered")
                    assert gateway.received["m3"] == ["e0"]
                    assert sorted(client.live_subscriptions) == ["m2"]
        finally:
            await puller.stop()

    asyncio.run(main())
