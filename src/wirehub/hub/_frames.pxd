# C types for the compiled copy of _frames.py (the optional accelerator, built by
# hatch_build.py with Cython): the class becomes an extension type with typed fields, and the
# byte scanners of the canonical frames C loops over a pointer to the frame's bytes.
import cython

cdef bytes _PING_HEAD, _PONG_HEAD, _PUB_HEAD, _DATA_KEY, _REF_KEY
cdef Py_ssize_t MAX_REF_DIGITS, MAX_SCAN_DEPTH

@cython.locals(c=Py_ssize_t)
cdef inline Py_ssize_t _string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

@cython.locals(c=Py_ssize_t, j=Py_ssize_t, k=Py_ssize_t)
cpdef Py_ssize_t ref_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

@cython.locals(n=Py_ssize_t, p=cython.p_uchar)
cpdef object ping_reply(bytes frame)

@cython.locals(c=Py_ssize_t, depth=Py_ssize_t, objects=cython.ulonglong)
cpdef Py_ssize_t json_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

cdef Py_ssize_t _key_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

cdef class InlineFrames:
    cdef public object app, sessions, table, policies, stats, publish_now
    cdef public bint gated, scan
    cpdef frame(self, conn, data)
    @cython.locals(n=Py_ssize_t, end=Py_ssize_t, i=Py_ssize_t, c=Py_ssize_t, room_end=Py_ssize_t,
                   data_start=Py_ssize_t, data_end=Py_ssize_t, ref_start=Py_ssize_t, p=cython.p_uchar)
    cpdef bint pub_frame(self, conn, bytes frame) except -1
    cpdef pub(self, s, cmd)
