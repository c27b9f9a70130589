"""A small asyncio client for etcd v3 on ``grpc.aio``: the calls cluster
coordination needs and no more (stubs: ``streamer.cluster.etcdpb``).

    async with EtcdClient(["127.0.0.1:2379"]) as etcd:
        lease = await etcd.lease_grant(5)
        keepalive = etcd.keep_alive(lease, 5, on_lost=fence)
        claim = await etcd.create_if_absent(b"/shards/7", b"node-a", lease)
        await etcd.delete_if_created_at(b"/shards/7", claim.create_revision)  # release
        kvs, revision = await etcd.get_prefix(b"/nodes/")
        async with contextlib.aclosing(etcd.watch_prefix(b"/nodes/", revision + 1)) as events:
            async for event in events: ...

Failures, and the traps they hide:

- Unary calls go to the current endpoint; on ``UNAVAILABLE`` or
  ``DEADLINE_EXCEEDED`` the next endpoint is tried, each once, then
  ``EtcdUnavailable``. A mutation retried that way may have been applied
  by the failed attempt: ``create_if_absent`` then answers ``created=False``
  with the key under the caller's own lease (``Claim.lease``).
- ``keep_alive`` sends a LeaseKeepAlive on one stream every
  ``KEEPALIVE_PERIOD`` seconds (TTL/3 for a TTL under 1.5 s) and reopens
  the stream (on the next endpoint) whenever a write or a read fails or no
  answer comes within TTL/3. After the server dies,
  ``call.write()`` raises ``asyncio.InvalidStateError``, not ``AioRpcError``:
  it is one of the failures retried, not one that ends the task silently.
  The lease is declared lost (``LeaseLost`` to ``on_lost`` and from
  ``KeepAlive.wait()``) when etcd answers TTL 0 (expired or revoked) or no
  keepalive succeeded for a whole TTL; any unexpected error ends it the
  same way, loudly.
- ``watch_prefix`` resumes a broken stream from the revision after the
  last event it yielded (or the last progress notification), on the next
  endpoint; only compaction past that revision ends it (``WatchCompacted``).
- Streams carry etcd's ``hasleader`` metadata: a member cut off from its
  cluster's leader fails them instead of serving a stale view.
- etcd enforces gRPC keepalive pings no more often than every 5 s, and only
  while a call is open (``--grpc-keepalive-min-time``, PermitWithoutStream
  false); anything faster is answered with GOAWAY ``too_many_pings``. The
  channels ping every 10 s, and only with a call open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import grpc

from streamer.cluster.etcdpb import kv_pb2, rpc_pb2, rpc_pb2_grpc
from streamer.errors import (
    EtcdRequestFailed,
    EtcdUnavailable,
    LeaseLost,
    StreamClosed,
    WatchCompacted,
)

log = logging.getLogger(__name__)

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted member is reached again within a second, not gRPC's
    # default backoff of up to two minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
)
REQUIRE_LEADER = (("hasleader", "true"),)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
RETRY_PAUSE = 0.1  # first pause before reopening a broken stream; doubles up to 2 s
# Often, not TTL/3: a holder fences itself a fixed time after its last
# acknowledged keepalive, so a fresher one leaves that much more room for a
# slow event loop (a stall just before the next keepalive would otherwise
# eat a whole TTL/3). Two small messages a second per lease cost etcd little.
KEEPALIVE_PERIOD = 0.5
# What a broken stream raises: AioRpcError from reads and writes, and
# InvalidStateError from a write once the call is done.
_BROKEN = (grpc.aio.AioRpcError, asyncio.InvalidStateError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int  # 0: none


@dataclass(frozen=True)
class Event:
    """A change under a watched prefix; for a delete, ``kv`` has the key and
    ``kv.mod_revision`` is the revision of the delete (no value)."""

    type: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


@dataclass(frozen=True)
class Claim:
    """The answer of ``create_if_absent``: whether this call created the key,
    and the key as it now is (``create_revision`` is the ownership epoch)."""

    created: bool
    create_revision: int
    value: bytes
    lease: int


class _Stubs:
    """One endpoint's channel and the three services on it."""

    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.aio.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        self.kv = rpc_pb2_grpc.KVStub(self.channel)  # type: ignore[no-untyped-call]
        self.lease = rpc_pb2_grpc.LeaseStub(self.channel)  # type: ignore[no-untyped-call]
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)  # type: ignore[no-untyped-call]


