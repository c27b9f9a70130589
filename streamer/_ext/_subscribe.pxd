# Declarations of the compiled registration (streamer/_ext/_subscribe.pyx).
from libc.stdint cimport uint32_t

from streamer._ext._core cimport Core


cdef class Registrar:
    cdef object subscriptions     # the SubscriptionSet it registers for
    cdef Core index               # its live index, read at each register()
    cdef dict held                # SubscriptionSet._held: id -> bytes << 32 | owner
    cdef dict owned               # SubscriptionSet._owned: owner -> set of ids
    cdef dict owner_bytes         # SubscriptionSet._bytes: owner -> request bytes held
    cdef Py_ssize_t max_subscriptions
    cdef Py_ssize_t max_filters
    cdef Py_ssize_t max_expression_length
    cdef Py_ssize_t max_request_bytes
    cdef Py_ssize_t max_list_values
    cdef Py_ssize_t max_gateway_bytes
    cdef Py_ssize_t max_node_bytes

    cdef bytes one(self, uint32_t owner, str sub_id, str database, str collection,
                   str expression, list filters, Py_ssize_t size, Py_ssize_t node_bytes)
    cdef list lower(self, list filters, str expression, Py_ssize_t *values)
