# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled matching core: the subscription index and the predicate evaluator.

Layout of the per-subscription state (all in C arrays, so a million
subscriptions are a handful of Python objects, not millions; see
docs/semantics.md, The index):

- a *slot* per subscription: its clause ids;
- a *clause* per disjunct of the subscription's predicate (DNF): the slot it
  belongs to, the ids of its residual atoms, and its access entry;
- *postings*: growable uint32 arrays of clause ids, one per indexed key,
  reached through per-(collection, path) dicts ``key -> posting handle``;
- *atoms*: interned predicates (``Pred`` objects), shared by every clause that
  uses the same (path, op, value) or the same CEL sub-expression, so one event
  evaluates each distinct atom at most once (result cached per event epoch).

Matching an event: look up each indexed path of the collection once, probe
its equality/element dicts and range arrays, and verify each candidate clause's
residual atoms. Cost follows the candidates, not the number of subscriptions.

CEL values are plain Python objects (None, bool, int, float, str, list, dict);
evaluation errors are the ``ERROR`` sentinel rather than exceptions, because
CEL's ``&&``/``||`` absorb errors and raising would be far slower.
"""

cimport cython
from cpython.bool cimport PyBool_Check
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_Check, PyDict_GetItem, PyDict_SetDefault
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check
from cpython.list cimport PyList_Check, PyList_GET_ITEM, PyList_GET_SIZE, PyList_New
from cpython.long cimport PyLong_Check
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF, Py_XDECREF
from cpython.unicode cimport PyUnicode_Check
from libc.math cimport INFINITY, isnan
from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

import re2

cdef extern from *:
    """
    #define STREAMER_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #define STREAMER_NO_ID ((uint32_t)0xFFFFFFFFu)
    """
    void prefetch "STREAMER_PREFETCH"(const void *p) nogil
    # No entry: the end of a free list, an atom without a path. A C constant,
    # not a DEF: a DEF this large is a Python int (see ID_MASK).
    const uint32_t NO_ID "STREAMER_NO_ID"

cdef extern from "Python.h":
    # Raw-pointer forms: the id strings are borrowed from the index until the
    # result list is built, so no reference counting happens while scanning.
    void incref "Py_INCREF"(PyObject *o)
    void list_set_item "PyList_SET_ITEM"(PyObject *lst, Py_ssize_t i, PyObject *o)

from streamer.errors import DuplicateSubscription, IndexBusy

cdef str BUSY = "the index is in use (re-entered from a finalizer or another thread?)"


@cython.final
cdef class _Sentinel:
    cdef str name

    def __init__(self, str name):
        self.name = name

    def __repr__(self):
        return self.name


ERROR = _Sentinel("ERROR")
MISSING = _Sentinel("MISSING")
NOKEY = _Sentinel("NOKEY")
TRUE_KEY = _Sentinel("TRUE_KEY")
FALSE_KEY = _Sentinel("FALSE_KEY")

cdef object ERR = ERROR
cdef object MISS = MISSING
cdef object NK = NOKEY
cdef object TK = TRUE_KEY
cdef object FK = FALSE_KEY

# Operator codes shared with streamer.matching.compiler.
DEF OP_EQ = 0
DEF OP_NE = 1
DEF OP_LT = 2
DEF OP_LE = 3
DEF OP_GT = 4
DEF OP_GE = 5

DEF AR_ADD = 0
DEF AR_SUB = 1
DEF AR_MUL = 2
DEF AR_DIV = 3
DEF AR_MOD = 4

DEF SF_CONTAINS = 0
DEF SF_STARTS = 1
DEF SF_ENDS = 2
DEF SF_MATCHES = 3

DEF ACCESS_ALWAYS = 0
DEF ACCESS_EQ = 1
DEF ACCESS_ELEM = 2
DEF ACCESS_RANGE = 3

# Postings group their clauses by residual atoms: clauses that need the same
# atoms true are checked once per event as a group, then every entry of the
# group is a match. Cost follows matches plus distinct residuals, not
# candidates (``country == 'DE'`` shared by thousands of clauses that differ
# only among a few ``age >= N`` thresholds costs a few atom tests).
#
# An entry (a reference) is 64 bits, tagged in its low bits:
# - ENTRY_ID: the address of the subscription id string, with the slot's
#   owner in the 16 bits above the 48 of a user-space address; used when one
#   event cannot reach the subscription twice (one clause, not list
#   membership), so a match needs no clause or slot lookup (each a cache miss
#   at a million subscriptions), and the fan-out gets the owner for free;
# - ENTRY_SLOT: slot << 3; the slot's epoch stamp removes duplicates;
# - ENTRY_CLAUSE: clause << 3; range arrays only: the clause's own atoms are
#   verified, then deduplicated by slot.
DEF ENTRY_ID = 1
DEF ENTRY_SLOT = 2
DEF ENTRY_CLAUSE = 4
DEF ENTRY_TAGS = 7
DEF OWNER_SHIFT = 48
# Above 2**31 a DEF is a Python int: every use must cast it to uint64_t, or
# the expression silently becomes Python arithmetic.
DEF ID_MASK = 0x0000FFFFFFFFFFF8
DEF OWNER_IN_ENTRY_MAX = 0xFFFF
# How many entries ahead the id strings are prefetched.
DEF PREFETCH = 16

OPS = {"==": OP_EQ, "!=": OP_NE, "<": OP_LT, "<=": OP_LE, ">": OP_GT, ">=": OP_GE}
ARITH = {"+": AR_ADD, "-": AR_SUB, "*": AR_MUL, "/": AR_DIV, "%": AR_MOD}
STRING_FUNCTIONS = {
    "contains": SF_CONTAINS, "startsWith": SF_STARTS, "endsWith": SF_ENDS, "matches": SF_MATCHES,
}
ACCESS_KINDS = {"eq": ACCESS_EQ, "elem": ACCESS_ELEM, "range": ACCESS_RANGE}

cdef object INT64_MIN = -(2 ** 63)
cdef object INT64_MAX = 2 ** 63 - 1
# Integers beyond 2**53 lose precision as doubles, and CEL compares int with
# double through a double: index keys and range thresholds stay below it.
cdef object EXACT_LIMIT = 2 ** 53
cdef double EXACT_LIMIT_D = 9007199254740992.0


# ---------------------------------------------------------------- values


cdef inline bint is_int(object v):
    return PyLong_Check(v) and not PyBool_Check(v)


cdef double int_to_double(object v):
    try:
        return float(v)
    except OverflowError:
        return INFINITY if v > 0 else -INFINITY


cdef object map_lookup(dict d, object key):
    """CEL map lookup: str/int/bool keys, and integral doubles find int keys
    (CEL's numeric key equality); Python would confuse True with 1."""
    cdef PyObject *p
    cdef double x
    if PyUnicode_Check(key):
        p = PyDict_GetItem(d, key)
        return MISS if p == NULL else <object>p
    if PyFloat_Check(key):
        x = PyFloat_AS_DOUBLE(key)
        # Range first: converting an out-of-range double to an integer is UB.
        if not (-9.2e18 < x < 9.2e18) or x != <double><long long>x:
            return MISS
        key = <long long>x
    if PyBool_Check(key) or PyLong_Check(key):
        kb = PyBool_Check(key)
        for k, v in d.items():
            if PyBool_Check(k) == kb and PyLong_Check(k) and k == key:
                return v
        return MISS
    return ERR


# Mirrors streamer.matching.cel.nodes.MAX_VALUE_DEPTH: deeper values compare as an error
# (C recursion on a hostile document would otherwise overflow the stack).
DEF MAX_VALUE_DEPTH = 100
# Mirrors streamer.matching.cel.nodes.MAX_CONCAT: a longer concatenation is
# an evaluation error (the copy would be a per-event cost without bound).
DEF MAX_CONCAT = 4096


cdef int cel_eq(object a, object b, int depth=0) except -2:
    """CEL heterogeneous equality: 1 or 0 (values of different kinds are
    unequal), or -1 for an evaluation error (unknown types, too deep)."""
    cdef Py_ssize_t i, n
    cdef int r
    if depth > MAX_VALUE_DEPTH:
        return -1
    if a is None or b is None:
        return a is b
    if PyBool_Check(a) or PyBool_Check(b):
        return a is b
    if PyUnicode_Check(a):
        return PyUnicode_Check(b) and a == b
    if PyLong_Check(a):
        if PyLong_Check(b):
            return a == b
        if PyFloat_Check(b):
            return int_to_double(a) == PyFloat_AS_DOUBLE(b)
        return 0
    if PyFloat_Check(a):
        if PyFloat_Check(b):
            return PyFloat_AS_DOUBLE(a) == PyFloat_AS_DOUBLE(b)
        if PyLong_Check(b):
            return PyFloat_AS_DOUBLE(a) == int_to_double(b)
        return 0
    if PyList_Check(a):
        if not PyList_Check(b):
            return 0
        n = PyList_GET_SIZE(a)
        if n != PyList_GET_SIZE(b):
            return 0
        for i in range(n):
            r = cel_eq(<object>PyList_GET_ITEM(a, i), <object>PyList_GET_ITEM(b, i), depth + 1)
            if r != 1:
                return r
        return 1
    if PyDict_Check(a):
        if not PyDict_Check(b) or len(<dict>a) != len(<dict>b):
            return 0
        for k, v in (<dict>a).items():
            other = map_lookup(<dict>b, k)
            if other is ERR:
                return -1
            if other is MISS:
                return 0
            r = cel_eq(v, other, depth + 1)
            if r != 1:
                return r
        return 1
    return -1


cdef int cel_cmp(object a, object b) except -3:
    """CEL ordering: -1/0/1, 2 when unordered (NaN), -2 when undefined."""
    cdef double x, y
    if PyUnicode_Check(a):
        if not PyUnicode_Check(b):
            return -2
        return -1 if a < b else (1 if a > b else 0)
    if PyBool_Check(a):
        if not PyBool_Check(b):
            return -2
        return <int>(a is True) - <int>(b is True)
    if PyLong_Check(a) and PyLong_Check(b) and not PyBool_Check(b):
        return -1 if a < b else (1 if a > b else 0)
    if PyLong_Check(a):
        x = int_to_double(a)
    elif PyFloat_Check(a):
        x = PyFloat_AS_DOUBLE(a)
    else:
        return -2
    if PyFloat_Check(b):
        y = PyFloat_AS_DOUBLE(b)
    elif PyLong_Check(b) and not PyBool_Check(b):
        y = int_to_double(b)
    else:
        return -2
    if x < y:
        return -1
    if x > y:
        return 1
    if x == y:
        return 0
    return 2


cdef inline object cmp_result(int op, int c):
    if c == -2:
        return ERR
    if c == 2:
        return False
    if op == OP_LT:
        return c < 0
    if op == OP_LE:
        return c <= 0
    if op == OP_GT:
        return c > 0
    return c >= 0


cdef inline bint cmp_true(int op, object a, object b) except -1:
    cdef int c
    if op == OP_EQ:
        return cel_eq(a, b) == 1
    if op == OP_NE:
        return cel_eq(a, b) == 0
    c = cel_cmp(a, b)
    if c == -2 or c == 2:
        return False
    if op == OP_LT:
        return c < 0
    if op == OP_LE:
        return c <= 0
    if op == OP_GT:
        return c > 0
    return c >= 0


cpdef object index_key(object v):
    """The hash key under which a value is indexed, or NOKEY if it cannot be.

    Keys must be equal exactly when CEL equality holds: bools get their own
    keys (Python's True == 1), numbers rely on Python's exact int/float
    equality, which agrees with CEL's (an int meets a double as a double)
    only strictly below 2**53: 2**53 + 1 meets 2.0**53 as 2.0**53 (found
    by fuzz/fuzz_cel.py).
    """
    cdef double d
    if PyUnicode_Check(v):
        return v
    if PyBool_Check(v):
        return TK if v is True else FK
    if PyLong_Check(v):
        if -EXACT_LIMIT < v < EXACT_LIMIT:
            return v
        return NK
    if PyFloat_Check(v):
        d = PyFloat_AS_DOUBLE(v)
        if isnan(d) or not (-EXACT_LIMIT_D < d < EXACT_LIMIT_D):
            return NK
        return v
    if v is None:
        return None
    return NK


cpdef object range_key(object v):
    """The double under which a number is range-indexed, or None."""
    cdef double d
    if PyBool_Check(v):
        return None
    if PyLong_Check(v):
        if -EXACT_LIMIT < v < EXACT_LIMIT:
            return float(v)
        return None
    if PyFloat_Check(v):
        d = PyFloat_AS_DOUBLE(v)
        if isnan(d):
            return None
        return v
    return None


cdef object int64(object r):
    if INT64_MIN <= r <= INT64_MAX:
        return r
    return ERR


cdef object arith(int op, object a, object b):
    cdef double x, y
    if is_int(a) and is_int(b):
        if op == AR_ADD:
            return int64(a + b)
        if op == AR_SUB:
            return int64(a - b)
        if op == AR_MUL:
            return int64(a * b)
        if b == 0:
            return ERR
        q = abs(a) // abs(b)
        if (a < 0) != (b < 0):
            q = -q
        if op == AR_DIV:
            return int64(q)
        return a - b * q
    if PyFloat_Check(a) and PyFloat_Check(b):
        x = PyFloat_AS_DOUBLE(a)
        y = PyFloat_AS_DOUBLE(b)
        if op == AR_ADD:
            return x + y
        if op == AR_SUB:
            return x - y
        if op == AR_MUL:
            return x * y
        if op == AR_DIV:
            if y == 0.0:
                if isnan(x) or x == 0.0:
                    return float("nan")
                return INFINITY if (x > 0) == (str(y)[0] != "-") else -INFINITY
            return x / y
        return ERR
    if op == AR_ADD:
        if PyUnicode_Check(a) and PyUnicode_Check(b):
            if len(a) + len(b) > MAX_CONCAT:
                return ERR
            return a + b
        if PyList_Check(a) and PyList_Check(b):
            if len(a) + len(b) > MAX_CONCAT:
                return ERR
            return a + b
    return ERR


cdef object const_value(tuple ck):
    """The constant a ``streamer.matching.compiler.const_key`` pair stands for."""
    if ck[0] == "list":
        return [const_value(c) for c in ck[1]]
    return ck[1]


cdef object regex_cache = {}


cdef object compiled_regex(str pattern):
    rx = regex_cache.get(pattern)
    if rx is None:
        try:
            rx = re2.compile(pattern)
        except Exception:
            rx = ERR
        if len(regex_cache) > 1024:
            regex_cache.clear()
        regex_cache[pattern] = rx
    return rx


# ---------------------------------------------------------------- context


cdef class Ctx:
    """Per-event state: the document, its id, and the path-value cache."""

    def __cinit__(self):
        self.path_epoch = NULL
        self.path_vals = NULL
        self.npaths = 0
        self.epoch = 1
        self.path_comps = []

    def __dealloc__(self):
        free(self.path_epoch)
        free(self.path_vals)

    cdef void reserve_paths(self, uint32_t n) except *:
        cdef uint32_t cap
        if n <= self.npaths:
            return
        cap = max(n, 2 * self.npaths, 16)
        pe = <uint32_t *>realloc(self.path_epoch, cap * sizeof(uint32_t))
        if pe == NULL:
            raise MemoryError()
        self.path_epoch = pe
        pv = <void **>realloc(self.path_vals, cap * sizeof(void *))
        if pv == NULL:
            raise MemoryError()
        self.path_vals = pv
        memset(&self.path_epoch[self.npaths], 0, (cap - self.npaths) * sizeof(uint32_t))
        self.npaths = cap

    cdef object path_value(self, uint32_t pid):
        """The value at an interned path, or MISSING; cached for this event.

        The cache holds borrowed pointers: every value lives inside
        ``self.doc`` (or is ``self.doc_id``), which outlives the event.
        """
        cdef PyObject *p
        cdef object cur
        if self.path_epoch[pid] == self.epoch:
            p = <PyObject *>self.path_vals[pid]
            return MISS if p == NULL else <object>p
        comps = <tuple>self.path_comps[pid]
        p = NULL
        if len(comps) == 1 and comps[0] == "_id":
            if self.doc_id is not None:
                p = <PyObject *>self.doc_id
        else:
            cur = self.doc
            for comp in comps:
                if not PyDict_Check(cur):
                    p = NULL
                    break
                p = PyDict_GetItem(cur, comp)
                if p == NULL:
                    break
                cur = <object>p
        self.path_epoch[pid] = self.epoch
        self.path_vals[pid] = <void *>p
        return MISS if p == NULL else <object>p

    cdef object root(self):
        """``doc`` as a whole value: the document with ``_id`` set to its id."""
        if self.view is None:
            view = dict(self.doc) if PyDict_Check(self.doc) else {}
            if self.doc_id is not None:
                view["_id"] = self.doc_id
            else:
                view.pop("_id", None)
            self.view = view
        return self.view


# ---------------------------------------------------------------- CEL nodes


cdef class Node:
    """A compiled CEL expression node; ``eval`` returns a value or ERROR."""

    cdef object eval(self, Ctx ctx):
        return ERR

    def __call__(self, bindings=None, doc=None, doc_id=None):
        """Evaluate outside the index (tests, conformance): value or ERROR."""
        cdef Ctx ctx = Ctx()
        ctx.bindings = dict(bindings) if bindings else {}
        ctx.doc = doc
        ctx.doc_id = doc_id
        return self.eval(ctx)


@cython.final
cdef class Const(Node):
    cdef object value

    def __init__(self, value):
        self.value = value

    cdef object eval(self, Ctx ctx):
        return self.value


@cython.final
cdef class Ident(Node):
    cdef object name

    def __init__(self, str name):
        self.name = name

    cdef object eval(self, Ctx ctx):
        cdef PyObject *p
        if ctx.bindings is None:
            return ERR
        p = PyDict_GetItem(ctx.bindings, self.name)
        return ERR if p == NULL else <object>p


@cython.final
cdef class Root(Node):
    cdef object eval(self, Ctx ctx):
        return ctx.root()


@cython.final
cdef class DocPath(Node):
    cdef uint32_t pid

    def __init__(self, uint32_t pid):
        self.pid = pid

    cdef object eval(self, Ctx ctx):
        v = ctx.path_value(self.pid)
        return ERR if v is MISS else v


@cython.final
cdef class Field(Node):
    """``operand.field`` on a map, or with ``test_only`` the ``has()`` test."""
    cdef Node operand
    cdef object field
    cdef bint test_only

    def __init__(self, Node operand, str field, bint test_only):
        self.operand = operand
        self.field = field
        self.test_only = test_only

    cdef object eval(self, Ctx ctx):
        cdef PyObject *p
        v = self.operand.eval(ctx)
        if not PyDict_Check(v):
            return ERR
        p = PyDict_GetItem(v, self.field)
        if self.test_only:
            return p != NULL
        return ERR if p == NULL else <object>p


@cython.final
cdef class Index(Node):
    cdef Node operand
    cdef Node index

    def __init__(self, Node operand, Node index):
        self.operand = operand
        self.index = index

    cdef object eval(self, Ctx ctx):
        cdef double d
        v = self.operand.eval(ctx)
        if v is ERR:
            return ERR
        i = self.index.eval(ctx)
        if i is ERR:
            return ERR
        if PyList_Check(v):
            if PyFloat_Check(i):
                d = PyFloat_AS_DOUBLE(i)
                if not (-9.2e18 < d < 9.2e18) or d != <double><long long>d:
                    return ERR
                i = <long long>d
            elif not is_int(i):
                return ERR
            if i < 0 or i >= PyList_GET_SIZE(v):
                return ERR
            return v[i]
        if PyDict_Check(v):
            r = map_lookup(<dict>v, i)
            return ERR if r is MISS else r
        return ERR


@cython.final
cdef class Junction(Node):
    """CEL's ``&&`` (conjunction) or ``||`` over any number of terms, with
    error absorption: the absorbing value (false for ``&&``, true for ``||``)
    wins over errors, in any position; otherwise any error is the result."""
    cdef list terms
    cdef object absorbing

    def __init__(self, list terms, bint conjunction):
        self.terms = terms
        self.absorbing = not conjunction

    cdef object eval(self, Ctx ctx):
        cdef bint err = False
        for t in self.terms:
            v = (<Node>t).eval(ctx)
            if v is self.absorbing:
                return v
            if v is not (not self.absorbing):
                err = True
        return ERR if err else (not self.absorbing)


@cython.final
cdef class Not(Node):
    cdef Node operand

    def __init__(self, Node operand):
        self.operand = operand

    cdef object eval(self, Ctx ctx):
        v = self.operand.eval(ctx)
        if v is True:
            return False
        if v is False:
            return True
        return ERR


@cython.final
cdef class Neg(Node):
    cdef Node operand

    def __init__(self, Node operand):
        self.operand = operand

    cdef object eval(self, Ctx ctx):
        v = self.operand.eval(ctx)
        if is_int(v):
            return int64(-v)
        if PyFloat_Check(v):
            return -PyFloat_AS_DOUBLE(v)
        return ERR


@cython.final
cdef class Cond(Node):
    cdef Node cond
    cdef Node then
    cdef Node other

    def __init__(self, Node cond, Node then, Node other):
        self.cond = cond
        self.then = then
        self.other = other

    cdef object eval(self, Ctx ctx):
        c = self.cond.eval(ctx)
        if c is True:
            return self.then.eval(ctx)
        if c is False:
            return self.other.eval(ctx)
        return ERR


cdef object membership(object item, object container):
    cdef int r
    if PyList_Check(container):
        for e in <list>container:
            r = cel_eq(item, e)
            if r < 0:
                return ERR
            if r:
                return True
        return False
    if PyDict_Check(container):
        found = map_lookup(<dict>container, item)
        if found is ERR:
            return ERR
        return found is not MISS
    return ERR


@cython.final
cdef class Binary(Node):
    """A binary operator on two evaluated operands: a comparison, arithmetic
    or ``in``; an error in either operand is the result."""
    cdef int kind     # 0 comparison, 1 arithmetic, 2 membership
    cdef int op
    cdef Node left
    cdef Node right

    def __init__(self, str op, Node left, Node right):
        if op in OPS:
            self.kind, self.op = 0, OPS[op]
        elif op in ARITH:
            self.kind, self.op = 1, ARITH[op]
        elif op == "in":
            self.kind, self.op = 2, 0
        else:
            raise ValueError(f"unknown binary operator {op!r}")
        self.left = left
        self.right = right

    cdef object eval(self, Ctx ctx):
        a = self.left.eval(ctx)
        if a is ERR:
            return ERR
        b = self.right.eval(ctx)
        if b is ERR:
            return ERR
        if self.kind == 1:
            return arith(self.op, a, b)
        if self.kind == 2:
            return membership(a, b)
        if self.op <= OP_NE:
            r = cel_eq(a, b)
            if r < 0:
                return ERR
            return (r == 1) == (self.op == OP_EQ)
        return cmp_result(self.op, cel_cmp(a, b))


@cython.final
cdef class Size(Node):
    cdef Node operand

    def __init__(self, Node operand):
        self.operand = operand

    cdef object eval(self, Ctx ctx):
        v = self.operand.eval(ctx)
        if PyUnicode_Check(v) or PyList_Check(v) or PyDict_Check(v):
            return len(v)
        return ERR


@cython.final
cdef class StringFunction(Node):
    cdef int fn
    cdef Node target
    cdef Node arg

    def __init__(self, str name, Node target, Node arg):
        self.fn = STRING_FUNCTIONS[name]
        self.target = target
        self.arg = arg

    cdef object eval(self, Ctx ctx):
        s = self.target.eval(ctx)
        if not PyUnicode_Check(s):
            return ERR
        a = self.arg.eval(ctx)
        if not PyUnicode_Check(a):
            return ERR
        if self.fn == SF_CONTAINS:
            return a in <str>s
        if self.fn == SF_STARTS:
            return (<str>s).startswith(a)
        if self.fn == SF_ENDS:
            return (<str>s).endswith(a)
        rx = compiled_regex(a)
        if rx is ERR:
            return ERR
        return rx.search(s) is not None


@cython.final
cdef class ListLit(Node):
    cdef list items

    def __init__(self, list items):
        self.items = items

    cdef object eval(self, Ctx ctx):
        out = []
        for t in self.items:
            v = (<Node>t).eval(ctx)
            if v is ERR:
                return ERR
            out.append(v)
        return out


@cython.final
cdef class MapLit(Node):
    cdef list keys
    cdef list values

    def __init__(self, list keys, list values):
        self.keys = keys
        self.values = values

    cdef object eval(self, Ctx ctx):
        cdef Py_ssize_t i
        out = {}
        for i in range(len(self.keys)):
            k = (<Node>self.keys[i]).eval(ctx)
            if k is ERR or not (PyUnicode_Check(k) or PyLong_Check(k)):
                return ERR
            # A CEL map may hold both true and 1 as keys; a dict cannot,
            # so such a literal is rejected like a repeated key.
            if k in out:
                return ERR
            v = (<Node>self.values[i]).eval(ctx)
            if v is ERR:
                return ERR
            out[k] = v
        return out


# ---------------------------------------------------------------- atoms


cdef class Pred:
    """An interned atom of a clause: true or false for the current event."""

    cdef int test(self, Ctx ctx) except -1:
        return 0


@cython.final
cdef class PathCompare(Pred):
    """``path op constant`` with CEL comparison semantics."""
    cdef uint32_t pid
    cdef int op
    cdef object const

    def __init__(self, uint32_t pid, str op, object const):
        self.pid = pid
        self.op = OPS[op]
        self.const = const

    cdef int test(self, Ctx ctx) except -1:
        v = ctx.path_value(self.pid)
        if v is MISS:
            return 0
        return cmp_true(self.op, v, self.const)


@cython.final
cdef class PathIn(Pred):
    """``path in [constants]``."""
    cdef uint32_t pid
    # A tuple, not a list: the collector untracks a tuple of strings and
    # numbers, so a thousand-value list held per subscription is not walked
    # by every full collection (a list of them was 27 ms per collection).
    cdef tuple consts

    def __init__(self, uint32_t pid, tuple consts):
        self.pid = pid
        self.consts = consts

    cdef int test(self, Ctx ctx) except -1:
        v = ctx.path_value(self.pid)
        if v is MISS:
            return 0
        for c in self.consts:
            if cel_eq(v, c) == 1:
                return 1
        return 0


@cython.final
cdef class PathHolds(Pred):
    """The value at path holds a constant: as a list element, a map key
    (CEL ``c in doc.path``), or with ``substring`` as a substring of a string
    (the ``contains`` filter)."""
    cdef uint32_t pid
    cdef object const
    cdef bint substring

    def __init__(self, uint32_t pid, object const, bint substring):
        self.pid = pid
        self.const = const
        self.substring = substring

    cdef int test(self, Ctx ctx) except -1:
        v = ctx.path_value(self.pid)
        if PyList_Check(v):
            for e in <list>v:
                if cel_eq(e, self.const) == 1:
                    return 1
            return 0
        if PyUnicode_Check(v):
            return self.substring and PyUnicode_Check(self.const) and self.const in <str>v
        if PyDict_Check(v) and not self.substring:
            r = map_lookup(<dict>v, self.const)
            return r is not MISS and r is not ERR
        return 0


@cython.final
cdef class Expression(Pred):
    """A CEL sub-expression; true only when it evaluates to ``true``."""
    cdef Node node

    def __init__(self, Node node):
        self.node = node

    cdef int test(self, Ctx ctx) except -1:
        return self.node.eval(ctx) is True


# ---------------------------------------------------------------- index


cdef inline uint32_t *clause_atoms(Clause *cl) noexcept nogil:
    return cl.atoms if cl.atoms != NULL else &cl.atom0


cdef inline uint32_t *clause_handles(Clause *cl) noexcept nogil:
    return cl.handles if cl.handles != NULL else &cl.handle0


cdef inline uint32_t *slot_clauses(Slot *s) noexcept nogil:
    return s.clauses if s.clauses != NULL else &s.clause0


cdef void alloc_array(uint32_t n, uint32_t **field) except *:
    """Give ``field`` a block for n > 1 elements; NULL selects inline storage."""
    field[0] = NULL
    if n > 1:
        field[0] = <uint32_t *>malloc(n * sizeof(uint32_t))
        if field[0] == NULL:
            raise MemoryError()


cdef void range_insert(RangeArr *a, double key, uint64_t entry) except *:
    cdef uint32_t lo = 0, hi = a.n, mid, cap
    if a.n == a.cap:
        cap = 8 if a.cap == 0 else 2 * a.cap
        k = <double *>realloc(a.keys, cap * sizeof(double))
        if k == NULL:
            raise MemoryError()
        a.keys = k
        c = <uint64_t *>realloc(a.entries, cap * sizeof(uint64_t))
        if c == NULL:
            raise MemoryError()
        a.entries = c
        a.cap = cap
    while lo < hi:
        mid = (lo + hi) >> 1
        if a.keys[mid] <= key:
            lo = mid + 1
        else:
            hi = mid
    memmove(&a.keys[lo + 1], &a.keys[lo], (a.n - lo) * sizeof(double))
    memmove(&a.entries[lo + 1], &a.entries[lo], (a.n - lo) * sizeof(uint64_t))
    a.keys[lo] = key
    a.entries[lo] = entry
    a.n += 1


cdef uint32_t lower_bound(RangeArr *a, double key) nogil:
    cdef uint32_t lo = 0, hi = a.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a.keys[mid] < key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef uint32_t upper_bound(RangeArr *a, double key) nogil:
    cdef uint32_t lo = 0, hi = a.n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a.keys[mid] <= key:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef void range_remove(RangeArr *a, double key, uint64_t entry) noexcept:
    cdef uint32_t i = lower_bound(a, key)
    while i < a.n and a.keys[i] == key:
        if a.entries[i] == entry:
            memmove(&a.keys[i], &a.keys[i + 1], (a.n - i - 1) * sizeof(double))
            memmove(&a.entries[i], &a.entries[i + 1], (a.n - i - 1) * sizeof(uint64_t))
            a.n -= 1
            if a.cap > 8 and a.n <= a.cap // 4:
                shrink_range(a)
            return
        i += 1


cdef void shrink_range(RangeArr *a) noexcept:
    # Halved at a quarter full (doubled when full): an array that once held
    # many thresholds does not keep their memory, and never thrashes.
    cdef uint32_t cap = a.cap // 2
    k = <double *>realloc(a.keys, cap * sizeof(double))
    if k == NULL:
        return
    a.keys = k
    a.cap = cap
    e = <uint64_t *>realloc(a.entries, cap * sizeof(uint64_t))
    if e != NULL:
        a.entries = e


@cython.final
cdef class RangeIndex:
    """Sorted thresholds per comparison: a numeric event value selects a
    prefix (``>``/``>=``) or a suffix (``<``/``<=``) of each array."""

    def __cinit__(self):
        memset(self.arrs, 0, sizeof(self.arrs))

    def __dealloc__(self):
        for i in range(4):
            free(self.arrs[i].keys)
            free(self.arrs[i].entries)

    cdef bint empty(self):
        return (self.arrs[0].n | self.arrs[1].n | self.arrs[2].n | self.arrs[3].n) == 0


@cython.final
cdef class PathIndex:
    """Index structures of one (collection, path); it holds the path."""

    def __init__(self, uint32_t pid, CollIndex coll):
        self.pid = pid
        self.eq = {}
        self.elem = {}
        self.ranges = None
        self.coll = coll

    cdef bint empty(self):
        return not self.eq and not self.elem and self.ranges is None


@cython.final
cdef class CollIndex:
    """Everything indexed for one (database, collection); it lives while a
    subscription of it does (``nsubs``)."""

    def __init__(self, database, collection, uint32_t number, uint32_t always):
        self.paths = []
        self.by_pid = {}
        self.always = always
        self.number = number
        self.nsubs = 0
        self.database = database
        self.collection = collection


cdef void *grow(void *ptr, uint32_t *cap, uint32_t need, size_t item) except NULL:
    """realloc an array to hold ``need`` items, zeroing the new part."""
    cdef uint32_t old = cap[0], new
    if need <= old and ptr != NULL:
        return ptr
    new = max(need, 2 * old, 64)
    p = realloc(ptr, new * item)
    if p == NULL:
        raise MemoryError()
    memset(<char *>p + old * item, 0, (new - old) * item)
    cap[0] = new
    return p


@cython.final
cdef class Core:
    """The subscription index. Driven by ``streamer.matching.matcher.Matcher``, which
    compiles subscriptions into clauses and atoms; this class stores them and
    matches events.

    Every operation that reads or writes the index runs with ``busy`` set
    (``enter``/``leave``; the compiled fan-out takes it too): they hold raw
    pointers into its arrays and the shared match buffer across allocations,
    and an allocation can run the garbage collector, and with it any
    finalizer. A finalizer (or another thread) that calls back in gets
    ``IndexBusy`` instead of moving or overwriting that state. The counts
    (``len``, ``in``, ``stats``) stay readable: the metrics thread reads them.

    Nothing outlives the subscriptions that need it: interned paths are
    held by the atoms and path indexes that use them, atoms by their
    clauses, postings and path indexes by their entries, a collection's
    index by its subscriptions. Freed slots, clauses, postings, atoms and
    path ids go on free lists threaded through the freed entries
    themselves, and are reused first.
    """

    def __cinit__(self):
        self.slots = NULL
        self.slot_epoch = NULL
        self.clauses = NULL
        self.postings = NULL
        self.path_refs = NULL
        self.atom_refs = NULL
        self.atom_epoch = NULL
        self.atom_val = NULL
        self.atom_path = NULL
        self.found = NULL
        self.found_owners = NULL

    def __init__(self):
        self.ctx = Ctx()
        self.colls = {}
        self.coll_table = []
        self.free_colls = []
        self.path_ids = {}
        self.path_comps = self.ctx.path_comps
        self.path_cap = 0
        self.free_path = NO_ID
        self.building = None
        self.sub_slots = {}
        self.nslots = self.slot_cap = 0
        self.free_slot = NO_ID
        self.nclauses = self.clause_cap = self.nfree_clauses = 0
        self.free_clause = NO_ID
        self.npostings = self.posting_cap = self.nfree_postings = 0
        self.free_posting = NO_ID
        self.range_owner = []
        self.free_ranges = []
        self.atom_ids = {}
        self.atom_preds = []
        self.atom_keys = []
        self.atom_more_paths = {}
        self.atom_cap = 0
        self.free_atom = NO_ID
        self.scan_clauses = 0
        self.nfound = self.found_cap = 0
        self.busy = False

    def __dealloc__(self):
        cdef uint32_t i, j
        if self.slots != NULL:
            for i in range(self.nslots):
                free(self.slots[i].clauses)
                Py_XDECREF(self.slots[i].id)
        if self.clauses != NULL:
            for i in range(self.nclauses):
                free(self.clauses[i].atoms)
                free(self.clauses[i].handles)
        if self.postings != NULL:
            for i in range(self.npostings):
                for j in range(self.postings[i].ngroups):
                    free(self.postings[i].groups[j].atoms)
                    free(self.postings[i].groups[j].refs)
                free(self.postings[i].groups)
                Py_XDECREF(self.postings[i].owner)
                Py_XDECREF(self.postings[i].key)
        free(self.slots)
        free(self.slot_epoch)
        free(self.clauses)
        free(self.postings)
        free(self.path_refs)
        free(self.atom_refs)
        free(self.atom_epoch)
        free(self.atom_val)
        free(self.atom_path)
        free(self.found)
        free(self.found_owners)

    def __len__(self):
        return len(self.sub_slots)

    def __contains__(self, sub_id):
        return sub_id in self.sub_slots

    def stats(self):
        """Counts for metrics and benchmarks."""
        return {
            "subscriptions": len(self.sub_slots),
            "clauses": self.nclauses - self.nfree_clauses,
            "scan_clauses": self.scan_clauses,
            "atoms": len(self.atom_ids),
            "postings": self.npostings - self.nfree_postings,
            "paths": len(self.path_ids),
            "collections": len(self.coll_table) - len(self.free_colls),
        }

    def tables(self):
        """For tests and diagnostics: per table, ``(in use, allocated)``
        entries (the difference is on the table's free list); and for the
        arrays the postings' groups and the range indexes grow,
        ``array_bytes``: bytes of entries, and bytes allocated."""
        cdef uint32_t h, j
        cdef Posting *p
        cdef RangeArr *a
        cdef size_t used = 0, allocated = 0
        for h in range(self.npostings):
            p = &self.postings[h]
            used += p.ngroups * sizeof(Group)
            allocated += p.gcap * sizeof(Group)
            for j in range(p.ngroups):
                used += p.groups[j].n * sizeof(uint64_t) + p.groups[j].natoms * sizeof(uint32_t)
                allocated += (p.groups[j].cap * sizeof(uint64_t)
                              + max(p.groups[j].natoms, 1) * sizeof(uint32_t))
        for pix in self.range_owner:
            if pix is not None:
                for j in range(4):
                    a = &(<PathIndex>pix).ranges.arrs[j]
                    used += a.n * (sizeof(double) + sizeof(uint64_t))
                    allocated += a.cap * (sizeof(double) + sizeof(uint64_t))
        return {
            "array_bytes": (used, allocated),
            "slots": (len(self.sub_slots), self.nslots),
            "clauses": (self.nclauses - self.nfree_clauses, self.nclauses),
            "postings": (self.npostings - self.nfree_postings, self.npostings),
            "atoms": (len(self.atom_ids), len(self.atom_preds)),
            "paths": (len(self.path_ids), len(self.path_comps)),
            "ranges": (len(self.range_owner) - len(self.free_ranges), len(self.range_owner)),
            "collections": (len(self.coll_table) - len(self.free_colls), len(self.coll_table)),
        }

    cdef int enter(self) except -1:
        if self.busy:
            raise IndexBusy(BUSY)
        self.busy = True
        return 0

    cdef void leave(self) noexcept:
        self.busy = False

    # -- interning -----------------------------------------------------

    def path_id(self, tuple comps):
        """The id of a field path (a tuple of map keys), for the atom factory
        that ``add`` is running (``streamer.matching.compiler``): the atom holds the
        path until it is freed."""
        if self.building is None:
            if self.busy:
                raise IndexBusy(BUSY)
            raise RuntimeError("path ids are only handed out to atom factories, during add")
        pid = self.path_acquire(comps)
        self.building.append(pid)
        return pid

    cdef uint32_t path_acquire(self, tuple comps) except? 0xffffffff:
        """The id of a field path, interned; the caller holds a reference."""
        cdef uint32_t pid
        cdef PyObject *p = PyDict_GetItem(self.path_ids, comps)
        if p != NULL:
            pid = <object>p
            self.path_refs[pid] += 1
            return pid
        if self.free_path != NO_ID:
            pid = self.free_path
            self.free_path = self.path_refs[pid]
            self.path_comps[pid] = comps
        else:
            pid = len(self.path_comps)
            # Both sized before anything is recorded: a failure leaves no trace.
            self.ctx.reserve_paths(pid + 1)
            self.path_refs = <uint32_t *>grow(self.path_refs, &self.path_cap, pid + 1,
                                              sizeof(uint32_t))
            self.path_comps.append(comps)
        self.path_refs[pid] = 1
        self.path_ids[comps] = pid
        return pid

    cdef void path_release(self, uint32_t pid) except *:
        self.path_refs[pid] -= 1
        if self.path_refs[pid]:
            return
        del self.path_ids[self.path_comps[pid]]
        self.path_comps[pid] = None
        # The id will name another path: the per-event cache must not serve
        # it this one's value. Epoch 0 is never current (next_epoch skips it).
        self.ctx.path_epoch[pid] = 0
        self.path_refs[pid] = self.free_path
        self.free_path = pid

    cdef PathIndex path_index(self, CollIndex ci, tuple comps):
        """The collection's index of a path, made (holding the path) if new."""
        pid = self.path_ids.get(comps)
        if pid is not None:
            pix = ci.by_pid.get(pid)
            if pix is not None:
                return <PathIndex>pix
        pid = self.path_acquire(comps)
        pix = PathIndex(pid, ci)
        ci.by_pid[pid] = pix
        ci.paths.append(pix)
        return <PathIndex>pix

    cdef void prune(self, PathIndex pix) except *:
        # Empty path indexes would still cost a lookup per event.
        if pix.empty():
            del pix.coll.by_pid[pix.pid]
            pix.coll.paths.remove(pix)
            self.path_release(pix.pid)

    cdef uint32_t intern(self, tuple atom) except? 0xffffffff:
        """The id of an atom ``(key, access, factory)``, interned by key; the
        caller holds a reference. The atom holds the paths its predicate
        reads (a factory takes them through ``path_id``)."""
        cdef uint32_t cap, aid, n
        cdef list paths
        cdef Pred pred
        key = atom[0]
        found = self.atom_ids.get(key)
        if found is not None:
            aid = found
            self.atom_refs[aid] += 1
            return aid
        n = len(self.atom_preds)
        if self.free_atom == NO_ID and n >= self.atom_cap:
            cap = self.atom_cap
            self.atom_refs = <uint32_t *>grow(self.atom_refs, &cap, n + 1, sizeof(uint32_t))
            cap = self.atom_cap
            self.atom_epoch = <uint32_t *>grow(self.atom_epoch, &cap, n + 1, sizeof(uint32_t))
            cap = self.atom_cap
            self.atom_val = <uint8_t *>grow(self.atom_val, &cap, n + 1, sizeof(uint8_t))
            cap = self.atom_cap
            self.atom_path = <uint32_t *>grow(self.atom_path, &cap, n + 1, sizeof(uint32_t))
            self.atom_cap = cap
        factory = atom[2]
        if factory is None:
            paths = [self.path_acquire(key[1])]
            try:
                pred = self.build_pred(key, paths[0])
            except BaseException:
                self.path_release(paths[0])
                raise
        else:
            self.building = paths = []
            try:
                pred = factory(self)
            except BaseException:
                for pid in paths:
                    self.path_release(pid)
                raise
            finally:
                self.building = None
        if self.free_atom != NO_ID:
            aid = self.free_atom
            self.free_atom = self.atom_refs[aid]
            self.atom_preds[aid] = pred
            self.atom_keys[aid] = key
        else:
            aid = n
            self.atom_preds.append(pred)
            self.atom_keys.append(key)
        self.atom_refs[aid] = 1
        self.atom_epoch[aid] = 0
        self.atom_path[aid] = paths[0] if paths else NO_ID
        if len(paths) > 1:
            self.atom_more_paths[aid] = tuple(paths[1:])
        self.atom_ids[key] = aid
        return aid

    cdef void release_atom(self, uint32_t aid) except *:
        self.atom_refs[aid] -= 1
        if self.atom_refs[aid]:
            return
        del self.atom_ids[self.atom_keys[aid]]
        self.atom_preds[aid] = None
        self.atom_keys[aid] = None
        if self.atom_path[aid] != NO_ID:
            self.path_release(self.atom_path[aid])
            if self.atom_more_paths:
                for pid in self.atom_more_paths.pop(aid, ()):
                    self.path_release(pid)
        self.atom_refs[aid] = self.free_atom
        self.free_atom = aid

    cdef Pred build_pred(self, tuple key, uint32_t pid):
        kind = key[0]
        if kind == "cmp":
            return PathCompare(pid, key[2], const_value(key[3]))
        if kind == "in":
            return PathIn(pid, tuple([const_value(c) for c in key[2]]))
        if kind == "holds":
            return PathHolds(pid, const_value(key[2]), key[3])
        raise ValueError(f"atom {key!r} needs a factory")

    cdef double access_cost(self, CollIndex ci, tuple comps, tuple keys, bint elem):
        """Estimated candidates per event if a clause is indexed under keys.

        Each key's posting is visited when the event's value equals it; with
        no event statistics, each of the path's distinct keys is taken as
        equally likely. So ``type == "text"`` (one key, a long posting)
        costs more than ``chat_id == "c7"`` (thousands of keys).
        """
        cdef double visits = 0
        cdef dict table
        pid = self.path_ids.get(comps)
        pix = ci.by_pid.get(pid) if pid is not None else None
        if pix is None:
            return len(keys)
        table = (<PathIndex>pix).elem if elem else (<PathIndex>pix).eq
        for k in keys:
            h = table.get(k)
            visits += 1 + (0 if h is None else self.postings[<uint32_t>h].total)
        return visits / (len(table) + 1)

    # -- postings ------------------------------------------------------

    cdef uint32_t new_posting(self, object owner, object key, bint elem) except? 0xffffffff:
        cdef uint32_t h
        if self.free_posting != NO_ID:
            h = self.free_posting
            self.free_posting = self.postings[h].total
            self.nfree_postings -= 1
        else:
            h = self.npostings
            self.postings = <Posting *>grow(self.postings, &self.posting_cap, h + 1, sizeof(Posting))
            self.npostings += 1
        # Owners and keys live in the C array, not in Python lists: a list
        # of a million references is walked by every full garbage collection.
        Py_INCREF(owner)
        Py_INCREF(key)
        self.postings[h].owner = <PyObject *>owner
        self.postings[h].key = <PyObject *>key
        self.postings[h].ngroups = 0
        self.postings[h].total = 0
        self.postings[h].elem = elem
        return h

    cdef void release_posting(self, uint32_t h) except *:
        cdef Posting *p = &self.postings[h]
        cdef PyObject *owner = p.owner
        cdef PyObject *key = p.key
        # Every group went with its last entry; the array goes too, so a
        # free posting costs nothing but its entry here.
        free(p.groups)
        p.groups = NULL
        p.ngroups = p.gcap = 0
        p.owner = p.key = NULL
        p.total = self.free_posting
        self.free_posting = h
        self.nfree_postings += 1
        Py_XDECREF(owner)
        Py_XDECREF(key)

    cdef void posting_add(self, uint32_t h, Clause *cl) except *:
        cdef Posting *p = &self.postings[h]
        cdef Group *g = NULL
        cdef uint32_t i, cap
        for i in range(p.ngroups):
            if p.groups[i].natoms == cl.natoms and memcmp(
                    p.groups[i].atoms, clause_atoms(cl), cl.natoms * sizeof(uint32_t)) == 0:
                g = &p.groups[i]
                break
        if g == NULL:
            if p.ngroups == p.gcap:
                cap = 1 if p.gcap == 0 else 2 * p.gcap
                groups = <Group *>realloc(p.groups, cap * sizeof(Group))
                if groups == NULL:
                    raise MemoryError()
                p.groups = groups
                p.gcap = cap
            g = &p.groups[p.ngroups]
            memset(g, 0, sizeof(Group))
            g.atoms = <uint32_t *>malloc(max(cl.natoms, 1) * sizeof(uint32_t))
            if g.atoms == NULL:
                raise MemoryError()
            memcpy(g.atoms, clause_atoms(cl), cl.natoms * sizeof(uint32_t))
            g.natoms = cl.natoms
            p.ngroups += 1
        if g.n == g.cap:
            cap = 2 if g.cap == 0 else 2 * g.cap
            refs = <uint64_t *>realloc(g.refs, cap * sizeof(uint64_t))
            if refs == NULL:
                raise MemoryError()
            g.refs = refs
            g.cap = cap
        g.refs[g.n] = cl.entry
        g.n += 1
        p.total += 1

    cdef void posting_remove(self, uint32_t h, Clause *cl):
        cdef Posting *p = &self.postings[h]
        cdef Group *g
        cdef uint32_t i, k
        for i in range(p.ngroups):
            g = &p.groups[i]
            if g.natoms != cl.natoms or memcmp(
                    g.atoms, clause_atoms(cl), cl.natoms * sizeof(uint32_t)):
                continue
            for k in range(g.n):
                if g.refs[k] == cl.entry:
                    g.n -= 1
                    g.refs[k] = g.refs[g.n]
                    p.total -= 1
                    break
            if g.n == 0:
                free(g.atoms)
                free(g.refs)
                p.ngroups -= 1
                p.groups[i] = p.groups[p.ngroups]
                # Arrays are halved at a quarter full (doubled when full), so
                # a posting keeps memory for what it holds, not for its past.
                if p.gcap > 4 and p.ngroups <= p.gcap // 4:
                    groups = <Group *>realloc(p.groups, (p.gcap // 2) * sizeof(Group))
                    if groups != NULL:
                        p.groups = groups
                        p.gcap //= 2
            elif g.cap > 8 and g.n <= g.cap // 4:
                refs = <uint64_t *>realloc(g.refs, (g.cap // 2) * sizeof(uint64_t))
                if refs != NULL:
                    g.refs = refs
                    g.cap //= 2
            return

    # -- clauses -------------------------------------------------------

    cdef uint32_t new_clause(self) except? 0xffffffff:
        cdef uint32_t c
        if self.free_clause != NO_ID:
            c = self.free_clause
            self.free_clause = self.clauses[c].slot
            self.nfree_clauses -= 1
        else:
            c = self.nclauses
            self.clauses = <Clause *>grow(self.clauses, &self.clause_cap, c + 1, sizeof(Clause))
            self.nclauses += 1
        memset(&self.clauses[c], 0, sizeof(Clause))
        return c

    cdef void drop_clause(self, uint32_t c) except *:
        cdef Clause *cl = &self.clauses[c]
        cdef uint32_t i, h, rid
        cdef PathIndex pix
        if cl.kind == ACCESS_RANGE:
            rid = clause_handles(cl)[0]
            pix = <PathIndex>self.range_owner[rid]
            range_remove(&pix.ranges.arrs[cl.range_op - OP_LT], cl.threshold, cl.entry)
            if pix.ranges.empty():
                pix.ranges = None
                self.range_owner[rid] = None
                self.free_ranges.append(rid)
                self.prune(pix)
        else:
            for i in range(cl.nhandles):
                h = clause_handles(cl)[i]
                self.posting_remove(h, cl)
                owner = <object>self.postings[h].owner
                if self.postings[h].total == 0 and owner is not None:
                    pix = <PathIndex>owner
                    del (pix.elem if self.postings[h].elem else pix.eq)[<object>self.postings[h].key]
                    self.release_posting(h)
                    self.prune(pix)
            if cl.kind == ACCESS_ALWAYS and cl.natoms:
                self.scan_clauses -= 1
        for i in range(cl.natoms):
            self.release_atom(clause_atoms(cl)[i])
        free(cl.atoms)
        free(cl.handles)
        memset(cl, 0, sizeof(Clause))
        cl.slot = self.free_clause
        self.free_clause = c
        self.nfree_clauses += 1

    cdef CollIndex coll(self, object database, object collection, bint create):
        cdef PyObject *p = PyDict_GetItem(self.colls, database)
        cdef uint32_t number
        if p == NULL:
            if not create:
                return None
            self.colls[database] = {}
            p = PyDict_GetItem(self.colls, database)
        by_coll = <dict>p
        p = PyDict_GetItem(by_coll, collection)
        if p != NULL:
            return <CollIndex>p
        if not create:
            return None
        number = self.free_colls.pop() if self.free_colls else len(self.coll_table)
        ci = CollIndex(database, collection, number, self.new_posting(None, None, False))
        if number < len(self.coll_table):
            self.coll_table[number] = ci
        else:
            self.coll_table.append(ci)
        by_coll[collection] = ci
        return ci

    cdef void drop_coll(self, CollIndex ci) except *:
        """Forget a collection whose last subscription went (its path
        indexes went with their last entries)."""
        by_coll = <dict>self.colls[ci.database]
        del by_coll[ci.collection]
        if not by_coll:
            del self.colls[ci.database]
        self.coll_table[ci.number] = None
        self.free_colls.append(ci.number)
        self.release_posting(ci.always)

    # -- subscriptions -------------------------------------------------

    def add(self, str sub_id, str database, str collection, list clauses, uint32_t owner=0):
        """Register a subscription given as clauses (lists of atoms).

        ``owner`` is reported with each of its matches by ``match_owned``.

        Atoms are ``(key, access, factory)`` tuples (``streamer.matching.compiler``).
        Per clause, the atom with the cheapest exact access becomes its index
        entry (hash keys before ranges; without any, the clause is visited on
        every event of the collection) and the others are interned and
        verified on candidates.
        """
        self.enter()
        try:
            self.add_sub(sub_id, database, collection, clauses, owner)
        finally:
            self.leave()

    cdef void add_sub(self, str sub_id, str database, str collection, list clauses,
                      uint32_t owner) except *:
        cdef uint32_t slot, cap, n = len(clauses)
        cdef object slot_number
        cdef CollIndex ci = None
        cdef list planned = [], held = []
        # One lookup both checks the id and claims it (the id dict is the
        # largest table here: each probe is a cache miss at a million ids).
        slot = self.free_slot if self.free_slot != NO_ID else self.nslots
        slot_number = slot
        if PyDict_SetDefault(self.sub_slots, sub_id, slot_number) != <PyObject *>slot_number:
            raise DuplicateSubscription(f"subscription id {sub_id!r} already exists")
        try:
            ci = self.coll(database, collection, True)
            for clause in clauses:
                planned.append(self.plan(ci, clause, held))
            if slot == self.nslots:
                cap = self.slot_cap
                self.slots = <Slot *>grow(self.slots, &self.slot_cap, slot + 1, sizeof(Slot))
                self.slot_epoch = <uint32_t *>grow(self.slot_epoch, &cap, slot + 1, sizeof(uint32_t))
        except BaseException:
            # Nothing of a refused subscription stays: atoms, paths, collection, id.
            for aid in held:
                self.release_atom(aid)
            if ci is not None and ci.nsubs == 0:
                self.drop_coll(ci)
            del self.sub_slots[sub_id]
            raise
        if slot == self.nslots:
            self.nslots += 1
        else:
            self.free_slot = self.slots[slot].clause0
        # The id is referenced from C (see new_posting for why).
        Py_INCREF(sub_id)
        self.slots[slot].id = <PyObject *>sub_id
        self.slots[slot].owner = owner
        self.slots[slot].coll = ci.number
        self.slots[slot].nclauses = 0
        self.slots[slot].clause0 = 0
        alloc_array(n, &self.slots[slot].clauses)
        self.slot_epoch[slot] = 0
        ci.nsubs += 1
        for access, atoms in planned:
            self.add_clause(ci, slot, sub_id, owner, n, access, atoms)

    cdef tuple plan(self, CollIndex ci, list clause, list held):
        """A clause's access (the compiler's, or None) and its residual
        atoms, interned; ``held`` gets each atom as it is taken, so that a
        failure can give them back."""
        cdef Py_ssize_t i, best = -1, n = len(clause)
        cdef double cost, best_cost = INFINITY
        cdef uint32_t aid
        cdef tuple atom
        if n == 1:
            # The common subscription: one atom; its access (if any) is it.
            atom = <tuple>clause[0]
            access = atom[1]
            if access is not None:
                return access, []
            aid = self.intern(atom)
            held.append(aid)
            return None, [aid]
        for i in range(n):
            access = (<tuple>clause[i])[1]
            if access is None:
                continue
            if access[0] == "range":
                cost = 1e300
            else:
                cost = self.access_cost(ci, access[1], access[2], access[0] == "elem")
            if best < 0 or cost < best_cost:
                best, best_cost = i, cost
        planned = None
        residual = {}
        for i in range(n):
            if i != best:
                residual.setdefault(clause[i][0], clause[i])
        if best >= 0:
            planned = clause[best][1]
            residual.pop(clause[best][0], None)
        atoms = []
        for atom in residual.values():
            aid = self.intern(atom)
            held.append(aid)
            atoms.append(aid)
        return planned, atoms

    cdef void add_clause(self, CollIndex ci, uint32_t slot, str sub_id, uint32_t owner,
                         uint32_t n, object access, list atoms) except *:
        cdef uint32_t c, i, h, rid
        cdef uint64_t address = <uintptr_t><PyObject *>sub_id
        # An id entry carries its owner; when either does not fit, the slot
        # entry (one more lookup per match) is used instead.
        cdef bint by_id = owner <= OWNER_IN_ENTRY_MAX and (address & ~(<uint64_t>ID_MASK)) == 0
        cdef uint64_t id_entry = address | ENTRY_ID | (<uint64_t>owner << OWNER_SHIFT)
        cdef Clause *cl
        cdef PathIndex pix
        cdef int op
        c = self.new_clause()
        slot_clauses(&self.slots[slot])[self.slots[slot].nclauses] = c
        self.slots[slot].nclauses += 1
        cl = &self.clauses[c]
        cl.slot = slot
        # Sorted, so that equal residuals compare equal as groups; the
        # clause takes over plan's reference on each atom.
        if len(atoms) > 1:
            atoms = sorted(atoms)
        cl.natoms = len(atoms)
        alloc_array(cl.natoms, &cl.atoms)
        for i in range(cl.natoms):
            clause_atoms(cl)[i] = atoms[i]
        if access is not None and access[0] == "range":
            if cl.natoms == 0 and n == 1 and by_id:
                cl.entry = id_entry
            else:
                cl.entry = (<uint64_t>c << 3) | ENTRY_CLAUSE
        elif n == 1 and (access is None or access[0] != "elem") and by_id:
            cl.entry = id_entry
        else:
            cl.entry = (<uint64_t>slot << 3) | ENTRY_SLOT
        cl.nhandles = 1
        if access is None:
            cl.kind = ACCESS_ALWAYS
            cl.handle0 = ci.always
            self.posting_add(ci.always, cl)
            if cl.natoms:
                self.scan_clauses += 1
            return
        cl.kind = ACCESS_KINDS[access[0]]
        if cl.kind == ACCESS_RANGE:
            pix = self.path_index(ci, access[1])
            op = OPS[access[2]]
            if pix.ranges is None:
                pix.ranges = RangeIndex()
                if self.free_ranges:
                    rid = self.free_ranges.pop()
                    self.range_owner[rid] = pix
                else:
                    rid = len(self.range_owner)
                    self.range_owner.append(pix)
                pix.ranges.rid = rid
            cl.range_op = op
            cl.threshold = access[3]
            cl.handle0 = pix.ranges.rid
            range_insert(&pix.ranges.arrs[op - OP_LT], cl.threshold, cl.entry)
            return
        keys = access[2]
        cl.nhandles = len(keys)
        if cl.nhandles == 0:
            # ``x in []``: never true; in no posting, and no path index for it.
            return
        pix = self.path_index(ci, access[1])
        table = pix.elem if cl.kind == ACCESS_ELEM else pix.eq
        alloc_array(cl.nhandles, &cl.handles)
        for i in range(cl.nhandles):
            hp = table.get(keys[i])
            if hp is None:
                h = self.new_posting(pix, keys[i], cl.kind == ACCESS_ELEM)
                table[keys[i]] = h
            else:
                h = hp
            self.posting_add(h, cl)
            clause_handles(cl)[i] = h

    def remove(self, str sub_id):
        """Deregister a subscription; False if the id is unknown."""
        self.enter()
        try:
            return self.remove_sub(sub_id)
        finally:
            self.leave()

    cdef bint remove_sub(self, str sub_id) except -1:
        cdef uint32_t slot, i
        cdef Slot *s
        cdef PyObject *sid
        cdef CollIndex ci
        p = self.sub_slots.pop(sub_id, None)
        if p is None:
            return False
        slot = p
        for i in range(self.slots[slot].nclauses):
            self.drop_clause(slot_clauses(&self.slots[slot])[i])
        s = &self.slots[slot]
        free(s.clauses)
        s.clauses = NULL
        s.nclauses = 0
        ci = <CollIndex>self.coll_table[s.coll]
        ci.nsubs -= 1
        if ci.nsubs == 0:
            self.drop_coll(ci)
        sid = s.id
        s.id = NULL
        s.clause0 = self.free_slot
        self.free_slot = slot
        Py_XDECREF(sid)
        return True

    # -- matching ------------------------------------------------------

    cdef int atoms_true(self, uint32_t *atoms, uint32_t natoms) except -1:
        cdef uint32_t i, aid
        cdef uint32_t epoch = self.ctx.epoch
        for i in range(natoms):
            aid = atoms[i]
            if self.atom_epoch[aid] != epoch:
                self.atom_val[aid] = (<Pred>PyList_GET_ITEM(self.atom_preds, aid)).test(self.ctx)
                self.atom_epoch[aid] = epoch
            if not self.atom_val[aid]:
                return 0
        return 1

    cdef int verify(self, uint32_t c) except -1:
        return self.atoms_true(clause_atoms(&self.clauses[c]), self.clauses[c].natoms)

    cdef int reserve_found(self, uint32_t more) except -1:
        cdef uint32_t cap = self.found_cap
        if self.nfound + more > cap:
            self.found = <PyObject **>grow(self.found, &self.found_cap, self.nfound + more, sizeof(PyObject *))
            self.found_owners = <uint32_t *>grow(self.found_owners, &cap, self.found_cap, sizeof(uint32_t))
        return 0

    cdef int push(self, PyObject *sub_id, uint32_t owner) except -1:
        self.reserve_found(1)
        self.found[self.nfound] = sub_id
        self.found_owners[self.nfound] = owner
        self.nfound += 1
        return 0

    cdef int emit(self, uint64_t ref) except -1:
        """Report the subscription behind a reference whose atoms hold."""
        cdef uint32_t slot, c
        if ref & ENTRY_ID:
            return self.push(<PyObject *><uintptr_t>(ref & <uint64_t>ID_MASK), <uint32_t>(ref >> OWNER_SHIFT))
        if ref & ENTRY_SLOT:
            slot = <uint32_t>(ref >> 3)
        else:
            c = <uint32_t>(ref >> 3)
            slot = self.clauses[c].slot
            if self.slot_epoch[slot] == self.ctx.epoch or not self.verify(c):
                return 0
        if self.slot_epoch[slot] != self.ctx.epoch:
            self.slot_epoch[slot] = self.ctx.epoch
            self.push(self.slots[slot].id, self.slots[slot].owner)
        return 0

    cdef int emit_all(self, uint64_t *refs, uint32_t start, uint32_t end) except -1:
        cdef uint32_t i
        cdef uint64_t ref
        if start >= end:
            return 0
        self.reserve_found(end - start)
        # Verification can run Python code (a regex, the GC), but nothing
        # that changes the index while it is busy, so the array stays valid
        # for the whole loop; the common entry is inlined.
        for i in range(start, end):
            ref = refs[i]
            if ref & ENTRY_ID:
                self.found[self.nfound] = <PyObject *><uintptr_t>(ref & <uint64_t>ID_MASK)
                self.found_owners[self.nfound] = <uint32_t>(ref >> OWNER_SHIFT)
                self.nfound += 1
            else:
                self.emit(ref)
        return 0

    cdef int scan_posting(self, uint32_t h) except -1:
        cdef Posting *p = &self.postings[h]
        cdef Group *g
        cdef uint32_t i
        for i in range(p.ngroups):
            g = &p.groups[i]
            if self.atoms_true(g.atoms, g.natoms):
                self.emit_all(g.refs, 0, g.n)
        return 0

    cdef int scan_bare(self, uint32_t h) except -1:
        """Emit the entries of a posting that have no atoms left to verify."""
        cdef Posting *p = &self.postings[h]
        cdef uint32_t i
        for i in range(p.ngroups):
            if p.groups[i].natoms == 0:
                self.emit_all(p.groups[i].refs, 0, p.groups[i].n)
        return 0

    cdef int scan_ranges(self, RangeIndex rix, double v) except -1:
        cdef RangeArr *a
        a = &rix.arrs[OP_GT - OP_LT]          # x > t: thresholds t < v
        self.emit_all(a.entries, 0, lower_bound(a, v))
        a = &rix.arrs[OP_GE - OP_LT]          # x >= t: t <= v
        self.emit_all(a.entries, 0, upper_bound(a, v))
        a = &rix.arrs[OP_LT - OP_LT]          # x < t: t > v
        self.emit_all(a.entries, upper_bound(a, v), a.n)
        a = &rix.arrs[OP_LE - OP_LT]          # x <= t: t >= v
        self.emit_all(a.entries, lower_bound(a, v), a.n)
        return 0

    cdef void next_epoch(self):
        cdef Ctx ctx = self.ctx
        ctx.epoch += 1
        if ctx.epoch == 0:
            # After 2**32 events the stamps could collide: start over.
            memset(self.slot_epoch, 0, self.slot_cap * sizeof(uint32_t))
            memset(self.atom_epoch, 0, self.atom_cap * sizeof(uint32_t))
            memset(ctx.path_epoch, 0, ctx.npaths * sizeof(uint32_t))
            ctx.epoch = 1

    cdef int search(self, CollIndex ci, object document_id, object document) except -1:
        """Fill ``found``/``found_owners`` with the matches of one document."""
        cdef PathIndex pix
        cdef PyObject *hp
        cdef Ctx ctx = self.ctx
        cdef double d
        self.next_epoch()
        self.nfound = 0
        ctx.doc = document
        ctx.doc_id = document_id
        ctx.view = None
        try:
            self.scan_posting(ci.always)
            for p in ci.paths:
                pix = <PathIndex>p
                v = ctx.path_value(pix.pid)
                if v is MISS:
                    continue
                if pix.eq:
                    key = index_key(v)
                    if key is not NK:
                        hp = PyDict_GetItem(pix.eq, key)
                        if hp != NULL:
                            self.scan_posting(<uint32_t><object>hp)
                if pix.elem:
                    if PyList_Check(v):
                        for e in <list>v:
                            key = index_key(e)
                            if key is not NK:
                                hp = PyDict_GetItem(pix.elem, key)
                                if hp != NULL:
                                    self.scan_posting(<uint32_t><object>hp)
                    elif PyDict_Check(v):
                        for k in <dict>v:
                            if PyUnicode_Check(k):
                                hp = PyDict_GetItem(pix.elem, k)
                                if hp != NULL:
                                    self.scan_posting(<uint32_t><object>hp)
                if pix.ranges is not None:
                    if PyFloat_Check(v):
                        d = PyFloat_AS_DOUBLE(v)
                        if not isnan(d):
                            self.scan_ranges(pix.ranges, d)
                    elif is_int(v):
                        self.scan_ranges(pix.ranges, int_to_double(v))
        finally:
            ctx.doc = None
            ctx.doc_id = None
            ctx.view = None
        return 0

    cdef int search_id(self, CollIndex ci, object document_id) except -1:
        """``search`` for a change without a document: only the clauses that
        hold on the document id alone, i.e. a document-id test or nothing."""
        cdef PyObject *hp
        self.next_epoch()
        self.nfound = 0
        self.scan_bare(ci.always)
        pid = self.path_ids.get(("_id",))
        pix = ci.by_pid.get(pid) if pid is not None else None
        if pix is not None and (<PathIndex>pix).eq and document_id is not None:
            key = index_key(document_id)
            if key is not NK:
                hp = PyDict_GetItem((<PathIndex>pix).eq, key)
                if hp != NULL:
                    self.scan_bare(<uint32_t><object>hp)
        return 0

    cdef list found_ids(self):
        # Touch each id string once, in a tight loop where the processor can
        # overlap the cache misses, prefetching a few ahead.
        cdef uint32_t i, n = self.nfound
        out = PyList_New(n)
        for i in range(n):
            if i + PREFETCH < n:
                prefetch(self.found[i + PREFETCH])
            incref(self.found[i])
            list_set_item(<PyObject *>out, i, self.found[i])
        return out

    cdef bytes found_owner_bytes(self):
        return PyBytes_FromStringAndSize(<char *>self.found_owners, self.nfound * sizeof(uint32_t))

    def watches(self, database, collection):
        """Whether any subscription is on this database's collection (its
        events need decoding and matching at all)."""
        return self.coll(database, collection, False) is not None

    def match(self, database, collection, document_id, document):
        """Ids of the subscriptions matching one document, each once."""
        cdef CollIndex ci
        self.enter()
        try:
            ci = self.coll(database, collection, False)
            if ci is None:
                return []
            self.search(ci, document_id, document)
            return self.found_ids()
        finally:
            self.leave()

    def match_id_owned(self, database, collection, document_id):
        """``match_owned`` for a change without a document (a hard delete
        without pre-image): the clauses that hold on the document id alone,
        i.e. a document-id test or nothing at all (whole collection)."""
        cdef CollIndex ci
        self.enter()
        try:
            ci = self.coll(database, collection, False)
            if ci is None:
                return [], b""
            self.search_id(ci, document_id)
            return self.found_ids(), self.found_owner_bytes()
        finally:
            self.leave()

    def match_owned(self, database, collection, document_id, document):
        """``(ids, owners)``: ``match``'s ids and, as native ``uint32``
        values in a bytes object, the ``owner`` each was added with."""
        cdef CollIndex ci
        self.enter()
        try:
            ci = self.coll(database, collection, False)
            if ci is None:
                return [], b""
            self.search(ci, document_id, document)
            return self.found_ids(), self.found_owner_bytes()
        finally:
            self.leave()
