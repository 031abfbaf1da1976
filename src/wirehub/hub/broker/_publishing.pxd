# C types for the compiled copy of _publishing.py (the optional accelerator, built by
# hatch_build.py with Cython): Batch and Publisher become extension types with typed fields
# (RedisBroker, a Python subclass of Publisher, reads and writes them as attributes).
import cython

cdef class Batch:
    cdef public object room, history, shared, publications
    cdef public list bodies, answers
    cdef public Py_ssize_t singles, size
    cpdef fail(self, error)

cdef class Publisher:
    cdef public object _loop, _cmd, _idle
    cdef public bytes _epoch_seed
    cdef public long long _epochs
    cdef public dict _batches, _publish_heads
    cdef public bint _up, _closing
    cdef public Py_ssize_t in_flight
    @cython.locals(batch=Batch, batches=dict, k=Py_ssize_t)
    cpdef _queue(self, room, history, bytes body, tuple entry, bint publication, future)
    @cython.locals(n=Py_ssize_t, k=Py_ssize_t, answers=list, bodies=list)
    cpdef _answered(self, Batch batch, reply)
    @cython.locals(batch=Batch, batches=dict)
    cpdef _send_batches(self)
    cpdef _send_batch(self, Batch batch)
    @cython.locals(n=Py_ssize_t, bodies=list, head=tuple)
    cpdef _send_batch_now(self, Batch batch)
