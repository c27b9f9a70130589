"""Wire protocols: generated stubs of ``proto/`` (``make proto``; do not edit).

``streamer_v1_pb2``/``_grpc``: Gateway <-> Streamer (``syntrix.streamer.v1``).
``puller_v1_pb2``/``_grpc``: Streamer -> Puller (``syntrix.puller.v1``).
"""
