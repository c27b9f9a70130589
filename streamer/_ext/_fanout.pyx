# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled fan-out: matched subscription ids → one serialized delivery per gateway.

Per event, the ingest has the ids the index matched, the gateway each
belongs to (the index stores it with the subscription and reports it with
the match, so no per-id lookup is needed), and the event serialized once.
Grouping the ids by gateway and framing each group is per-match work:
written in Python it cost more than the matching itself, so it is here, with
each gateway's message written straight into one bytes object.
``streamer.node.delivery.frame_deliveries_reference`` is the pure-Python twin the
property tests compare against.

The output bytes are ``StreamerMessage{delivery: EventDelivery{
subscription_ids, event}}`` in the protobuf wire format (see
``streamer.node.delivery`` for why they are written by hand). ``frame_event``
writes the shared ``EventDelivery.event`` part straight from the event's
fields, which is much cheaper than building and serializing a
``StreamerEvent`` message; the property tests require the exact bytes
protobuf produces.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.sequence cimport PySequence_Fast_ITEMS
from cpython.unicode cimport PyUnicode_Check
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from streamer._ext._core cimport CollIndex
from streamer._ext._varint cimport put_uvarint, uvarint_size

cdef extern from *:
    """
    #define STREAMER_PREFETCH(p) __builtin_prefetch((const void *)(p))
    """
    void prefetch "STREAMER_PREFETCH"(const void *p) nogil

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL
    void incref "Py_INCREF"(PyObject *o)
    void decref "Py_DECREF"(PyObject *o)

# Tags of StreamerMessage.delivery and EventDelivery.subscription_ids (both
# field 1, length-delimited); EventDelivery.event's tag is part of ``event``.
DEF FIELD_1 = 0x0A


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
    return frame_event_c(event_id, database, collection, document_id, operation, document_data,
                         timestamp, progress)


cdef bytes frame_event_c(str event_id, str database, str collection, str document_id,
                         int operation, bytes document_data, int64_t timestamp, str progress):
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


cdef struct Match:
    PyObject *id
    const char *utf8
    Py_ssize_t size
    uint32_t owner
    uint32_t group


cdef struct Out:
    uint32_t owner
    Py_ssize_t body
    char *p


DEF EMPTY = 0xFFFFFFFF
# How many ids ahead the strings are prefetched (as in _core's found_ids).
DEF PREFETCH = 8


cdef Py_ssize_t frame_into(PyObject **ids, const uint32_t *owners, Py_ssize_t n,
                           bytes event, dict pending) except -1:
    """Append one ``StreamerMessage{delivery}`` per distinct owner of the
    ``n`` matches to ``pending[owner]`` (a list, created when missing);
    returns how many. Owners in order of their first id, ids in order.

    ``ids`` and ``owners`` are read only before the first allocation that
    can run the garbage collector: after it they may have moved or changed
    (the caller's list, or a buffer a finalizer reused)."""
    if n == 0:
        return 0
    # The smallest power of two at least twice n: an owner -> delivery table
    # at most half full, so probes stay short.
    cdef size_t mask = 1
    while mask < <size_t>(2 * n):
        mask <<= 1
    # Scratch per call, not shared: the allocations below may run the
    # garbage collector, and with it any Python code (even a second call).
    cdef Match *matches = <Match *>PyMem_Malloc(
        n * sizeof(Match) + n * sizeof(Out) + 2 * mask * sizeof(uint32_t))
    if matches == NULL:
        raise MemoryError()
    cdef Out *outs = <Out *>&matches[n]
    cdef uint32_t *table_owner = <uint32_t *>&outs[n]
    cdef uint32_t *table_group = &table_owner[mask]
    cdef Py_ssize_t i, g, held = 0, ngroups = 0, size, body
    cdef Py_ssize_t n_event = PyBytes_GET_SIZE(event)
    cdef uint32_t owner
    cdef Out *out
    try:
        # The ids are borrowed (from the index or the caller's list): hold
        # them, from the scratch copy, while their UTF-8 is in use. Any error
        # is raised here, before anything is appended.
        for i in range(n):
            if i + PREFETCH < n:
                prefetch(ids[i + PREFETCH])
            matches[i].id = ids[i]
            matches[i].owner = owners[i]
            incref(ids[i])
            held += 1
            matches[i].utf8 = PyUnicode_AsUTF8AndSize(<object>ids[i], &matches[i].size)
        memset(table_group, 0xFF, mask * sizeof(uint32_t))
        mask -= 1
        for i in range(n):
            owner = matches[i].owner
            g = (<uint32_t>(owner * 2654435761u)) & mask
            while table_group[g] != EMPTY and table_owner[g] != owner:
                g = (g + 1) & mask
            if table_group[g] == EMPTY:
                table_owner[g] = owner
                table_group[g] = <uint32_t>ngroups
                outs[ngroups].owner = owner
                outs[ngroups].body = 0
                ngroups += 1
            matches[i].group = table_group[g]
            size = matches[i].size
            outs[table_group[g]].body += 1 + uvarint_size(<uint64_t>size) + size
        made = PyList_New(ngroups)
        for g in range(ngroups):
            body = outs[g].body + n_event
            message = PyBytes_FromStringAndSize(NULL, 1 + uvarint_size(<uint64_t>body) + body)
            outs[g].p = put_field_header(PyBytes_AS_STRING(message), body)
            Py_INCREF(message)
            PyList_SET_ITEM(made, g, message)
        for i in range(n):
            out = &outs[matches[i].group]
            size = matches[i].size
            out.p = put_field_header(out.p, size)
            memcpy(out.p, matches[i].utf8, size)
            out.p += size
        for g in range(ngroups):
            memcpy(outs[g].p, PyBytes_AS_STRING(event), n_event)
        for g in range(ngroups):
            key = outs[g].owner
            queued = PyDict_GetItem(pending, key)
            if queued is NULL:
                pending[key] = [<object>PyList_GET_ITEM(made, g)]
            else:
                (<list>queued).append(<object>PyList_GET_ITEM(made, g))
    finally:
        for i in range(held):
            decref(matches[i].id)
        PyMem_Free(matches)
    return ngroups


