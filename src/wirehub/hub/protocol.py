"""The hub wire protocol, sans-I/O: client frames in, typed commands or errors out; server
frames as bytes.

Every frame is one JSON object. Decoding never raises: a frame that is not JSON, not an
object, or has a field of the wrong type is a :class:`ProtocolError` with code ``bad_frame``;
an unknown ``op`` is ``unknown_op``. Unknown fields are ignored. ``data`` values are kept as
the raw JSON the client sent (``msgspec.Raw``), so a publication is never re-encoded.
"""

from __future__ import annotations

import re
from typing import Annotated, Union

import msgspec

Ref = Union[int, str, None]

MAX_ROOM_LENGTH = 200
MAX_NAME_LENGTH = 64

#: checked by the decoder itself (in C), with the messages ``_explain`` gives
RoomName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ROOM_LENGTH)]
ClientId = Annotated[str, msgspec.Meta(min_length=1)]
MAX_METHOD_LENGTH = 200
MethodName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_METHOD_LENGTH)]


#: ``data`` a client left out (an optional ``data`` is raw JSON like a given one)
NULL = msgspec.Raw(b"null")


class _Frame(msgspec.Struct, tag_field="op", kw_only=True):
    ref: int | str | None = None


class Hello(_Frame, tag="hello"):
    token: str | None = None
    name: str | None = None
    data: msgspec.Raw = NULL  # for the application's on_connect hook


class Join(_Frame, tag="join"):
    room: RoomName
    since: int | None = None
    epoch: str | None = None
    data: msgspec.Raw = NULL  # for the application's on_join hook


class Leave(_Frame, tag="leave"):
    room: RoomName


class Pub(_Frame, tag="pub"):
    room: RoomName
    data: msgspec.Raw


class Send(_Frame, tag="send"):
    to: ClientId
    data: msgspec.Raw


class Presence(_Frame, tag="presence"):
    room: RoomName


class History(_Frame, tag="history"):
    room: RoomName
    limit: int | None = None
    before: int | None = None  # only messages with a lower seq: the next page of a reply with "more"


class Refresh(_Frame, tag="refresh"):
    token: str


class Ping(_Frame, tag="ping"):
    pass


class Rpc(_Frame, tag="rpc"):
    method: MethodName
    data: msgspec.Raw = NULL


Command = Union[Hello, Join, Leave, Pub, Send, Presence, History, Refresh, Ping, Rpc]
OPS = frozenset(("hello", "join", "leave", "pub", "send", "presence", "history", "refresh", "ping", "rpc"))

class ProtocolError(msgspec.Struct, frozen=True):
    code: str  # bad_frame | unknown_op
    message: str
    ref: Ref = None


_decoder = msgspec.json.Decoder(Command)
_generic = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def decode(frame: bytes) -> Command | ProtocolError:
    """One client frame to a command, or the error to send back."""
    try:
        return _decoder.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        return _explain(frame, exc)


def data_bytes(raw: msgspec.Raw | bytes) -> bytes | str:
    """The ``data`` of a pub or send as bytes to relay, or a message saying what is wrong.

    The raw JSON is relayed as sent, except that text which is not UTF-8 is refused (msgspec
    does not check inside a Raw value) and JSON spread over several lines is re-encoded on
    one, since a newline ends a frame on TCP, TLS and Unix sockets."""
    data = bytes(raw)
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return "'data' is not valid UTF-8"
    if 10 in data:  # b"\n"
        try:
            data = _encoder.encode(_generic.decode(data))
        except (msgspec.DecodeError, RecursionError) as exc:
            # JSON a client may send but that does not decode to a value (a number out of
            # range, like 1e999): the client's fault, a bad_frame, never the server's.
            return f"'data' cannot be relayed: {str(exc).replace('`$', '`data')}"
    return data


def _explain(frame: bytes, exc: Exception) -> ProtocolError:
    """The slow path: say precisely what is wrong with a frame that did not decode."""
    try:
        obj = _generic.decode(frame)
    except msgspec.DecodeError:
        return ProtocolError("bad_frame", "frame is not valid JSON: send one JSON object per frame")
    except RecursionError:
        return ProtocolError("bad_frame", "frame nests too deeply")
    if not isinstance(obj, dict):
        return ProtocolError("bad_frame", f"frame must be a JSON object, got {type(obj).__name__}")
    ref = obj.get("ref")
    if not isinstance(ref, (int, str)) or isinstance(ref, bool):
        ref = None
    op = obj.get("op")
    if not isinstance(op, str):
        return ProtocolError("bad_frame", "frame needs an 'op' string field", ref)
    if op not in OPS:
        return ProtocolError("unknown_op", f"unknown op {op!r}; known: {', '.join(sorted(OPS))}", ref)
    detail = str(exc)
    if detail.endswith("- at `$.room`") and "length" in detail:
        return ProtocolError("bad_frame", f"'room' must be 1 to {MAX_ROOM_LENGTH} characters", ref)
    if detail.endswith("- at `$.method`") and "length" in detail:
        return ProtocolError("bad_frame", f"'method' must be 1 to {MAX_METHOD_LENGTH} characters", ref)
    if detail.endswith("- at `$.to`") and "length" in detail:
        return ProtocolError("bad_frame", "'to' must be a client id", ref)
    detail = detail.replace("`$.", "`")
    return ProtocolError("bad_frame", f"bad '{op}' frame: {detail}", ref)


