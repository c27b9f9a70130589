# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled CEL parser: a fast drop-in for ``streamer.matching.cel.parse`` (+ ``check``).

Why it exists: registering a subscription parses and checks its CEL
expression, and the pure-Python front end (a regex tokenizer and a Pratt
parser) is far too slow for tens of thousands of registrations a second.
This module owns only that speed: a tokenizer over the code points of the
source (no regexes) and a transliteration of the Python parser, in C.

``streamer.matching.cel`` stays the reference and the contract.  :func:`parse` here
returns the same AST (instances of the ``streamer.matching.cel`` node classes, with the
same ``pos`` values) and raises ``CelSyntaxError`` with the same message as
``cel.parse`` for every input; with ``check=True`` it also raises what
``cel.check`` would, in the same order.  tests/test_celparse.py checks that
differentially.  A change to the reference's grammar, limits or messages must
be mirrored here.

How it stays exact but cheap:

* Lexical errors end the token stream: the reference parser never looks past
  the first erroneous token, it only reports it when it reaches it.
* Depth and node count are tracked while the tree is built (every parse
  function leaves the height of the node it returns in ``_Parser.h``).  Only
  when a limit is exceeded does ``streamer.matching.cel.parser.check_size`` walk the tree, to name
  the same node as the reference does.
* ``check=True`` validates each identifier and call as it is built.  Only if
  one fails does ``cel.check`` walk the tree, to report the first problem in
  its order (pre-order) with its message.
* Nesting beyond ``_HARD_DEPTH`` levels is refused whatever ``max_depth``
  says, so the C stack is bounded.  The reference's equivalent is Python's
  recursion limit (it then raises the message without a column, as here).

