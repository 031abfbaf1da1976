"""Sans-I/O protocol codecs: frame decoders/encoders and the PROXY protocol."""

from .framing import (
    FRAMINGS,
    LENGTH,
    LINE,
    FrameError,
    Framing,
    LengthPrefixDecoder,
    LineDecoder,
    decode_datagram,
    get_framing,
)
from .proxy import PROXY_V2_SIGNATURE, ProxyHeaderParser, ProxyInfo

__all__ = [
    "FRAMINGS",
    "LENGTH",
    "LINE",
    "PROXY_V2_SIGNATURE",
    "FrameError",
    "Framing",
    "LengthPrefixDecoder",
    "LineDecoder",
    "ProxyHeaderParser",
    "ProxyInfo",
    "decode_datagram",
    "get_framing",
]
