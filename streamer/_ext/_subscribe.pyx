# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled registration: the common ``SubscribeRequest`` straight into the index.

A ``subscribe_batch`` registers up to thousands of requests per message,
and in Python (``SubscriptionSet.subscribe``: reading the protocol message,
converting each ``Value``, lowering each filter into an atom, the limits,
the bookkeeping, a ``SubscribeResponse`` per request) the glue around the
index cost several times the index's own ``add``. Here the same steps are a
loop over locals, the requests are read from the bytes they came in (see
"reading the wire format" below), and each answer is written as protocol
bytes.

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
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

from streamer._ext._core cimport Core, index_key, range_key
from streamer._ext._varint cimport put_uvarint, uvarint_size

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


cdef list message_filters(object request):
    """The request's filters as ``(field, op, value)``, a list value as a
    list of scalars; None if any value is unset or holds a list in a list."""
    cdef list out = []
    cdef list items
    for flt in request.filters:
        value = flt.value
        kind = value.WhichOneof("kind")
        if kind is None:
            return None
        if kind == "list_value":
            items = []
            for item in value.list_value.values:
                v = scalar(item)
                if v is None:
                    return None
                items.append(v)
            out.append((flt.field, flt.op, items))
        else:
            out.append((flt.field, flt.op, getattr(value, kind)))
    return out


# ----------------------------------------------- reading the wire format
#
# A batch's requests are read from the bytes it came in where they are
# plainly encoded: reading them through protobuf's Python objects (one per
# message, field and value, each made and freed) cost more than the rest of
# the registration. Only what protobuf has already parsed successfully comes
# here (the server decodes every message first), and only the plain case is
# read: each known field once with its own wire type, no unknown field, a
# Value with exactly one member and no list in a list. Anything else is
# read through protobuf's objects. The tests hold both readings to the same
# answers, for plain and for odd encodings.

cdef struct Reader:
    const unsigned char *p
    const unsigned char *end


cdef inline bint varint(Reader *r, uint64_t *out) noexcept nogil:
    cdef uint64_t v = 0
    cdef unsigned char b
    cdef int shift = 0
    while r.p < r.end and shift < 64:
        b = r.p[0]
        r.p += 1
        v |= (<uint64_t>(b & 0x7F)) << shift
        if not (b & 0x80):
            out[0] = v
            return True
        shift += 7
    return False


cdef inline bint field(Reader *r, uint64_t *tag, Reader *body) noexcept nogil:
    """The next field's tag, and its body when length-delimited (others: the
    varint or fixed64 is left to the caller). False at a malformed field."""
    cdef uint64_t n
    if not varint(r, tag):
        return False
    if (tag[0] & 7) == 2:
        if not varint(r, &n) or n > <uint64_t>(r.end - r.p):
            return False
        body.p = r.p
        body.end = r.p + n
        r.p += n
    return True


cdef inline Py_ssize_t string_size(Py_ssize_t n) noexcept nogil:
    # A proto3 string field as serialized: left out when empty.
    return 0 if n == 0 else 1 + uvarint_size(<uint64_t>n) + n


cdef inline Py_ssize_t nested_size(Py_ssize_t n) noexcept nogil:
    return 1 + uvarint_size(<uint64_t>n) + n


cdef inline str text(Reader *r):
    return (<const char *>r.p)[:r.end - r.p].decode("utf-8")


cdef object wire_scalar(Reader *r, Py_ssize_t *size):
    """A ``Value`` with one scalar member: the value, and its size as
    serialized; None otherwise."""
    cdef uint64_t tag, v
    cdef Reader body
    cdef double d
    cdef int i
    cdef object out = None
    if not field(r, &tag, &body):
        return None
    if tag == 0x0A:
        out = text(&body)
        size[0] = nested_size(body.end - body.p)
    elif tag == 0x10 or tag == 0x20:
        if not varint(r, &v):
            return None
        if tag == 0x10:
            out = <int64_t>v
            size[0] = 1 + uvarint_size(v)
        else:
            out = v != 0
            size[0] = 2
    elif tag == 0x19:
        if r.end - r.p < 8:
            return None
        v = 0
        for i in range(8):  # little-endian on the wire, whatever the host
            v |= (<uint64_t>r.p[i]) << (8 * i)
        memcpy(&d, &v, 8)
        r.p += 8
        out = d
        size[0] = 9
    if r.p != r.end:
        return None  # a second member, or another field
    return out


