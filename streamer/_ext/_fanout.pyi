# Hand-written type stub of the compiled fan-out (streamer/_ext/_fanout.pyx);
# mypy checks the Python side against it.

from streamer._ext._core import Core

def fan_out(
    index: Core,
    database: str,
    collection: str,
    document_id: str | None,
    document: object,
    event: bytes,
    pending: dict[int, list[bytes]],
) -> tuple[int, int]: ...

def frame_deliveries(
    subscription_ids: list[str], owners: bytes, event: bytes, pending: dict[int, list[bytes]]
) -> int: ...

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
