"""The event transformation (docs/semantics.md): from ChangeEvent to the matched and
delivered change."""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
import orjson
import pytest
from hypothesis import given, settings

from streamer.node.events import Op, PoisonEvent, normalize
from streamer.protocol.puller_v1_pb2 import ChangeEvent


def event(
    op: str, full: Any = None, before: Any = None, update: Any = None, **kw: Any
) -> ChangeEvent:
    def raw(v: Any) -> bytes:
        return v if isinstance(v, bytes) else (b"" if v is None else orjson.dumps(v))

    fields = {"event_id": "e1", "database": "app", "mgo_coll": "messages", "mgo_doc_id": "m1"}
    fields.update(kw)
    return ChangeEvent(
        op_type=op, full_doc=raw(full), before_doc=raw(before), update_desc=raw(update),
        timestamp=17, **fields,
    )


def test_insert() -> None:
    full = b'{"a": 1, "deleted": false}'
    change = normalize(event("insert", full))
    assert change.op is Op.INSERT
    assert change.document == {"a": 1, "deleted": False}
    assert change.document_data == full  # the plain layout forwards the bytes as they came
    assert (change.database, change.collection, change.document_id) == ("app", "messages", "m1")
    assert (change.event_id, change.timestamp, change.before) == ("e1", 17, None)


def test_update_keeps_the_pre_image_for_enter_and_leave() -> None:
    change = normalize(
        event("update", {"a": 2}, before={"a": 1}, update={"updatedFields": {"a": 2}})
    )
    assert (change.op, change.document, change.before) == (Op.UPDATE, {"a": 2}, {"a": 1})


def test_soft_delete_matches_the_pre_image_when_present() -> None:
    change = normalize(event("update", {"a": 2, "deleted": True}, before={"a": 1}))
    assert (change.op, change.document, change.before) == (Op.DELETE, {"a": 1}, None)
    assert orjson.loads(change.document_data) == {"a": 1}


def test_soft_delete_without_pre_image_matches_the_document() -> None:
    change = normalize(event("replace", {"a": 2, "deleted": True}))
    assert (change.op, change.document) == (Op.DELETE, {"a": 2, "deleted": True})


def test_custom_soft_delete_field() -> None:
    change = normalize(event("update", {"gone": True}), soft_delete_field="gone")
    assert change.op is Op.DELETE


def test_recreation_by_update_is_an_insert() -> None:
    change = normalize(
        event("update", {"a": 1, "deleted": False}, before={"a": 1, "deleted": True},
              update={"updatedFields": {"deleted": False}})
    )
    assert (change.op, change.before) == (Op.INSERT, None)


@pytest.mark.parametrize(
    ("before", "op"),
    [({"deleted": True}, Op.INSERT), ({"deleted": False}, Op.UPDATE), (None, Op.UPDATE)],
)
def test_replace_in_the_plain_layout(before: Any, op: Op) -> None:
    assert normalize(event("replace", {"a": 1}, before=before)).op is op


def test_hard_delete() -> None:
    with_before = normalize(event("delete", before={"a": 1}))
    assert (with_before.op, with_before.document) == (Op.DELETE, {"a": 1})
    assert orjson.loads(with_before.document_data) == {"a": 1}
    bare = normalize(event("delete"))
    assert (bare.op, bare.document, bare.document_data, bare.document_id) == (
        Op.DELETE, None, b"", "m1")


def stored(data: dict[str, Any], deleted: bool = False) -> dict[str, Any]:
    return {
        "id": "x", "database": "db2", "collection": "chats", "collectionHash": "h",
        "updatedAt": 2, "createdAt": 1, "version": 3, "data": data, "deleted": deleted,
    }


