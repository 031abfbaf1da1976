"""The hub's per-frame path of ``pub`` on a remote broker.

The code is in ``_pipelined.py``; this module gives it to the hub from there or from its
compiled copy ``_pipelined_c`` (the optional accelerator: see :mod:`wirehub._accelerator`), as
:mod:`wirehub.hub.frames` does for the local broker's.
"""

from __future__ import annotations

from .. import _accelerator

SOURCE = "_pipelined"

_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)

PipelinedFrames = _impl.PipelinedFrames
PUB_WINDOW = _impl.PUB_WINDOW
PUB_IN_FLIGHT = _impl.PUB_IN_FLIGHT
