# C types for the compiled copy of _connection.py (the optional accelerator, built by
# hatch_build.py with Cython). The .py file stays the one source of the code: this only
# declares its hot classes as extension types with typed fields, and types the loop
# variables of the per-connection loops. Every attribute the classes' __slots__ name must be
# declared here, and nothing else.
import cython

cdef class Flusher:
    cdef object _loop
    cdef list _dirty
    cdef bint _scheduled
    cpdef add(self, conn)

cdef class Context:
    cdef public object loop, handlers, settings, deadlines, registry, now, frame_handler
    cdef public Flusher flusher
    cdef public Py_ssize_t max_send_buffer, reply_max
    cdef public bint pumped, frame_now, has_replies

cdef class Connection:
    cdef public object id, transport, peer, peer_ip, connected_at, _state
    cdef public long long bytes_in, bytes_out, frames_in, frames_out, frames_dropped
    cdef public double last_activity
    cdef public Context _ctx
    cdef public object encode, _sink
    cdef public list _pending
    cdef public Py_ssize_t _pending_size
    cdef public bint _write_paused, _closed, _greeted, _reading_paused, _eof, _last_word, _in_read
    cdef public object _close_reason, _idle_timeout
    cdef public double _handshake_deadline, _app_deadline
    cdef public object _timer, _queue, _pump, _drain_waiter
    cdef public long long _deadline
    cdef public object _decoder
    cdef object __weakref__

    # called from this module's C code without a Python method lookup (no subclass overrides them)
    @cython.locals(pending=list, size=Py_ssize_t)
    cpdef bint send(self, payload) except -1
    cpdef bint send_wire(self, data) except -1
    @cython.locals(ctx=Context, replies=dict, reply_max=Py_ssize_t, n=Py_ssize_t, i=Py_ssize_t, pumped=bint)
    cpdef _dispatch(self, items)

@cython.locals(conn=Connection, pending=list)
cpdef write_out(conns, bint force)

@cython.locals(conn=Connection, pending=list, size=Py_ssize_t, queued=Py_ssize_t)
cpdef Py_ssize_t broadcast(conns, payload) except -1
