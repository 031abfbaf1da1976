"""The WebSocket upgrade and frame decoder, without sockets (wirehub.protocol.websocket)."""

from __future__ import annotations

import base64

import pytest

from wirehub.protocol.framing import FrameError
from wirehub.protocol.websocket import (
    MAX_UPGRADE_HEADERS,
    Close,
    Ping,
    ProtocolError,
    WebSocketDecoder,
    accept_key,
    parse_upgrade,
    unmask,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3
MASK = b"\x37\xfa\x21\x3d"


def request(*lines: bytes, request_line: bytes = b"GET /chat?x=1 HTTP/1.1") -> bytes:
    base = {b"Host": b"example.com", b"Upgrade": b"websocket", b"Connection": b"Upgrade",
            b"Sec-WebSocket-Key": KEY, b"Sec-WebSocket-Version": b"13"}
    for line in lines:
        name, _, value = line.partition(b": ")
        if value:
            base[name] = value
        else:
            base.pop(name, None)
    return b"\r\n".join([request_line] + [k + b": " + v for k, v in base.items()])


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


# ----------------------------------------------------------------------------- the upgrade


def test_a_valid_upgrade_gets_101_with_the_accept_key():
    ok, response, why = parse_upgrade(request())
    assert ok and why == ""
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and response.endswith(b"\r\n\r\n")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"Sec-WebSocket-Extensions" not in response and b"Sec-WebSocket-Protocol" not in response
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_header_names_and_tokens_are_case_insensitive():
    ok, _, _ = parse_upgrade(request(b"Upgrade: WebSocket", b"Connection: keep-alive, UPGRADE").lower()
                             .replace(b"get /chat?x=1 http/1.1", b"GET / HTTP/1.1")
                             .replace(KEY.lower(), KEY))
    assert ok


@pytest.mark.parametrize("head, code, extra", [
    (request(request_line=b"POST / HTTP/1.1"), 405, b"Allow: GET"),
    (request(request_line=b"GET / HTTP/1.0"), 400, b""),
    (request(request_line=b"GET /"), 400, b""),
    (request(request_line=b"\x16\x03\x01 garbage"), 400, b""),
    (request(b"Host"), 400, b""),
    (request(b"Upgrade"), 426, b"Upgrade: websocket"),
    (request(b"Upgrade: h2c"), 426, b"Upgrade: websocket"),
    (request(b"Connection: keep-alive"), 400, b""),
    (request(b"Sec-WebSocket-Version: 8"), 426, b"Sec-WebSocket-Version: 13"),
    (request(b"Sec-WebSocket-Version"), 426, b"Sec-WebSocket-Version: 13"),
    (request(b"Sec-WebSocket-Key"), 400, b""),
    (request(b"Sec-WebSocket-Key: " + base64.b64encode(b"short")), 400, b""),
    (request(b"Sec-WebSocket-Key: not base64!"), 400, b""),
    (request(b"Content-Length: 5"), 400, b""),
    (request(b"Transfer-Encoding: chunked"), 400, b""),
    (request() + b"\r\n folded continuation", 400, b""),
    (request() + b"\r\nno colon here", 400, b""),
    (request() + b"\r\nName : space before the colon", 400, b""),
    (request() + b"".join(b"\r\nX-%d: y" % i for i in range(MAX_UPGRADE_HEADERS)), 431, b""),
])
def test_an_invalid_upgrade_gets_an_http_error_that_says_why(head, code, extra):
    ok, response, why = parse_upgrade(head)
    assert not ok and why
    assert status(response) == code, response
    assert extra in response and b"\r\nConnection: close\r\n" in response
    head_part, _, body = response.partition(b"\r\n\r\n")
    assert body == why.encode() + b"\n" and b"Content-Length: %d\r\n" % len(body) in head_part


def test_two_keys_are_refused():
    ok, response, _ = parse_upgrade(request() + b"\r\nSec-WebSocket-Key: " + KEY)
    assert not ok and status(response) == 400


# ----------------------------------------------------------------------------- frames


def decoder(max_size: int = 100) -> WebSocketDecoder:
    return WebSocketDecoder(max_size, 4 * max_size)


def kinds(items: list) -> list:
    out = []
    for item in items:
        if isinstance(item, bytes):
            out.append(item)
        elif isinstance(item, Ping):
            out.append(("ping", item.payload))
        elif isinstance(item, Close):
            out.append(("close", item.code, item.reason))
        elif isinstance(item, ProtocolError):
            out.append(("error", item.code))
        else:
            assert isinstance(item, FrameError)
            out.append(("too_large", item.code))
    return out


def test_unmask_is_its_own_inverse_and_keeps_leading_zero_bytes():
    data = b"\x00\x00abc\x00" * 7
    assert unmask(unmask(data, MASK), MASK) == data
    assert unmask(data, b"\0\0\0\0") == data and unmask(b"", MASK) == b""


def test_messages_pings_pongs_and_a_close():
    d = decoder()
    wire = (client_frame(0x1, b"hello") + client_frame(0x2, b"\x00\xff") + client_frame(0x9, b"p")
            + client_frame(0xA, b"ignored") + client_frame(0x1, b"") + client_frame(0x8, (1000).to_bytes(2, "big") + b"bye")
            + client_frame(0x1, b"after the close"))
    assert kinds(d.feed(wire)) == [b"hello", b"\x00\xff", ("ping", b"p"), b"", ("close", 1000, "bye")]
    assert d.feed(client_frame(0x1, b"more")) == []  # nothing is read after a close


def test_fragments_with_a_ping_between_are_joined():
    d = decoder()
    wire = (client_frame(0x1, "hé".encode()[:2], fin=False) + client_frame(0x9, b"p")
            + client_frame(0x0, "hé".encode()[2:], fin=False) + client_frame(0x0, b"!"))
    assert kinds(d.feed(wire)) == [("ping", b"p"), "hé!".encode()]
    assert d.buffered == 0


def test_empty_continuation_frames_hold_nothing_more():
    """A peer that keeps a message open with empty continuation frames (6 bytes each) makes the
    decoder hold only the message's bytes: nothing grows per frame."""
    d = decoder()
    assert d.feed(client_frame(0x1, b"abc", fin=False)) == []
    held = d.buffered
    for _ in range(20):
        assert d.feed(client_frame(0x0, b"", fin=False) * 5_000) == []
        assert d.buffered == held == 3
    assert d.feed(client_frame(0x0, b"d")) == [b"abcd"]
    assert d.buffered == 0


def test_every_length_form_in_one_byte_reads():
    d = decoder(70000)
    payloads = [b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
    wire = b"".join(client_frame(0x2, p) for p in payloads)
    got = []
    for i in range(0, len(wire), 1000):
        got += d.feed(wire[i : i + 1000])
        assert d.buffered < 66000
    assert got == payloads


def test_a_message_over_max_size_is_refused_and_the_next_one_read():
    d = decoder(10)
    assert kinds(d.feed(client_frame(0x1, b"x" * 11) + client_frame(0x1, b"ok"))) == [("too_large", "too_large"), b"ok"]
    parts = client_frame(0x1, b"x" * 6, fin=False) + client_frame(0x0, b"x" * 6)
    assert kinds(d.feed(parts + client_frame(0x1, b"ok"))) == [("too_large", "too_large"), b"ok"]


def test_beyond_the_hard_limit_is_refused_from_the_header_alone():
    d = decoder(10)  # hard limit 40
    head = client_frame(0x2, b"x" * 41)[:8]  # header and mask only: the payload never came
    (error,) = d.feed(head)
    assert isinstance(error, ProtocolError) and error.code == 1009 and "41" in error.message
    d = decoder(10)
    assert d.feed(client_frame(0x2, b"x" * 30, fin=False)) == []
    assert kinds(d.feed(client_frame(0x0, b"x" * 11)[:8])) == [("error", 1009)]
    d = decoder(10)  # a 64-bit length beyond anything: no overflow, the same refusal
    assert kinds(d.feed(b"\x82\xff\x7f" + b"\xff" * 7 + MASK)) == [("error", 1009)]
    d = decoder(10)  # its most significant bit may not be set
    assert kinds(d.feed(b"\x82\xff\x80" + b"\0" * 7 + MASK)) == [("error", 1002)]


@pytest.mark.parametrize("wire, code", [
    (client_frame(0x1, b"x", rsv=0x40), 1002),
    (client_frame(0x1, b"x", rsv=0x10), 1002),
    (client_frame(0x1, b"x", masked=False), 1002),
    (client_frame(0x3, b"x"), 1002),
    (client_frame(0xB, b"x"), 1002),
    (client_frame(0x0, b"x"), 1002),
    (client_frame(0x1, b"x", fin=False) + client_frame(0x2, b"y"), 1002),
    (client_frame(0x9, b"x", fin=False), 1002),
    (client_frame(0x9, b"x" * 126), 1002),
    (client_frame(0x1, b"\xff"), 1007),
    (client_frame(0x1, b"\xc3", fin=False) + client_frame(0x0, b"\x28"), 1007),
    (client_frame(0x8, b"\x03"), 1002),
    (client_frame(0x8, (999).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (1005).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (1015).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (2999).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (5000).to_bytes(2, "big")), 1002),
    (client_frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),
])
def test_protocol_errors_carry_their_close_code_and_end_the_stream(wire, code):
    d = decoder()
    items = d.feed(client_frame(0x1, b"before") + wire + client_frame(0x1, b"after"))
    assert kinds(items) == [b"before", ("error", code)]
    assert d.feed(client_frame(0x1, b"later")) == [] and d.buffered == 0


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999])
def test_valid_close_codes(code):
    assert kinds(decoder().feed(client_frame(0x8, code.to_bytes(2, "big")))) == [("close", code, "")]


def test_a_close_without_a_body_is_1005():
    assert kinds(decoder().feed(client_frame(0x8))) == [("close", 1005, "")]


def test_messages_only_says_whether_a_read_had_control_items():
    d = decoder()
    d.feed(client_frame(0x1, b"a") + client_frame(0x1, b"x" * 101))
    assert d.messages_only
    d.feed(client_frame(0x9))
    assert not d.messages_only
    d.feed(client_frame(0x1, b"a"))
    assert d.messages_only
