# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled registration: the common ``SubscribeRequest`` straight into the index.

A ``subscribe_batch`` registers up to thousands of requests per message,
and in Python (``SubscriptionSet.subscribe``: reading the protocol message,
converting each ``Value``, lowering each filter into an atom, the limits,
the bookkeeping, a ``SubscribeResponse`` per request) the glue around the
index cost several times the index's own ``add``. Here the same steps are a
loop over locals, and each answer is written as protocol bytes.

Only requests that will be accepted take this path: an id given, the id
free, every filter's field already known (``compiler._PATHS``), a supported
operator with values of the shapes it takes, no clause the index would have
to scan, and every limit met. Anything else, refusals included, goes to
``SubscriptionSet.subscribe`` (the Python path), which also answers it:
that keeps every error message and code in one place. The property tests
hold this path to the Python one: the same answers, the same index, the
same bookkeeping, for any batch of requests.

The answers are ``SubscribeBatchResponse.responses`` entries (field 1,
length-delimited) in the protobuf wire format: for an accepted request,
``SubscribeResponse{subscription_id, success: true}`` written by hand, which
costs a fraction of building and serializing a message per request; the
tests require the bytes protobuf produces.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.set cimport PySet_Add
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from streamer._ext._core cimport Core, index_key, range_key

from streamer._ext import _core
from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matching import compiler, matcher

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object s, Py_ssize_t *size) except NULL

cdef object NOKEY = _core.NOKEY
# The compiler's own tables, shared: the operators' canonical names, and the
# field paths it has split (a field not in it yet goes the Python way once,
# which adds it).
cdef dict OPERATORS = compiler.OPERATORS
cdef dict PATHS = compiler._PATHS
cdef object parse_expression = matcher.parse_expression
cdef object lower_expression = compiler.lower_expression

# Tags: field 1 length-delimited (SubscribeBatchResponse.responses,
# SubscribeResponse.subscription_id), SubscribeResponse.success (field 2,
# varint), StreamerMessage.subscribe_batch_response (field 5, length-delimited).
DEF FIELD_1 = 0x0A
DEF SUCCESS = 0x10
DEF BATCH_RESPONSE = 0x2A


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


cdef bytes framed(char tag, const char *data, Py_ssize_t n):
    """``data`` as one length-delimited field ``tag``."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + uvarint_size(<uint64_t>n) + n)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = tag
    p = put_uvarint(p + 1, <uint64_t>n)
    memcpy(p, data, n)
    return out


cdef bytes accepted_entry(str sub_id):
    """``SubscribeResponse{subscription_id, success: true}`` as a responses entry."""
    cdef Py_ssize_t n, inner
    cdef const char *data = PyUnicode_AsUTF8AndSize(sub_id, &n)
    inner = 1 + uvarint_size(<uint64_t>n) + n + 2
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + uvarint_size(<uint64_t>inner) + inner)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = FIELD_1
    p = put_uvarint(p + 1, <uint64_t>inner)
    p[0] = FIELD_1
    p = put_uvarint(p + 1, <uint64_t>n)
    memcpy(p, data, n)
    p += n
    p[0] = SUCCESS
    p[1] = 1
    return out


def response_entry(bytes response not None):
    """A serialized ``SubscribeResponse`` as a ``SubscribeBatchResponse.responses`` entry."""
    return framed(FIELD_1, PyBytes_AS_STRING(response), PyBytes_GET_SIZE(response))


def batch_response(list entries not None):
    """``StreamerMessage{subscribe_batch_response: {responses}}`` from the
    responses' entries (``response_entry``, ``Registrar.register``)."""
    cdef bytes body = b"".join(entries)
    return framed(BATCH_RESPONSE, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))


cdef inline tuple const_key(object v):
    # compiler.const_key, for the scalars a protocol Value holds.
    cdef type t = type(v)
    if t is str:
        return ("str", v)
    if t is bool:
        return ("bool", v)
    if t is int:
        return ("int", v)
    return ("float", v)


cdef object scalar(object value):
    """A non-list ``Value`` as the Python value ``subscriptions._value``
    makes of it; None when unset or a list."""
    kind = value.WhichOneof("kind")
    if kind is None or kind == "list_value":
        return None
    return getattr(value, kind)


cdef object document_id(object v):
    """``compiler._document_id_value`` for one value; None where it refuses."""
    cdef type t = type(v)
    if t is str:
        return v
    if t is int:
        return str(v)
    return None


