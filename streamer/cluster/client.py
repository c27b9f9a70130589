"""The cluster client: ``StreamerClient(cluster="etcd://HOST:PORT[,...]",
gateway_id=...)`` (docs/scaling.md).

It has ``StreamerClient``'s API and semantics (subscribe, subscribe_many,
unsubscribe, marker, deliveries) over one stream per node it needs, each a
``_NodeClient`` (a ``StreamerClient`` to one node: heartbeats, reconnects,
resuming) feeding the one queue ``deliveries()`` reads.

Routing. The client watches the cluster's live nodes in etcd (``nodes/``)
and computes, as every node does, where each subscription belongs: among
the groups of nodes that serve its collection, ``route_group``'s choice;
within that group, the desired owner of its shard (rendezvous placement,
``streamer.cluster.shards``). That node owns the shard, or is taking it
over and accepts it already (``Ownership.accepts``), so a joined node gets
its subscriptions before the old owner releases the shard. A node that
answers ``not_owner`` (its view of the nodes differs for a moment) is asked
again after a pause (``NOT_OWNER_PAUSE``, doubling); a ``subscribe()``
still refused after ``NOT_OWNER_GIVE_UP`` seconds raises the refusal.

Re-homing. When the live nodes change (a node died and its lease expired,
one joined or left), every subscription whose node changed moves: its old
node's client forgets it at once (deliveries received for it from then on
are dropped, its marker stays), and the new node gets it with
``resume_after`` = its marker, the last event it was delivered (or a later
one the server vouched for). So nothing between is lost, and what the old
node sent after that marker and was not yet received is replayed by the
new one. Deliveries are only taken from the node a subscription is at, so
a node that lost its shard (a fenced node stops by itself first) cannot
deliver for it any more.

Subscriptions of a collection no live node serves wait for one (and a
``subscribe()`` for them waits, within its ``timeout``). A cluster client
always says Hello and resumes: the nodes need the Hello to hold it to the
placement, and re-homing needs markers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from streamer.client import StreamerClient, _Answers
from streamer.cluster.etcd import EtcdClient
from streamer.cluster.membership import (
    DEFAULT_CLUSTER,
    NodeInfo,
    NodesView,
    read_nodes,
    route_group,
)
from streamer.cluster.shards import placement, shard_of
from streamer.errors import (
    AccessDenied,
    CannotConnect,
    StreamClosed,
    StreamerError,
    SubscriptionRejected,
)
from streamer.options import etcd_url
from streamer.protocol.streamer_v1_pb2 import (
    GatewayMessage,
    SubscribeRequest,
    SubscribeResponse,
)

log = logging.getLogger(__name__)

NOT_OWNER = "not_owner"
# First pause before asking again after not_owner; doubles up to the cap.
NOT_OWNER_PAUSE = 0.1
NOT_OWNER_PAUSE_MAX = 2.0
# How long a subscribe() call keeps being refused with not_owner before it
# raises the refusal (the cluster's nodes disagree for longer than a
# membership change takes).
NOT_OWNER_GIVE_UP = 30.0
# A subscription moved away from a node while its answer was awaited.
_MOVED = "moved"


class _NodeClient(StreamerClient):
    """The stream to one node, feeding the cluster client's queue. Its
    refusals and failures go to the cluster client."""

    def __init__(self, cluster: ClusterClient, key: str, advertise: str,
                 options: dict[str, Any]) -> None:
        super().__init__(advertise, **options)
        self.key = key
        self._cluster = cluster
        self._deliveries = cluster._deliveries
        # Subscriptions released on this stream after their request went
        # out: what the node queued for that registration before it read
        # the unsubscribe may still come, an answer (the count) and
        # deliveries. Placed here again on the same stream, the first would
        # answer the new request and the others move its marker past
        # events its new registration has still to deliver (resumed after
        # that marker: a gap). So those are dropped until the new request
        # is answered; it goes alone (a batch is answered after the
        # deliveries of its first requests may have gone out).
        self._stale: dict[str, int] = {}
        self._muted = self._stale

    def awaiting(self, sub_id: str) -> bool:
        return sub_id in self._waiters

    @property
    def held(self) -> int:
        return len(self._requests)

    def place(self, requests: list[SubscribeRequest]) -> _Answers:
        return self._register(requests)

    def release(self, sub_id: str) -> None:
        """Forget a subscription moving to another node: its marker goes
        into its request's ``resume_after``, later deliveries for it are
        dropped, the node is told to drop it, and an awaited answer is
        settled as moved."""
        request = self._requests.pop(sub_id, None)
        if request is None:
            return
        marker = self._markers.get(sub_id)
        if marker:
            request.resume_after = marker
        self._forget(sub_id)
        entry = self._waiters.pop(sub_id, None)
        if entry is not None:
            entry[0].answer(entry[1], SubscribeResponse(
                subscription_id=sub_id, success=False, code=_MOVED,
                error="moved to another node"))
        if sub_id in self._sent:
            self._stale[sub_id] = self._stale.get(sub_id, 0) + (entry is not None)
            self._unsubscribe_sent(sub_id)

    def _send_unsent(self) -> None:
        stale = self._stale
        if stale:
            alone = [r for r in self._unsent if r.subscription_id in stale]
            if alone:
                self._unsent = [r for r in self._unsent if r.subscription_id not in stale]
                for request in alone:
                    if self._requests.get(request.subscription_id) is request:
                        self._sent.add(request.subscription_id)
                        self._send(GatewayMessage(subscribe=request))
        super()._send_unsent()

    def _answer(self, response: SubscribeResponse, batch_live_after: str = "") -> None:
        sub_id = response.subscription_id
        old = self._stale.get(sub_id)
        if old:
            self._stale[sub_id] = old - 1  # a released registration's answer
            return
        if old is not None and self._requests.get(sub_id) is not None:
            del self._stale[sub_id]  # the new request's: what follows is its own
        super()._answer(response, batch_live_after)

    def _stream_ended(self) -> None:
        self._stale.clear()  # nothing of the old stream's queue comes any more
        super()._stream_ended()

    def _end(self, error: StreamerError) -> None:
        self._fail_waiters(error)  # the queue is the cluster client's to end

    def _fail(self, error: AccessDenied | CannotConnect) -> None:
        self._end(error)
        self._cluster._fail(error)

    def _rejected(self, error: SubscriptionRejected) -> None:
        self._cluster._refused_again(self, error)


class ClusterClient(StreamerClient):
    """A gateway's client of a Streamer cluster; see the module docstring.
    Made by ``StreamerClient(cluster=...)``, which takes the same options
    as for one node (``batch`` and ``resume`` must stay on)."""

    def __init__(self, target: str | None = None, *, cluster: str, **options: Any) -> None:
        if target is not None:
            raise ValueError("give either a target or a cluster, not both")
        try:
            self.endpoints = etcd_url(cluster)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"cluster: {exc}") from None
        if not options.get("batch", True) or not options.get("resume", True):
            raise ValueError("a cluster client says Hello and resumes: batch and resume "
                             "must stay on")
        super().__init__(cluster, **options)
        self.cluster_name = DEFAULT_CLUSTER
        # Each node's stream retries forever: whether a node is gone is
        # etcd's to say (its lease expires), not a connect timeout's.
        self._options = {**options, "connect_timeout": None, "on_rejected": None}
        self._nodes: dict[str, NodeInfo] = {}
        self._live: set[str] = set()  # link keys of the live nodes
        self._links: dict[str, _NodeClient] = {}  # by "node_id@advertise"
        self._home: dict[str, _NodeClient] = {}  # subscription → the node it is at
        self._routes: dict[str, list[str]] = {}  # collection → link key by shard
        self._check: dict[str, None] = {}  # subscriptions to route again, in order
        self._check_all = False
        self._refusals: dict[str, tuple[float, float]] = {}  # sub → (first refusal, pause)
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._settling: set[asyncio.Task[None]] = set()

    # -- the public API beyond StreamerClient's -------------------------------

    @property
    def connected(self) -> bool:
        """True once the live nodes are known and every node holding a
        subscription of this client is connected."""
        return self._ready.is_set() and all(
            link.connected for link in self._links.values() if link.held)

    @property
    def reconnects(self) -> int:
        return sum(link.reconnects for link in self._links.values())

    @property
    def live_subscriptions(self) -> list[str]:
        home = self._home
        return [s for s in self._requests
                if s not in self._waiters and (link := home.get(s)) is not None
                and not link.awaiting(s)]

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        """The live nodes as this client last saw them, by node id."""
        return dict(self._nodes)

    def node_of(self, subscription_id: str) -> str | None:
        """The id of the node the subscription is at (None: not placed)."""
        link = self._home.get(subscription_id)
        return None if link is None else link.key.partition("@")[0]

    async def unsubscribe(self, subscription_id: str) -> None:
        self._check_open()
        entry = self._waiters.get(subscription_id)
        if entry is not None:
            await asyncio.wait([entry[0].future])
        self._requests.pop(subscription_id, None)
        self._check.pop(subscription_id, None)
        self._refusals.pop(subscription_id, None)
        link = self._home.pop(subscription_id, None)
        if link is not None:
            link.release(subscription_id)

    def marker(self, subscription_id: str) -> str:
        link = self._home.get(subscription_id)
        marker = link.marker(subscription_id) if link is not None else ""
        request = self._requests.get(subscription_id)
        return marker or (request.resume_after if request is not None else "")

    # -- what StreamerClient's subscribe calls -------------------------------

    def _register(
        self, requests: list[SubscribeRequest], answers: _Answers | None = None, first: int = 0
    ) -> _Answers:
        if answers is None:
            answers = _Answers(asyncio.get_running_loop(), len(requests))
        wanted, waiters, check = self._requests, self._waiters, self._check
        for i, request in enumerate(requests, first):
            sub_id = request.subscription_id
            wanted[sub_id] = request
            waiters[sub_id] = (answers, i)
            check[sub_id] = None
        self._wake.set()
        return answers

    def _withdraw(self, requests: list[SubscribeRequest], answers: _Answers) -> None:
        answers.future.cancel()
        for request in requests:
            sub_id = request.subscription_id
            entry = self._waiters.get(sub_id)
            if entry is not None and entry[0] is answers:
                del self._waiters[sub_id]
            if self._requests.get(sub_id) is request:
                del self._requests[sub_id]
                self._check.pop(sub_id, None)
                self._refusals.pop(sub_id, None)
                link = self._home.pop(sub_id, None)
                if link is not None:
                    link.release(sub_id)

    # -- running ---------------------------------------------------------------

    async def _run(self) -> None:
        etcd = EtcdClient(self.endpoints)
        parts = [asyncio.create_task(self._watch(etcd), name="cluster-client-nodes"),
                 asyncio.create_task(self._rebalance_loop(), name="cluster-client-routes")]
        try:
            done, _ = await asyncio.wait(parts, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a bug in either: the client ends, loudly
        except Exception as exc:
            log.exception("cluster client %s failed", self.gateway_id)
            self._end(StreamClosed(f"the cluster client failed: {exc!r}"))
            raise
        finally:
            for task in (*parts, *self._settling):
                task.cancel()
            await asyncio.gather(*parts, *self._settling, return_exceptions=True)
            links, self._links = list(self._links.values()), {}
            await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
            await etcd.close()

    async def _watch(self, etcd: EtcdClient) -> None:
        """Keep the live nodes current, reading them again if the view
        fails; the first read must succeed within ``connect_timeout``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        pause = self.backoff[0]
        while True:
            failed: asyncio.Future[BaseException] = loop.create_future()

            def lost(exc: BaseException, failed: asyncio.Future[BaseException] = failed) -> None:
                if not failed.done():
                    failed.set_result(exc)

            view = self._view(etcd, lost)
            try:
                await view.start()
            except Exception as exc:  # etcd unreachable: EtcdUnavailable and the like
                reason = f"{type(exc).__name__}: {exc}"
                if not self._ready.is_set() and self.connect_timeout is not None and (
                        loop.time() - started > self.connect_timeout):
                    error = CannotConnect(self.target, self.connect_timeout, reason)
                    log.error("giving up: %s", error)
                    self._fail(error)
                    return
                log.warning("cluster %s: cannot read the live nodes (%s); retrying", self.target,
                            reason)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.backoff[1])
                continue
            pause = self.backoff[0]
            self._nodes_changed(read_nodes(view))
            self._ready.set()
            try:
                failure = await failed
                log.warning("cluster %s: the view of the live nodes failed (%r); reading it "
                            "again", self.target, failure)
            finally:
                await view.stop()

    def _view(self, etcd: EtcdClient, lost: Callable[[BaseException], None]) -> NodesView:
        def changed(_: set[bytes]) -> None:
            self._nodes_changed(read_nodes(view))

        view = NodesView(etcd, self.cluster_name, changed, lost)
        return view

    def _nodes_changed(self, nodes: dict[str, NodeInfo]) -> None:
        if nodes == self._nodes and self._ready.is_set():
            return
        self._nodes = nodes
        self._live = {f"{n.node_id}@{n.advertise}" for n in nodes.values()}
        self._routes.clear()
        self._check_all = True
        self._wake.set()

    def _fail(self, error: AccessDenied | CannotConnect) -> None:
        if self._failure is not None:
            return
        super()._fail(error)
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # a node refused the credentials: nothing more to do

    async def _rebalance_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._ready.is_set():
                self._rebalance()
            await asyncio.sleep(0)  # a burst of subscribe() calls routes together

    # -- routing ---------------------------------------------------------------

    def _route(self, request: SubscribeRequest) -> str | None:
        """The key of the node a request belongs at (None: no live node
        serves its collection)."""
        table = self._routes.get(request.collection)
        if table is None:
            table = self._routes[request.collection] = self._table(request.collection)
        return table[shard_of(request.subscription_id)] if table else None

    def _table(self, collection: str) -> list[str]:
        nodes = self._nodes
        group = route_group(collection, nodes.values())
        if group is None:
            return []
        owners = placement([n for n, info in nodes.items() if info.group == group])
        return [f"{owners[s]}@{nodes[owners[s]].advertise}" for s in range(len(owners))]

    def _rebalance(self) -> None:
        """Place what is not placed and move what is at the wrong node."""
        if self._check_all:
            self._check_all = False
            ids: Iterable[str] = list(self._requests)
            self._check.clear()
        else:
            ids, self._check = list(self._check), {}
        wanted, home, live = self._requests, self._home, self._live
        moves: dict[str, list[SubscribeRequest]] = {}
        unroutable = 0
        for sub_id in ids:
            request = wanted.get(sub_id)
            if request is None:
                continue
            target = self._route(request)
            link = home.get(sub_id)
            if link is not None:
                if link.key == target:
                    continue
                if link.key in live and (target is None or link.awaiting(sub_id)):
                    continue  # stays until routable, or until answered (checked again then)
                link.release(sub_id)
                del home[sub_id]
            if target is None:
                unroutable += 1
                continue
            moves.setdefault(target, []).append(request)
        if unroutable:
            log.warning("%d subscription(s) wait for a live node serving their collection",
                        unroutable)
        for key, requests in moves.items():
            link = self._links.get(key)
            if link is None:
                advertise = key.partition("@")[2]
                link = self._links[key] = _NodeClient(self, key, advertise, self._options)
                link.start()
            for request in requests:
                home[request.subscription_id] = link
            answers = link.place(requests)
            task = asyncio.create_task(self._settle(link, requests, answers))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
        for key, link in list(self._links.items()):
            if key not in live and not link.held:
                del self._links[key]
                task = asyncio.create_task(link.close())
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)

    async def _settle(self, link: _NodeClient, requests: list[SubscribeRequest],
                      answers: _Answers) -> None:
        """Act on a node's answers to requests placed there."""
        await asyncio.wait([answers.future])
        loop = asyncio.get_running_loop()
        for request, response in zip(requests, answers.responses, strict=True):
            sub_id = request.subscription_id
            if response is None or self._requests.get(sub_id) is not request or (
                    self._home.get(sub_id) is not link):
                continue  # withdrawn or moved meanwhile
            if response.success:
                self._refusals.pop(sub_id, None)
                self._answer_caller(sub_id, response)
                if self._route(request) != link.key:
                    self._check[sub_id] = None  # the nodes changed while it was asked
                    self._wake.set()
            elif response.code == NOT_OWNER:
                del self._home[sub_id]
                self._not_owner(sub_id, response, loop.time())
            else:
                del self._home[sub_id]
                del self._requests[sub_id]
                self._refusals.pop(sub_id, None)
                if not self._answer_caller(sub_id, response):
                    super()._rejected(SubscriptionRejected(sub_id, response.code, response.error))

    def _answer_caller(self, sub_id: str, response: SubscribeResponse) -> bool:
        """Answer the ``subscribe()`` call waiting for ``sub_id``, if any."""
        entry = self._waiters.pop(sub_id, None)
        if entry is None:
            return False
        entry[0].answer(entry[1], response)
        return True

    def _not_owner(self, sub_id: str, response: SubscribeResponse, now: float) -> None:
        """Ask again after a pause; a waiting caller gets the refusal once
        ``NOT_OWNER_GIVE_UP`` has passed."""
        first, pause = self._refusals.get(sub_id, (now, NOT_OWNER_PAUSE / 2))
        if sub_id in self._waiters and now - first > NOT_OWNER_GIVE_UP:
            del self._requests[sub_id]
            self._refusals.pop(sub_id, None)
            self._answer_caller(sub_id, response)
            return
        pause = min(pause * 2, NOT_OWNER_PAUSE_MAX)
        self._refusals[sub_id] = (first, pause)
        if pause == NOT_OWNER_PAUSE_MAX:
            log.warning("subscription %s: refused with not_owner since %.0f s: %s", sub_id,
                        now - first, response.error)
        asyncio.get_running_loop().call_later(pause, self._again, sub_id)

    def _again(self, sub_id: str) -> None:
        if sub_id in self._requests and sub_id not in self._home:
            self._check[sub_id] = None
            self._wake.set()

    def _refused_again(self, link: _NodeClient, error: SubscriptionRejected) -> None:
        """A node refused a re-subscription after its stream came back."""
        sub_id = error.subscription_id
        if self._home.get(sub_id) is not link:
            return  # moved meanwhile
        del self._home[sub_id]
        if error.code == NOT_OWNER:
            response = SubscribeResponse(subscription_id=sub_id, success=False, code=error.code,
                                         error=error.error)
            self._not_owner(sub_id, response, asyncio.get_running_loop().time())
        elif error.code != _MOVED:
            self._requests.pop(sub_id, None)
            super()._rejected(error)

