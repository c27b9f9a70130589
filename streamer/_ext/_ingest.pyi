# Hand-written type stub of the compiled ingest step (streamer/_ext/_ingest.pyx);
# mypy checks the Python side against it.
from collections.abc import Callable, Iterable

from streamer._ext._core import Core
from streamer.protocol.puller_v1_pb2 import PullerEvent

class Step:
    def __init__(
        self,
        index: Core,
        slow: Callable[[PullerEvent, dict[int, list[bytes]]], bool],
        soft_delete_field: str,
        max_document_bytes: int,
    ) -> None: ...
    def process(self, events: Iterable[PullerEvent], pending: dict[int, list[bytes]]) -> int: ...
    def take(
        self,
    ) -> tuple[int, tuple[int, int, int], tuple[int, int, int], int]: ...