cdef object wire_value(Reader *r, Py_ssize_t *size):
    """A ``Value``: a scalar, or a list of scalars (its member 5 read here);
    its size as serialized. None where the protobuf reading must decide."""
    cdef uint64_t tag
    cdef Reader body, item_body
    cdef Py_ssize_t item_size, total = 0
    cdef list items
    if r.p < r.end and r.p[0] == 0x2A:
        if not field(r, &tag, &body) or r.p != r.end:
            return None
        items = []
        while body.p < body.end:
            if not field(&body, &tag, &item_body) or tag != 0x0A:
                return None
            v = wire_scalar(&item_body, &item_size)
            if v is None:
                return None
            items.append(v)
            total += nested_size(item_size)
        size[0] = nested_size(total)
        return items
    return wire_scalar(r, size)


cdef tuple wire_filter(Reader *r, Py_ssize_t *size):
    """A ``Filter`` as ``(field, op, value)``, and its size as serialized."""
    cdef uint64_t tag
    cdef Reader body
    cdef Py_ssize_t value_size, total = 0
    cdef object name = None, op = None, value = None
    while r.p < r.end:
        if not field(r, &tag, &body):
            return None
        if tag == 0x0A and name is None:
            name = text(&body)
            total += string_size(body.end - body.p)
        elif tag == 0x12 and op is None:
            op = text(&body)
            total += string_size(body.end - body.p)
        elif tag == 0x1A and value is None:
            value = wire_value(&body, &value_size)
            if value is None:
                return None
            total += nested_size(value_size)
        else:
            return None
    if value is None:
        return None
    size[0] = total
    return ("" if name is None else name, "" if op is None else op, value)


cdef tuple wire_request(bytes data, Py_ssize_t max_filters):
    """A serialized ``SubscribeRequest`` as ``(id, database, collection,
    expression, filters, size)``, with ``message_filters``' filters and its
    size as serialized (``ByteSize``); None where protobuf's objects must
    be read instead."""
    try:
        return read_request(data, max_filters)
    except UnicodeDecodeError:
        return None  # protobuf has checked its strings: read them its way


cdef tuple read_request(bytes data, Py_ssize_t max_filters):
    cdef Reader r, body
    cdef uint64_t tag
    cdef int seen = 0, bit
    cdef Py_ssize_t filter_size, total = 0
    cdef list filters = []
    # By field number: id, collection, (filters), database, expression, resume_after.
    cdef list strings = ["", "", "", "", "", "", ""]
    r.p = <const unsigned char *>PyBytes_AS_STRING(data)
    r.end = r.p + PyBytes_GET_SIZE(data)
    while r.p < r.end:
        if not field(&r, &tag, &body) or (tag & 7) != 2 or tag < 0x0A or tag > 0x32:
            return None
        if tag == 0x1A:
            if len(filters) == max_filters:
                return None  # the Python path refuses it
            flt = wire_filter(&body, &filter_size)
            if flt is None:
                return None
            filters.append(flt)
            total += nested_size(filter_size)
            continue
        bit = <int>(tag >> 3)
        if seen & (1 << bit):
            return None
        seen |= 1 << bit
        strings[bit] = text(&body)
        total += string_size(body.end - body.p)
    return (strings[1], strings[4], strings[2], strings[5], filters, total)


