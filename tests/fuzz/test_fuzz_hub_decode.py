"""The hub's JSON command decoder (``wirehub.hub.protocol.decode``) on any input: it never
raises, and it returns either a command that honours the protocol's own rules or a
``ProtocolError`` with one of its two codes."""

from __future__ import annotations

import json

from hypothesis import example, given
from hypothesis import strategies as st

from wirehub.hub import protocol
from wirehub.hub.protocol import OPS, Command, ProtocolError, Pub, Send, data_bytes, decode

from . import fuzz, mutate

COMMANDS = Command.__args__  # the command classes

json_scalar = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["op", "ref", "room", "data", "to", "token", "name", "since", "epoch", "limit"]) | st.text(max_size=6)


@st.composite
def command_like(draw) -> bytes:
    """JSON objects shaped like commands: a known (or nearly known) op, the protocol's field
    names with values of any type, sometimes the right type."""
    obj = {"op": draw(st.sampled_from(sorted(OPS)) | st.text(max_size=10) | json_value)}
    for name in draw(st.lists(field_names, max_size=6)):
        obj[name] = draw(json_value | st.text(min_size=0, max_size=250))
    if draw(st.booleans()):
        obj.pop("op")
    text = json.dumps(obj, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])), ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # a newline between tokens, as a pretty-printer would put it
        text = text.replace(", ", ",\n")
    return text.encode()


@st.composite
def mutated(draw) -> bytes:
    """A valid command with a byte changed, inserted or removed."""
    base = draw(st.sampled_from([
        b'{"op":"ping"}', b'{"op":"ping","ref":7}', b'{"op":"hello","token":"t","name":"n"}',
        b'{"op":"join","room":"r","since":3,"epoch":"e"}', b'{"op":"pub","room":"r","data":{"a":[1,2,"x"]}}',
        b'{"op":"send","to":"abc.1","data":"hi"}', b'{"op":"history","room":"r","limit":10}',
        b'{"op":"leave","room":"r"}', b'{"op":"presence","room":"r"}', b'{"op":"refresh","token":"t"}',
    ]))
    return mutate(draw, base)


frames = (
    st.binary(max_size=300)
    | command_like()
    | mutated()
    | st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)  # nesting: RecursionError's path
    | st.integers(1, 5000).map(lambda n: b'{"op":"pub","room":"r","data":' + b"[" * n + b"]" * n + b"}")
    | st.binary(max_size=40).map(lambda b: b'{"op":"pub","room":"r","data":"' + b + b'"}')  # raw bytes in a string
)


def check(frame: bytes) -> None:
    result = decode(frame)  # must not raise
    if isinstance(result, ProtocolError):
        assert result.code in ("bad_frame", "unknown_op"), result
        assert isinstance(result.message, str) and result.message
        assert result.ref is None or (type(result.ref) in (int, str)), result.ref
        return
    assert type(result) in COMMANDS, result
    assert result.ref is None or type(result.ref) in (int, str)
    room = getattr(result, "room", None)
    if room is not None:
        assert isinstance(room, str) and 0 < len(room) <= protocol.MAX_ROOM_LENGTH
    if type(result) is Send:
        assert isinstance(result.to, str) and result.to
    if type(result) in (Pub, Send):
        data = data_bytes(result.data)  # must not raise either
        if isinstance(data, bytes):
            assert b"\n" not in data  # a newline would end the frame on a line-framed socket
            data.decode()  # relayed only as UTF-8
            json.loads(data)  # and still JSON
        else:
            assert isinstance(data, str) and data


@fuzz(500, deadline_ms=500)
@given(frame=frames)
@example(frame=b"")
@example(frame=b'{"op":"ping","ref":true}')
@example(frame=b'{"op":"pub","room":"r","data":"\xff"}')
@example(frame=b'{"op":"pub","room":"r","data":[1,\n2]}')
@example(frame=b'{"op":"join","room":""}')
@example(frame=b'{"op":"send","to":"","data":1}')
def test_decode_never_raises_and_returns_a_command_or_an_error(frame):
    check(frame)
    assert decode(frame) == decode(bytes(frame))  # deterministic, and takes bytes as they come
