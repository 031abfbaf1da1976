"""The PROXY protocol header parser on any input.

tests/protocol/test_proxy.py already feeds it junk (never raises, decides within bounds) and
valid headers split anywhere. This adds: the decision does not depend on how the bytes were
cut (one chunk or many give the same result and the same remainder), for headers with a
byte changed, inserted or removed and for any ``max_header``.
"""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from wirehub.protocol import FrameError, ProxyHeaderParser, ProxyInfo

from ..protocol.test_proxy import SIG, split_at, valid_header
from . import fuzz


@st.composite
def damaged_header(draw) -> bytes:
    header, _ = draw(valid_header())
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(header)))
        byte = bytes([draw(st.integers(0, 255) | st.sampled_from([0x0D, 0x0A, 0x20, 0x3A, 0x2E]))])
        how = draw(st.sampled_from(["replace", "insert", "delete"]))
        if how == "replace" and i < len(header):
            header = header[:i] + byte + header[i + 1 :]
        elif how == "insert":
            header = header[:i] + byte + header[i:]
        else:
            header = header[:i] + header[i + 1 :]
    return header


inputs = st.tuples(
    damaged_header()
    | st.binary(max_size=120).map(lambda b: b"PROXY " + b)
    | st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 5000), st.binary(max_size=120)).map(
        lambda t: SIG + bytes(t[:2]) + struct.pack(">H", t[2]) + t[3]
    ),
    st.binary(max_size=60),
).map(lambda t: t[0] + t[1])


def decide(chunks: list[bytes], max_header: int):
    """Feed until the parser decides: (result, remainder plus what was not fed)."""
    parser = ProxyHeaderParser(max_header=max_header)
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)  # never raises on any bytes
        if result is not None:
            rest = parser.remainder if isinstance(result, ProxyInfo) else b""
            return result, rest + b"".join(chunks[i + 1 :])
    return None, b""


def outcome(result):
    if isinstance(result, FrameError):
        assert result.code == "bad_frame" and result.fatal and "PROXY" in result.message
        return "refused"
    return result


@fuzz(400, deadline_ms=500)
@given(data=inputs, points=st.lists(st.integers(0, 300), max_size=12), max_header=st.sampled_from([0, 12, 36, 216, 4096]))
def test_any_split_decides_as_one_chunk(data, points, max_header):
    whole, whole_rest = decide([data], max_header)
    split, split_rest = decide(split_at(data, points), max_header)
    assert outcome(split) == outcome(whole)
    if isinstance(whole, ProxyInfo):
        assert split_rest == whole_rest and data.endswith(whole_rest)
        assert whole.version in (1, 2)
        for address in (whole.source, whole.destination):
            assert address is None or (isinstance(address[0], str) and 0 <= address[1] <= 65535)
    if whole is None:  # still undecided: a plausible prefix, within the bounds
        assert len(data) < 16 + max(max_header, 0) or len(data) < 108
