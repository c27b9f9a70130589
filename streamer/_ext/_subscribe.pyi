# Hand-written type stub of the compiled registration (streamer/_ext/_subscribe.pyx);
# mypy checks the Python side against it.
from collections.abc import Sequence
from typing import Self, final

from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol.streamer_v1_pb2 import SubscribeRequest

def response_entry(response: bytes) -> bytes: ...
def batch_response(entries: list[bytes]) -> bytes: ...
def batch_requests(message: bytes) -> list[bytes] | None: ...
@final
class Registrar:
    # Its argument goes to __cinit__ (no Registrar exists without the set
    # it keeps the books of), so it is __new__'s, not __init__'s.
    def __new__(cls, subscriptions: SubscriptionSet) -> Self: ...
    def register(
        self,
        owner: int,
        requests: Sequence[SubscribeRequest],
        out: list[bytes],
        encoded: list[bytes] | None = None,
    ) -> None: ...
