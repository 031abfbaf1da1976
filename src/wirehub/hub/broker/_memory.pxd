# C types for the compiled copy of _memory.py (the optional accelerator, built by
# hatch_build.py with Cython; see wirehub/_accelerator.py): a room's stream is an extension
# type with typed fields, and so is the broker (its state C fields, still readable from Python,
# and a __dict__ for anything else set on it): publish_now and its body (_append) read and
# write them as C fields.
import cython
cdef class _Stream:
    cdef public object epoch, items, policy
    cdef public long long seq, bytes, ttl_ms, oldest
    cdef public Py_ssize_t size

cdef class MemoryBroker:
    cdef public object _clock, _epoch, _epoch_now, _handler, _lru, _touch, _sweeper
    cdef public dict _streams, _presence
    cdef public set _subscribed, _clients
    cdef public list _sweep_keys
    cdef public Py_ssize_t _forgotten, _sweep_next
    cdef public long long max_bytes, bytes, evictions
    cdef dict __dict__

@cython.locals(seq=cython.longlong, size=Py_ssize_t, ttl_ms=cython.longlong, cost=Py_ssize_t, now=cython.longlong,
               held=Py_ssize_t)
cdef long long _append(MemoryBroker broker, object room, _Stream stream, object data, object sender, object ts, object history,
                    object info, object exclude) except? -1

cdef object _deque_append, _deque_popleft

cdef _publication(room, seq, epoch, data, sender, ts, info, exclude)
