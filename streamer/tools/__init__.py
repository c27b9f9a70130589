"""Tools beside the service, never imported by it: ``streamer demo``
(``demo``), the end-to-end benchmark (``benchmark``) and the seeded
reference workload they and the reference Puller generate (``workload``).
"""
