"""Cluster membership, shard ownership and fencing through etcd
(``streamer.cluster.etcd``), as issue 12 designs them.

Keys, under the cluster prefix ``/streamer/<cluster>/``:

- ``nodes/<node_id>``: JSON ``{"advertise": "HOST:PORT", "collections":
  [...]}`` (an empty list: every collection), under the node's lease.
- ``shards/<group>/<n>``: the owner's node id, under the owner's lease.
  The key's create revision is the ownership *epoch*: a later owner of the
  same shard always has a larger one. ``<group>`` is the node's collection
  group (``group_of``: ``*`` for a node serving every collection): each
  group of nodes serving the same collections splits the shards among
  itself, so a subscription has one owner per group that serves its
  collection (the cluster client picks one group, ``route_group``).

``Membership`` holds the node's lease (granted with ``ttl`` seconds, kept
alive every 0.5 s), registers the node under it and keeps ``nodes``, every
live node, current with a prefix watch. It is *deliverable* only while the
last acknowledged keepalive is younger than ``ttl - margin`` (margin
``max(1 s, ttl/3)``): etcd cannot expire the lease before ``last_ok +
ttl``, so a node that stops delivering at ``last_ok + ttl - margin`` has
stopped before any other node can own its shards. A lease found lost (etcd
says so, or no keepalive succeeded for a whole TTL), or any failure of the
watches or claims, fences the node for good: ``error`` is set,
``on_failed`` is called and ``wait()`` raises it. A node then stops (and
starts again as a new member with a new lease).

``Ownership`` keeps every shard's owner and epoch current with a watch on
``shards/<group>/``, computes the desired placement (``shards.placement``)
over the live nodes of its group, and claims each shard this node should
own and nobody owns, with a create-if-absent transaction under the node's
lease.

What is deliberately left to the node (and the cluster client):

- The graceful handover. A shard this node holds but another live node
  should own is listed by ``Ownership.handovers()``; it is *not* released
  by itself. The node re-homes the shard's gateways first (they
  re-subscribe at the new owner with ``resume_after``), then calls
  ``release(shard)``, which deletes the owner key only if it is still this
  node's incarnation (same epoch); the new owner's watch sees the delete
  and claims it. How the gateways are told, and how long the node waits
  for them, is the node's protocol.
- Acting on fencing: ``Membership.deliverable()`` (and
  ``Ownership.deliverable(shard)``) must be checked before each delivery,
  or the node schedules its own check at ``deliverable_until``.
- Restarting after ``error``: a new ``Membership`` (a new lease).
- Routing: which group serves a collection (``route_group``) and which
  node of it a subscription goes to is computed by the cluster client
  (``streamer.cluster.client``) from the same live nodes.
- A node id used by two live processes at once is not detected: the later
  ``put`` takes ``nodes/<id>`` over, and shards held under the other
  process's lease are not counted as this one's (``owned()`` compares the
  lease, not the id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

from streamer.cluster import shards as _shards
from streamer.cluster.etcd import EtcdClient, Event, KeepAlive, KeyValue
from streamer.errors import (
    ClusterError,
    EtcdUnavailable,
    LeaseLost,
    MembershipFailed,
    StreamClosed,
    WatchCompacted,
)

log = logging.getLogger(__name__)

DEFAULT_TTL = 5
DEFAULT_CLUSTER = "streamer"  # the cluster name nodes and clients use: /streamer/streamer/
ALL = "*"  # the group of the nodes serving every collection
RETRY_PAUSE = 0.1  # first pause before retrying etcd; doubles up to 2 s
RECHECK = 1.0  # the claim loop looks again at least this often


def cluster_prefix(cluster: str) -> bytes:
    _check_name("cluster", cluster)
    return f"/streamer/{cluster}/".encode()


def node_key(cluster: str, node_id: str) -> bytes:
    _check_name("node id", node_id)
    return cluster_prefix(cluster) + b"nodes/" + node_id.encode()


def shard_key(cluster: str, shard: int, group: str = ALL) -> bytes:
    return cluster_prefix(cluster) + f"shards/{group}/{shard}".encode()


def group_of(collections: Iterable[str]) -> str:
    """The collection group of a node serving ``collections`` (empty: every
    collection, ``ALL``): the same for every node serving exactly these,
    and a single key segment whatever the names."""
    names = sorted(set(collections))
    return quote(",".join(names), safe="") if names else ALL


def route_group(collection: str, nodes: Iterable[NodeInfo]) -> str | None:
    """The group whose nodes a subscription to ``collection`` goes to: of
    the groups serving it, the one serving the fewest collections (a group
    made for it takes it off the general nodes), the smaller name on a tie;
    None when no live node serves it. Every client computes the same."""
    best: tuple[int, str] | None = None
    for node in nodes:
        if node.serves(collection):
            candidate = (len(node.collections) or math.inf, node.group)
            if best is None or candidate < best:
                best = candidate  # type: ignore[assignment]
    return None if best is None else best[1]


def fence_margin(ttl: float) -> float:
    """How long before the lease can expire a node stops delivering."""
    return max(1.0, ttl / 3)


def _check_name(what: str, name: str) -> None:
    if not name or "/" in name or "\0" in name:
        raise ValueError(f"{what} must be non-empty, without '/' or NUL: {name!r}")


@dataclass(frozen=True)
class NodeInfo:
    """A live node as registered under ``nodes/<node_id>``."""

    node_id: str
    advertise: str
    collections: tuple[str, ...]  # empty: every collection
    lease: int
    revision: int  # the registration's create revision

    def serves(self, collection: str) -> bool:
        return not self.collections or collection in self.collections

    @property
    def group(self) -> str:
        return group_of(self.collections)


@dataclass(frozen=True)
class ShardOwner:
    """A shard's owner as etcd has it: the node id, the epoch (the owner
    key's create revision) and the lease it is held under."""

    node_id: str
    epoch: int
    lease: int


