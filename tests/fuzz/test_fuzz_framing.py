"""The frame decoders on any input, both implementations: the Python code and, where the
accelerator is built, its compiled copy, which must agree byte for byte.

tests/protocol/test_framing.py already checks each decoder against a reference model for
small ``max_size`` values (any split, oversize, arbitrary bytes). This adds what it does not
cover: the two implementations against each other, realistic and extreme ``max_size``
values, chunks given as ``bytearray``/``memoryview`` (as transports may), and the datagram
decoder.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wirehub.protocol import _framing as pure
from wirehub.protocol import framing

from . import fuzz

IMPLS = [pytest.param(pure, id="python")]
if framing.ACCELERATOR == "compiled":
    IMPLS.append(pytest.param(framing._impl, id="compiled"))

max_sizes = st.sampled_from([1, 2, 3, 4, 5, 7, 64, 1000, 65536, 2**31 - 1]) | st.integers(1, 300)


def hdr(n: int) -> bytes:
    return struct.pack(">I", n)


line_stream = st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"bb", b"\x00", b"\xff", b"x" * 70, b"y" * 1001]), max_size=60
).map(b"".join) | st.binary(max_size=500)
length_stream = st.lists(
    st.tuples(st.integers(0, 1100) | st.sampled_from([2**31, 2**32 - 1]), st.binary(max_size=80)).map(lambda t: hdr(t[0]) + t[1]),
    max_size=12,
).map(b"".join) | st.binary(max_size=500)


def chunked(data: bytes, points: list[int], kinds: list[int]) -> list:
    """``data`` cut at ``points``; each chunk as bytes, bytearray or memoryview."""
    cuts = sorted({p for p in points if 0 < p < len(data)})
    bounds = [0, *cuts, len(data)]
    out = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        kind = kinds[i % len(kinds)] if kinds else 0
        piece = data[a:b]
        out.append(piece if kind == 0 else bytearray(piece) if kind == 1 else memoryview(piece))
    return out


def run(decoder, chunks) -> list:
    out = []
    for chunk in chunks:
        items = decoder.feed(chunk)  # never raises on peer input
        assert isinstance(items, list)
        out.extend(items)
    return out


def summary(impl, items, max_size: int, messages: bool = False) -> list:
    """Frames as bytes, errors as their code (with ``messages``, their text too: a partial
    oversized line's size in it depends on where the stream was cut)."""
    out = []
    for item in items:
        if isinstance(item, impl.FrameError):
            assert item.code == "too_large" and not item.fatal, item
            out.append(("err", item.code, item.message if messages else ""))
        else:
            assert type(item) is bytes and len(item) <= max_size
            out.append(item)
    return out


splits = st.lists(st.integers(0, 2000), max_size=25)
chunk_kinds = st.lists(st.integers(0, 2), max_size=5)


@pytest.mark.parametrize("impl", IMPLS)
@fuzz(200, deadline_ms=1000)
@given(stream=line_stream, mx=max_sizes, points=splits, kinds=chunk_kinds)
def test_line_decoder_any_split_gives_the_frames_of_one_chunk(impl, stream, mx, points, kinds):
    whole = summary(impl, impl.LineDecoder(mx).feed(stream), mx)
    decoder = impl.LineDecoder(mx)
    assert summary(impl, run(decoder, chunked(stream, points, kinds)), mx) == whole
    assert decoder.buffered <= min(mx + 1, len(stream))
    assert all(b"\n" not in f for f in whole if isinstance(f, bytes))


@pytest.mark.parametrize("impl", IMPLS)
@fuzz(200, deadline_ms=1000)
@given(stream=length_stream, mx=max_sizes, points=splits, kinds=chunk_kinds)
def test_length_decoder_any_split_gives_the_frames_of_one_chunk(impl, stream, mx, points, kinds):
    whole = summary(impl, impl.LengthPrefixDecoder(mx).feed(stream), mx)
    decoder = impl.LengthPrefixDecoder(mx)
    assert summary(impl, run(decoder, chunked(stream, points, kinds)), mx) == whole
    assert decoder.buffered <= min(mx + 3, len(stream))


@pytest.mark.parametrize("impl", IMPLS)
@fuzz(200, deadline_ms=500)
@given(data=st.binary(max_size=300), mx=max_sizes)
def test_datagram_decoder_never_raises(impl, data, mx):
    for strip in (True, False):
        got = impl.decode_datagram(data, mx, strip_newline=strip)
        if isinstance(got, impl.FrameError):
            assert got.code == "too_large"
        else:
            assert len(got) <= mx and data.startswith(got)


@pytest.mark.skipif(len(IMPLS) < 2, reason="the accelerator is not built here")
@fuzz(200, deadline_ms=1000)
@given(line=line_stream, length=length_stream, mx=max_sizes, points=splits)
def test_compiled_and_python_decoders_agree(line, length, mx, points):
    compiled = framing._impl
    for make, stream in (("LineDecoder", line), ("LengthPrefixDecoder", length)):
        a = summary(pure, run(getattr(pure, make)(mx), chunked(stream, points, [0])), mx, messages=True)
        b = summary(compiled, run(getattr(compiled, make)(mx), chunked(stream, points, [0])), mx, messages=True)
        assert a == b, make
    for strip in (True, False):
        a, b = pure.decode_datagram(line, mx, strip_newline=strip), compiled.decode_datagram(line, mx, strip_newline=strip)
        assert (a if isinstance(a, bytes) else a.message) == (b if isinstance(b, bytes) else b.message)