def batch_requests(bytes message not None):
    """The requests of a serialized ``GatewayMessage`` that is one plainly
    encoded ``subscribe_batch``, each as the bytes it came in; None for
    any other message."""
    cdef Reader r, body, item
    cdef uint64_t tag
    cdef list out = []
    r.p = <const unsigned char *>PyBytes_AS_STRING(message)
    r.end = r.p + PyBytes_GET_SIZE(message)
    if not field(&r, &tag, &body) or tag != 0x2A or r.p != r.end:
        return None
    while body.p < body.end:
        if not field(&body, &tag, &item) or tag != 0x0A:
            return None
        out.append(PyBytes_FromStringAndSize(<const char *>item.p, item.end - item.p))
    return out


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

    def register(self, uint32_t owner, requests, list out not None, list encoded=None):
        """Register ``requests`` (``SubscribeRequest`` messages) for
        ``owner`` in order, appending each one's answer to ``out`` as a
        ``SubscribeBatchResponse.responses`` entry. ``encoded``, if given,
        holds each request as the bytes it was parsed from (``batch_requests``)."""
        cdef Py_ssize_t i = 0, size = 0
        cdef object subscriptions = self.subscriptions
        cdef Py_ssize_t node = subscriptions.bytes
        cdef bytes entry
        cdef tuple read
        slow = subscriptions.subscribe
        self.index = subscriptions.matcher.index
        if encoded is not None and len(encoded) != len(requests):
            encoded = None
        try:
            for request in requests:
                entry = None
                read = None if encoded is None else wire_request(encoded[i], self.max_filters)
                i += 1
                if read is not None:
                    entry = self.one(owner, read[0], read[1], read[2], read[3], read[4],
                                     read[5], node)
                    size = read[5]
                elif len(request.filters) <= self.max_filters:
                    filters = message_filters(request)
                    if filters is not None:
                        size = request.ByteSize()
                        entry = self.one(owner, request.subscription_id, request.database,
                                         request.collection, request.expression, filters,
                                         size, node)
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

    cdef bytes one(self, uint32_t owner, str sub_id, str database, str collection,
                   str expression, list filters, Py_ssize_t size, Py_ssize_t node_bytes):
        """Register one request (read as ``message_filters`` reads its
        filters; ``size``: as serialized) and return its answer; None
        (nothing done) for one the Python path must handle."""
        cdef Py_ssize_t values, mine
        cdef PyObject *p
        cdef object key = owner
        if not sub_id or sub_id in self.held:
            return None
        p = PyDict_GetItem(self.owned, key)
        if p is not NULL and len(<object>p) >= self.max_subscriptions:
            return None
        p = PyDict_GetItem(self.owner_bytes, key)
        mine = 0 if p is NULL else <object>p
        if (size > self.max_request_bytes or mine + size > self.max_gateway_bytes
                or node_bytes + size > self.max_node_bytes):
            return None
        clauses = self.lower(filters, expression, &values)
        if clauses is None or values > self.max_list_values:
            return None
        index = self.index
        index.enter()
        try:
            index.add_sub(sub_id, database, collection, clauses, owner)
        except (DuplicateSubscription, InvalidSubscription):
            # Left unchanged (an id the index holds outside this set's books,
            # say): the Python path answers.
            return None
        finally:
            index.leave()
        self.held[sub_id] = size << 32 | owner
        p = PyDict_GetItem(self.owned, key)
        if p is NULL:
            self.owned[key] = {sub_id}
        else:
            PySet_Add(<object>p, sub_id)
        self.owner_bytes[key] = mine + size
        return accepted_entry(sub_id)

    cdef list lower(self, list filters, str expression, Py_ssize_t *values):
        """``compile_subscription``'s clauses for the request, or None where
        the Python path must decide (also for any clause the index would
        scan: those have their own limits). ``values`` gets how many values
        the filters' lists hold."""
        cdef list conjunction = []
        cdef list clause, clauses, items, keys
        cdef bint indexed = False
        cdef Py_ssize_t n
        values[0] = 0
        if len(filters) > self.max_filters:
            return None
        for name, op_name, value in filters:
            path = PATHS.get(name)
            op = OPERATORS.get(op_name)
            if path is None or op is None or op == "contains":
                return None
            if type(value) is list:
                if op != "in":
                    return None
                items = value
                if name == "_id":
                    items = [document_id(v) for v in items]
                    if None in items:
                        return None
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
                v = value
                if name == "_id":
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
