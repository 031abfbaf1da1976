"""Tests for wirehub.protocol.framing."""

from __future__ import annotations

import struct
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirehub.protocol import (
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

# Exact bounds guaranteed between feed() calls.
LINE_SLACK = 1  # a trailing "\r" that may be half of "\r\n"
LENGTH_SLACK = 3  # 4-byte header + (max_size - 1) payload bytes


def hdr(n: int) -> bytes:
    return struct.pack(">I", n)


def feed_chunks(dec, chunks):
    out = []
    for c in chunks:
        out.extend(dec.feed(c))
    return out


def split_at(data: bytes, points) -> list[bytes]:
    cuts = sorted({p for p in points if 0 < p < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def summarize(items):
    """Frames as bytes, errors reduced to their code (messages may differ)."""
    return [x if isinstance(x, bytes) else ("err", x.code, x.fatal) for x in items]


# ---------------------------------------------------------------- LineDecoder


class TestLineDecoder:
    def test_simple_lines(self):
        d = LineDecoder(100)
        assert d.feed(b"hello\nworld\n") == [b"hello", b"world"]
        assert d.buffered == 0

    def test_single_frame_fast_path(self):
        d = LineDecoder(100)
        assert d.feed(b"hello\n") == [b"hello"]
        assert d.feed(b"hi\r\n") == [b"hi"]
        assert d.feed(b"\n") == []
        assert d.feed(b"\r\n") == []

    def test_crlf_stripped_once(self):
        d = LineDecoder(100)
        assert d.feed(b"a\r\nb\r\r\nc\n") == [b"a", b"b\r", b"c"]

    def test_cr_in_middle_kept(self):
        d = LineDecoder(100)
        assert d.feed(b"a\rb\nc\n") == [b"a\rb", b"c"]

    def test_blank_lines_skipped(self):
        d = LineDecoder(100)
        assert d.feed(b"\n\r\na\n\n\r\nb\n\n") == [b"a", b"b"]

    def test_partial_lines_buffered(self):
        d = LineDecoder(100)
        assert d.feed(b"hel") == []
        assert d.buffered == 3
        assert d.feed(b"lo\nwor") == [b"hello"]
        assert d.buffered == 3
        assert d.feed(b"ld") == []
        assert d.feed(b"\n") == [b"world"]
        assert d.buffered == 0

    def test_crlf_split_across_feeds(self):
        d = LineDecoder(100)
        assert d.feed(b"abc\r") == []
        assert d.feed(b"\n") == [b"abc"]
        assert d.feed(b"\r") == []
        assert d.feed(b"\n") == []  # blank CRLF line

    def test_empty_feed(self):
        d = LineDecoder(10)
        assert d.feed(b"") == []

    def test_accepts_bytearray_and_memoryview(self):
        d = LineDecoder(10)
        assert d.feed(bytearray(b"ab\n")) == [b"ab"]
        assert d.feed(memoryview(b"cd\nef\n")) == [b"cd", b"ef"]

    def test_line_exactly_max(self):
        d = LineDecoder(5)
        assert d.feed(b"12345\n") == [b"12345"]
        assert d.feed(b"12345\r\n") == [b"12345"]
        assert d.feed(b"x\n12345\r\n") == [b"x", b"12345"]

    def test_line_exactly_max_split_with_cr(self):
        d = LineDecoder(5)
        assert d.feed(b"12345\r") == []
        assert d.buffered == 6  # max_size + 1: the \r may be a terminator
        assert d.feed(b"\n") == [b"12345"]

    def test_max_plus_cr_then_more_is_too_large(self):
        d = LineDecoder(5)
        assert d.feed(b"12345\r") == []
        (err,) = d.feed(b"x")
        assert isinstance(err, FrameError) and err.code == "too_large"
        assert d.buffered == 0
        assert d.feed(b"yyy\nok\n") == [b"ok"]

    def test_complete_oversized_line_in_one_chunk(self):
        d = LineDecoder(5)
        out = d.feed(b"a\n123456\nb\n")
        assert out[0] == b"a"
        assert isinstance(out[1], FrameError)
        assert out[1].code == "too_large" and not out[1].fatal
        assert "6" in out[1].message and "max_frame 5" in out[1].message
        assert out[2] == b"b"

    def test_oversized_single_frame_fast_path(self):
        d = LineDecoder(5)
        (err,) = d.feed(b"123456\r\n")
        assert err.code == "too_large"
        assert d.feed(b"ok\n") == [b"ok"]

    def test_oversized_partial_reported_early_and_not_buffered(self):
        d = LineDecoder(10)
        assert d.feed(b"ok\n0123456789") == [b"ok"]
        assert d.buffered == 10
        out = d.feed(b"AB")
        assert len(out) == 1 and out[0].code == "too_large"
        assert "12+ bytes" in out[0].message
        assert d.buffered == 0
        # keeps discarding, never buffers, no further errors
        for _ in range(100):
            assert d.feed(b"z" * 1000) == []
            assert d.buffered == 0
        assert d.feed(b"zzz\nnext\npart") == [b"next"]
        assert d.buffered == 4
        assert d.feed(b"ial\n") == [b"partial"]

    def test_oversized_then_newline_in_next_chunk(self):
        d = LineDecoder(4)
        out = d.feed(b"abcdefgh")
        assert [e.code for e in out] == ["too_large"]
        assert d.feed(b"\n") == []
        assert d.feed(b"ok\n") == [b"ok"]

    def test_oversized_buffered_partial_completed(self):
        # partial within bound, completion pushes it over
        d = LineDecoder(5)
        assert d.feed(b"abc") == []
        out = d.feed(b"def\nxy\n")
        assert out[0].code == "too_large"
        assert out[1:] == [b"xy"]

    def test_message_format(self):
        d = LineDecoder(65536)
        (err,) = d.feed(b"x" * 70000)
        assert err.message == "line of 70000+ bytes exceeds max_frame 65536"

    def test_bad_max_size(self):
        with pytest.raises(ValueError):
            LineDecoder(0)
        with pytest.raises(ValueError):
            LengthPrefixDecoder(-1)
        for decoder in (LineDecoder, LengthPrefixDecoder):  # the same refusal compiled or not
            with pytest.raises(ValueError, match="at most"):
                decoder(sys.maxsize + 1)
            assert decoder(sys.maxsize).buffered == 0


# ------------------------------------------------------- LengthPrefixDecoder


class TestLengthPrefixDecoder:
    def test_single_frame(self):
        d = LengthPrefixDecoder(100)
        assert d.feed(hdr(5) + b"hello") == [b"hello"]
        assert d.buffered == 0

    def test_multiple_frames(self):
        d = LengthPrefixDecoder(100)
        data = hdr(1) + b"a" + hdr(2) + b"bc" + hdr(3) + b"def"
        assert d.feed(data) == [b"a", b"bc", b"def"]

    def test_zero_length_frames(self):
        d = LengthPrefixDecoder(100)
        assert d.feed(hdr(0)) == [b""]
        assert d.feed(hdr(0) + hdr(0) + hdr(1) + b"x") == [b"", b"", b"x"]

    def test_split_header_and_payload(self):
        d = LengthPrefixDecoder(100)
        data = hdr(5) + b"hello" + hdr(0)
        out = []
        for i in range(len(data)):
            out += d.feed(data[i : i + 1])
        assert out == [b"hello", b""]
        assert d.buffered == 0

    def test_partial_buffered_count(self):
        d = LengthPrefixDecoder(100)
        assert d.feed(hdr(10)[:2]) == []
        assert d.buffered == 2
        assert d.feed(hdr(10)[2:] + b"abc") == []
        assert d.buffered == 7
        assert d.feed(b"defghij" + hdr(1)) == [b"abcdefghij"]
        assert d.buffered == 4

    def test_frame_exactly_max(self):
        d = LengthPrefixDecoder(4)
        assert d.feed(hdr(4) + b"abcd") == [b"abcd"]
        assert d.feed(hdr(4) + b"abc") == []
        assert d.buffered == 4 + 3  # max_size + 3
        assert d.feed(b"d") == [b"abcd"]

    def test_oversized_skipped_in_one_chunk(self):
        d = LengthPrefixDecoder(4)
        data = hdr(1) + b"a" + hdr(6) + b"xxxxxx" + hdr(2) + b"ok"
        out = d.feed(data)
        assert out[0] == b"a"
        assert isinstance(out[1], FrameError)
        assert out[1].code == "too_large" and not out[1].fatal
        assert out[1].message == "frame length 6 exceeds max_frame 4"
        assert out[2] == b"ok"

    def test_oversized_skipped_across_chunks_without_buffering(self):
        d = LengthPrefixDecoder(10)
        out = d.feed(hdr(100_000) + b"x" * 10)
        assert [e.code for e in out] == ["too_large"]
        assert d.buffered == 0
        for _ in range(9):
            assert d.feed(b"y" * 11_109) == []
            assert d.buffered == 0
        # 10 + 9 * 11_109 = 99_991 skipped; 9 left
        assert d.feed(b"z" * 9 + hdr(2) + b"ok") == [b"ok"]

    def test_oversized_header_split(self):
        d = LengthPrefixDecoder(10)
        h = hdr(11)
        assert d.feed(h[:3]) == []
        out = d.feed(h[3:] + b"0123456789A" + hdr(0))
        assert [x if isinstance(x, bytes) else x.code for x in out] == ["too_large", b""]

    def test_oversized_skip_ends_at_chunk_boundary(self):
        d = LengthPrefixDecoder(2)
        assert [e.code for e in d.feed(hdr(3) + b"abc")] == ["too_large"]
        assert d.feed(hdr(1) + b"x") == [b"x"]

    def test_huge_declared_length(self):
        d = LengthPrefixDecoder(10)
        (err,) = d.feed(b"\xff\xff\xff\xff")
        assert err.code == "too_large"
        assert d.buffered == 0


# ----------------------------------------------------------------- datagrams


class TestDatagram:
    def test_strip_lf(self):
        assert decode_datagram(b"abc\n", 10, strip_newline=True) == b"abc"

    def test_strip_crlf(self):
        assert decode_datagram(b"abc\r\n", 10, strip_newline=True) == b"abc"

    def test_strip_only_one(self):
        assert decode_datagram(b"abc\n\n", 10, strip_newline=True) == b"abc\n"
        assert decode_datagram(b"abc\r\n\r\n", 10, strip_newline=True) == b"abc\r\n"

    def test_lone_cr_not_stripped(self):
        assert decode_datagram(b"abc\r", 10, strip_newline=True) == b"abc\r"

    def test_no_strip(self):
        assert decode_datagram(b"abc\r\n", 10, strip_newline=False) == b"abc\r\n"

    def test_empty(self):
        assert decode_datagram(b"", 10, strip_newline=True) == b""
        assert decode_datagram(b"\n", 10, strip_newline=True) == b""
        assert decode_datagram(b"\r\n", 10, strip_newline=True) == b""

    def test_too_large(self):
        r = decode_datagram(b"x" * 11, 10, strip_newline=False)
        assert isinstance(r, FrameError) and r.code == "too_large"
        assert "max_frame 10" in r.message

    def test_size_after_strip(self):
        assert decode_datagram(b"x" * 10 + b"\r\n", 10, strip_newline=True) == b"x" * 10
        r = decode_datagram(b"x" * 11 + b"\n", 10, strip_newline=True)
        assert isinstance(r, FrameError)
        r = decode_datagram(b"x" * 10 + b"\n", 10, strip_newline=False)
        assert isinstance(r, FrameError)

    def test_framing_datagram_methods(self):
        assert LINE.decode_datagram(b"hi\r\n", 10) == b"hi"
        assert LENGTH.decode_datagram(b"hi\r\n", 10) == b"hi\r\n"
        assert LINE.encode_datagram(b"hi") == b"hi\n"
        assert LENGTH.encode_datagram(b"hi") == b"hi"


# ------------------------------------------------------------------ Framing


class TestFraming:
    def test_registry(self):
        assert FRAMINGS == {"line": LINE, "length": LENGTH}
        assert LINE.name == "line" and LENGTH.name == "length"
        assert isinstance(LINE, Framing) and isinstance(LENGTH, Framing)
        assert get_framing("line") is LINE
        assert get_framing("length") is LENGTH

    def test_get_framing_error(self):
        with pytest.raises(ValueError) as exc:
            get_framing("json")
        msg = str(exc.value)
        assert "'json'" in msg and "'line'" in msg and "'length'" in msg
        with pytest.raises(ValueError):
            get_framing(None)  # type: ignore[arg-type]

    def test_stream_decoder_types(self):
        assert isinstance(LINE.stream_decoder(10), LineDecoder)
        assert isinstance(LENGTH.stream_decoder(10), LengthPrefixDecoder)
        assert LINE.stream_decoder(10) is not LINE.stream_decoder(10)

    def test_line_encode(self):
        assert LINE.encode(b"abc") == b"abc\n"
        assert LINE.encode(b"") == b"\n"

    def test_line_encode_rejects_newline(self):
        with pytest.raises(ValueError):
            LINE.encode(b"a\nb")
        with pytest.raises(ValueError):
            LINE.encode(b"\n")

    def test_length_encode(self):
        assert LENGTH.encode(b"abc") == b"\x00\x00\x00\x03abc"
        assert LENGTH.encode(b"") == b"\x00\x00\x00\x00"

    def test_length_encode_too_large(self):
        class Huge(bytes):
            def __len__(self):
                return 2**32

        with pytest.raises(ValueError):
            LENGTH.encode(Huge())

    def test_roundtrip(self):
        for fr in (LINE, LENGTH):
            d = fr.stream_decoder(100)
            assert d.feed(b"".join(fr.encode(p) for p in (b"a", b"bc"))) == [b"a", b"bc"]


# ------------------------------------------------------------ property tests

line_payload = (
    st.binary(min_size=1, max_size=40)
    .map(lambda b: b.replace(b"\n", b"x").rstrip(b"\r"))
    .filter(bool)
)
split_points = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)


def line_oracle(stream: bytes, mx: int):
    """Reference model of LineDecoder when fed ``stream`` in any split."""
    *lines, tail = stream.split(b"\n")
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > mx:
            out.append(("err", "too_large", False))
        elif line:
            out.append(line)
    if len(tail) > mx + 1 or (len(tail) == mx + 1 and not tail.endswith(b"\r")):
        out.append(("err", "too_large", False))
    return out


def length_oracle(stream: bytes, mx: int):
    """Reference model of LengthPrefixDecoder."""
    out, pos = [], 0
    while len(stream) - pos >= 4:
        (n,) = struct.unpack_from(">I", stream, pos)
        if n > mx:
            out.append(("err", "too_large", False))
        elif pos + 4 + n <= len(stream):
            out.append(stream[pos + 4 : pos + 4 + n])
        else:
            break
        pos += 4 + n
    return out


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(
        st.tuples(line_payload, st.sampled_from([b"\n", b"\r\n"]), st.sampled_from([b"", b"\n", b"\r\n"])),
        max_size=20,
    ),
    data=st.data(),
)
def test_prop_line_roundtrip_any_split(frames, data):
    stream = b"".join(p + term + blank for p, term, blank in frames)
    points = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=20))
    mx = max((len(p) for p, _, _ in frames), default=1)
    d = LineDecoder(mx)
    assert feed_chunks(d, split_at(stream, points)) == [p for p, _, _ in frames]
    assert d.buffered == 0


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(max_size=40), max_size=20), data=st.data())
def test_prop_length_roundtrip_any_split(frames, data):
    stream = b"".join(LENGTH.encode(p) for p in frames)
    points = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=20))
    mx = max((len(p) for p in frames), default=1) or 1
    d = LengthPrefixDecoder(mx)
    assert feed_chunks(d, split_at(stream, points)) == frames
    assert d.buffered == 0


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(line_payload, max_size=20), data=st.data())
def test_prop_line_encode_roundtrip(frames, data):
    stream = b"".join(LINE.encode(p) for p in frames)
    points = data.draw(split_points)
    d = LINE.stream_decoder(64)
    assert feed_chunks(d, split_at(stream, points)) == frames


