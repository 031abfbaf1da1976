"""Hooks for the JS client's rpc test: an echo method, an application error, a slow method;
publications to ``live.*`` go out without history (no ``seq``)."""

import asyncio

from wirehub.hub import Hooks, Publish, Reject

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


@hub.on_publish("live.*")
def live(ctx, room, data):
    return None if isinstance(data, dict) and data.get("keep") else Publish(history=False)
