"""JSON log lines (`--log-format json`): the formatter, and `streamer serve`."""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import signal
import subprocess
from pathlib import Path

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import serve_command, serving

from streamer.logs import GrpcTeardownFilter, JsonFormatter


def _record_lines(emit: object) -> list[dict[str, object]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("streamer.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        assert callable(emit)
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_formatter_fields_extras_and_exception() -> None:
    def emit(logger: logging.Logger) -> None:
        try:
            raise ValueError("bad event")
        except ValueError:
            logger.exception(
                "poison event %s", "e7",
                extra={"event_id": "e7", "count": 3, "path": Path("/x"), "level": "mine",
                       "huge": 2**70, "nested": {1: "a"}},
            )
        logger.info("plain")

    failed, plain = _record_lines(emit)
    assert failed["level"] == "ERROR"  # an extra does not override the record's fields
    assert failed["logger"] == "streamer.test_logs"
    assert failed["msg"] == "poison event e7"
    assert (failed["event_id"], failed["count"], failed["path"]) == ("e7", 3, "/x")
    assert failed["huge"] == 2**70 and failed["nested"] == {"1": "a"}
    exc = failed["exc"]
    assert isinstance(exc, str)
    assert exc.startswith("Traceback") and exc.endswith("ValueError: bad event")
    ts = failed["ts"]
    assert isinstance(ts, str) and ts.endswith("Z")
    when = datetime.datetime.fromisoformat(ts)
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - when) < datetime.timedelta(minutes=1)
    assert set(plain) == {"ts", "level", "logger", "msg"}
    assert (plain["level"], plain["msg"]) == ("INFO", "plain")


def test_help_documents_log_format() -> None:
    out = subprocess.run(serve_command("--help"), capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert "--log-format" in out


def test_serve_logs_one_json_object_per_line(tmp_path: Path) -> None:
    async def main() -> list[dict[str, object]]:
        async with serving(tmp_path, "--log-format", "json") as served:
            async with grpc.aio.insecure_channel(served.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                status = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10)
                assert status.status == health_pb2.HealthCheckResponse.SERVING
            served.proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(served.proc.wait, 30) == 0
            return [orjson.loads(line) for line in served.log().splitlines()]

    lines = asyncio.run(asyncio.wait_for(main(), 120))
    assert lines
    for line in lines:
        assert {"ts", "level", "logger", "msg"} <= set(line)
        assert isinstance(line["ts"], str)
        datetime.datetime.fromisoformat(line["ts"])
    messages = [line["msg"] for line in lines]
    assert any(str(m).startswith("serving on 127.0.0.1:") for m in messages)
    assert any(str(m).startswith("stopped at marker") for m in messages)
    assert {line["logger"] for line in lines} >= {"streamer"}


def test_grpcs_teardown_error_becomes_one_info_line() -> None:
    record = logging.LogRecord(
        "grpc._cython.cygrpc", logging.ERROR, __file__, 1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/syntrix.streamer.v1.StreamerService/Stream",), (RuntimeError, RuntimeError("x"), None),
    )
    assert GrpcTeardownFilter().filter(record)
    assert (record.levelname, record.exc_info) == ("INFO", None)
    assert record.getMessage() == (
        "a stream's final status could not be sent: its peer had gone "
        "(/syntrix.streamer.v1.StreamerService/Stream)")
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "other", (), None)
    assert GrpcTeardownFilter().filter(other) and other.levelname == "ERROR"
