"""The real-time hub: rooms, presence, history, auth — an app on the wirehub framework.

``wirehub serve`` runs it; :class:`Hub` embeds it in your own process.
"""

from .app import HubApp
from .embed import Hub
from .hooks import Connect, Context, Disconnect, Hooks, Join, Publish, Refresh, Reject

__all__ = ["Connect", "Context", "Disconnect", "Hooks", "Hub", "HubApp", "Join", "Publish", "Refresh", "Reject"]
