"""The cluster chaos run: a Streamer cluster under seeded ``kill -9``s, and
an exact check of every delivery against the Puller's log
(docs/reliability.md, Chaos (cluster); ``tests/test_chaos.py`` is a short
run, ``bench/bench_chaos.py`` the full one).

The processes, all on loopback, each with its log in the work directory:
a Puller (``streamer puller --workload chat`` with a durable log), a
three-member etcd, ``nodes`` cluster nodes (``streamer serve --cluster``,
each with its own port, state directory and metrics endpoint) and
``gateways`` gateway processes (this module's ``gateway`` entry point,
``python -m streamer.tools.chaos gateway``: a ``StreamerClient(cluster=...)``
holding its share of the chat workload's subscriptions).

The chaos. For ``duration`` seconds, at seeded random pauses: ``kill -9``
of one process of a kind (a node, a gateway, the Puller, an etcd member;
the kinds come in shuffled rounds, so each is killed about as often),
which is started again on the same ports, data and files after a seeded
random downtime. Every process that dies on its own (a node that fenced
itself) is started again too, and counted.

What makes the check exact. Before anything starts, the Puller's log is
created and the marker of its position 0 read: every subscription is
first registered with ``resume_after`` = that marker, so each must receive
every matching event of the log, from the first one. A gateway appends
each delivery it receives to its file (``<event id> <operation> <progress
marker> <subscription id>,...``), flushed every ``FLUSH_SECONDS``; what a
``kill -9`` loses of it was not flushed, so it is as if never received. A
restarted gateway reads its file back (dropping a torn last line) and
re-subscribes each subscription with ``resume_after`` = the progress of
the last delivery recorded for it (the start marker if none): every event
after what it recorded comes again. So for each subscription, what its
gateway recorded, first arrivals only, must be exactly its expected
events in the log's order: an event never recorded is *missing*; a first
arrival that skips expected events is an *unexplained jump*; one older
than an event already recorded is *out of order*; events recorded twice
are *duplicates* (allowed, counted: at least once).

The end: the Puller is stopped (its log is the reference), served again
without producing (``--replay`` of an empty file), every node's saved
marker reaches the log's last position and no subscription catches up
any more, the gateways receive nothing for ``QUIET_SECONDS``, and every
process is stopped by its pid. The expected deliveries come from the
log, each event transformed and matched as the ingest does
(``streamer.tools.demo.expected_deliveries``).

A tool, off the service's import path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from streamer.tools.etcd_members import EtcdCluster, etcd_cluster, free_ports

KINDS = ("node", "gateway", "puller", "etcd")
# How often a gateway flushes what it recorded (what a kill -9 loses at most).
FLUSH_SECONDS = 0.05
# The gateways received nothing for this long: everything was delivered.
QUIET_SECONDS = 3.0
# Bounds on each wait of the run (a process that exits fails it at once).
START_TIMEOUT = 120.0
SETTLE_TIMEOUT = 300.0
# The Puller repeats its first events (new ids): its restarts stay quick.
CYCLE = 20_000


@dataclass(frozen=True)
class Config:
    """The size and rhythm of a run (full size by default)."""

    subscriptions: int = 50_000
    gateways: int = 4
    nodes: int = 3
    rate: float = 200.0  # Puller events per second
    duration: float = 600.0  # seconds of chaos
    seed: int = 1
    pause: tuple[float, float] = (4.0, 12.0)  # seconds between kills (uniform)
    downtime: tuple[float, float] = (0.5, 3.0)  # seconds a killed process stays down
    lease_ttl: int = 5  # streamer serve's default
    log_level: str = "WARNING"  # of the nodes and the Puller


# ---------------------------------------------------------------- the gateway


def recorded_markers(path: Path) -> dict[str, str]:
    """Each subscription's progress marker of its last delivery recorded in
    a gateway's file; a torn last line (a kill while it was written) is cut
    off the file first, so what follows it is appended whole."""
    markers: dict[str, str] = {}
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return markers
    with f:
        kept = 0
        for line in f:
            if not line.endswith(b"\n"):
                break
            kept += len(line)
            parts = line.split()
            if len(parts) == 4 and parts[2] != b"-":
                progress = parts[2].decode()
                for sub_id in parts[3].decode().split(","):
                    markers[sub_id] = progress
        f.truncate(kept)
    return markers


def _report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _gateway(args: argparse.Namespace) -> int:
    """Subscribe this gateway's share of the workload (each after its last
    recorded delivery, or the start marker), then record every delivery
    until SIGTERM. Reports JSON lines: ``{"ready": n, "resumed": k,
    "seconds": s}`` once every subscription is accepted, ``{"total": t}``
    each second, ``{"done": t}`` at the end."""
    from streamer.client import StreamerClient, Subscription
    from streamer.errors import SubscriptionRejected
    from streamer.tools.workload import Workload

    name = f"gw-{args.index}"
    specs = [s for s in Workload(args.subscriptions, seed=args.seed, gateways=args.gateways)
             .subscriptions() if s.gateway == name]
    markers = recorded_markers(args.out)
    pending = [Subscription(s.collection, filters=s.filters, expression=s.expression or "",
                            database=s.database, subscription_id=s.id,
                            resume_after=markers.get(s.id, args.start_after)) for s in specs]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.perf_counter()
    # etcd may be losing a member as this starts: its first read of the
    # live nodes gets longer than the default.
    client = StreamerClient(cluster=args.cluster, gateway_id=name, connect_timeout=60.0,
                            ack_timeout=max(30.0, args.subscriptions / 500))
    total = 0
    out = open(args.out, "a", buffering=1 << 20)  # closed in finally

    async def receive() -> None:
        nonlocal total
        write = out.write
        async for delivery in client.deliveries():
            event = delivery.event
            total += 1
            write(f"{event.event_id} {event.operation} {event.progress or '-'} "
                  f"{','.join(delivery.subscription_ids)}\n")

    async def flush() -> None:
        ticks = 0
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            out.flush()
            ticks += 1
            if ticks % round(1 / FLUSH_SECONDS) == 0:
                _report(total=total)

    async def subscribe() -> None:
        # Refused ones (not_owner for longer than the client waits, while
        # the cluster's membership moves) are asked again.
        todo = pending
        while todo:
            answers = await client.subscribe_many(todo)
            refused = [(s, a) for s, a in zip(todo, answers, strict=True)
                       if isinstance(a, SubscriptionRejected)]
            todo = [s for s, _ in refused]
            if refused:
                codes = Counter(a.code for _, a in refused)
                print(f"{name}: {len(todo)} subscription(s) refused ({dict(codes)}), asking "
                      "again", file=sys.stderr, flush=True)
                await asyncio.sleep(1.0)

    client.start()
    tasks = [asyncio.create_task(receive()), asyncio.create_task(flush())]
    try:
        registering = asyncio.ensure_future(subscribe())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((registering, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not registering.done():
            registering.cancel()
            return 130
        registering.result()
        _report(ready=len(specs), resumed=len(markers), seconds=time.perf_counter() - started)
        await stopping
        return 0
    finally:
        await client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.close()
        _report(done=total)


def _gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamer.tools.chaos gateway",
        description="One gateway process of the chaos run (internal).")
    parser.add_argument("command", choices=["gateway"])
    parser.add_argument("--cluster", required=True, help="etcd://HOST:PORT[,...]")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--gateways", type=int, required=True)
    parser.add_argument("--subscriptions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start-after", required=True,
                        help="the marker every subscription first resumes after")
    parser.add_argument("--out", type=Path, required=True)
    return parser


def gateway_main(argv: Sequence[str]) -> int:
    from streamer.logs import configure_logging

    configure_logging("WARNING", "text")
    return asyncio.run(_gateway(_gateway_parser().parse_args(argv)))


# ---------------------------------------------------------------- the run


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def saved_position(state_dir: Path, log_id: str) -> int:
    """The position of a node's saved marker (-1 while there is none)."""
    try:
        marker = json.loads((state_dir / "progress.json").read_text())["marker"]
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    prefix, _, position = str(marker).rpartition(":")
    return int(position) if prefix.endswith(log_id) and position.isdigit() else -1