def test_syntrix_layout_flattens_and_strips_id_and_collection() -> None:
    change = normalize(
        event("insert", stored({"id": "c9", "collection": "chats", "title": "t"})), layout="syntrix"
    )
    assert (change.database, change.collection, change.document_id) == ("db2", "chats", "c9")
    assert change.document == {
        "id": "c9", "collection": "chats", "title": "t", "updatedAt": 2, "createdAt": 1,
        "version": 3,
    }
    assert orjson.loads(change.document_data) == {
        "title": "t", "updatedAt": 2, "createdAt": 1, "version": 3}


def test_syntrix_soft_delete_and_recreation() -> None:
    gone = normalize(event("update", stored({"id": "c9"}, deleted=True)), layout="syntrix")
    assert gone.op is Op.DELETE and gone.document is not None and gone.document["deleted"] is True
    back = normalize(event("replace", stored({"id": "c9"})), layout="syntrix")
    assert back.op is Op.INSERT


def test_syntrix_soft_delete_takes_the_document_id_from_the_pre_image() -> None:
    # Syntrix empties ``data`` on a soft delete: only the pre-image still
    # names the document.
    emptied = {**stored({}, deleted=True), "id": "db2:hash"}
    change = normalize(
        event("update", emptied, before=stored({"id": "c9", "title": "t"}), mgo_doc_id="db2:hash"),
        layout="syntrix",
    )
    assert (change.op, change.document_id) == (Op.DELETE, "c9")
    assert change.document is not None and change.document["title"] == "t"
    assert (change.database, change.collection) == ("db2", "chats")


def test_syntrix_post_image_id_wins_and_the_stored_id_is_the_last_resort() -> None:
    renamed = normalize(
        event("update", stored({"id": "new"}), before=stored({"id": "old"})), layout="syntrix"
    )
    assert renamed.document_id == "new"
    bare = normalize(
        event("update", stored({}, deleted=True), mgo_doc_id="db2:hash"), layout="syntrix"
    )
    assert (bare.op, bare.document_id) == (Op.DELETE, "db2:hash")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"op": "upsert", "full": {"a": 1}}, "unknown_op"),
        ({"op": "insert", "full": b"{nope"}, "bad_json"),
        ({"op": "insert", "full": b"[1, 2]"}, "not_object"),
        ({"op": "update", "full": {"a": 1}, "update": b"nope"}, "bad_json"),
        ({"op": "insert"}, "missing_document"),
        ({"op": "update"}, "missing_document"),
        ({"op": "insert", "full": {"a": "x" * 100}, "max": 50}, "too_large"),
    ],
)
def test_poison_events_are_labelled(kwargs: dict[str, Any], reason: str) -> None:
    max_bytes = kwargs.pop("max", 1 << 20)
    op = kwargs.pop("op")
    with pytest.raises(PoisonEvent) as info:
        normalize(event(op, **kwargs), max_document_bytes=max_bytes)
    assert info.value.reason == reason
    assert "event e1" in str(info.value)


def test_syntrix_document_without_data_is_poison() -> None:
    with pytest.raises(PoisonEvent) as info:
        normalize(event("insert", {"id": "x"}), layout="syntrix")
    assert info.value.reason == "bad_layout"


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["insert", "update", "replace", "delete", "", "drop"]),
    parts=st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.recursive(
                st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
                lambda inner: st.lists(inner, max_size=3)
                | st.dictionaries(
                    st.sampled_from(["data", "deleted", "id", "updatedFields", "a"]),
                    inner, max_size=4,
                ),
                max_leaves=8,
            ).map(orjson.dumps),
        ),
        min_size=3, max_size=3,
    ),
    layout=st.sampled_from(["plain", "syntrix"]),
)
def test_any_event_is_processed_or_poison(op: str, parts: list[bytes], layout: Any) -> None:
    full, before, update = parts
    try:
        change = normalize(event(op, full, before, update), layout=layout)
    except PoisonEvent as exc:
        assert exc.reason
        return
    assert change.op in (Op.INSERT, Op.UPDATE, Op.DELETE)
    assert change.document is None or isinstance(change.document, dict)
    assert change.before is None or change.op is Op.UPDATE
