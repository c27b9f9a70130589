# Protobuf base-128 varints, for the modules that write protocol bytes by
# hand (_fanout, _subscribe): inline definitions cimported by both, so the
# encoding lives in one place and costs no call.
from libc.stdint cimport uint64_t


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
