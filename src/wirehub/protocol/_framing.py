"""Sans-I/O frame codecs: newline-delimited and 4-byte length-prefixed.

Decoders take raw chunks as they arrive and return complete frames
interleaved with :class:`FrameError` values.  They never raise on peer
input and never buffer more than a bounded number of bytes:

* :class:`LineDecoder` holds at most ``max_size + 1`` bytes between calls
  (a partial line of ``max_size`` bytes plus a trailing ``\\r`` that may turn
  out to be half of a ``\\r\\n`` terminator).
* :class:`LengthPrefixDecoder` holds at most ``max_size + 3`` bytes between
  calls (one incomplete frame: header plus fewer than ``max_size`` payload
  bytes, or fewer than 4 header bytes).

Transient memory inside one ``feed()`` call is O(len(chunk)).

This file is the implementation; import it as :mod:`wirehub.protocol.framing`, which picks
this Python code or its compiled copy. ``_framing.pxd`` gives the compiled copy its C types;
keep the two in step. The loops are written for the compiled copy (typed loops over
``bytes.split``'s parts beat ``map``/``filter`` there); the Python code runs them as well.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass

__all__ = [
    "FRAMINGS",
    "LENGTH",
    "LINE",
    "FrameError",
    "Framing",
    "LengthPrefixDecoder",
    "LineDecoder",
    "decode_datagram",
    "get_framing",
]

_HEADER = struct.Struct(">I")
_unpack_from = _HEADER.unpack_from
_pack = _HEADER.pack
_MAX_LENGTH = 0xFFFFFFFF
_MAX_SIZE = sys.maxsize  # what a C size holds (the compiled decoders keep it in one)
_CR = 0x0D


@dataclass(frozen=True, slots=True)
class FrameError:
    """A decoding problem caused by peer input (returned, never raised)."""

    code: str  # "too_large" | "bad_frame"
    message: str
    fatal: bool = False  # True when the stream can no longer be decoded


def _check_max(max_size: int) -> int:
    if not isinstance(max_size, int) or isinstance(max_size, bool) or not 1 <= max_size <= _MAX_SIZE:
        raise ValueError(f"max_size must be a positive int of at most {_MAX_SIZE}, got {max_size!r}")
    return max_size


class LineDecoder:
    """Newline-delimited frames.

    Accepts ``\\n`` and ``\\r\\n`` (one ``\\r`` is stripped).  Blank lines are
    skipped.  A line longer than ``max_size`` yields one ``too_large`` error as
    soon as that is certain; the rest of it, up to and including the next
    ``\\n``, is discarded without buffering.
    """

    __slots__ = ("_max", "_buf", "_discard")

    def __init__(self, max_size: int) -> None:
        self._max = _check_max(max_size)
        self._buf = bytearray()
        self._discard = False  # inside an oversized line, skipping to "\n"

    @property
    def buffered(self) -> int:
        """Bytes held waiting for a terminator (at most ``max_size + 1``)."""
        return len(self._buf)

    def _too_large(self, size: int, partial: bool) -> FrameError:
        plus = "+" if partial else ""
        return FrameError(
            "too_large", f"line of {size}{plus} bytes exceeds max_frame {self._max}"
        )

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        """Consume a chunk; return complete frames and errors in stream order."""
        if not data:
            return []
        chunk = data if type(data) is bytes else bytes(data)  # typed bytes when compiled
        if self._discard:  # buffer is empty while discarding
            i = chunk.find(b"\n")
            if i < 0:
                return []
            self._discard = False
            chunk = chunk[i + 1 :]
            if not chunk:
                return []
        mx = self._max
        buf = self._buf

        if not buf:
            # Fast path: exactly one complete line and nothing buffered.
            end = len(chunk) - 1
            if chunk[end] == 10 and chunk.find(b"\n") == end:
                if end and chunk[end - 1] == 13:
                    end -= 1
                if end > mx:
                    return [self._too_large(end, False)]
                return [chunk[:end]] if end else []

        parts = chunk.split(b"\n")
        tail = parts.pop()
        out: list[bytes | FrameError] = []
        if parts:
            cr = 13 in chunk  # an int: much faster than the bytes b"\r"
            if buf:
                # Complete the buffered partial line with the first segment.
                first = parts[0]
                size = len(buf) + len(first)
                if size <= mx + 1:
                    buf += first
                    parts[0] = line = bytes(buf)
                    cr = cr or line[-1:] == b"\r"
                else:
                    last = first[-1:] if first else buf[-1:]
                    out.append(self._too_large(size - (last == b"\r"), False))
                    parts[0] = b""
                buf.clear()
            # one pass: strip a "\r", skip blank lines, refuse lines over max_frame
            if cr:
                for part in parts:
                    n = len(part)
                    if n and part[n - 1] == 13:  # "\r" (an int literal: a C compare when compiled)
                        n -= 1
                        part = part[:n]
                    if n > mx:
                        out.append(self._too_large(n, False))
                    elif n:
                        out.append(part)
            else:
                for part in parts:
                    n = len(part)
                    if n > mx:
                        out.append(self._too_large(n, False))
                    elif n:
                        out.append(part)
        if tail:
            size = len(buf) + len(tail)
            if size > mx + 1 or (size == mx + 1 and tail[-1] != _CR):
                out.append(self._too_large(size - (tail[-1] == _CR), True))
                buf.clear()
                self._discard = True
            else:
                buf += tail
        return out


class LengthPrefixDecoder:
    """4-byte big-endian unsigned length, then that many payload bytes.

    Zero-length frames are valid.  A declared length above ``max_size`` yields
    one ``too_large`` error; that many payload bytes are then skipped without
    being buffered.
    """

    __slots__ = ("_max", "_buf", "_skip")

    def __init__(self, max_size: int) -> None:
        self._max = _check_max(max_size)
        self._buf = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to drop

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (at most ``max_size + 3``)."""
        return len(self._buf)

    def _too_large(self, length: int) -> FrameError:
        return FrameError(
            "too_large", f"frame length {length} exceeds max_frame {self._max}"
        )

    def feed(self, data: bytes) -> list[bytes | FrameError]:
        """Consume a chunk; return complete frames and errors in stream order."""
        n = len(data)
        if not n:
            return []
        if type(data) is not bytes:
            data = bytes(data)
        mx = self._max
        buf = self._buf
        pos = 0
        skip = self._skip
        if skip:
            if n <= skip:
                self._skip = skip - n
                return []
            self._skip = 0
            pos = skip
        elif not buf and n >= 4:
            # Fast path: exactly one complete frame and nothing buffered.
            length = _unpack_from(data)[0]
            if n == 4 + length and length <= mx:
                return [data[4:]]

        out: list[bytes | FrameError] = []
        if buf:
            have = len(buf)
            if have < 4:
                take = min(4 - have, n - pos)
                buf += data[pos : pos + take]
                pos += take
                if len(buf) < 4:
                    return out
            length = _unpack_from(buf)[0]
            if length > mx:
                out.append(self._too_large(length))
                buf.clear()
                end = pos + length
                if end >= n:
                    self._skip = end - n
                    return out
                pos = end
            else:
                need = 4 + length - len(buf)
                if n - pos < need:
                    buf += data[pos:]
                    return out
                buf += data[pos : pos + need]
                pos += need
                del buf[:4]
                out.append(bytes(buf))
                buf.clear()

        unpack = _unpack_from
        last = n - 4
        while pos <= last:
            (length,) = unpack(data, pos)
            start = pos + 4
            pos = start + length
            if length > mx:
                out.append(self._too_large(length))
                if pos >= n:
                    self._skip = pos - n
                    return out
            elif pos <= n:
                out.append(data[start:pos])
            else:
                pos = start - 4
                break
        if pos < n:
            buf += data[pos:] if pos else data
        return out


