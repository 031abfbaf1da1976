"""The hub with one ``on_publish`` hook for every room that publishes the data it is given,
unchanged: what the hook path itself costs (``bench/peers.py`` row ``pub-hook``,
``bench/hotpath.py`` cases ``hub-pub-hook`` and ``hub-pub-hook-async``).

    wirehub serve --app bench/apps/pub_hook.py:hub
"""

from wirehub.hub import Hooks, Publish

hub = Hooks()


@hub.on_publish("*")
def same(ctx, room, data):
    """A plain hook runs inline, in the read that brought the frame."""
    return Publish(data=data)


async_hub = Hooks()


@async_hub.on_publish("*")
async def same_async(ctx, room, data):
    """An ``async def`` hook runs in the connection's task, frames in order."""
    return Publish(data=data)