def _check_robust(dec, chunks, mx, slack, oracle, stream):
    out = []
    for c in chunks:
        items = dec.feed(c)  # must not raise
        assert isinstance(items, list)
        for it in items:
            assert isinstance(it, (bytes, FrameError))
            if isinstance(it, bytes):
                assert len(it) <= mx
            else:
                assert it.code == "too_large" and not it.fatal
        assert dec.buffered <= mx + slack
        out.extend(items)
    assert summarize(out) == oracle(stream, mx)
    return out


byteish = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"\n", b"\r", b"\r\n", b"a", b"bb", b"\x00", b"\xff"]), max_size=80
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(stream=byteish, mx=st.integers(1, 20), data=st.data())
def test_prop_line_arbitrary_bytes(stream, mx, data):
    chunks = split_at(stream, data.draw(split_points))
    out = _check_robust(LineDecoder(mx), chunks, mx, LINE_SLACK, line_oracle, stream)
    for it in out:
        if isinstance(it, bytes):
            assert it and b"\n" not in it


length_stream = st.binary(max_size=300) | st.lists(
    st.tuples(st.integers(0, 40), st.binary(max_size=40)).map(lambda t: hdr(t[0]) + t[1]),
    max_size=20,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(stream=length_stream, mx=st.integers(1, 30), data=st.data())
def test_prop_length_arbitrary_bytes(stream, mx, data):
    chunks = split_at(stream, data.draw(split_points))
    _check_robust(LengthPrefixDecoder(mx), chunks, mx, LENGTH_SLACK, length_oracle, stream)


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.tuples(st.booleans(), line_payload, st.integers(1, 60)), max_size=20),
    mx=st.integers(1, 20),
    data=st.data(),
)
def test_prop_line_mixed_oversized(items, mx, data):
    """Valid lines after an oversized line's newline are still delivered, in order."""
    expected, n_err, parts = [], 0, []
    for oversized, payload, extra in items:
        if oversized:
            parts.append(b"o" * (mx + extra) + b"\n")
            n_err += 1
        else:
            p = payload[:mx].rstrip(b"\r") or b"v"
            parts.append(p + b"\r\n")
            expected.append(p)
    stream = b"".join(parts)
    d = LineDecoder(mx)
    out = feed_chunks(d, split_at(stream, data.draw(split_points)))
    assert [x for x in out if isinstance(x, bytes)] == expected
    assert sum(isinstance(x, FrameError) for x in out) == n_err
    assert d.buffered == 0


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.tuples(st.booleans(), st.binary(max_size=30), st.integers(1, 60)), max_size=20),
    mx=st.integers(1, 30),
    data=st.data(),
)
def test_prop_length_mixed_oversized(items, mx, data):
    """Oversized frames are skipped exactly; surrounding valid frames survive."""
    expected, n_err, parts = [], 0, []
    for oversized, payload, extra in items:
        if oversized:
            parts.append(hdr(mx + extra) + b"\x00\xff" * ((mx + extra) // 2) + b"x" * ((mx + extra) % 2))
            n_err += 1
        else:
            p = payload[:mx]
            parts.append(hdr(len(p)) + p)
            expected.append(p)
    stream = b"".join(parts)
    d = LengthPrefixDecoder(mx)
    out = feed_chunks(d, split_at(stream, data.draw(split_points)))
    assert summarize(out) == summarize(
        [FrameError("too_large", "", False) if o else p[:mx] for o, p, _ in items]
    )
    assert [x for x in out if isinstance(x, bytes)] == expected
    assert sum(isinstance(x, FrameError) for x in out) == n_err
    assert d.buffered == 0
