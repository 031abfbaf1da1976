"""The hub's admin routes: rooms, and publishing from a backend.

``GET /api/rooms/{room}/history`` reads the newest messages history holds (``limit``,
default :data:`HISTORY_DEFAULT`, at most :data:`HISTORY_MAX`).

``GET /api/rooms`` is paged like ``/api/connections`` (``offset``, ``limit``, total in
``X-Total-Count``), by room name: one request summarizes at most ``limit`` rooms, and picks
them without sorting every name. A publication obeys the limits a client's would:
``max_frame`` and the room-name length."""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..server.admin import error_response, json_response, page_of, paged
from ..server.query import QueryError, whole_number
from .broker import BrokerError
from .protocol import MAX_ROOM_LENGTH

if TYPE_CHECKING:
    from .app import HubApp


class _PublishBody(msgspec.Struct):
    data: msgspec.Raw


_publish_body = msgspec.json.Decoder(_PublishBody)
#: messages ``GET /api/rooms/{room}/history`` returns without ``limit``, and at most
HISTORY_DEFAULT = 50
HISTORY_MAX = 1000


async def room_summary(hub: HubApp, room: str) -> dict[str, Any]:
    policy = hub.policy(room)
    position = await hub.broker.position(room)
    held = await hub.broker.history(room, history=policy.history)
    members = await hub.broker.presence(room) if policy.presence else []
    local = hub.rooms.get(room)
    return {
        "room": room,
        "members": len(members) if policy.presence else (len(local.members) if local else 0),
        "seq": position.seq,
        "epoch": position.epoch,
        "history_size": len(held.publications),
    }


def add_routes(web_app: web.Application, hub: HubApp) -> None:
    async def list_rooms(request: web.Request) -> web.Response:
        page = page_of(request)
        if isinstance(page, web.Response):
            return page
        offset, limit = page
        names = set(await hub.broker.rooms())
        names.update(hub.rooms)
        chosen = heapq.nsmallest(offset + limit, names)[offset:] if limit else []
        return paged([await room_summary(hub, name) for name in chosen], len(names))

    async def get_room(request: web.Request) -> web.Response:
        name = request.match_info["room"]
        held = getattr(hub.broker, "rooms_held", None)  # a local broker's: no listing needed
        if name not in hub.rooms and (name not in held if held is not None else name not in await hub.broker.rooms()):
            return error_response(404, "no_such_room", f"no room {name!r} has members or messages")
        summary = await room_summary(hub, name)
        summary["member_list"] = await hub.broker.presence(name) if hub.policy(name).presence else []
        return json_response(summary)

    async def publish(request: web.Request) -> web.Response:
        name = request.match_info["room"]
        if not 0 < len(name) <= MAX_ROOM_LENGTH:
            return error_response(400, "bad_request", f"a room name is 1 to {MAX_ROOM_LENGTH} characters (the limit clients have too), got {len(name)}")
        max_frame = hub.config.max_frame
        size = request.content_length
        if size is None or size <= max_frame:
            raw = await request.read()  # bounded by the admin app's client_max_size
            size = len(raw)
        if size > max_frame:
            return error_response(
                413, "too_large", f"the body is {size} bytes and max_frame is {max_frame}: a publication may be no larger than a client's frame (raise --max-frame)"
            )
        try:
            body = _publish_body.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return error_response(400, "bad_request", f'send a JSON object {{"data": ANY}}: {exc}')
        try:
            pub = await hub.publish_raw(name, bytes(body.data))
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        except BrokerError as exc:
            return error_response(503, "broker_unavailable", f"nothing was published: {exc}")
        return json_response({"room": name, "seq": pub.seq, "epoch": pub.epoch})

    async def room_history(request: web.Request) -> web.Response:
        name = request.match_info["room"]
        try:
            limit = whole_number(request.query, "limit", HISTORY_DEFAULT, HISTORY_MAX)
        except QueryError as exc:
            return error_response(400, "bad_request", str(exc))
        try:
            result = await hub.broker.history(name, limit=limit, history=hub.policy(name).history)
        except BrokerError as exc:
            return error_response(503, "broker_unavailable", f"history cannot be read now: {exc}")
        messages = [
            {"seq": p.seq, "ts": p.ts, "from": p.sender, "data": msgspec.Raw(bytes(p.data))}
            for p in result.publications
        ]
        return json_response({"room": name, "epoch": result.position.epoch, "seq": result.position.seq, "messages": messages})

    web_app.router.add_get("/api/rooms", list_rooms)
    web_app.router.add_get("/api/rooms/{room}/history", room_history)
    web_app.router.add_get("/api/rooms/{room}", get_room)
    web_app.router.add_post("/api/rooms/{room}/publish", publish)
