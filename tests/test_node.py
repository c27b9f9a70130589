"""StreamerNode: start-up refusals, supervision of its background tasks,
and the refused-marker policy (in-process and as ``streamer serve``)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from puller_double import PullerDouble
from service_helpers import ServeProcess, free_port, until

from streamer.errors import StreamerError
from streamer.locking import DirectoryInUse
from streamer.node.node import NodeConfig, StreamerNode
from streamer.protocol import puller_v1_pb2 as pb
from streamer.transport import ListenError

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health_of(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        checks = health_pb2_grpc.HealthStub(channel)
        reply = await checks.Check(health_pb2.HealthCheckRequest(service=""))
        return int(reply.status)


def config(tmp_path: Path, puller: str, **changes: object) -> NodeConfig:
    base = NodeConfig(puller=puller, listen=("127.0.0.1", 0), state_dir=tmp_path / "state",
                      drain_seconds=0, puller_backoff=(0.01, 0.05))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class FailingSweeper(StreamerNode):
    """A node with a bug in one background task (we cannot make the real
    sweeper fail on purpose)."""

    async def _sweep(self) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("a bug in the sweeper")


def test_a_failed_background_task_makes_the_node_not_serving_and_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        node = FailingSweeper(config(tmp_path, target))
        try:
            await node.start()
            assert await health_of(node.address) == SERVING
            await asyncio.wait_for(node.wait(), 10)
            assert node.failure == "sweeper failed: RuntimeError('a bug in the sweeper')"
            await until(lambda: node.failure is not None)
            assert await health_of(node.address) == NOT_SERVING
        finally:
            await node.stop()
            await puller.stop()

    asyncio.run(main())
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0].getMessage() == "background task sweeper failed"
    assert errors[0].exc_info is not None  # with its traceback
    assert "the node is NOT_SERVING and stops" in errors[1].getMessage()


def test_start_refusals_leave_nothing_running(tmp_path: Path) -> None:
    async def main() -> None:
        first = StreamerNode(config(tmp_path, "127.0.0.1:1"))
        await first.start()
        try:
            # Another node on the same state directory.
            with pytest.raises(DirectoryInUse):
                await StreamerNode(config(tmp_path, "127.0.0.1:1")).start()
            # Another node on the same port: refused, and its state directory
            # is free again afterwards.
            busy = StreamerNode(config(tmp_path, "127.0.0.1:1", state_dir=tmp_path / "other",
                                       listen=("127.0.0.1", first.port)))
            with pytest.raises(ListenError, match="the port is in use"):
                await busy.start()
            again = StreamerNode(config(tmp_path, "127.0.0.1:1", state_dir=tmp_path / "other"))
            await again.start()
            await again.stop()
        finally:
            await first.stop()
        assert issubclass(DirectoryInUse, StreamerError) and issubclass(ListenError, StreamerError)

    asyncio.run(main())


def _saved(state: Path, marker: str) -> None:
    state.mkdir(parents=True)
    (state / "progress.json").write_bytes(
        orjson.dumps({"marker": marker, "gateways": [], "others": 0}))


def test_serve_stops_with_exit_1_when_the_puller_refuses_its_marker(tmp_path: Path) -> None:
    """The default policy fails closed: no event is skipped silently."""
    _saved(tmp_path / "state", "p99")  # a marker the Puller does not know

    async def main() -> None:
        async with ServeProcess(tmp_path, "--resume-grace", "0") as serve:
            assert await asyncio.to_thread(serve.proc.wait, 30) == 1
            log = serve.log()
            assert "ingest stopped: the Puller refused marker 'p99'" in log
            assert "the node is NOT_SERVING and stops" in log
            assert "Traceback" not in log
            assert [s.after for s in serve.puller.subscriptions] == ["p99"]

    asyncio.run(main())
    assert orjson.loads((tmp_path / "state" / "progress.json").read_bytes())["marker"] == "p99"


def test_serve_resumes_from_the_head_only_when_told_to(tmp_path: Path) -> None:
    _saved(tmp_path / "state", "p99")

    async def main() -> None:
        async with ServeProcess(tmp_path, "--resume-grace", "0",
                                "--on-marker-refused", "resume-from-head") as serve:
            await until(lambda: [s.after for s in serve.puller.subscriptions] == ["p99", ""], 30)
            await serve.puller.append(pb.ChangeEvent(
                event_id="e0", database="app", mgo_coll="m", mgo_doc_id="d", op_type="insert",
                full_doc=b"{}"))
            await until(lambda: b'"p0"' in (tmp_path / "state" / "progress.json").read_bytes(),
                        30)
            assert serve.proc.poll() is None
            assert await serve.terminate() == 0
            assert "events in between are LOST" in serve.log()

    asyncio.run(main())


def test_a_port_free_again_after_stop(tmp_path: Path) -> None:
    async def main() -> None:
        port = free_port()
        for _ in range(2):
            node = StreamerNode(config(tmp_path, "127.0.0.1:1", listen=("127.0.0.1", port)))
            await node.start()
            assert node.port == port
            await node.stop()

    asyncio.run(main())


def test_a_node_serving_some_collections(tmp_path: Path) -> None:
    # --collections: the Puller is asked for those only, a subscription to
    # another is refused with not_owner, the served ones are delivered.
    from streamer.client import StreamerClient
    from streamer.errors import SubscriptionRejected

    def change(k: int, coll: str) -> pb.ChangeEvent:
        return pb.ChangeEvent(
            event_id=f"e{k}", database="app", mgo_coll=coll, mgo_doc_id=f"d{k}",
            op_type="insert", full_doc=b"{}")

    async def main() -> None:
        async with ServeProcess(tmp_path, "--collections", "messages,chats") as serve:
            puller = serve.puller
            await until(lambda: len(puller.subscriptions) == 1, 30)
            assert list(puller.subscriptions[0].collections) == ["messages", "chats"]
            async with StreamerClient(serve.address, gateway_id="gw") as client:
                with pytest.raises(SubscriptionRejected) as refused:
                    await client.subscribe("users", database="app", subscription_id="u",
                                           timeout=30)
                assert refused.value.code == "not_owner"
                assert "not served by this node, which serves chats, messages" in str(
                    refused.value)
                await client.subscribe("messages", database="app", subscription_id="m",
                                       timeout=30)
                await puller.append(change(0, "users"), change(1, "messages"))
                got = []
                async with asyncio.timeout(30):
                    async for delivery in client.deliveries():
                        got.append((delivery.event.event_id, list(delivery.subscription_ids)))
                        break
                assert got == [("e1", ["m"])]
            assert serve.proc.poll() is None

    asyncio.run(main())
