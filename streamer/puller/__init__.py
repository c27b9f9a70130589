"""The reference Puller (``streamer puller``): serves ``puller.v1`` from a
durable replay log that one source fills.

- ``log``: the replay log (positions, markers, segments, crash recovery,
  retention).
- ``server``: the ``PullerService`` gRPC servicer over the log.
- ``sources``: the ``Source`` protocol, the workload and replay sources, the
  replay-file format and its recorder.
- ``mongo``: the MongoDB change-stream source (pymongo, the ``mongodb``
  extra), with the JSON rendering of BSON documents.
"""
