# C types for the compiled copy of _memory.py (the optional accelerator, built by
# hatch_build.py with Cython; see wirehub/_accelerator.py): a room's stream is an extension
# type with typed fields. MemoryBroker stays a plain class (compiled, its methods run as C).
cdef class _Stream:
    cdef public object epoch, items
    cdef public long long seq, bytes, ttl_ms
