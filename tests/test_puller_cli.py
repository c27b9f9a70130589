"""``streamer puller`` as a real process, consumed over gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
from service_helpers import (
    free_port,
    puller_command,
    puller_events,
    refusal,
    start_puller,
    stop_puller,
)

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc
from streamer.puller.log import ReplayLog
from streamer.puller.sources import from_json_line, to_json_line
from streamer.tools.workload import Workload, change_event


def position(marker: str) -> int:  # the test knows the marker's shape; clients do not
    return int(marker.rsplit(":", 1)[1])


def test_workload_serves_restarts_and_resumes(tmp_path: Path) -> None:
    port = free_port()
    proc = start_puller(tmp_path, port, "--workload", "chat", "--rate", "2000")
    try:
        first = asyncio.run(puller_events(port, "", 200))
        positions = [position(e.progress) for e in first]
        assert positions == list(range(positions[0], positions[0] + 200))
        assert stop_puller(proc) == 0
        log = (tmp_path / "puller-0.log").read_text()
        assert "stopped at position" in log, log
        # The same log after a restart: positions go on, `after` still works.
        proc = start_puller(tmp_path, port, "--workload", "chat", "--rate", "2000", run="1")
        again = asyncio.run(puller_events(port, first[99].progress, 300))
        assert again[:100] == first[100:]
        assert [position(e.progress) for e in again] == list(
            range(positions[100], positions[100] + 300))
        # The seeded stream continued where the log ended, without repeats.
        assert len({e.change_event.event_id for e in again}) == 300
        assert stop_puller(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_replay_and_record(tmp_path: Path) -> None:
    specs = list(Workload(1000, seed=3).events(50))
    original = [change_event(spec, i, timestamp=1_700_000_000_000 + i)
                for i, spec in enumerate(specs)]
    original[7].cluster_time.t, original[7].cluster_time.i = 1_700_000_000, 3
    replay = tmp_path / "in.jsonl"
    lines = [to_json_line(e) for e in original]
    # One bad line among them: reported with its number and skipped.
    replay.write_bytes(b"".join(lines[:10]) + b"{not json\n" + b"\n" + b"".join(lines[10:]))
    record = tmp_path / "out.jsonl"
    port = free_port()
    proc = start_puller(tmp_path, port, "--replay", str(replay), "--record", str(record))
    try:
        got = asyncio.run(puller_events(port, before_everything(tmp_path), 50))
        assert [e.change_event for e in got] == original
        assert stop_puller(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log = (tmp_path / "puller-0.log").read_text()
    assert "in.jsonl:11: skipped: not JSON" in log, log
    assert record.read_bytes() == b"".join(lines)
    assert [from_json_line(line) for line in record.read_bytes().splitlines()] == original


def test_the_recording_holds_every_logged_event_after_sigterm(tmp_path: Path) -> None:
    # Fast enough that SIGTERM lands while a batch is being appended.
    record = tmp_path / "out.jsonl"
    proc = start_puller(tmp_path, free_port(), "--workload", "chat", "--rate", "50000",
                        "--record", str(record))
    try:
        for _ in range(200):
            if record.exists() and record.stat().st_size > 100_000:
                break
            time.sleep(0.05)
        assert stop_puller(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    replay_log = ReplayLog(tmp_path / "log")
    try:
        logged = [to_json_line(r.event) for r in replay_log.read(0, 10**9)]
    finally:
        replay_log.close()
    recorded = record.read_bytes().splitlines(keepends=True)
    assert len(recorded) > 100
    assert recorded == logged


def before_everything(tmp_path: Path) -> str:
    """The marker before the first event of the process's log (the test
    knows the marker's shape; clients do not need to)."""
    log_id = tmp_path / "log" / "LOG_ID"
    for _ in range(200):
        if log_id.exists():
            return f"v1:{log_id.read_text().strip()}:0"
        time.sleep(0.05)
    raise AssertionError(f"{log_id} never appeared")


