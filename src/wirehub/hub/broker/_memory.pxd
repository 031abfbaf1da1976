# C types for the compiled copy of _memory.py (the optional accelerator, built by
# hatch_build.py with Cython; see wirehub/_accelerator.py): a room's stream is an extension
# type with typed fields, and publish_now's body (_append) reads and writes them as C fields.
# MemoryBroker stays a plain class (compiled, its methods run as C).
import cython
cdef class _Stream:
    cdef public object epoch, items
    cdef public long long seq, bytes, ttl_ms

@cython.locals(seq=cython.longlong, size=Py_ssize_t, ttl_ms=cython.longlong, cost=Py_ssize_t)
cdef object _append(object broker, object room, _Stream stream, object data, object sender, object ts, object history,
                    object info, object exclude)