Known differences, both only with limits raised above the defaults: with
``max_depth`` above ~150, *where* the reference meets its recursion limit
depends on the caller's stack, so the nesting error may come with a column
here and without one there; and with ``max_length`` above 4300 the reference
raises ``ValueError`` for a decimal literal of more than 4300 digits (Python's
int() limit) anywhere in the source, where this parser reports the literal
as out of the int64 range if it gets to it.
"""

cimport cython
from cpython.float cimport PyFloat_FromDouble
from cpython.long cimport PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport (
    PyUnicode_1BYTE_KIND,
    PyUnicode_4BYTE_KIND,
    PyUnicode_DATA,
    PyUnicode_FromKindAndData,
    PyUnicode_FromObject,
    PyUnicode_KIND,
    PyUnicode_READ,
    PyUnicode_Substring,
)
from libc.stdint cimport INT64_MIN, int64_t, uint64_t

cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0

from streamer.matching import cel
from streamer.matching.cel import checker as cel_checker
from streamer.matching.cel import parser as cel_parser
from streamer.matching.cel import CelSyntaxError

# --------------------------------------------------------------------------
# Tokens

cdef enum:
    T_EOF, T_ERR, T_ID, T_IN, T_TRUE, T_FALSE, T_NULL, T_INT, T_BIGINT, T_NUM, T_STR, T_QID,
    T_OR, T_AND, T_EQ, T_NE, T_LT, T_LE, T_GT, T_GE, T_PLUS, T_MINUS, T_STAR, T_SLASH, T_PCT,
    T_BANG, T_QUEST, T_COLON, T_DOT, T_COMMA, T_LPAREN, T_RPAREN, T_LBRACK, T_RBRACK,
    T_LBRACE, T_RBRACE, T_NKINDS

ctypedef struct Tok:
    int kind
    Py_ssize_t start    # the token's span in the source (for messages)
    Py_ssize_t end
    Py_ssize_t a        # T_STR without escapes / T_QID: the value's span
    Py_ssize_t b
    int64_t ival        # T_INT: the value; T_BIGINT: 1 if it is exactly 2**63
    double dval         # T_NUM
    PyObject *val       # T_STR with escapes: the value (owned by _Parser.vals)

# Binary operators: precedence (0: not one) and CEL function name, by kind.
cdef int _PREC[<int>T_NKINDS]  # static: zero-initialized
_PREC[<int>T_OR] = 1
_PREC[<int>T_AND] = 2
for _k in (T_EQ, T_NE, T_LT, T_LE, T_GT, T_GE, T_IN):
    _PREC[<int>_k] = 3
_PREC[<int>T_PLUS] = 4
_PREC[<int>T_MINUS] = 4
for _k in (T_STAR, T_SLASH, T_PCT):
    _PREC[<int>_k] = 5

cdef list _OPNAME = [None] * <int>T_NKINDS
for _k, _name in (
    (T_OR, "_||_"), (T_AND, "_&&_"), (T_EQ, "_==_"), (T_NE, "_!=_"), (T_LT, "_<_"),
    (T_LE, "_<=_"), (T_GT, "_>_"), (T_GE, "_>=_"), (T_IN, "@in"), (T_PLUS, "_+_"),
    (T_MINUS, "_-_"), (T_STAR, "_*_"), (T_SLASH, "_/_"), (T_PCT, "_%_"),
):
    _OPNAME[<int>_k] = _name

# Above this nesting the parser refuses the expression whatever max_depth is:
# each level costs up to ~0.7 KB of C stack (-O2), and a thread's stack can be
# small.  (The reference meets Python's recursion limit at a similar depth.)
cdef enum:
    _HARD_DEPTH = 250

# The reference's tables are the definition: use them, not copies.
cdef frozenset _RESERVED = frozenset(cel_parser.RESERVED)
cdef frozenset _UNSUPPORTED_MACROS = frozenset(cel_parser.UNSUPPORTED_MACROS)
cdef object _compile_regex = cel_checker.compile_regex
cdef object _check_size = cel_parser.check_size
cdef object _check = cel.check

cdef object _Literal = cel.Literal
cdef object _Ident = cel.Ident
cdef object _Select = cel.Select
cdef object _Index = cel.Index
cdef object _Call = cel.Call
cdef object _ListExpr = cel.ListExpr
cdef object _MapExpr = cel.MapExpr


cdef inline bint _is_digit(int c) noexcept:
    return 48 <= c <= 57


cdef inline bint _is_hex(int c) noexcept:
    return 48 <= c <= 57 or 97 <= c <= 102 or 65 <= c <= 70


cdef inline int _hex_value(int c) noexcept:
    if c <= 57:
        return c - 48
    return (c | 32) - 87


cdef inline bint _is_ident_start(int c) noexcept:
    return c == 95 or 97 <= c <= 122 or 65 <= c <= 90


cdef inline bint _is_ident_char(int c) noexcept:
    return c == 95 or 97 <= c <= 122 or 65 <= c <= 90 or 48 <= c <= 57


cdef inline bint _is_quote(int c) noexcept:
    return c == 39 or c == 34  # ' "


cdef inline bint _is_r(int c) noexcept:
    return c == 114 or c == 82


cdef inline bint _is_b(int c) noexcept:
    return c == 98 or c == 66


cdef inline bint _is_field_char(int c) noexcept:
    # [A-Za-z0-9_.\-/ ] of the reference's _QUOTED_FIELD_RE
    return _is_ident_char(c) or c == 46 or c == 45 or c == 47 or c == 32


cdef inline Py_ssize_t _max(Py_ssize_t a, Py_ssize_t b) noexcept:
    return a if a > b else b


cdef str _col(Py_ssize_t pos):
    return f"column {pos + 1}"


cdef str _quote(str text):
    return f"'{text}'" if text.isprintable() else repr(text)


cdef Py_ssize_t _limit(object v) except? -2:
    """A limit as a C integer; huge values are clamped (same comparisons)."""
    try:
        return v
    except OverflowError:
        return (<Py_ssize_t>1) << 60 if v > 0 else -1


# --------------------------------------------------------------------------
# Parser


@cython.final
@cython.no_gc
@cython.freelist(4)
cdef class _Parser:
    cdef str src
    cdef int ukind
    cdef void *data
    cdef Py_ssize_t n
    cdef Tok *toks
    cdef Py_ssize_t ntoks
    cdef Py_ssize_t cap
    cdef list vals          # owns the T_STR values that Tok.val points to
    cdef str err            # message of the T_ERR token
    cdef Py_ssize_t i       # current token
    cdef Py_ssize_t max_depth
    cdef object max_depth_obj
    cdef Py_ssize_t nodes   # nodes in the tree built so far
    cdef Py_ssize_t h       # height of the node the last parse function returned
    cdef bint checking
    cdef bint flagged       # checking: some node fails cel.check

    def __dealloc__(self):
        PyMem_Free(self.toks)

    cdef inline int ch(self, Py_ssize_t i) noexcept:
        """The code point at ``i``, -1 past the end."""
        if i >= self.n:
            return -1
        return <int>PyUnicode_READ(self.ukind, self.data, i)

    # -- tokenizer

    cdef Tok *push(self, int kind, Py_ssize_t start, Py_ssize_t end) except NULL:
        cdef Tok *t
        if self.ntoks == self.cap:
            self.cap = self.cap * 2 if self.cap else 16
            t = <Tok *>PyMem_Realloc(self.toks, self.cap * sizeof(Tok))
            if t == NULL:
                raise MemoryError()
            self.toks = t
        t = &self.toks[self.ntoks]
        self.ntoks += 1
        t.kind = kind
        t.start = start
        t.end = end
        t.val = NULL
        return t

    cdef int error_token(self, Py_ssize_t start, str message) except -1:
        self.push(T_ERR, start, start)
        self.err = message
        return 0

    cdef int tokenize(self) except -1:
        """Fill ``toks``; stop after the first lexical error (an T_ERR token).

        Mirrors ``streamer.matching.cel.parser._TOKEN_RE``: the alternatives are tried in its order.
        """
        cdef Py_ssize_t n = self.n, p = 0, q, e, k
        cdef int c, c2
        cdef Tok *t
        while True:
            c = self.ch(p)
            while c == 32 or c == 9 or c == 10 or c == 13 or c == 12:
                p += 1
                c = self.ch(p)
            if c < 0:
                break
            if _is_ident_start(c):
                q = p + 1
                while _is_ident_char(self.ch(q)):
                    q += 1
                e = self.prefixed_string_end(p, q) if _is_quote(self.ch(q)) else -1
                if e < 0:
                    self.push_word(p, q)
                    p = q
                    continue
                if not self.string_token(p, e):
                    break
                p = e
            elif _is_digit(c):
                if not self.number(p):
                    break
                p = self.toks[self.ntoks - 1].end
            elif c == 46:  # .
                if _is_digit(self.ch(p + 1)):
                    e = self.exponent(self.digits(p + 1))
                    self.push_double(p, e)
                    p = e
                else:
                    self.push(T_DOT, p, p + 1)
                    p += 1
            elif _is_quote(c):
                e = self.string_end(p)
                if e < 0:
                    e = p + self.quote_len(p)
                if not self.string_token(p, e):
                    break
                p = e
            elif c == 47 and self.ch(p + 1) == 47:  # // comment
                k = p + 2
                c2 = self.ch(k)
                while c2 >= 0 and c2 != 10:
                    k += 1
                    c2 = self.ch(k)
                p = k
            elif c == 96:  # `
                k = p + 1
                c2 = self.ch(k)
                while c2 >= 0 and c2 != 96 and c2 != 10 and c2 != 13:
                    k += 1
                    c2 = self.ch(k)
                if c2 != 96:
                    self.error_token(p, f"unterminated quoted field name at {_col(p)}")
                    break
                if not self.quoted_field_ok(p + 1, k):
                    self.error_token(
                        p, f"invalid quoted field name {self.src[p:k + 1]!r} at {_col(p)}"
                    )
                    break
                t = self.push(T_QID, p, k + 1)
                t.a = p + 1
                t.b = k
                p = k + 1
            else:
                c2 = self.ch(p + 1)
                k = self.operator(c, c2)
                if k < 0:
                    self.error_token(p, f"unexpected character {self.src[p]!r} at {_col(p)}")
                    break
                if k == T_EQ or k == T_NE or k == T_LE or k == T_GE or k == T_AND or k == T_OR:
                    self.push(k, p, p + 2)
                    p += 2
                else:
                    self.push(k, p, p + 1)
                    p += 1
        # End of input (or the error): two EOF tokens, so lookahead never overruns.
        self.push(T_EOF, n, n)
        self.push(T_EOF, n, n)
        return 0

    cdef inline int operator(self, int c, int c2) noexcept:
        """The kind of the operator starting with ``c`` (then ``c2``), or -1."""
        if c == 61:  # =
            return T_EQ if c2 == 61 else -1
        if c == 33:  # !
            return T_NE if c2 == 61 else T_BANG
        if c == 60:  # <
            return T_LE if c2 == 61 else T_LT
        if c == 62:  # >
            return T_GE if c2 == 61 else T_GT
        if c == 38:  # &
            return T_AND if c2 == 38 else -1
        if c == 124:  # |
            return T_OR if c2 == 124 else -1
        if c == 45:
            return T_MINUS
        if c == 43:
            return T_PLUS
        if c == 42:
            return T_STAR
        if c == 47:
            return T_SLASH
        if c == 37:
            return T_PCT
        if c == 63:
            return T_QUEST
        if c == 58:
            return T_COLON
        if c == 44:
            return T_COMMA
        if c == 40:
            return T_LPAREN
        if c == 41:
            return T_RPAREN
        if c == 91:
            return T_LBRACK
        if c == 93:
            return T_RBRACK
        if c == 123:
            return T_LBRACE
        if c == 125:
            return T_RBRACE
        return -1

    cdef int push_word(self, Py_ssize_t p, Py_ssize_t q) except -1:
        """An identifier or keyword at [p, q)."""
        cdef int kind = T_ID
        cdef Py_ssize_t n = q - p
        cdef int c = self.ch(p)
        if n == 2:
            if c == 105 and self.ch(p + 1) == 110:  # in
                kind = T_IN
        elif n == 4:
            if (c == 116 and self.ch(p + 1) == 114 and self.ch(p + 2) == 117
                    and self.ch(p + 3) == 101):  # true
                kind = T_TRUE
            elif (c == 110 and self.ch(p + 1) == 117 and self.ch(p + 2) == 108
                    and self.ch(p + 3) == 108):  # null
                kind = T_NULL
        elif n == 5:
            if (c == 102 and self.ch(p + 1) == 97 and self.ch(p + 2) == 108
                    and self.ch(p + 3) == 115 and self.ch(p + 4) == 101):  # false
                kind = T_FALSE
        self.push(kind, p, q)
        return 0

    cdef inline Py_ssize_t digits(self, Py_ssize_t k) noexcept:
        while _is_digit(self.ch(k)):
            k += 1
        return k

    cdef inline Py_ssize_t exponent(self, Py_ssize_t k) noexcept:
        """End of an optional ``[eE][+-]?[0-9]+`` at ``k``."""
        cdef int c = self.ch(k)
        cdef Py_ssize_t f
        if c == 101 or c == 69:
            f = k + 1
            c = self.ch(f)
            if c == 43 or c == 45:
                f += 1
            if _is_digit(self.ch(f)):
                return self.digits(f)
        return k

    cdef int push_double(self, Py_ssize_t p, Py_ssize_t e) except -1:
        cdef char buf[64]
        cdef Py_ssize_t k
        cdef Tok *t = self.push(T_NUM, p, e)
        if e - p < 64:
            for k in range(p, e):
                buf[k - p] = <char>self.ch(k)
            buf[e - p] = 0
            t.dval = PyOS_string_to_double(buf, NULL, NULL)
        else:
            t.dval = float(self.src[p:e])
        return 0

    cdef int number(self, Py_ssize_t p) except -1:
        """A number token at ``p`` (a digit); 0 if it is an error token."""
        cdef Py_ssize_t d = self.digits(p), e, k, start
        cdef int c = self.ch(d)
        cdef uint64_t v = 0, limit
        cdef bint overflow = False
        cdef int base, digit
        cdef Tok *t
        if c == 46 and _is_digit(self.ch(d + 1)):  # 1.5, 1.5e3
            self.push_double(p, self.exponent(self.digits(d + 1)))
            return 1
        if c == 101 or c == 69:  # 1e3
            e = self.exponent(d)
            if e != d:
                self.push_double(p, e)
                return 1
        if self.ch(p) == 48 and (self.ch(p + 1) | 32) == 120 and _is_hex(self.ch(p + 2)):
            base = 16
            p += 2
            e = p
            while _is_hex(self.ch(e)):
                e += 1
        else:
            base = 10
            e = d
        start = p - 2 if base == 16 else p
        if (self.ch(e) | 32) == 117:  # u
            self.error_token(start, f"unsigned integer literals are not supported at {_col(start)}")
            return 0
        limit = (<uint64_t>0xFFFFFFFFFFFFFFFF) // <uint64_t>base
        for k in range(p, e):
            digit = _hex_value(self.ch(k))
            if v > limit or v * base > (<uint64_t>0xFFFFFFFFFFFFFFFF) - digit:
                overflow = True
                break
            v = v * base + digit
        if not overflow and v <= <uint64_t>0x7FFFFFFFFFFFFFFF:
            t = self.push(T_INT, start, e)
            t.ival = <int64_t>v
        else:
            t = self.push(T_BIGINT, start, e)
            t.ival = not overflow and v == (<uint64_t>1) << 63
        return 1

    cdef inline Py_ssize_t quote_len(self, Py_ssize_t b) noexcept:
        """3 if a triple quote starts at ``b``, else 1."""
        cdef int q = self.ch(b)
        return 3 if self.ch(b + 1) == q and self.ch(b + 2) == q else 1

    cdef Py_ssize_t raw_string_end(self, Py_ssize_t b) noexcept:
        """End of a raw string body starting at the quote at ``b``, or -1."""
        cdef int q = self.ch(b), c
        cdef Py_ssize_t k
        if self.ch(b + 1) == q and self.ch(b + 2) == q:
            k = b + 3
            while k + 2 < self.n:
                if self.ch(k) == q and self.ch(k + 1) == q and self.ch(k + 2) == q:
                    return k + 3
                k += 1
            return -1
        k = b + 1
        while True:
            c = self.ch(k)
            if c == q:
                return k + 1
            if c < 0 or c == 10 or c == 13:
                return -1
            k += 1

    cdef Py_ssize_t string_end(self, Py_ssize_t b) noexcept:
        """End of a (non-raw) string body starting at the quote at ``b``, or -1."""
        cdef int q = self.ch(b), c
        cdef Py_ssize_t k
        if self.ch(b + 1) == q and self.ch(b + 2) == q:
            k = b + 3
            while True:
                c = self.ch(k)
                if c < 0:
                    return -1
                if c == 92:  # backslash: escapes any character
                    if k + 1 >= self.n:
                        return -1
                    k += 2
                elif c == q and self.ch(k + 1) == q and self.ch(k + 2) == q:
                    return k + 3
                else:
                    k += 1
        k = b + 1
        while True:
            c = self.ch(k)
            if c == q:
                return k + 1
            if c < 0 or c == 10 or c == 13:
                return -1
            if c == 92:
                if k + 1 >= self.n:
                    return -1
                k += 2
            else:
                k += 1

    cdef Py_ssize_t prefixed_string_end(self, Py_ssize_t p, Py_ssize_t q) noexcept:
        """A word [p, q) is followed by a quote: the end of the string token it
        starts (raw, bytes, or unterminated), or -1 if the word is an identifier."""
        cdef Py_ssize_t n = q - p, e
        cdef int c0 = self.ch(p), c1 = self.ch(p + 1)
        if (n == 1 and _is_r(c0)) or (
            n == 2 and ((_is_r(c0) and _is_b(c1)) or (_is_b(c0) and _is_r(c1)))
        ):
            e = self.raw_string_end(q)
            if e >= 0:
                return e
        if n == 1 and _is_b(c0):
            e = self.string_end(q)
            if e >= 0:
                return e
        if (n == 1 and (_is_r(c0) or _is_b(c0))) or (
            n == 2 and (_is_r(c0) or _is_b(c0)) and (_is_r(c1) or _is_b(c1))
        ):
            return q + self.quote_len(q)
        return -1

    cdef bint quoted_field_ok(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        cdef Py_ssize_t k
        if a == b:
            return False
        for k in range(a, b):
            if not _is_field_char(self.ch(k)):
                return False
        return True

    cdef int string_token(self, Py_ssize_t a, Py_ssize_t e) except -1:
        """The string-like token [a, e), as the reference's ``_string_token``.

        Pushes a T_STR token (1) or an error token (0).
        """
        cdef Py_ssize_t qi = a, q, k, body, body_end
        cdef int quote
        cdef Tok *t
        while not _is_quote(self.ch(qi)):
            qi += 1
        quote = self.ch(qi)
        q = 3 if e - qi >= 3 and self.ch(qi + 1) == quote and self.ch(qi + 2) == quote else 1
        if e - qi < 2 * q:
            self.error_token(a, f"unterminated string at {_col(a)}")
            return 0
        for k in range(e - q, e):
            if self.ch(k) != quote:
                self.error_token(a, f"unterminated string at {_col(a)}")
                return 0
        for k in range(a, qi):
            if _is_b(self.ch(k)):
                self.error_token(a, f"bytes literals are not supported at {_col(a)}")
                return 0
        body = qi + q
        body_end = e - q
        if qi == a:  # no prefix (a prefix means raw): process the escapes
            for k in range(body, body_end):
                if self.ch(k) == 92:
                    value = self.unescape(a, body, body_end)
                    if value is None:
                        return 0
                    self.vals.append(value)
                    t = self.push(T_STR, a, e)
                    t.val = <PyObject *>value
                    return 1
        t = self.push(T_STR, a, e)
        t.a = body
        t.b = body_end
        return 1

    cdef object unescape(self, Py_ssize_t start, Py_ssize_t a, Py_ssize_t b):
        """The value of the body [a, b) (with escapes) of the string token at
        ``start``, or None after pushing the error token (``streamer.matching.cel.parser._unescape``)."""
        cdef Py_UCS4 *buf = <Py_UCS4 *>PyMem_Malloc((b - a) * sizeof(Py_UCS4))
        cdef Py_ssize_t k = a, m = 0, j, width
        cdef int c, d
        cdef uint64_t cp
        if buf == NULL:
            raise MemoryError()
        try:
            while k < b:
                c = self.ch(k)
                if c != 92:
                    buf[m] = c
                    m += 1
                    k += 1
                    continue
                d = self.ch(k + 1) if k + 1 < b else -1
                cp = 0
                width = 0
                if d == 97:
                    cp = 7
                elif d == 98:
                    cp = 8
                elif d == 102:
                    cp = 12
                elif d == 110:
                    cp = 10
                elif d == 114:
                    cp = 13
                elif d == 116:
                    cp = 9
                elif d == 118:
                    cp = 11
                elif d == 92 or d == 63 or d == 34 or d == 39 or d == 96:  # \ ? " ' `
                    cp = d
                elif 48 <= d <= 51:  # [0-3][0-7][0-7]
                    if (k + 3 < b and 48 <= self.ch(k + 2) <= 55 and 48 <= self.ch(k + 3) <= 55):
                        cp = (d - 48) * 64 + (self.ch(k + 2) - 48) * 8 + self.ch(k + 3) - 48
                        width = 4
                    else:
                        width = -1
                else:
                    if d == 120 or d == 88:  # x X
                        width = 4
                    elif d == 117:  # u
                        width = 6
                    elif d == 85:  # U
                        width = 10
                    else:
                        width = -1
                    if width > 0:
                        if k + width > b:
                            width = -1
                        else:
                            for j in range(k + 2, k + width):
                                c = self.ch(j)
                                if not _is_hex(c):
                                    width = -1
                                    break
                                cp = cp * 16 + _hex_value(c)
                if width < 0:
                    self.error_token(
                        start, f"invalid escape sequence {_quote(self.src[k:min(k + 2, b)])}"
                        f" at {_col(k)}"
                    )
                    return None
                if width == 0:
                    width = 2
                elif cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                    self.error_token(
                        start, f"invalid escape sequence {_quote(self.src[k:k + width])}"
                        f" (not a Unicode code point) at {_col(k)}"
                    )
                    return None
                buf[m] = <Py_UCS4>cp
                m += 1
                k += width
            return PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, m)
        finally:
            PyMem_Free(buf)

    # -- values of tokens

    cdef str name(self, Tok *t):
        if t.end - t.start == 3 and self.ch(t.start) == 100 and self.ch(t.start + 1) == 111 \
                and self.ch(t.start + 2) == 99:
            return "doc"
        return PyUnicode_Substring(self.src, t.start, t.end)

    cdef object literal(self, Tok *t, bint negate):
        """The Literal of the literal token ``t`` (``-`` applied if ``negate``)."""
        cdef int kind = t.kind
        cdef object value
        if kind == T_STR:
            if t.val != NULL:
                value = <object>t.val
            else:
                value = PyUnicode_Substring(self.src, t.a, t.b)
        elif kind == T_INT:
            value = PyLong_FromLongLong(-t.ival if negate else t.ival)
        elif kind == T_NUM:
            value = PyFloat_FromDouble(-t.dval if negate else t.dval)
        elif kind == T_BIGINT:  # only -2**63 gets here
            value = PyLong_FromLongLong(INT64_MIN)
        elif kind == T_TRUE:
            value = True
        elif kind == T_FALSE:
            value = False
        else:
            value = None
        self.nodes += 1
        self.h = 1
        return _Literal(value, (t - 1).start if negate else t.start)

    # -- errors

    cdef object error_here(self):
        cdef Tok *t = &self.toks[self.i]
        if t.kind == T_ERR:
            return CelSyntaxError(self.err)
        if t.kind == T_EOF:
            return CelSyntaxError(f"unexpected end of expression at {_col(t.start)}")
        text = self.src[t.start:t.end]
        if len(text) > 24:
            text = text[:21] + "..."
        return CelSyntaxError(f"unexpected {text!r} at {_col(t.start)}")

    cdef int expect(self, int kind) except -1:
        if self.toks[self.i].kind != kind:
            raise self.error_here()
        self.i += 1
        return 0

    cdef int check_depth(self, Py_ssize_t depth) except -1:
        if depth > self.max_depth:
            raise CelSyntaxError(
                f"expression nests deeper than {self.max_depth_obj} levels"
                f" at {_col(self.toks[self.i].start)}"
            )
        if depth > _HARD_DEPTH:
            raise CelSyntaxError(f"expression nests deeper than {self.max_depth_obj} levels")
        return 0

    # -- grammar (the reference's _Parser, function by function)

    cdef object expr(self, Py_ssize_t depth):
        """expr := or ('?' or ':' expr)?"""
        cdef Py_ssize_t pos, h
        cond = self.binary_rest(self.operand(depth), self.h, 1, depth)
        if self.toks[self.i].kind != T_QUEST:
            return cond
        h = self.h
        pos = self.toks[self.i].start
        self.i += 1
        then = self.binary_rest(self.operand(depth + 1), self.h, 1, depth + 1)
        h = _max(h, self.h)
        self.expect(T_COLON)
        other = self.expr(depth + 1)
        self.h = 1 + _max(h, self.h)
        self.nodes += 1
        return _Call("_?_:_", None, (cond, then, other), pos)

    cdef object binary_rest(self, object left, Py_ssize_t hl, int min_prec, Py_ssize_t depth):
        """Continue a binary expression whose first operand is ``left`` (height ``hl``)."""
        cdef Tok *toks = self.toks
        cdef int kind, prec, follow
        cdef Py_ssize_t pos, hr
        while True:
            kind = toks[self.i].kind
            prec = _PREC[kind]
            if prec == 0 or prec < min_prec:
                self.h = hl
                return left
            pos = toks[self.i].start
            self.i += 1
            right = self.operand(depth + 1)
            hr = self.h
            follow = _PREC[toks[self.i].kind]
            if follow != 0 and follow > prec:
                right = self.binary_rest(right, hr, prec + 1, depth + 1)
                hr = self.h
            left = _Call(_OPNAME[kind], None, (left, right), pos)
            hl = 1 + _max(hl, hr)
            self.nodes += 1

    cdef object operand(self, Py_ssize_t depth):
        """unary := member | '!'+ member | '-'+ member;  member := primary postfix*"""
        cdef Tok *toks = self.toks
        cdef Py_ssize_t i = self.i, j, count, h
        cdef int kind = toks[i].kind, next_kind
        self.check_depth(depth)
        if kind == T_ID and toks[i + 1].kind != T_LPAREN:
            node = self.ident(&toks[i])
            self.i = i + 1
        elif kind == T_STR or kind == T_INT or kind == T_NUM or T_TRUE <= kind <= T_NULL:
            node = self.literal(&toks[i], False)
            self.i = i + 1
        elif kind == T_BANG or kind == T_MINUS:
            j = i + 1
            while toks[j].kind == kind:
                j += 1
            count = j - i
            next_kind = toks[j].kind
            if count == 1 and kind == T_MINUS and (
                next_kind == T_INT or next_kind == T_BIGINT or next_kind == T_NUM
            ):
                node = self.primary(depth)  # a negative number literal
            else:
                self.i = j
                node = self.operand_after_unary(depth + 1)
                if count % 2 == 0:
                    return node
                self.h += 1
                self.nodes += 1
                return _Call("!_" if kind == T_BANG else "-_", None, (node,), toks[i].start)
        else:
            node = self.primary(depth)
        kind = toks[self.i].kind
        if kind == T_DOT or kind == T_LBRACK:
            return self.postfix(node, self.h, depth)
        return node

    cdef object operand_after_unary(self, Py_ssize_t depth):
        """The member after a run of '!' or '-' (which may not start another run)."""
        self.check_depth(depth)
        node = self.primary(depth)
        cdef int kind = self.toks[self.i].kind
        if kind == T_DOT or kind == T_LBRACK:
            return self.postfix(node, self.h, depth)
        return node

    cdef object ident(self, Tok *t):
        name = self.name(t)
        if name in _RESERVED:
            raise CelSyntaxError(
                f"reserved word {name!r} cannot be used as an identifier at {_col(t.start)}"
            )
        if self.checking and name != "doc":
            self.flagged = True
        self.nodes += 1
        self.h = 1
        return _Ident(name, t.start)

    cdef object call(self, str function, object target, Py_ssize_t h, Py_ssize_t pos,
                     Py_ssize_t depth):
        """``function(args)`` (the current token is the '('), on ``target`` (height ``h``)."""
        args = self.args(depth + 1)
        self.h = 1 + _max(h, self.h)
        self.nodes += 1
        if self.checking:
            self.check_call(function, target is not None, args)
        return _Call(function, target, args, pos)

    cdef int check_call(self, str fn, bint has_target, tuple args) except -1:
        """Flag what ``streamer.matching.cel.checker.call_shape_ok`` or the ``matches`` pattern check rejects."""
        cdef Py_ssize_t nargs = len(args)
        cdef bint ok
        if fn == "size":
            ok = nargs == (0 if has_target else 1)
        elif fn == "contains" or fn == "startsWith" or fn == "endsWith":
            ok = has_target and nargs == 1
        elif fn == "matches":
            ok = nargs == (1 if has_target else 2)
            if ok:
                pattern = args[0] if has_target else args[1]
                if type(pattern) is _Literal and isinstance(pattern.value, str):
                    ok = _compile_regex(pattern.value)[1] is None
        else:
            ok = False  # parsed calls are never operators
        if not ok:
            self.flagged = True
        return 0

    cdef object postfix(self, object node, Py_ssize_t h, Py_ssize_t depth):
        """member := member '.' field | member '.' name '(' args ')' | member '[' expr ']'"""
        cdef Tok *toks = self.toks
        cdef Tok *t
        cdef int kind
        cdef Py_ssize_t dot, pos
        while True:
            kind = toks[self.i].kind
            if kind == T_DOT:
                dot = toks[self.i].start
                self.i += 1
                t = &toks[self.i]
                if t.kind == T_ID:
                    name = self.name(t)
                    self.i += 1
                    if toks[self.i].kind == T_LPAREN:
                        if name in _UNSUPPORTED_MACROS:
                            raise CelSyntaxError(
                                f"macro {name!r} is not supported at {_col(t.start)}"
                            )
                        node = self.call(name, node, h, t.start, depth)
                        h = self.h
                    else:
                        node = _Select(node, name, False, dot)
                        h += 1
                        self.nodes += 1
                elif t.kind == T_QID:
                    self.i += 1
                    node = _Select(node, PyUnicode_Substring(self.src, t.a, t.b), False, dot)
                    h += 1
                    self.nodes += 1
                else:
                    raise self.error_here()
            elif kind == T_LBRACK:
                pos = toks[self.i].start
                self.i += 1
                index = self.expr(depth + 1)
                self.expect(T_RBRACK)
                node = _Index(node, index, pos)
                h = 1 + _max(h, self.h)
                self.nodes += 1
            else:
                self.h = h
                return node

    cdef tuple args(self, Py_ssize_t depth):
        """'(' (expr (',' expr)*)? ')' -- the current token is the '('; ``h``: the
        height of the tallest argument (0 if none)."""
        cdef Py_ssize_t h
        self.i += 1
        if self.toks[self.i].kind == T_RPAREN:
            self.i += 1
            self.h = 0
            return ()
        items = [self.expr(depth)]
        h = self.h
        while self.toks[self.i].kind == T_COMMA:
            self.i += 1
            items.append(self.expr(depth))
            h = _max(h, self.h)
        self.expect(T_RPAREN)
        self.h = h
        return tuple(items)

    cdef object primary(self, Py_ssize_t depth):
        cdef Tok *toks = self.toks
        cdef Py_ssize_t i = self.i
        cdef Tok *t = &toks[i]
        cdef int kind = t.kind, next_kind = toks[i + 1].kind
        cdef Py_ssize_t pos = t.start
        if kind == T_ID:
            if next_kind != T_LPAREN:
                self.i = i + 1
                return self.ident(t)
            name = self.name(t)
            self.i = i + 1
            if name == "has":
                return self.has(pos, depth)
            if name in _RESERVED:
                raise CelSyntaxError(f"reserved word {name!r} is not a function at {_col(pos)}")
            return self.call(name, None, 0, pos, depth)
        if kind == T_STR or kind == T_INT or kind == T_NUM or T_TRUE <= kind <= T_NULL:
            self.i = i + 1
            return self.literal(t, False)
        if kind == T_LPAREN:
            self.i = i + 1
            node = self.expr(depth + 1)
            self.expect(T_RPAREN)
            return node
        if kind == T_LBRACK:
            return self.list_literal(pos, depth)
        if kind == T_LBRACE:
            return self.map_literal(pos, depth)
        if kind == T_MINUS and (next_kind == T_INT or next_kind == T_BIGINT or next_kind == T_NUM):
            if next_kind == T_BIGINT and not toks[i + 1].ival:
                raise CelSyntaxError(f"integer literal out of the int64 range at {_col(pos)}")
            self.i = i + 2
            return self.literal(&toks[i + 1], True)
        if kind == T_BIGINT:
            raise CelSyntaxError(f"integer literal out of the int64 range at {_col(pos)}")
        if kind == T_DOT and next_kind == T_ID:
            # Leading dot: a name resolved from the root namespace (same thing here).
            self.i = i + 1
            node = self.primary(depth)
            if type(node) is _Ident or (type(node) is _Call and node.function != "has"):
                return node
            self.i = i
        raise self.error_here()

    cdef object has(self, Py_ssize_t pos, Py_ssize_t depth):
        args = self.args(depth + 1)
        if len(args) == 1:
            arg = args[0]
            if type(arg) is _Select and not arg.test_only:
                # Replaces the Select it was given: same height, same node count.
                return _Select(arg.operand, arg.field, True, pos)
        raise CelSyntaxError(
            f"has() needs a single field selection like has(doc.f) at {_col(pos)}"
        )

    cdef object list_literal(self, Py_ssize_t pos, Py_ssize_t depth):
        cdef Tok *toks = self.toks
        cdef Py_ssize_t h = 0
        self.i += 1
        items = []
        while toks[self.i].kind != T_RBRACK:
            items.append(self.expr(depth + 1))
            h = _max(h, self.h)
            if toks[self.i].kind != T_COMMA:
                break
            self.i += 1
        self.expect(T_RBRACK)
        self.h = 1 + h
        self.nodes += 1
        return _ListExpr(tuple(items), pos)

    cdef object map_literal(self, Py_ssize_t pos, Py_ssize_t depth):
        cdef Tok *toks = self.toks
        cdef Py_ssize_t h = 0
        self.i += 1
        entries = []
        while toks[self.i].kind != T_RBRACE:
            key = self.expr(depth + 1)
            h = _max(h, self.h)
            self.expect(T_COLON)
            entries.append((key, self.expr(depth + 1)))
            h = _max(h, self.h)
            if toks[self.i].kind != T_COMMA:
                break
            self.i += 1
        self.expect(T_RBRACE)
        self.h = 1 + h
        self.nodes += 1
        return _MapExpr(tuple(entries), pos)


def parse(
    source,
    *,
    max_length=cel.MAX_EXPRESSION_LENGTH,
    max_depth=cel.MAX_DEPTH,
    max_nodes=cel.MAX_NODES,
    bint check=False,
):
    """Parse a CEL expression exactly as ``streamer.matching.cel.parse`` does, only faster.

    With ``check=True`` the result is also validated as by ``streamer.matching.cel.check``
    (same ``InvalidSubscription`` messages, raised only after any parse error).
    """
    cdef Py_ssize_t n, k
    cdef int ukind
    cdef void *data
    cdef _Parser p
    if not isinstance(source, str):
        raise TypeError(f"CEL source must be str, not {type(source).__name__}")
    if type(source) is not str:
        source = PyUnicode_FromObject(source)  # an exact copy of a str subclass
    n = len(source)
    if n > _limit(max_length):
        raise CelSyntaxError(f"expression is {n} characters long; the limit is {max_length}")
    ukind = PyUnicode_KIND(source)
    data = PyUnicode_DATA(source)
    if ukind != PyUnicode_1BYTE_KIND:
        for k in range(n):
            if 0xD800 <= PyUnicode_READ(ukind, data, k) <= 0xDFFF:
                raise CelSyntaxError(f"invalid character (lone surrogate) at {_col(k)}")
    p = _Parser.__new__(_Parser)
    p.src = source
    p.ukind = ukind
    p.data = data
    p.n = n
    p.vals = []
    p.max_depth = _limit(max_depth)
    p.max_depth_obj = max_depth
    p.checking = check
    p.tokenize()
    expr = p.expr(1)
    if p.toks[p.i].kind != T_EOF:
        raise p.error_here()
    if p.nodes > _limit(max_nodes) or p.h > p.max_depth:
        _check_size(expr, max_depth, max_nodes)  # raises, naming the same node
    if p.flagged:
        _check(expr)  # raises the first problem in the reference's order
    return expr
