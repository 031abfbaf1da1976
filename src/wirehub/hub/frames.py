"""The hub's per-frame path of ``ping`` and ``pub``, on a local broker and on a remote one.

The code is in ``_frames.py``; this module gives it to the hub from there or from its compiled
copy ``_frames_c`` (the optional accelerator: see :mod:`wirehub._accelerator`), as
:mod:`wirehub.protocol.framing` does for the frame decoders.
"""

from __future__ import annotations

from .. import _accelerator

SOURCE = "_frames"

_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)

InlineFrames = _impl.InlineFrames
PipelinedFrames = _impl.PipelinedFrames
PUB_WINDOW = _impl.PUB_WINDOW
PUB_IN_FLIGHT = _impl.PUB_IN_FLIGHT
#: whether InlineFrames and PipelinedFrames recognise the canonical ping and pub by their bytes: compiled, a C
#: loop over a frame's bytes costs less than decoding it; in Python it costs more
SCAN = ACCELERATOR == _accelerator.COMPILED
