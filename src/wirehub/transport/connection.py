"""One open connection: counters, deadlines, the outbound buffer and handler dispatch.

The code is in ``_connection.py``; this module gives it to the rest of wirehub from there or
from its compiled copy ``_connection_c`` (the optional accelerator: see
:mod:`wirehub._accelerator`). ``_connection.pxd`` gives the compiled copy its C types.
:data:`ACCELERATOR` says which one is in use.
"""

from __future__ import annotations

from .. import _accelerator

SOURCE = "_connection"
_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)
#: True when the compiled accelerator is in use
COMPILED = ACCELERATOR == _accelerator.COMPILED

CLOSED = _impl.CLOSED
ERROR = _impl.ERROR
IDLE = _impl.IDLE
HANDSHAKE_TIMEOUT = _impl.HANDSHAKE_TIMEOUT
SLOW_CONSUMER = _impl.SLOW_CONSUMER
SHUTDOWN = _impl.SHUTDOWN
KICKED = _impl.KICKED
PROTOCOL = _impl.PROTOCOL
HANDLER_ERROR = _impl.HANDLER_ERROR
MAX_QUEUED_FRAMES = _impl.MAX_QUEUED_FRAMES
new_connection_id = _impl.new_connection_id
Handlers = _impl.Handlers
Settings = _impl.Settings
Flusher = _impl.Flusher
Deadlines = _impl.Deadlines
Context = _impl.Context
Connection = _impl.Connection
write_out = _impl.write_out
broadcast = _impl.broadcast
