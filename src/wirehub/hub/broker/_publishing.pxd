# C types for the compiled copy of _publishing.py (the optional accelerator, built by
# hatch_build.py with Cython): Batch and Publisher become extension types with typed fields
# (RedisBroker, a Python subclass of Publisher, reads and writes them as attributes).
import cython

cdef class Batch:
    cdef public object room, history, shared, publications
    cdef public list bodies, answers
    cdef public Py_ssize_t singles, size
    cdef public long long newest
    cpdef fail(self, error)

cdef class Publisher:
    cdef public object _loop, _cmd, _idle
    cdef public bytes _epoch_seed, _evalsha
    cdef public long long _epochs, publish_calls
    cdef public dict _batches, _publish_heads
    cdef public bint _up, _closing
    cdef public Py_ssize_t in_flight
    cpdef tuple publish_batched_now(self, room, data, sender, ts, history)
    cdef tuple _batched(self, room, data, sender, ts, history, info, exclude)
    cdef object _refused(self, room)
    @cython.locals(batch=Batch, batches=dict, k=Py_ssize_t, newest=cython.longlong, body=bytes, entry=tuple)
    cpdef _queue(self, room, data, sender, ts, history, info, exclude, bint publication, future)
    @cython.locals(n=Py_ssize_t, i=Py_ssize_t, batch=Batch)
    cpdef _answered(self, list batches, reply)
    @cython.locals(n=Py_ssize_t, k=Py_ssize_t, first=Py_ssize_t, answers=list, bodies=list)
    cpdef _answer(self, Batch batch, Py_ssize_t last, epoch_b)
    @cython.locals(batch=Batch, batches=dict, group=list, size=Py_ssize_t)
    cpdef _send_batches(self)
    @cython.locals(batch=Batch, keys=list, args=list, sent=list, part=tuple, k=Py_ssize_t)
    cpdef _send_call(self, list batches)
    @cython.locals(n=Py_ssize_t, bodies=list, head=tuple)
    cpdef tuple _part(self, Batch batch)