class Failed(RuntimeError):
    """The run could not go on (a wait timed out, a process would not start)."""


@dataclass
class Gateway:
    """A gateway process; its JSON lines are read in a thread."""

    proc: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)
    ready: float | None = None  # seconds from its start to every subscription accepted
    total: int = 0

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if "ready" in report:
                self.ready = time.monotonic() - self.started
            self.total = int(report.get("total", report.get("done", self.total)))


class Chaos:
    """One run's processes (see the module docstring); ``close`` stops each
    one still running by its pid, whatever happened."""

    def __init__(self, config: Config, work: Path, etcd: EtcdCluster) -> None:
        from streamer.puller.log import ReplayLog

        self.config = config
        self.work = work
        self.etcd = etcd
        self.cluster = etcd.url
        self.log_dir = work / "puller-log"
        replay_log = ReplayLog(self.log_dir)
        self.log_id, self.start_marker = replay_log.log_id, replay_log.marker(0)
        replay_log.close()
        ports = free_ports(1 + 2 * config.nodes)
        self.puller_port = ports[0]
        self.node_ports = ports[1:1 + config.nodes]
        self.metrics_ports = ports[1 + config.nodes:]
        self.procs: list[subprocess.Popen[Any]] = []
        self.nodes: list[subprocess.Popen[Any] | None] = [None] * config.nodes
        self.gateways: list[Gateway | None] = [None] * config.gateways
        self.puller: subprocess.Popen[Any] | None = None
        self.began = time.monotonic()
        self.unplanned: list[dict[str, Any]] = []  # processes that died on their own
        self.down: set[str] = set()  # killed on purpose, not started again yet
        # Kills whose recovery is still awaited: (record, key, since, done?).
        self.awaiting: list[tuple[dict[str, Any], str, float, Callable[[], bool]]] = []
        # Gateway kills and the process started after each (its ``ready``).
        self.restarted: list[tuple[dict[str, Any], Gateway]] = []

    # -- processes -------------------------------------------------------

    def _spawn(self, name: str, argv: Sequence[str], pipes: bool = False
               ) -> subprocess.Popen[Any]:
        # Appended to: a restarted process's log follows its earlier runs'.
        log: IO[bytes] = open(self.work / f"{name}.log", "ab")  # the child keeps its own copy
        try:
            proc: subprocess.Popen[Any] = subprocess.Popen(
                [sys.executable, *argv], stderr=log, stdout=subprocess.PIPE if pipes else log,
                stdin=subprocess.DEVNULL, text=pipes, bufsize=1 if pipes else -1,
                env={k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")},
                start_new_session=True)
        finally:
            log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def _kill(proc: subprocess.Popen[Any] | None) -> None:
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)

    @staticmethod
    def _stop(proc: subprocess.Popen[Any] | None, timeout: float = 30.0) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            Chaos._kill(proc)

    def close(self) -> None:
        # A gateway's reader thread ends at the end of its stdout.
        for proc in reversed(self.procs):
            self._stop(proc, 10.0)

    def start_puller(self, *source: str) -> None:
        source = source or ("--workload", "chat", "--rate", f"{self.config.rate:g}",
                            "--seed", str(self.config.seed), "--cycle", str(CYCLE))
        self.puller = self._spawn("puller", [
            "-m", "streamer", "puller", *source, "--log-dir", str(self.log_dir),
            "--listen", f"127.0.0.1:{self.puller_port}", "--log-level", self.config.log_level])

    def start_node(self, k: int) -> None:
        port = self.node_ports[k]
        self.nodes[k] = self._spawn(f"n{k}", [
            "-m", "streamer", "serve", "--listen", f"127.0.0.1:{port}",
            "--puller", f"127.0.0.1:{self.puller_port}", "--state-dir", str(self.work / f"n{k}"),
            "--metrics", f"127.0.0.1:{self.metrics_ports[k]}", "--cluster", self.cluster,
            "--node-id", f"n{k}", "--advertise", f"127.0.0.1:{port}",
            "--lease-ttl", str(self.config.lease_ttl), "--log-level", self.config.log_level])

    def start_gateway(self, k: int) -> None:
        c = self.config
        self.gateways[k] = Gateway(self._spawn(f"gw-{k}", [
            "-m", "streamer.tools.chaos", "gateway", "--cluster", self.cluster,
            "--index", str(k), "--gateways", str(c.gateways), "--subscriptions",
            str(c.subscriptions), "--seed", str(c.seed), "--start-after", self.start_marker,
            "--out", str(self.work / f"gw-{k}.deliveries")], pipes=True))

    # -- observing -------------------------------------------------------

    def now(self) -> float:
        """Seconds since the run began (to the hundredth: for the figures)."""
        return round(time.monotonic() - self.began, 2)

    def saved(self) -> list[int]:
        """Each node's saved position."""
        return [saved_position(self.work / f"n{k}", self.log_id)
                for k in range(self.config.nodes)]

    def cluster_keys(self) -> tuple[dict[str, int], dict[int, tuple[str, int]]] | None:
        """The cluster's keys in etcd: each live node's lease, and each owned
        shard's owner and the lease it is held under (None: etcd did not
        answer)."""
        from streamer.cluster.etcd import EtcdClient
        from streamer.cluster.membership import DEFAULT_CLUSTER, cluster_prefix

        prefix = cluster_prefix(DEFAULT_CLUSTER)

        async def read() -> tuple[dict[str, int], dict[int, tuple[str, int]]]:
            async with EtcdClient(self.etcd.endpoints, timeout=2.0) as etcd:
                kvs, _ = await etcd.get_prefix(prefix)
            live: dict[str, int] = {}
            owners: dict[int, tuple[str, int]] = {}
            for kv in kvs:
                key = kv.key[len(prefix):].decode()
                if key.startswith("shards/*/"):
                    owners[int(key.removeprefix("shards/*/"))] = (kv.value.decode(), kv.lease)
                elif key.startswith("nodes/"):
                    live[key.removeprefix("nodes/")] = kv.lease
            return live, owners

        try:
            return asyncio.run(read())
        except Exception:  # etcd without a leader for a moment
            return None

    def settled(self, dead: int = 0) -> bool:
        """Every node is live in etcd and holds the shards placement gives
        it under its current lease, and none is ``dead``, a killed node's
        lease. (A node started again before its old lease expired is live
        at once, but its shards are its own only under its new lease.)"""
        from streamer.cluster.shards import placement

        keys = self.cluster_keys()
        if keys is None:
            return False
        live, owners = keys
        everyone = {f"n{k}" for k in range(self.config.nodes)}
        return set(live) == everyone and dead not in live.values() and {
            shard: (owner, live[owner]) for shard, owner in placement(everyone).items()
        } == owners

    def catching_up(self) -> bool:
        """Some subscription is catching up at some node (True while a
        node's metrics cannot be read)."""
        from streamer.tools.measure import scrape

        for port in self.metrics_ports:
            try:
                samples = scrape(f"127.0.0.1:{port}", timeout=5)
            except OSError:
                return True
            if sum(samples.get("streamer_catchup_subscriptions", {}).values()) > 0:
                return True
        return False

    def supervise(self) -> None:
        """Start again whatever died on its own (counted), and note the
        recoveries that completed."""
        at = self.now()
        down = self.down
        if self.puller is not None and self.puller.poll() is not None and "puller" not in down:
            self.unplanned.append({"process": "puller", "code": self.puller.returncode,
                                   "at_s": at})
            self.start_puller()
        for k, proc in enumerate(self.nodes):
            if proc is not None and proc.poll() is not None and f"n{k}" not in down:
                self.unplanned.append({"process": f"n{k}", "code": proc.returncode, "at_s": at})
                self.start_node(k)
        for k, gateway in enumerate(self.gateways):
            if gateway is not None and gateway.proc.poll() is not None and (
                    f"gw-{k}" not in down):
                self.unplanned.append({"process": f"gw-{k}", "code": gateway.proc.returncode,
                                       "at_s": at})
                self.start_gateway(k)
        for member in self.etcd.members:
            if member.proc is not None and not member.running and member.name not in down:
                self.unplanned.append({"process": member.name, "code": member.proc.returncode,
                                       "at_s": at})
                member.start()
        still = []
        for record, key, since, done in self.awaiting:
            if done():
                record[key] = round(time.monotonic() - since, 2)
            else:
                still.append((record, key, since, done))
        self.awaiting = still

    def sleep(self, seconds: float) -> None:
        """Sleep, supervising."""
        until = time.monotonic() + seconds
        while True:
            self.supervise()
            left = until - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float) -> float:
        """Supervising, until ``check()``; the seconds it took."""
        since = time.monotonic()
        while not check():
            if time.monotonic() - since > timeout:
                raise Failed(f"{what}: not within {timeout:g} s")
            self.sleep(0.1)
        return round(time.monotonic() - since, 2)

    # -- the phases ------------------------------------------------------

    def start(self) -> None:
        self.start_puller()
        self.wait_for("the Puller's port", lambda: _listening(self.puller_port), START_TIMEOUT)
        for k in range(self.config.nodes):
            self.start_node(k)
        self.wait_for("the nodes' shards", self.settled, START_TIMEOUT)
        for k in range(self.config.gateways):
            self.start_gateway(k)
        self.wait_for("the gateways' subscriptions", self.all_ready, START_TIMEOUT)

    def all_ready(self) -> bool:
        return all(g is not None and g.ready is not None for g in self.gateways)

    def chaos(self) -> list[dict[str, Any]]:
        """Kill and restart for ``duration`` seconds; what was killed when."""
        c = self.config
        rng = random.Random(c.seed)
        kills: list[dict[str, Any]] = []
        order: list[str] = []
        end = time.monotonic() + c.duration
        while True:
            self.sleep(rng.uniform(*c.pause))
            if time.monotonic() >= end:
                return kills
            if not order:
                order = list(KINDS)
                rng.shuffle(order)
            kills.append(self.kill_one(order.pop(), rng))

    def kill_one(self, kind: str, rng: random.Random) -> dict[str, Any]:
        """``kill -9`` of one process of ``kind``, started again after a
        seeded downtime; recoveries are noted as they complete."""
        c = self.config
        down = rng.uniform(*c.downtime)
        record: dict[str, Any] = {"kind": kind, "down_s": round(down, 2)}
        if kind == "etcd":
            # Never two members down: the cluster keeps its quorum.
            self.wait_for("etcd healthy", lambda: all(
                m.healthy() for m in self.etcd.members), START_TIMEOUT)
            member = rng.choice(self.etcd.members)
            record.update(victim=member.name, leader=member.is_leader(), at_s=self.now())
            self.down.add(member.name)
            member.kill()
            killed = time.monotonic()
            self.sleep(down)
            member.start()
            self.down.discard(member.name)
            self.awaiting.append((record, "healthy_s", killed, member.healthy))
        elif kind == "node":
            k = rng.randrange(c.nodes)
            keys = self.cluster_keys()
            lease = keys[0].get(f"n{k}", 0) if keys is not None else 0
            record.update(victim=f"n{k}", at_s=self.now())
            self.down.add(f"n{k}")
            self._kill(self.nodes[k])
            killed = time.monotonic()
            self.sleep(down)
            self.start_node(k)
            self.down.discard(f"n{k}")
            self.awaiting.append((record, "settled_s", killed, lambda: self.settled(lease)))
        elif kind == "gateway":
            k = rng.randrange(c.gateways)
            gateway = self.gateways[k]
            assert gateway is not None
            record.update(victim=f"gw-{k}", at_s=self.now())
            self.down.add(f"gw-{k}")
            self._kill(gateway.proc)
            self.sleep(down)
            self.start_gateway(k)
            self.down.discard(f"gw-{k}")
            restarted = self.gateways[k]
            assert restarted is not None
            self.restarted.append((record, restarted))
        else:
            record.update(victim="puller", at_s=self.now())
            reached = max(self.saved())
            self.down.add("puller")
            self._kill(self.puller)
            killed = time.monotonic()
            self.sleep(down)
            self.start_puller()
            self.down.discard("puller")
            self.awaiting.append((record, "flowing_s", killed,
                                  lambda: min(self.saved()) > reached))
        return record

    def finish(self) -> dict[str, Any]:
        """Let every process recover, stop the Puller (its log is the
        reference), deliver what it logged, stop everything; the last
        position checked and how long each step took."""
        from streamer.puller.log import ReplayLog

        out: dict[str, Any] = {}
        out["recovered_s"] = self.wait_for("every process back", lambda: (
            self.all_ready() and not self.awaiting), SETTLE_TIMEOUT)
        for record, restarted in self.restarted:
            # None: killed again before all of its subscriptions were accepted.
            record["ready_s"] = None if restarted.ready is None else round(restarted.ready, 2)
        self._stop(self.puller)
        replay_log = ReplayLog(self.log_dir)
        last = out["last_position"] = replay_log.last_position
        replay_log.close()
        # Served again, producing nothing: the nodes' live ingest and their
        # catch-ups read the rest of the log from it.
        empty = self.work / "empty.jsonl"
        empty.write_text("")
        self.start_puller("--replay", str(empty))
        out["ingested_s"] = self.wait_for("the nodes at the log's end", lambda: (
            min(self.saved()) >= last), SETTLE_TIMEOUT)
        out["caught_up_s"] = self.wait_for(
            "the catch-ups", lambda: not self.catching_up(), SETTLE_TIMEOUT)
        totals, since = -1, time.monotonic()
        while time.monotonic() - since < QUIET_SECONDS:
            self.sleep(0.5)
            now = sum(g.total for g in self.gateways if g is not None)
            if now != totals:
                totals, since = now, time.monotonic()
        for gateway in self.gateways:
            self._stop(gateway.proc if gateway is not None else None, 60.0)
        for proc in (*self.nodes, self.puller):
            self._stop(proc)
        return out


