# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled fan-out: matched subscription ids → one serialized delivery per gateway.

Per event, the ingest has the ids the index matched, the gateway each
belongs to (the index stores it with the subscription and reports it with
the match, so no per-id lookup is needed), and the event serialized once.
Grouping the ids by gateway and framing each group is per-match work:
written in Python it cost about 0.75 µs per match, more than the matching
itself, so it is here, with each gateway's message written straight into
one bytes object. ``streamer.delivery.frame_deliveries_reference`` is the
pure-Python twin the property tests compare against.

The output bytes are ``StreamerMessage{delivery: EventDelivery{
subscription_ids, event}}`` in the protobuf wire format (see
``streamer.delivery`` for why they are written by hand). ``frame_event``
writes the shared ``EventDelivery.event`` part straight from the event's
fields, which is a third of the cost of building and serializing a
``StreamerEvent`` message; the property tests require the exact bytes
protobuf produces.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

# Tags of StreamerMessage.delivery and EventDelivery.subscription_ids (both
# field 1, length-delimited); EventDelivery.event's tag is part of ``event``.
DEF FIELD_1 = 0x0A


cdef inline Py_ssize_t uvarint_size(uint64_t n) noexcept nogil:
    cdef Py_ssize_t size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


cdef inline char *put_uvarint(char *p, uint64_t n) noexcept nogil:
    while n >= 0x80:
        p[0] = <char>((n & 0x7F) | 0x80)
        n >>= 7
        p += 1
    p[0] = <char>n
    return p + 1


cdef inline char *put_field_header(char *p, Py_ssize_t n) noexcept nogil:
    p[0] = FIELD_1
    return put_uvarint(p + 1, <uint64_t>n)


cdef inline Py_ssize_t field_size(Py_ssize_t n) noexcept nogil:
    # A length-delimited field of n bytes; proto3 leaves empty ones out.
    return 0 if n == 0 else 1 + uvarint_size(<uint64_t>n) + n


cdef inline char *put_field(char *p, char tag, const char *data, Py_ssize_t n) noexcept nogil:
    if n == 0:
        return p
    p[0] = tag
    p = put_uvarint(p + 1, <uint64_t>n)
    memcpy(p, data, n)
    return p + n


def frame_event(str event_id not None, str database not None, str collection not None,
                str document_id not None, int operation, bytes document_data not None,
                int64_t timestamp, str progress not None):
    """``EventDelivery.event`` (field 2) around a ``StreamerEvent`` with
    these fields, byte for byte what protobuf would write."""
    cdef Py_ssize_t n_id, n_db, n_coll, n_doc, n_data, n_progress
    cdef const char *s_id = PyUnicode_AsUTF8AndSize(event_id, &n_id)
    cdef const char *s_db = PyUnicode_AsUTF8AndSize(database, &n_db)
    cdef const char *s_coll = PyUnicode_AsUTF8AndSize(collection, &n_coll)
    cdef const char *s_doc = PyUnicode_AsUTF8AndSize(document_id, &n_doc)
    cdef const char *s_progress = PyUnicode_AsUTF8AndSize(progress, &n_progress)
    if not 0 <= operation <= 0x7FFFFFFF:
        raise ValueError(f"operation must be a non-negative int32, got {operation}")
    n_data = PyBytes_GET_SIZE(document_data)
    # int64 is encoded as its two's complement uint64: negatives take 10 bytes.
    cdef uint64_t ts = <uint64_t>timestamp
    cdef Py_ssize_t body = (
        field_size(n_id) + field_size(n_db) + field_size(n_coll) + field_size(n_doc)
        + (0 if operation == 0 else 1 + uvarint_size(<uint64_t>operation))
        + field_size(n_data)
        + (0 if ts == 0 else 1 + uvarint_size(ts))
        + field_size(n_progress)
    )
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + uvarint_size(<uint64_t>body) + body)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 0x12
    p = put_uvarint(p + 1, <uint64_t>body)
    p = put_field(p, 0x0A, s_id, n_id)
    p = put_field(p, 0x12, s_db, n_db)
    p = put_field(p, 0x1A, s_coll, n_coll)
    p = put_field(p, 0x22, s_doc, n_doc)
    if operation:
        p[0] = 0x28
        p = put_uvarint(p + 1, <uint64_t>operation)
    p = put_field(p, 0x32, PyBytes_AS_STRING(document_data), n_data)
    if ts:
        p[0] = 0x38
        p = put_uvarint(p + 1, ts)
    put_field(p, 0x42, s_progress, n_progress)
    return out


cdef bytes frame(list ids, bytes event):
    cdef Py_ssize_t i, n = PyList_GET_SIZE(ids), size, body = PyBytes_GET_SIZE(event)
    cdef const char *utf8
    for i in range(n):
        PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(ids, i), &size)
        body += 1 + uvarint_size(<uint64_t>size) + size
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + uvarint_size(<uint64_t>body) + body)
    cdef char *p = put_field_header(PyBytes_AS_STRING(out), body)
    for i in range(n):
        utf8 = PyUnicode_AsUTF8AndSize(<object>PyList_GET_ITEM(ids, i), &size)
        p = put_field_header(p, size)
        memcpy(p, utf8, size)
        p += size
    memcpy(p, PyBytes_AS_STRING(event), PyBytes_GET_SIZE(event))
    return out


def frame_deliveries(list subscription_ids not None, bytes owners not None, bytes event not None):
    """``[(owner, delivery message bytes), ...]``: one per distinct owner.

    ``subscription_ids`` and ``owners`` are what ``Matcher.match_owned``
    returns: the matched ids and, packed as native ``uint32``, the owner of
    each. ``event`` is ``streamer.delivery.event_field(...)``: the framed
    ``EventDelivery.event``. Owners come in the order of their first id, ids
    within a delivery in matched order.
    """
    cdef Py_ssize_t i, n = PyList_GET_SIZE(subscription_ids)
    if PyBytes_GET_SIZE(owners) != n * <Py_ssize_t>sizeof(uint32_t):
        raise ValueError(
            f"{PyBytes_GET_SIZE(owners)} bytes of owners for {n} subscription ids"
        )
    cdef const uint32_t *owner = <const uint32_t *>PyBytes_AS_STRING(owners)
    cdef dict groups = {}
    cdef PyObject *group
    for i in range(n):
        sub_id = <object>PyList_GET_ITEM(subscription_ids, i)
        if not PyUnicode_Check(sub_id):
            raise TypeError(f"subscription ids must be str, got {type(sub_id).__name__}")
        key = owner[i]
        group = PyDict_GetItem(groups, key)
        if group is NULL:
            groups[key] = [sub_id]
        else:
            (<list>group).append(sub_id)
    return [(key, frame(<list>ids, event)) for key, ids in groups.items()]
