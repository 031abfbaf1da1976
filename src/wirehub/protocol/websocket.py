"""Server-side WebSocket (RFC 6455) without I/O: the HTTP/1.1 upgrade and the frame decoder.

:func:`parse_upgrade` answers an upgrade request's head with the bytes to send back: the
``101 Switching Protocols`` response, or an HTTP error for a request that is not a valid
upgrade. No extension and no subprotocol is ever negotiated.

:class:`WebSocketDecoder` (from :mod:`wirehub.protocol.framing`, where the accelerator
compiles it with the other decoders) turns the client's bytes into whole messages,
:class:`Ping`, :class:`Close`, ``too_large`` errors and :class:`ProtocolError`, never raising
on peer input and holding at most one unfinished frame between reads.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from http import HTTPStatus

from . import framing

__all__ = ["MAX_UPGRADE_SIZE", "MAX_UPGRADE_HEADERS", "Close", "Ping", "ProtocolError", "WebSocketDecoder",
           "accept_key", "http_error", "parse_upgrade", "unmask"]

# the frame decoder is with the other framings' (compiled with them by the accelerator)
WebSocketDecoder = framing.WebSocketDecoder
Ping = framing.Ping
Close = framing.Close
ProtocolError = framing.ProtocolError
unmask = framing.unmask

#: the longest upgrade request head read (request line and headers, up to the blank line)
MAX_UPGRADE_SIZE = 8192
#: the most header lines an upgrade request may have
MAX_UPGRADE_HEADERS = 64
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def http_error(status: int, why: str, extra: bytes = b"") -> bytes:
    """An HTTP error response that closes the connection, with ``why`` as its body."""
    body = why.encode() + b"\n"
    phrase = HTTPStatus(status).phrase.encode()
    return (b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%bConnection: close"
            b"\r\n\r\n%b" % (status, phrase, len(body), extra, body))


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def parse_upgrade(head: bytes) -> tuple[bool, bytes, str]:
    """``(upgraded, response, why)`` for an upgrade request's head (the bytes before the blank
    line that ends it, at most :data:`MAX_UPGRADE_SIZE`): the 101 response when it is a valid
    WebSocket upgrade (any path), else an HTTP error response and what was wrong."""

    def refuse(status: int, why: str, extra: bytes = b"") -> tuple[bool, bytes, str]:
        return False, http_error(status, why, extra), why

    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[1] or not parts[2].startswith(b"HTTP/"):
        return refuse(400, "malformed HTTP request line")
    method, _, version = parts
    if version != b"HTTP/1.1":
        return refuse(400, "a WebSocket upgrade needs HTTP/1.1")
    if method != b"GET":
        return refuse(405, "a WebSocket upgrade is a GET", b"Allow: GET\r\n")
    if len(lines) - 1 > MAX_UPGRADE_HEADERS:
        return refuse(431, f"more than {MAX_UPGRADE_HEADERS} header lines")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            return refuse(400, "malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip())
    if b"host" not in headers:
        return refuse(400, "no Host header")
    if b"transfer-encoding" in headers or any(v != b"0" for v in headers.get(b"content-length", ())):
        return refuse(400, "a WebSocket upgrade has no body")
    if b"websocket" not in _tokens(b",".join(headers.get(b"upgrade", ()))):
        return refuse(426, "this is a WebSocket endpoint: send an upgrade request (Upgrade: websocket)",
                      b"Upgrade: websocket\r\n")
    if b"upgrade" not in _tokens(b",".join(headers.get(b"connection", ()))):
        return refuse(400, "Connection: Upgrade is missing")
    if headers.get(b"sec-websocket-version") != [b"13"]:
        return refuse(426, "unsupported WebSocket version: 13 is", b"Sec-WebSocket-Version: 13\r\n")
    keys = headers.get(b"sec-websocket-key", ())
    try:
        valid = len(keys) == 1 and len(base64.b64decode(keys[0], validate=True)) == 16
    except (binascii.Error, ValueError):
        valid = False
    if not valid:
        return refuse(400, "Sec-WebSocket-Key must be one base64-encoded 16-byte value")
    return (True, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(keys[0]) + b"\r\n\r\n", "")
