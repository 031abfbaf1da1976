# C types for the compiled copy of _framing.py (the optional accelerator, built by
# hatch_build.py with Cython; see wirehub/_accelerator.py). The .py file stays the one source
# of the code: this only makes the decoders extension types with typed fields and types the
# locals of their loops. Every attribute the decoders' __slots__ name must be declared here.
import cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr

cdef bint _COMPILED

# C for the compiled copy only (the .py calls it when _COMPILED, and bytes.split otherwise):
# bytes.split looks at every byte in turn; memchr finds the newlines many bytes at a time.
cdef inline list _split_lines_c(bytes chunk):
    """chunk.split(b"\n")."""
    cdef const char *s = PyBytes_AS_STRING(chunk)
    cdef const char *hit
    cdef Py_ssize_t n = PyBytes_GET_SIZE(chunk), start = 0
    cdef list parts = []
    while True:
        hit = <const char *>memchr(s + start, 10, n - start)
        if hit == NULL:
            parts.append(PyBytes_FromStringAndSize(s + start, n - start))
            return parts
        parts.append(PyBytes_FromStringAndSize(s + start, hit - (s + start)))
        start = hit - s + 1

cdef class LineDecoder:
    cdef Py_ssize_t _max
    cdef bytearray _buf
    cdef bint _discard

    @cython.locals(chunk=bytes, mx=Py_ssize_t, buf=bytearray, end=Py_ssize_t, i=Py_ssize_t, parts=list, tail=bytes,
                   out=list, cr=bint, first=bytes, line=bytes, size=Py_ssize_t, part=bytes, n=Py_ssize_t)
    cpdef list feed(self, data)

cdef class LengthPrefixDecoder:
    cdef Py_ssize_t _max
    cdef bytearray _buf
    cdef Py_ssize_t _skip

    @cython.locals(n=Py_ssize_t, mx=Py_ssize_t, buf=bytearray, pos=Py_ssize_t, skip=Py_ssize_t,
                   length=Py_ssize_t, out=list, have=Py_ssize_t, take=Py_ssize_t, end=Py_ssize_t,
                   need=Py_ssize_t, last=Py_ssize_t, start=Py_ssize_t)
    cpdef list feed(self, data)

cdef class WebSocketDecoder:
    cdef Py_ssize_t _max
    cdef Py_ssize_t _hard
    cdef bytearray _buf
    cdef Py_ssize_t _need
    cdef bytearray _fragments
    cdef bint _text
    cdef bint _done
    cdef public bint messages_only

    @cython.locals(buf=bytearray, chunk=bytes, out=list, n=Py_ssize_t, pos=Py_ssize_t, need=Py_ssize_t,
                   b0=Py_ssize_t, b1=Py_ssize_t, opcode=Py_ssize_t, length=Py_ssize_t, at=Py_ssize_t,
                   end=Py_ssize_t, payload=bytes, fragments=bytearray, message=bytes)
    cpdef list feed(self, data)
