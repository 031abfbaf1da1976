"""Hub hooks, as in the README: ``wirehub serve --app examples/hooks_app.py:hub``.

Messages to ``chat.*`` rooms must be ``{"text": ...}`` of at most 500 characters and are
published with the sender's name added; ``whoami`` is an RPC."""

from wirehub.hub import Hooks, Publish, Reject

hub = Hooks()


@hub.on_publish("chat.*")
async def clean(ctx, room, data):
    if not isinstance(data, dict) or not isinstance(data.get("text"), str) or len(data["text"]) > 500:
        raise Reject("app.bad_message", 'send {"text": ...} of at most 500 characters')
    return Publish(data={**data, "by": ctx.name or ctx.user})


@hub.on_rpc("whoami")
def whoami(ctx, data):
    return {"client": ctx.client, "user": ctx.user, "rooms": sorted(ctx.rooms)}