class _PrefixView:
    """Every key under ``prefix``, kept current: a ``get_prefix``, then a
    watch from the revision after it (read again on compaction). ``changed``
    is called with the keys that changed; ``failed`` once if the view can
    no longer be maintained (it then stops)."""

    def __init__(
        self, client: EtcdClient, prefix: bytes, changed: Callable[[set[bytes]], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.kvs: dict[bytes, KeyValue] = {}
        self.revision = 0  # every change up to it is applied
        self._read_at = 0  # the revision of the last get_prefix
        self._changed = changed
        self._failed = failed
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._load()
        self._task = asyncio.create_task(self._run(), name=f"etcd-view-{self.prefix!r}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _load(self) -> None:
        kvs, revision = await self.client.get_prefix(self.prefix)
        old, self.kvs = self.kvs, {kv.key: kv for kv in kvs}
        self.revision = self._read_at = revision
        changed = {k for k in old.keys() | self.kvs.keys() if old.get(k) != self.kvs.get(k)}
        if changed:
            self._changed(changed)

    async def _run(self) -> None:
        try:
            while True:
                try:
                    async with contextlib.aclosing(
                        self.client.watch_prefix(self.prefix, self.revision + 1)
                    ) as events:
                        async for event in events:
                            self._apply(event)
                    raise StreamClosed("the etcd client was closed under the view")
                except WatchCompacted as exc:
                    log.warning("%s; reading %r again", exc, self.prefix)
                    await _retrying(self._load)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(exc)

    def _apply(self, event: Event) -> None:
        if event.revision <= self._read_at:
            return  # already in the last read
        # (Not "<= self.revision": a revoked lease's keys go in one revision.)
        if event.type == "put":
            self.kvs[event.kv.key] = event.kv
        else:
            self.kvs.pop(event.kv.key, None)
        self.revision = event.revision
        self._changed({event.kv.key})


class NodesView(_PrefixView):
    """The live nodes of a cluster (``nodes/``), kept current."""

    def __init__(
        self, client: EtcdClient, cluster: str, changed: Callable[[set[bytes]], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        super().__init__(client, cluster_prefix(cluster) + b"nodes/", changed, failed)


def read_nodes(view: _PrefixView) -> dict[str, NodeInfo]:
    """The nodes registered in a view of ``nodes/``, by id (malformed
    registrations are logged and left out)."""
    nodes: dict[str, NodeInfo] = {}
    for kv in view.kvs.values():
        node_id = kv.key[len(view.prefix):].decode(errors="replace")
        try:
            info = json.loads(kv.value)
            nodes[node_id] = NodeInfo(
                node_id, str(info["advertise"]),
                tuple(sorted({str(c) for c in info.get("collections", ())})),
                kv.lease, kv.create_revision)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the malformed registration %r: %s", kv.key, exc)
    return nodes


async def _retrying(call: Callable[[], Awaitable[None]]) -> None:
    """``call()`` until etcd answers it (``EtcdUnavailable`` is retried)."""
    pause = RETRY_PAUSE
    while True:
        try:
            return await call()
        except EtcdUnavailable as exc:
            log.warning("%s; retrying in %.1f s", exc, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)


class Membership:
    """This node's membership of ``cluster`` (see the module's docstring).

    ``on_change(nodes)`` is called, and ``changed`` set, whenever the live
    nodes change; ``on_failed(error)`` once if the node is fenced for good
    (a ``LeaseLost`` or a ``MembershipFailed``)."""

    def __init__(
        self, client: EtcdClient, cluster: str, node_id: str, advertise: str, *,
        collections: Iterable[str] = (), ttl: int = DEFAULT_TTL, margin: float | None = None,
        on_change: Callable[[Mapping[str, NodeInfo]], object] | None = None,
        on_failed: Callable[[BaseException], object] | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"the lease TTL must be 2 s or more (etcd's minimum): {ttl}")
        self.margin = fence_margin(ttl) if margin is None else margin
        if not ttl / 3 < ttl - self.margin:
            raise ValueError(f"a margin of {self.margin} s leaves no keepalive interval"
                             f" of a {ttl} s lease before fencing")
        self.client = client
        self.cluster = cluster
        self.node_id = node_id
        self.advertise = advertise
        self.collections = tuple(sorted(set(collections)))
        self.group = group_of(self.collections)
        self.ttl = ttl
        self.prefix = cluster_prefix(cluster)
        self.key = node_key(cluster, node_id)
        self.lease = 0
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self._on_change = on_change
        self._on_failed = on_failed
        self._listeners: list[Callable[[], object]] = []
        self._nodes: dict[str, NodeInfo] = {}
        self._view = NodesView(client, cluster, self._nodes_changed, self._fail)
        self._keepalive: KeepAlive | None = None
        self._granted_at = 0.0
        self._keepalive_started = 0.0
        self._state = "new"  # new, running, stopped
        self._done = asyncio.Event()

    # -- the view -----------------------------------------------------------

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        """Every live node (this one included once started), by node id."""
        return self._nodes

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` on every change of the live nodes and once
        the node is fenced for good."""
        self._listeners.append(listener)

    def _nodes_changed(self, keys: set[bytes]) -> None:
        nodes = read_nodes(self._view)
        if nodes == self._nodes:
            return
        self._nodes = nodes
        self.changed.set()
        self._notify()
        if self._on_change is not None:
            self._on_change(nodes)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Grant the lease, keep it alive, register the node and read the
        live nodes; then watch them."""
        if self._state != "new":
            raise RuntimeError("a Membership is started once")
        self._state = "running"
        self._granted_at = time.monotonic()
        self.lease = await self.client.lease_grant(self.ttl)
        self._keepalive_started = time.monotonic()
        self._keepalive = self.client.keep_alive(self.lease, self.ttl, on_lost=self._fail)
        value = json.dumps({"advertise": self.advertise, "collections": list(self.collections)})
        await self.client.put(self.key, value.encode(), self.lease)
        await self._view.start()

    async def stop(self) -> None:
        """Leave: stop watching and revoke the lease, which deletes the
        node's key and every shard it owns at once. If etcd cannot be
        reached the keys go when the lease expires."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        self._done.set()
        await self._view.stop()
        if self._keepalive is not None:
            await self._keepalive.stop()
        if self.lease and not isinstance(self.error, LeaseLost):
            try:
                await self.client.lease_revoke(self.lease)
            except (EtcdUnavailable, StreamClosed) as exc:
                log.warning("node %s left without revoking its lease (%s); its keys go"
                            " when the lease expires", self.node_id, exc)

    async def wait(self) -> None:
        """Until stopped (returns) or fenced for good (raises ``error``)."""
        await self._done.wait()
        if self.error is not None:
            raise self.error

    def _fail(self, error: BaseException) -> None:
        if self.error is not None or self._state == "stopped":
            return
        if not isinstance(error, ClusterError):
            failure = MembershipFailed(f"node {self.node_id}: {type(error).__name__}: {error}")
            failure.__cause__ = error
            error = failure
        self.error = error
        log.error("node %s fenced for good: %s", self.node_id, error)
        self._done.set()
        self.changed.set()
        self._notify()
        if self._on_failed is not None:
            self._on_failed(error)

    # -- fencing ------------------------------------------------------------

    @property
    def deliverable_until(self) -> float:
        """The ``time.monotonic()`` from which this node must not deliver
        (unless a keepalive succeeds before): the last acknowledged
        keepalive (or the grant) + TTL - margin; -inf once fenced for good."""
        keepalive = self._keepalive
        if keepalive is None or self.error is not None or self._state != "running":
            return -math.inf
        # Until its first answer, the keepalive's clock started after the
        # grant: count from before the grant was asked for.
        ok = keepalive.last_ok if keepalive.last_ok > self._keepalive_started else self._granted_at
        return ok + self.ttl - self.margin

    def deliverable(self) -> bool:
        """Whether this node may deliver for the shards it owns now."""
        return time.monotonic() < self.deliverable_until

    @property
    def fenced(self) -> bool:
        return not self.deliverable()

    @property
    def last_ok(self) -> float:
        """When the last acknowledged keepalive was sent (monotonic)."""
        return self._keepalive.last_ok if self._keepalive is not None else -math.inf


class Ownership:
    """Who owns each shard, and this node's claims (see the module's
    docstring). Start it after its ``Membership``; stop it before.

    ``on_change(shards)`` is called with the shards whose owner changed
    (``owner(shard)`` has the new one)."""

    def __init__(
        self, membership: Membership, *, shards: int = _shards.SHARDS,
        on_change: Callable[[set[int]], object] | None = None,
    ) -> None:
        self.membership = membership
        self.shards = shards
        self.group = membership.group
        self._prefix = membership.prefix + f"shards/{self.group}/".encode()
        self._desired: dict[int, str] | None = None  # recomputed when the nodes change
        self._owners: dict[int, ShardOwner] = {}
        # Claims this node made that the watch has not shown yet: shard -> epoch.
        self._claimed: dict[int, int] = {}
        self._claiming: set[int] = set()
        self._on_change = on_change
        self._view = _PrefixView(membership.client, self._prefix, self._shards_changed,
                                 membership._fail)
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.membership._state != "running":
            raise RuntimeError("start the Membership before its Ownership")
        await self._view.start()
        self.membership.add_listener(self._nodes_changed)
        self._dirty.set()
        self._task = asyncio.create_task(self._claim_loop(), name="shard-claims")

    async def stop(self) -> None:
        """Stop claiming and watching (releases nothing: the membership's
        ``stop`` revokes the lease, which deletes every owner key at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._view.stop()

    # -- the view -----------------------------------------------------------

    def _nodes_changed(self) -> None:
        self._desired = None
        self._dirty.set()

    def _shards_changed(self, keys: set[bytes]) -> None:
        changed: set[int] = set()
        for key in keys:
            try:
                shard = int(key[len(self._prefix):])
            except ValueError:
                log.warning("ignoring the key %r", key)
                continue
            kv = self._view.kvs.get(key)
            owner = None if kv is None else ShardOwner(kv.value.decode(errors="replace"),
                                                       kv.create_revision, kv.lease)
            if owner is None:
                self._owners.pop(shard, None)
            else:
                self._owners[shard] = owner
            changed.add(shard)
        # Claims the view has caught up with are in it (or gone since).
        self._claimed = {s: e for s, e in self._claimed.items() if e > self._view.revision}
        self._dirty.set()
        if changed and self._on_change is not None:
            self._on_change(changed)

    def owner(self, shard: int) -> ShardOwner | None:
        """The shard's current owner, None while it has none."""
        epoch = self._claimed.get(shard)
        if epoch is not None:
            return ShardOwner(self.membership.node_id, epoch, self.membership.lease)
        return self._owners.get(shard)

    def owners(self) -> dict[int, ShardOwner]:
        """Every owned shard's owner."""
        owners = dict(self._owners)
        for shard in self._claimed:
            owner = self.owner(shard)
            assert owner is not None
            owners[shard] = owner
        return owners

    def owned(self) -> dict[int, int]:
        """The shards this node holds (under its current lease), with their
        epochs. Deliver for them only while ``deliverable()``."""
        lease = self.membership.lease
        return {s: o.epoch for s, o in self.owners().items() if lease and o.lease == lease}

    def deliverable(self, shard: int) -> bool:
        """Whether this node may deliver for ``shard`` now."""
        return self.membership.deliverable() and shard in self.owned()

    def desired(self) -> dict[int, str]:
        """Every shard's desired owner among the live nodes of this node's
        group (read-only: shared until the nodes change)."""
        if self._desired is None:
            group = self.group
            self._desired = _shards.placement(
                [n for n, info in self.membership.nodes.items() if info.group == group],
                self.shards)
        return self._desired

    def accepts(self, shard: int) -> bool:
        """Whether this node takes a cluster client's subscription on
        ``shard``: it owns the shard, or should own it and is taking it over
        (a joined node: the gateways re-home to it first, then the old owner
        releases the shard)."""
        owner = self.owner(shard)
        if owner is not None and owner.lease == self.membership.lease:
            return True
        return self.desired().get(shard) == self.membership.node_id

    def handovers(self) -> set[int]:
        """Shards this node holds that another live node should own: to
        release (``release``) once their gateways have re-homed."""
        desired = self.desired()
        me = self.membership.node_id
        return {s for s in self.owned() if desired.get(s, me) != me}

    def awaited(self) -> set[int]:
        """Shards this node should own that another node still holds."""
        desired = self.desired()
        me = self.membership.node_id
        owned = self.owned()
        return {s for s, node in desired.items()
                if node == me and s not in owned and self.owner(s) is not None}

    def settled(self) -> bool:
        """Whether every shard is owned by its desired owner."""
        owners = self.owners()
        nodes = self.membership.nodes
        return len(owners) == self.shards and all(
            (o := owners.get(s)) is not None and o.node_id == node and o.lease == nodes[node].lease
            for s, node in self.desired().items())

    # -- claims and releases ------------------------------------------------

    async def release(self, shard: int) -> bool:
        """Delete the shard's owner key if this node still holds it at the
        same epoch; whether it did. The desired owner then claims it."""
        epoch = self.owned().get(shard)
        if epoch is None:
            return False
        deleted = await self.membership.client.delete_if_created_at(
            shard_key(self.membership.cluster, shard, self.group), epoch)
        if deleted:
            self._claimed.pop(shard, None)
        return deleted

    async def _claim_loop(self) -> None:
        pause = RETRY_PAUSE
        try:
            while self.membership.error is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK):
                        await self._dirty.wait()
                self._dirty.clear()
                if not self.membership.deliverable():
                    continue  # a claim now could not be acted on anyway
                try:
                    await self._claim_missing()
                    pause = RETRY_PAUSE
                except EtcdUnavailable as exc:
                    log.warning("shard claims: %s; retrying in %.1f s", exc, pause)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 2.0)
                    self._dirty.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # LeaseLost, or what retrying cannot fix: loudly
            self.membership._fail(exc)

    async def _claim_missing(self) -> None:
        me = self.membership.node_id
        wanted = [s for s, node in self.desired().items()
                  if node == me and self.owner(s) is None and s not in self._claiming]
        if not wanted:
            return
        results = await asyncio.gather(*(self._claim(s) for s in wanted),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _claim(self, shard: int) -> None:
        self._claiming.add(shard)
        try:
            membership = self.membership
            claim = await membership.client.create_if_absent(
                shard_key(membership.cluster, shard, self.group), membership.node_id.encode(),
                membership.lease)
        finally:
            self._claiming.discard(shard)
        # created=False under our own lease: an earlier attempt of this
        # claim was applied (a retried transaction).
        if (claim.created or claim.lease == membership.lease) and (
                claim.create_revision > self._view.revision):
            self._claimed[shard] = claim.create_revision
            if self._on_change is not None:
                self._on_change({shard})
