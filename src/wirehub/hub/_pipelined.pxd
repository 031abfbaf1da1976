# C types for the compiled copy of _pipelined.py (the optional accelerator, built by
# hatch_build.py with Cython): the class becomes an extension type with typed fields, and
# its methods call each other without a Python method lookup.
import cython

cdef class PipelinedFrames:
    cdef public object app, sessions, broker, policies, stats, publish, batched, runner, table
    cdef public bint rate, gated
    cpdef frame(self, conn, data)
    @cython.locals(k=Py_ssize_t)
    cpdef start(self, s, cmd, data, info)
    @cython.locals(published=Py_ssize_t, entry=tuple, k=Py_ssize_t)
    cpdef published(self, s, _)
    cpdef failed(self, s, cmd, exc)