def prefix_end(prefix: bytes) -> bytes:
    """etcd's ``range_end`` covering every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"  # every key
    end[-1] += 1
    return bytes(end)


def _kv(kv: kv_pb2.KeyValue) -> KeyValue:
    return KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class EtcdClient:
    """An etcd v3 client over ``endpoints`` (``HOST:PORT`` each, all members
    of one cluster); ``timeout`` bounds each attempt of a unary call."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("EtcdClient needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._current = 0
        self._stubs: dict[str, _Stubs] = {}
        self._keepalives: set[KeepAlive] = set()
        self._closed = False

    def _endpoint(self) -> tuple[str, _Stubs]:
        if self._closed:
            raise StreamClosed("the etcd client is closed")
        endpoint = self.endpoints[self._current]
        if endpoint not in self._stubs:
            self._stubs[endpoint] = _Stubs(endpoint)
        return endpoint, self._stubs[endpoint]

    def _failed_over(self, endpoint: str) -> None:
        """Move on from ``endpoint`` (unless another caller already did)."""
        if self.endpoints[self._current] == endpoint:
            self._current = (self._current + 1) % len(self.endpoints)

    async def _unary(self, what: str, method: Callable[[_Stubs], Any], request: Any) -> Any:
        reason = ""
        for _ in self.endpoints:
            endpoint, stubs = self._endpoint()
            try:
                return await method(stubs)(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRIED:
                    raise EtcdRequestFailed(what, exc.code().name, exc.details() or "") from None
                reason = f"{endpoint}: {_describe(exc)}"
                self._failed_over(endpoint)
        raise EtcdUnavailable(what, self.endpoints, reason)

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd raises it to its minimum, 2 s
        by default); returns its id."""
        request = rpc_pb2.LeaseGrantRequest(TTL=ttl)
        response = await self._unary("lease grant", lambda s: s.lease.LeaseGrant, request)
        if response.error:
            raise EtcdRequestFailed("lease grant", "error", response.error)
        return int(response.ID)

    def keep_alive(
        self, lease_id: int, ttl: int, on_lost: Callable[[LeaseLost], object] | None = None
    ) -> KeepAlive:
        """Keep ``lease_id`` (granted ``ttl`` seconds) alive in the background
        until ``KeepAlive.stop()``, ``lease_revoke`` or ``close``; call it
        right after ``lease_grant``. ``on_lost`` is called once if it is lost."""
        keepalive = KeepAlive(self, lease_id, ttl, on_lost)
        self._keepalives.add(keepalive)
        return keepalive

    async def lease_revoke(self, lease_id: int) -> None:
        """Stop keeping ``lease_id`` alive and revoke it (deleting its keys); a
        lease already gone is not an error."""
        for keepalive in [k for k in self._keepalives if k.lease_id == lease_id]:
            await keepalive.stop()
        request = rpc_pb2.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._unary("lease revoke", lambda s: s.lease.LeaseRevoke, request)
        except EtcdRequestFailed as exc:
            if exc.code != "NOT_FOUND":  # NOT_FOUND: it expired already
                raise

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Set ``key``, attached to ``lease`` if not 0; returns the revision."""
        request = rpc_pb2.PutRequest(key=key, value=value, lease=lease)
        response = await self._lease_call(lease, "put", lambda s: s.kv.Put, request)
        return int(response.header.revision)

    async def get(self, key: bytes) -> KeyValue | None:
        request = rpc_pb2.RangeRequest(key=key)
        response = await self._unary("get", lambda s: s.kv.Range, request)
        return _kv(response.kvs[0]) if response.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` in key order, and the revision read at
        (watch from the one after it to miss nothing)."""
        request = rpc_pb2.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._unary("get prefix", lambda s: s.kv.Range, request)
        return [_kv(kv) for kv in response.kvs], int(response.header.revision)

    async def delete(self, key: bytes) -> bool:
        """Delete ``key``; whether it existed."""
        request = rpc_pb2.DeleteRangeRequest(key=key)
        response = await self._unary("delete", lambda s: s.kv.DeleteRange, request)
        return bool(response.deleted)

    async def create_if_absent(self, key: bytes, value: bytes, lease: int) -> Claim:
        """One transaction: if ``key`` does not exist, put it under ``lease``;
        otherwise read it. The created key's create revision is the revision
        of the transaction."""
        request = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE,
                                     key=key, create_revision=0)],
            success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
                key=key, value=value, lease=lease))],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
        )
        response = await self._lease_call(lease, "create if absent", lambda s: s.kv.Txn, request)
        if response.succeeded:
            return Claim(True, int(response.header.revision), value, lease)
        held = response.responses[0].response_range.kvs[0]
        return Claim(False, int(held.create_revision), held.value, int(held.lease))

    async def delete_if_created_at(self, key: bytes, create_revision: int) -> bool:
        """One transaction: delete ``key`` only if it is still the incarnation
        created at ``create_revision`` (e.g. a shard's owner key at the
        owner's epoch); whether this call deleted it. A retried attempt after
        one that was applied answers False (the key is gone already)."""
        request = rpc_pb2.TxnRequest(
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE,
                                     key=key, create_revision=create_revision)],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=key))],
        )
        response = await self._unary("delete if created at", lambda s: s.kv.Txn, request)
        return bool(response.succeeded)

    async def _lease_call(
        self, lease: int, what: str, method: Callable[[_Stubs], Any], request: Any
    ) -> Any:
        try:
            return await self._unary(what, method, request)
        except EtcdRequestFailed as exc:
            if lease and exc.code == "NOT_FOUND":  # "etcdserver: requested lease not found"
                raise LeaseLost(lease, f"{what}: {exc.details}") from None
            raise

    async def watch_prefix(
        self, prefix: bytes, start_revision: int
    ) -> AsyncGenerator[Event, None]:
        """Every change under ``prefix`` from ``start_revision`` on, in
        revision order, across broken streams and endpoints, until closed
        (``contextlib.aclosing``) or the client is. Raises ``WatchCompacted``
        when etcd no longer has the history it needs."""
        if start_revision < 1:  # 0 would be etcd's "from now": no revision to resume from
            raise ValueError(f"watch_prefix needs a start revision of 1 or more: {start_revision}")
        create = rpc_pb2.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix),
                                            progress_notify=True)
        pause = RETRY_PAUSE
        while True:
            endpoint, stubs = self._endpoint()
            call = stubs.watch.Watch(metadata=REQUIRE_LEADER)
            try:
                create.start_revision = start_revision
                await call.write(rpc_pb2.WatchRequest(create_request=create))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise ConnectionError("etcd ended the watch stream")
                    if response.compact_revision:
                        raise WatchCompacted(prefix, start_revision, response.compact_revision)
                    if response.canceled:  # e.g. the member lost its leader
                        raise ConnectionError(f"watch canceled: {response.cancel_reason}")
                    pause = RETRY_PAUSE
                    for event in response.events:
                        start_revision = event.kv.mod_revision + 1
                        kind: Literal["put", "delete"] = (
                            "delete" if event.type == kv_pb2.Event.DELETE else "put")
                        yield Event(kind, _kv(event.kv))
                    if not response.events and not response.created:
                        # A progress notification: nothing before it is left.
                        start_revision = max(start_revision, response.header.revision + 1)
            except asyncio.CancelledError:
                # Closing the channel cancels its calls, and a cancelled
                # call's read raises CancelledError: not this task's.
                task = asyncio.current_task()
                if self._closed and task is not None and not task.cancelling():
                    return
                raise
            except _BROKEN as exc:
                if self._closed:
                    return
                log.warning("etcd watch of %r at %s broke (%s); resuming from revision %d",
                            prefix, endpoint, _describe(exc), start_revision)
                self._failed_over(endpoint)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                call.cancel()

    async def close(self) -> None:
        """Stop every keepalive (without revoking), end every watch and close
        the channels."""
        self._closed = True
        for keepalive in list(self._keepalives):
            await keepalive.stop()
        for stubs in self._stubs.values():
            await stubs.channel.close()
        self._stubs.clear()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class KeepAlive:
    """The supervised keepalive of one lease (``EtcdClient.keep_alive``).

    ``last_ok`` is the ``time.monotonic()`` at which the last acknowledged
    keepalive was sent, and ``expires_by`` = ``last_ok`` + TTL: etcd cannot
    have expired the lease before it, so a holder that stops acting on it
    by then is fenced. ``error`` is the ``LeaseLost`` once lost."""

    def __init__(
        self, client: EtcdClient, lease_id: int, ttl: int,
        on_lost: Callable[[LeaseLost], object] | None,
    ) -> None:
        self.lease_id = lease_id
        self.ttl = ttl
        self.last_ok = time.monotonic()
        self.error: LeaseLost | None = None
        self._client = client
        self._on_lost = on_lost
        self._task = asyncio.create_task(self._run(), name=f"etcd-keepalive-{lease_id:x}")

    @property
    def expires_by(self) -> float:
        return self.last_ok + self.ttl

    async def wait(self) -> None:
        """Until the keepalive ends: raises its ``LeaseLost``, or returns
        when stopped."""
        await asyncio.wait({self._task})
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        self._client._keepalives.discard(self)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        try:
            await self._keep_alive()
        except LeaseLost as exc:
            self._lost(exc)
        except Exception as exc:  # a bug must not end the keepalive silently either
            self._lost(LeaseLost(self.lease_id, f"keepalive failed: {_describe(exc)}"), exc)

    def _lost(self, error: LeaseLost, cause: BaseException | None = None) -> None:
        error.__cause__ = cause
        self.error = error
        self._client._keepalives.discard(self)
        log.error("%s", error)
        if self._on_lost is not None:
            self._on_lost(error)

    async def _keep_alive(self) -> None:
        reason = "none"
        pause = RETRY_PAUSE
        request = rpc_pb2.LeaseKeepAliveRequest(ID=self.lease_id)
        while self.expires_by > time.monotonic():
            endpoint, stubs = self._client._endpoint()
            call = stubs.lease.LeaseKeepAlive(metadata=REQUIRE_LEADER)
            try:
                while True:
                    sent = time.monotonic()
                    await call.write(request)
                    async with asyncio.timeout(min(self.ttl / 3, self.expires_by - sent)):
                        response = await call.read()
                    if response is grpc.aio.EOF:
                        raise ConnectionError("etcd ended the keepalive stream")
                    if response.TTL <= 0:
                        raise LeaseLost(self.lease_id, "etcd says it expired or was revoked")
                    self.last_ok, self.ttl, pause = sent, int(response.TTL), RETRY_PAUSE
                    period = min(KEEPALIVE_PERIOD, self.ttl / 3)
                    await asyncio.sleep(max(0.0, sent + period - time.monotonic()))
            except _BROKEN as exc:
                reason = f"{endpoint}: {_describe(exc)}"
                log.warning("etcd lease %x keepalive failed (%s); %.1f s left", self.lease_id,
                            reason, self.expires_by - time.monotonic())
                self._client._failed_over(endpoint)
                await asyncio.sleep(min(pause, max(0.0, self.expires_by - time.monotonic())))
                pause = min(pause * 2, 1.0)
            finally:
                call.cancel()
        raise LeaseLost(self.lease_id, f"no keepalive succeeded for its TTL of {self.ttl} s;"
                        f" last failure: {reason}")
