"""`streamer serve` as a real process: serves, delivers, and stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from puller_double import PullerDouble
from service_helpers import Serving, free_port, refusal, serving, until

import streamer
from streamer.node.progress import ProgressStore
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    SubscribeRequest,
    Value,
)
from streamer.tools.measure import scrape


def test_help_documents_every_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for option in ("--listen", "--puller", "--state-dir", "--session-ttl", "--document-layout",
                   "--gateway-queue", "--resume-grace", "--consumer-id", "--drain-seconds",
                   "--auth-token-file", "--max-subscriptions", "--max-filters",
                   "--max-expression-length", "--metrics", "--tls-cert", "--tls-key",
                   "--tls-client-ca", "--puller-tls-ca", "--log-level", "--log-format",
                   "--max-catchup-readers", "--catchup-confirm-seconds", "STREAMER_"):
        assert option in out
    assert "(default: None)" not in out


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


PULLER = ("--puller", "127.0.0.1:1")


@pytest.mark.parametrize(("args", "env", "message"), [
    (("serve", *PULLER, "--listen", "nonsense"), {},
     "streamer serve: error: argument --listen: not HOST:PORT: 'nonsense'"),
    (("serve", *PULLER, "--listen", "127.0.0.1:99999"), {},
     "argument --listen: port 99999 is out of range (0-65535)"),
    (("serve", *PULLER, "--gateway-queue", "0"), {},
     "argument --gateway-queue: must be at least 1, not 0"),
    (("serve", *PULLER, "--session-ttl", "-1"), {},
     "argument --session-ttl: must be greater than 0, not -1"),
    (("serve", *PULLER, "--session-ttl", "nan"), {},
     "argument --session-ttl: must be a finite number, not 'nan'"),
    (("serve", *PULLER, "--drain-seconds", "-1"), {},
     "argument --drain-seconds: must be at least 0, not -1"),
    (("serve", *PULLER, "--max-subscriptions", "-5"), {},
     "argument --max-subscriptions: must be at least 1, not -5"),
    (("serve", *PULLER, "--resume-grace", "nan"), {},
     "argument --resume-grace: must be a finite number, not 'nan'"),
    (("serve", *PULLER, "--max-catchup-readers", "0"), {},
     "argument --max-catchup-readers: must be at least 1, not 0"),
    (("serve", *PULLER), {"STREAMER_CATCHUP_CONFIRM_SECONDS": "-1"},
     "STREAMER_CATCHUP_CONFIRM_SECONDS: must be greater than 0, not -1"),
    (("serve", *PULLER, "--tls-cert", "/nonexistent.pem"), {},
     "argument --tls-cert: /nonexistent.pem: no such file"),
    (("serve",), {}, "--puller is required (or STREAMER_PULLER)"),
    (("serve", "--puller", "puller:0"), {}, "port 0 cannot be connected to"),
    (("serve", *PULLER), {"STREAMER_SESSION_TTL": "soon"},
     "STREAMER_SESSION_TTL: not a number: 'soon'"),
    (("serve", *PULLER), {"STREAMER_LOG_LEVEL": "verbose"},
     "STREAMER_LOG_LEVEL: must be one of DEBUG, INFO, WARNING, ERROR, not 'verbose'"),
    (("serve", *PULLER), {"STREAMER_DOCUMENT_LAYOUT": "xml"},
     "STREAMER_DOCUMENT_LAYOUT: must be one of plain, syntrix, not 'xml'"),
    (("serve", *PULLER), {"STREAMER_LOG_FORMAT": "xml"},
     "STREAMER_LOG_FORMAT: must be one of text, json, not 'xml'"),
    (("serve", *PULLER), {"STREAMER_GATEWAY_QUEUE": "0"},
     "STREAMER_GATEWAY_QUEUE: must be at least 1, not 0"),
    (("puller",), {"STREAMER_PULLER_WORKLOAD": "tpcc"},
     "streamer puller: error: STREAMER_PULLER_WORKLOAD: must be one of chat, not 'tpcc'"),
    (("puller", "--workload", "chat"), {"STREAMER_PULLER_STAMP_EVENT_IDS": "nope"},
     "STREAMER_PULLER_STAMP_EVENT_IDS: must be one of 1, 0, true, false, yes, no, on, off"),
    (("puller", "--workload", "chat", "--listen", "127.0.0.1:65536"), {},
     "argument --listen: port 65536 is out of range"),
    (("puller", "--workload", "chat", "--rate", "inf"), {},
     "argument --rate: must be a finite number, not 'inf'"),
    (("puller", "--workload", "chat", "--retention-bytes", "0"), {},
     "argument --retention-bytes: must be at least 1, not 0"),
    (("puller",), {}, "give exactly one source"),
    (("demo", "--duration", "inf"), {}, "argument --duration: must be a finite number"),
    (("demo", "--rate", "inf"), {}, "argument --rate: must be a finite number"),
    (("demo", "--gateways", "65"), {}, "argument --gateways: must be at most 64, not 65"),
    (("demo",), {"STREAMER_DEMO_SUBSCRIPTIONS": "-1"},
     "STREAMER_DEMO_SUBSCRIPTIONS: must be at least 1, not -1"),
    (("demo", "--plot", "/nonexistent-dir/latency.png"), {},
     "--plot /nonexistent-dir/latency.png: no directory /nonexistent-dir"),
    (("bench", "e2e", "--rates", "0"), {}, "argument --rates: must be at least 1, not 0"),
])
def test_bad_input_is_one_line_and_exit_2(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    assert message in refusal(_run(*args, env=env))


def test_demo_work_dir_must_be_a_new_or_empty_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert f"--work-dir {a_file}: not a directory" in refusal(
        _run("demo", "--work-dir", str(a_file)))
    assert f"--work-dir {tmp_path}: not empty" in refusal(
        _run("demo", "--work-dir", str(tmp_path)))


def test_demo_plot_without_matplotlib_is_refused_before_anything_runs(tmp_path: Path) -> None:
    # A real process in which matplotlib cannot be imported (a None entry in
    # sys.modules is how Python marks a module as not importable).
    result = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; "
         "from streamer.cli import main; sys.exit(main(sys.argv[1:]))",
         "demo", "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True, timeout=60,
    )
    assert "--plot needs matplotlib: pip install 'streamer-fanout[plot]'" in refusal(result)
    assert not (tmp_path / "p.png").exists()


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"streamer {streamer.__version__} (streamer-fanout)")


def test_top_level_help_names_each_commands_variables() -> None:
    text = " ".join(_run("--help").stdout.split())
    for prefix in ("serve reads STREAMER_<OPTION>", "puller reads STREAMER_PULLER_<OPTION>",
                   "demo reads STREAMER_DEMO_<OPTION>"):
        assert prefix in text


def _refused_start(*args: str) -> str:
    """The one line of a `streamer serve` that cannot start (a log line)."""
    result = _run("serve", *PULLER, *args)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and " ERROR streamer: " in lines[0], result.stderr
    return lines[0]


def test_a_port_held_by_another_program_is_refused(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        line = _refused_start("--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path))
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use by another process" in line


@pytest.mark.parametrize(("listen", "reason"), [
    ("192.0.2.1:{port}", "not an address of this host"),  # TEST-NET-1: never local
    ("no-such-host.invalid:{port}", "unknown host"),
])
def test_an_address_that_cannot_be_served_is_refused(
    tmp_path: Path, listen: str, reason: str
) -> None:
    address = listen.format(port=free_port())
    line = _refused_start("--listen", address, "--state-dir", str(tmp_path))
    assert f"cannot listen on {address}: {reason}" in line


def test_a_second_serve_on_the_same_port_or_state_dir_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as first:
            async with grpc.aio.insecure_channel(first.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
            line = _refused_start("--listen", first.address, "--state-dir", str(tmp_path / "b"))
            assert f"cannot listen on {first.address}: the port is in use by another " \
                "process" in line
            line = _refused_start("--listen", f"127.0.0.1:{free_port()}",
                                  "--state-dir", str(tmp_path / "state"))
            assert f"{tmp_path / 'state'} is in use by another process " \
                f"(pid {first.proc.pid})" in line
            assert first.proc.poll() is None
            # The first one still serves (nothing was shared or taken over).
            async with grpc.aio.insecure_channel(first.address) as channel:
                checks = health_pb2_grpc.HealthStub(channel)
                status = await checks.Check(health_pb2.HealthCheckRequest(service=""))
                assert status.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_an_unusable_state_dir_is_refused_at_start(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    line = _refused_start("--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(a_file))
    assert f"state directory {a_file}: not a directory" in line
    (tmp_path / "holed" / "progress.json").mkdir(parents=True)
    line = _refused_start("--listen", f"127.0.0.1:{free_port()}",
                          "--state-dir", str(tmp_path / "holed"))
    assert "progress.json: cannot read the progress file (Is a directory)" in line
    line = _refused_start("--listen", f"127.0.0.1:{free_port()}",
                          "--state-dir", str(_unwritable_dir(tmp_path)))
    assert "Permission denied" in line


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in. Root ignores mode
    bits, so as root it is a sysfs directory, which nobody can write."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o500)
        return path
    path = Path("/sys/kernel")
    assert path.is_dir() and not os.access(path / "LOCK", os.F_OK)
    return path


def test_serve_delivers_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--listen", f"127.0.0.1:{port}",
             "--puller", target, "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                checks = health_pb2_grpc.HealthStub(channel)
                for name in ("", "syntrix.streamer.v1.StreamerService"):
                    status = await checks.Check(health_pb2.HealthCheckRequest(service=name))
                    assert status.status == health_pb2.HealthCheckResponse.SERVING
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(GatewayMessage(subscribe=SubscribeRequest(
                    subscription_id="s", database="app", collection="messages",
                    filters=[Filter(field="chat", op="==", value=Value(string_value="c"))])))
                assert (await call.read()).subscribe_response.success
                for _ in range(1000):
                    if puller.subscriptions:
                        break
                    await asyncio.sleep(0.01)
                await puller.append(pb.ChangeEvent(
                    event_id="e0", database="app", mgo_coll="messages", mgo_doc_id="m0",
                    op_type="insert", full_doc=orjson.dumps({"chat": "c"})))
                delivery = (await asyncio.wait_for(call.read(), 30)).delivery
                assert (list(delivery.subscription_ids), delivery.event.progress) == (["s"], "p0")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 30) == 0
            assert ProgressStore(tmp_path).load().marker == "p0"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            await puller.stop()

    asyncio.run(main())


def _saved(state: Path, marker: str, gateways: list[str], others: int) -> None:
    state.mkdir()
    (state / "progress.json").write_bytes(
        orjson.dumps({"marker": marker, "gateways": gateways, "others": others}))


def test_restart_window_ends_when_known_gateways_are_back(tmp_path: Path) -> None:
    """A saved marker and a known gateway: ingest waits for that gateway's
    Hello, subscriptions and Heartbeat, not for the (huge) grace."""
    _saved(tmp_path / "state", "p0", ["gw-1"], 0)

    async def main() -> None:
        async with serving(tmp_path, "--resume-grace", "600") as serve:
            puller = serve.puller
            await puller.append(*(pb.ChangeEvent(
                event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
                op_type="insert", full_doc=orjson.dumps({"chat": "c"})) for i in range(3)))
            async with grpc.aio.insecure_channel(serve.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(GatewayMessage(hello=Hello(gateway_id="gw-1")))
                await call.write(GatewayMessage(subscribe=SubscribeRequest(
                    subscription_id="s", database="app", collection="messages")))
                assert (await call.read()).subscribe_response.success
                await asyncio.sleep(0.2)
                assert not puller.subscriptions, "ingest started before the heartbeat"
                await call.write(GatewayMessage(heartbeat=Heartbeat(gateway_id="gw-1")))
                assert (await call.read()).HasField("heartbeat_ack")
                got = [(await asyncio.wait_for(call.read(), 30)).delivery.event.event_id
                       for _ in range(2)]
                # Everything after the saved marker, and nothing before it.
                assert got == ["e1", "e2"]
                assert puller.subscriptions[0].after == "p0"
                call.cancel()
            assert "every known gateway re-registered" in serve.log()

    asyncio.run(main())


def test_restart_window_waits_the_grace_for_gateways_without_hello(tmp_path: Path) -> None:
    _saved(tmp_path / "state", "p0", [], 1)

    async def main() -> None:
        async with serving(tmp_path, "--resume-grace", "0.5") as serve:
            for _ in range(3000):
                if serve.puller.subscriptions:
                    break
                await asyncio.sleep(0.01)
            assert serve.puller.subscriptions[0].after == "p0"
            assert ("grace elapsed; not back: none with Hello; gateways without Hello "
                    "re-subscribed and quiet: 0 of 1") in serve.log()

    asyncio.run(main())


def test_restart_window_closes_once_the_plain_gateways_resubscribed_and_went_quiet(
    tmp_path: Path,
) -> None:
    # One plain gateway before the restart: the window holds ingest until
    # one plain gateway has re-subscribed and been quiet for a second, not
    # for the whole grace (a minute).
    _saved(tmp_path / "state", "p0", [], 1)

    async def main() -> None:
        async with serving(tmp_path, "--resume-grace", "60") as serve:
            await serve.puller.append(*(pb.ChangeEvent(
                event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
                op_type="insert", full_doc=orjson.dumps({"chat": "c"})) for i in range(3)))
            async with grpc.aio.insecure_channel(serve.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(GatewayMessage(subscribe=SubscribeRequest(
                    subscription_id="s", database="app", collection="messages")))
                assert (await call.read()).subscribe_response.success
                await asyncio.sleep(0.5)
                assert not serve.puller.subscriptions, "ingest started before it went quiet"
                got = [(await asyncio.wait_for(call.read(), 30)).delivery.event.event_id
                       for _ in range(2)]
                assert got == ["e1", "e2"]  # everything after the saved marker
                call.cancel()
            assert "restart window: every known gateway re-registered" in serve.log()

    asyncio.run(main())


def test_unreadable_progress_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "progress.json").write_bytes(b"{not json")
    result = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--puller", "127.0.0.1:1",
         "--listen", f"127.0.0.1:{free_port()}", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "progress.json: not a progress file" in result.stderr


def test_gateway_limits_come_from_flags(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--max-subscriptions", "1", "--max-filters", "1") as serve:
            async with grpc.aio.insecure_channel(serve.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                chat = Filter(field="chat", op="==", value=Value(string_value="c"))
                two = SubscribeRequest(subscription_id="s0", collection="m", filters=[chat, chat])
                await call.write(GatewayMessage(subscribe=two))
                refused = (await call.read()).subscribe_response
                assert (refused.code, refused.error) == (
                    "resource_exhausted", "2 filters; the limit is 1")
                for sub_id in ("s1", "s2"):
                    await call.write(GatewayMessage(subscribe=SubscribeRequest(
                        subscription_id=sub_id, collection="m", filters=[chat])))
                first, second = [(await call.read()).subscribe_response for _ in range(2)]
                assert first.success and second.code == "resource_exhausted"
                call.cancel()

    asyncio.run(main())


async def open_gateway(svc: Serving, channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """A batching gateway ``gw-1`` holding subscription ``s`` (all of app.messages),
    once the Streamer follows the Puller."""
    await asyncio.wait_for(channel.channel_ready(), 30)
    call = sgrpc.StreamerServiceStub(channel).Stream()
    await call.write(GatewayMessage(hello=Hello(gateway_id="gw-1", batch_delivery=True)))
    await call.write(GatewayMessage(subscribe=SubscribeRequest(
        subscription_id="s", database="app", collection="messages")))
    assert (await call.read()).subscribe_response.success
    await until(lambda: bool(svc.puller.subscriptions), 30)
    return call


def insert(i: int, size: int = 10) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
        op_type="insert", full_doc=orjson.dumps({"pad": "x" * size}))


def test_sigterm_ends_an_idle_gateways_stream_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", "30") as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            await svc.puller.append(insert(0))
            batch = (await asyncio.wait_for(call.read(), 30)).batch
            assert [d.event.event_id for d in batch.deliveries] == ["e0"]
            started = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(call.read(), 60)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # "server going away"
            assert ended.value.details() == "the Streamer is shutting down"
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
            # --drain-seconds is 30: nothing was left to drain, so no waiting.
            assert time.monotonic() - started < 10
        log = svc.log()
        assert re.search(r"INFO streamer\.node\.server: gateway stream 1 opened by "
                         r"ipv4:127\.0\.0\.1:\d+\n", log), log
        assert re.search(r"INFO streamer\.node\.server: gateway stream 1 ended \(gw-1 at "
                         r"ipv4:127\.0\.0\.1:\d+, batching\): UNAVAILABLE: the Streamer is "
                         r"shutting down; 1 subscription\(s\) dropped\n", log), log
        assert "Traceback" not in log

    asyncio.run(main())


def test_a_gateway_leaving_during_shutdown_ends_quietly(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", "30") as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            svc.proc.send_signal(signal.SIGTERM)
            await until(lambda: "stopping:" in svc.log(), 30)
            await asyncio.sleep(1.0)  # into the drain
            call.cancel()
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
        log = svc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        assert "gateway stream 1 ended (gw-1 at ipv4:127.0.0.1:" in log

    asyncio.run(main())


@pytest.mark.parametrize("gateway_leaves", [True, False], ids=["gateway-leaves", "drain-ends"])
def test_a_gateway_still_being_written_holds_the_drain_and_ends_quietly(
    tmp_path: Path, gateway_leaves: bool
) -> None:
    """A gateway that reads nothing keeps its writer busy: it holds the
    drain until it goes away (then at once) or --drain-seconds runs out."""
    metrics = f"127.0.0.1:{free_port()}"
    drain = "30" if gateway_leaves else "1"

    def queued() -> float:
        try:
            samples = scrape(metrics, timeout=5)
        except OSError:
            return 0
        return sum(samples.get("streamer_gateway_queued_messages", {}).values())

    async def main() -> None:
        async with serving(tmp_path, "--drain-seconds", drain, "--metrics", metrics) as svc, \
                grpc.aio.insecure_channel(svc.address) as channel:
            call = await open_gateway(svc, channel)
            # 40 MB for a gateway that reads nothing: the transport fills up
            # and the rest waits in its queue.
            await svc.puller.append(*(insert(i, 10_000) for i in range(4000)))
            for _ in range(300):
                if await asyncio.to_thread(queued) > 0:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("nothing stayed queued for the gateway")
            started = time.monotonic()
            svc.proc.send_signal(signal.SIGTERM)
            if gateway_leaves:
                await until(lambda: "stopping:" in svc.log(), 30)
                await asyncio.sleep(1.0)  # into the drain
                call.cancel()
            assert await asyncio.to_thread(svc.proc.wait, 60) == 0
            assert time.monotonic() - started < 15  # not the 30 s of --drain-seconds
            call.cancel()
        log = svc.log()
        assert "Traceback" not in log and "CancelledError" not in log, log
        [end] = re.findall(r".* gateway stream 1 ended .*", log)
        assert re.fullmatch(
            r".* WARNING streamer\.node\.server: gateway stream 1 ended \(gw-1 at "
            r"ipv4:127\.0\.0\.1:\d+, batching\): cancelled during the shutdown drain \(the "
            r"gateway went away or --drain-seconds ran out\); 1 subscription\(s\) dropped, "
            r"[1-9]\d* queued message\(s\) unsent", end), end
        assert log.index(end) < log.index("stopped at marker")

    asyncio.run(main())


def test_the_service_imports_neither_the_puller_nor_the_tools() -> None:
    """`streamer serve` runs with only the node, matching and shared modules
    loaded: the demo, the benchmark and the Puller stay off its path."""
    probe = (
        "import sys\n"
        "from streamer.cli import build_parser, build_serve_parser, serve_config\n"
        "build_parser(); args = build_serve_parser().parse_args(['--puller', 'h:1'])\n"
        "args.options.resolve(args, {}); serve_config(args)\n"
        "print(sorted(m for m in sys.modules if m.startswith(('streamer.tools', "
        "'streamer.puller'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"
