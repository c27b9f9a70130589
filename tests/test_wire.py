"""Hand-written wire framing against protobuf's own encoding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streamer.protocol.streamer_v1_pb2 import Hello, StreamerEvent
from streamer.wire import field, varint


@given(st.integers(0, 2**32 - 1))
def test_varint_is_protobufs(n: int) -> None:
    # Hello.max_batch is uint32 field 3: its tag byte, then the varint
    # (proto3 leaves a zero out).
    assert (b"\x18" + varint(n) if n else b"") == Hello(max_batch=n).SerializeToString()


@given(st.text(max_size=300), st.binary(max_size=300))
def test_fields_are_protobufs(event_id: str, data: bytes) -> None:
    # StreamerEvent.event_id is field 1 and document_data field 6.
    framed = b"".join(
        field(tag, value) for tag, value in ((b"\x0a", event_id.encode()), (b"\x32", data))
        if value
    )
    assert framed == StreamerEvent(event_id=event_id, document_data=data).SerializeToString()
