"""Virtual shards and who should own them: the placement rule every node
and every cluster client computes alike, with no coordination beyond the
list of live nodes.

A subscription belongs to shard ``shard_of(id)``: a stable hash of its id
(BLAKE2b, not Python's ``hash``, which differs from process to process)
modulo ``SHARDS``. A shard's desired owner among the live nodes is chosen
by rendezvous (highest-random-weight) hashing: each node scores each
shard, the highest score wins. So when a node joins, the only shards that
move are those the new node now wins, and when a node leaves, only its own
shards move; each to a node chosen as evenly as the hash allows.

Who *actually* owns a shard is decided in etcd (the claim under the
owner's lease); this module only says who should.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

# Enough shards that 100 nodes still get a couple each, few enough that a
# whole table is cheap to recompute on every membership change.
SHARDS = 256


def _score(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def shard_of(subscription_id: str, shards: int = SHARDS) -> int:
    """The shard of a subscription id, the same in every process."""
    return _score(subscription_id.encode()) % shards


def owner_of(shard: int, nodes: Iterable[str]) -> str | None:
    """The node that should own ``shard`` (None without nodes): the one
    scoring highest for it, the smaller node id on a tie."""
    best: tuple[int, str] | None = None
    for node in nodes:
        # The id is hashed apart from the shard number (a zero byte cannot
        # occur in an id), so "n1" with shard 12 and "n11" with shard 2
        # never hash the same input.
        candidate = (_score(f"{node}\0{shard}".encode()), node)
        if best is None or candidate[0] > best[0] or (
            candidate[0] == best[0] and candidate[1] < best[1]
        ):
            best = candidate
    return None if best is None else best[1]


def placement(nodes: Iterable[str], shards: int = SHARDS) -> dict[int, str]:
    """Every shard's desired owner among ``nodes`` (empty without nodes)."""
    live = sorted(set(nodes))
    if not live:
        return {}
    return {shard: owner for shard in range(shards) if (owner := owner_of(shard, live))}


def moved(before: Mapping[int, str], after: Mapping[int, str]) -> set[int]:
    """The shards whose desired owner differs between two placements."""
    return {shard for shard in before.keys() | after.keys()
            if before.get(shard) != after.get(shard)}
