"""etcd's v3 API: generated stubs of ``proto/streamer/cluster/etcdpb/`` (``make
proto``; do not edit), vendored from etcd v3.4.23 (see NOTICE.md there).

``rpc_pb2``/``_grpc``: the ``etcdserverpb.KV``, ``Watch`` and ``Lease`` services.
``kv_pb2``: ``mvccpb.KeyValue`` and ``mvccpb.Event``.
"""
