"""Hooks for the JS client's rpc test: an echo method, an application error, a slow method."""

import asyncio

from wirehub.hub import Hooks, Reject

hub = Hooks()


@hub.on_rpc("echo")
def echo(ctx, data):
    return {"you_sent": data, "client": ctx.client}


@hub.on_rpc("refuse")
def refuse(ctx, data):
    raise Reject("app.nope", "this method always refuses")


@hub.on_rpc("slow")
async def slow(ctx, data):
    await asyncio.sleep(data)
    return "late"