# ---------------------------------------------------------------- the check


@dataclass
class Outcome:
    subscriptions: int = 0
    expected: int = 0  # (event, operation, subscription) expected
    deliveries: int = 0  # ... received, duplicates included
    missing: int = 0
    duplicates: int = 0
    subscriptions_with_duplicates: int = 0
    unexplained_jumps: int = 0  # a first arrival past expected events not yet received
    out_of_order: int = 0  # a first arrival older than one received before it
    unexpected: int = 0  # events or subscriptions not expected, malformed lines
    examples: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.deliveries > 0 and not (self.missing or self.unexplained_jumps
                                            or self.out_of_order or self.unexpected)


def check_subscription(sub_id: str, expected: list[tuple[int, int]],
                       received: list[tuple[int, int]], outcome: Outcome) -> None:
    """One subscription's recorded (position, operation) pairs against its
    expected ones (module docstring)."""
    index = {item: i for i, item in enumerate(expected)}
    seen: set[tuple[int, int]] = set()
    following = 0  # the expected index the next first arrival should have
    duplicates = 0
    for item in received:
        i = index.get(item)
        if i is None:
            outcome.unexpected += 1
            continue
        outcome.deliveries += 1
        if item in seen:
            duplicates += 1
            continue
        seen.add(item)
        if i > following:
            outcome.unexplained_jumps += 1
            if len(outcome.examples) < 5:
                outcome.examples.append(
                    f"{sub_id}: after #{following} of {len(expected)} expected, received #{i} "
                    f"(position {item[0]})")
        elif i < following:
            outcome.out_of_order += 1
            if len(outcome.examples) < 5:
                outcome.examples.append(f"{sub_id}: #{i} (position {item[0]}) received after "
                                        f"#{following - 1}")
        following = max(following, i + 1)
    for i, item in enumerate(expected):
        if item not in seen:
            outcome.missing += 1
            if len(outcome.examples) < 5:
                outcome.examples.append(f"{sub_id}: expected #{i} (position {item[0]}, "
                                        f"operation {item[1]}) never recorded")
    outcome.subscriptions += 1
    outcome.expected += len(expected)
    outcome.duplicates += duplicates
    outcome.subscriptions_with_duplicates += duplicates > 0


