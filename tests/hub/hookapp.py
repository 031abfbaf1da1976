"""Hooks that `wirehub serve --app tests.hub.hookapp:hub` loads in the tests (each worker
and node imports this module on its own)."""

from __future__ import annotations

import os

from wirehub.hub import Connect, Hooks, Join, Publish, Reject

hub = Hooks()


@hub.on_connect
def connect(ctx, hello):
    return Connect(user=hello["name"])  # a real app would check a token or a session here


@hub.on_join("members.*")
async def join(ctx, room, data):
    if data != "let me in":
        raise Reject("app.password", "say the password")
    return Join(info={"pid": os.getpid()})


@hub.on_publish("members.*")
def publish(ctx, room, data):
    return Publish(data={"text": str(data).upper()}, info={"by": ctx.user})


@hub.on_rpc("whoami")
async def whoami(ctx, data):
    ctx.state["n"] = ctx.state.get("n", 0) + 1
    return {"client": ctx.client, "pid": os.getpid(), "calls": ctx.state["n"]}


@hub.on_rpc("kick_user")
async def kick_user(ctx, data):
    return await ctx.hub.disconnect(user=data)
