"""Helpers of the cluster tests: ``streamer serve --cluster`` processes
against a real etcd, and reading the cluster's keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from etcd_helpers import EtcdCluster
from puller_double import PullerDouble
from service_helpers import ServeProcess

from streamer.cluster.etcd import EtcdClient

PREFIX = b"/streamer/streamer/"


def node(tmp_path: Path, etcd: EtcdCluster, node_id: str, *args: str,
         puller: PullerDouble | None = None) -> ServeProcess:
    """A ``streamer serve --cluster`` process advertising its own address
    (its own Puller double unless ``puller`` is given)."""
    directory = tmp_path / node_id
    directory.mkdir()
    serve = ServeProcess(directory, puller=puller)
    serve.args = ("--cluster", etcd.url, "--node-id", node_id,
                  "--advertise", serve.address, "--resume-grace", "0", *args)
    return serve


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.05)


async def cluster_keys(etcd: EtcdClient) -> tuple[set[str], dict[int, str]]:
    """The live node ids and every owned shard's owner (group ``*``)."""
    kvs, _ = await etcd.get_prefix(PREFIX)
    live: set[str] = set()
    owners: dict[int, str] = {}
    for kv in kvs:
        key = kv.key[len(PREFIX):].decode()
        if key.startswith("shards/*/"):
            owners[int(key.removeprefix("shards/*/"))] = kv.value.decode()
        elif key.startswith("nodes/"):
            live.add(key.removeprefix("nodes/"))
    return live, owners
