"""Virtual shards and rendezvous placement (streamer.cluster.shards)."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from streamer.cluster.shards import SHARDS, moved, owner_of, placement, shard_of

node_ids = st.lists(st.text(min_size=1, max_size=12).filter(lambda s: "\0" not in s),
                    min_size=1, max_size=12, unique=True)


def test_a_shard_is_the_same_in_another_process() -> None:
    # Python's own hash() is salted per process; the shard must not be.
    ids = [f"sub-{k}" for k in range(50)]
    here = [shard_of(i) for i in ids]
    there = subprocess.run(
        [sys.executable, "-c",
         "from streamer.cluster.shards import shard_of;"
         f"print([shard_of(i) for i in {ids!r}])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    assert there == repr(here)
    assert all(0 <= s < SHARDS for s in here)


def test_shards_and_owners_spread_evenly() -> None:
    counts = [0] * SHARDS
    for k in range(100_000):
        counts[shard_of(f"sub-{k}")] += 1
    # 390 expected per shard; a fair hash stays well within this.
    assert min(counts) > 300 and max(counts) < 480
    owners = placement(["n1", "n2", "n3"])
    per_node = {n: list(owners.values()).count(n) for n in ("n1", "n2", "n3")}
    assert sum(per_node.values()) == SHARDS
    assert all(60 <= c <= 110 for c in per_node.values()), per_node  # 85 each, ideally


def test_no_nodes_means_no_owner() -> None:
    assert owner_of(7, []) is None and placement([]) == {}


@given(node_ids, st.text(min_size=1, max_size=12).filter(lambda s: "\0" not in s))
def test_a_joining_node_takes_shards_only_for_itself(nodes: list[str], new: str) -> None:
    if new in nodes:
        return
    before, after = placement(nodes), placement([*nodes, new])
    assert all(after[s] == new for s in moved(before, after))


@given(node_ids)
def test_a_leaving_node_moves_only_its_own_shards(nodes: list[str]) -> None:
    gone, rest = nodes[0], nodes[1:]
    before, after = placement(nodes), placement(rest)
    changed = moved(before, after)
    assert all(before[s] == gone for s in changed)
    if rest:
        assert changed == {s for s, owner in before.items() if owner == gone}


@given(node_ids, st.integers(0, SHARDS - 1))
def test_the_owner_does_not_depend_on_the_order_of_the_nodes(nodes: list[str], shard: int) -> None:
    assert owner_of(shard, nodes) == owner_of(shard, list(reversed(nodes)))
    assert owner_of(shard, nodes) in nodes