def verify(config: Config, work: Path, last: int) -> Outcome:
    """Every gateway's file against the Puller's log up to ``last``."""
    from streamer.tools.demo import expected_deliveries
    from streamer.tools.workload import Workload

    specs = list(Workload(config.subscriptions, seed=config.seed,
                          gateways=config.gateways).subscriptions())
    expected, position_of = expected_deliveries(work / "puller-log", specs, 0, last)
    received: dict[str, list[tuple[int, int]]] = {s.id: [] for s in specs}
    outcome = Outcome()
    for k in range(config.gateways):
        path = work / f"gw-{k}.deliveries"
        if not path.exists():
            continue
        with open(path, errors="replace") as f:
            for line in f:
                parts = line.split()
                at = position_of.get(parts[0]) if len(parts) == 4 else None
                if at is None or not parts[1].isdigit():
                    outcome.unexpected += 1
                    continue
                for sub_id in parts[3].split(","):
                    if sub_id in received:
                        received[sub_id].append((at, int(parts[1])))
                    else:
                        outcome.unexpected += 1
    for sub_id, items in expected.items():
        check_subscription(sub_id, items, received[sub_id], outcome)
    return outcome


def run(config: Config, work: Path) -> dict[str, Any]:
    """A whole run in ``work`` (an empty directory): start, chaos, finish,
    check; its figures. Every process it started is stopped by its pid,
    whatever happens."""
    figures: dict[str, Any] = {"config": asdict(config)}
    with etcd_cluster(work / "etcd", 3) as etcd:
        chaos = Chaos(config, work, etcd)
        try:
            chaos.start()
            figures["start_s"] = round(time.monotonic() - chaos.began, 1)
            figures["kills"] = chaos.chaos()
            figures["finish"] = chaos.finish()
            figures["unplanned_restarts"] = chaos.unplanned
            figures["run_s"] = round(time.monotonic() - chaos.began, 1)
        finally:
            chaos.close()
    checking = time.monotonic()
    outcome = verify(config, work, figures["finish"]["last_position"])
    figures["verify_s"] = round(time.monotonic() - checking, 1)
    figures["outcome"] = asdict(outcome)
    figures["passed"] = outcome.passed
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["gateway"]:
        sys.exit(gateway_main(sys.argv[1:]))
    sys.exit("usage: python -m streamer.tools.chaos gateway ... (internal: the chaos run's "
             "gateway process)")