def decode_datagram(data: bytes, max_size: int, *, strip_newline: bool) -> bytes | FrameError:
    """One frame per datagram; optionally strip one trailing ``\\n`` / ``\\r\\n``."""
    n = len(data)
    if strip_newline and n and data[-1] == 0x0A:
        n -= 2 if n > 1 and data[-2] == _CR else 1
        if n > max_size:
            return FrameError("too_large", f"datagram of {n} bytes exceeds max_frame {max_size}")
        return data[:n]
    if n > max_size:
        return FrameError("too_large", f"datagram of {n} bytes exceeds max_frame {max_size}")
    return data


class Framing:
    """A codec family (stream + datagram encoding); use the module constants."""

    __slots__ = ("name", "encoder", "datagram_encoder")

    name: str

    def __init__(self, name: str) -> None:
        self.name = name
        #: ``encode`` and ``encode_datagram`` bound once: every connection of a framing holds
        #: the same object (no bound method per connection; ``is`` tells two framings apart)
        self.encoder = self.encode
        self.datagram_encoder = self.encode_datagram

    def __repr__(self) -> str:
        return f"<Framing {self.name}>"

    def stream_decoder(self, max_size: int) -> LineDecoder | LengthPrefixDecoder:
        """A fresh decoder for one stream connection."""
        raise NotImplementedError

    def encode(self, payload: bytes) -> bytes:
        """Encode one frame for a stream."""
        raise NotImplementedError

    def decode_datagram(self, data: bytes, max_size: int) -> bytes | FrameError:
        """Decode one datagram into one frame."""
        raise NotImplementedError

    def encode_datagram(self, payload: bytes) -> bytes:
        """Encode one frame as one datagram."""
        raise NotImplementedError


class _LineFraming(Framing):
    __slots__ = ()

    def stream_decoder(self, max_size: int) -> LineDecoder:
        return LineDecoder(max_size)

    def encode(self, payload: bytes) -> bytes:
        """``payload + b"\\n"``.  Note: a trailing ``\\r`` or an empty payload
        does not round-trip (the decoder strips one / skips blank lines)."""
        if 10 in payload:  # b"\n" as an int: ten times faster than a bytes operand
            raise ValueError("line frame payload must not contain b'\\n'")
        return payload + b"\n"

    def decode_datagram(self, data: bytes, max_size: int) -> bytes | FrameError:
        return decode_datagram(data, max_size, strip_newline=True)

    def encode_datagram(self, payload: bytes) -> bytes:
        return payload + b"\n"


class _LengthFraming(Framing):
    __slots__ = ()

    def stream_decoder(self, max_size: int) -> LengthPrefixDecoder:
        return LengthPrefixDecoder(max_size)

    def encode(self, payload: bytes) -> bytes:
        """4-byte big-endian length header + payload."""
        n = len(payload)
        if n > _MAX_LENGTH:
            raise ValueError(f"payload of {n} bytes exceeds the 4-byte length limit")
        return _pack(n) + payload

    def decode_datagram(self, data: bytes, max_size: int) -> bytes | FrameError:
        return decode_datagram(data, max_size, strip_newline=False)

    def encode_datagram(self, payload: bytes) -> bytes:
        return payload


LINE: Framing = _LineFraming("line")
LENGTH: Framing = _LengthFraming("length")
FRAMINGS: dict[str, Framing] = {"line": LINE, "length": LENGTH}


def get_framing(name: str) -> Framing:
    """Look up a framing by name; ValueError names the valid choices."""
    try:
        return FRAMINGS[name]
    except (KeyError, TypeError):
        choices = ", ".join(repr(k) for k in FRAMINGS)
        raise ValueError(f"unknown framing {name!r}; choose one of {choices}") from None
