"""Resuming subscriptions (``SubscribeRequest.resume_after``) end to end over
real gRPC on loopback: a ``StreamerNode`` fed by the ``PullerDouble``,
gateways as raw streams (docs/protocol.md, docs/delivery.md)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from prometheus_client.registry import CollectorRegistry
from puller_double import PullerDouble
from service_helpers import Service, until

from streamer.node.catchup import RESYNC_REQUIRED
from streamer.node.metrics import StreamerCollector
from streamer.node.node import NodeConfig, StreamerNode
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    StreamerMessage,
    SubscribeBatch,
    SubscribeRequest,
    SubscribeResponse,
    UnsubscribeRequest,
    Value,
)
from streamer.puller.log import ReplayLog
from streamer.puller.server import PullerServicer
from streamer.puller.server import add_to_server as add_puller

LIVE = "streamer"  # the live ingest's consumer id


def change(i: int, chat: str = "c") -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
        op_type="insert", full_doc=orjson.dumps({"chat": chat, "n": i}), timestamp=i,
    )


def request(sub_id: str, chat: str = "c", after: str = "") -> SubscribeRequest:
    return SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=[Filter(field="chat", op="==", value=Value(string_value=chat))],
        resume_after=after,
    )


def ids(first: int, last: int) -> list[str]:
    """The event ids e{first} … e{last}."""
    return [f"e{i}" for i in range(first, last + 1)]


class Gateway:
    """One gateway stream; everything the Streamer sends is kept in order."""

    def __init__(self, stub: sgrpc.StreamerServiceStub) -> None:
        self.call = stub.Stream()
        self.messages: list[StreamerMessage] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF:
                return
            self.messages.append(message)

    def responses(self) -> list[SubscribeResponse]:
        out: list[SubscribeResponse] = []
        for m in self.messages:
            if m.HasField("subscribe_response"):
                out.append(m.subscribe_response)
            elif m.HasField("subscribe_batch_response"):
                out.extend(m.subscribe_batch_response.responses)
        return out

    def events(self, sub_id: str) -> list[str]:
        """The event ids delivered to ``sub_id``, in order; and its first
        delivery comes after its response."""
        out: list[str] = []
        answered = False
        for m in self.messages:
            if m.HasField("subscribe_response"):
                answered |= m.subscribe_response.subscription_id == sub_id
            elif m.HasField("subscribe_batch_response"):
                answered |= any(
                    r.subscription_id == sub_id for r in m.subscribe_batch_response.responses)
            else:
                for d in m.batch.deliveries if m.HasField("batch") else [m.delivery]:
                    if sub_id in d.subscription_ids:
                        assert answered, f"{sub_id} got a delivery before its response"
                        out.append(d.event.event_id)
        return out

    def kinds(self) -> list[str]:
        """What each message was, in order (``delivery:<sub ids>``,
        ``caught_up:<sub ids>``, the payload's name otherwise)."""
        out: list[str] = []
        for m in self.messages:
            kind = m.WhichOneof("payload")
            if kind in ("delivery", "batch"):
                for d in m.batch.deliveries if kind == "batch" else [m.delivery]:
                    out.append(f"delivery:{','.join(d.subscription_ids)}:{d.event.event_id}")
            elif kind == "caught_up":
                out.append(f"caught_up:{','.join(m.caught_up.subscription_ids)}")
            elif kind == "catchup_progress":
                p = m.catchup_progress
                out.append(f"progress:{p.group}:{p.marker}:{p.merged_into}")
            else:
                out.append(str(kind))
        return out

    async def subscribe(self, req: SubscribeRequest) -> SubscribeResponse:
        before = len(self.responses())
        await self.call.write(GatewayMessage(subscribe=req))
        await until(lambda: len(self.responses()) > before)
        return self.responses()[before]

    async def subscribe_batch(self, *reqs: SubscribeRequest) -> list[SubscribeResponse]:
        before = len(self.responses())
        await self.call.write(GatewayMessage(subscribe_batch=SubscribeBatch(requests=reqs)))
        await until(lambda: len(self.responses()) >= before + len(reqs))
        return self.responses()[before:]

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


Scenario = Callable[[Service, sgrpc.StreamerServiceStub], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, *, batch: bool = True, **config: Any) -> None:
    async def main() -> None:
        service = Service(tmp_path / "state")
        service.puller = PullerDouble(batch=batch)
        service.config = dataclasses.replace(
            service.config, **{"catchup_confirm_seconds": 0.3, **config})
        async with service:
            async with grpc.aio.insecure_channel(service.target) as channel:
                await asyncio.wait_for(scenario(service, sgrpc.StreamerServiceStub(channel)), 60)

    asyncio.run(main())


async def appended(service: Service, first: int, last: int, chat: Callable[[int], str]) -> None:
    """Append e{first} … e{last} and wait until live ingest processed them."""
    await service.puller.append(*(change(i, chat(i)) for i in range(first, last + 1)))
    await until(lambda: service.node.ingest.last_change == f"p{last}")


def scrape(service: Service) -> dict[str, float]:
    """The node's unlabelled catch-up metrics, as Prometheus reads them."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamerCollector(service.node.ingest))
    return {
        sample.name: sample.value for family in registry.collect() for sample in family.samples
        if sample.name.startswith("streamer_catchup_")
    }


def settled(service: Service) -> Callable[[], bool]:
    """Every resuming subscription is in the live index, every group gone."""
    catchup = service.node.catchup
    return lambda: not catchup.groups and catchup.catching_up == 0


@pytest.mark.parametrize("batch", [True, False], ids=["SubscribeBatch", "Subscribe fallback"])
def test_catch_up_from_a_marker_then_live_without_a_gap(tmp_path: Path, batch: bool) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        chat = lambda i: "c1" if i % 3 else "c2"  # noqa: E731
        await appended(service, 0, 19, chat)
        gw = Gateway(stub)
        response = await gw.subscribe(request("s", "c1", after="p7"))
        assert (response.success, response.code, response.subscription_id) == (True, "", "s")
        expected = [f"e{i}" for i in range(8, 20) if chat(i) == "c1"]
        await until(lambda: gw.events("s") == expected)
        await until(settled(service))
        assert service.subscriptions.matcher_of("s") is service.node.matcher
        await appended(service, 20, 29, chat)
        expected += [f"e{i}" for i in range(20, 30) if chat(i) == "c1"]
        await until(lambda: len(gw.events("s")) >= len(expected))
        await asyncio.sleep(0.1)
        assert gw.events("s") == expected
        catchup = service.node.catchup
        assert catchup.handoffs == 1 and catchup.resyncs == 0
        assert catchup.replayed == 12  # e8 … e19, matching or not
        assert scrape(service) == {
            "streamer_catchup_readers": 0, "streamer_catchup_readers_reading": 0,
            "streamer_catchup_subscriptions": 0,
            "streamer_catchup_events_replayed_total": 12,
            "streamer_catchup_resyncs_total": 0, "streamer_catchup_late_refusals_total": 0,
            "streamer_catchup_handoffs_total": 1, "streamer_catchup_merges_total": 0,
            "streamer_catchup_paced_total": 0, "streamer_catchup_reader_failures_total": 0,
        }
        # The node's own marker never moved back for the replay.
        assert service.node.progress.marker == "p29"
        # Its own consumer id: one stream to confirm the marker, one to read.
        assert [s.consumer_id for s in service.puller.subscriptions[1:]] == [
            "streamer/catch-up-1"] * 2
        await gw.close()

    run(tmp_path, scenario, batch=batch)


def test_the_live_marker_registers_live_at_once(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 4, lambda i: "c")
        gw = Gateway(stub)
        response = await gw.subscribe(request("s", after="p4"))
        assert (response.success, response.code) == (True, "")
        assert service.subscriptions.matcher_of("s") is service.node.matcher
        await appended(service, 5, 6, lambda i: "c")
        await until(lambda: gw.events("s") == ids(5, 6))
        await until(settled(service))
        await gw.close()

    run(tmp_path, scenario)


@pytest.mark.parametrize("marker", ["bogus", "p99", "p1"], ids=["unknown", "ahead", "too old"])
def test_a_refused_marker_is_resync_required_and_live_from_the_head(
    tmp_path: Path, marker: str
) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 9, lambda i: "c")
        service.puller.forgotten = 5
        gw = Gateway(stub)
        response = await gw.subscribe(request("s", after=marker))
        assert (response.success, response.code, response.error) == (True, RESYNC_REQUIRED, "")
        assert service.subscriptions.matcher_of("s") is service.node.matcher
        await appended(service, 10, 11, lambda i: "c")
        await until(lambda: gw.events("s") == ids(10, 11))
        assert service.node.catchup.resyncs == 1
        await until(settled(service))
        await gw.close()

    run(tmp_path, scenario)


def test_many_subscriptions_with_many_markers_at_once(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        rng = random.Random(7)
        await appended(service, 0, 59, lambda i: "c")
        markers = {f"s{n}": rng.randrange(60) for n in range(120)}
        one, two = Gateway(stub), Gateway(stub)
        await one.call.write(GatewayMessage(hello=Hello(gateway_id="one", resumes=True)))
        reqs = [request(s, after=f"p{k}") for s, k in markers.items()]
        # Single subscribes, all sent before the first answer, on another stream.
        for r in reqs[100:]:
            await two.call.write(GatewayMessage(subscribe=r))
        responses = await one.subscribe_batch(*reqs[:100])
        assert [(r.subscription_id, r.success, r.code) for r in responses] == [
            (f"s{n}", True, "") for n in range(100)]
        await until(lambda: len(two.responses()) == 20)
        assert [(r.subscription_id, r.success, r.code) for r in two.responses()] == [
            (f"s{n}", True, "") for n in range(100, 120)]
        await appended(service, 60, 69, lambda i: "c")
        for sub_id, k in markers.items():
            gw = one if int(sub_id[1:]) < 100 else two
            await until(lambda gw=gw, sub_id=sub_id, k=k: len(gw.events(sub_id)) >= 69 - k)
        await until(settled(service))
        await asyncio.sleep(0.1)
        for sub_id, k in markers.items():
            gw = one if int(sub_id[1:]) < 100 else two
            assert gw.events(sub_id) == ids(k + 1, 69), sub_id
        catchup = service.node.catchup
        assert catchup.reading == 0 and catchup.resyncs == 0
        # Readers that met merged: fewer replays than markers.
        assert catchup.merges > 0
        # Each progress the resuming gateway was told is true when it comes:
        # every subscription of the group (and of the groups merged into
        # it) has had exactly its events up to that marker.
        group_of = {r.subscription_id: r.catchup_group for r in responses}
        members: dict[int, set[str]] = {}
        for sub_id, group in group_of.items():
            members.setdefault(group, set()).add(sub_id)
        received: dict[str, list[int]] = {sub_id: [] for sub_id in group_of}
        told = merged = 0
        for m in one.messages:
            if m.HasField("catchup_progress"):
                p = m.catchup_progress
                upto = int(p.marker[1:])
                for sub_id in members.get(p.group, ()):
                    assert received[sub_id] == list(range(markers[sub_id] + 1, upto + 1))
                told += 1
                if p.merged_into:
                    merged += 1
                    members.setdefault(p.merged_into, set()).update(members.pop(p.group, ()))
            for d in m.batch.deliveries if m.HasField("batch") else (
                    [m.delivery] if m.HasField("delivery") else []):
                for sub_id in d.subscription_ids:
                    received[sub_id].append(int(d.event.event_id[1:]))
        assert told > 0 and merged > 0
        assert not any(m.HasField("catchup_progress") for m in two.messages)  # no Hello
        await one.close()
        await two.close()

    run(tmp_path, scenario, max_catchup_readers=2)


def test_more_markers_than_confirmations_at_once(tmp_path: Path) -> None:
    # 150 distinct markers in one batch: at most 64 streams ask the Puller
    # at once, the others wait for a place (or the confirm timer); each
    # subscription still gets exactly the events after its own marker.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 199, lambda i: "c")
        markers = random.Random(3).sample(range(199), 150)
        gw = Gateway(stub)
        responses = await gw.subscribe_batch(
            *(request(f"s{k}", after=f"p{k}") for k in markers))
        assert all(r.success and r.code == "" for r in responses)
        await appended(service, 200, 201, lambda i: "c")
        await until(lambda: all(len(gw.events(f"s{k}")) >= 201 - k for k in markers), 30)
        await until(settled(service))
        for k in markers:
            assert gw.events(f"s{k}") == ids(k + 1, 201), k
        await gw.close()

    run(tmp_path, scenario)


def test_resume_while_live_traffic_flows(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        service.puller.batch_size = 3
        await appended(service, 0, 99, lambda i: "c")
        total = 600

        async def traffic() -> None:
            for start in range(100, total, 5):
                await service.puller.append(*(change(i) for i in range(start, start + 5)))
                await asyncio.sleep(0.002)

        writer = asyncio.create_task(traffic())
        gw = Gateway(stub)
        starts: dict[str, int] = {}
        for n in range(12):
            await asyncio.sleep(0.01)
            k = random.Random(n).randrange(90)
            starts[f"s{n}"] = k
            assert (await gw.subscribe(request(f"s{n}", after=f"p{k}"))).success
        await writer
        await until(lambda: service.node.ingest.last_change == f"p{total - 1}")
        await until(lambda: all(len(gw.events(s)) >= total - 1 - k for s, k in starts.items()))
        await until(settled(service))
        await asyncio.sleep(0.1)
        for sub_id, k in starts.items():
            assert gw.events(sub_id) == ids(k + 1, total - 1), sub_id
        await gw.close()

    run(tmp_path, scenario)


def test_a_gateway_resumes_after_a_streamer_restart(tmp_path: Path) -> None:
    # The gateway remembers the progress of the last event it delivered;
    # events appended while the Streamer is down, and the ones the restarted
    # Streamer replays after its saved marker, reach it exactly once.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        gw = Gateway(stub)
        assert (await gw.subscribe(request("s"))).success
        await appended(service, 0, 4, lambda i: "c")
        await until(lambda: gw.events("s") == ids(0, 4))
        last = [m.delivery.event.progress for m in gw.messages if m.HasField("delivery")][-1]
        assert last == "p4"
        await service.stop()
        await gw.close()
        await service.puller.append(*(change(i) for i in range(5, 10)))
        await service.start()
        async with grpc.aio.insecure_channel(service.target) as channel:
            again = Gateway(sgrpc.StreamerServiceStub(channel))
            assert (await again.subscribe(request("s", after=last))).code == ""
            await appended(service, 10, 11, lambda i: "c")
            await until(lambda: len(again.events("s")) >= 7)
            await until(settled(service))
            await asyncio.sleep(0.1)
            assert again.events("s") == ids(5, 11)
            await again.close()

    run(tmp_path, scenario)


def test_the_replay_is_paced_by_the_gateway_queue(tmp_path: Path) -> None:
    # 2000 replayed events for a gateway whose queue holds 60 messages: the
    # reader waits for it to drain instead of getting it cut off as lagging.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        service.puller.batch_size = 20
        await appended(service, 0, 1999, lambda i: "c")
        gw = Gateway(stub)
        assert (await gw.subscribe(request("s", after="p0"))).success
        await until(lambda: len(gw.events("s")) >= 1999, timeout=30)
        assert gw.events("s") == ids(1, 1999)
        assert service.servicer.lagging_cut_offs == 0
        assert service.node.catchup.paced > 0
        await gw.close()

    run(tmp_path, scenario, gateway_queue=60)


def test_live_latency_while_a_catch_up_runs(tmp_path: Path) -> None:
    # A gateway replays 20 000 events (readers from several markers) while
    # another one gets live events: each live event still arrives promptly.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        service.puller.events.extend(change(i, "old") for i in range(20_000))
        await appended(service, 20_000, 20_000, lambda i: "old")
        live = Gateway(stub)
        assert (await live.subscribe(request("live", "new"))).success
        replay = Gateway(stub)
        await replay.call.write(GatewayMessage(hello=Hello(gateway_id="r", batch_delivery=True)))
        markers = [f"p{k}" for k in range(0, 20_000, 2_500)]
        await replay.subscribe_batch(*(request(f"r{n}", "old", after=m)
                                       for n, m in enumerate(markers)))
        loop = asyncio.get_running_loop()
        delays = []
        for i in range(20_001, 20_041):
            sent = loop.time()
            await service.puller.append(change(i, "new"))
            await until(lambda i=i: f"e{i}" in live.events("live"))
            delays.append(loop.time() - sent)
            await asyncio.sleep(0.005)
        await until(settled(service), timeout=60)
        assert replay.events("r0") == ids(1, 20_000)
        delays.sort()
        print(f"live delivery while catching up: median {delays[20] * 1000:.1f} ms, "
              f"max {delays[-1] * 1000:.1f} ms; replayed {service.node.catchup.replayed}")
        # Generous: a shared two-core machine; the replay alone takes seconds.
        assert delays[20] < 0.1
        await live.close()
        await replay.close()

    run(tmp_path, scenario)


def test_a_marker_ahead_of_the_live_ingest(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        puller = service.puller
        await appended(service, 0, 2, lambda i: "c")
        puller.hold(LIVE)
        await puller.append(*(change(i) for i in range(3, 10)))
        gw = Gateway(stub)
        # p5: events follow it (the reader's first message confirms); p9:
        # nothing follows yet, and the double says nothing: accepted after
        # catchup_confirm_seconds.
        assert (await gw.subscribe(request("a", after="p5"))).code == ""
        assert (await gw.subscribe(request("b", after="p9"))).code == ""
        await until(lambda: gw.events("a") == ids(6, 9))
        assert service.node.ingest.last_change == "p2"
        assert gw.events("b") == []
        puller.release(LIVE)
        await until(lambda: service.node.ingest.last_change == "p9")
        await appended(service, 10, 11, lambda i: "c")
        await until(lambda: gw.events("a") == ids(6, 11) and gw.events("b") == ids(10, 11))
        await until(settled(service))
        await asyncio.sleep(0.1)
        assert (gw.events("a"), gw.events("b")) == (ids(6, 11), ids(10, 11))
        await gw.close()

    run(tmp_path, scenario)


def test_twenty_groups_two_readers_and_live_held_behind(tmp_path: Path) -> None:
    # Live ingest held behind every marker, two readers for twenty groups:
    # the readers take over the groups they pass, reach the head, and one
    # live batch hands whatever is left over to live ingest.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        puller = service.puller
        await appended(service, 0, 2, lambda i: "c")
        puller.hold(LIVE)
        await puller.append(*(change(i) for i in range(3, 60)))
        markers = random.Random(5).sample(range(3, 59), 20)
        gw = Gateway(stub)
        responses = await gw.subscribe_batch(*(request(f"s{k}", after=f"p{k}") for k in markers))
        assert all(r.success and r.code == "" for r in responses)
        await until(lambda: all(gw.events(f"s{k}") == ids(k + 1, 59) for k in markers))
        assert service.node.catchup.handoffs == 0
        assert service.node.catchup.reading <= 2
        puller.release(LIVE)
        await appended(service, 60, 61, lambda i: "c")
        await until(lambda: all(len(gw.events(f"s{k}")) >= 61 - k for k in markers))
        await until(settled(service))
        await asyncio.sleep(0.1)
        for k in markers:
            assert gw.events(f"s{k}") == ids(k + 1, 61), k
        catchup = service.node.catchup
        assert catchup.merges > 0 and catchup.handoffs >= 1
        await gw.close()

    run(tmp_path, scenario, max_catchup_readers=2)


def test_unsubscribe_and_departure_during_catch_up(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        puller, subscriptions = service.puller, service.subscriptions
        await appended(service, 0, 2, lambda i: "c")
        puller.hold(LIVE)  # the catch-up cannot hand over while live is held behind
        await puller.append(*(change(i) for i in range(3, 10)))
        one, two = Gateway(stub), Gateway(stub)
        for sub_id in ("s1", "s2"):
            assert (await one.subscribe(request(sub_id, after="p4"))).success
        assert (await two.subscribe(request("s3", after="p4"))).success
        await until(lambda: one.events("s2") == ids(5, 9) and two.events("s3") == ids(5, 9))
        assert service.node.catchup.catching_up == 3
        await one.call.write(GatewayMessage(unsubscribe=UnsubscribeRequest(subscription_id="s1")))
        await until(lambda: "s1" not in subscriptions)
        await two.close()
        await until(lambda: "s3" not in subscriptions)
        assert service.node.catchup.catching_up == 1
        # Their ids are free again, anywhere.
        assert (await one.subscribe(request("s3"))).success
        puller.release(LIVE)
        await appended(service, 10, 11, lambda i: "c")
        # s3, now plain, starts with what live ingest processes next (it was held at p2).
        await until(lambda: one.events("s2") == ids(5, 11) and one.events("s3") == ids(3, 11))
        await until(settled(service))
        assert one.events("s1") == ids(5, 9)
        assert subscriptions.ids() == {"s2", "s3"}
        await one.close()

    run(tmp_path, scenario)


def test_a_subscribe_batch_mixing_resuming_and_plain_requests(tmp_path: Path) -> None:
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 9, lambda i: "c")
        gw = Gateway(stub)
        responses = await gw.subscribe_batch(
            request("a"), request("b", after="p3"), request("a", after="p3"),
            request("c", after="bogus"), request("d", after="p7"), request("e", after="p9"),
        )
        assert [(r.subscription_id, r.success, r.code) for r in responses] == [
            ("a", True, ""), ("b", True, ""), ("a", False, "already_exists"),
            ("c", True, RESYNC_REQUIRED), ("d", True, ""), ("e", True, ""),
        ]
        assert len([m for m in gw.messages if m.HasField("subscribe_batch_response")]) == 1
        await appended(service, 10, 11, lambda i: "c")
        await until(lambda: gw.events("b") == ids(4, 11) and gw.events("d") == ids(8, 11))
        await until(settled(service))
        await asyncio.sleep(0.1)
        assert gw.events("a") == gw.events("c") == gw.events("e") == ids(10, 11)
        assert (gw.events("b"), gw.events("d")) == (ids(4, 11), ids(8, 11))
        await gw.close()

    run(tmp_path, scenario)


def test_a_silent_puller_that_refuses_later_continues_from_the_live_head(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The double says nothing to the reader (held): the marker is taken as
    # accepted after catchup_confirm_seconds. When the reader reconnects
    # (the Puller restarted) its marker is past the retention: logged,
    # counted, and the subscription continues from the live head.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 9, lambda i: "c")
        service.puller.hold("streamer/catch-up-1")
        gw = Gateway(stub)
        await gw.call.write(GatewayMessage(hello=Hello(gateway_id="gw", resumes=True)))
        response = await gw.subscribe(request("s", after="p4"))
        assert (response.success, response.code) == (True, "")
        assert service.subscriptions.matcher_of("s") is not service.node.matcher
        old = service.puller
        await old.stop()
        service.puller = PullerDouble()
        service.puller.events = list(old.events)
        service.puller.forgotten = 8
        await service.puller.start_on(old.port)
        await until(lambda: service.subscriptions.matcher_of("s") is service.node.matcher)
        catchup = service.node.catchup
        assert (catchup.late_refusals, catchup.resyncs) == (1, 1)
        got = scrape(service)
        assert (got["streamer_catchup_late_refusals_total"],
                got["streamer_catchup_resyncs_total"]) == (1, 1)
        assert "events in between are LOST" in caplog.text
        # The gateway is told: it must resync the subscription.
        await until(lambda: any(m.HasField("caught_up") for m in gw.messages))
        [told] = [m.caught_up for m in gw.messages if m.HasField("caught_up")]
        assert (list(told.subscription_ids), told.resync_required) == (["s"], True)
        await until(lambda: len(service.puller.subscriptions) >= 2)  # live ingest is back
        await appended(service, 10, 11, lambda i: "c")
        await until(lambda: gw.events("s") == ids(10, 11))
        await until(settled(service))
        await gw.close()

    run(tmp_path, scenario)


def test_the_reference_puller_accepts_a_marker_at_once(tmp_path: Path) -> None:
    # It sends a heartbeat as soon as a stream opens with a marker: a resume
    # with nothing to replay yet is answered without waiting out
    # catchup_confirm_seconds (30 s here).
    async def main() -> None:
        log = ReplayLog(tmp_path / "log")
        puller = PullerServicer(log, heartbeat=30)
        server = grpc.aio.server()
        add_puller(puller, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await puller.append([(change(i), b"") for i in range(1, 6)])
        # Live ingest starts at the head: it has processed no change yet.
        node = StreamerNode(NodeConfig(
            puller=f"127.0.0.1:{port}", listen=("127.0.0.1", 0), state_dir=tmp_path / "state",
            resume_grace=0, drain_seconds=0, puller_backoff=(0.01, 0.05),
            catchup_confirm_seconds=30,
        ))
        await node.start()
        try:
            async with grpc.aio.insecure_channel(node.address) as channel:
                gw = Gateway(sgrpc.StreamerServiceStub(channel))
                async with asyncio.timeout(5):
                    head = await gw.subscribe(request("head", after=log.marker(5)))
                    back = await gw.subscribe(request("back", after=log.marker(2)))
                assert (head.success, head.code, back.success, back.code) == (True, "", True, "")
                await until(lambda: gw.events("back") == ids(3, 5))
                await puller.append([(change(6), b"")])
                await until(lambda: gw.events("head") == ids(6, 6))
                await until(lambda: gw.events("back") == ids(3, 6))
                await until(lambda: not node.catchup.groups)
                await gw.close()
        finally:
            await node.stop()
            await server.stop(grace=0)
            log.close()

    asyncio.run(main())


def test_a_resuming_gateway_learns_live_after_and_caught_up(tmp_path: Path) -> None:
    # Hello.resumes: every answer that registers live says after which
    # marker (live_after), and resumed subscriptions are named by a
    # caught_up once they are live: after their last replayed delivery,
    # before their first live one. Without it, neither is sent.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 19, lambda i: "c")
        gw = Gateway(stub)
        await gw.call.write(GatewayMessage(hello=Hello(gateway_id="gw", resumes=True)))
        plain = await gw.subscribe(request("a"))
        assert (plain.success, plain.live_after) == (True, "p19")
        await gw.call.write(GatewayMessage(subscribe_batch=SubscribeBatch(
            requests=[request("b"), request("s", after="p9"), request("t", after="p19")])))
        await until(lambda: any(m.HasField("subscribe_batch_response") for m in gw.messages))
        batch = next(m for m in gw.messages if m.HasField("subscribe_batch_response"))
        answers = batch.subscribe_batch_response
        assert answers.live_after == "p19"
        # Resuming at the live marker: live at once, and said so; resuming
        # from a replay: in a catch-up group, live later (caught_up).
        assert [(r.subscription_id, r.live_after, bool(r.catchup_group))
                for r in answers.responses] == [
            ("b", "", False), ("s", "", True), ("t", "p19", False)]
        group = answers.responses[1].catchup_group
        await until(settled(service))
        await appended(service, 20, 21, lambda i: "c")
        await until(lambda: gw.events("s") == ids(10, 21))
        kinds = gw.kinds()
        caught_up = kinds.index("caught_up:s")
        # The last replayed delivery, then the group's progress up to it.
        assert kinds[caught_up - 2:caught_up] == ["delivery:s:e19", f"progress:{group}:p19:0"]
        assert kinds[caught_up + 1:] == ["delivery:a,b,t,s:e20", "delivery:a,b,t,s:e21"]
        await gw.close()

        other = Gateway(stub)
        await other.call.write(GatewayMessage(hello=Hello(gateway_id="other")))
        assert (await other.subscribe(request("x"))).live_after == ""
        assert (await other.subscribe(request("y", after="p15"))).success
        await until(settled(service))
        await appended(service, 22, 22, lambda i: "c")
        await until(lambda: other.events("y") == ids(16, 22))
        assert not any(k.startswith(("caught_up", "progress")) for k in other.kinds())
        await other.close()

    run(tmp_path, scenario)


def test_heartbeats_are_acked_while_a_resuming_subscribe_waits(tmp_path: Path) -> None:
    # A silent Puller: the marker is accepted only when the confirm timer
    # runs out. Meanwhile the stream's heartbeats are acked; its later
    # registrations (an unsubscribe of the waiting one) keep their order.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 9, lambda i: "c")
        service.puller.hold("streamer/catch-up-1")
        gw = Gateway(stub)
        await gw.call.write(GatewayMessage(subscribe=request("s", after="p4")))
        await gw.call.write(GatewayMessage(heartbeat=Heartbeat(gateway_id="gw", timestamp=7)))
        await gw.call.write(GatewayMessage(
            unsubscribe=UnsubscribeRequest(subscription_id="s")))
        await until(lambda: "heartbeat_ack" in gw.kinds(), 1.5)
        assert gw.responses() == []  # the confirm timer is 3 s
        await until(lambda: len(gw.responses()) == 1, 10)
        assert gw.kinds() == ["heartbeat_ack", "subscribe_response"]
        await until(lambda: "s" not in service.subscriptions)
        await gw.close()

    run(tmp_path, scenario, catchup_confirm_seconds=3.0)


def test_consecutive_batches_after_one_marker_make_one_replay(tmp_path: Path) -> None:
    # A gateway re-registering sends its subscriptions with one marker in
    # many subscribe_batches, one after the other: they join one group,
    # whose reader replays the events after the marker once.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 99, lambda i: "c")
        gw = Gateway(stub)
        for b in range(5):
            responses = await gw.subscribe_batch(
                *(request(f"s{b}-{i}", after="p49") for i in range(20)))
            assert all(r.success and r.code == "" for r in responses)
        await until(settled(service))
        subs = [f"s{b}-{i}" for b in range(5) for i in range(20)]
        await until(lambda: all(len(gw.events(sub)) >= 50 for sub in subs))
        for sub in subs:
            assert gw.events(sub) == ids(50, 99)
        catchup = service.node.catchup
        assert (catchup.replayed, catchup.handoffs, catchup.merges) == (50, 1, 0)
        await gw.close()

    run(tmp_path, scenario)


def test_a_reader_takes_over_a_larger_group_by_moving_its_own(tmp_path: Path) -> None:
    # One reader at a time: the small group after p10 reads first and meets
    # the 1,200 subscriptions waiting after p50, more than it may move in
    # one step; it takes over their index instead and moves its own 5 in.
    async def scenario(service: Service, stub: sgrpc.StreamerServiceStub) -> None:
        await appended(service, 0, 99, lambda i: "c")
        gw = Gateway(stub)
        small = [request(f"a{i}", after="p10") for i in range(5)]
        large = [request(f"b{i}", after="p50") for i in range(1200)]
        await gw.subscribe_batch(*small)
        await gw.subscribe_batch(*large)
        await until(settled(service), 30)
        subs = {r.subscription_id: 10 for r in small} | {r.subscription_id: 50 for r in large}
        await until(lambda: all(len(gw.events(s)) >= 99 - k for s, k in subs.items()), 30)
        for sub_id, k in subs.items():
            assert gw.events(sub_id) == ids(k + 1, 99), sub_id
        catchup = service.node.catchup
        assert (catchup.merges, catchup.replayed) == (1, 89)  # e11 … e99, once
        await gw.close()

    run(tmp_path, scenario, max_catchup_readers=1)
