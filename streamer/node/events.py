"""Change events: from the Puller's ``ChangeEvent`` to what is matched and sent.

This module owns the event transformation and the document layouts
(docs/semantics.md, Event transformation and Document layouts): it decodes
each event's JSON once, picks the document to match (and the pre-image, for
enter/leave), decides the delivered operation (soft delete becomes DELETE,
recreation becomes INSERT, replace rules per layout), and produces the
``document_data`` bytes to forward.

Bad input never raises anything but ``PoisonEvent``, whose ``reason`` is a
short metric label (the ingest counts, logs and skips such events, and still
advances its progress marker).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from streamer.errors import StreamerError
from streamer.protocol import puller_v1_pb2
from streamer.wire import MAX_DOCUMENT_BYTES

Layout = Literal["plain", "syntrix"]
LAYOUTS: tuple[Layout, ...] = ("plain", "syntrix")

DEFAULT_MAX_DOCUMENT_BYTES = MAX_DOCUMENT_BYTES
# The stored-document fields of the syntrix layout that join ``data`` in the
# matched document.
_SYNTRIX_META = ("updatedAt", "createdAt", "version")


class Op(enum.IntEnum):
    """The delivered operation; values are ``OperationType`` wire numbers."""

    INSERT = 1
    UPDATE = 2
    DELETE = 4


class PoisonEvent(StreamerError, ValueError):
    """An event that can never be processed; ``reason`` labels it for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Change:
    """One event, ready to match and deliver.

    ``document`` is what subscriptions are matched against (``None``: a hard
    delete with no pre-image, which only the document id and whole-collection
    subscriptions can match). ``before`` is the pre-image for enter/leave
    (UPDATE only); ``document_data`` the JSON forwarded to gateways.
    """

    event_id: str
    database: str
    collection: str
    document_id: str
    op: Op
    document: dict[str, Any] | None
    before: dict[str, Any] | None
    document_data: bytes
    timestamp: int


def _decode(raw: bytes, field: str, event_id: str, max_bytes: int) -> dict[str, Any] | None:
    if not raw:
        return None
    if len(raw) > max_bytes:
        raise PoisonEvent(
            "too_large", f"event {event_id}: {field} is {len(raw)} bytes; the limit is {max_bytes}"
        )
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonEvent(
            "bad_json", f"event {event_id}: {field} is not valid JSON: {exc}"
        ) from None
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise PoisonEvent(
            "not_object", f"event {event_id}: {field} is a JSON {kind}, not an object"
        )
    return value


def _flatten_syntrix(stored: dict[str, Any], event_id: str, field: str) -> dict[str, Any]:
    """The matched document of a Syntrix stored document (docs/semantics.md,
    The syntrix layout)."""
    data = stored.get("data")
    if not isinstance(data, dict):
        raise PoisonEvent(
            "bad_layout", f"event {event_id}: {field}.data is missing or not an object"
        )
    doc = dict(data)
    for key in _SYNTRIX_META:
        if key in stored:
            doc[key] = stored[key]
    if stored.get("deleted") is True:
        doc["deleted"] = True
    return doc


def _document_data(doc: dict[str, Any] | None, raw: bytes, layout: Layout) -> bytes:
    if doc is None:
        return b""
    if layout == "plain":
        return raw
    return orjson.dumps({k: v for k, v in doc.items() if k not in ("id", "collection")})


def normalize(
    event: puller_v1_pb2.ChangeEvent,
    *,
    layout: Layout = "plain",
    soft_delete_field: str = "deleted",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
) -> Change:
    """Apply the event transformation to one ``ChangeEvent``; raises only
    ``PoisonEvent``."""
    eid = event.event_id
    op_type = event.op_type
    if op_type not in ("insert", "update", "replace", "delete"):
        raise PoisonEvent("unknown_op", f"event {eid}: unknown op_type {op_type!r}")
    full = _decode(event.full_doc, "full_doc", eid, max_document_bytes)
    before = _decode(event.before_doc, "before_doc", eid, max_document_bytes)
    database, collection, document_id = event.database, event.mgo_coll, event.mgo_doc_id
    raw_after = event.full_doc

    doc = full
    if layout == "syntrix":
        # Each name comes from the post-image when it has it, else from the
        # pre-image: a soft delete empties ``data`` (so the post-image has no
        # ``data.id``), and a hard delete has no post-image at all. Without
        # either, the Puller's own names stand (the stored id for the document).
        database = _first_str("database", (full, before), database)
        collection = _first_str("collection", (full, before), collection)
        doc = _flatten_syntrix(full, eid, "full_doc") if full is not None else None
        before = _flatten_syntrix(before, eid, "before_doc") if before is not None else None
        document_id = _first_str("id", (doc, before), document_id)

    if op_type == "insert":
        if doc is None:
            raise PoisonEvent("missing_document", f"event {eid}: insert without full_doc")
        op = Op.INSERT
        before = None
    elif op_type == "delete":
        op = Op.DELETE
        doc, raw_after = before, event.before_doc
        before = None
    else:
        if doc is None:
            raise PoisonEvent("missing_document", f"event {eid}: {op_type} without full_doc")
        if doc.get(soft_delete_field) is True:
            op = Op.DELETE
            if before is not None:
                doc, raw_after = before, event.before_doc
            before = None
        elif op_type == "replace":
            recreated = layout == "syntrix" or (
                before is not None and before.get(soft_delete_field) is True
            )
            op = Op.INSERT if recreated else Op.UPDATE
        elif _sets_false(event.update_desc, soft_delete_field, eid, max_document_bytes):
            op = Op.INSERT
        else:
            op = Op.UPDATE
        if op is not Op.UPDATE:
            before = None

    return Change(
        event_id=eid,
        database=database,
        collection=collection,
        document_id=document_id,
        op=op,
        document=doc,
        before=before,
        document_data=_document_data(doc, raw_after, layout),
        timestamp=event.timestamp,
    )


def _first_str(key: str, docs: tuple[dict[str, Any] | None, ...], default: str) -> str:
    """The first non-empty string under ``key`` in ``docs``, else ``default``."""
    for doc in docs:
        if doc is not None:
            value = doc.get(key)
            if isinstance(value, str) and value:
                return value
    return default


def _sets_false(raw: bytes, field: str, event_id: str, max_bytes: int) -> bool:
    """Whether an update description sets ``field`` to false (a recreation)."""
    desc = _decode(raw, "update_desc", event_id, max_bytes)
    if desc is None:
        return False
    updated = desc.get("updatedFields")
    return isinstance(updated, dict) and updated.get(field) is False
