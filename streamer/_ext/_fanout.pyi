# Hand-written type stub of the compiled fan-out (streamer/_ext/_fanout.pyx);
# mypy checks the Python side against it.

def frame_deliveries(
    subscription_ids: list[str], owners: bytes, event: bytes
) -> list[tuple[int, bytes]]: ...

def frame_event(
    event_id: str,
    database: str,
    collection: str,
    document_id: str,
    operation: int,
    document_data: bytes,
    timestamp: int,
    progress: str,
) -> bytes: ...
