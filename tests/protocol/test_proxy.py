"""Tests for wirehub.protocol.proxy (PROXY protocol v1/v2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wirehub.protocol import PROXY_V2_SIGNATURE, FrameError, ProxyHeaderParser, ProxyInfo

SIG = PROXY_V2_SIGNATURE
assert SIG == b"\r\n\r\n\x00\r\nQUIT\n"


def v2(cmd=1, fam=1, proto=1, addr=b"", tlvs=b"", ver=2, length=None) -> bytes:
    body = addr + tlvs
    n = len(body) if length is None else length
    return SIG + bytes([(ver << 4) | cmd, (fam << 4) | proto]) + struct.pack(">H", n) + body


def v2_inet(src="192.0.2.1", dst="198.51.100.2", sport=51234, dport=443, **kw) -> bytes:
    addr = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack(">HH", sport, dport)
    )
    return v2(fam=1, addr=addr, **kw)


def v2_inet6(src="2001:db8::1", dst="2001:db8::2", sport=1, dport=65535, **kw) -> bytes:
    addr = (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack(">HH", sport, dport)
    )
    return v2(fam=2, addr=addr, **kw)


def tlv(t: int, value: bytes) -> bytes:
    return bytes([t]) + struct.pack(">H", len(value)) + value


TLVS = tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"\x00" * 5)


def parse(data: bytes, **kw):
    p = ProxyHeaderParser(**kw)
    return p.feed(data), p


def assert_bad(result):
    assert isinstance(result, FrameError), result
    assert result.code == "bad_frame"
    assert result.fatal is True


# (header, expected ProxyInfo)
VALID = [
    (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\r\n",
        ProxyInfo(1, False, ("192.0.2.1", 51234), ("198.51.100.2", 443)),
    ),
    (
        b"PROXY TCP6 2001:db8::1 2001:0db8:0:0:0:0:0:2 0 65535\r\n",
        ProxyInfo(1, False, ("2001:db8::1", 0), ("2001:db8::2", 65535)),
    ),
    (b"PROXY UNKNOWN\r\n", ProxyInfo(1, True, None, None)),
    (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyInfo(1, True, None, None),
    ),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 104 bytes: v1 worst case
        ProxyInfo(
            1,
            False,
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
    ),
    (v2_inet(), ProxyInfo(2, False, ("192.0.2.1", 51234), ("198.51.100.2", 443))),
    (
        v2_inet(proto=2, tlvs=TLVS),  # DGRAM + TLVs
        ProxyInfo(2, False, ("192.0.2.1", 51234), ("198.51.100.2", 443)),
    ),
    (v2_inet6(tlvs=TLVS), ProxyInfo(2, False, ("2001:db8::1", 1), ("2001:db8::2", 65535))),
    (v2(cmd=0, fam=0, proto=0), ProxyInfo(2, True, None, None)),
    (v2(cmd=0, fam=0, proto=0, tlvs=TLVS), ProxyInfo(2, True, None, None)),
    # LOCAL with an address block: addresses are ignored
    (v2_inet(cmd=0), ProxyInfo(2, True, None, None)),
    (v2(cmd=1, fam=0, proto=0), ProxyInfo(2, True, None, None)),  # PROXY + AF_UNSPEC
    (v2(cmd=1, fam=3, proto=1, addr=b"/tmp/a".ljust(216, b"\0")), ProxyInfo(2, False, None, None)),
]


@pytest.mark.parametrize("header,expected", VALID)
def test_valid_headers_in_one_chunk(header, expected):
    result, p = parse(header + b"GET / HTTP/1.1\r\n")
    assert result == expected
    assert p.remainder == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("header,expected", VALID)
def test_valid_headers_split_at_every_position(header, expected):
    payload = b"\x00app-data\r\n"
    data = header + payload
    for i in range(len(data) + 1):
        p = ProxyHeaderParser()
        first = p.feed(data[:i])
        if i < len(header):
            assert first is None, i
            assert p.feed(data[i:]) == expected
            assert p.remainder == payload
        else:
            assert first == expected
            assert p.remainder + data[i:] == payload


@pytest.mark.parametrize("header,expected", VALID)
def test_valid_headers_byte_by_byte(header, expected):
    p = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert p.feed(header[i : i + 1]) is None
    assert p.feed(header[-1:]) == expected
    assert p.remainder == b""


def test_empty_feed_needs_more():
    p = ProxyHeaderParser()
    assert p.feed(b"") is None
    assert p.feed(b"PRO") is None
    assert p.feed(b"") is None


def test_remainder_empty_before_result():
    p = ProxyHeaderParser()
    assert p.feed(b"PROXY TCP4") is None
    assert p.remainder == b""


def test_feed_after_result_raises():
    p = ProxyHeaderParser()
    assert isinstance(p.feed(b"PROXY UNKNOWN\r\n"), ProxyInfo)
    with pytest.raises(RuntimeError):
        p.feed(b"x")
    p = ProxyHeaderParser()
    assert isinstance(p.feed(b"GET /"), FrameError)
    with pytest.raises(RuntimeError):
        p.feed(b"x")


# ------------------------------------------------------------- early errors


@pytest.mark.parametrize("first", [b"G", b"\x16", b"\x00", b"p", b"\n", b"PROXy", b"PROXY\t", b"\r\n\r\n\x01"])
def test_decides_early_on_wrong_prefix(first):
    assert_bad(ProxyHeaderParser().feed(first))


def test_v2_bad_version_decided_at_byte_13():
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x11"))
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x31"))


def test_v2_bad_command_decided_at_byte_13():
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x22"))
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x2f"))


def test_v2_bad_family_or_proto_decided_at_byte_14():
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x21\x41"))
    assert_bad(ProxyHeaderParser().feed(SIG + b"\x21\x13"))


def test_v2_length_over_max_header_decided_at_byte_16():
    assert_bad(ProxyHeaderParser(max_header=100).feed(SIG + b"\x21\x11\x00\x65"))
    assert ProxyHeaderParser(max_header=100).feed(SIG + b"\x21\x11\x00\x64") is None


def test_v1_too_long_without_crlf():
    p = ProxyHeaderParser()
    assert p.feed(b"PROXY TCP4 " + b"1" * 95) is None  # 106 bytes
    assert_bad(p.feed(b"1"))  # 107 bytes, no CRLF
    data = b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n"
    assert_bad(ProxyHeaderParser().feed(data))


def test_v1_107_bytes_accepted():
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert parse(line)[0] == ProxyInfo(1, True, None, None)
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert_bad(parse(line)[0])


MALFORMED_V1 = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 51234 443\n",  # bare LF
    b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
    b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
    b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",  # double space
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",  # trailing space
    b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n",  # family mismatch
    b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n",  # family mismatch
    b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",  # leading zero octet
    b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n",  # scope id
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1_0 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 0x10 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 000001 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2  2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 \xd9\xa1 2\r\n",  # non-ASCII digit
    b"PROXY TCP4 192.0.2.1 198.51.100.\xff 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\r\n",
]


@pytest.mark.parametrize("data", MALFORMED_V1)
def test_malformed_v1(data):
    assert_bad(parse(data)[0])


MALFORMED_V2 = [
    v2(fam=1, addr=b"\x00" * 11),  # INET block too short
    v2(fam=2, addr=b"\x00" * 35),  # INET6 block too short
    v2(fam=3, addr=b"\x00" * 215),  # UNIX block too short
    v2_inet(ver=1),
    v2_inet(ver=3),
    v2_inet(cmd=2),
    v2(fam=4, addr=b"\x00" * 12),
    v2(fam=1, proto=3, addr=b"\x00" * 12),
    SIG[:-1] + b"X" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
]


@pytest.mark.parametrize("data", MALFORMED_V2)
def test_malformed_v2(data):
    assert_bad(parse(data)[0])


def test_v2_max_header():
    hdr = v2_inet(tlvs=b"\x00" * 100)
    assert isinstance(parse(hdr, max_header=112)[0], ProxyInfo)
    assert_bad(parse(hdr, max_header=111)[0])


def test_v2_incomplete_waits():
    hdr = v2_inet6(tlvs=TLVS)
    p = ProxyHeaderParser()
    assert p.feed(hdr[:-1]) is None
    assert isinstance(p.feed(hdr[-1:] + b"rest"), ProxyInfo)
    assert p.remainder == b"rest"


def test_error_message_mentions_proxy():
    r = parse(b"GET / HTTP/1.1\r\n")[0]
    assert_bad(r)
    assert "PROXY" in r.message


# ------------------------------------------------------------ property tests


def feed_until_result(chunks):
    """Feed chunks until a result; return (result, parser, unfed chunks)."""
    p = ProxyHeaderParser()
    for i, c in enumerate(chunks):
        r = p.feed(c)
        if r is not None:
            return r, p, chunks[i + 1 :]
    return None, p, []


def split_at(data: bytes, points) -> list[bytes]:
    cuts = sorted({q for q in points if 0 < q < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


prefixed_junk = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=250).map(lambda b: b"PROXY " + b),
    st.binary(max_size=250).map(lambda b: b"PROXY TCP4 " + b),
    st.binary(max_size=300).map(lambda b: SIG + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 300), st.binary(max_size=300)).map(
        lambda t: SIG + bytes([t[0], t[1]]) + struct.pack(">H", t[2]) + t[3]
    ),
)


@settings(max_examples=400, deadline=None)
@given(data=prefixed_junk, points=st.lists(st.integers(0, 400), max_size=10))
def test_prop_arbitrary_bytes_never_raise(data, points):
    r, p, rest = feed_until_result(split_at(data, points))
    assert r is None or isinstance(r, (ProxyInfo, FrameError))
    if isinstance(r, FrameError):
        assert r.code == "bad_frame" and r.fatal
    if isinstance(r, ProxyInfo):
        assert r.version in (1, 2)
        assert isinstance(p.remainder, bytes)
    if r is None:
        # undecided only while still a plausible prefix and within bounds
        assert len(data) < 16 + 4096


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@st.composite
def valid_header(draw):
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]))
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n", ProxyInfo(1, True, None, None)
    if kind == "v2-local":
        return v2(cmd=0, fam=0, proto=0, tlvs=draw(st.binary(max_size=50))), ProxyInfo(2, True, None, None)
    ip = ipv4 if kind.endswith("4") else ipv6
    src, dst, sp, dp = draw(ip), draw(ip), draw(port), draw(port)
    info = ProxyInfo(1 if kind.startswith("v1") else 2, False, (src, sp), (dst, dp))
    if kind.startswith("v1"):
        fam = b"TCP4" if kind.endswith("4") else b"TCP6"
        return b"PROXY %s %s %s %d %d\r\n" % (fam, src.encode(), dst.encode(), sp, dp), info
    build = v2_inet if kind.endswith("4") else v2_inet6
    return build(src, dst, sp, dp, proto=draw(st.sampled_from([1, 2])), tlvs=draw(st.binary(max_size=50))), info


@settings(max_examples=300, deadline=None)
@given(hv=valid_header(), tail=st.binary(max_size=200), points=st.lists(st.integers(0, 400), max_size=10))
def test_prop_valid_header_any_split(hv, tail, points):
    header, expected = hv
    r, p, rest = feed_until_result(split_at(header + tail, points))
    assert r == expected
    assert p.remainder + b"".join(rest) == tail
