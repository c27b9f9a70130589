"""Shared-token authentication over real gRPC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamer.matching.matcher import Matcher
from streamer.node.auth import TokenAuth, TokenFileError, read_token
from streamer.node.server import StreamerServicer, add_to_server
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import GatewayMessage, Heartbeat


def test_token_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read token file"):
        read_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(TokenFileError, match="is empty"):
        read_token(tmp_path / "empty")
    (tmp_path / "token").write_text("s3cret\n")
    assert read_token(tmp_path / "token") == b"s3cret"


@pytest.mark.parametrize(
    ("metadata", "allowed"),
    [
        ((), False),
        ((("authorization", "Bearer nope"),), False),
        ((("authorization", "s3cret"),), False),
        ((("authorization", "Bearer s3cret"),), True),
    ],
)
def test_only_the_right_bearer_token_gets_in(
    metadata: tuple[tuple[str, str], ...], allowed: bool
) -> None:
    async def main() -> None:
        server = grpc.aio.server(interceptors=[TokenAuth(b"s3cret")])
        add_to_server(StreamerServicer(Sessions(SubscriptionSet(Matcher()))), server)
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                # Health stays open for probes without credentials.
                probe = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest()
                )
                assert probe.status == health_pb2.HealthCheckResponse.SERVING
                call = sgrpc.StreamerServiceStub(channel).Stream(metadata=metadata)
                message = GatewayMessage(heartbeat=Heartbeat(timestamp=5))
                if allowed:
                    await call.write(message)
                    assert (await call.read()).heartbeat_ack.timestamp == 5
                    call.cancel()
                else:
                    # The refusal may land before or after the write.
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call.write(message)
                        await call.read()
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await server.stop(grace=0)

    asyncio.run(asyncio.wait_for(main(), 30))
