"""The reference Puller: change sources, a durable replay log and the ``puller.v1`` server."""