def test_bad_flags_exit_2(tmp_path: Path) -> None:
    cases = [
        ([], "exactly one source"),
        (["--workload", "chat", "--replay", __file__], "not allowed with argument"),
        (["--workload", "other"], "must be one of chat, not 'other'"),
        (["--replay", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--workload", "chat", "--rate", "0"], "argument --rate: must be greater than 0"),
        (["--workload", "chat", "--retention-bytes", "lots"], "not an integer: 'lots'"),
    ]
    for args, message in cases:
        proc = subprocess.run(puller_command(*args), capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    proc = subprocess.run(
        puller_command("--workload", "chat", "--listen", f"127.0.0.1:{free_port()}",
                       "--log-dir", str(tmp_path / "log"),
                       "--record", str(tmp_path / "missing" / "out.jsonl")),
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2 and "cannot write --record" in proc.stderr, proc.stderr
    # The source and a bad rate, both from the environment.
    replay = tmp_path / "events.jsonl"
    replay.touch()
    env = {**os.environ, "STREAMER_PULLER_REPLAY": str(replay), "STREAMER_PULLER_RATE": "-1"}
    proc = subprocess.run(puller_command(), capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2
    assert "STREAMER_PULLER_RATE: must be greater than 0, not -1" in proc.stderr


def test_a_second_puller_on_the_same_log_dir_or_port_is_refused(tmp_path: Path) -> None:
    """Nothing is shared: the second process exits 2 naming the holder, and
    the first one's log is whole afterwards (no acknowledged event cut)."""
    port = free_port()
    first = start_puller(tmp_path, port, "--workload", "chat", "--rate", "2000")
    try:
        asyncio.run(puller_events(port, "", 100))
        def second(listen: int, log_dir: str) -> str:
            return refusal(subprocess.run(
                puller_command("--workload", "chat", "--listen", f"127.0.0.1:{listen}",
                               "--log-dir", str(tmp_path / log_dir)),
                capture_output=True, text=True, timeout=30,
            ))

        assert (f"cannot open the replay log: {tmp_path / 'log'} is in use by another "
                f"process (pid {first.pid})") in second(free_port(), "log")
        assert f"cannot listen on 127.0.0.1:{port}: the port is in use by another process" \
            in second(port, "other")
        assert first.poll() is None
        assert stop_puller(first) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    stopped = int((tmp_path / "puller-0.log").read_text().rsplit("stopped at position ", 1)[1])
    replay_log = ReplayLog(tmp_path / "log")
    try:
        assert replay_log.last_position == stopped
        assert [r.position for r in replay_log.read(0, 10**9)] == list(range(1, stopped + 1))
    finally:
        replay_log.close()


def test_a_false_boolean_variable_is_false(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "STREAMER_PULLER_STAMP_EVENT_IDS": "no"}
    with (tmp_path / "puller.log").open("wb") as sink:
        proc = subprocess.Popen(
            puller_command("--workload", "chat", "--listen", f"127.0.0.1:{port}",
                           "--log-dir", str(tmp_path / "log")),
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )
    try:
        events = asyncio.run(puller_events(port, "", 5))
        # Stamped ids are ev-<n>-<ns>; plain ones ev-<n>.
        assert all(e.change_event.event_id.count("-") == 1 for e in events), events
        assert stop_puller(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_help_documents_every_option() -> None:
    proc = subprocess.run(puller_command("--help"), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for option in ("--listen", "--log-dir", "--retention-bytes", "--retention-seconds",
                   "--heartbeat-seconds", "--workload", "--replay", "--mongodb", "--db",
                   "--collections", "--rate", "--seed",
                   "--record", "--log-level", "--log-format", "STREAMER_PULLER_"):
        assert option in proc.stdout, option


def test_sigterm_sends_every_logged_event_before_the_streams_end(tmp_path: Path) -> None:
    """A consumer reading live when the Puller is stopped gets everything up
    to the position the Puller stopped at, then the end of its stream."""
    port = free_port()
    proc = start_puller(tmp_path, port, "--workload", "chat", "--rate", "3000")

    async def consume() -> list[pb.PullerEvent]:
        got: list[pb.PullerEvent] = []
        async with asyncio.timeout(60):
            while True:
                try:
                    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                        stub = pb_grpc.PullerServiceStub(channel)
                        async for batch in stub.SubscribeBatch(pb.SubscribeRequest()):
                            got.extend(e for e in batch.events if e.HasField("change_event"))
                            if len(got) >= 300 and proc.poll() is None:
                                proc.send_signal(signal.SIGTERM)
                        return got
                except grpc.aio.AioRpcError as exc:
                    if got:  # the stream ended with the server: what came is all
                        return got
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.1)

    try:
        got = asyncio.run(consume())
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    stopped = int((tmp_path / "puller-0.log").read_text().rsplit("stopped at position ", 1)[1])
    positions = [position(e.progress) for e in got]
    assert positions == list(range(positions[0], stopped + 1))
