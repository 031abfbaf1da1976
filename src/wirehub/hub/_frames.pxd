# C types for the compiled copy of _frames.py (the optional accelerator, built by
# hatch_build.py with Cython): the class becomes an extension type with typed fields, and the
# byte scanners of the canonical frames C loops over a pointer to the frame's bytes. Two
# helpers below are C code of their own (cdef inline, here), which the .py calls only when
# compiled (_COMPILED) and otherwise does in Python.
import cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "<time.h>":
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clock, timespec *ts)
    int CLOCK_REALTIME

# C for the compiled copy only (the .py takes these when _COMPILED, and does the same
# in Python otherwise): the ack of a pub, and the time in ms, without Python objects between.

cdef inline bytes _ack_c(const unsigned char *ref, Py_ssize_t n, long long seq):
    """b'{"op":"ok","ref":REF,"seq":SEQ}': REF the n bytes at ref (the frame's own), SEQ >= 0."""
    cdef char out[112]
    cdef char digits[24]
    cdef Py_ssize_t k = 0, i
    if n > 64 or seq < 0:  # a long string ref: Python's formatting (rare)
        return b'{"op":"ok","ref":%b,"seq":%d}' % (ref[:n], seq)
    while True:
        digits[k] = <char>(48 + seq % 10)
        k += 1
        seq //= 10
        if seq == 0:
            break
    memcpy(out, b'{"op":"ok","ref":', 17)
    memcpy(out + 17, ref, n)
    i = 17 + n
    memcpy(out + i, b',"seq":', 7)
    i += 7
    while k > 0:
        k -= 1
        out[i] = digits[k]
        i += 1
    out[i] = 125  # '}'
    return PyBytes_FromStringAndSize(out, i + 1)

cdef inline Py_ssize_t _string_end_c(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept:
    """_string_end: memchr finds the closing quote, and a loop without branches (which the C
    compiler vectorises) checks the bytes before it: printable ASCII but backslash."""
    cdef const unsigned char *q
    cdef Py_ssize_t k, stop
    cdef unsigned int bad = 0
    i += 1
    if i >= end:
        return -1
    q = <const unsigned char *>memchr(p + i, 34, end - i)
    if q == NULL:
        return -1
    stop = q - p
    for k in range(i, stop):
        bad |= (<unsigned char>(p[k] - 32) > 94) | (p[k] == 92)
    return -1 if bad else stop + 1

cdef inline bytes _pong_c(const unsigned char *p, Py_ssize_t n):
    """b'{"op":"pong"' + p[12:n]: the pong to the ping frame p of n bytes."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef char *o = PyBytes_AS_STRING(out)
    memcpy(o, b'{"op":"pong"', 12)
    memcpy(o + 12, p + 12, n - 12)
    return out

cdef inline bint _same_c(const unsigned char *p, bytes key) noexcept:
    """The len(key) bytes at p are key's."""
    return memcmp(p, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) == 0

cdef inline long long _now_ms_c() noexcept:
    cdef timespec t
    clock_gettime(CLOCK_REALTIME, &t)
    return <long long>t.tv_sec * 1000 + t.tv_nsec // 1000000

cdef bytes _PING_HEAD, _PONG_HEAD, _PUB_HEAD, _DATA_KEY, _REF_KEY
cdef object _deque_append, _deque_popleft
cdef Py_ssize_t MAX_REF_DIGITS, MAX_SCAN_DEPTH, _MAX_ROOM_LENGTH
cdef bint _COMPILED

@cython.locals(c=Py_ssize_t)
cdef inline Py_ssize_t _string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

@cython.locals(c=Py_ssize_t, j=Py_ssize_t, k=Py_ssize_t)
cpdef Py_ssize_t ref_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

@cython.locals(n=Py_ssize_t, p=cython.p_uchar)
cpdef object ping_reply(bytes frame)

@cython.locals(c=Py_ssize_t, depth=Py_ssize_t, objects=cython.ulonglong)
cpdef Py_ssize_t json_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

cdef Py_ssize_t _key_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept

cdef class PubScanner:
    cdef public object app, sessions, policies, last_room, last_history, last_conn, last_session, last_client, last_send
    cdef public bytes last_room_key
    cdef public Py_ssize_t room_end, data_end, ref_start
    cdef public bint known
    cpdef forget(self, conn)
    cpdef session_of(self, conn)
    @cython.locals(n=Py_ssize_t, end=Py_ssize_t, i=Py_ssize_t, c=Py_ssize_t, room_end=Py_ssize_t,
                   data_start=Py_ssize_t, data_end=Py_ssize_t, ref_start=Py_ssize_t, p=cython.p_uchar)
    cpdef bint scan_pub(self, bytes frame) except -1
    @cython.locals(p=cython.p_uchar, room_end=Py_ssize_t, key=bytes)
    cpdef room_of(self, bytes frame)
    cpdef history_of(self, bytes frame, room)

cdef class InlineFrames(PubScanner):
    cdef public object stats, publish_seq
    cdef public dict table
    cdef public bint gated, scan
    cdef public long long published
    @cython.locals(head=bytes)
    cpdef frame(self, conn, data)
    @cython.locals(end=Py_ssize_t, ref_start=Py_ssize_t, p=cython.p_uchar, seq=cython.longlong)
    cpdef bint pub_frame(self, conn, bytes frame) except -1
    cpdef pub(self, s, cmd)

cdef class PipelinedFrames(PubScanner):
    cdef public object broker, stats, publish, batched, batched_now, runner, table
    cdef public bint rate, gated, scan
    @cython.locals(head=bytes)
    cpdef frame(self, conn, data)
    @cython.locals(p=cython.p_uchar, ts=cython.longlong, k=Py_ssize_t)
    cpdef bint pub_frame(self, conn, bytes frame) except -1
    @cython.locals(k=Py_ssize_t, ts=cython.longlong)
    cpdef start(self, s, cmd, data, info)
    cpdef in_window(self, s, window, future, cmd, Py_ssize_t k)
    @cython.locals(published=Py_ssize_t, entry=tuple, k=Py_ssize_t, n=Py_ssize_t, ref=bytes, rp=cython.p_uchar)
    cpdef published(self, s, _)
    cpdef failed(self, s, cmd, exc)
