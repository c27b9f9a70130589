"""``streamer serve --cluster`` (the preview of issue 12) as real processes
against a real etcd on loopback: bad cluster flags are one line and exit
2; two nodes register and split the 256 shards; a gateway that said Hello
is refused with not_owner (naming the owner) at the node that does not own
its subscription's shard and served at the one that does; a plain gateway
is served at either; a node whose etcd dies stops (exit 1) before its
lease's TTL is over."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pytest
from cluster_helpers import PREFIX, node, until
from etcd_helpers import EtcdCluster
from service_helpers import refusal, serve_command

from streamer.client import Subscription
from streamer.cluster import shards
from streamer.errors import SubscriptionRejected
from streamer.protocol import puller_v1_pb2 as pb


def change(k: int) -> pb.ChangeEvent:
    return pb.ChangeEvent(event_id=f"e{k}", database="app", mgo_coll="messages",
                          mgo_doc_id=f"d{k}", op_type="insert", full_doc=b"{}")


@pytest.mark.parametrize("args, says", [
    (("--cluster", "http://127.0.0.1:2379"), "not etcd://HOST:PORT"),
    (("--cluster", "etcd://127.0.0.1"), "not HOST:PORT"),
    (("--cluster", "etcd://127.0.0.1:2379,"), "an empty HOST:PORT"),
    (("--cluster", "etcd://127.0.0.1:0"), "port 0 cannot be connected to"),
    (("--cluster", "etcd://127.0.0.1:2379", "--advertise", "127.0.0.1:1"),
     "--node-id is required with --cluster"),
    (("--cluster", "etcd://127.0.0.1:2379", "--node-id", "n1"),
     "--advertise is required with --cluster"),
    (("--node-id", "n1"), "--node-id needs --cluster"),
    (("--advertise", "127.0.0.1:1"), "--advertise needs --cluster"),
    (("--cluster", "etcd://127.0.0.1:2379", "--node-id", "a/b", "--advertise", "h:1"),
     "without '/'"),
    (("--lease-ttl", "1"), "must be at least 2"),
    (("--lease-ttl", "5"), "--lease-ttl needs --cluster"),
])
def test_bad_cluster_flags_are_one_line_and_exit_2(args: tuple[str, ...], says: str) -> None:
    result = subprocess.run(serve_command("--puller", "127.0.0.1:1", *args),
                            capture_output=True, text=True, timeout=30)
    assert says in refusal(result)


def test_a_node_that_cannot_reach_etcd_does_not_start(tmp_path: Path) -> None:
    from streamer.tools.measure import free_port

    result = subprocess.run(serve_command(
        "--puller", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path),
        "--cluster", f"etcd://127.0.0.1:{free_port()}", "--node-id", "n1",
        "--advertise", "127.0.0.1:1"), capture_output=True, text=True, timeout=60)
    assert "etcd lease grant: no endpoint answered" in refusal(result)


def test_the_shard_check_covers_subscribe_and_both_batch_paths() -> None:
    # SubscriptionSet's cluster hook, without etcd: an owner that must be
    # placed is refused on shards not owned here, one subscribe at a time
    # and in batches (the compiled registration is bypassed for it); a
    # request without an id is placed where it arrives; other owners are
    # not checked.
    from streamer._ext._subscribe import batch_response
    from streamer.matching import Matcher
    from streamer.node.subscriptions import NOT_OWNER, SubscriptionSet
    from streamer.protocol.streamer_v1_pb2 import (
        StreamerMessage,
        SubscribeRequest,
        SubscribeResponse,
    )

    subs = SubscriptionSet(Matcher())
    subs.placed = lambda owner: owner == 1
    subs.not_placed = lambda sub_id: None if sub_id.startswith("ok") else f"{sub_id}: elsewhere"

    def request(sub_id: str) -> SubscribeRequest:
        return SubscribeRequest(subscription_id=sub_id, database="app", collection="messages")

    def batch(owner: int, *ids: str) -> list[SubscribeResponse]:
        message = StreamerMessage.FromString(batch_response(
            subs.subscribe_batch(owner, [request(i) for i in ids])))
        return list(message.subscribe_batch_response.responses)

    refused = subs.subscribe(1, request("x1"))
    assert (refused.success, refused.code, refused.error) == (False, NOT_OWNER, "x1: elsewhere")
    assert subs.subscribe(1, request("ok1")).success
    generated = subs.subscribe(1, request(""))
    assert generated.success and generated.subscription_id
    assert [(r.success, r.code) for r in batch(1, "ok2", "x2")] == [(True, ""), (False, NOT_OWNER)]
    assert subs.subscribe(2, request("x3")).success
    assert [r.success for r in batch(2, "x4", "x5")] == [True, True]
    assert "x1" not in subs and "x2" not in subs and {"ok1", "ok2", "x3", "x4"} <= subs.ids()


def test_two_nodes_split_the_shards_and_route_hello_gateways(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    from streamer.client import StreamerClient
    from streamer.cluster.etcd import EtcdClient

    async def main() -> None:
        from streamer.tools.measure import free_port, scrape

        metrics = f"127.0.0.1:{free_port()}"
        n1, n2 = node(tmp_path, etcd1, "n1", "--metrics", metrics), node(tmp_path, etcd1, "n2")
        async with n1, n2, EtcdClient(etcd1.endpoints) as etcd:
            owners: dict[int, str] = {}
            live: set[str] = set()

            async def read() -> bool:
                kvs, _ = await etcd.get_prefix(PREFIX)
                owners.clear()
                live.clear()
                for kv in kvs:
                    key = kv.key[len(PREFIX):].decode()
                    if key.startswith("shards/"):
                        owners[int(key.removeprefix("shards/*/"))] = kv.value.decode()
                    else:
                        live.add(key.removeprefix("nodes/"))
                        info = json.loads(kv.value)
                        assert info["advertise"] == {"n1": n1, "n2": n2}[
                            key.removeprefix("nodes/")].address
                return live == {"n1", "n2"} and owners == shards.placement(live)

            start = time.monotonic()
            while not await read():
                for serve in (n1, n2):
                    assert serve.proc.poll() is None, serve.log()
                assert time.monotonic() - start < 30, (owners, live, n1.log(), n2.log())
                await asyncio.sleep(0.1)
            print(f"two nodes registered and split the shards in {time.monotonic() - start:.2f} s")
            assert set(owners.values()) == {"n1", "n2"} and len(owners) == shards.SHARDS
            by_node = {"n1": n1, "n2": n2}

            # Two subscription ids, each with its owner and the other node.
            ids = [f"s{i}" for i in range(100)]
            mine = next(i for i in ids if owners[shards.shard_of(i)] == "n1")
            theirs = next(i for i in ids if owners[shards.shard_of(i)] == "n2")
            async with StreamerClient(n1.address, gateway_id="gw-hello") as hello, \
                    StreamerClient(n2.address, gateway_id="gw-plain", batch=False) as plain:
                # At the wrong node: refused, naming the shard and its owner
                # (once n1's watch has seen n2's claim: until then it says
                # "owned by no node yet").
                shard = shards.shard_of(theirs)
                start = time.monotonic()
                while True:
                    with pytest.raises(SubscriptionRejected) as refused:
                        await hello.subscribe("messages", database="app",
                                              subscription_id=theirs, timeout=30)
                    assert refused.value.code == "not_owner"
                    assert f"shard {shard} of subscription {theirs!r}" in str(refused.value)
                    if "owned by node n2" in str(refused.value):
                        break
                    assert "owned by no node yet" in str(refused.value)
                    assert time.monotonic() - start < 10, str(refused.value)
                    await asyncio.sleep(0.05)
                # subscribe_batch: the same check, request by request.
                mine_b = next(i for i in ids if owners[shards.shard_of(i)] == "n1" and i != mine)
                theirs_b = next(i for i in ids
                                if owners[shards.shard_of(i)] == "n2" and i != theirs)
                answers = await hello.subscribe_many([_sub(mine_b), _sub(theirs_b)], timeout=30)
                assert answers[0] == mine_b, answers
                assert isinstance(answers[1], SubscriptionRejected), answers
                assert answers[1].code == "not_owner", answers
                assert f"shard {shards.shard_of(theirs_b)} " in str(answers[1])
                # The cluster's metrics (n1's view, refreshed every 0.25 s; its
                # refusals counted).
                mine_count = sum(1 for o in owners.values() if o == "n1")
                deadline = time.monotonic() + 10
                while True:
                    samples = await asyncio.to_thread(scrape, metrics)
                    cluster = {k: v[()] for k, v in samples.items() if "cluster" in k}
                    if (cluster["streamer_cluster_nodes"], cluster[
                            "streamer_cluster_shards_owned"]) == (2, mine_count):
                        break
                    assert time.monotonic() < deadline, cluster
                    await asyncio.sleep(0.1)
                assert cluster["streamer_cluster_not_owner_refusals_total"] >= 2
                assert cluster["streamer_cluster_shards_handing_over"] == 0
                assert 0 <= cluster["streamer_cluster_keepalive_age_seconds"] < cluster[
                    "streamer_cluster_fence_after_seconds"] == 5 - 5 / 3
                # At the right node: accepted.
                await hello.subscribe("messages", database="app", subscription_id=mine,
                                      timeout=30)
                # A plain gateway (no Hello) is served whatever the shard.
                await plain.subscribe("messages", database="app", subscription_id=mine,
                                      timeout=30)
                await plain.subscribe("messages", database="app", subscription_id=theirs,
                                      timeout=30)
                for serve in by_node.values():
                    await serve.puller.append(change(1))
                async with asyncio.timeout(30):
                    async for delivery in hello.deliveries():
                        assert delivery.event.event_id == "e1"
                        assert mine in delivery.subscription_ids
                        break
                    async for delivery in plain.deliveries():
                        assert delivery.event.event_id == "e1"
                        assert set(delivery.subscription_ids) == {mine, theirs}
                        break
            # A clean stop revokes the lease: the node's keys go at once.
            assert await n2.terminate() == 0
            start = time.monotonic()
            await read()
            while "n2" in live or "n2" in owners.values():
                assert time.monotonic() - start < 3, "n2's keys stayed after its stop"
                await asyncio.sleep(0.05)
                await read()
            assert await n1.terminate() == 0

    asyncio.run(main())


def _sub(sub_id: str) -> Subscription:
    return Subscription("messages", database="app", subscription_id=sub_id)


def test_a_node_whose_etcd_dies_stops_before_its_lease_ttl(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    from streamer.client import StreamerClient

    ttl = 3

    async def main() -> None:
        n1 = node(tmp_path, etcd1, "n1", "--lease-ttl", str(ttl))
        async with n1:
            await until(lambda: "cluster: node n1" in n1.log(), 30, "n1 joined")
            async with StreamerClient(n1.address, gateway_id="gw", batch=False) as plain:
                await plain.subscribe("messages", database="app", subscription_id="s",
                                      timeout=30)
                await n1.puller.append(change(1))
                async with asyncio.timeout(30):
                    async for _ in plain.deliveries():
                        break
                etcd1.members[0].kill()
                killed = time.monotonic()
                code = await asyncio.to_thread(n1.proc.wait, 30)
                stopped = time.monotonic() - killed
            print(f"etcd killed: the node stopped after {stopped:.2f} s (lease TTL {ttl} s)")
            assert code == 1, n1.log()
            assert stopped < ttl, n1.log()
            assert "fenced: no etcd keepalive acknowledged" in n1.log()
            assert "NOT_SERVING and stops" in n1.log()

    asyncio.run(main())


def test_a_node_whose_lease_is_revoked_stops_with_exit_1(
    tmp_path: Path, etcd1: EtcdCluster
) -> None:
    # A membership failure (here the lease revoked behind the node's back:
    # its keepalive learns it is lost) is a failed supervised part.
    from streamer.cluster.etcd import EtcdClient

    async def main() -> None:
        n1 = node(tmp_path, etcd1, "n1")
        async with n1, EtcdClient(etcd1.endpoints) as etcd:
            await until(lambda: "cluster: node n1" in n1.log(), 30, "n1 joined")
            registration = await etcd.get(PREFIX + b"nodes/n1")
            assert registration is not None and registration.lease
            await etcd.lease_revoke(registration.lease)
            revoked = time.monotonic()
            code = await asyncio.to_thread(n1.proc.wait, 30)
            print(f"lease revoked: the node stopped after {time.monotonic() - revoked:.2f} s")
            assert code == 1, n1.log()
            assert "NOT_SERVING and stops" in n1.log()

    asyncio.run(main())
