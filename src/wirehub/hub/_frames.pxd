# C types for the compiled copy of _frames.py (the optional accelerator, built by
# hatch_build.py with Cython): the class becomes an extension type with typed fields.

cdef class InlineFrames:
    cdef public object app, sessions, table, policies, stats, publish_now
    cdef public bint gated
    cpdef pub(self, s, cmd)