# --------------------------------------------------------------------- server frames


def encode(obj: dict) -> bytes:
    return _encoder.encode(obj)


def with_ref(frame: dict, ref: Ref) -> bytes:
    if ref is not None:
        frame["ref"] = ref
    return _encoder.encode(frame)


PING = b'{"op":"ping"}'  # a ping as clients send it, byte for byte
PONG = b'{"op":"pong"}'


def pong(ref: Ref) -> bytes:
    if type(ref) is int:
        return b'{"op":"pong","ref":%d}' % ref
    return PONG if ref is None else b'{"op":"pong","ref":%b}' % _encoder.encode(ref)


def ok(ref: int | str, seq: int) -> bytes:
    """``{"op":"ok","ref":REF,"seq":SEQ}``, a publication's ack, built without a dict."""
    if type(ref) is int:
        return b'{"op":"ok","ref":%d,"seq":%d}' % (ref, seq)
    return b'{"op":"ok","ref":%b,"seq":%d}' % (_encoder.encode(ref), seq)


def error(code: str, message: str, ref: Ref = None) -> bytes:
    return with_ref({"op": "error", "code": code, "message": message}, ref)


def bye(reason: str, reconnect: bool) -> bytes:
    return _encoder.encode({"op": "bye", "reason": reason, "reconnect": reconnect})


def json_str(text: str) -> bytes:
    return _encoder.encode(text)


def room_msg(room_json: bytes, seq: int, sender_json: bytes, data: bytes, ts: int) -> bytes:
    """``{"op":"msg","room":R,"seq":N,"from":ID,"data":ANY,"ts":MS}`` built without a
    dict: this runs once per publication, and its bytes go to every member."""
    return b"".join(
        (b'{"op":"msg","room":', room_json, b',"seq":', str(seq).encode(), b',"from":', sender_json, b',"data":', data, b',"ts":', str(ts).encode(), b"}")
    )


def ephemeral_msg(room_json: bytes, sender_json: bytes, data: bytes, ts: int) -> bytes:
    """A publication kept out of history: ``msg`` without ``seq``."""
    return b"".join((b'{"op":"msg","room":', room_json, b',"from":', sender_json, b',"data":', data, b',"ts":', str(ts).encode(), b"}"))


def direct_msg(sender_json: bytes, data: bytes) -> bytes:
    return b"".join((b'{"op":"msg","from":', sender_json, b',"data":', data, b"}"))


def server_msg(data: bytes) -> bytes:
    """``{"op":"msg","data":ANY}``: a message the server itself sends one client (no ``from``)."""
    return b'{"op":"msg","data":' + data + b"}"


def with_info(frame: bytes, info: bytes | None) -> bytes:
    """``frame`` (a JSON object) with ``"info":INFO`` added when ``info`` (raw JSON) is set."""
    return frame if info is None else frame[:-1] + b',"info":' + info + b"}"


def result(ref: Ref, data: bytes) -> bytes:
    """``{"op":"result","ref":REF,"data":ANY}``: an rpc's answer (``data`` is raw JSON)."""
    head = b'{"op":"result"' if ref is None else b'{"op":"result","ref":' + _encoder.encode(ref)
    return head + b',"data":' + data + b"}"


# --------------------------------------------------------------------- UDP address validation


#: a "cookie" member anywhere in the frame: the cookie proves the address whatever the frame
#: is, so the frame need not even decode (a deeply nested one is still answered bad_frame)
_COOKIE = re.compile(rb'"cookie"\s*:\s*"([A-Za-z0-9_-]{1,64})"')


def challenge(cookie: bytes) -> bytes:
    """``{"op":"challenge","cookie":C}``: what a UDP source address without a session gets;
    it echoes ``"cookie":C`` in a frame to open one (``cookie`` is base64url ASCII)."""
    return b'{"op":"challenge","cookie":"' + cookie + b'"}'


def echoed_cookie(frame: bytes) -> bytes | None:
    """The value of a ``"cookie"`` string member of a client frame, or None."""
    if b'"cookie"' not in frame:
        return None
    found = _COOKIE.search(frame)
    return found.group(1) if found is not None else None
