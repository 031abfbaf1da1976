"""One open connection: counters, deadlines, the outbound buffer and handler dispatch.

The code is in ``_connection.py``. This module gives it to the rest of wirehub, from one of
two places:

- ``_connection_c``, the compiled accelerator: the same file compiled by Cython at install
  time (``hatch_build.py``), its hot classes made extension types with C-typed fields by
  ``_connection.pxd``. It is used when it was built and was built from the ``.py`` and
  ``.pxd`` files that are here now (a digest of both is compiled into it), so an edited
  source is never shadowed by a stale build;
- ``_connection``, the Python code itself: when no C compiler or Cython was at hand at
  install time, when the build is out of date (a warning says to reinstall), or when the
  environment variable ``WIREHUB_PURE_PYTHON=1`` asks for it.

Behaviour is the same either way; the tests run on both (tests/test_accelerator.py).
:data:`ACCELERATOR` says which one is in use.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).parent
SOURCES = ("_connection.py", "_connection.pxd")


def sources_digest(folder: Path = _HERE) -> str:
    """SHA-256 of the accelerator's sources, as compiled into it."""
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def _load() -> tuple[ModuleType, str]:
    if os.environ.get("WIREHUB_PURE_PYTHON", "") not in ("", "0"):
        from . import _connection

        return _connection, "off (WIREHUB_PURE_PYTHON is set)"
    try:
        from . import _connection_c as compiled  # type: ignore[attr-defined]
    except ImportError:
        from . import _connection

        return _connection, "not built (pure Python)"
    if getattr(compiled, "_SOURCE_DIGEST", None) != sources_digest():
        warnings.warn(
            "wirehub's compiled accelerator was built from other sources than "
            "wirehub/transport/_connection.py and .pxd as they are now; using the Python code. "
            "Reinstall wirehub (pip install -e .) to rebuild it.",
            RuntimeWarning,
            stacklevel=2,
        )
        from . import _connection

        return _connection, "out of date (pure Python)"
    return compiled, "compiled"


_impl, ACCELERATOR = _load()
#: True when the compiled accelerator is in use
COMPILED = ACCELERATOR == "compiled"

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
_renew_process_tag = _impl._renew_process_tag
Handlers = _impl.Handlers
Settings = _impl.Settings
Flusher = _impl.Flusher
Deadlines = _impl.Deadlines
Context = _impl.Context
Connection = _impl.Connection
write_out = _impl.write_out
broadcast = _impl.broadcast