@cython.final
cdef class Registrar:
    """The common case of ``SubscriptionSet.subscribe`` for a batch of
    requests; see the module docstring. It registers into ``subscriptions``'
    live index and keeps its books (ids, owners, bytes) as the Python path
    does; ``subscriptions.subscribe(owner, request)`` answers the rest."""

    def __cinit__(self, subscriptions not None):
        limits = subscriptions.limits
        self.subscriptions = subscriptions
        self.held = subscriptions._held
        self.owned = subscriptions._owned
        self.owner_bytes = subscriptions._bytes
        self.max_subscriptions = limits.max_subscriptions
        self.max_filters = limits.max_filters
        self.max_expression_length = limits.max_expression_length
        self.max_request_bytes = limits.max_request_bytes
        self.max_list_values = limits.max_list_values
        self.max_gateway_bytes = limits.max_gateway_bytes
        self.max_node_bytes = limits.max_node_bytes

    def register(self, uint32_t owner, requests, list out not None):
        """Register ``requests`` (``SubscribeRequest`` messages) for
        ``owner`` in order, appending each one's answer to ``out`` as a
        ``SubscribeBatchResponse.responses`` entry."""
        cdef Py_ssize_t size = 0
        cdef object subscriptions = self.subscriptions
        cdef Py_ssize_t node = subscriptions.bytes
        cdef bytes entry
        slow = subscriptions.subscribe
        self.index = subscriptions.matcher.index
        try:
            for request in requests:
                entry = self.one(owner, request, node, &size)
                if entry is not None:
                    node += size
                else:
                    # The Python path reads and moves the node's total itself.
                    subscriptions.bytes = node
                    entry = response_entry(slow(owner, request).SerializeToString())
                    node = subscriptions.bytes
                out.append(entry)
        finally:
            subscriptions.bytes = node

    cdef bytes one(self, uint32_t owner, object request, Py_ssize_t node_bytes,
                   Py_ssize_t *size):
        """Register one request and return its answer; None (nothing done)
        for one the Python path must handle."""
        cdef Py_ssize_t values, mine
        cdef PyObject *p
        cdef object key = owner
        sub_id = request.subscription_id
        if not sub_id or sub_id in self.held:
            return None
        p = PyDict_GetItem(self.owned, key)
        if p is not NULL and len(<object>p) >= self.max_subscriptions:
            return None
        size[0] = request.ByteSize()
        p = PyDict_GetItem(self.owner_bytes, key)
        mine = 0 if p is NULL else <object>p
        if (size[0] > self.max_request_bytes or mine + size[0] > self.max_gateway_bytes
                or node_bytes + size[0] > self.max_node_bytes):
            return None
        clauses = self.lower(request, &values)
        if clauses is None or values > self.max_list_values:
            return None
        index = self.index
        index.enter()
        try:
            index.add_sub(sub_id, request.database, request.collection, clauses, owner)
        except (DuplicateSubscription, InvalidSubscription):
            # Left unchanged (an id the index holds outside this set's books,
            # say): the Python path answers.
            return None
        finally:
            index.leave()
        self.held[sub_id] = size[0] << 32 | owner
        p = PyDict_GetItem(self.owned, key)
        if p is NULL:
            self.owned[key] = {sub_id}
        else:
            PySet_Add(<object>p, sub_id)
        self.owner_bytes[key] = mine + size[0]
        return accepted_entry(sub_id)

    cdef list lower(self, object request, Py_ssize_t *values):
        """``compile_subscription``'s clauses for the request, or None where
        the Python path must decide (also for any clause the index would
        scan: those have their own limits). ``values`` gets how many values
        the filters' lists hold."""
        cdef list conjunction = []
        cdef list clause, clauses, items, keys
        cdef bint indexed = False
        cdef Py_ssize_t n
        values[0] = 0
        filters = request.filters
        if len(filters) > self.max_filters:
            return None
        for flt in filters:
            field = flt.field
            path = PATHS.get(field)
            op = OPERATORS.get(flt.op)
            if path is None or op is None or op == "contains":
                return None
            value = flt.value
            kind = value.WhichOneof("kind")
            if kind is None:
                return None
            if kind == "list_value":
                if op != "in":
                    return None
                items = []
                for item in value.list_value.values:
                    v = scalar(item)
                    if v is None:
                        return None
                    if field == "_id":
                        v = document_id(v)
                        if v is None:
                            return None
                    items.append(v)
                n = len(items)
                if n == 0:
                    return None
                values[0] += n
                keys = [index_key(v) for v in items]
                access = ("eq", path, tuple(dict.fromkeys(keys)))
                for k in keys:
                    if k is NOKEY:
                        access = None
                key = ("in", path, tuple([const_key(v) for v in items]))
            else:
                if op == "in":
                    return None
                v = getattr(value, kind)
                if field == "_id":
                    v = document_id(v)
                    if v is None:
                        return None
                access = None
                if op == "==":
                    k = index_key(v)
                    if k is not NOKEY:
                        access = ("eq", path, (k,))
                elif op != "!=":
                    k = range_key(v)
                    if k is not None:
                        access = ("range", path, op, k)
                key = ("cmp", path, op, const_key(v))
            indexed = indexed or access is not None
            conjunction.append((key, access, None))
        expression = request.expression
        if not expression:
            if conjunction and not indexed:
                return None
            return [conjunction]
        if len(expression) > self.max_expression_length:
            return None
        try:
            ast = parse_expression(expression)
        except InvalidSubscription:
            return None
        clauses = []
        for clause in lower_expression(ast):
            clause = conjunction + clause
            if clause and not indexed and all(atom[1] is None for atom in clause):
                return None
            clauses.append(clause)
        return clauses
