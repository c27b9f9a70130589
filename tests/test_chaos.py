"""The cluster chaos run, short (``streamer.tools.chaos``; the full run is
``bench/bench_chaos.py``): a Puller, 3 cluster nodes, a 3-member etcd and
2 gateway processes holding 2,000 subscriptions, with about 60 s of seeded
``kill -9``s of each kind (a node, a gateway, the Puller, an etcd member),
each started again. The nodes' lease TTL is 3 s (5 by default): a killed
node's shards come back sooner, and a kill of the etcd leader may fence a
node (it exits, and is started again). Every gateway's recorded
deliveries, per subscription,
must be the expected ones from the Puller's log in order: none missing,
no jump, none out of order (duplicates allowed and printed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from etcd_helpers import ETCD_MISSING

from streamer.tools.chaos import KINDS, Config, run

SHORT = Config(subscriptions=2000, gateways=2, rate=100.0, duration=60.0, seed=1,
               pause=(3.0, 6.0), downtime=(0.5, 2.0), lease_ttl=3)


@pytest.mark.timeout(600)
def test_chaos_short(tmp_path: Path) -> None:
    if ETCD_MISSING:
        pytest.skip(ETCD_MISSING)
    figures = run(SHORT, tmp_path)
    print("\n" + json.dumps({k: figures[k] for k in ("kills", "unplanned_restarts", "finish",
                                                     "outcome")}, indent=1))
    killed = {kill["kind"] for kill in figures["kills"]}
    assert killed == set(KINDS)
    outcome = figures["outcome"]
    assert outcome["deliveries"] > 0
    assert outcome["missing"] == 0, outcome["examples"]
    assert outcome["unexplained_jumps"] == 0, outcome["examples"]
    assert outcome["out_of_order"] == 0, outcome["examples"]
    assert outcome["unexpected"] == 0, outcome["examples"]
