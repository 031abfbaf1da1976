"""The embedded broker (``memory://``): one process, everything in memory.

The code is in ``_memory.py``; this module gives it from there or from its compiled copy
``_memory_c`` (the optional accelerator: see :mod:`wirehub._accelerator`), as
:mod:`wirehub.hub.frames` does for the hub's frame path. Its publish is on the hot path of
every ``pub`` on a local broker.
"""

from __future__ import annotations

from ... import _accelerator

SOURCE = "_memory"

_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)

MemoryBroker = _impl.MemoryBroker
PUB_OVERHEAD = _impl.PUB_OVERHEAD
ROOM_OVERHEAD = _impl.ROOM_OVERHEAD
DEFAULT_MAX_BYTES = _impl.DEFAULT_MAX_BYTES
SWEEP_INTERVAL = _impl.SWEEP_INTERVAL
SWEEP_BATCH = _impl.SWEEP_BATCH

__all__ = ["MemoryBroker", "PUB_OVERHEAD", "ROOM_OVERHEAD", "DEFAULT_MAX_BYTES", "SWEEP_INTERVAL", "SWEEP_BATCH"]
