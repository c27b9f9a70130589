"""The Streamer node: the service ``streamer serve`` runs.

Its parts: the gateway-facing gRPC service (``server``), gateway sessions
and the subscriptions they hold (``gateways``), the Puller consumer
(``ingest``) with the event transformation (``events``), delivery framing
and per-gateway queues (``delivery``), the durable progress marker
(``progress``), metrics and authentication.
"""
