"""Hand-written protobuf wire framing, shared by the hot paths that send
pre-serialized messages (the Streamer's deliveries, the Puller's batches).

A message that only wraps bytes we already hold (a serialized event, a
marker) is cheaper to frame by hand than to build as message objects and
serialize: each part is a tag, a base-128 varint length and the bytes. The
tests pin every hand-framed message to what protobuf itself encodes.

It also holds the size bounds both sides of the Puller stream agree on. A
document is at most ``MAX_DOCUMENT_BYTES`` of JSON (MongoDB's document
limit; larger ones are poison to the Streamer); a change event carries up
to three such JSON fields (the document, its pre-image and the update
description), so the Puller logs no event larger than ``MAX_EVENT_BYTES``
and the Streamer receives messages up to ``MAX_MESSAGE_BYTES``. Batches of
several events stop at ``BATCH_BYTES``, so only a single large event ever
makes a large message.
"""

from __future__ import annotations

MAX_DOCUMENT_BYTES = 16 << 20
MAX_EVENT_BYTES = 3 * MAX_DOCUMENT_BYTES + (64 << 10)
MAX_MESSAGE_BYTES = MAX_EVENT_BYTES + (64 << 10)
BATCH_BYTES = 4 << 20
_SMALL_VARINTS = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    """A protobuf base-128 varint of a non-negative length."""
    if n < 0x80:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, data: bytes) -> bytes:
    """One length-delimited field: ``tag`` (field number << 3 | 2), length, ``data``."""
    return tag + varint(len(data)) + data
