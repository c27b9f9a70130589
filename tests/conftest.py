"""Shared test set-up: the compiled extensions must be the ones under test;
real etcd members for the cluster tests (``etcd1``, ``etcd3``)."""

import importlib.machinery
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd_helpers import ETCD_MISSING, EtcdCluster, etcd_cluster

from streamer._ext import _celparse, _core, _fanout, _ingest, _subscribe

# A pure-Python stand-in or a stale build must never pass for the core.
for _module in (_core, _celparse, _fanout, _ingest, _subscribe):
    assert _module.__file__ is not None and _module.__file__.endswith(
        tuple(importlib.machinery.EXTENSION_SUFFIXES)
    ), f"{_module.__name__} is not the compiled extension: {_module.__file__}"


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A one-member etcd on loopback (skips the test when etcd is missing)."""
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    with etcd_cluster(tmp_path / "etcd", 1) as cluster:
        yield cluster


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A three-member etcd on loopback (skips the test when etcd is missing)."""
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    with etcd_cluster(tmp_path / "etcd", 3) as cluster:
        yield cluster


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The one line that says why the etcd tests did not run, and how to run them.
    if ETCD_MISSING and any(
        ETCD_MISSING in str(r.longrepr) for r in terminalreporter.stats.get("skipped", [])
    ):
        terminalreporter.write_line(ETCD_MISSING)