def fan_out(Core index not None, database, collection, document_id, document,
            bytes event not None, dict pending not None):
    """Match one change and frame its deliveries: ``(matches, deliveries)``.

    ``index`` is ``Matcher.index``; ``document`` None matches on the
    document id alone (a hard delete without pre-image, as
    ``Matcher.match_id_owned``). Each gateway's delivery (ids in matched
    order, then ``event``, the framed ``EventDelivery.event``) is appended to
    ``pending[owner]``. The matched ids never become a Python list: they go
    from the index's buffer straight into the messages.

    The index is busy from the search to the last delivery: the framing
    allocates, so a finalizer could otherwise match (and overwrite the
    buffer) in between; it gets ``IndexBusy`` instead.
    """
    cdef Py_ssize_t matches, deliveries
    index.enter()
    try:
        matches = match_and_frame(index, database, collection, document_id, document, event,
                                  pending, &deliveries)
        # Built before leave(): the tuple's allocation can run a finalizer,
        # which must get IndexBusy like one run anywhere else in this call.
        return matches, deliveries
    finally:
        index.leave()


cdef Py_ssize_t fan_out_c(Core index, object database, object collection, object document_id,
                          object document, bytes event, dict pending,
                          Py_ssize_t *deliveries) except -1:
    index.enter()
    try:
        return match_and_frame(index, database, collection, document_id, document, event,
                               pending, deliveries)
    finally:
        index.leave()


cdef Py_ssize_t match_and_frame(Core index, object database, object collection,
                                object document_id, object document, bytes event, dict pending,
                                Py_ssize_t *deliveries) except -1:
    """The work of ``fan_out``; the caller has entered ``index``."""
    cdef CollIndex ci = index.coll(database, collection, False)
    if ci is None:
        deliveries[0] = 0
        return 0
    if document is None:
        index.search_id(ci, document_id)
    else:
        index.search(ci, document_id, document)
    cdef Py_ssize_t matches = index.nfound
    deliveries[0] = frame_into(index.found, index.found_owners, matches, event, pending)
    return matches


def frame_deliveries(list subscription_ids not None, bytes owners not None,
                     bytes event not None, dict pending not None):
    """``fan_out`` for matches already in hand (the ids and packed ``uint32``
    owners ``Matcher.match_owned`` returns): appends one delivery per owner
    to ``pending[owner]`` and returns how many."""
    return frame_deliveries_c(subscription_ids, owners, event, pending)


cdef Py_ssize_t frame_deliveries_c(list subscription_ids, bytes owners, bytes event,
                                   dict pending) except -1:
    cdef Py_ssize_t i, n = PyList_GET_SIZE(subscription_ids)
    if PyBytes_GET_SIZE(owners) != n * <Py_ssize_t>sizeof(uint32_t):
        raise ValueError(
            f"{PyBytes_GET_SIZE(owners)} bytes of owners for {n} subscription ids"
        )
    for i in range(n):
        sub_id = <object>PyList_GET_ITEM(subscription_ids, i)
        if not PyUnicode_Check(sub_id):
            raise TypeError(f"subscription ids must be str, got {type(sub_id).__name__}")
    return frame_into(PySequence_Fast_ITEMS(subscription_ids),
                      <const uint32_t *>PyBytes_AS_STRING(owners), n, event, pending)
