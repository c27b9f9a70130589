# The fan-out's C entry points, for other compiled modules (_ingest cimports
# them): the calls skip argument parsing, and fan_out_c reports its counts
# without building a tuple. The def functions fan_out, frame_deliveries and
# frame_event in _fanout.pyx wrap them for Python and refuse None there;
# C callers must not pass None for a typed argument.
from libc.stdint cimport int64_t

from streamer._ext._core cimport Core


cdef bytes frame_event_c(str event_id, str database, str collection, str document_id,
                         int operation, bytes document_data, int64_t timestamp, str progress)
cdef Py_ssize_t fan_out_c(Core index, object database, object collection, object document_id,
                          object document, bytes event, dict pending,
                          Py_ssize_t *deliveries) except -1
cdef Py_ssize_t frame_deliveries_c(list subscription_ids, bytes owners, bytes event,
                                   dict pending) except -1
