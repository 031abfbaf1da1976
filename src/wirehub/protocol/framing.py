"""Sans-I/O frame codecs: newline-delimited, 4-byte length-prefixed, and WebSocket's.

Decoders take raw chunks as they arrive and return complete frames interleaved with
:class:`FrameError` values. They never raise on peer input and never buffer more than a
bounded number of bytes (see :class:`LineDecoder` and :class:`LengthPrefixDecoder`).

The code is in ``_framing.py``; this module gives it to the rest of wirehub from there or
from its compiled copy ``_framing_c`` (the optional accelerator: see
:mod:`wirehub._accelerator`). ``_framing.pxd`` gives the compiled copy its C types.
"""

from __future__ import annotations

from .. import _accelerator

SOURCE = "_framing"

_impl, ACCELERATOR = _accelerator.load(__package__, SOURCE)

__all__ = list(_impl.__all__)

FrameError = _impl.FrameError
LineDecoder = _impl.LineDecoder
LengthPrefixDecoder = _impl.LengthPrefixDecoder
WebSocketDecoder = _impl.WebSocketDecoder
Ping = _impl.Ping
Close = _impl.Close
ProtocolError = _impl.ProtocolError
unmask = _impl.unmask
decode_datagram = _impl.decode_datagram
Framing = _impl.Framing
LINE = _impl.LINE
LENGTH = _impl.LENGTH
FRAMINGS = _impl.FRAMINGS
get_framing = _impl.get_framing
