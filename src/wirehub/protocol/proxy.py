"""Sans-I/O parser for the HAProxy PROXY protocol, versions 1 and 2.

Feed the first bytes of a connection to :class:`ProxyHeaderParser`; it
returns ``None`` until it can decide, then either a :class:`ProxyInfo` or a
fatal :class:`~wirehub.protocol.framing.FrameError`.  Peer input never makes
it raise.  Memory is bounded: at most 107 bytes (v1) or ``16 + max_header``
bytes (v2) are buffered before the decision, plus the last chunk fed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .framing import FrameError

__all__ = ["PROXY_V2_SIGNATURE", "ProxyHeaderParser", "ProxyInfo"]

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V1_MAX = 107  # whole line including CRLF
_V2_HEADER = 16
# v2 address block sizes per family (high nibble of byte 13)
_V2_ADDR_LEN = {0: 0, 1: 12, 2: 36, 3: 216}


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """Result of a parsed PROXY header."""

    version: int  # 1 or 2
    local: bool  # True: use the real socket peer (v2 LOCAL/UNSPEC, v1 UNKNOWN)
    source: tuple[str, int] | None  # original client, None if local or non-IP
    destination: tuple[str, int] | None


class _Invalid(Exception):
    """Internal: raised inside the parser, turned into a FrameError."""


def _v1_ip(raw: bytes, version: int) -> str:
    text = raw.decode("ascii")
    if "%" in text:  # reject IPv6 scope ids
        raise _Invalid(f"bad v1 address {text!r}")
    try:
        if version == 4:
            return str(ipaddress.IPv4Address(text))
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise _Invalid(f"bad v1 IPv{version} address {text!r}") from None


def _v1_port(raw: bytes) -> int:
    if not raw.isdigit() or len(raw) > 5 or int(raw) > 65535:
        raise _Invalid(f"bad v1 port {raw.decode('ascii')!r}")
    return int(raw)


def _parse_v1(line: bytes) -> ProxyInfo:
    """Parse a v1 line without its CRLF."""
    if not line.isascii():
        raise _Invalid("v1 header contains non-ASCII bytes")
    parts = line.split(b" ")
    proto = parts[1] if len(parts) > 1 else b""
    if proto == b"UNKNOWN":  # anything after UNKNOWN is ignored by spec
        return ProxyInfo(1, True, None, None)
    if proto == b"TCP4":
        version = 4
    elif proto == b"TCP6":
        version = 6
    else:
        raise _Invalid(f"bad v1 protocol {proto.decode('ascii')!r}")
    if len(parts) != 6:
        raise _Invalid("v1 header must be 'PROXY TCPx src dst sport dport'")
    src = _v1_ip(parts[2], version)
    dst = _v1_ip(parts[3], version)
    return ProxyInfo(1, False, (src, _v1_port(parts[4])), (dst, _v1_port(parts[5])))


def _parse_v2(cmd: int, family: int, body: bytes) -> ProxyInfo:
    """Parse the v2 address block (TLVs after it are ignored)."""
    if cmd == 0 or family == 0:  # LOCAL, or PROXY with AF_UNSPEC
        return ProxyInfo(2, True, None, None)
    need = _V2_ADDR_LEN[family]
    if len(body) < need:
        raise _Invalid(f"v2 address block of {len(body)} bytes, family needs {need}")
    if family == 3:  # AF_UNIX: no IP addresses to report
        return ProxyInfo(2, False, None, None)
    if family == 1:
        src = str(ipaddress.IPv4Address(body[0:4]))
        dst = str(ipaddress.IPv4Address(body[4:8]))
        p = 8
    else:
        src = str(ipaddress.IPv6Address(body[0:16]))
        dst = str(ipaddress.IPv6Address(body[16:32]))
        p = 32
    sport = int.from_bytes(body[p : p + 2], "big")
    dport = int.from_bytes(body[p + 2 : p + 4], "big")
    return ProxyInfo(2, False, (src, sport), (dst, dport))


class ProxyHeaderParser:
    """Feed the first bytes of a connection; decides once."""

    __slots__ = ("_max_header", "_buf", "_done", "_remainder")

    def __init__(self, *, max_header: int = 4096) -> None:
        if max_header < 0:
            raise ValueError("max_header must be >= 0")
        self._max_header = max_header  # limit on the v2 payload length field
        self._buf = bytearray()
        self._done = False
        self._remainder = b""

    @property
    def remainder(self) -> bytes:
        """Bytes received after the header (valid once feed returned ProxyInfo)."""
        return self._remainder

    def feed(self, data: bytes) -> ProxyInfo | FrameError | None:
        """None: need more bytes; ProxyInfo: parsed; FrameError: not a valid header."""
        if self._done:
            raise RuntimeError("ProxyHeaderParser.feed() called after a result")
        buf = self._buf
        buf += data
        if not buf:
            return None
        try:
            if buf[0] == 0x0D:
                result = self._feed_v2(buf)
            elif buf[0] == 0x50:  # "P"
                result = self._feed_v1(buf)
            else:
                raise _Invalid("not a PROXY protocol header")
        except _Invalid as exc:
            result = FrameError("bad_frame", f"PROXY protocol: {exc}", fatal=True)
        if result is not None:
            self._done = True
            buf.clear()
        return result

    def _feed_v1(self, buf: bytearray) -> ProxyInfo | None:
        n = len(buf)
        k = min(n, len(_V1_PREFIX))
        if buf[:k] != _V1_PREFIX[:k]:
            raise _Invalid("not a PROXY protocol header")
        i = buf.find(b"\n", 0, _V1_MAX)
        if i < 0:
            if n >= _V1_MAX:
                raise _Invalid(f"v1 header exceeds {_V1_MAX} bytes without CRLF")
            return None
        if buf[i - 1] != 0x0D:
            raise _Invalid("v1 header must end with CRLF")
        info = _parse_v1(bytes(buf[: i - 1]))
        self._remainder = bytes(buf[i + 1 :])
        return info

    def _feed_v2(self, buf: bytearray) -> ProxyInfo | None:
        n = len(buf)
        k = min(n, len(PROXY_V2_SIGNATURE))
        if buf[:k] != PROXY_V2_SIGNATURE[:k]:
            raise _Invalid("not a PROXY protocol header")
        if n > 12:
            ver_cmd = buf[12]
            if ver_cmd >> 4 != 2:
                raise _Invalid(f"unsupported v2 version {ver_cmd >> 4}")
            cmd = ver_cmd & 0x0F
            if cmd > 1:
                raise _Invalid(f"unknown v2 command {cmd}")
        if n > 13:
            family, proto = buf[13] >> 4, buf[13] & 0x0F
            if family > 3:
                raise _Invalid(f"unknown v2 address family {family}")
            if proto > 2:
                raise _Invalid(f"unknown v2 transport protocol {proto}")
        if n < _V2_HEADER:
            return None
        length = int.from_bytes(buf[14:16], "big")
        if length > self._max_header:
            raise _Invalid(f"v2 header length {length} exceeds max_header {self._max_header}")
        end = _V2_HEADER + length
        if n < end:
            return None
        info = _parse_v2(cmd, family, bytes(buf[_V2_HEADER:end]))
        self._remainder = bytes(buf[end:])
        return info
