# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled ingest step: the events of one Puller message → framed deliveries.

Per event the ingest reads the ``ChangeEvent``, applies the event
transformation (docs/semantics.md, Event transformation), frames the
``StreamerEvent`` and fans it out through the index. Written in Python around
the compiled parts, the glue (the ``Change`` object, the calls, the per-event
counters) was a large share of the per-event cost; here it is a loop over
locals.

Only the common case is handled here: plain layout, no pre-image, no update
description, a well-formed insert, update, replace or delete. Any other
event (a pre-image and enter/leave, an update description, anything
malformed or too large) goes to ``slow``: the Python path of
``streamer.node.ingest`` (``streamer.node.events.normalize`` and its fan-out), which
is also the reference the property tests hold this step to, deliveries and
counters alike.
"""

cimport cython
from libc.stdint cimport uint64_t

import orjson

from streamer._ext._core cimport Core
from streamer._ext._fanout cimport fan_out_c, frame_event_c

cdef object loads = orjson.loads
cdef object JSONDecodeError = orjson.JSONDecodeError

# Delivered operations: streamer.node.events.Op (OperationType wire numbers).
DEF INSERT = 1
DEF UPDATE = 2
DEF DELETE = 4


@cython.final
cdef class Step:
    """The common case of ``Ingest``'s per-event work, and its tallies.

    ``slow(event, pending)`` handles any other event and returns whether it
    became a change (False: a poison event it counted and logged).
    ``take()`` returns the tallies since the last call and resets them.
    """

    cdef Core index
    cdef object slow
    cdef str soft_delete_field
    cdef Py_ssize_t max_document_bytes
    cdef uint64_t heartbeats, unwatched, inserts, updates, deletes
    cdef uint64_t delivered_inserts, delivered_updates, delivered_deletes, matches

    # __cinit__, not __init__: the fan-out is called with ``index`` unchecked,
    # so no Step may exist without one (not even from ``Step.__new__``).
    def __cinit__(self, Core index not None, slow, str soft_delete_field not None,
                  Py_ssize_t max_document_bytes):
        self.index = index
        self.slow = slow
        self.soft_delete_field = soft_delete_field
        self.max_document_bytes = max_document_bytes

    def process(self, events, dict pending not None):
        """Append the deliveries of ``events`` (``PullerEvent`` messages) to
        ``pending[owner]``, in order; returns how many became changes."""
        cdef Py_ssize_t changes = 0, matched, delivered
        cdef int op
        cdef object doc
        cdef bytes full, data, framed
        for event in events:
            if not event.HasField("change_event"):
                self.heartbeats += 1
                continue
            ce = event.change_event
            if self.index.coll(ce.database, ce.mgo_coll, False) is None:
                # No subscription on its collection: nothing to decode for
                # (a node serving some collections, a shard of a cluster).
                self.unwatched += 1
                changes += 1
                continue
            if ce.before_doc or ce.update_desc:
                changes += self.slow(event, pending)
                continue
            op_type = ce.op_type
            full = ce.full_doc
            if op_type == "delete":
                # A delete without pre-image matches on the document id alone;
                # a full_doc here would still be decoded (and may be poison).
                if full:
                    changes += self.slow(event, pending)
                    continue
                op, doc, data = DELETE, None, b""
            elif op_type == "insert" or op_type == "update" or op_type == "replace":
                if not full or len(full) > self.max_document_bytes:
                    changes += self.slow(event, pending)
                    continue
                try:
                    doc = loads(full)
                except JSONDecodeError:
                    doc = None
                if type(doc) is not dict:
                    changes += self.slow(event, pending)
                    continue
                if op_type == "insert":
                    op = INSERT
                elif (<dict>doc).get(self.soft_delete_field) is True:
                    op = DELETE
                else:
                    op = UPDATE
                data = full
            else:
                changes += self.slow(event, pending)
                continue
            database, collection, document_id = ce.database, ce.mgo_coll, ce.mgo_doc_id
            framed = frame_event_c(ce.event_id, database, collection, document_id, op, data,
                                   ce.timestamp, event.progress)
            matched = fan_out_c(self.index, database, collection, document_id, doc, framed,
                                pending, &delivered)
            self.matches += matched
            if op == INSERT:
                self.inserts += 1
                self.delivered_inserts += delivered
            elif op == UPDATE:
                self.updates += 1
                self.delivered_updates += delivered
            else:
                self.deletes += 1
                self.delivered_deletes += delivered
            changes += 1
        return changes

    def take(self):
        """``(heartbeats, unwatched, (inserts, updates, deletes), (delivered
        inserts, updates, deletes), matches)`` since the last call (unwatched:
        change events of collections without subscriptions, not decoded);
        resets them."""
        out = (
            self.heartbeats, self.unwatched, (self.inserts, self.updates, self.deletes),
            (self.delivered_inserts, self.delivered_updates, self.delivered_deletes),
            self.matches,
        )
        self.heartbeats = self.unwatched = self.inserts = self.updates = self.deletes = 0
        self.delivered_inserts = self.delivered_updates = self.delivered_deletes = 0
        self.matches = 0
        return out
